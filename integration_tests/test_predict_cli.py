"""The unchanged nnU-Net console scripts compress the model they load when asked (subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from helpers import (
    MEASURED,
    dice_per_class,
    load_probabilities,
    load_segmentations,
    log_lines,
    logged,
    predict,
    record,
    run,
    script,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def baseline_folder(nnunet_env, cases, workspace):
    """The uncompressed prediction, with its probabilities (CASE.npz) beside the segmentations."""
    out = workspace / "pred_baseline"
    result = predict(nnunet_env, cases, out, "-f", "0", "--save_probabilities")
    assert not log_lines(result.stderr), result.stderr  # nothing asked, nothing done
    return out


@pytest.fixture(scope="session")
def baseline(baseline_folder):
    return load_segmentations(baseline_folder)


@pytest.fixture(scope="session")
def compressed_half(nnunet_env, cases, workspace):
    out, report = workspace / "pred_env_0.5", workspace / "report_0.5.json"
    result = predict(nnunet_env, cases, out, "-f", "0", TUCKER_RANK_RATIO="0.5", TUCKER_POLICY="auto",
                     TUCKER_REPORT=str(report))
    return load_segmentations(out), result.stderr, json.loads(report.read_text())


def test_trained_model_segments_the_phantoms(baseline, cases):
    reference = load_segmentations(cases.parent / "labels")
    scores = dice_per_class(baseline, {k: v for k, v in reference.items()})
    record("uncompressed vs reference labels", scores)
    assert min(scores.values()) > 0.7, scores


# Probabilities lie in [0, 1], so tolerances on them are tolerances relative to their scale. Full ranks
# reproduce the network up to float32 rounding, whose size depends on the CPU, the BLAS and the thread count;
# on the demo model it moves probabilities by ~1e-3 at most (most of it in the instance norms fused into the
# last GEMM of a decomposed layer). A wrong factor anywhere moves them by far more.
MOVED = 1e-2
NEAR_TIE = 2 * MOVED  # two probabilities that move by at most MOVED each can swap only if this close


def test_ratio_one_paper_policy_gives_the_same_segmentation(nnunet_env, cases, workspace, baseline_folder):
    """The segmentation is the original's except at near ties: voxels whose top two original probabilities
    are within `NEAR_TIE` (argmax flips there with rounding); the probabilities agree within `MOVED`."""
    out = workspace / "pred_env_1.0"
    result = predict(nnunet_env, cases, out, "-f", "0", "--save_probabilities",  # the decomposition alone
                     TUCKER_RANK_RATIO="1.0", TUCKER_POLICY="paper", TUCKER_RANK_MIN="1", TUCKER_CALIBRATION="none")
    assert logged(result.stderr, "rank_ratio=1.0 policy=paper"), result.stderr
    original, compressed = load_probabilities(baseline_folder), load_probabilities(out)
    segs, baseline = load_segmentations(out), load_segmentations(baseline_folder)
    assert original.keys() == compressed.keys() == {k.removesuffix(".nii.gz") for k in baseline} and original
    differing = voxels = near_ties = 0
    moved = 0.0
    for case, p in original.items():
        seg, ref = segs[f"{case}.nii.gz"], baseline[f"{case}.nii.gz"]
        assert np.array_equal(p.argmax(axis=0), ref)  # the probabilities are the segmentation's
        top_two = np.sort(p, axis=0)[-2:]
        gap = top_two[1] - top_two[0]
        changed = seg != ref
        assert (gap[changed] <= NEAR_TIE).all(), \
            f"{case}: {int(changed.sum())} voxel(s) changed, some where the original was decided: " \
            f"largest top-two gaps {np.sort(gap[changed])[-5:]}"
        moved = max(moved, float(np.abs(compressed[case] - p).max()))
        differing += int(changed.sum())
        voxels += seg.size
        near_ties += int((gap <= NEAR_TIE).sum())
    MEASURED.append(f"ratio 1.0 (paper) vs uncompressed: {differing} of {voxels} voxels differ, all where the "
                    f"original's top two probabilities are within {NEAR_TIE:g} ({near_ties} such voxels); "
                    f"probabilities moved by {moved:.1e} at most")
    assert moved <= MOVED, f"probabilities moved by up to {moved:.2e}"


def test_environment_variable_compresses_and_reports(compressed_half, baseline):
    segs, stderr, report = compressed_half
    assert logged(stderr, "rank_ratio=0.5 policy=auto", "parameters", "MACs"), stderr
    assert report["decomposed_layers"] > 0 and report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"] and report["extra"]["folds"] == 1
    scores = dice_per_class(segs, baseline)
    record("ratio 0.5 (auto) vs uncompressed", scores)
    assert min(scores.values()) > 0.5, scores  # zero-shot at 0.5: a broken decomposition gives ~0


def test_a_variable_alone_calibrates_on_the_first_case_then_the_cache_serves_other_images(
        nnunet_env, cases, workspace, baseline):
    """TUCKER_RANK_RATIO alone (default policy and calibration): the first run calibrates on its first case; a
    later run on another image is compressed at load from the cache and segments it as the first run did."""
    first = predict(nnunet_env, cases, workspace / "pred_self_0.3", "-f", "0", TUCKER_RANK_RATIO="0.3")
    lines = [line for line in log_lines(first.stderr) if line.startswith("nnunet-tucker: rank_ratio=0.3 ")]
    assert len(lines) == 2 and lines[0].startswith("nnunet-tucker: rank_ratio=0.3 policy=profiled: calibrating on "
                                                   "the first case this run segments"), first.stderr
    # the test cases are one patch each: that tile and its mirror image, nothing left to measure the agreement on
    assert "; self-calibrated on case_000, 2 patch(es); decomposed 1 fold(s) in " in lines[1], first.stderr
    unmeasured = "nnunet-tucker: agreement with the original not measured: the fitting tiles cover all of case_000"
    assert [line for line in log_lines(first.stderr) if line.startswith(unmeasured)], first.stderr

    held_out = workspace / "held_out"
    held_out.mkdir()
    shutil.copy(cases / "case_001_0000.nii.gz", held_out)
    second = predict(nnunet_env, held_out, workspace / "pred_self_0.3_again", "-f", "0", TUCKER_RANK_RATIO="0.3")
    lines = [line for line in log_lines(second.stderr) if line.startswith("nnunet-tucker: rank_ratio=0.3 ")]
    assert len(lines) == 1 and "; self-calibrated on case_000, 2 patch(es), at " in lines[0], second.stderr
    assert ", from the cache; cache hit" in lines[0], second.stderr
    assert [line for line in log_lines(second.stderr) if line.startswith(unmeasured)], second.stderr  # as recorded
    again = load_segmentations(workspace / "pred_self_0.3_again")
    assert np.array_equal(again["case_001.nii.gz"], load_segmentations(workspace / "pred_self_0.3")["case_001.nii.gz"])
    scores = dice_per_class(again, {"case_001.nii.gz": baseline["case_001.nii.gz"]})
    record("ratio 0.3 (profiled), self-calibrated on case_000, case_001 vs uncompressed", scores)
    assert min(scores.values()) > 0.5, scores


def test_one_flag_command_matches_the_environment_variable(nnunet_env, cases, workspace, compressed_half):
    out = workspace / "pred_flag_0.5"
    result = predict(nnunet_env, cases, out, "-f", "0", "-tucker_rank_ratio", "0.5", "-tucker_policy", "auto",
                     script="nnUNetv2_predict_tucker")
    assert logged(result.stderr, "rank_ratio=0.5", "cache hit"), result.stderr  # same key as the env run
    segs = load_segmentations(out)
    assert all(np.array_equal(segs[k], compressed_half[0][k]) for k in segs)


def test_flag_overrides_environment(nnunet_env, cases, workspace):
    out = workspace / "pred_flag_over_env"
    result = predict(nnunet_env, cases, out, "-f", "0", "--disable_tta", "-tucker_rank_ratio", "0.3",
                     script="nnUNetv2_predict_tucker", TUCKER_RANK_RATIO="0.9", TUCKER_POLICY="paper",
                     TUCKER_CALIBRATION="none")
    assert logged(result.stderr, "rank_ratio=0.3 policy=paper"), result.stderr


def test_two_fold_ensemble(nnunet_env, cases, workspace, baseline):
    out, report = workspace / "pred_2folds", workspace / "report_2folds.json"
    predict(nnunet_env, cases, out, "-f", "0", "1", "--disable_tta",
            TUCKER_RANK_RATIO="0.5", TUCKER_POLICY="auto", TUCKER_REPORT=str(report))
    data = json.loads(report.read_text())
    assert data["extra"]["folds"] == 2
    scores = dice_per_class(load_segmentations(out), baseline)
    record("ratio 0.5, folds 0+1, no TTA vs uncompressed fold 0", scores)
    assert min(scores.values()) > 0.5


def test_openvino_backend_runs_each_fold_and_matches_pytorch(nnunet_env, cases, workspace, tmp_path):
    """TUCKER_BACKEND=openvino: both folds run compiled by OpenVINO, and the ensemble's segmentation is PyTorch's up
    to argmax near-ties; the report records the backend. The default, auto, times both and says which it keeps."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs pip install 'nnunet-tucker[openvino]'")
    segmentations, logs, reports = {}, {}, {}
    env = {k: v for k, v in nnunet_env.items() if k != "TUCKER_BACKEND"}  # auto: unset, as users run it
    for backend in ("torch", "openvino", "auto"):
        out, report = tmp_path / backend, tmp_path / f"report_{backend}.json"
        chosen = {} if backend == "auto" else {"TUCKER_BACKEND": backend}
        logs[backend] = log_lines(predict(env, cases, out, "-f", "0", "1", "--disable_tta", TUCKER_RANK_RATIO="0.5",
                                          TUCKER_POLICY="auto", TUCKER_CALIBRATION="none", TUCKER_REPORT=str(report),
                                          TUCKER_CACHE_DIR=str(tmp_path / "cache"), **chosen).stderr)
        segmentations[backend] = load_segmentations(out)
        reports[backend] = json.loads(report.read_text())["extra"]["backend"]
    assert reports["torch"]["name"] == "torch" and reports["openvino"]["name"] == "openvino"
    assert any(line.startswith("nnunet-tucker: backend openvino: asked for; converted in") for line in logs["openvino"])
    assert len(list((tmp_path / "cache" / "openvino").glob("*/model.xml"))) == 2  # one per fold
    auto = reports["auto"]
    assert auto["torch_seconds"] > 0 and auto["openvino_seconds"] > 0 and auto["from_cache"]  # converted before
    assert any(line.startswith(f"nnunet-tucker: backend {auto['name']}: ") for line in logs["auto"]), logs["auto"]
    for backend in ("openvino", "auto"):
        a, b = segmentations["torch"], segmentations[backend]
        assert a.keys() == b.keys()
        for case in a:
            assert np.mean(a[case] != b[case]) < 1e-3, (backend, case)  # near-ties only


