"""`nnunet-tucker demo`: the whole workflow on the embedded default, offline, in about a minute.

Makes synthetic CT cases with reference labels (and other, unlabelled ones to calibrate on),
compresses the demo model shipped inside the package into a new model folder, predicts the cases
with both through nnU-Net, and reports parameters, MACs, wall time and per-class Dice (report and
figures in the output folder).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..config import TuckerConfig
from ..demo_model import demo_model_folder
from ..synthetic import make_test_cases
from .evaluate import Evaluation, evaluate
from .model_folder import ModelFolderError, compress_model_folder

logger = logging.getLogger(__name__)


def run_demo(output: Path, rank_ratio: float = 0.5, overwrite: bool = False, n_cases: int = 2) -> Evaluation:
    """Run the demo into `output` (refused if it exists, unless `overwrite`); return the evaluation."""
    output = Path(output)
    if output.exists():
        if not overwrite:
            raise ModelFolderError(f"{output} exists; pass --overwrite or choose another folder with -o")
        shutil.rmtree(output)
    model = demo_model_folder()
    logger.info("1/3 making %d synthetic CT cases in %s, and %d to calibrate on", n_cases, output / "cases",
                n_cases)
    images = output / "cases" / "images"
    make_test_cases(images, n=n_cases, seed=0)
    calibration = output / "calibration" / "images"  # unlabelled in spirit: their labels are never read
    make_test_cases(calibration, n=n_cases, seed=1)
    config = TuckerConfig(rank_ratio, calibration=str(calibration))
    logger.info("2/3 compressing the demo model %s (%s)", model.name, config)
    compressed = output / "compressed_model"
    compress_model_folder(model, compressed, config, folds=["0"])
    logger.info("3/3 predicting with the original and the compressed model")
    evaluation = evaluate(
        model, images, output / "evaluation", compressed=compressed, labels=output / "cases" / "labels",
        folds=["0"], use_mirroring=False, tolerance=0.05,
    )
    written = evaluation.write(output / "evaluation")
    print(_summary(evaluation))
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return evaluation


def _summary(evaluation: Evaluation) -> str:
    d = evaluation.to_dict()
    s = d["summary"]
    report = next(r["compression"] for r in d["runs"] if r["compression"])
    original, compressed = (s["wall_seconds"][k] for k in ("original", "compressed"))
    lines = [
        "",
        f"nnunet-tucker demo: rank ratio {report['config']['rank_ratio']} ({report['config']['policy']} policy, "
        f"calibrated on {len(report['calibration']['cases'])} unlabelled images)",
        f"  parameters  {report['params_before'] / 1e6:8.3f} M → {report['params_after'] / 1e6:8.3f} M"
        f"  ({100 * report['params_after'] / report['params_before']:.0f} %)",
        f"  MACs/patch  {report['macs_before'] / 1e9:8.2f} G → {report['macs_after'] / 1e9:8.2f} G"
        f"  ({100 * report['macs_after'] / report['macs_before']:.0f} %)",
        f"  wall time   {original:8.1f} s → {compressed:8.1f} s  (prediction of {len(d['cases'])} cases, "
        f"incl. start-up; {original / compressed:.2f}x)",
        "",
        f"  {'class':<10} {'Dice vs original':>17} {'Dice orig vs ref':>17} {'Dice comp vs ref':>17}",
    ]
    for name in evaluation.classes:
        lines.append(
            f"  {name:<10} {s['compressed_vs_original']['dice'][name]:17.4f} "
            f"{s['original_vs_reference']['dice'][name]:17.4f} {s['compressed_vs_reference']['dice'][name]:17.4f}"
        )
    verdict = (
        "passed: this setting keeps every class" if d["passed"]
        else "not passed for " + ", ".join(d["failing_classes"]) + ": do not deploy this setting; try a milder "
        "--rank-ratio (e.g. 0.9)"
    )
    lines.append(f"\n  safety gate (every class within 0.05 Dice of the original): {verdict}")
    return "\n".join(lines)
