"""Console scripts: ``nnunet-tucker`` (report, ...) and ``nnUNetv2_predict_tucker``. Thin: parse, call, print.

Both end on the package's own errors (`errors.TuckerError`: a bad setting, model folder, input or output
folder) with one line, ``nnunet-tucker: error: <message>``, exit code 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .config import (
    BACKENDS,
    NO_CALIBRATION,
    POLICIES,
    check_field,
    env_variables,
    read_env,
    read_plans,
    resolve_config,
)
from .errors import TuckerConfigError, TuckerError
from .memory import huge_pages_for_torch

logger = logging.getLogger("nnunet_tucker")

_HELP = {
    "rank_ratio": "share of each channel mode kept, in (0, 1]; R = min(C, max(rank_min, ceil(C * ratio)))",
    "mac_budget": "instead of a ratio: share of the original MACs to keep, in (0, 1]; ranks allocated per layer",
    "policy": f"rank policy, one of {', '.join(POLICIES)} (default profiled: keep the faster form of each layer, "
              "timed on this device)",
    "rank_min": "lower bound of every rank (default 8)",
    "rank_multiple": "round ranks up to a multiple of this, e.g. 8 for tensor cores (default 1)",
    "hooi_iterations": "HOOI refinement iterations after the HOSVD start (default 0)",
    "exclude": "fnmatch patterns of module names to leave as they are",
    "calibration": "folder of unlabelled images (CASE_0000.nii.gz, ...) to fit the factors to the model's data, "
                   "or 'none' for the weights alone (default when predicting: the first case segmented)",
    "calibration_patches": "network-input patches taken from the calibration images (default: 4 from a folder, "
                           "2 from the first case)",
    "min_agreement": "floor on the lowest per-class Dice against the original on held-out tiles (of the first "
                     "case, or of a calibration folder's last case), in (0, 1]: the ratio or budget is loosened "
                     "until every class reaches it",
    "backend": f"what runs the compressed network, one of {', '.join(BACKENDS)} (default auto: OpenVINO where "
               "installed, on a CPU, if it measured faster here)",
}
_TYPES = {"rank_ratio": float, "mac_budget": float, "policy": str, "rank_min": int, "rank_multiple": int,
          "hooi_iterations": int, "calibration": str, "calibration_patches": int, "min_agreement": float,
          "backend": str}
_CHOICES = {"policy": POLICIES, "backend": BACKENDS}


def _flag(name: str, nnunet_style: bool) -> str:
    return f"-tucker_{name}" if nnunet_style else "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, nnunet_style: bool = False) -> None:
    """Add one flag per config field: ``--rank-ratio`` style, or nnU-Net's ``-tucker_rank_ratio`` style."""
    group = parser.add_argument_group("Tucker compression (flags override TUCKER_* variables and plans.json)")
    for name, env in env_variables().items():
        kwargs: dict[str, Any] = {"dest": f"tucker_{name}", "default": None, "help": f"{_HELP[name]} [{env}]"}
        if name == "exclude":
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = _TYPES[name]
        if name in _CHOICES:
            kwargs["choices"] = _CHOICES[name]
        group.add_argument(_flag(name, nnunet_style), **kwargs)


