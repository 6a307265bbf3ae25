"""Speed of the original TotalSegmentator architectures vs the published rule vs our rank policy.

    python benchmarks/speed.py [--device cpu|cuda] [--fp16] [--compile] [--rounds 5] [--e2e-rounds 2]
                               [--policy profiled] [--sweep] [--ratios 0.9 0.7 0.5 0.4 0.3 0.2 0.1 0.05]
                               [--threads N] [--no-forward] [--no-e2e] [--out speed_results]

Tables, each timed in one process with the variants interleaved round by round:

1. forward pass, per preset (totalseg-3mm, totalseg-1.5mm): original vs ``paper`` (the published rule)
   vs ``--policy`` (default ``profiled``; ``auto`` where this version has no ``profiled``) at rank
   ratios 0.5, 0.3 and 0.1, on one patch;
2. with ``--sweep``: forward pass of totalseg-3mm under ``--policy`` at every ``--ratios`` value,
   checked for "never slower than the original" and "a smaller ratio is never slower";
3. end to end: nnU-Net's ``predict_from_files`` (preprocessing, sliding window with step 0.5, export)
   of one synthetic 150×150×160-voxel 3 mm CT with the totalseg-3mm architecture as an nnU-Net model
   folder (random weights: timing, not accuracy), fold 0, TTA off: original vs ratio 0.3 (paper and
   ``--policy``); model load and compression are timed apart.

On a GPU, run it twice, ``--device cuda --fp16`` and ``--device cuda --fp16 --compile`` (the end-to-end
table runs in nnU-Net's own fp16 autocast either way; ``--compile`` sets ``nnUNet_compile`` there).
Tables are printed as they finish; ``--out`` gets one JSON and one PNG per table and ``summary.md``.
Progress and nnU-Net's own output go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nnunet_tucker import TuckerConfig
from nnunet_tucker.config import POLICIES
from nnunet_tucker.tools.benchmark import VariantTiming, benchmark, time_prediction, to_table, write_outputs
from nnunet_tucker.tools.presets import PRESETS, build_preset, write_preset_model_folder
from nnunet_tucker.tools.synthetic import make_phantom, write_nifti

logger = logging.getLogger("speed")

DEFAULT_POLICY = "profiled"
PUBLISHED_POLICY = "paper"
TABLE_RATIOS = (0.5, 0.3, 0.1)
SWEEP_RATIOS = (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
SWEEP_PRESET = "totalseg-3mm"
E2E_PRESET = "totalseg-3mm"
E2E_RATIO = 0.3
E2E_SHAPE = (150, 150, 160)  # z, y, x voxels at 3 mm: 2 x 2 x 2 sliding-window tiles of 112 x 112 x 128
E2E_PHANTOM_SEED = 4242


def resolve_policy(requested: str) -> str:
    """`requested` if this version has it; ``auto`` in place of a missing default ``profiled``."""
    if requested in POLICIES:
        return requested
    if requested == DEFAULT_POLICY:
        logger.warning("policy %r is not in this version (%s); timing 'auto' instead", requested, ", ".join(POLICIES))
        return "auto"
    raise SystemExit(f"speed.py: error: unknown policy {requested!r}; choose one of {', '.join(POLICIES)}")


def policy_configs(ratios: Sequence[float], policies: Sequence[str]) -> list[TuckerConfig]:
    """One config per ratio and policy, ratio-major (paper 0.5, ours 0.5, paper 0.3, ...)."""
    return [TuckerConfig(ratio, policy=policy) for ratio in ratios for policy in dict.fromkeys(policies)]


def comparison_markdown(timings: Sequence[VariantTiming], policies: Sequence[str]) -> str:
    """Speed-up and MAC reduction per rank ratio (rows) and policy (columns), as a Markdown table."""
    policies = list(dict.fromkeys(policies))
    by_key = {(t.rank_ratio, t.policy): t for t in timings if t.policy is not None}
    ratios = list(dict.fromkeys(t.rank_ratio for t in timings if t.rank_ratio is not None))
    head = "| rank ratio | " + " | ".join(f"{p} speed-up | {p} MACs /" for p in policies) + " |"
    lines = [head, "|---" * (1 + 2 * len(policies)) + "|"]
    for ratio in ratios:
        cells = []
        for policy in policies:
            t = by_key.get((ratio, policy))
            cells += [f"{t.speedup:.2f}x", f"{t.mac_reduction:.1f}x"] if t else ["-", "-"]
        lines.append(f"| {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_verdict(timings: Sequence[VariantTiming], noise: float) -> str:
    """Whether every variant is at least as fast as the original, and every smaller ratio at least as
    fast as the larger one before it, allowing `noise` (relative) for timing noise."""
    variants = sorted((t for t in timings if t.rank_ratio is not None), key=lambda t: -t.rank_ratio)
    slower = [f"{t.name} ({t.speedup:.2f}x)" for t in variants if t.speedup < 1 - noise]
    reversals = [f"{b.name} slower than {a.name} ({a.median:.3f} -> {b.median:.3f} s)"
                 for a, b in zip(variants, variants[1:], strict=False) if b.median > a.median * (1 + noise)]
    return "\n".join([
        f"never slower than the original (noise {noise:.0%}): " + ("yes" if not slower else "NO: " + ", ".join(slower)),
        "smaller ratio never slower: " + ("yes" if not reversals else "NO: " + "; ".join(reversals)),
    ])


def write_ct(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    """One synthetic CT (int16 HU) as nnU-Net input ``folder/ct_000_0000.nii.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    image, _, spacing = make_phantom(E2E_PHANTOM_SEED, shape=shape, spacing=spacing)
    path = folder / "ct_000_0000.nii.gz"
    write_nifti(path, np.round(image).astype(np.int16), spacing)
    return path


