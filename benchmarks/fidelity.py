"""Fidelity without fine-tuning at equal MACs: published rule vs budgeted ranks vs budgeted + calibration.

    python benchmarks/fidelity.py [--model FOLDER] [--folds 0 1] [--budgets 0.2 0.3] [--cases 6]
                                  [--calibration-cases 4] [--out DIR]

On the shipped demo model (nnU-Net trained on synthetic CT, folds 0 and 1) or another model trained
on the phantoms (e.g. one with nnU-Net's own widths for this dataset: ``python -m nnunet_tucker.demo_model
--out-dir full --features 32 64 128 256 320 --folds 0``, about 75 min on 2 cores; or a half-width one,
``--features 16 32 64 128 128``, 12 min), for each MAC budget
(share of the original multiply-accumulates per patch):
- ``paper``: the published rule (policy paper) at the largest rank ratio within the budget;
- ``paper + calibration``: the same ranks, factors fitted on calibration images (whitened fit,
  then core and last factor refitted in forward order);
- ``budget``: ranks allocated per layer within the budget (weights only);
- ``budget + calibration``: ranks (in units of the estimated loss) and factors from calibration images.
Every variant predicts the same held-out synthetic cases through nnU-Net's predictor (TTA off);
the table gives per-class Dice vs the uncompressed segmentation and vs the ground truth.
Calibration images are other synthetic cases (their labels unused).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_tucker import TuckerConfig
from nnunet_tucker.accounting import count_macs
from nnunet_tucker.demo_model import demo_model_folder
from nnunet_tucker.metrics import dice
from nnunet_tucker.nnunet.evaluate import predict_folder
from nnunet_tucker.nnunet.model_folder import load_trained_model
from nnunet_tucker.surgery import plan_compression, swap_modules
from nnunet_tucker.synthetic import LABELS, make_test_cases

EVAL_SEED, CALIBRATION_SEED = 70, 80  # held-out phantom series, disjoint from training and each other


def paper_ratio_within(network: torch.nn.Module, input_shape: tuple[int, ...], budget: float,
                       rank_min: int) -> tuple[float, float]:
    """The largest rank ratio (to 0.005) whose published-rule compression keeps at most `budget` of the MACs."""

    total, _ = count_macs(network, input_shape)

    def share(ratio: float) -> float:
        compressed = copy.deepcopy(network)
        swap_modules(compressed, plan_compression(compressed, TuckerConfig(ratio, policy="paper", rank_min=rank_min)))
        return count_macs(compressed, input_shape)[0] / total

    low, high = 0.005, 1.0
    if share(low) > budget:
        raise SystemExit(f"the published rule cannot reach {budget:.0%} of the MACs on this model with "
                         f"rank_min={rank_min}")
    while high - low > 0.005:
        mid = (low + high) / 2
        low, high = (mid, high) if share(mid) <= budget else (low, mid)
    return low, share(low)


def read_segmentations(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def per_class_dice(segs: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.mean([dice(segs[c] == label, references[c] == label) for c in references]))
            for name, label in LABELS.items() if label > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--cases", type=int, default=6, help="held-out evaluation cases")
    parser.add_argument("--calibration-cases", type=int, default=4)
    parser.add_argument("--calibration-patches", type=int, default=4)
    parser.add_argument("--rank-min", type=int, default=8, help="lower bound of every rank, all variants (default 8)")
    parser.add_argument("--folds", nargs="+", default=["0", "1"])
    parser.add_argument("--model", type=Path, default=demo_model_folder(), help="model folder (default: demo model)")
    parser.add_argument("--out", type=Path, help="folder for results.json and predictions (default: temporary)")
    args = parser.parse_args()

    model = args.model
    work = args.out or Path(tempfile.mkdtemp(prefix="tucker_fidelity_"))
    work.mkdir(parents=True, exist_ok=True)
    images, calibration = work / "cases" / "images", work / "calibration" / "images"
    make_test_cases(images, args.cases, seed=EVAL_SEED)
    make_test_cases(calibration, args.calibration_cases, seed=CALIBRATION_SEED)
    truth = read_segmentations(images.parent / "labels")

    def run(label: str, config: TuckerConfig | bool) -> dict:
        result = predict_folder(model, images, work / "predictions" / label, config, args.folds,
                                "checkpoint_final.pth", torch.device("cpu"), False, label)
        return {"segs": read_segmentations(result.output_folder), "report": result.report, "seconds": result.seconds}

    original = run("original", False)
    loaded = load_trained_model(model, folds=args.folds[:1])
    rows = [{"variant": "original", "budget": 1.0, "macs": 1.0,
             "dice_vs_original": {n: 1.0 for n, label in LABELS.items() if label > 0},
             "dice_vs_truth": per_class_dice(original["segs"], truth)}]
    cal = {"calibration": str(calibration), "calibration_patches": args.calibration_patches}
    for budget in args.budgets:
        ratio, _ = paper_ratio_within(loaded.network, loaded.input_shape, budget, args.rank_min)
        low = {"rank_min": args.rank_min}
        variants = {
            f"paper (ratio {ratio:.3f})": TuckerConfig(ratio, policy="paper", **low),
            "paper + calibration": TuckerConfig(ratio, policy="paper", **low, **cal),
            "budget": TuckerConfig(mac_budget=budget, **low),
            "budget + calibration": TuckerConfig(mac_budget=budget, **low, **cal),
        }
        for name, config in variants.items():
            out = run(f"{budget}-{name.split(' (')[0].replace(' + ', '+')}", config)
            report = out["report"]
            rows.append({
                "variant": name, "budget": budget, "macs": report["macs_after"] / report["macs_before"],
                "dice_vs_original": per_class_dice(out["segs"], original["segs"]),
                "dice_vs_truth": per_class_dice(out["segs"], truth),
                "config": config.to_dict(),
            })
            print_row(rows[-1])

    print("\n" + table(rows))
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nresults: {work / 'results.json'}")


def print_row(row: dict) -> None:
    worst = min(row["dice_vs_original"].values())
    print(f"{row['budget']:.0%} {row['variant']:<24} MACs {row['macs']:.1%} worst class Dice vs original {worst:.3f}",
          flush=True)


def table(rows: list[dict]) -> str:
    names = [n for n, label in LABELS.items() if label > 0]
    head = ("| budget | variant | MACs kept | " + " | ".join(f"{n} vs orig" for n in names) + " | worst vs orig | "
            + " | ".join(f"{n} vs truth" for n in names) + " |")
    lines = [head, "|" + "---|" * (4 + 2 * len(names))]
    for r in rows:
        lines.append(
            f"| {r['budget']:.0%} | {r['variant']} | {r['macs']:.1%} | "
            + " | ".join(f"{r['dice_vs_original'][n]:.3f}" for n in names)
            + f" | **{min(r['dice_vs_original'].values()):.3f}** | "
            + " | ".join(f"{r['dice_vs_truth'][n]:.3f}" for n in names) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
