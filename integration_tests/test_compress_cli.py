"""`nnunet-tucker compress` and `evaluate` on the trained demo model, loaded by the unchanged nnU-Net CLIs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import folder_digest, load_segmentations, log_lines, logged, predict, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def compressed(model_folder, nnunet_env, workspace):
    out = workspace / "compressed_0.5"
    run(["nnunet-tucker", "compress", "--calibration", "none",
         "-i", str(model_folder), "-o", str(out), "--rank-ratio", "0.5",
         "--policy", "auto"], nnunet_env)
    return out


def test_compressed_folder_is_a_complete_nnunet_model_folder(compressed, model_folder):
    assert {p.name for p in compressed.iterdir()} >= {"dataset.json", "plans.json", "tucker_manifest.json", "fold_0"}
    plans = json.loads((compressed / "plans.json").read_text())
    assert "pip install nnunet-tucker" in plans["tucker_compressed"]["note"]
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == "nnunet_tucker.nnunet.architecture.TuckerNetwork"
    assert arch["arch_kwargs"]["tucker_ranks"]
    manifest = json.loads((compressed / "tucker_manifest.json").read_text())
    source_hashes = {k: v for k, v in folder_digest(model_folder).items() if k.endswith(".pth")}
    assert manifest["source_checkpoints"] == source_hashes
    assert manifest["params_after"] < manifest["params_before"] and manifest["versions"]["nnunetv2"]
    assert all(layer["relative_error"] is not None for layer in manifest["layers"] if layer["ranks"])
    for fold in ("fold_0", "fold_1"):
        path = compressed / fold / "checkpoint_final.pth"
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["trainer_name"] and checkpoint["init_args"]["configuration"] == "3d_fullres"
        # float32 weights, shared modules stored once: the size follows the parameter count
        assert path.stat().st_size < 4 * manifest["params_after"] * 1.1 + 100_000
        assert path.stat().st_size < (model_folder / fold / "checkpoint_final.pth").stat().st_size


def test_unchanged_predict_matches_on_the_fly_compression(compressed, nnunet_env, cases, workspace, tmp_path):
    out_folder = tmp_path / "from_folder"
    run(["nnUNetv2_predict_from_modelfolder", "-i", str(cases), "-o", str(out_folder), "-m", str(compressed),
         "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], nnunet_env, TUCKER_HOOK="0")
    out_fly = tmp_path / "on_the_fly"
    predict(nnunet_env, cases, out_fly, "-f", "0", "--disable_tta", TUCKER_RANK_RATIO="0.5", TUCKER_POLICY="auto",
            TUCKER_CALIBRATION="none", TUCKER_BACKEND="torch")  # as the folder was compressed, run as with no hook
    a, b = load_segmentations(out_folder), load_segmentations(out_fly)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_compressed_folder_runs_on_the_backend_asked_for(compressed, nnunet_env, cases, tmp_path):
    """A compressed folder loaded by the unchanged nnU-Net gets the backend TUCKER_BACKEND names: OpenVINO's
    segmentation is PyTorch's up to argmax near-ties."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs pip install 'nnunet-tucker[openvino]'")
    outputs = {}
    for backend in ("torch", "openvino"):
        outputs[backend] = tmp_path / backend
        result = run(["nnUNetv2_predict_from_modelfolder", "-i", str(cases), "-o", str(outputs[backend]), "-m",
                      str(compressed), "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
                     nnunet_env, TUCKER_BACKEND=backend, TUCKER_CACHE_DIR=str(tmp_path / "cache"))
    assert any(line.startswith("nnunet-tucker: backend openvino: asked for") for line in log_lines(result.stderr)), \
        result.stderr
    a, b = load_segmentations(outputs["torch"]), load_segmentations(outputs["openvino"])
    assert a.keys() == b.keys()
    for case in a:
        assert np.mean(a[case] != b[case]) < 1e-3, case  # near-ties only


def test_compressed_folder_ignores_a_second_request(compressed, nnunet_env, cases, tmp_path):
    result = run(["nnUNetv2_predict_from_modelfolder", "-i", str(cases), "-o", str(tmp_path / "o"), "-m",
                  str(compressed), "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
                 nnunet_env, TUCKER_RANK_RATIO="0.3", TUCKER_POLICY="auto")
    assert logged(result.stderr, "already compressed by nnunet-tucker"), result.stderr


def test_refusals_and_overwrite(compressed, model_folder, nnunet_env, tmp_path):
    again = run(["nnunet-tucker", "compress", "--calibration", "none",
                 "-i", str(model_folder), "-o", str(compressed), "--rank-ratio", "0.3",
                 "--policy", "auto"],
                nnunet_env, check=False)
    assert again.returncode == 2 and logged(again.stderr, "error:", "exists; pass --overwrite"), again.stderr
    twice = run(["nnunet-tucker", "compress", "--calibration", "none",
                 "-i", str(compressed), "-o", str(tmp_path / "x"), "--rank-ratio", "0.3",
                 "--policy", "auto"],
                nnunet_env, check=False)
    assert twice.returncode == 2 and logged(twice.stderr, "error:", "already compressed"), twice.stderr
    assert not (tmp_path / "x").exists()
    target = tmp_path / "over"
    shutil.copytree(compressed, target)  # an earlier output of this package: what --overwrite may replace
    (target / "old.txt").write_text("old")
    run(["nnunet-tucker", "compress", "--calibration", "none",
         "-i", str(model_folder), "-o", str(target), "--rank-ratio", "0.3",
         "--policy", "auto", "-f", "0", "--overwrite"], nnunet_env)
    assert not (target / "old.txt").exists() and (target / "fold_0" / "checkpoint_final.pth").is_file()
    assert not list(tmp_path.glob(".over.*"))


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_bad_checkpoint_gives_clear_error_and_no_output(model_folder, nnunet_env, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    checkpoint = broken / "fold_1" / "checkpoint_final.pth"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    else:
        torch.save({"state_dict": {}}, checkpoint)
    result = run(["nnunet-tucker", "compress", "--calibration", "none",
                  "-i", str(broken), "-o", str(tmp_path / "out"), "--rank-ratio", "0.5",
                  "--policy", "auto"],
                 nnunet_env, check=False)
    assert result.returncode == 2
    expected = "is not a readable PyTorch checkpoint" if damage == "truncated" else "is not an nnU-Net checkpoint"
    assert logged(result.stderr, "error:", f"{Path('fold_1', 'checkpoint_final.pth')} {expected}"), result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_missing_plugin_names_the_package(compressed, nnunet_env, cases, tmp_path):
    stub = tmp_path / "stub" / "nnunet_tucker"
    stub.mkdir(parents=True)
    # behaves as an absent package: ModuleNotFoundError naming it
    (stub / "__init__.py").write_text("raise ModuleNotFoundError('No module named nnunet_tucker', name=__name__)\n")
    result = run(["nnUNetv2_predict_from_modelfolder", "-i", str(cases), "-o", str(tmp_path / "o"), "-m",
                  str(compressed), "-f", "0", "-device", "cpu"], nnunet_env, check=False,
                 PYTHONPATH=str(stub.parent), TUCKER_HOOK="0")
    assert result.returncode != 0
    assert "Network class nnunet_tucker.nnunet.architecture.TuckerNetwork not found" in result.stderr
    assert not any(line.lstrip().startswith("Missing key(s)") for line in result.stderr.splitlines()), result.stderr


@pytest.fixture(scope="module")
def labels(cases):
    return cases.parent / "labels"


def test_evaluate_gate_passes_mild_and_fails_harsh(model_folder, compressed, nnunet_env, cases, labels, workspace):
    mild = workspace / "eval_mild"
    result = run(["nnunet-tucker", "evaluate", "-m", str(model_folder), "--rank-ratio", "0.9", "--policy", "paper",
                  "-i", str(cases), "-r", str(labels), "-o", str(mild), "-f", "0", "--disable_tta",
                  "--tolerance", "0.1"], nnunet_env, check=False)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in mild.iterdir()} >= {"evaluation.json", "evaluation.md", "dice_per_class.png",
                                               "quality_vs_speed.png"}
    data = json.loads((mild / "evaluation.json").read_text())
    assert data["passed"] and set(data["summary"]["compressed_vs_reference"]["dice"]) == {
        "liver", "spleen", "kidney", "bone"}

    harsh = workspace / "eval_harsh"
    result = run(["nnunet-tucker", "evaluate", "-m", str(model_folder), "--rank-ratio", "0.05", "--rank-min", "1",
                  "--policy", "paper", "--calibration", "none", "-i", str(cases), "-o", str(harsh), "-f", "0",
                  "--disable_tta",
                  "--tolerance", "0.02"], nnunet_env, check=False)
    assert result.returncode == 1 and logged(result.stderr, "gate FAILED"), result.stderr
    assert json.loads((harsh / "evaluation.json").read_text())["failing_classes"]