class Report:
    """Prints each table as it finishes and keeps ``--out`` (JSON, PNG, summary.md) up to date."""

    def __init__(self, out: Path | None, machine: dict) -> None:
        self.out = out
        self.machine = machine
        self.sections = [
            "# nnunet-tucker speed benchmark", "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        ]
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, title: str, timings: Sequence[VariantTiming], meta: dict, extra: str = "") -> None:
        table = to_table(timings)
        print(f"\n== {title}\n{table}" + (f"\n{extra}" if extra else ""), flush=True)
        self.sections += ["", f"## {title}", "", "```text", table, "```"] + (["", extra] if extra else [])
        if self.out is not None:
            full_meta = {**self.machine, **meta, "title": title}
            write_outputs(timings, full_meta, self.out / f"{key}.json", self.out / f"{key}.png")
            (self.out / "summary.md").write_text("\n".join(self.sections) + "\n")


def machine_info(args: argparse.Namespace) -> dict:
    info = {"device": args.device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "fp16_autocast": args.fp16,
            "torch_compile": args.compile}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--fp16", action="store_true", help="fp16 autocast of the forward passes (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the forward-pass tables (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first, every table (default 1)")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="timed rounds of the end-to-end table (default 2)")
    parser.add_argument("--policy", default=DEFAULT_POLICY, help=f"our rank policy (default {DEFAULT_POLICY})")
    parser.add_argument("--sweep", action="store_true", help=f"also sweep --ratios on {SWEEP_PRESET}")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(SWEEP_RATIOS), help="rank ratios of --sweep")
    parser.add_argument("--noise", type=float, default=0.05, help="timing noise the sweep allows (default 0.05)")
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS, reverse=True), choices=sorted(PRESETS),
                        help="presets of the forward-pass tables (default: both)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own setting)")
    parser.add_argument("--no-forward", action="store_true", help="skip the forward-pass tables")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end table")
    parser.add_argument("--out", type=Path, help="folder for JSON, PNG and summary.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours = resolve_policy(args.policy)
    policies = [PUBLISHED_POLICY, ours]
    report = Report(args.out, machine_info(args))
    print(f"policies: {PUBLISHED_POLICY} (published rule) vs {ours} (ours); " + report.sections[-1], flush=True)

    def forward(preset: str, configs: list[TuckerConfig]) -> tuple[list[VariantTiming], dict]:
        network, shape = build_preset(preset)
        logger.info("%s: timing %d variants, %d rounds", preset, len(configs) + 1, args.rounds)
        timings = benchmark(network, shape, configs, args.device, args.rounds, args.warmup,
                            autocast=args.fp16, compile=args.compile)
        return timings, {"preset": preset, "measure": "forward pass", "input_shape": list(shape),
                         "rounds": args.rounds, "warmup": args.warmup}

    if not args.no_forward:
        for preset in args.presets:
            timings, meta = forward(preset, policy_configs(TABLE_RATIOS, policies))
            report.add(f"forward_{preset}", f"forward pass, {preset}, patch {tuple(meta['input_shape'][2:])}",
                       timings, meta, comparison_markdown(timings, policies))
    if args.sweep:
        timings, meta = forward(SWEEP_PRESET, policy_configs(args.ratios, [ours]))
        report.add(f"sweep_{SWEEP_PRESET}", f"rank-ratio sweep, {ours}, forward pass, {SWEEP_PRESET}", timings,
                   meta, sweep_verdict(timings, args.noise))
    if not args.no_e2e:
        with tempfile.TemporaryDirectory(prefix="nnunet_tucker_speed_") as tmp:
            model = write_preset_model_folder(E2E_PRESET, Path(tmp) / "results")
            spacing = PRESETS[E2E_PRESET].spacing
            logger.info("writing a synthetic %s-voxel CT, spacing %s mm", "x".join(map(str, E2E_SHAPE)), spacing)
            write_ct(Path(tmp) / "images", E2E_SHAPE, spacing)
            configs = policy_configs([E2E_RATIO], policies)
            logger.info("predicting with %d variants, %d rounds", len(configs) + 1, args.e2e_rounds)
            timings = time_prediction(model, Path(tmp) / "images", configs, args.device, folds=("0",),
                                      use_mirroring=False, rounds=args.e2e_rounds, warmup=args.warmup,
                                      compile=args.compile)
        meta = {"preset": E2E_PRESET, "measure": "prediction", "image_shape": list(E2E_SHAPE), "spacing_mm": spacing,
                "fold": 0, "tta": False, "rounds": args.e2e_rounds, "warmup": args.warmup}
        report.add(f"e2e_{E2E_PRESET}", f"end to end, nnU-Net prediction of one {'x'.join(map(str, E2E_SHAPE))} "
                   f"CT at {spacing[0]} mm, {E2E_PRESET}, fold 0, TTA off", timings, meta,
                   "speed-up on prediction time; load s = model load + compression (fresh decomposition cache)")
    if args.out is not None:
        print(f"\nwritten: {args.out}/summary.md and one JSON + PNG per table", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
