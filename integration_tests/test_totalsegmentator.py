"""TotalSegmentator from PyPI, offline, against a local model folder, compresses when TUCKER_RANK_RATIO is set."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from helpers import log_lines, run

from nnunet_tucker.tools.whole_run import TOTALSEG_TASK as TASK_FOLDER
from nnunet_tucker.tools.whole_run import TOTALSEG_TRAINER as TRAINER
from nnunet_tucker.tools.whole_run import totalseg_home

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
