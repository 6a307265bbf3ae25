"""Step 1, plan: the rank rules. The published rule, the shape rules that leave a layer as it is, and
the allocation of ranks within a MAC budget; pure functions of shapes and spectra."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.modules.conv import _ConvNd

from ..fit import feasible_ranks


def paper_rank(channels: int, ratio: float, rank_min: int, multiple: int = 1) -> int:
    """The published rank rule R = min(C, max(rank_min, ceil(C·ratio))), rounded up to `multiple`."""
    rank = max(rank_min, math.ceil(round(channels * ratio, 9)))
    rank = math.ceil(rank / multiple) * multiple
    return min(channels, rank)


@dataclass(frozen=True)
class ConvSpec:
    """The shape facts of a convolution that decide its ranks."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    transposed: bool
    groups: int = 1

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel_size)

    def macs_per_position(self, ranks: tuple[int, int] | None = None) -> int:
        """Multiply-accumulates per output position (per input position if transposed), original
        layer if `ranks` is None, else its decomposition with (in_rank, out_rank)."""
        k, s = math.prod(self.kernel_size), math.prod(self.stride)
        c_in, c_out = self.in_channels, self.out_channels
        if ranks is None:
            return c_in * c_out * k // self.groups
        r_in, r_out = ranks
        if self.transposed:  # the trailing 1x1 runs at the upsampled resolution
            return c_in * r_in + r_in * r_out * k + r_out * c_out * s
        return c_in * r_in * s + r_in * r_out * k + r_out * c_out  # the leading 1x1 runs before the stride


def clamp_ranks(spec: ConvSpec, r_in: int, r_out: int) -> tuple[int, int]:
    """(in_rank, out_rank) clamped as `tucker2` will, in weight order: (out, in) for Conv, (in, out)
    for ConvTranspose."""
    k = math.prod(spec.kernel_size)
    if spec.transposed:
        return feasible_ranks((spec.in_channels, spec.out_channels, k), r_in, r_out)
    r_out, r_in = feasible_ranks((spec.out_channels, spec.in_channels, k), r_out, r_in)
    return r_in, r_out


def aligned_ranks(spec: ConvSpec, ranks: tuple[int, int], multiple: int) -> tuple[int, int]:
    """`ranks` rounded up to a multiple of `multiple` (within the channel counts), then clamped."""
    r_in, r_out = (min(c, math.ceil(r / multiple) * multiple)
                   for r, c in zip(ranks, (spec.in_channels, spec.out_channels), strict=True))
    return clamp_ranks(spec, r_in, r_out)


def kept_by_shape(spec: ConvSpec, policy: str) -> str | None:
    """Why a layer is left as it is whatever its ranks would be, or None if it may be decomposed."""
    if spec.groups != 1:
        return "grouped convolution"
    if spec.pointwise:  # segmentation heads, projections: a bottleneck on logits, little to save
        return "1x1 convolution"
    if policy == "auto" and spec.in_channels == 1:
        return "single input channel"
    return None


def choose_ranks(
    spec: ConvSpec, ratio: float, policy: str, rank_min: int, rank_multiple: int = 1
) -> tuple[tuple[int, int] | None, str]:
    """(in_rank, out_rank) for a layer, or None to leave it as it is; plus the reason in words.

    ``profiled`` proposes what ``paper`` does; timings on the device decide (`plan.timing`).
    Deterministic in its arguments, so every fold of a model gets the same structure.
    """
    reason = kept_by_shape(spec, policy)
    if reason is not None:
        return None, reason
    r_in, r_out = clamp_ranks(spec, paper_rank(spec.in_channels, ratio, rank_min, rank_multiple),
                              paper_rank(spec.out_channels, ratio, rank_min, rank_multiple))
    if policy in ("paper", "profiled"):
        return (r_in, r_out), "decomposed"
    if (r_in, r_out) == (spec.in_channels, spec.out_channels):
        return None, "full ranks"
    if spec.macs_per_position((r_in, r_out)) >= spec.macs_per_position():
        return None, "no MAC saving"
    return (r_in, r_out), "decomposed"


