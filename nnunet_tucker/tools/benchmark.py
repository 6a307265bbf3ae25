"""Side-by-side timing of an original network and its compressed variants: forward passes
(`benchmark`) or nnU-Net's whole prediction of a folder of images (`time_prediction`).

All variants run in one process, interleaved round by round (original, A, B, original, A, B, ...),
so that the noise of a shared machine hits every variant alike (`time_interleaved`, also the whole-run
benchmark's timer). Speed-ups are ratios of medians.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress import compress_network
from ..config import NO_CALIBRATION, TuckerConfig
from ..counting import count_macs, count_params
from ..memory import reuse_freed_memory
from ..plan import LayerTimer, plan_compression, unwrap

logger = logging.getLogger(__name__)


@dataclass
class VariantTiming:
    """Timings of one variant; `speedup` = median of the original / median of this variant.

    `load_seconds` (end-to-end timing only): loading the model folder, compression included.
    """

    name: str
    rank_ratio: float | None
    policy: str | None
    params: int
    macs: int
    seconds: list[float]
    speedup: float = 1.0
    mac_reduction: float = 1.0
    peak_memory_mb: float | None = None
    load_seconds: float | None = None
    backend: str = "torch"

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def realized(self) -> float:
        """Share of the MAC reduction that became speed-up (1.0 = time fell as much as MACs)."""
        return self.speedup / self.mac_reduction

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(min=min(self.seconds), median=self.median, max=max(self.seconds), realized=self.realized)
        return d


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_name(config: TuckerConfig) -> str:
    """The name a compressed variant goes by in tables: policy, rank ratio (or MAC budget), rank alignment."""
    target = config.rank_ratio if config.rank_ratio is not None else f"MACs {config.mac_budget}"
    name = f"{config.policy} {target}"
    return name + f" x{config.rank_multiple}" if config.rank_multiple > 1 else name


def time_interleaved(
    runs: Mapping[str, Callable[[], Any]], device: torch.device, rounds: int, warmup: int,
    on_run: Callable[[str, float, Any, bool], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each of `runs`, `rounds` interleaved rounds after `warmup` untimed ones: every
    run once per round, in the order given (original, A, B, original, A, B, ...), each timed from a
    synchronised `device` to a synchronised `device`. After every call, warm-up ones included,
    ``on_run(name, seconds, what the call returned, whether the round is timed)`` if given."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(warmup + rounds):
        timed = round_index >= warmup
        for name, run in runs.items():
            _synchronize(device)
            start = time.perf_counter()
            returned = run()
            _synchronize(device)
            elapsed = time.perf_counter() - start
            if timed:
                seconds[name].append(elapsed)
            if on_run is not None:
                on_run(name, elapsed, returned, timed)
    return seconds


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """The environment variables `variables` set while inside; after, each as it was before (or unset)."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def time_forward_passes(
    variants: dict[str, nn.Module],
    input_shape: Sequence[int],
    device: torch.device,
    rounds: int = 5,
    warmup: int = 1,
    autocast: bool = False,
) -> dict[str, list[float]]:
    """Seconds per forward pass of each variant, `rounds` interleaved rounds after `warmup` ones."""
    x = torch.randn(tuple(input_shape), device=device)
    amp = torch.autocast(device.type, dtype=torch.float16) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        return time_interleaved({name: partial(network, x) for name, network in variants.items()},
                                device, rounds, warmup)


