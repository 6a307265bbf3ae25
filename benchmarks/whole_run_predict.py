"""nnU-Net's own ``nnUNetv2_predict`` on one case, original vs compressed, first run and later runs, by stage.

    python benchmarks/whole_run_predict.py [--preset resenc-l] [--ratio 0.3] [--rounds 1]
                                           [--case-shape 224 224 192] [--tta] [--out DIR]

The unchanged CLI as a subprocess, with the preset (default ``resenc-l``: the residual-encoder U-Net that
nnU-Net's ``nnUNetPlannerResEncL`` plans for a CT fingerprint at 1.5 mm) as a model folder of random weights, on
one generated case of ``--case-shape X Y Z`` voxels at the preset's spacing. The original against
``TUCKER_RANK_RATIO`` alone (profiled, self-calibrated on the case), interleaved: round 0 is each variant's
first run (the compressed one from an empty cache: it compresses and self-calibrates), then ``--rounds`` later
rounds from the cache. Split by stage from nnU-Net's own stdout lines (start-up and model load, preprocessing,
network, export, exit), with the peak memory of every run. Test-time mirroring is off unless ``--tta`` (it
multiplies the network time by 8 for both). Writes whole_run_predict.json and .md to ``--out``; see
nnunet_tucker/tools/whole_run.py (`run_whole_run_predict`).
"""

import argparse
import logging
import sys
from pathlib import Path

from nnunet_tucker.tools.whole_run import run_whole_run_predict

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resenc-l")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--policy", default="profiled")
    parser.add_argument("--rounds", type=int, default=1, help="later rounds after the first (default 1)")
    parser.add_argument("--case-shape", type=int, nargs=3, default=(224, 224, 192), metavar=("X", "Y", "Z"),
                        help="voxels of the generated case at the preset's spacing (default 224 224 192)")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring on (nnU-Net's default)")
    parser.add_argument("--work-dir", type=Path, help="keep the model, case and outputs here (default: temporary)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "whole_run_predict_cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    result = run_whole_run_predict(args.out, preset=args.preset, ratio=args.ratio, rounds=args.rounds,
                                   policy=args.policy, case_shape=tuple(args.case_shape[::-1]), tta=args.tta,
                                   work_dir=args.work_dir,
                                   invocation=" ".join(["python", "benchmarks/whole_run_predict.py", *sys.argv[1:]]))
    print(result["markdown"])
