"""Time the decomposition of the full TotalSegmentator 1.5 mm preset network (target: <= 15 s on 2 CPU cores).

    python benchmarks/decomposition_time.py [--ratios 0.5 0.3 0.1] [--hooi-iterations 0] [--repeats 3] [--out FILE]

Prints one JSON line per setting: wall seconds of `convert_state_dict` (every decomposed layer),
min and median over the repeats; with ``--out``, also writes them, as one JSON list, to that file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nnunet_tucker import TuckerConfig
from nnunet_tucker.plan import plan_compression
from nnunet_tucker.swap import convert_state_dict
from nnunet_tucker.tools.presets import build_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="totalseg-1.5mm")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.5, 0.3, 0.1])
    parser.add_argument("--policy", default="paper")
    parser.add_argument("--hooi-iterations", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write every line, as one JSON list, to this file")
    args = parser.parse_args()

    network, _ = build_preset(args.preset)
    state = network.state_dict()
    lines = []
    for iterations in args.hooi_iterations:
        for ratio in args.ratios:
            config = TuckerConfig(ratio, policy=args.policy, hooi_iterations=iterations)
            plan = plan_compression(network, config)
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                _, errors = convert_state_dict(state, plan, iterations)
                seconds.append(time.perf_counter() - start)
            lines.append({
                "preset": args.preset, "rank_ratio": ratio, "policy": args.policy, "hooi_iterations": iterations,
                "layers": len(errors), "threads": torch.get_num_threads(),
                "seconds_min": round(min(seconds), 2), "seconds_median": round(statistics.median(seconds), 2),
            })
            print(json.dumps(lines[-1]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(lines, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