def benchmark(
    network: nn.Module,
    input_shape: Sequence[int],
    configs: Sequence[TuckerConfig],
    device: str = "cpu",
    rounds: int = 5,
    warmup: int = 1,
    autocast: bool = False,
    compile: bool = False,
    backends: Sequence[str] = ("torch",),
) -> list[VariantTiming]:
    """Time `network` and one compressed copy per config, each run by every one of `backends` ("torch": PyTorch,
    this package's forms for the compressed; "openvino": compiled by OpenVINO, `backend`); the first entry is the
    original run by PyTorch."""
    dev = torch.device(device)
    if dev.type == "cpu":
        reuse_freed_memory()  # as a compressed prediction runs; every variant alike
    network = network.eval()
    macs, _ = count_macs(network, input_shape)
    timings = [VariantTiming("original", None, None, count_params(network), macs, [])]
    variants = {"original": network}
    for config in configs:
        variant = copy.deepcopy(network)
        plan = plan_compression(variant, config, input_shape, timer=LayerTimer(dev))  # profiled where it runs
        report = compress_network(variant, config, input_shape, plan=plan)
        name = variant_name(config)
        variants[name] = variant
        timings.append(VariantTiming(name, config.rank_ratio, config.policy, report.params_after,
                                     report.macs_after, [], mac_reduction=macs / report.macs_after))
    for backend in backends:
        if backend != "torch":
            timings += _on_backend(backend, variants, timings, input_shape, dev)
    variants = {k: v.to(dev) for k, v in variants.items()}
    if compile:
        variants = {k: torch.compile(v) for k, v in variants.items()}
    if dev.type == "cuda":
        for timing, variant in zip(timings, variants.values(), strict=True):  # peak memory, one pass each
            torch.cuda.reset_peak_memory_stats(dev)
            time_forward_passes({"v": variant}, input_shape, dev, rounds=1, warmup=0, autocast=autocast)
            timing.peak_memory_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    seconds = time_forward_passes(variants, input_shape, dev, rounds, warmup, autocast)
    _fill_seconds(timings, seconds)
    return timings


def _on_backend(backend: str, variants: dict[str, nn.Module], timings: list[VariantTiming],
                input_shape: Sequence[int], device: torch.device) -> list[VariantTiming]:
    """Each of `variants` (with its `timings` entry) also run by `backend`: added to `variants` as "NAME BACKEND";
    their timings entries. Conversions go through the package cache."""
    from ..backend import network_for_backend

    added = []
    for timing in list(timings[: len(variants)]):
        network = variants[timing.name]
        converted, choice = network_for_backend(network, [network.state_dict()], input_shape, device, backend)
        if choice.name != backend:
            raise RuntimeError(f"{backend} cannot run {timing.name}: {choice.reason}")
        name = f"{timing.name} {backend}"
        variants[name] = converted
        added.append(replace(timing, name=name, seconds=[], backend=backend))
        logger.info("%s: converted in %.1f s%s", name, choice.conversion_seconds,
                    " (from the cache)" if choice.from_cache else "")
    return added


def _fill_seconds(timings: Sequence[VariantTiming], seconds: dict[str, list[float]]) -> None:
    for timing in timings:
        timing.seconds = seconds[timing.name]
        timing.speedup = timings[0].median / timing.median


def time_prediction(
    model_folder: Path | str,
    input_folder: Path | str,
    configs: Sequence[TuckerConfig],
    device: str = "cpu",
    folds: Sequence[str] = ("0",),
    checkpoint_name: str = "checkpoint_final.pth",
    use_mirroring: bool = False,
    rounds: int = 1,
    warmup: int = 1,
    compile: bool = False,
    cache_dir: Path | None = None,
) -> list[VariantTiming]:
    """Time nnU-Net's `predict_from_files` on every case of `input_folder`: the original model first,
    then one `TuckerPredictor` per config.

    Each variant is loaded once; that load, compression included, is `load_seconds`. Decompositions
    go through a fresh temporary cache unless `cache_dir` is given, so `load_seconds` includes them.
    `seconds` are whole-folder predictions (preprocessing, sliding window with step 0.5, export,
    nnU-Net's worker start-up), interleaved round by round; `speedup` compares those. `compile`
    sets ``nnUNet_compile``; on CUDA nnU-Net's predictor runs in fp16 autocast by itself. A config
    without a calibration folder is fitted to the weights alone (the same ranks, hence the same speed,
    except under a MAC budget), so that no timed run self-calibrates.
    """
    from ..nnunet.predictor import TuckerPredictor, input_shape_of

    dev = torch.device(device)
    use_folds = [f if f == "all" else int(f) for f in folds]
    timings: list[VariantTiming] = []
    runs: dict[str, Callable[[], object]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nnunet_tucker_e2e_")))
        env = {"TUCKER_CACHE_DIR": str(cache_dir or tmp / "cache")}
        if compile:
            env["nnUNet_compile"] = "1"
        stack.enter_context(environment(**env))
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))  # nnU-Net prints a lot
        for config in [None, *configs]:
            name = "original" if config is None else variant_name(config)
            if config is not None and config.calibration is None:  # compressed at load, not in the first timed run
                config = replace(config, calibration=NO_CALIBRATION)
            predictor = TuckerPredictor(
                tile_step_size=0.5, use_mirroring=use_mirroring, perform_everything_on_device=True, device=dev,
                allow_tqdm=False, tucker_config=False if config is None else config,
            )
            start = time.perf_counter()
            predictor.initialize_from_trained_model_folder(str(model_folder), use_folds, checkpoint_name)
            load_seconds = time.perf_counter() - start
            network = unwrap(predictor.network)
            macs, _ = count_macs(network, input_shape_of(predictor))
            timings.append(VariantTiming(
                name, None if config is None else config.rank_ratio, None if config is None else config.policy,
                count_params(network), macs, [], mac_reduction=timings[0].macs / macs if timings else 1.0,
                load_seconds=load_seconds,
            ))
            runs[name] = partial(
                predictor.predict_from_files, str(input_folder), str(tmp / f"predictions_{len(runs)}"),
                save_probabilities=False, overwrite=True, num_processes_preprocessing=1,
                num_processes_segmentation_export=1,
            )
            logger.info("%s: loaded in %.1f s", name, load_seconds)
        _fill_seconds(timings, time_interleaved(runs, dev, rounds, warmup))
    return timings


