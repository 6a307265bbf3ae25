"""One-time overhead of a self-calibrating compressed run, and of the next run (from the cache).

    python benchmarks/first_run_overhead.py [--preset totalseg-3mm] [--ratio 0.3] [--shape 150 136 136]
                                            [--patches N] [--min-agreement F] [--out FILE] [--work-dir DIR]

Writes the preset as a model folder (random weights), loads it with a `TuckerPredictor` asking for
`TuckerConfig(ratio)` with the default policy (profiled) and calibration (the first case), and times
`finish_compression` on a synthetic CT phantom already preprocessed (the preset's 3 mm grid: 150 × 136 ×
136 voxels is a 512 × 512 × 300 CT at 0.8 × 0.8 × 1.5 mm), i.e. what the first case of the first run
waits for before nnU-Net predicts it: calibration statistics and targets, device profiling and planning,
the fit and refit. Then a second load of the same model and config (what every later run pays), and one
plain forward pass of a patch for scale. Writes one JSON object to ``--out`` (default
``benchmarks/results/first_run_overhead[_<preset>]_cpu_<threads>cores.json``, no preset part for totalseg-3mm)
and prints it; the cache is a fresh folder in the work folder. With ``--min-agreement`` (a floor; the preset's random
weights keep little agreement at low ranks, so the floor gives rank back) the results file gets ``_floor`` in its
name and the plans the floor tried.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nnunet_tucker import TuckerConfig
from nnunet_tucker.memory import huge_pages_for_torch
from nnunet_tucker.nnunet.predictor import TuckerPredictor, finish_compression, input_shape_of
from nnunet_tucker.tools.presets import write_preset_model_folder
from nnunet_tucker.tools.synthetic import make_phantom

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_PRESET = "totalseg-3mm"


def default_out(preset: str, threads: int) -> Path:
    """``results/first_run_overhead_cpu_2cores.json`` for totalseg-3mm on 2 threads, ``..._1p5mm_...`` for
    totalseg-1.5mm."""
    part = "" if preset == DEFAULT_PRESET else "_" + preset.removeprefix("totalseg-").replace(".", "p")
    return RESULTS / f"first_run_overhead{part}_cpu_{threads}cores.json"


class FloorLines(logging.Handler):
    """The package's lines of each plan a floor tried."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "min_agreement=" in message and " on held-out tiles of " in message:
            self.lines.append(f"{time.perf_counter():.1f} s: {message}")


def load(model: Path, config: TuckerConfig) -> tuple[TuckerPredictor, float]:
    start = time.perf_counter()
    predictor = TuckerPredictor(device=torch.device("cpu"), tucker_config=config, use_mirroring=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    return predictor, time.perf_counter() - start


def main() -> None:
    huge_pages_for_torch()  # as a process that compresses does at start-up (before torch's first allocation)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--shape", type=int, nargs=3, default=[150, 136, 136], help="preprocessed case (z y x)")
    parser.add_argument("--patches", type=int, help="calibration patches (default: the package's, 2)")
    parser.add_argument("--min-agreement", type=float, help="a floor on the agreement (TUCKER_MIN_AGREEMENT)")
    parser.add_argument("--out", type=Path, help="results file to write (default: benchmarks/results/"
                        "first_run_overhead[_<preset>]_cpu_<threads>cores.json)")
    parser.add_argument("--work-dir", type=Path, help="model folder and cache (default: temporary)")
    args = parser.parse_args()

    out = args.out or default_out(args.preset, torch.get_num_threads())
    if args.out is None and args.min_agreement is not None:
        out = out.with_name(out.name.replace("_cpu_", "_floor_cpu_"))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tucker_overhead_"))
    os.environ["TUCKER_CACHE_DIR"] = str(work / "cache")
    model = write_preset_model_folder(args.preset, work / "results")
    config = TuckerConfig(args.ratio, calibration_patches=args.patches, min_agreement=args.min_agreement)
    floor_lines = FloorLines()
    logger = logging.getLogger("nnunet_tucker")
    logger.addHandler(floor_lines)
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    image, _, _ = make_phantom(0, shape=tuple(args.shape))
    data = torch.from_numpy(((image - image.mean()) / image.std()).astype(np.float32)[None])

    first, first_load = load(model, config)
    assert first._tucker_pending, "the first run should wait for its first case"
    start = time.perf_counter()
    report = finish_compression(first, data)
    first_case = time.perf_counter() - start

    second, second_load = load(model, config)
    assert second.tucker_report.extra["calibration"]["from_cache"]

    network = first.network
    x = torch.randn(input_shape_of(first))
    with torch.inference_mode():
        network(x)  # warm-up
        start = time.perf_counter()
        network(x)
        forward = time.perf_counter() - start
    result = {
        "preset": args.preset, "ratio": args.ratio, "case_shape": args.shape,
        "patches": report.extra["calibration"]["patches"],
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "first_run_load_s": round(first_load, 1),
        "first_case_overhead_s": round(first_case, 1),
        "stages_s": report.extra["seconds"],
        "profile_s": report.extra.get("profile", {}).get("seconds"),
        "second_run_load_s": round(second_load, 1),
        "compressed_forward_of_one_patch_s": round(forward, 2),
        "macs_kept": round(report.macs_after / report.macs_before, 3),
        "min_agreement": args.min_agreement,
        "chosen": report.config.get("rank_ratio"),
        "agreement_worst": report.extra["calibration"]["agreement"]["worst"],
        "floor_lines": floor_lines.lines,
        "command": f"python benchmarks/first_run_overhead.py {shlex.join(sys.argv[1:])}".strip()
                   + f" ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {datetime.date.today()})",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result, indent=1))
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