@dataclass(frozen=True)
class BudgetLayer:
    """What rank allocation needs to know of one decomposable layer: its shape, how many output
    positions it computes per forward pass (input positions if transposed), its mode spectra and
    whether its decomposed form, exact at full ranks, runs faster here than the original (then the
    original form is no option: it is slower at no loss in accuracy)."""

    spec: ConvSpec
    positions: int
    spectrum_in: torch.Tensor
    spectrum_out: torch.Tensor
    calibrated: bool = False
    form_faster: bool = False

    def macs(self, ranks: tuple[int, int] | None) -> int:
        return self.spec.macs_per_position(ranks) * self.positions

    def kept(self, ranks: tuple[int, int] | None) -> tuple[float, float]:
        """Estimated shares of the input-mode and output-mode energy kept at `ranks`."""
        if ranks is None:
            return 1.0, 1.0
        return tuple(float(s[:r].sum() / s.sum()) if s.sum() > 0 else 1.0
                     for s, r in ((self.spectrum_in, ranks[0]), (self.spectrum_out, ranks[1])))

    def error(self, ranks: tuple[int, int] | None) -> float:
        """Estimated relative squared error: the share of the signal lost."""
        kept_in, kept_out = self.kept(ranks)
        return 1.0 - kept_in * kept_out

    def loss(self, ranks: tuple[int, int] | None) -> float:
        """What truncating to `ranks` costs. Calibrated spectra are in units of the network's loss
        (see `Whitening`), so the discarded energy of both modes is the loss, additive over layers.
        Weight spectra say nothing of a layer's weight in the network: then −log of the estimated
        share kept (shares multiply through the network, so these losses add up, and a layer near
        total loss costs without bound)."""
        if ranks is None:
            return 0.0
        if self.calibrated:
            return float(self.spectrum_in[ranks[0]:].sum() + self.spectrum_out[ranks[1]:].sum())
        return -sum(math.log(max(k, 1e-12)) for k in self.kept(ranks))


class BudgetError(ValueError):
    """A MAC budget the network cannot meet; the message says the smallest one it can."""


def allocate_ranks(
    layers: list[BudgetLayer], budget_macs: float, fixed_macs: int, rank_min: int, step: int = 1
) -> list[tuple[int, int] | None]:
    """Ranks per layer (None: keep the layer) minimising the summed `BudgetLayer.loss` while all
    MACs, `fixed_macs` of the layers not decomposed included, stay within `budget_macs`.

    Greedy: every layer starts at `rank_min`; then the step with the largest loss reduction per
    added MAC is taken while one fits — one rank mode up by `step`, or a layer back to its original
    form when that costs no more (never one whose decomposed form is faster: `BudgetLayer.form_faster`,
    which may reach full ranks). Deterministic in its inputs.
    """
    state: list[tuple[int, int] | None] = []
    for layer in layers:
        ranks = clamp_ranks(layer.spec, min(rank_min, layer.spec.in_channels), min(rank_min, layer.spec.out_channels))
        state.append(None if not layer.form_faster and layer.macs(ranks) >= layer.macs(None) else ranks)
    spent = fixed_macs + sum(layer.macs(r) for layer, r in zip(layers, state, strict=True))
    if spent > budget_macs:
        raise BudgetError(f"needs at least {spent:.4g} MACs with rank_min={rank_min}")

    def moves(i: int) -> list[tuple[float, int, tuple[int, int] | None]]:
        layer, ranks = layers[i], state[i]
        if ranks is None:
            return []
        options = [] if layer.form_faster else [None]
        c_in, c_out = layer.spec.in_channels, layer.spec.out_channels
        if ranks[0] < c_in:
            options.append(clamp_ranks(layer.spec, min(c_in, ranks[0] + step), ranks[1]))
        if ranks[1] < c_out:
            options.append(clamp_ranks(layer.spec, ranks[0], min(c_out, ranks[1] + step)))
        found = []
        for option in options:
            if option == ranks:
                continue
            gain = layer.loss(ranks) - layer.loss(option)
            cost = layer.macs(option) - layer.macs(ranks)
            if gain < 0 or (gain == 0 and cost > 0):
                continue
            value = float("inf") if cost <= 0 else gain / cost
            found.append((value, cost, option))
        return found

    options = {i: moves(i) for i in range(len(layers))}
    while True:
        best = None
        for i, found in options.items():
            for value, cost, option in found:
                if spent + cost <= budget_macs and (best is None or value > best[0]):
                    best = (value, cost, option, i)
        if best is None:
            break
        _, cost, option, i = best
        state[i] = option
        spent += cost
        options[i] = moves(i)
    return [None if not layer.form_faster and r == (layer.spec.in_channels, layer.spec.out_channels) else r
            for layer, r in zip(layers, state, strict=True)]


def conv_spec(conv: _ConvNd) -> ConvSpec:
    """The `ConvSpec` of a torch convolution module."""
    return ConvSpec(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        transposed=conv.transposed,
        groups=conv.groups,
    )
