"""Time the stages of calibration on a TotalSegmentator preset network with random weights.

    python benchmarks/calibration_time.py [--preset totalseg-3mm] [--patches 4] [--ratio 0.3] [--compare-old]
                                          [--out FILE]

Calibration patches are smoothed noise of the preset's patch size. Prints one JSON line per stage
(with ``--out``, also writes them as one JSON list to that file), in the order run: one plain forward pass
over all patches (for scale), `collect_statistics`, `sample_targets`, the whitened decomposition
(`convert_state_dict` without refit) and the refit (`swap.convert._refit_in_order`, which samples its own
targets: their time is included, and ``seconds_without_targets`` subtracts the `sample_targets` stage's).
With ``--compare-old``, the old layer-by-layer refit (the reference in tests/test_calibrate.py: a pass up
to each refitted layer per patch) runs right after the new one, with their ratio and the largest
difference between their weights, relative to the weights' scale. ``max_rss_gib`` is the process's peak so far. On 2 CPU
cores, totalseg-3mm with 2 patches and ``--compare-old`` takes ~20 minutes.

With ``--breakdown``, the refit line of the new refit also gives the seconds spent inside it in
`sample_targets`, `responses` (of which gathering features, `_features`, and the Gram products of
the covariances, `_gram` where the code has it), `refit_conv_weights`, and the rest (the compressed
copy's forward pass), each with its share of the refit.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nnunet_tucker import TuckerConfig
from nnunet_tucker import calibrate as calibrate_module
from nnunet_tucker.calibrate import collect_statistics, sample_targets
from nnunet_tucker.plan import plan_compression
from nnunet_tucker.swap import RefitData, convert
from nnunet_tucker.swap.convert import _refit_in_order, convert_state_dict
from nnunet_tucker.tools.presets import build_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from networks import scaled_error  # noqa: E402
from test_calibrate import _refit_layer_by_layer  # noqa: E402

_LINES: list[dict] = []  # every line printed, for --out


def _report(stage: str, seconds: float, **extra) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    line = {"stage": stage, "seconds": round(seconds, 2), **extra, "max_rss_gib": round(peak, 2)}
    _LINES.append(line)
    print(json.dumps(line), flush=True)


def _timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def _timing(module, names: list[str], seconds: dict[str, float]) -> None:
    """Wrap the functions `names` of `module` (those it has) to add their run time to `seconds`."""
    for name in names:
        if not hasattr(module, name):
            continue
        function = getattr(module, name)

        def timed(*args, _function=function, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _function(*args, **kwargs)
            finally:
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - start

        setattr(module, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="totalseg-3mm")
    parser.add_argument("--patches", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--policy", default="paper", help="paper or auto: no device profiling")
    parser.add_argument("--compare-old", action="store_true", help="also time the old layer-by-layer refit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true", help="seconds of each part of the new refit")
    parser.add_argument("--out", type=Path, help="also write every line, as one JSON list, to this file")
    args = parser.parse_args()
    try:
        _run(args)
    finally:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(_LINES, f, indent=1)
                f.write("\n")


def _run(args: argparse.Namespace) -> None:
    network, shape = build_preset(args.preset)
    generator = torch.Generator().manual_seed(args.seed)
    patches = F.avg_pool3d(torch.randn(args.patches, *shape[1:], generator=generator), 5, stride=1, padding=2)
    patches = patches / patches.std()
    common = {"preset": args.preset, "patches": args.patches, "threads": torch.get_num_threads()}

    with torch.inference_mode():
        _, seconds = _timed(lambda: network(patches))
    _report("forward", seconds, **common)
    statistics, seconds = _timed(lambda: collect_statistics(network, patches))
    _report("collect_statistics", seconds, **common)
    plan = [layer for layer in plan_compression(network, TuckerConfig(args.ratio, policy=args.policy))
            if layer.ranks is not None]
    _, targets_seconds = _timed(lambda: sample_targets(network, patches, [layer.name for layer in plan]))
    _report("sample_targets", targets_seconds, **common, layers=len(plan))
    state = network.state_dict()
    (converted, errors), seconds = _timed(lambda: convert_state_dict(state, plan, statistics=statistics))
    _report("decomposition", seconds, **common, layers=len(plan))

    fitted = {layer.name: {k.removeprefix(f"{layer.name}."): v for k, v in converted.items()
                           if k.startswith(f"{layer.name}.")} for layer in plan}
    refit = {layer.name for layer in plan if statistics[layer.name].usable()}
    algorithms = {"new": _refit_in_order, **({"old": _refit_layer_by_layer} if args.compare_old else {})}
    results, times = {}, {}
    parts: dict[str, float] = {}
    if args.breakdown:
        _timing(convert, ["sample_targets", "responses", "refit_conv_weights"], parts)
        _timing(calibrate_module, ["_features", "_gram"], parts)
    for algorithm, run in algorithms.items():
        decomposed = dict(fitted)
        parts.clear()
        _, times[algorithm] = _timed(lambda run=run, decomposed=decomposed: run(
            RefitData(network, patches), plan, refit, decomposed, dict(errors), statistics, state))
        results[algorithm] = decomposed
        refitted = sum(decomposed[name] is not fitted[name] for name in decomposed)
        extra = {"refitted_layers": refitted,
                 "seconds_without_targets": round(times[algorithm] - targets_seconds, 2)}
        if args.breakdown and algorithm == "new":
            named = {**parts, "rest": times[algorithm] - sum(parts.get(k, 0.0) for k in
                                                             ("sample_targets", "responses", "refit_conv_weights"))}
            extra["parts"] = {k: {"seconds": round(v, 2), "share": round(v / times[algorithm], 3)}
                              for k, v in named.items()}
        if algorithm == "old":
            difference = max(scaled_error(results["new"][name][key], value)
                             for name, weights in decomposed.items() for key, value in weights.items())
            extra.update(old_over_new=round(times["old"] / times["new"], 2),
                         old_over_new_without_targets=round((times["old"] - targets_seconds)
                                                            / (times["new"] - targets_seconds), 2),
                         largest_scaled_difference=float(f"{difference:.2g}"))
        _report(f"refit_{algorithm}", times[algorithm], **common, **extra)


if __name__ == "__main__":
    main()