def test_openvino_asked_for_but_missing_is_one_line_naming_the_extra(nnunet_env, cases, tmp_path):
    """An OpenVINO that cannot be imported (planted first on the path) with TUCKER_BACKEND=openvino: one line that
    names the extra, exit code 2, nothing predicted."""
    planted = tmp_path / "planted" / "openvino"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text("raise ImportError('planted: no OpenVINO here')\n")
    env = {**nnunet_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(planted.parent),
                                                                      nnunet_env.get("PYTHONPATH")]))}
    out = tmp_path / "out"
    result = predict(env, cases, out, "-f", "0", check=False, TUCKER_RANK_RATIO="0.5", TUCKER_BACKEND="openvino")
    assert result.returncode == 2, result.stderr
    errors = [line for line in log_lines(result.stderr) if line.startswith("nnunet-tucker: error: ")]
    assert len(errors) == 1 and "TUCKER_BACKEND=openvino" in errors[0] and "nnunet-tucker[openvino]" in errors[0]
    assert not list(out.glob("*.nii.gz"))


def test_num_parts_processes_share_one_cache_entry(nnunet_env, cases, workspace, tmp_path):
    out = workspace / "pred_parts"
    # the default policy, profiled: both processes must time once and decide alike
    env = {**nnunet_env, "TUCKER_RANK_RATIO": "0.4", "TUCKER_CACHE_DIR": str(tmp_path / "cache")}
    base = [*script("nnUNetv2_predict"), "-i", str(cases), "-o", str(out), "-d", "990", "-c", "3d_fullres", "-f", "0",
            "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta", "-num_parts", "2"]
    procs = [subprocess.Popen([*base, "-part_id", str(i)], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert len(load_segmentations(out)) == 2
    # each segments another case first, but they calibrate once, under a lock: one record, one set of statistics,
    # one decomposition, and whichever process waited says it took the other's from the cache
    cache = tmp_path / "cache"
    calibrated = [line for e in errors for line in log_lines(e)
                  if line.startswith("nnunet-tucker: rank_ratio=0.4 ") and " convolutions decomposed, " in line]
    assert len(calibrated) == 2 and sum(", from the cache; " in line for line in calibrated) == 1, errors
    assert len(list(cache.glob("self-calibration-*.json"))) == 1 and len(list(cache.glob("statistics-*.pt"))) == 1
    assert len([p for p in cache.glob("*.pt") if not p.name.startswith(("statistics-", "label-maps-"))]) == 1
    assert not list(cache.glob("*.tmp"))


def test_plans_field_asks_for_compression(nnunet_env, cases, workspace, model_folder, compressed_half):
    folder = workspace / "with_plans_field"
    shutil.copytree(model_folder, folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["tucker"] = {"rank_ratio": 0.5, "policy": "auto"}
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    out = workspace / "pred_plans_field"
    result = run(["nnUNetv2_predict_from_modelfolder", "-i", str(cases), "-o", str(out), "-m", str(folder),
                  "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], nnunet_env)
    assert logged(result.stderr, "rank_ratio=0.5"), result.stderr
    segs = load_segmentations(out)
    assert all(np.array_equal(segs[k], compressed_half[0][k]) for k in segs)


def test_invalid_ratio_stops_before_any_prediction(nnunet_env, cases, tmp_path):
    value = "1.5"  # (every kind of bad value: tests/test_config.py)
    out = tmp_path / "out"
    result = predict(nnunet_env, cases, out, "-f", "0", check=False, TUCKER_RANK_RATIO=value)
    assert result.returncode == 2, result.stderr
    message = f"nnunet-tucker: error: TUCKER_RANK_RATIO='{value}' is not allowed: it must be a number in (0, 1]"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == message and not any(line.startswith("Traceback ") for line in lines), result.stderr
    assert not list(out.glob("*.nii.gz"))


def test_malformed_plans_field_is_named(nnunet_env, cases, workspace, model_folder, tmp_path):
    folder = tmp_path / "bad_plans"
    shutil.copytree(model_folder, folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["tucker"] = {"rank_ratio": 0.5, "ranks": "low"}
    (folder / "plans.json").write_text(json.dumps(plans))
    result = run(["nnUNetv2_predict_from_modelfolder", "-i", str(cases), "-o", str(tmp_path / "out"),
                  "-m", str(folder), "-f", "0", "-device", "cpu"], nnunet_env, check=False)
    assert result.returncode == 2, result.stderr
    assert logged(result.stderr, "error:", "plans.json: unknown key(s) ['ranks'] in 'tucker'"), result.stderr
    assert not list((tmp_path / "out").glob("*.nii.gz"))
