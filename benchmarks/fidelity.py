"""Fidelity without fine-tuning: weights only vs self-calibrated vs calibrated on a folder, and at equal
MACs the published rule vs budgeted ranks.

    python benchmarks/fidelity.py [--model FOLDER|demo|resenc-demo] [--folds 0 1] [--ratios 0.3]
                                  [--budgets 0.2 0.3] [--cases 6] [--calibration-cases 4] [--out DIR]
                                  [--results FILE] [--time-rounds 7]

On the shipped demo model (``--model demo``, the default: nnU-Net's PlainConvUNet trained on synthetic CT,
folds 0 and 1), the shipped residual-encoder demo model (``--model resenc-demo``: planned by nnUNetPlannerResEncM,
BasicBlockD residual blocks, fold 0) or another model folder trained on the phantoms (e.g. one with nnU-Net's own
widths for this dataset: ``python -m nnunet_tucker.tools.demo_model --out-dir full --features 32 64 128 256 320
--folds 0``, about 75 min on 2 cores; or a half-width one, ``--features 16 32 64 128 128``, 12 min; add
``--resenc`` for residual encoders). Folds: every ``fold_N`` of the model folder unless ``--folds`` says which:
- for each rank ratio with the default policy (what ``TUCKER_RANK_RATIO`` alone asks for): the factors
  fitted to the weights alone (``calibration none``), self-calibrated (the default: on the first case a
  run segments, here one other unlabelled case, then from the cache), and calibrated on a folder of cases;
- for each MAC budget (share of the original multiply-accumulates per patch): ``paper``, the published
  rule at the largest rank ratio within the budget, weights only, and ``paper + calibration`` (the same
  ranks, factors fitted on the calibration folder); ``budget``: ranks allocated per layer within the
  budget, weights only; ``budget + self-calibration`` and ``budget + calibration``: ranks (in units of
  the estimated loss) and factors from one self-calibration case or from the calibration folder.
Every variant predicts the same held-out synthetic cases through nnU-Net's predictor (TTA off);
the table gives per-class Dice vs the uncompressed segmentation and vs the ground truth.
Honesty of the agreement estimate: every calibrated variant measures its agreement with the original on tiles it
did not fit on (of the first case, or of the calibration folder's last case, held out); the honesty table sets
that estimate's worst class against the worst class over the held-out cases (``--self-calibrated-only`` runs
just the self-calibrated variants, what that table needs). ``--time-rounds 7`` also times each compressed plan's
forward pass side by side with the original's (``forward_speedup``; the plans' ranks are in the JSON too).
Calibration images are other synthetic cases (their labels unused). Writes ``results.json`` to the work
folder (``--out``) and, with ``--results``, the same JSON to that file (e.g.
``benchmarks/results/fidelity_cpu.json``, from which the docs are rendered: benchmarks/render_readme.py).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_tucker import TuckerConfig, compress_network
from nnunet_tucker.counting import count_macs
from nnunet_tucker.memory import reuse_freed_memory
from nnunet_tucker.nnunet.model_folder import load_trained_model
from nnunet_tucker.plan import plan_compression, plan_compression_from_ranks
from nnunet_tucker.swap import swap_modules
from nnunet_tucker.tools.benchmark import time_forward_passes
from nnunet_tucker.tools.demo_model import demo_model_folder, resenc_demo_model_folder
from nnunet_tucker.tools.evaluate import predict_folder
from nnunet_tucker.tools.metrics import dice
from nnunet_tucker.tools.synthetic import LABELS, make_phantom, make_test_cases, write_nifti

HONESTY_TOLERANCE = 0.02  # how close the agreement estimate should come to the held-out cases' worst class
EVAL_SEED, CALIBRATION_SEED = 70, 80  # held-out phantom series, disjoint from training and each other
SHIPPED = {"demo": demo_model_folder, "resenc-demo": resenc_demo_model_folder}


def model_folder(text: str) -> Path:
    """`--model`: a model folder, or the name of a shipped one (`SHIPPED`)."""
    return SHIPPED[text]() if text in SHIPPED else Path(text)


def trained_folds(model: Path) -> list[str]:
    """The folds of `model` that have a final checkpoint."""
    return sorted(p.parent.name.removeprefix("fold_") for p in model.glob("fold_*/checkpoint_final.pth"))


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
                         f"rank_min={rank_min} (it keeps {share(low):.0%} at least); ask for larger --budgets")
    while high - low > 0.005:
        mid = (low + high) / 2
        low, high = (mid, high) if share(mid) <= budget else (low, mid)
    return low, share(low)


def time_plans(rows: list[dict], network: torch.nn.Module, input_shape: tuple[int, ...], rounds: int) -> None:
    """Each compressed row's ``forward_speedup``: the original's median forward pass over its plan's, timed side by
    side in interleaved rounds on the CPU (the plan's ranks on `network`'s weights, this package's PyTorch forms:
    speed depends on the ranks, not on the fitted values)."""
    reuse_freed_memory()  # as a compressed prediction runs
    variants = {"original": network.eval()}
    for i, row in enumerate(rows):
        if row.get("ranks"):
            variant = copy.deepcopy(network)
            compress_network(variant, TuckerConfig(**row["config"]), input_shape,
                             plan=plan_compression_from_ranks(variant, row["ranks"]))
            variants[str(i)] = variant
    seconds = time_forward_passes(variants, input_shape, torch.device("cpu"), rounds)
    original = statistics.median(seconds.pop("original"))
    for key, timed in seconds.items():
        row = rows[int(key)]
        row["forward_speedup"] = original / statistics.median(timed)
        print(f"{row['target']} {row['variant']}: forward pass {row['forward_speedup']:.2f}x the original's speed "
              f"({rounds} rounds, {torch.get_num_threads()} threads)")


def read_segmentations(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def per_class_dice(segs: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.mean([dice(segs[c] == label, references[c] == label) for c in references]))
            for name, label in LABELS.items() if label > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.2, 0.3])
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.3],
                        help="rank ratios with the default policy (what TUCKER_RANK_RATIO alone asks for)")
    parser.add_argument("--cases", type=int, default=6, help="held-out evaluation cases")
    parser.add_argument("--calibration-cases", type=int, default=4)
    parser.add_argument("--calibration-patches", type=int, help="default: the package's (4 from a folder, "
                        "2 from the first case)")
    parser.add_argument("--rank-min", type=int, default=8, help="lower bound of every rank, all variants (default 8)")
    parser.add_argument("--folds", nargs="+", help="default: every fold of the model folder")
    parser.add_argument("--model", type=model_folder, default="demo",
                        help=f"model folder, or a shipped model: {', '.join(SHIPPED)} (default: demo)")
    parser.add_argument("--first-case-shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="the case self-calibration fits on is a phantom of this many voxels (default: a "
                        "calibration case, one patch: nothing of it is left to hold out)")
    parser.add_argument("--first-case-seed", type=int, default=CALIBRATION_SEED * 10_000 + 999,
                        help="the phantom seed of that case")
    parser.add_argument("--min-agreement", type=float, help="a floor for the self-calibrated variants")
    parser.add_argument("--self-calibrated-only", action="store_true",
                        help="only the self-calibrated variants (what the honesty table needs)")
    parser.add_argument("--time-rounds", type=int, default=0,
                        help="also time each compressed plan's forward pass side by side with the original's")
    parser.add_argument("--out", type=Path, help="folder for results.json and predictions (default: temporary)")
    parser.add_argument("--results", type=Path, help="also write the results JSON to this file")
    args = parser.parse_args()

    model = args.model
    args.folds = args.folds or trained_folds(model)
    work = args.out or Path(tempfile.mkdtemp(prefix="tucker_fidelity_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TUCKER_CACHE_DIR"] = str(work / "cache")  # self-calibrations of this run only
    images, calibration = work / "cases" / "images", work / "calibration" / "images"
    make_test_cases(images, args.cases, seed=EVAL_SEED)
    make_test_cases(calibration, args.calibration_cases, seed=CALIBRATION_SEED)
    first_case = work / "first_case"  # what a self-calibrating run segments first: one other, unlabelled case
    first_case.mkdir(exist_ok=True)
    if args.first_case_shape:
        image, _, spacing = make_phantom(args.first_case_seed, tuple(args.first_case_shape))
        write_nifti(first_case / "first_0000.nii.gz", image, spacing)
    else:
        shutil.copy(sorted(calibration.glob("*_0000.nii.gz"))[0], first_case)
    truth = read_segmentations(images.parent / "labels")

    def run(label: str, config: TuckerConfig | bool) -> dict:
        if config is not False and config.calibration is None:  # self-calibrated on `first_case`, then cached
            predict_folder(model, first_case, work / "predictions" / f"{label}-first", config, args.folds,
                           "checkpoint_final.pth", torch.device("cpu"), False, label)
        result = predict_folder(model, images, work / "predictions" / label, config, args.folds,
                                "checkpoint_final.pth", torch.device("cpu"), False, label)
        # (no report: a floor kept the original network)
        if config is not False and config.calibration is None and result.report is not None:
            assert result.report["extra"]["calibration"]["from_cache"], "the self-calibration was not reused"
        return {"segs": read_segmentations(result.output_folder), "report": result.report, "seconds": result.seconds}

    loaded = load_trained_model(model, folds=args.folds[:1])  # each budget's paper ratio, before any prediction
    paper_ratios = {budget: None if args.self_calibrated_only else
                    paper_ratio_within(loaded.network, loaded.input_shape, budget, args.rank_min)[0]
                    for budget in args.budgets}
    original = run("original", False)
    rows = [{"variant": "original", "target": "100%", "macs": 1.0,
             "dice_vs_original": {n: 1.0 for n, label in LABELS.items() if label > 0},
             "dice_vs_truth": per_class_dice(original["segs"], truth)}]
    cal = {"calibration": str(calibration), "calibration_patches": args.calibration_patches}
    none = {"calibration": "none"}
    self_cal = {"calibration_patches": args.calibration_patches, "min_agreement": args.min_agreement}
    low = {"rank_min": args.rank_min}
    targets: list[tuple[str, dict[str, TuckerConfig]]] = []
    for ratio in args.ratios:
        targets.append((f"ratio {ratio:g}", {
            "weights only": TuckerConfig(ratio, **low, **none),
            "self-calibrated": TuckerConfig(ratio, **low, **self_cal),
            f"calibrated on {args.calibration_cases} cases": TuckerConfig(ratio, **low, **cal),
        }))
    for budget in args.budgets:
        ratio = paper_ratios[budget]
        targets.append((f"{budget:.0%} MACs", {
            **({} if ratio is None else {
                f"paper (ratio {ratio:.3f})": TuckerConfig(ratio, policy="paper", **low, **none),
                "paper + calibration": TuckerConfig(ratio, policy="paper", **low, **cal)}),
            "budget": TuckerConfig(mac_budget=budget, **low, **none),
            "budget + self-calibration": TuckerConfig(mac_budget=budget, **low, **self_cal),
            "budget + calibration": TuckerConfig(mac_budget=budget, **low, **cal),
        }))
    for target, variants in targets:
        for name, config in variants.items():
            if args.self_calibrated_only and "self-calibrat" not in name:
                continue
            label = f"{target}-{name.split(' (')[0]}".replace(" ", "_").replace("%", "pct").replace("+", "and")
            out = run(label, config)
            report = out["report"] or {"macs_after": 1, "macs_before": 1, "extra": {}}  # None: kept uncompressed
            rows.append({
                "variant": name, "target": target, "macs": report["macs_after"] / report["macs_before"],
                "dice_vs_original": per_class_dice(out["segs"], original["segs"]),
                "dice_vs_truth": per_class_dice(out["segs"], truth),
                "config": config.to_dict(), "calibration": report["extra"].get("calibration"),
                "ranks": {layer["name"]: layer["ranks"] for layer in report.get("layers", []) if layer["ranks"]},
            })
            print_row(rows[-1])

    if args.time_rounds:
        time_plans(rows, loaded.network, loaded.input_shape, args.time_rounds)
    print("\n" + table(rows))
    honest = honesty(rows)
    print("\n" + honesty_table(honest))
    results = {
        "command": f"python benchmarks/fidelity.py {shlex.join(sys.argv[1:])}".strip(),
        "date": datetime.date.today().isoformat(),
        "model": str(model), "folds": args.folds, "held_out_cases": args.cases,
        "calibration_cases": args.calibration_cases, "threads": torch.get_num_threads(),
        "measure": "per-class Dice, mean over the held-out synthetic cases, vs the uncompressed segmentation "
                   "and vs ground truth; TTA off",
        "rows": rows,
        "honesty": honest,
    }
    for path in [work / "results.json", *([args.results] if args.results else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        print(f"results: {path}")


def honesty(rows: list[dict]) -> list[dict]:
    """For each calibrated row that measured its agreement (held-out tiles of the first case, or a folder's kept
    case): that estimate's worst class against the worst class of the held-out cases (mean Dice vs the original
    per class), and whether they are within `HONESTY_TOLERANCE`."""
    found = []
    for row in rows:
        agreement = (row.get("calibration") or {}).get("agreement")
        if not agreement or agreement.get("worst") is None:
            continue
        measured = min(row["dice_vs_original"], key=row["dice_vs_original"].get)
        estimate = agreement["worst"]
        found.append({"target": row["target"], "variant": row["variant"], "macs": row["macs"],
                      "estimate": {"class": estimate[0], "dice": estimate[1], "tiles": agreement["tiles"],
                                   "case": agreement["case"]},
                      "held_out_cases": {"class": measured, "dice": row["dice_vs_original"][measured]},
                      "difference": estimate[1] - row["dice_vs_original"][measured],
                      "within": abs(estimate[1] - row["dice_vs_original"][measured]) <= HONESTY_TOLERANCE})
    return found


def honesty_table(found: list[dict]) -> str:
    lines = ["| target | variant | MACs kept | estimate: worst class (held-out tiles) | held-out cases: worst class | "
             f"difference | within ±{HONESTY_TOLERANCE} |", "|---|---|---|---|---|---|---|"]
    for h in found:
        lines.append(f"| {h['target']} | {h['variant']} | {h['macs']:.1%} | {h['estimate']['dice']:.3f} "
                     f"({h['estimate']['class']}, {h['estimate']['tiles']} tiles of {h['estimate']['case']}) | "
                     f"{h['held_out_cases']['dice']:.3f} ({h['held_out_cases']['class']}) | {h['difference']:+.3f} | "
                     f"{'yes' if h['within'] else 'no'} |")
    return "\n".join(lines)


def print_row(row: dict) -> None:
    worst = min(row["dice_vs_original"].values())
    print(f"{row['target']} {row['variant']:<26} MACs {row['macs']:.1%} worst class Dice vs original {worst:.3f}",
          flush=True)


def table(rows: list[dict]) -> str:
    names = [n for n, label in LABELS.items() if label > 0]
    head = ("| target | variant | MACs kept | " + " | ".join(f"{n} vs orig" for n in names) + " | worst vs orig | "
            + " | ".join(f"{n} vs truth" for n in names) + " |")
    lines = [head, "|" + "---|" * (4 + 2 * len(names))]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['variant']} | {r['macs']:.1%} | "
            + " | ".join(f"{r['dice_vs_original'][n]:.3f}" for n in names)
            + f" | **{min(r['dice_vs_original'].values()):.3f}** | "
            + " | ".join(f"{r['dice_vs_truth'][n]:.3f}" for n in names) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