def to_table(timings: Sequence[VariantTiming]) -> str:
    """A readable table of the timings."""
    with_load = any(t.load_seconds is not None for t in timings)
    head = (f"{'variant':<18} {'params':>9} {'GMACs':>8} {'MACs /':>7} {'min s':>8} {'median s':>9} "
            f"{'max s':>8} {'speed-up':>9} {'realized':>9} {'peak MB':>8}" + (f" {'load s':>7}" if with_load else ""))
    rows = [head, "-" * len(head)]
    for t in timings:
        peak = f"{t.peak_memory_mb:.0f}" if t.peak_memory_mb is not None else "-"
        load = f" {t.load_seconds:>7.1f}" if t.load_seconds is not None else f" {'-':>7}"
        rows.append(
            f"{t.name:<18} {t.params / 1e6:>8.2f}M {t.macs / 1e9:>8.1f} {t.mac_reduction:>6.1f}x "
            f"{min(t.seconds):>8.3f} {t.median:>9.3f} {max(t.seconds):>8.3f} {t.speedup:>8.2f}x "
            f"{t.realized:>8.0%} {peak:>8}" + (load if with_load else "")
        )
    return "\n".join(rows)


def write_outputs(timings: Sequence[VariantTiming], meta: dict, json_path: Path | None, png_path: Path | None) -> None:
    """JSON with every timing and `meta`; a PNG of speed-up vs MAC reduction.

    ``meta["title"]`` titles the plot and ``meta["measure"]`` names what was timed (default: forward pass).
    """
    if json_path is not None:
        json_path.write_text(json.dumps({**meta, "variants": [t.to_dict() for t in timings]}, indent=2))
    if png_path is not None:
        _plot(timings, meta, png_path)


def write_sections(sections: Sequence[tuple[Sequence[VariantTiming], dict]], json_path: Path) -> None:
    """One JSON of several networks timed one after the other (``bench --preset A B ...``): ``{"sections":
    [...]}``, each section what `write_outputs` writes for one network."""
    data = {"sections": [{**meta, "variants": [t.to_dict() for t in timings]} for timings, meta in sections]}
    json_path.write_text(json.dumps(data, indent=2))


def _plot(timings: Sequence[VariantTiming], meta: dict, png_path: Path) -> None:
    """A plot of speed-up vs MAC reduction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    top = max(t.mac_reduction for t in timings)
    ax.plot([1, top], [1, top], "--", color="grey", linewidth=1, label="speed-up = MAC reduction")
    for i, t in enumerate(timings):
        ax.scatter(t.mac_reduction, t.speedup)
        ax.annotate(t.name, (t.mac_reduction, t.speedup), textcoords="offset points",
                    xytext=(4, 4 if i % 2 else -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1.0, color="red", linewidth=0.8)
    ax.set_xlabel("MAC reduction (original / variant)")
    ax.set_ylabel(f"speed-up (median {meta.get('measure', 'forward pass')})")
    ax.set_title(textwrap.fill(meta.get("title", "forward pass"), 60), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
