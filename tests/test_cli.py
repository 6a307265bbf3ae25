import json
import os
import sys

import pytest

from nnunet_tucker import cli, errors
from nnunet_tucker.cli import main


def _lines_starting(text: str, prefix: str) -> list[str]:
    """The lines of `text` that start with `prefix`: what the command wrote, not text elsewhere (a warning
    quoting a path) that happens to contain the same words."""
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_report_preset_json(capsys):
    assert main(["report", "--preset", "totalseg-3mm", "--rank-ratio", "0.3", "--policy", "auto", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert round(data["macs_before"] / 1e9, 1) == 367.8
    assert data["macs_after"] < data["macs_before"] / 5
    assert data["config"]["policy"] == "auto" and data["decomposed_layers"] > 20


def test_report_table_reads_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("TUCKER_RANK_RATIO", "0.5")
    assert main(["report", "--preset", "totalseg-3mm", "--policy", "paper", "--exclude", "decoder.*"]) == 0
    out = capsys.readouterr().out
    assert _lines_starting(out, "rank_ratio=0.5 policy=paper: "), out  # the summary under the table
    assert all("excluded by pattern" in line for line in out.splitlines() if line.startswith("decoder."))


def test_bad_flag_value_is_named(capsys):
    assert main(["report", "--preset", "totalseg-3mm", "--rank-ratio", "1.5"]) == 2
    assert _lines_starting(capsys.readouterr().err,
                           "nnunet-tucker: error: --rank-ratio=1.5 is not allowed: it must be a number in (0, 1]")


def test_nothing_asked_for(capsys, monkeypatch):
    monkeypatch.delenv("TUCKER_RANK_RATIO", raising=False)
    assert main(["report", "--preset", "totalseg-3mm"]) == 2
    assert _lines_starting(capsys.readouterr().err, "nnunet-tucker: error: no compression asked for")


def test_report_model_folder_reads_plans_and_checkpoint(capsys):
    from nnunet_tucker.tools.demo_model import demo_model_folder

    assert main(["report", "-m", str(demo_model_folder()), "-f", "1", "--rank-ratio", "0.5", "--policy", "auto",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input_shape"] == [1, 1, 32, 64, 64] and data["decomposed_layers"] > 0
    assert all(0 < layer["relative_error"] < 1 for layer in data["layers"] if layer["ranks"])


def test_bench_e2e_needs_a_model_folder(tmp_path):
    assert main(["bench", "--preset", "totalseg-3mm", "--e2e", str(tmp_path)]) == 2


def test_bench_openvino_backend_is_refused_for_a_folder_prediction_and_when_missing(tmp_path, monkeypatch, capsys):
    from nnunet_tucker.tools.demo_model import demo_model_folder

    model = str(demo_model_folder())
    assert main(["bench", "-m", model, "--e2e", str(tmp_path), "--backends", "torch", "openvino"]) == 2
    assert capsys.readouterr().err.startswith("nnunet-tucker: error: --backends openvino times forward passes")
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    assert main(["bench", "--preset", "totalseg-3mm", "--backends", "openvino"]) == 2
    errors = _lines_starting(capsys.readouterr().err, "nnunet-tucker: error: TUCKER_BACKEND=openvino")
    assert len(errors) == 1 and "pip install 'nnunet-tucker[openvino]'" in errors[0]


KINDS = ["TuckerError", "TuckerConfigError", "ModelFolderError", "InputError", "CalibrationError", "OutputFolderError"]


def _one_error_line(stderr: str, message: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"nnunet-tucker: error: {message}"], stderr


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_the_package_s_errors_ends_a_command_in_one_line(kind, capsys, monkeypatch):
    error = getattr(errors, kind)
    assert issubclass(error, errors.TuckerError) and (kind == "TuckerError" or issubclass(error, ValueError))

    def refuse(args):
        raise error(f"a {kind} in the report command")

    monkeypatch.setattr(cli, "_cmd_report", refuse)
    assert main(["report", "--preset", "totalseg-3mm"]) == 2
    _one_error_line(capsys.readouterr().err, f"a {kind} in the report command")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_the_package_s_errors_ends_nnunet_s_predict_command_in_one_line(kind, capsys, monkeypatch):
    from nnunetv2.inference import predict_from_raw_data

    from nnunet_tucker.nnunet import hook

    def refuse():
        raise getattr(errors, kind)(f"a {kind} inside nnU-Net's command")

    monkeypatch.setattr(hook, "patch_predictor_class", lambda cls: None)  # nnU-Net's class stays as it is here
    monkeypatch.setattr(predict_from_raw_data, "predict_entry_point", refuse)
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_predict_tucker"])
    with pytest.raises(SystemExit) as ended:
        cli.predict_entry_point(["-i", "in", "-o", "out"])
    assert ended.value.code == 2
    _one_error_line(capsys.readouterr().err, f"a {kind} inside nnU-Net's command")


def test_the_predict_command_asked_to_compress_asks_torch_for_huge_pages_before_nnunet_runs(monkeypatch):
    from nnunetv2.inference import predict_from_raw_data

    from nnunet_tucker.nnunet import hook

    for name in ("TUCKER_RANK_RATIO", "TUCKER_MAC_BUDGET", "TUCKER_MALLOC", "THP_MEM_ALLOC_ENABLE"):
        monkeypatch.setenv(name, "")  # restored (unset) after the test, whatever the command sets
        monkeypatch.delenv(name)
    seen = []
    monkeypatch.setattr(hook, "patch_predictor_class", lambda cls: None)
    monkeypatch.setattr(predict_from_raw_data, "predict_entry_point",
                        lambda: seen.append(os.environ.get("THP_MEM_ALLOC_ENABLE")))
    cli.predict_entry_point(["-i", "in", "-o", "out"])  # nothing asked: torch left as it is
    cli.predict_entry_point(["-i", "in", "-o", "out", "-tucker_rank_ratio", "0.3"])
    assert seen == [None, "1"]


def test_a_bad_flag_of_the_predict_command_is_one_line_and_nnunet_never_runs(capsys, monkeypatch):
    from nnunetv2.inference import predict_from_raw_data

    monkeypatch.setattr(predict_from_raw_data, "predict_entry_point", lambda: pytest.fail("nnU-Net ran"))
    with pytest.raises(SystemExit) as ended:
        cli.predict_entry_point(["-tucker_rank_ratio", "0.5", "-tucker_mac_budget", "0.3"])
    assert ended.value.code == 2
    _one_error_line(capsys.readouterr().err, "give one of -tucker_rank_ratio and -tucker_mac_budget, not both")


def test_other_errors_are_not_caught(monkeypatch):
    def bug(args):
        raise ValueError("a bug, not a refusal")

    monkeypatch.setattr(cli, "_cmd_report", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["report", "--preset", "totalseg-3mm"])
