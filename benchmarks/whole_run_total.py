"""TotalSegmentator's default mode (five 1.5 mm models) as users run it, original vs compressed, by stage.

    python benchmarks/whole_run_total.py [--ratio 0.3] [--rounds 1] [--ct-shape 512 512 300] [--original-once]
                                         [--out benchmarks/results/whole_run_total_cpu]

``TotalSegmentator -i CT -o OUT -d cpu`` (task total: its part models for organs, vertebrae, cardiac, muscles
and ribs, Datasets 291-295, one after the other on the CT resampled to 1.5 mm), offline, with the five part
models as random weights in their exact architectures (presets ``totalseg-1.5mm-<part>``), on a generated CT
at 0.8×0.8×1.5 mm: 512×512×300 by default, ``--ct-shape X Y Z`` for another (the results say which). The
original against ``TUCKER_RANK_RATIO`` (default policy: profiled, self-calibrated on the CT), interleaved: round
0 is each variant's first run, in which the compressed one starts from an empty cache and compresses and
self-calibrates each part at its first case; ``--rounds`` later rounds load them from the cache (the compressed
variant alone with ``--original-once``: the original caches nothing, so its first run stands for all). Split by stage
(TotalSegmentator's own ``Resampled in``/``Predicted in``/``Saved in`` lines; start-up and the rest are what is
left of the wall time) and by part model, with the peak memory of every run. Writes whole_run_total.json and .md
to ``--out`` itself; see nnunet_tucker/tools/whole_run.py (`run_whole_run_total`).
"""

import argparse
import logging
import sys
from pathlib import Path

from nnunet_tucker.tools.whole_run import run_whole_run_total

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--policy", default="profiled")
    parser.add_argument("--rounds", type=int, default=1, help="later rounds after the first (default 1)")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"),
                        help="voxels of the generated CT at 0.8×0.8×1.5 mm (default 512 512 300)")
    parser.add_argument("--original-once", action="store_true",
                        help="run the original in the first round only (it caches nothing; for clinical-size CTs)")
    parser.add_argument("--ml", action="store_true", help="one multi-label file instead of a mask per class")
    parser.add_argument("--work-dir", type=Path, help="keep the models, CT and outputs here (default: temporary)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "whole_run_total_cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    result = run_whole_run_total(args.out, ratio=args.ratio, rounds=args.rounds, policy=args.policy,
                                 ct_shape=tuple(args.ct_shape[::-1]), work_dir=args.work_dir, ml=args.ml,
                                 invocation=" ".join(["python", "benchmarks/whole_run_total.py", *sys.argv[1:]]),
                                 original_once=args.original_once)
    print(result["markdown"])
