"""TotalSegmentator from PyPI, offline, against local model folders, compresses when TUCKER_RANK_RATIO is set:
its ``--fast`` model, and the five part models of its default mode."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import MEASURED, log_lines, run

from nnunet_tucker.tools.synthetic import make_phantom, write_nifti
from nnunet_tucker.tools.whole_run import TOTALSEG_PARTS, part_model_folder, totalseg_home, totalseg_part_labels
from nnunet_tucker.tools.whole_run import TOTALSEG_TASK as TASK_FOLDER
from nnunet_tucker.tools.whole_run import TOTALSEG_TRAINER as TRAINER

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def totalseg_env(tmp_path_factory, model_folder, nnunet_env):
    """A TotalSegmentator home whose `--fast` model is the demo model (no download, no usage stats)."""
    home = totalseg_home(tmp_path_factory.mktemp("totalseg_home"), model_folder)
    env = {k: v for k, v in nnunet_env.items() if not k.startswith("nnUNet_")}
    env["TOTALSEG_HOME_DIR"] = str(home)
    return env


@pytest.fixture(scope="module")
def ct(cases):
    return sorted(cases.glob("*.nii.gz"))[0]


def _check_report(path, stderr):
    report = json.loads(path.read_text())
    assert TASK_FOLDER in report["extra"]["model"]
    assert report["config"]["rank_ratio"] == 0.5 and report["decomposed_layers"] > 0
    assert report["params_after"] < report["params_before"]
    assert report["extra"]["calibration"]["on"] == "first case"  # by this run or an earlier one (then cached)
    assert any(line.startswith("nnunet-tucker: rank_ratio=0.5") for line in log_lines(stderr)), stderr
    assert any(line.startswith("nnunet-tucker: agreement with the original ") for line in log_lines(stderr)), stderr


def test_totalsegmentator_cli_fast_compresses(totalseg_env, ct, tmp_path):
    report = tmp_path / "report.json"
    result = run(["TotalSegmentator", "-i", str(ct), "-o", str(tmp_path / "seg"), "--fast", "-d", "cpu"],
                 totalseg_env, TUCKER_RANK_RATIO="0.5", TUCKER_POLICY="auto", TUCKER_REPORT=str(report))
    _check_report(report, result.stderr)
    assert (tmp_path / "seg" / "spleen.nii.gz").is_file()


def test_totalsegmentator_python_api_compresses(totalseg_env, ct, tmp_path):
    report = tmp_path / "report.json"
    code = (
        "from totalsegmentator.python_api import totalsegmentator; "
        f"totalsegmentator({str(ct)!r}, {str(tmp_path / 'seg')!r}, fast=True, device='cpu', ml=True)"
    )
    result = run([sys.executable, "-c", code], totalseg_env, TUCKER_RANK_RATIO="0.5", TUCKER_POLICY="auto",
                 TUCKER_REPORT=str(report))
    _check_report(report, result.stderr)


def test_totalsegmentator_without_request_is_untouched(totalseg_env, ct, tmp_path):
    result = run(["TotalSegmentator", "-i", str(ct), "-o", str(tmp_path / "seg"), "--fast", "-d", "cpu"],
                 totalseg_env)
    assert not log_lines(result.stderr), result.stderr


def test_totalsegmentator_loads_a_compressed_model_folder(totalseg_env, ct, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(totalseg_env["TOTALSEG_HOME_DIR"], home)
    model = home / "nnunet" / "results" / TASK_FOLDER / f"{TRAINER}__nnUNetPlans__3d_fullres"
    compressed = tmp_path / "compressed"
    run(["nnunet-tucker", "compress", "--calibration", "none",
         "-i", str(model), "-o", str(compressed), "--rank-ratio", "0.5",
         "--policy", "auto", "-f", "0"], totalseg_env)
    shutil.rmtree(model)
    shutil.move(compressed, model)
    result = run(["TotalSegmentator", "-i", str(ct), "-o", str(tmp_path / "seg"), "--fast", "-d", "cpu"],
                 {**totalseg_env, "TOTALSEG_HOME_DIR": str(home)}, TUCKER_HOOK="0")
    assert (tmp_path / "seg" / "spleen.nii.gz").is_file()
    assert not log_lines(result.stderr), result.stderr  # decomposed weights loaded as they are, no hook involved


# The default mode's five part models, small: the demo model's network with each part's classes (its trained
# heads first, random ones after), at a coarse spacing and patch so that each part predicts one small tile.
SMALL_PART = {"patch_size": [16, 32, 32], "spacing": [8.0, 6.0, 6.0]}
PREFIX = "nnunet-tucker: rank_ratio=0.5 policy=auto: "


@pytest.fixture(scope="module")
def parts_env(tmp_path_factory, model_folder, nnunet_env):
    """A TotalSegmentator home whose default mode runs five small part models, with a cache of its own."""
    work = tmp_path_factory.mktemp("totalseg_parts")
    parts = {part: part_model_folder(model_folder, classes, work / "models" / part, seed=index, **SMALL_PART)
             for index, (part, classes) in enumerate(totalseg_part_labels().items())}
    env = {k: v for k, v in nnunet_env.items() if not k.startswith("nnUNet_")}
    env.update(TOTALSEG_HOME_DIR=str(totalseg_home(work / "home", parts=parts)), TUCKER_CACHE_DIR=str(work / "cache"))
    return env


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    """A phantom CT of 96×120×120 mm (64×80×80 voxels once TotalSegmentator resamples it to 1.5 mm)."""
    image, _, spacing = make_phantom(1_000_007, (24, 40, 40), (4.0, 3.0, 3.0))
    path = tmp_path_factory.mktemp("small_ct") / "ct.nii.gz"
    write_nifti(path, np.round(image).astype(np.int16), spacing)
    return path


def _part_folder(part: str) -> str:
    return f"/{TOTALSEG_PARTS[part]}/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres]"


def _summaries(stderr: str) -> dict[str, str]:
    """Part -> the one summary line of its compression (a line per part, each naming its model folder)."""
    lines = [line for line in log_lines(stderr) if line.startswith(PREFIX) and " convolutions decomposed, " in line]
    found = {part: [line for line in lines if line.endswith(_part_folder(part))] for part in TOTALSEG_PARTS}
    assert all(len(found[part]) == 1 for part in TOTALSEG_PARTS) and len(lines) == len(TOTALSEG_PARTS), stderr
    return {part: found[part][0] for part in TOTALSEG_PARTS}


def _check_masks(seg, ct):
    """One mask per class of the task, each of the CT's size (TotalSegmentator's default output)."""
    from totalsegmentator.map_to_binary import class_map

    assert sorted(p.name for p in seg.iterdir()) == sorted(f"{name}.nii.gz" for name in class_map["total"].values())
    size = sitk.ReadImage(str(ct)).GetSize()
    assert sitk.ReadImage(str(seg / "spleen.nii.gz")).GetSize() == size
    assert sitk.ReadImage(str(seg / "rib_right_12.nii.gz")).GetSize() == size


def test_totalsegmentator_default_mode_calibrates_each_part_once_then_reads_the_cache(parts_env, small_ct, tmp_path):
    """``TotalSegmentator -i ct -o seg`` (task total, five part models one after the other): the first run compresses
    and self-calibrates every part once, on the case, naming each as it goes; the next run reads all five from
    the cache."""
    report = tmp_path / "report.json"
    command = ["TotalSegmentator", "-i", str(small_ct), "-d", "cpu"]
    env = {"TUCKER_RANK_RATIO": "0.5", "TUCKER_POLICY": "auto", "TUCKER_REPORT": str(report)}
    start = time.perf_counter()
    first = run([*command, "-o", str(tmp_path / "seg_first")], parts_env, **env)
    first_seconds = time.perf_counter() - start
    lines = log_lines(first.stderr)
    waiting = [line for line in lines if line.startswith(PREFIX + "calibrating on the first case this run segments")]
    assert [line for line in waiting if any(line.endswith(_part_folder(p)) for p in TOTALSEG_PARTS)] == waiting
    assert len(waiting) == len(TOTALSEG_PARTS), first.stderr
    calibrating = [line for line in lines if line.startswith("nnunet-tucker: self-calibrating ")]
    assert [line.split()[2] for line in calibrating] == list(TOTALSEG_PARTS.values()), first.stderr  # in turn
    for index, line in enumerate(calibrating, start=1):
        assert f" (model {index} in this process) on " in line and ": 2 patch(es) of 16×32×32, once per " in line
    first_lines = _summaries(first.stderr)
    decomposed, cases = {}, set()
    for part, line in first_lines.items():  # each calibrated by this run, on the one case it segments
        match = re.search(r"; self-calibrated on (\S+), 2 patch\(es\); decomposed 1 fold\(s\) in ([0-9.]+) s \[", line)
        assert match, line
        cases.add(match[1])
        decomposed[part] = float(match[2])
    assert len(cases) == 1 and all(f" on {next(iter(cases))}: " in line for line in calibrating), first.stderr
    last = json.loads(report.read_text())  # TUCKER_REPORT holds the last compression: the fifth part's
    assert last["extra"]["model"].endswith(_part_folder("ribs")[:-1])
    assert last["extra"]["calibration"]["on"] == "first case" and last["decomposed_layers"] > 0
    assert last["extra"]["cache_misses"] > 0
    _check_masks(tmp_path / "seg_first", small_ct)

    start = time.perf_counter()
    second = run([*command, "-o", str(tmp_path / "seg_second")], parts_env, **env)
    second_seconds = time.perf_counter() - start
    assert not any(line.startswith(("nnunet-tucker: self-calibrating ", PREFIX + "calibrating on the first case"))
                   for line in log_lines(second.stderr)), second.stderr
    for part, line in _summaries(second.stderr).items():
        assert "; self-calibrated on " in line and ", from the cache; cache hit [" in line, line
        assert line.split("; ")[0] == first_lines[part].split("; ")[0]  # the same compression
    _check_masks(tmp_path / "seg_second", small_ct)
    per_part = ", ".join(f"{seconds:.1f}" for seconds in decomposed.values())
    MEASURED.append(f"TotalSegmentator default mode, 5 small parts: first run {first_seconds:.1f} s (self-calibration "
                    f"per part {per_part} s), next run {second_seconds:.1f} s")
