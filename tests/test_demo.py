"""The demo's summary, figure and quiet progress, on a small made-up evaluation and timing (fast)."""

import io
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nnunet_tucker.tools import demo
from nnunet_tucker.tools.benchmark import VariantTiming
from nnunet_tucker.tools.evaluate import Evaluation, PredictionRun

CLASSES = {"liver": 1, "spleen": 2, "kidney": 3}


def _evaluation(tmp_path: Path, spleen_vs_original: float = 0.97, labels: bool = True) -> Evaluation:
    report = {"config": {"rank_ratio": 0.5, "policy": "profiled"}, "calibration": {"cases": ["a", "b"]},
              "params_before": 922_000, "params_after": 660_000, "macs_before": 1.88e9, "macs_after": 1.34e9}
    runs = [PredictionRun("original", "model", tmp_path, 9.0),
            PredictionRun("compressed", "compressed", tmp_path, 9.5, report)]
    cases = {}
    for i in range(2):
        case = {"compressed_vs_original": {n: {"dice": 0.99, "nsd": 0.99} for n in CLASSES}}
        case["compressed_vs_original"]["spleen"]["dice"] = spleen_vs_original
        if labels:
            case["original_vs_reference"] = {n: {"dice": 0.91 + 0.01 * i, "nsd": 0.9} for n in CLASSES}
            case["compressed_vs_reference"] = {n: {"dice": 0.90 + 0.01 * i, "nsd": 0.9} for n in CLASSES}
        cases[f"case_{i:03d}.nii.gz"] = case
    failing = [n for n, v in {"spleen": spleen_vs_original}.items() if v < 0.95]
    return Evaluation(dict(CLASSES), runs, cases, 0.05, failing)


def _speed() -> tuple[list[VariantTiming], dict]:
    original = VariantTiming("original", None, None, 16_600_000, 367_800_000_000, [5.6, 5.5, 5.8])
    compressed = VariantTiming("auto 0.5", 0.5, "auto", 4_970_000, 116_100_000_000, [2.4, 2.5, 2.45],
                               speedup=5.6 / 2.45, mac_reduction=367.8 / 116.1)
    meta = {"input_shape": [1, 1, 112, 112, 128], "device": "cpu", "threads": 2}
    return [original, compressed], meta


def test_summary_says_which_proof_is_which_and_fits_a_screen(tmp_path):
    speed, meta = _speed()
    text = demo.summary(_evaluation(tmp_path), speed, meta)
    assert "Quality on a small trained model, speed on the real architecture" in text
    assert all(name in text for name in CLASSES)
    assert "gate (" in text and "passed" in text
    assert "TotalSegmentator 3 mm" in text and "112×112×128" in text
    assert "× faster" in text and "fewer MACs" in text
    assert "profiled policy" in text and "auto policy" in text  # each part names its policy
    assert len(text.splitlines()) <= 20  # + progress lines and the "written" line: ≤ 25 in all


def test_summary_names_failing_classes(tmp_path):
    speed, meta = _speed()
    text = demo.summary(_evaluation(tmp_path, spleen_vs_original=0.80), speed, meta)
    assert "FAILED for spleen" in text and "passed" not in text


def test_summary_without_labels(tmp_path):
    speed, meta = _speed()
    text = demo.summary(_evaluation(tmp_path, labels=False), speed, meta)
    assert "vs reference" not in text and "compressed vs original" in text


def test_figure_is_one_png(tmp_path):
    speed, meta = _speed()
    written = demo.write_figure(_evaluation(tmp_path), speed, meta, tmp_path / "demo.png")
    assert written == [tmp_path / "demo.png"]
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bar_spans(ax, label):
    container = next(c for c in ax.containers if c.get_label() == label)
    return sorted((round(b.get_x(), 6), round(b.get_x() + b.get_width(), 6)) for b in container)


def _line_spans(ax, label):
    lines = next(c for c in ax.collections if c.get_label().startswith(label))
    spans = [(round(float(s[0][0]), 6), round(float(s[1][0]), 6)) for s in lines.get_segments()]
    heights = [float(s[0][1]) for s in lines.get_segments()]
    return sorted(spans), heights


def test_gate_is_drawn_over_the_bars_it_gates_only(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluation = _evaluation(tmp_path)
    fig, ax = plt.subplots()
    evaluation.plot_dice(ax)
    spans, heights = _line_spans(ax, "gate on compressed vs original")
    assert spans == _bar_spans(ax, "compressed vs original")
    assert heights == pytest.approx([0.95] * len(CLASSES))
    spans, heights = _line_spans(ax, "gate on compressed vs reference")
    assert spans == _bar_spans(ax, "compressed vs reference")
    reference = evaluation.mean("original_vs_reference", "dice")
    assert heights == pytest.approx([reference[n] - 0.05 for n in CLASSES])
    ungated = _bar_spans(ax, "original vs reference")
    for collection in ax.collections:  # no gate line reaches over the baseline bars
        for segment in collection.get_segments():
            assert all(segment[1][0] <= left or segment[0][0] >= right for left, right in ungated)
    plt.close(fig)


def test_quiet_hides_prints_bars_and_info_but_not_warnings(capsys):
    from tqdm import tqdm

    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    package = logging.getLogger("nnunet_tucker")
    package.addHandler(handler)
    level = package.level
    package.setLevel(logging.INFO)
    try:
        with demo.quiet():
            print("nnU-Net says hello")
            for _ in tqdm(range(3), desc="a progress bar"):
                pass
            logging.getLogger("nnunet_tucker.something").info("an info line")
            logging.getLogger("nnunet_tucker.something").warning("a warning")
        assert package.level == logging.INFO
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert seen.getvalue() == "a warning\n"


def test_quiet_hides_the_predictors_chatter(capsys):
    from nnunet_tucker.nnunet.predictor import TuckerPredictor

    with demo.quiet():
        TuckerPredictor(perform_everything_on_device=True, device=torch.device("cpu"), tucker_config=False)
    assert "perform_everything_on_device" not in "".join(capsys.readouterr())
    TuckerPredictor(perform_everything_on_device=True, device=torch.device("cpu"), tucker_config=False)
    assert "perform_everything_on_device" in "".join(capsys.readouterr())  # what -v leaves visible


def test_progress_is_one_line_per_step(capsys):
    progress = demo._Progress(2, verbose=False)
    with progress.step("first"):
        print("hidden")
        print("hidden too", file=sys.stderr)
    with progress.step("second"):
        pass
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[1/2] first ...") and lines[0].endswith(" s")
    assert lines[1].startswith("[2/2] second ...")


def test_progress_marks_a_failed_step(capsys):
    progress = demo._Progress(1, verbose=False)
    with pytest.raises(RuntimeError), progress.step("breaks"):
        raise RuntimeError("no")
    assert capsys.readouterr().err == "[1/1] breaks ... failed\n"


def test_cli_passes_verbose_and_exits_1_when_the_gate_fails(monkeypatch, tmp_path):
    from nnunet_tucker.cli import main

    calls = []

    def fake_run_demo(output, rank_ratio, overwrite=False, verbose=False):
        calls.append((Path(output), rank_ratio, verbose))
        return {"evaluation": SimpleNamespace(failing=["spleen"] if rank_ratio < 0.2 else [])}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["-v", "demo", "-o", str(tmp_path / "d")]) == 0
    assert main(["demo", "-o", str(tmp_path / "d"), "--rank-ratio", "0.1"]) == 1
    assert calls == [(tmp_path / "d", 0.5, True), (tmp_path / "d", 0.1, False)]
