"""MAC budgets and calibration images through the real CLIs: compress, the one-flag predict and its errors."""

from __future__ import annotations

import json

import pytest
from helpers import dice_per_class, load_segmentations, logged, predict, record, run

from nnunet_tucker.tools.synthetic import make_test_cases

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def calibration(workspace):
    """Unlabelled images of the user's own kind (other phantoms than the test cases)."""
    images = workspace / "calibration" / "images"
    make_test_cases(images, n=2, seed=9)
    return images


def test_compress_with_budget_and_calibration_records_both(model_folder, nnunet_env, calibration, workspace):
    out = workspace / "compressed_budget"
    run(["nnunet-tucker", "compress", "-i", str(model_folder), "-o", str(out), "--mac-budget", "0.7",
         "--calibration", str(calibration), "--calibration-patches", "2", "--min-agreement", "0.3"], nnunet_env)
    manifest = json.loads((out / "tucker_manifest.json").read_text())
    assert manifest["config"]["mac_budget"] == 0.7 and manifest["config"]["rank_ratio"] is None
    assert manifest["config"]["min_agreement"] == 0.3
    assert manifest["macs_after"] <= 0.7 * manifest["macs_before"]
    # the last case is kept apart: fitted on the other, measured on it (one tile: the case is one patch)
    assert manifest["calibration"]["cases"] == ["case_000"] and manifest["calibration"]["held_out_case"] == "case_001"
    agreement = manifest["calibration"]["agreement"]
    assert agreement["case"] == "case_001" and agreement["tiles"] == 1 and agreement["worst"][1] >= 0.3
    assert set(agreement["classes"]) <= {"liver", "spleen", "kidney", "bone"}
    assert manifest["calibration"]["folder"] == str(calibration.resolve())
    assert any("calibrated" in layer["reason"] for layer in manifest["layers"])


def test_one_flag_predict_with_calibration(nnunet_env, cases, calibration, tmp_path):
    report = tmp_path / "report.json"
    reference, out = tmp_path / "original", tmp_path / "calibrated"
    predict(nnunet_env, cases, reference, "-f", "0", "--disable_tta")
    predict(nnunet_env, cases, out, "-f", "0", "--disable_tta", "-tucker_mac_budget", "0.8",
            "-tucker_calibration", str(calibration), script="nnUNetv2_predict_tucker", TUCKER_REPORT=str(report))
    data = json.loads(report.read_text())
    assert data["config"]["mac_budget"] == 0.8 and data["extra"]["calibration"]["patches"] == 4
    scores = dice_per_class(load_segmentations(out), load_segmentations(reference))
    record("mac_budget 0.8 + calibration vs uncompressed (fold 0)", scores)
    assert min(scores.values()) > 0.5


def test_bad_calibration_folder_is_a_clear_error(model_folder, nnunet_env, tmp_path):
    folder = tmp_path / "calibration"  # (every kind of bad folder: tests/test_calibration_images.py)
    folder.mkdir()
    message = "it is empty"
    result = run(["nnunet-tucker", "compress", "-i", str(model_folder), "-o", str(tmp_path / "out"),
                  "--mac-budget", "0.7", "--calibration", str(folder)], nnunet_env, check=False)
    assert result.returncode == 2 and logged(result.stderr, "error:", message), result.stderr
    assert not any(line.startswith("Traceback") for line in result.stderr.splitlines()), result.stderr
    assert not (tmp_path / "out").exists()
