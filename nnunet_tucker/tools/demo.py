"""`nnunet-tucker demo`: what the compression is worth, offline, in under two minutes on 2 CPU cores.

Two proofs at one rank ratio:

- quality, on a small trained model: synthetic CT cases with reference labels (and other,
  unlabelled ones to calibrate on); the demo model shipped inside the package is compressed into
  a new model folder; both models predict the cases through nnU-Net; per-class Dice of the
  compressed vs the original and of both vs the labels, and the safety gate;
- speed, on the real architecture: the forward pass of the TotalSegmentator 3 mm network
  (random weights, no download), original and compressed timed side by side in interleaved
  rounds (`benchmark.benchmark`), with the MAC reduction and the speed-up. The small model's wall
  time is start-up, so it says nothing of speed. This part uses the ``auto`` policy, which decides
  from layer shapes alone: the default, ``profiled``, first times every layer form on the device
  (cached), which lengthens the demo on its first run and, on a busy machine, lets timing noise pick
  the forms.

Each step shows as one progress line on stderr; nnU-Net's own prints, progress bars and warnings
and the package's log lines are hidden unless `verbose`. The summary goes to stdout; the output
folder gets demo.png (quality and speed side by side), speed.json and the evaluation's report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import TuckerConfig
from ..errors import OutputFolderError

logger = logging.getLogger(__name__)

SPEED_PRESET = "totalseg-3mm"
SPEED_ROUNDS = 3  # interleaved rounds; speed-up = ratio of medians
SPEED_WARMUP = 0  # no untimed round: the median of 3 already leaves out a slow first one, and the demo stays short
TOLERANCE = 0.05
POLICY = "profiled"  # quality part: the default policy, what a user who sets only a ratio gets
SPEED_POLICY = "auto"  # speed part: no device profiling (see above)


def run_demo(output: Path, rank_ratio: float = 0.5, overwrite: bool = False, n_cases: int = 2,
             verbose: bool = False, speed_rounds: int = SPEED_ROUNDS) -> dict[str, Any]:
    """Run the demo into `output` (refused if it exists, unless `overwrite`), print its summary;
    return ``{"evaluation": Evaluation, "speed": [VariantTiming, ...], "written": [Path, ...]}``."""
    output = Path(output)
    if output.exists():
        if not overwrite:
            raise OutputFolderError(f"{output} exists; pass --overwrite or choose another folder with -o")
        shutil.rmtree(output)
    progress = _Progress(4, verbose)
    with progress.step(f"making {n_cases} synthetic CT cases with labels, and {n_cases} unlabelled ones to "
                       "calibrate on"):
        from .demo_model import demo_model_folder
        from .synthetic import make_test_cases

        images, calibration = output / "cases" / "images", output / "calibration" / "images"
        make_test_cases(images, n=n_cases, seed=0)
        make_test_cases(calibration, n=n_cases, seed=1)  # unlabelled in spirit: their labels are never read
        model = demo_model_folder()
    config = TuckerConfig(rank_ratio, policy=POLICY, calibration=str(calibration))
    with progress.step(f"compressing the small demo model at rank ratio {rank_ratio}, calibrated on the "
                       "unlabelled cases"):
        from ..nnunet.model_folder import compress_model_folder

        compressed = output / "compressed_model"
        compress_model_folder(model, compressed, config, folds=["0"])
    with progress.step("predicting the cases through nnU-Net, with the original and the compressed model"):
        from .evaluate import evaluate

        evaluation = evaluate(
            model, images, output / "evaluation", compressed=compressed, labels=output / "cases" / "labels",
            folds=["0"], use_mirroring=False, tolerance=TOLERANCE,
        )
    with progress.step("timing the TotalSegmentator 3 mm forward pass, original and compressed side by side"):
        speed, meta = time_speed_preset(rank_ratio, rounds=speed_rounds)
    # matplotlib's debug lines (every font it scores) are no use even with -v
    with contextlib.nullcontext() if verbose else quiet(), levels_at_least(logging.INFO, "matplotlib", "PIL"):
        written = [*write_figure(evaluation, speed, meta, output / "demo.png")]
        written += _write_speed_json(speed, meta, output / "speed.json")
        written += evaluation.write(output / "evaluation")
    print(summary(evaluation, speed, meta))
    print(f"written in {output}: demo.png (quality and speed side by side), speed.json, evaluation/")
    return {"evaluation": evaluation, "speed": speed, "written": written}


def time_speed_preset(rank_ratio: float, rounds: int = SPEED_ROUNDS, preset: str = SPEED_PRESET,
                      policy: str = SPEED_POLICY) -> tuple[list, dict[str, Any]]:
    """The preset network (random, seeded weights) and its compressed copy, forward passes timed side
    by side in the same process: ([original, compressed] timings, meta)."""
    import torch

    from .benchmark import benchmark
    from .presets import PRESETS, build_preset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network, input_shape = build_preset(preset)
    timings = benchmark(network, input_shape, [TuckerConfig(rank_ratio, policy=policy)], "cpu", rounds=rounds,
                        warmup=SPEED_WARMUP)
    meta = {"source": preset, "description": PRESETS[preset].description, "measure": "forward pass",
            "input_shape": list(input_shape), "device": "cpu", "threads": torch.get_num_threads(),
            "rounds": rounds, "warmup": SPEED_WARMUP, "torch": torch.__version__,
            "title": f"{preset}, forward pass, cpu, {torch.get_num_threads()} threads"}
    return timings, meta


def _write_speed_json(timings: Sequence, meta: dict[str, Any], path: Path) -> list[Path]:
    from .benchmark import write_outputs

    write_outputs(timings, meta, path, None)
    return [path]


# --------------------------------------------------------------------------------------------- progress
class _Progress:
    """One line per step on stderr: ``[i/n] what ... 12 s``; what the step runs prints is hidden
    unless verbose (then the step's start and end are log lines among it)."""

    def __init__(self, total: int, verbose: bool) -> None:
        self.total, self.verbose, self.index = total, verbose, 0

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.index += 1
        head = f"[{self.index}/{self.total}] {text}"
        start = time.perf_counter()
        if self.verbose:
            logger.info("%s ...", head)
            yield
            logger.info("[%d/%d] done in %.1f s", self.index, self.total, time.perf_counter() - start)
            return
        stream = sys.stderr
        stream.write(f"{head} ...")
        stream.flush()
        try:
            with quiet():
                yield
        except BaseException:
            stream.write(" failed\n")
            raise
        stream.write(f" {time.perf_counter() - start:.0f} s\n")
        stream.flush()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide what the code inside prints: nnU-Net's prints (stdout) and progress bars (stderr), Python
    warnings, and INFO log lines of every logger (this package's included). Log records of level
    WARNING and above still reach the handlers that were set up before (they hold the real stream)."""
    with (open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null),
          levels_at_least(logging.WARNING, "", "nnunet_tucker", "nnunetv2")):
        yield


@contextlib.contextmanager
def levels_at_least(level: int, *names: str) -> Iterator[None]:
    """Raise the named loggers ("" = the root) to at least `level` (effective), for the block only."""
    loggers = [logging.getLogger(name or None) for name in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for lg, old in zip(loggers, before, strict=True):
            lg.setLevel(old)


# ---------------------------------------------------------------------------------------------- summary
def _fmt_ratio(x: float) -> str:
    return f"{x:.1f}×" if x < 10 else f"{x:.0f}×"


def summary(evaluation, speed: Sequence, meta: dict[str, Any]) -> str:
    """The demo's result for the terminal: the quality table and gate, then the speed table."""
    d = evaluation.to_dict()
    s = d["summary"]
    report = next(r["compression"] for r in d["runs"] if r["compression"])
    config = report["config"]
    original, compressed = speed[0], speed[1]
    with_ref = "original_vs_reference" in s
    lines = [
        "",
        f"Quality on a small trained model, speed on the real architecture, both at rank ratio "
        f"{config['rank_ratio']}:",
        "",
        f"Quality: the shipped demo model on {len(d['cases'])} synthetic CT cases ({config['policy']} policy, "
        f"calibrated on {len(report['calibration']['cases'])} others)",
        f"  parameters {report['params_before'] / 1e6:.2f} M → {report['params_after'] / 1e6:.2f} M, "
        f"MACs {report['macs_before'] / 1e9:.2f} G → {report['macs_after'] / 1e9:.2f} G per patch "
        f"({100 * report['macs_after'] / report['macs_before']:.0f} %)",
        f"  {'Dice':<10} {'compressed vs original':>23}"
        + (f" {'original vs reference':>22} {'compressed vs reference':>24}" if with_ref else ""),
    ]
    for name in evaluation.classes:
        row = f"  {name:<10} {s['compressed_vs_original']['dice'][name]:>23.3f}"
        if with_ref:
            row += (f" {s['original_vs_reference']['dice'][name]:>22.3f}"
                    f" {s['compressed_vs_reference']['dice'][name]:>24.3f}")
        lines.append(row)
    tolerance = d["tolerance"]
    rule = f"every class ≥ {1 - tolerance:g} vs the original" + (
        f" and within {tolerance:g} of the original vs reference" if with_ref else "")
    verdict = ("passed" if d["passed"] else "FAILED for " + ", ".join(d["failing_classes"])
               + ": do not deploy this setting; try a milder --rank-ratio (e.g. 0.9)")
    lines.append(f"  gate ({rule}): {verdict}")
    shape = "×".join(str(n) for n in meta["input_shape"][2:])
    lines += [
        "",
        f"Speed: TotalSegmentator 3 mm architecture (random weights), one {shape} patch, {meta['device']}, "
        f"{meta['threads']} threads",
        f"  {compressed.policy} policy" + (" (from layer shapes; profiled, the default, first times each layer on "
                                           "this CPU)" if compressed.policy == "auto" else ""),
        f"  {'forward pass':<12} {'parameters':>11} {'MACs':>9} {'median time':>12}",
    ]
    for label, t in (("original", original), ("compressed", compressed)):
        lines.append(f"  {label:<12} {t.params / 1e6:>9.2f} M {t.macs / 1e9:>7.1f} G {t.median:>10.2f} s")
    lines.append(f"  {_fmt_ratio(compressed.mac_reduction)} fewer MACs, {compressed.speedup:.2f}× faster "
                 f"(median of {len(compressed.seconds)} interleaved rounds)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- figure
def write_figure(evaluation, speed: Sequence, meta: dict[str, Any], path: Path) -> list[Path]:
    """One PNG: per-class Dice of the small trained model (left) and the forward-pass time of the
    3 mm architecture, original vs compressed (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = evaluation.to_dict()
    config = next(r["compression"] for r in d["runs"] if r["compression"])["config"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [1.6, 1]})
    evaluation.plot_dice(left)
    left.set_title(f"Quality: small trained demo model, {len(d['cases'])} synthetic CT cases\n"
                   f"per-class Dice (mean over cases), {config['policy']} policy", fontsize=10)

    original, compressed = speed[0], speed[1]
    top = max(max(t.seconds) for t in (original, compressed))
    for x, (t, colour) in enumerate(((original, "#aaaaaa"), (compressed, "#1f77b4"))):
        right.bar(x, t.median, width=0.6, color=colour)
        right.errorbar(x, t.median, yerr=[[t.median - min(t.seconds)], [max(t.seconds) - t.median]], color="black",
                       capsize=4)
        right.text(x, max(t.seconds) + 0.03 * top, f"{t.median:.2f} s\n{t.params / 1e6:.1f} M params\n"
                   f"{t.macs / 1e9:.0f} GMACs", ha="center", va="bottom", fontsize=8)
    right.set_xticks([0, 1], ["original", "compressed"])
    right.set_ylim(0, 1.45 * top)
    right.set_ylabel(f"s per forward pass (median of {len(original.seconds)}, min–max)")
    shape = "×".join(str(n) for n in meta["input_shape"][2:])
    right.set_title(f"Speed: TotalSegmentator 3 mm architecture\n{compressed.speedup:.2f}× faster, "
                    f"{_fmt_ratio(compressed.mac_reduction)} fewer MACs", fontsize=10)
    right.set_xlabel(f"one {shape} patch, {meta['device']}, {meta['threads']} threads,\nrandom weights, "
                     f"{compressed.policy} policy", fontsize=8)
    fig.suptitle(f"nnunet-tucker at rank ratio {config['rank_ratio']}, no retraining", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
