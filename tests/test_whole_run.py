"""The whole-run benchmark: stage accounting, TotalSegmentator's timing lines, nnU-Net in process."""

from __future__ import annotations

import json

import pytest

from nnunet_tucker.cli import main
from nnunet_tucker.config import TuckerConfig
from nnunet_tucker.nnunet import whole_run
from nnunet_tucker.tools.whole_run import (
    IN_PROCESS_STAGES,
    TOTALSEG_STAGES,
    StageClock,
    stacked_bars,
    time_stages,
    to_markdown,
    totalseg_stages,
)


def test_a_stage_counts_its_time_less_the_stages_inside_it(monkeypatch):
    ticks = iter([0.0, 1.0, 4.0, 6.0, 10.0, 10.5])
    monkeypatch.setattr(whole_run.time, "perf_counter", lambda: next(ticks))
    clock = StageClock()
    inner = clock.wrap("network", lambda: "tile")
    outer = clock.wrap("sliding window", lambda: inner())
    assert outer() == "tile"  # outer 0 -> 6 around inner 1 -> 4
    assert dict(clock.seconds) == {"network": 3.0, "sliding window": 3.0}
    inner()  # 10 -> 10.5, on its own
    assert clock.seconds["network"] == 3.5


def test_totalsegmentator_stages_come_from_its_own_lines():
    stdout = ("Resampling...\n  Resampled in 0.91s\nPredicting...\n  Predicted in 45.70s\n/path/Predicted in 9s\n"
              "Resampling...\n  Resampled in 3.03s\nSaving segmentations...\n  Saved in 0.40s\n")
    stages = totalseg_stages(stdout, 62.0)
    assert list(stages) == list(TOTALSEG_STAGES)
    assert stages["resampling"] == pytest.approx(3.94) and stages["prediction (nnU-Net)"] == pytest.approx(45.7)
    assert stages["saving"] == pytest.approx(0.4)
    assert stages["start-up and other"] == pytest.approx(62.0 - 3.94 - 45.7 - 0.4)


def test_in_process_stages_of_the_demo_model(tmp_path, monkeypatch):
    from nnunet_tucker.tools.demo_model import demo_model_folder
    from nnunet_tucker.tools.synthetic import make_phantom, write_nifti

    monkeypatch.setenv("TUCKER_CACHE_DIR", str(tmp_path / "cache"))
    image, _, spacing = make_phantom(9, shape=(40, 80, 72))
    write_nifti(tmp_path / "case_0000.nii.gz", image, spacing)
    timings, check = time_stages(demo_model_folder(), tmp_path / "case_0000.nii.gz",
                                 TuckerConfig(0.5, policy="auto"), rounds=1, warmup=0)
    assert [t.name for t in timings] == ["original", "ratio 0.5, nnU-Net's pipeline", "ratio 0.5"]
    for t in timings:
        stages = t.stage_medians()
        assert list(stages) == list(IN_PROCESS_STAGES) and stages["network"] > 0
        assert sum(stages.values()) == pytest.approx(t.median, rel=0.05)  # the stages cover the run
    assert check["voxels_differing"] == 0 and check["image_shape"] == [40, 80, 72]
    table = to_markdown("demo", timings, IN_PROCESS_STAGES)
    assert table.count("\n| ratio 0.5") == 2
    stacked_bars(tmp_path / "stages.png", [("demo", timings, IN_PROCESS_STAGES)])
    assert (tmp_path / "stages.png").stat().st_size > 1000
    assert json.loads(json.dumps([t.to_dict() for t in timings]))[2]["speedup"] > 0


@pytest.mark.parametrize("extra", [["--preset", "totalseg-1.5mm"],
                                   ["--preset", "totalseg-3mm", "--ratios", "0.5", "0.3"],
                                   ["--preset", "totalseg-3mm", "-device", "mps"]])
def test_whole_run_asks_for_its_default(tmp_path, extra):
    assert main(["bench", *extra, "--whole-run", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_totalsegmentator_is_asked_for_its_own_device_name():
    assert whole_run._totalseg_device("cpu") == "cpu"
    assert whole_run._totalseg_device("cuda") == "gpu"
    assert whole_run._totalseg_device("cuda:1") == "gpu:1"
