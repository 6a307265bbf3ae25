"""Where the time of a whole prediction goes, original vs compressed, split by stage.

    python benchmarks/whole_run.py [--ratio 0.3] [--rounds 1] [--warmup 1] [--out benchmarks/results/whole_run_cpu]

TotalSegmentator's CLI (``--fast --ml -d cpu``) on a generated 512×512×300 CT at 0.8×0.8×1.5 mm, with the
3 mm TotalSegmentator architecture (random weights) as its local ``--fast`` model, and nnU-Net's
``predict_single_npy_array`` in process on the same CT at 3 mm, the latter also with
nnU-Net's own pipeline around the compressed network. The same as ``nnunet-tucker bench --preset
totalseg-3mm --whole-run OUT``; see nnunet_tucker/tools/whole_run.py. Writes whole_run.json, .md and .png to
``--out`` itself.
"""

import argparse
import logging
import sys
from pathlib import Path

from nnunet_tucker.tools.whole_run import run_whole_run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, help="keep the generated CT and model here (default: temporary)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "whole_run_cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    result = run_whole_run(args.out, ratio=args.ratio, rounds=args.rounds, warmup=args.warmup, work_dir=args.work_dir)
    print(result["markdown"])
