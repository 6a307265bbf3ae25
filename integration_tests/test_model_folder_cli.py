"""Nothing lost, nothing stale, through the real console scripts: refusals end in one line
(``nnunet-tucker: error: ...``), exit code 2 (this package's commands and nnU-Net's through the hook), and
touch nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import folder_digest, log_lines, predict, run

pytestmark = pytest.mark.integration

ERROR = "nnunet-tucker: error: "


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(result, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert not any(line.startswith("Traceback ") for line in result.stderr.splitlines()), result.stderr
    line = last_line(result.stderr)
    assert line.startswith(ERROR) and expected in line, result.stderr


def compress(env, source, target, *flags, check=False):
    return run(["nnunet-tucker", "compress", "--calibration", "none",
                "-i", str(source), "-o", str(target), "--rank-ratio", "0.5",
                "--policy", "auto", *flags], env, check=check)


def test_compress_into_the_folder_that_holds_the_source_is_refused(model_folder, nnunet_env, workspace):
    before = folder_digest(workspace / "results")
    for target in (model_folder.parent, model_folder.parent.parent):
        result = compress(nnunet_env, model_folder, target, "--overwrite")
        assert_one_line_error(result, "holds the source model folder")
    assert folder_digest(workspace / "results") == before


@pytest.mark.parametrize("case", ["user folder", "file in the way", "stray fold", "unknown pattern"])
def test_compress_bad_input_is_one_line_and_leaves_things_as_they_were(model_folder, nnunet_env, tmp_path, case):
    source, target, flags = model_folder, tmp_path / "out", ["-f", "0"]
    if case == "user folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        flags.append("--overwrite")
        expected = "is not a model folder written by nnunet-tucker"
    elif case == "file in the way":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "out"
        expected = "is a file, not a folder"
    elif case == "stray fold":
        source = tmp_path / "model"
        shutil.copytree(model_folder, source)
        shutil.copytree(source / "fold_0", source / "fold_0_backup")
        flags = ["-f", "0_backup"]
        expected = "['0_backup'] are not folds"
    else:
        flags += ["--exclude", "decoder.seg_layer.*"]
        expected = "['decoder.seg_layer.*'] match no convolution"
    before = folder_digest(tmp_path)
    assert_one_line_error(compress(nnunet_env, source, target, *flags), expected)
    assert folder_digest(tmp_path) == before


def test_compress_ignores_a_stray_fold_folder(model_folder, nnunet_env, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_folder, source)
    shutil.copytree(source / "fold_0", source / "fold_0_backup")
    compress(nnunet_env, source, tmp_path / "out", check=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("fold_*")) == ["fold_0", "fold_1"]


@pytest.fixture(scope="module")
def one_case(cases, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_case")
    first = sorted(cases.glob("*_0000.nii.gz"))[0]
    shutil.copy(first, folder / first.name)
    return folder


def evaluate(env, model, images, out, *flags, check=False):
    return run(["nnunet-tucker", "evaluate", "-m", str(model), "-i", str(images), "-o", str(out), "-f", "0",
                "--disable_tta", *flags], env, check=check)


def test_evaluate_compares_only_the_cases_of_this_run(model_folder, nnunet_env, cases, one_case, tmp_path):
    out = tmp_path / "ev"
    for sub in ("original", "compressed"):  # what an earlier run on other cases left
        (out / sub).mkdir(parents=True)
        shutil.copy(cases.parent / "labels" / sorted(p.name for p in (cases.parent / "labels").iterdir())[-1],
                    out / sub / "earlier_case.nii.gz")
    (out / "evaluation.json").write_text('{"cases": ["earlier_case.nii.gz"]}')
    before = folder_digest(out)

    mild = ["--rank-ratio", "0.9", "--policy", "auto", "--calibration", "none"]  # (what is compared, not how well)
    assert_one_line_error(evaluate(nnunet_env, model_folder, one_case, out, *mild), "is not empty; pass --overwrite")
    assert folder_digest(out) == before

    evaluate(nnunet_env, model_folder, one_case, out, *mild, "--overwrite", check=True)
    data = json.loads((out / "evaluation.json").read_text())
    assert sorted(data["cases"]) == [p.name.replace("_0000", "") for p in one_case.iterdir()]
    for sub in ("original", "compressed"):
        assert sorted(p.name for p in (out / sub).glob("*.nii.gz")) == sorted(data["cases"])


def test_evaluate_reference_labels_must_match_the_cases(model_folder, nnunet_env, cases, tmp_path):
    """(the other ways labels can fail to match: tests/test_model_folder.py)"""
    labels = tmp_path / "labels"
    labels.mkdir()
    names = sorted(p.name.replace("_0000", "") for p in cases.glob("*_0000.nii.gz"))
    shutil.copy(cases.parent / "labels" / names[0], labels / names[0])
    out = tmp_path / "ev"
    result = evaluate(nnunet_env, model_folder, cases, out, "-r", str(labels), "--rank-ratio", "0.5")
    assert_one_line_error(result, f"has no reference label map for {len(names) - 1} of {len(names)} case(s): "
                                  f"{names[1]}")
    assert not (out / "original").exists()


def test_evaluate_refuses_a_compressed_folder_of_another_model(model_folder, nnunet_env, one_case, tmp_path):
    compressed = tmp_path / "compressed"
    compress(nnunet_env, model_folder, compressed, "-f", "0", check=True)
    other = tmp_path / "other_model"
    shutil.copytree(model_folder, other)
    checkpoint = torch.load(other / "fold_0" / "checkpoint_final.pth", weights_only=False)
    for value in checkpoint["network_weights"].values():
        value.mul_(1.01)
    torch.save(checkpoint, other / "fold_0" / "checkpoint_final.pth")

    result = evaluate(nnunet_env, other, one_case, tmp_path / "ev", "-c", str(compressed))
    assert_one_line_error(result, "was compressed from")
    assert not (tmp_path / "ev" / "original").exists()
    forced = evaluate(nnunet_env, other, one_case, tmp_path / "ev", "-c", str(compressed), "--force")
    assert forced.returncode == 0, forced.stderr  # (the source it came from is accepted: tests/test_model_folder.py)


def test_bad_request_through_unchanged_nnunet_ends_in_one_line(nnunet_env, cases, tmp_path):
    """(a bad value of a variable: test_predict_cli.py)"""
    out = tmp_path / "out"
    result = predict(nnunet_env, cases, out, "-f", "0", check=False, TUCKER_RANK_RATIO="0.5",
                     TUCKER_EXCLUDE="nothing.*")
    assert_one_line_error(result, "['nothing.*']")  # exit code 2, as the package's own commands
    assert not list(out.glob("*.nii.gz"))


def test_bad_flags_of_the_one_flag_command_end_in_the_same_one_line(nnunet_env, cases, tmp_path):
    out = tmp_path / "out"
    result = predict(nnunet_env, cases, out, "-f", "0", "-tucker_rank_ratio", "0.5", "-tucker_mac_budget", "0.3",
                     script="nnUNetv2_predict_tucker", check=False)
    assert_one_line_error(result, "give one of -tucker_rank_ratio and -tucker_mac_budget, not both")
    assert not out.exists()


def test_unwritable_report_path_stops_before_any_work(nnunet_env, cases, tmp_path):
    report = tmp_path / "reports"
    report.mkdir()
    out = tmp_path / "out"
    result = predict(nnunet_env, cases, out, "-f", "0", check=False, TUCKER_RANK_RATIO="0.5", TUCKER_REPORT=str(report))
    assert_one_line_error(result, f"TUCKER_REPORT='{report}' is not allowed: {report} is a folder")
    assert not list(out.glob("*.nii.gz")) and not list(tmp_path.rglob("*.tmp"))


def test_one_flag_overrides_an_exported_budget(nnunet_env, cases, tmp_path):
    result = predict(nnunet_env, cases, tmp_path / "out", "-f", "0", "--disable_tta", "-tucker_rank_ratio", "0.5",
                     "-tucker_policy", "auto", script="nnUNetv2_predict_tucker", TUCKER_MAC_BUDGET="0.3",
                     TUCKER_CALIBRATION="none")  # (calibration is not what this tests)
    lines = log_lines(result.stderr)
    summaries = [line for line in lines if "convolutions decomposed" in line]
    assert len(summaries) == 1 and summaries[0].startswith("nnunet-tucker: rank_ratio=0.5 "), result.stderr
    assert not any("mac_budget" in line for line in lines), result.stderr