def config_fields_from_args(args: argparse.Namespace, nnunet_style: bool = False) -> dict[str, Any]:
    """The config fields given as flags, validated and named by their flag in errors."""
    fields = {}
    for name in env_variables():
        value = getattr(args, f"tucker_{name}")
        if value is not None:
            fields[name] = check_field(name, tuple(value) if name == "exclude" else value, _flag(name, nnunet_style))
    return fields


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def _fail(message: str | TuckerError) -> int:
    """Say what was wrong in one line on stderr; the exit code of a refused command (2)."""
    print(f"nnunet-tucker: error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------- report
def _load_network(args: argparse.Namespace) -> tuple[Any, tuple[int, ...], dict | None, str]:
    """The network named by ``--preset`` or ``-m/-f/-chk``: (network, input shape, plans or None, source)."""
    if args.preset:
        from .tools.presets import build_preset

        network, input_shape = build_preset(args.preset)
        return network, input_shape, None, args.preset
    from .nnunet.model_folder import load_trained_model

    model = load_trained_model(args.model, folds=[args.fold], checkpoint_name=args.chk)
    return model.network, model.input_shape, model.plans, str(args.model)


def _cmd_report(args: argparse.Namespace) -> int:
    from .compress import compress_network

    network, input_shape, plans, source = _load_network(args)
    plans_fields = read_plans(plans, source=f"{source}/plans.json") if plans is not None else {}
    config = resolve_config(plans_fields, read_env(), config_fields_from_args(args))
    if config is None:
        return _fail("no compression asked for: give --rank-ratio (or set TUCKER_RANK_RATIO)")
    report = compress_network(network, config, input_shape)
    print(report.to_json() if args.json else report.to_table())
    return 0


# -------------------------------------------------------------------------------------------- compress
def _cmd_compress(args: argparse.Namespace) -> int:
    huge_pages_for_torch()  # before torch's first allocation (the import below makes none)
    from .nnunet.model_folder import compress_model_folder

    config = resolve_config(read_env(), config_fields_from_args(args))
    if config is None:
        return _fail("no compression asked for: give --rank-ratio (or set TUCKER_RANK_RATIO)")
    report = compress_model_folder(args.input, args.output, config, args.folds, args.chk, args.overwrite)
    if args.json:
        print(report.to_json())
    return 0


# -------------------------------------------------------------------------------------------- evaluate
def _cmd_evaluate(args: argparse.Namespace) -> int:
    huge_pages_for_torch()  # before torch's first allocation (the import below makes none)
    from .tools.evaluate import evaluate

    flags = config_fields_from_args(args)
    config = None if args.compressed else resolve_config(read_env(), flags)
    if args.compressed and flags:
        return _fail("give either -c COMPRESSED_FOLDER or compression flags (--rank-ratio, ...), not both")
    if config is None and not args.compressed:
        return _fail("nothing to compare: give -c COMPRESSED_FOLDER or --rank-ratio")
    evaluation = evaluate(
        args.model, args.input, args.output, compressed=args.compressed, config=config, labels=args.labels,
        folds=args.folds, checkpoint_name=args.chk, device=args.device, use_mirroring=not args.disable_tta,
        tolerance=args.tolerance, nsd_tolerance_mm=args.nsd_tolerance_mm, overwrite=args.overwrite,
        force=args.force,
    )
    written = evaluation.write(Path(args.output))
    print(evaluation.to_markdown())
    print("written: " + ", ".join(str(p) for p in written))
    if evaluation.failing:
        print(f"nnunet-tucker: gate FAILED (tolerance {args.tolerance}): {', '.join(evaluation.failing)}",
              file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------- bench
def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .config import TuckerConfig
    from .tools.benchmark import time_prediction, write_outputs, write_sections

    several = args.preset is not None and len(args.preset) > 1  # presets timed one after the other
    args.preset = args.preset[0] if args.preset is not None and not several else args.preset
    if "openvino" in args.backends:
        if args.e2e:
            return _fail("--backends openvino times forward passes and whole runs; for --e2e set TUCKER_BACKEND")
        from .backend import check_backend

        check_backend("openvino")
    if args.whole_run:
        return _bench_whole_run(args)
    args.ratios = args.ratios or ([] if args.mac_budgets else [0.5, 0.3, 0.1])
    args.rounds = args.rounds or 5
    if args.e2e and not args.model:
        return _fail("--e2e times nnU-Net's prediction of a model folder: give -m MODEL_FOLDER")
    if args.e2e and args.fp16:
        return _fail("--fp16 does not apply to --e2e: nnU-Net's predictor autocasts on CUDA by itself")
    if several and args.png:
        return _fail("--png plots one network: give one --preset")
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [{"rank_ratio": r} for r in args.ratios] + [{"mac_budget": b} for b in args.mac_budgets or []]
    configs = [
        TuckerConfig(**target, policy=policy, rank_min=args.rank_min, rank_multiple=multiple)
        for policy in args.policies for target in targets for multiple in args.rank_multiples
    ]
    if several:
        sections = []
        for name in args.preset:
            sections.append(_bench_forward(argparse.Namespace(**{**vars(args), "preset": name}), configs))
            if args.json:  # after each: what was measured is kept if a later one fails
                write_sections(sections, Path(args.json))
        return 0
    if args.e2e:
        timings = time_prediction(args.model, args.e2e, configs, args.device, folds=(args.fold,),
                                  checkpoint_name=args.chk, rounds=args.rounds, warmup=args.warmup,
                                  compile=args.compile)
        source = str(args.model)
        cases = len(list(Path(args.e2e).glob("*_0000.*")))
        what = {"measure": "prediction", "input_folder": str(args.e2e), "cases": cases, "fold": args.fold,
                "tta": False}
        shape = f"{cases} case(s) from {args.e2e}, TTA off, fold {args.fold}"
        meta = _bench_meta(args, source, what, shape, timings)
    else:
        timings, meta = _bench_forward(args, configs)
    write_outputs(timings, meta, Path(args.json) if args.json else None, Path(args.png) if args.png else None)
    return 0


def _bench_forward(args: argparse.Namespace, configs: list) -> tuple[list, dict[str, Any]]:
    """Forward passes of the network of ``--preset`` (one name) or ``-m``, timed and printed: (timings, meta)."""
    from .tools.benchmark import benchmark

    network, input_shape, _, source = _load_network(args)
    timings = benchmark(network, input_shape, configs, args.device, args.rounds, args.warmup,
                        autocast=args.fp16, compile=args.compile, backends=args.backends)
    what = {"measure": "forward pass", "input_shape": list(input_shape)}
    if args.preset:
        from .tools.presets import PRESETS

        what["description"] = PRESETS[args.preset].description
    return timings, _bench_meta(args, source, what, f"input {tuple(input_shape)}", timings)


def _bench_meta(args: argparse.Namespace, source: str, what: dict[str, Any], shape: str, timings: list
                ) -> dict[str, Any]:
    """What was timed, how, on what; printed with the table of `timings`."""
    import torch

    from .memory import freed_memory_reused
    from .tools.benchmark import to_table

    meta = {
        "source": source, **what, "device": args.device, "threads": torch.get_num_threads(),
        "fp16_autocast": args.fp16, "torch_compile": args.compile, "rounds": args.rounds, "torch": torch.__version__,
        "backends": getattr(args, "backends", ["torch"]),
        "freed_memory_reused": freed_memory_reused(),
        "title": f"{source}, {what['measure']}, {args.device}{' fp16' if args.fp16 else ''}"
                 f"{' compiled' if args.compile else ''}",
    }
    print(f"{meta['title']}, {shape}, {meta['threads']} threads, {args.rounds} interleaved rounds")
    print(to_table(timings), flush=True)
    return meta


def _bench_whole_run(args: argparse.Namespace) -> int:
    from .tools.whole_run import run_whole_run

    if args.preset != "totalseg-3mm" or args.e2e or args.fp16 or args.compile:
        return _fail("--whole-run times TotalSegmentator --fast and nnU-Net on a generated CT (on CUDA both autocast "
                     "to fp16 themselves): give --preset totalseg-3mm and none of -m, --e2e, --fp16, --compile")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        return _fail(f"--whole-run runs on -device cpu or cuda, not {args.device!r}")
    if args.mac_budgets:
        return _fail("--whole-run compares the original with one rank ratio (--ratios), not with MAC budgets")
    if args.ratios and len(args.ratios) != 1:
        return _fail(f"--whole-run compares the original with one rank ratio, not {len(args.ratios)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_whole_run(Path(args.whole_run), ratio=(args.ratios or [0.3])[0], rounds=args.rounds or 2,
                           warmup=args.warmup, policy=args.policies[0], device=args.device, backends=args.backends)
    print(result["markdown"])
    return 0


# ------------------------------------------------------------------------------------------------ demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_demo

    result = run_demo(Path(args.output), args.rank_ratio or 0.5, overwrite=args.overwrite, verbose=args.verbose)
    return 1 if result["evaluation"].failing else 0


def _add_source_arguments(parser: argparse.ArgumentParser, several_presets: bool = False) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-m", "--model", help="trained nnU-Net model folder (holds plans.json, fold_X/)")
    from .tools.presets import PRESETS

    several = "; several: timed one after the other" if several_presets else ""
    source.add_argument("--preset", choices=sorted(PRESETS), nargs="+" if several_presets else None,
                        help="built-in architecture: TotalSegmentator's models (totalseg-*), nnU-Net's ResEnc "
                             f"presets (resenc-m, resenc-l){several}")
    parser.add_argument("-f", "--fold", default="0", help="fold whose weights to use (default 0)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-tucker", description="Post-training Tucker compression of trained nnU-Net v2 models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    report = sub.add_parser("report", help="per-layer ranks, parameters and MACs of a compression, as a table or JSON")
    _add_source_arguments(report)
    add_config_arguments(report)
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.set_defaults(run=_cmd_report)

    compress = sub.add_parser("compress", help="write a compressed copy of a trained model folder")
    compress.add_argument("-i", "--input", required=True, help="trained nnU-Net model folder (left untouched)")
    compress.add_argument("-o", "--output", required=True, help="new model folder to write")
    compress.add_argument("-f", "--folds", nargs="+", help="folds to compress (default: all found)")
    compress.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    compress.add_argument("--json", action="store_true", help="print the report as JSON")
    add_config_arguments(compress)
    compress.set_defaults(run=_cmd_compress)

    ev = sub.add_parser("evaluate", help="compare original and compressed predictions per class; gate on a tolerance")
    ev.add_argument("-m", "--model", required=True, help="original trained model folder")
    ev.add_argument("-c", "--compressed", help="compressed model folder (or give --rank-ratio etc.)")
    ev.add_argument("-i", "--input", required=True, help="folder of nnU-Net input images (CASE_0000.nii.gz)")
    ev.add_argument("-r", "--labels", help="folder of reference label maps (CASE.nii.gz), optional")
    ev.add_argument("-o", "--output", required=True, help="folder for predictions, JSON, Markdown and PNG figures")
    ev.add_argument("-f", "--folds", nargs="+", help="folds to use (default: all found)")
    ev.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    ev.add_argument("-device", default="cpu", help="cpu, cuda or mps (default cpu)")
    ev.add_argument("--disable_tta", "--disable-tta", dest="disable_tta", action="store_true",
                    help="no mirroring test-time augmentation")
    ev.add_argument("--tolerance", type=float, help="fail (exit 1) if any class loses more Dice than this")
    ev.add_argument("--nsd-tolerance-mm", type=float, default=2.0, help="surface tolerance of the NSD (default 2 mm)")
    ev.add_argument("--overwrite", action="store_true",
                    help="replace the predictions and evaluation in a non-empty output folder")
    ev.add_argument("--force", action="store_true",
                    help="compare a compressed folder even if its manifest names other source checkpoints")
    add_config_arguments(ev)
    ev.set_defaults(run=_cmd_evaluate)

    bench = sub.add_parser("bench", help="time the original and compressed variants side by side (forward pass, "
                                         "or nnU-Net's whole prediction with --e2e)")
    _add_source_arguments(bench, several_presets=True)
    bench.add_argument("--e2e", metavar="INPUT_FOLDER",
                       help="time nnU-Net's prediction of this folder of images (needs -m; TTA off; model load and "
                            "compression timed apart) instead of the forward pass")
    bench.add_argument("--whole-run", metavar="OUT_DIR",
                       help="with --preset totalseg-3mm: time TotalSegmentator --fast --ml and nnU-Net in process on "
                            "a generated 512x512x300 CT, original vs one rank ratio (default 0.3), split by stage; "
                            "writes whole_run.md, .json and .png to OUT_DIR")
    bench.add_argument("--ratios", type=float, nargs="+",
                       help="rank ratios to time (default 0.5 0.3 0.1, none where --mac-budgets are given)")
    bench.add_argument("--mac-budgets", type=float, nargs="+",
                       help="MAC budgets to time (shares of the original multiply-accumulates per patch)")
    bench.add_argument("--policies", nargs="+", default=["profiled"], choices=POLICIES,
                       help="rank policies to time (default profiled)")
    bench.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "openvino"],
                       help="what runs each variant, every one listed timed side by side (default torch; openvino: "
                            "pip install 'nnunet-tucker[openvino]'; forward passes and --whole-run, not --e2e)")
    bench.add_argument("--rank-multiples", type=int, nargs="+", default=[1], help="rank alignments to time")
    bench.add_argument("--rank-min", type=int, default=8, help="lower bound of every rank (default 8)")
    bench.add_argument("-device", default="cpu", help="cpu or cuda (default cpu; --whole-run too)")
    bench.add_argument("--rounds", type=int, help="timed interleaved rounds (default 5; --whole-run 2)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's own setting)")
    bench.add_argument("--fp16", action="store_true", help="fp16 autocast (CUDA; forward pass only)")
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile every variant (with --e2e: nnU-Net's nnUNet_compile)")
    bench.add_argument("--json", help="write every timing to this JSON file")
    bench.add_argument("--png", help="write a plot of speed-up vs MAC reduction to this PNG file")
    bench.set_defaults(run=_cmd_bench)

    demo = sub.add_parser(
        "demo", help="offline, < 2 min: quality of the shipped demo model on synthetic CT, compressed vs original, "
                     "and the forward-pass speed-up of the TotalSegmentator 3 mm architecture (nnunet-tucker -v demo "
                     "shows nnU-Net's own output)")
    demo.add_argument("-o", "--output", default="tucker_demo", help="output folder (default ./tucker_demo)")
    demo.add_argument("--rank-ratio", dest="rank_ratio", type=float,
                      help="rank ratio of both parts (default 0.5; exit 1 if the gate fails)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.run(args)
    except TuckerError as e:
        return _fail(e)


# --------------------------------------------------------------------------------- nnUNetv2_predict_tucker
def predict_entry_point(argv: list[str] | None = None) -> None:
    """``nnUNetv2_predict`` with the same flags, defaults and output, plus ``-tucker_*`` flags.

    The Tucker flags are validated, then exported as ``TUCKER_*`` variables (a flag overrides the
    variable it names), and nnU-Net's own entry point runs with the remaining arguments. A bad flag or
    variable, or any other of the package's errors on the way, ends it with one line (exit code 2).
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parser, nnunet_style=True)
    args, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print()
    try:
        _predict(args, rest)
    except TuckerError as e:
        sys.exit(_fail(e))


def _predict(args: argparse.Namespace, rest: list[str]) -> None:
    """`predict_entry_point` once the Tucker flags are parsed: check them, export them, run nnU-Net's command."""
    fields = config_fields_from_args(args, nnunet_style=True)
    read_env()  # a bad TUCKER_* variable is named now, not inside nnU-Net
    if "rank_ratio" in fields and "mac_budget" in fields:
        raise TuckerConfigError("give one of -tucker_rank_ratio and -tucker_mac_budget, not both")
    if fields.get("calibration", NO_CALIBRATION) != NO_CALIBRATION and not Path(fields["calibration"]).is_dir():
        raise TuckerConfigError(f"-tucker_calibration {fields['calibration']!r} is not a folder of images "
                                f"(nor {NO_CALIBRATION!r}, the weights alone)")
    env = env_variables()
    for name, value in fields.items():
        os.environ[env[name]] = ",".join(value) if name == "exclude" else str(value)
    for given, other in (("rank_ratio", "mac_budget"), ("mac_budget", "rank_ratio")):
        if given in fields and other not in fields:  # a flag's target replaces the variable's
            os.environ.pop(env[other], None)

    from .nnunet.hook import huge_pages_if_compressing, patch_predictor_class

    huge_pages_if_compressing()  # before nnU-Net's import: torch reads it at its first allocation
    from nnunetv2.inference import predict_from_raw_data

    patch_predictor_class(predict_from_raw_data.nnUNetPredictor)
    sys.argv = [sys.argv[0], *rest]
    predict_from_raw_data.predict_entry_point()


if __name__ == "__main__":
    sys.exit(main())
