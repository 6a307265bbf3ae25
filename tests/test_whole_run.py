"""The whole-run benchmark: stage accounting, TotalSegmentator's timing lines, nnU-Net in process."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import pytest
import torch

from nnunet_tucker.cli import main
from nnunet_tucker.config import TuckerConfig
from nnunet_tucker.tools import whole_run
from nnunet_tucker.tools.whole_run import (
    IN_PROCESS_STAGES,
    PREDICT_STAGES,
    TOTALSEG_STAGES,
    StageClock,
    predict_stages,
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


def test_nnunet_predict_stages_come_from_the_first_of_each_of_its_own_lines():
    marks = [(4.0, "There are 1 cases in the source folder"), (4.1, "There are 1 cases that I would like to predict"),
             (9.0, "Predicting case_000:"), (9.0, "perform_everything_on_device: False"),
             (30.0, "sending off prediction to background worker for resampling and export"),
             (30.1, "done with case_000"), (33.0, "Segmentation export complete.")]
    stages = predict_stages(marks, 34.5)
    assert list(stages) == list(PREDICT_STAGES)
    assert [round(v, 6) for v in stages.values()] == [4.0, 5.0, 21.0, 3.0, 1.5]
    with pytest.raises(RuntimeError, match="no line starting 'Segmentation export complete.'"):
        predict_stages(marks[:-1], 34.5)


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


def test_the_default_mode_s_part_models_are_where_the_installed_totalsegmentator_looks():
    tasks = pytest.importorskip("totalsegmentator.map_tasks_config")
    default = tasks.TASK_CONFIGS["total"]["sub_modes"]["default"]
    assert default["trainer"] == whole_run.TOTALSEG_PARTS_TRAINER
    folders = [tasks.TASK_ID_WEIGHTS_CONFIGS[task]["foldername"] for task in default["task_id"]]
    assert folders == list(whole_run.TOTALSEG_PARTS.values())  # in the order TotalSegmentator runs them
    labels = whole_run.totalseg_part_labels()
    assert list(labels) == list(whole_run.TOTALSEG_PARTS)
    assert all(sorted(classes) == list(range(1, len(classes) + 1)) for classes in labels.values())


def test_a_part_model_is_the_source_network_with_the_part_s_classes(tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_tucker.tools.demo_model import demo_model_folder

    source = demo_model_folder()
    source_weights = torch.load(source / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                                weights_only=False)["network_weights"]
    for classes in (24, 3):  # more outputs than the demo model's 5, and fewer
        labels = {value: f"organ_{value}" for value in range(1, classes + 1)}
        folder = whole_run.part_model_folder(source, labels, tmp_path / str(classes), seed=1,
                                             patch_size=[16, 32, 32], spacing=[8.0, 6.0, 6.0])
        assert folder == tmp_path / str(classes) / source.parent.name / source.name
        assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "fold_0", "plans.json"]
        predictor = nnUNetPredictor(device=torch.device("cpu"))
        predictor.initialize_from_trained_model_folder(str(folder), (0,))
        assert predictor.label_manager.num_segmentation_heads == classes + 1
        assert predictor.configuration_manager.patch_size == [16, 32, 32]
        assert predictor.configuration_manager.spacing == [8.0, 6.0, 6.0]
        weights = predictor.list_of_parameters[0]
        for key, tensor in source_weights.items():
            kept = min(classes + 1, tensor.shape[0])
            if key.startswith("decoder.seg_layers."):
                assert weights[key].shape[0] == classes + 1 and torch.equal(weights[key][:kept], tensor[:kept])
            else:
                assert torch.equal(weights[key], tensor)
        assert json.loads((folder / "dataset.json").read_text())["labels"] == {
            "background": 0, **{name: value for value, name in labels.items()}}


def test_a_totalsegmentator_home_holds_the_fast_model_and_the_parts_under_their_trainers(tmp_path):
    from nnunet_tucker.tools.demo_model import demo_model_folder

    parts = {part: demo_model_folder() for part in ("organs", "ribs")}
    home = whole_run.totalseg_home(tmp_path / "home", demo_model_folder(), parts=parts)
    results = home / "nnunet" / "results"
    expected = {(whole_run.TOTALSEG_TASK, whole_run.TOTALSEG_TRAINER),
                (whole_run.TOTALSEG_PARTS["organs"], whole_run.TOTALSEG_PARTS_TRAINER),
                (whole_run.TOTALSEG_PARTS["ribs"], whole_run.TOTALSEG_PARTS_TRAINER)}
    found = {(p.parent.name, p.name.split("__")[0]) for p in results.glob("*/*__nnUNetPlans__3d_fullres")}
    assert found == expected
    for task, trainer in expected:
        for checkpoint in (results / task / f"{trainer}__nnUNetPlans__3d_fullres").glob("fold_*/*.pth"):
            assert torch.load(checkpoint, map_location="cpu", weights_only=False)["trainer_name"] == trainer
    assert json.loads((home / "config.json").read_text())["send_usage_stats"] is False


def test_a_measured_run_gives_its_lines_as_they_came_and_its_peak_memory():
    code = ("import sys, time\nprint('Predicting part 1 of 2 ...')\ntime.sleep(0.6)\nblock = bytearray(200 << 20)\n"
            "print('Predicting part 2 of 2 ...')\ntime.sleep(0.6)\nprint('  Predicted in 1.20s')\n"
            "print('to stderr', file=sys.stderr)\nsys.exit(3)")
    measured = whole_run.run_measured([sys.executable, "-c", code], {**os.environ, "PYTHONUNBUFFERED": "1"})
    assert measured.returncode == 3 and measured.stderr == "to stderr\n"
    assert 0 < measured.cpu_seconds < measured.seconds  # it mostly slept
    assert [line for _, line in measured.marks] == measured.stdout.splitlines() == [
        "Predicting part 1 of 2 ...", "Predicting part 2 of 2 ...", "  Predicted in 1.20s"]
    times = [at for at, _ in measured.marks]
    assert times == sorted(times) and times[-1] <= measured.seconds
    assert measured.peak_rss_mb >= 200  # the 200 MB block, written (bytearray zeroes it)
    if measured.peak_tree_mb is not None:  # sampled while it slept (where /proc exists)
        assert measured.peak_tree_mb >= 200
    seconds = whole_run.part_seconds(measured.marks, ["organs", "ribs"])
    assert list(seconds) == ["organs", "ribs"]
    assert seconds["organs"] == pytest.approx(times[1] - times[0]) and seconds["ribs"] == pytest.approx(
        times[2] - times[1])


def test_the_compression_lines_of_a_default_mode_run_are_read_per_part():
    folders = {"organs": "Dataset291_A", "ribs": "Dataset295_B"}
    stderr = (
        "nnunet-tucker: rank_ratio=0.3 policy=profiled: calibrating on the first case this run segments (once per "
        "model) [/h/Dataset291_A/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres]\n"
        "nnunet-tucker: profiled 120 layer forms on cpu in 13.3 s (cached in /c/profile-1.json)\n"
        "nnunet-tucker: rank_ratio=0.3 policy=profiled: 40/52 convolutions decomposed, parameters 31M → 3M; "
        "self-calibrated on s01, 2 patch(es); decomposed 1 fold(s) in 97.0 s "
        "[/h/Dataset291_A/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres]\n"
        "some other line [/h/Dataset295_B/x]\n"
        "nnunet-tucker: rank_ratio=0.3 policy=profiled: 40/52 convolutions decomposed, parameters 31M → 3M; "
        "self-calibrated on s01, 2 patch(es), at 2026-12-07T03:04:09+00:00, from the cache; cache hit "
        "[/h/Dataset295_B/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres]\n")
    assert whole_run.compression_lines(stderr, folders) == {
        "compression_seconds": {"organs": 97.0, "ribs": 0.0},
        "profile": {"layer_forms_timed": 120, "seconds": 13.3}}
    assert whole_run.compression_lines("", folders) == {"compression_seconds": {},
                                                         "profile": {"layer_forms_timed": 0, "seconds": 0.0}}


def test_the_default_mode_table_sets_first_runs_against_first_runs_and_later_against_later():
    def run(variant, index, seconds, compression):
        stages = dict(zip(TOTALSEG_STAGES, (1.0, 2.0, seconds - 4.0, 1.0), strict=True))
        return {"variant": variant, "round": index, "run": "first" if index == 0 else "later", "seconds": seconds,
                "cpu_seconds": 1.5 * seconds,
                "stages": stages, "parts": {"organs": seconds / 2, "ribs": seconds / 2},
                "compression_seconds": compression, "profile": {"layer_forms_timed": 0, "seconds": 0.0},
                "peak_rss_mb": 1000.0 + seconds, "peak_tree_mb": None}

    records = [run("original", 0, 100.0, {}), run("ratio 0.3", 0, 80.0, {"organs": 30.0, "ribs": 20.0}),
               run("original", 1, 90.0, {}), run("ratio 0.3", 1, 30.0, {"organs": 0.0, "ribs": 0.0}),
               run("original", 2, 94.0, {}), run("ratio 0.3", 2, 34.0, {"organs": 0.0, "ribs": 0.0})]
    rows = whole_run.summarize_default_mode(records)
    assert [(r["variant"], r["run"], r["runs"]) for r in rows] == [
        ("original", "first", 1), ("ratio 0.3", "first", 1), ("original", "later", 2), ("ratio 0.3", "later", 2)]
    assert [r["seconds"] for r in rows] == [100.0, 80.0, 92.0, 32.0]
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 1.25, 1.0, 92.0 / 32.0])
    assert rows[3]["parts"] == {"organs": 16.0, "ribs": 16.0} and rows[3]["peak_rss_mb"] == 1034.0
    table = whole_run.default_mode_markdown("five parts", rows)
    stages = "| 1.0 | 2.0 | 76.0 | 1.0 | 80.0 | 1.25x | 120 | 1.05 GB | n/a |"  # whole run, CPU s, memory
    assert f"| ratio 0.3 | first (self-calibration) {stages}" in table
    assert "| ratio 0.3 | later (median of 2) | 1.0 | 2.0 | 28.0 | 1.0 | 32.0 | 2.88x | 48 | 1.01 GB | n/a |" in table
    assert "| ratio 0.3 | first | 40.0 (30.0) | 40.0 (20.0) |" in table  # per part, of which self-calibration

    once = whole_run.summarize_default_mode(records[:2] + records[3::2])  # the original's first run only
    assert [(r["variant"], r["run"]) for r in once] == [
        ("original", "first"), ("ratio 0.3", "first"), ("ratio 0.3", "later")]
    assert once[2]["speedup"] == pytest.approx(100.0 / 32.0)  # later runs against the original's only run
