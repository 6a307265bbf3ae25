"""The whole-run benchmark: stage accounting, TotalSegmentator's timing lines, nnU-Net in process."""

from __future__ import annotations

import functools
import json
import logging

import pytest

from nnunet_tucker.cli import main
from nnunet_tucker.config import TuckerConfig
from nnunet_tucker.tools import whole_run
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


def test_interleaved_rounds_keep_the_timed_rounds_and_give_ratios_of_medians(monkeypatch, caplog):
    now = [0.0]
    monkeypatch.setattr(whole_run.time, "perf_counter", lambda: now[0])  # a clock each run moves on
    durations = {"original": [9.0, 4.0, 6.0], "compressed": [5.0, 2.0, 3.0]}  # per round, the first untimed
    calls = []

    def run(name: str) -> dict[str, float]:
        seconds = durations[name][sum(c == name for c in calls)]
        calls.append(name)
        now[0] += seconds
        return {"network": 0.75 * seconds, "other": 0.25 * seconds}

    with caplog.at_level(logging.INFO, logger=whole_run.logger.name):
        timings = whole_run._interleave({name: functools.partial(run, name) for name in durations}, rounds=2,
                                        warmup=1)
    assert calls == ["original", "compressed"] * 3  # interleaved, round by round
    assert [t.name for t in timings] == ["original", "compressed"]
    assert timings[0].seconds == [4.0, 6.0] and timings[1].seconds == [2.0, 3.0]  # the warm-up round left out
    assert dict(timings[1].stages) == {"network": [1.5, 2.25], "other": [0.5, 0.75]}
    assert timings[0].speedup == 1.0 and timings[1].speedup == 2.0  # median 5 s / median 2.5 s
    assert timings[1].to_dict()["stage_medians"] == {"network": 1.875, "other": 0.625}
    assert [r.getMessage() for r in caplog.records][:2] == ["original: 9.0 s (network 6.8, other 2.2)",
                                                              "compressed: 5.0 s (network 3.8, other 1.2)"]
    assert len(caplog.records) == 6  # every run is logged, warm-up ones too


def test_in_process_stages_of_the_demo_model(tmp_path, monkeypatch):
    from nnunet_tucker.tools.demo_model import demo_model_folder
    from nnunet_tucker.tools.synthetic import make_phantom, write_nifti

    monkeypatch.setenv("TUCKER_CACHE_DIR", str(tmp_path / "cache"))
    image, _, spacing = make_phantom(9, shape=(40, 80, 72))
    write_nifti(tmp_path / "case_0000.nii.gz", image, spacing)
    rounds = 2
    timings, check = time_stages(demo_model_folder(), tmp_path / "case_0000.nii.gz",
                                 TuckerConfig(0.5, policy="auto"), rounds=rounds, warmup=0)
    assert [t.name for t in timings] == ["original", "ratio 0.5, nnU-Net's pipeline", "ratio 0.5"]
    for t in timings:
        assert len(t.seconds) == rounds and all(s > 0 for s in t.seconds)
        assert list(t.stages) == list(IN_PROCESS_STAGES)  # every stage, in order
        assert all(len(values) == rounds for values in t.stages.values())
        for stage in IN_PROCESS_STAGES[:-1]:  # each measured stage took time in every round
            assert all(seconds > 0 for seconds in t.stages[stage]), (t.name, stage, t.stages[stage])
        assert all(seconds >= 0 for seconds in t.stages["other"])
        for i, total in enumerate(t.seconds):  # the stages of each run add up to its time
            assert sum(values[i] for values in t.stages.values()) == pytest.approx(total, rel=0.05, abs=0.02)
        assert t.speedup == pytest.approx(timings[0].median / t.median, rel=1e-12)  # a ratio of medians
    assert timings[0].speedup == 1.0
    assert check == {"voxels": 40 * 80 * 72, "voxels_differing": 0, "image_shape": [40, 80, 72],
                     "compared": ["ratio 0.5, nnU-Net's pipeline", "ratio 0.5"]}

    table = to_markdown("demo", timings, IN_PROCESS_STAGES)
    lines = table.splitlines()  # title, blank, head, rule, one row per variant
    assert lines[0] == "### demo" and lines[2] == "| " + " | ".join(["variant", *IN_PROCESS_STAGES, "whole run",
                                                                       "speed-up"]) + " |"
    rows = [line.strip("|").split("|") for line in lines[4:]]
    assert [row[0].strip() for row in rows] == [t.name for t in timings]
    for row, t in zip(rows, timings, strict=True):  # median seconds per stage, whole run, speed-up
        medians = t.stage_medians()
        assert [cell.strip() for cell in row[1:]] == [*(f"{medians[s]:.1f}" for s in IN_PROCESS_STAGES),
                                                      f"{t.median:.1f}", f"{t.speedup:.2f}x"]
    stacked_bars(tmp_path / "stages.png", [("demo", timings, IN_PROCESS_STAGES)])
    assert (tmp_path / "stages.png").stat().st_size > 1000
    written = json.loads(json.dumps([t.to_dict() for t in timings]))
    for data, t in zip(written, timings, strict=True):
        assert data["seconds"] == t.seconds and data["median"] == t.median and data["speedup"] == t.speedup
        assert data["stages"] == dict(t.stages) and data["stage_medians"] == t.stage_medians()


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
