"""Side-by-side forward-pass timing of an original network and its compressed variants.

All variants run in one process, interleaved round by round (original, A, B, original, A, B, ...),
so that the noise of a shared machine hits every variant alike. Speed-ups are ratios of medians.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .accounting import count_macs, count_params
from .config import TuckerConfig
from .surgery import compress_network


@dataclass
class VariantTiming:
    """Timings of one variant; `speedup` = median of the original / median of this variant."""

    name: str
    rank_ratio: float | None
    policy: str | None
    params: int
    macs: int
    seconds: list[float]
    speedup: float = 1.0
    mac_reduction: float = 1.0
    peak_memory_mb: float | None = None

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
    amp = torch.autocast(device.type, dtype=torch.float16) if autocast else nullcontext()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode(), amp:
        for round_index in range(warmup + rounds):
            for name, network in variants.items():
                _synchronize(device)
                start = time.perf_counter()
                network(x)
                _synchronize(device)
                if round_index >= warmup:
                    seconds[name].append(time.perf_counter() - start)
    return seconds


def benchmark(
    network: nn.Module,
    input_shape: Sequence[int],
    configs: Sequence[TuckerConfig],
    device: str = "cpu",
    rounds: int = 5,
    warmup: int = 1,
    autocast: bool = False,
    compile: bool = False,
) -> list[VariantTiming]:
    """Time `network` and one compressed copy per config; the first entry is the original."""
    dev = torch.device(device)
    network = network.eval()
    macs, _ = count_macs(network, input_shape)
    timings = [VariantTiming("original", None, None, count_params(network), macs, [])]
    variants = {"original": network}
    for config in configs:
        variant = copy.deepcopy(network)
        report = compress_network(variant, config, input_shape)
        name = f"{config.policy} {config.rank_ratio}"
        if config.rank_multiple > 1:
            name += f" x{config.rank_multiple}"
        variants[name] = variant
        timings.append(VariantTiming(name, config.rank_ratio, config.policy, report.params_after,
                                     report.macs_after, [], mac_reduction=macs / report.macs_after))
    variants = {k: v.to(dev) for k, v in variants.items()}
    if compile:
        variants = {k: torch.compile(v) for k, v in variants.items()}
    if dev.type == "cuda":
        for timing, variant in zip(timings, variants.values(), strict=True):  # peak memory, one pass each
            torch.cuda.reset_peak_memory_stats(dev)
            time_forward_passes({"v": variant}, input_shape, dev, rounds=1, warmup=0, autocast=autocast)
            timing.peak_memory_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    seconds = time_forward_passes(variants, input_shape, dev, rounds, warmup, autocast)
    for timing in timings:
        timing.seconds = seconds[timing.name]
        timing.speedup = timings[0].median / timing.median
    return timings


def to_table(timings: Sequence[VariantTiming]) -> str:
    """A readable table of the timings."""
    head = (f"{'variant':<18} {'params':>9} {'GMACs':>8} {'MACs /':>7} {'min s':>8} {'median s':>9} "
            f"{'max s':>8} {'speed-up':>9} {'realized':>9} {'peak MB':>8}")
    rows = [head, "-" * len(head)]
    for t in timings:
        peak = f"{t.peak_memory_mb:.0f}" if t.peak_memory_mb is not None else "-"
        rows.append(
            f"{t.name:<18} {t.params / 1e6:>8.2f}M {t.macs / 1e9:>8.1f} {t.mac_reduction:>6.1f}x "
            f"{min(t.seconds):>8.3f} {t.median:>9.3f} {max(t.seconds):>8.3f} {t.speedup:>8.2f}x "
            f"{t.realized:>8.0%} {peak:>8}"
        )
    return "\n".join(rows)


def write_outputs(timings: Sequence[VariantTiming], meta: dict, json_path: Path | None, png_path: Path | None) -> None:
    """JSON with every timing and `meta`; a PNG of speed-up vs MAC reduction."""
    if json_path is not None:
        json_path.write_text(json.dumps({**meta, "variants": [t.to_dict() for t in timings]}, indent=2))
    if png_path is not None:
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
        ax.set_ylabel("speed-up (median forward pass)")
        ax.set_title(meta.get("title", "forward pass"), fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png_path, dpi=120)
        plt.close(fig)
