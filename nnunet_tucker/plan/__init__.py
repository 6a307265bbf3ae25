"""Step 1, plan: which convolutions to decompose and at which ranks, as a list of `LayerPlan`.

The rules (`ranks`): the published rank rule, the shape rules of the ``auto`` policy, ranks
allocated within a MAC budget; the ``profiled`` policy times the candidates on the device
(`timing`). dynamic_network_architectures registers one conv module under several names
(``convs.0.conv`` and ``convs.0.all_modules.0``; the decoder also holds the encoder): a plan
names each module once, with all of its aliases.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..calibrate import ChannelStatistics
from ..config import TuckerConfig, TuckerConfigError
from ..counting import count_macs
from ..fit import channel_spectra
from ..layers import ELEMENTWISE, FusedInstanceNorm, TuckerConv
from .ranks import (
    BudgetError,
    BudgetLayer,
    ConvSpec,
    aligned_ranks,
    allocate_ranks,
    choose_ranks,
    clamp_ranks,
    conv_spec,
    kept_by_shape,
)
from .timing import LayerTimer, layer_shapes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one convolution module: `ranks` (in, out) or None to keep it, and why."""

    name: str
    aliases: tuple[str, ...]
    spec: ConvSpec
    ranks: tuple[int, int] | None
    reason: str
    bias: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "ranks": list(self.ranks) if self.ranks else None}


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module behind `torch.compile` (``_orig_mod``) or DDP (``module``) wrappers."""
    while True:
        inner = getattr(network, "_orig_mod", None) or (
            network.module if isinstance(network, nn.parallel.DistributedDataParallel) else None
        )
        if inner is None:
            return network
        network = inner


def _module_names(network: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name it is registered under, in registration order."""
    names: dict[int, list[str]] = {}
    for name, module in network.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _own_names(network: nn.Module) -> set[str]:
    """The qualified names reached through each module's owners only, not through a reference to a
    module registered earlier elsewhere: ``decoder.encoder.stages...`` is not the decoder's."""
    first: dict[int, str] = {}
    owned_paths = {""}  # names of modules seen here first, whose children are then their own
    own = set()
    for name, module in network.named_modules(remove_duplicate=False):
        first.setdefault(id(module), name)
        if name and name.rpartition(".")[0] in owned_paths:
            own.add(name)
            if first[id(module)] == name:
                owned_paths.add(name)
    return own


def _plan(network: nn.Module, decide: Callable[[tuple[str, ...], ConvSpec], tuple]) -> list[LayerPlan]:
    """One `LayerPlan` per distinct convolution not yet decomposed, ranks from `decide(aliases, spec)`."""
    network = unwrap(network)
    names = _module_names(network)
    inside_decomposed = {id(m) for t in network.modules() if isinstance(t, TuckerConv) for m in t.modules()}
    plans = []
    for name, module in network.named_modules():
        if isinstance(module, _ConvNd) and id(module) not in inside_decomposed:
            aliases = tuple(names[id(module)])
            spec = conv_spec(module)
            plans.append(LayerPlan(name, aliases, spec, *decide(aliases, spec), module.bias is not None))
    return plans


def plan_compression(
    network: nn.Module,
    config: TuckerConfig,
    input_shape: Sequence[int] | None = None,
    timer: LayerTimer | None = None,
    statistics: dict[str, ChannelStatistics] | None = None,
) -> list[LayerPlan]:
    """One `LayerPlan` per distinct convolution module (shared modules once).

    With ``config.mac_budget``, ranks are allocated across the layers the policy may decompose so
    that the summed estimated error is least within the budget (`allocate_ranks`); the error
    estimates come from the network's current weights, and from `statistics` (calibration data,
    by layer name) where given. Under ``profiled``, a layer whose exact decomposed form (full
    ranks) times faster than the original by `PROFILE_MARGIN` stays decomposed, up to full ranks,
    instead of going back to its slower original form when the budget allows.

    The ``paper`` and ``auto`` policies decide from shapes alone (so does ``profiled`` without
    `input_shape`, by the ``auto`` rules). ``profiled`` times, at each layer's input shape for
    `input_shape`, the original layer against its decomposition with the requested ranks and with
    ranks rounded up to multiples of 4, 8 and 16 (on `timer`'s device; a CPU `LayerTimer` if None)
    and keeps the fastest: the original unless a decomposition is at least `PROFILE_MARGIN`
    faster, and among decompositions within `TIE_MARGIN` of the fastest, the one with the
    largest ranks (accuracy for free). On the CPU, two layers that run chained when both are
    decomposed are then decided together, timed as a unit (`_fastest_pairs`).
    """

    own_names = _own_names(unwrap(network))
    unmatched = set(config.exclude)

    def decide(aliases: tuple[str, ...], spec: ConvSpec) -> tuple:
        matched = {p for p in config.exclude for a in aliases if a in own_names and fnmatch.fnmatchcase(a, p)}
        if matched:
            unmatched.difference_update(matched)
            return None, "excluded by pattern"
        if config.mac_budget is not None:
            reason = kept_by_shape(spec, config.policy)
            return (None, reason) if reason else ((spec.in_channels, spec.out_channels), "budget")
        return choose_ranks(spec, config.rank_ratio, policy, config.rank_min, config.rank_multiple)

    profiled = config.policy == "profiled" and input_shape is not None
    policy = "auto" if config.policy == "profiled" and not profiled else config.policy
    plan = _plan(network, decide)
    if unmatched:
        raise TuckerConfigError(
            f"exclude pattern(s) {sorted(unmatched)} match no convolution of this network; names look like "
            f"{plan[0].name!r} (see `nnunet-tucker report` for all)"
        )
    if config.mac_budget is not None:
        if input_shape is None:
            raise ValueError("a MAC budget needs the network's input shape to count multiply-accumulates")
        plan = _budgeted(network, plan, config, input_shape, statistics or {},
                         (timer or LayerTimer("cpu")) if config.policy == "profiled" else None)
    elif profiled:
        plan = _profiled(network, plan, input_shape, timer or LayerTimer("cpu"))
    return plan


def _budgeted(network: nn.Module, plan: list[LayerPlan], config: TuckerConfig, input_shape: Sequence[int],
              statistics: dict[str, ChannelStatistics], timer: LayerTimer | None) -> list[LayerPlan]:
    network = unwrap(network)
    shapes = layer_shapes(network, input_shape)
    total, _ = count_macs(network, input_shape)
    refined = list(plan)
    candidates, layers = [], []
    for i, layer in enumerate(plan):
        if layer.ranks is None:
            continue
        conv = network.get_submodule(layer.name)
        if id(conv) not in shapes:  # eligible, but the forward pass never runs it
            refined[i] = dataclasses.replace(layer, ranks=None, reason="not run")
            continue
        stats = statistics.get(layer.name)
        if statistics and (stats is None or not stats.usable()):  # losses of other layers are in other units
            refined[i] = dataclasses.replace(layer, ranks=None, reason="no calibration data")
            continue
        in_shape, out_shape = shapes[id(conv)]
        weight = conv.weight.transpose(0, 1) if layer.spec.transposed else conv.weight
        positions = math.prod((in_shape if layer.spec.transposed else out_shape)[2:]) * in_shape[0]
        candidates.append(i)
        spectra = channel_spectra(weight, stats.whitening() if statistics else None)
        layers.append(BudgetLayer(layer.spec, positions, *spectra, calibrated=bool(statistics)))
    speedups = _exact_form_speedups(network, [plan[i] for i in candidates], shapes, timer) if timer else {}
    layers = [dataclasses.replace(layer, form_faster=speedups[plan[i].name] >= 1 / (1 - PROFILE_MARGIN))
              if speedups else layer for i, layer in zip(candidates, layers, strict=True)]
    fixed = total - sum(layer.macs(None) for layer in layers)
    try:
        ranks = allocate_ranks(layers, config.mac_budget * total, fixed, config.rank_min, config.rank_multiple)
    except BudgetError as e:
        raise TuckerConfigError(
            f"mac_budget={config.mac_budget} is below what this network can reach: it {e} "
            f"(of {total:.4g}); raise the budget or lower rank_min"
        ) from None
    for i, layer_ranks, budget_layer in zip(candidates, ranks, layers, strict=True):
        reason = "budget: kept" if layer_ranks is None else (
            f"budget: est. error {budget_layer.error(layer_ranks):.3f}" + (" (calibrated)" if statistics else "")
            + (f", exact form {speedups[plan[i].name]:.2f}x faster here" if budget_layer.form_faster else ""))
        refined[i] = dataclasses.replace(plan[i], ranks=layer_ranks, reason=reason)
    return refined


def _exact_form_speedups(network: nn.Module, plan: list[LayerPlan], shapes: dict,
                         timer: LayerTimer) -> dict[str, float]:
    """Layer name -> how much faster its exact decomposed form (full ranks) runs here than the original, for
    each layer of `plan` (all run: in `shapes`)."""
    norms = instance_norms_after(network)
    speedups = {}
    with _profiling(timer):
        for layer in plan:
            conv = network.get_submodule(layer.name)
            exact = clamp_ranks(layer.spec, layer.spec.in_channels, layer.spec.out_channels)
            seconds = timer.seconds(conv, shapes[id(conv)][0], [None, exact], id(conv) in norms)
            speedups[layer.name] = seconds[None] / seconds[exact]
    return speedups


@contextmanager
def _profiling(timer: LayerTimer) -> Iterator[None]:
    """Time under the profile's lock (`LayerTimer.exclusive`), then say what it cost."""
    with timer.exclusive():
        yield
    if timer.measured:
        stored = f"cached in {timer.path}" if timer.saved else f"not cached: {timer.path} could not be written"
        logger.info("profiled %d layer forms on %s in %.1f s (%s)", timer.measured, timer.device,
                    timer.seconds_spent, stored)


PROFILE_MARGIN = 0.05  # a decomposition must beat the original by this much to replace it
TIE_MARGIN = 0.02  # timings closer than this count as equal
ALIGNMENTS = (4, 8, 16)  # ranks rounded up to these multiples are timed too


def _profiled(network: nn.Module, plan: list[LayerPlan], input_shape: Sequence[int],
              timer: LayerTimer) -> list[LayerPlan]:
    network = unwrap(network)
    shapes = {k: v[0] for k, v in layer_shapes(network, input_shape).items()}
    with _profiling(timer):
        return _fastest_forms(network, plan, shapes, instance_norms_after(network), timer)


def _fastest_forms(network: nn.Module, plan: list[LayerPlan], shapes: dict, norms: dict,
                   timer: LayerTimer) -> list[LayerPlan]:
    refined, best = [], {}  # best: id(conv) -> its fastest decomposition
    for layer in plan:
        conv = network.get_submodule(layer.name)
        if layer.ranks is None or id(conv) not in shapes:
            refined.append(layer)
            continue
        aligned = (aligned_ranks(layer.spec, layer.ranks, multiple) for multiple in ALIGNMENTS)
        candidates = list(dict.fromkeys([layer.ranks, *aligned]))
        seconds = timer.seconds(conv, shapes[id(conv)], [None, *candidates], id(conv) in norms)
        fastest = min(seconds[c] for c in candidates)
        original = seconds[None]
        ranks = max((c for c in candidates if seconds[c] <= fastest * (1 + TIE_MARGIN)),
                    key=lambda c: (c[0] * c[1], c))
        best[id(conv)] = ranks
        if fastest > original * (1 - PROFILE_MARGIN):
            refined.append(dataclasses.replace(
                layer, ranks=None, reason=f"not faster here ({fastest * 1e3:.1f} vs {original * 1e3:.1f} ms)"))
        else:
            refined.append(dataclasses.replace(
                layer, ranks=ranks, reason=f"decomposed, {original / seconds[ranks]:.2f}x faster here"))
    if timer.device.type == "cpu":  # where decomposed neighbours run chained
        refined = _fastest_pairs(network, refined, shapes, best, timer)
    return refined


def _fastest_pairs(network: nn.Module, plan: list[LayerPlan], shapes: dict, best: dict,
                   timer: LayerTimer) -> list[LayerPlan]:
    """`plan` with each pair of layers that run chained when both are decomposed (`chainable_pairs`)
    decided together: the four combinations of original and fastest decomposition timed as a unit,
    the fastest kept if it beats both original by `PROFILE_MARGIN` (of those within `TIE_MARGIN` of
    it, the one that decomposes fewer layers), else both original. Pairs whose layers are both
    decomposed already stay so (chained, they only get faster)."""
    index = {id(network.get_submodule(layer.name)): i for i, layer in enumerate(plan)}
    refined = list(plan)
    for conv_id, (following, activation, end) in chainable_pairs(network).items():
        if conv_id not in best or id(following) not in best:
            continue
        i, j = index[conv_id], index[id(following)]
        if plan[i].ranks and plan[j].ranks:
            continue
        conv = network.get_submodule(plan[i].name)
        seconds = timer.pair_seconds(conv, shapes[conv_id], best[conv_id], following, best[id(following)],
                                     activation, end)
        original = seconds[None, None]
        fastest = min(seconds.values())
        if fastest > original * (1 - PROFILE_MARGIN):
            choice = (None, None)
        else:
            choice = min((c for c in seconds if seconds[c] <= fastest * (1 + TIE_MARGIN)),
                         key=lambda c: (sum(r is not None for r in c), seconds[c]))
        speedup = original / seconds[choice]
        for k, ranks in zip((i, j), choice, strict=True):
            reason = (f"decomposed, {'chained ' if all(choice) else ''}pair {speedup:.2f}x faster here" if ranks
                      else f"kept, its pair {speedup:.2f}x faster so" if any(choice)
                      else f"not faster here (pair at best {original / fastest:.2f}x)")
            refined[k] = dataclasses.replace(plan[k], ranks=ranks, reason=reason)
    return refined


def plan_compression_from_ranks(network: nn.Module, ranks: dict[str, list[int]]) -> list[LayerPlan]:
    """The plan that decomposes exactly the named layers with the given ``[in_rank, out_rank]``."""
    plan = _plan(network, lambda aliases, _: (
        (tuple(ranks[aliases[0]]), "decomposed") if aliases[0] in ranks else (None, "kept")
    ))
    unknown = set(ranks) - {layer.name for layer in plan}
    if unknown:
        raise ValueError(f"ranks given for layers the network does not have: {sorted(unknown)}")
    return plan


def instance_norms_after(network: nn.Module) -> dict[int, nn.Module]:
    """id(conv) -> the instance norm its output goes straight into (dropout aside), within a
    `nn.Sequential` (nnU-Net's ConvDropoutNormReLU runs its ``all_modules``)."""
    found = {}
    for sequence in network.modules():
        if isinstance(sequence, nn.Sequential):
            steps = [m for m in sequence if not isinstance(m, nn.modules.dropout._DropoutNd)]
            for module, after in zip(steps, steps[1:], strict=False):
                if isinstance(module, _ConvNd) and FusedInstanceNorm.applies_to(after):
                    found[id(module)] = after
    return found


class ChainedPair(NamedTuple):
    """A convolution's chained successor (`chainable_pairs`): `following`, the `activation` between them and,
    in a residual block, `end`, the activation of `following`'s normalised output plus the skip."""

    following: _ConvNd
    activation: nn.Module
    end: nn.Module | None = None


def chainable_pairs(network: nn.Module) -> dict[int, ChainedPair]:
    """id(conv) -> its `ChainedPair`: consecutive blocks of a stack (dynamic_network_architectures'
    `StackedConvBlocks`) and the two blocks of a residual block (`BasicBlockD`, no stochastic depth or
    squeeze-excitation) whose first is (conv, instance norm, elementwise activation) exactly, which run
    chained (`swap.forms.ChainedConvBlocks`, `ChainedResidualBlock`) when both convolutions are decomposed;
    a residual block's `end` where its second is (conv, instance norm) and the activation after the sum
    elementwise. Pairs do not overlap: in a stack of three, the first two."""
    found = {}
    for module in unwrap(network).modules():
        if isinstance(module, StackedConvBlocks):
            blocks, end = list(module.convs), None
        elif isinstance(module, BasicBlockD) and not (module.apply_stochastic_depth or module.apply_se):
            blocks, end = [module.conv1, module.conv2], module.nonlin2
            second = list(module.conv2.all_modules) if type(module.conv2) is ConvDropoutNormReLU else []
            if not (len(second) == 2 and FusedInstanceNorm.applies_to(second[1]) and type(end) in ELEMENTWISE):
                end = None
        else:
            continue
        paired = set()
        for block, following in zip(blocks, blocks[1:], strict=False):
            if type(block) is not ConvDropoutNormReLU or type(following) is not ConvDropoutNormReLU:
                continue
            modules, conv = list(block.all_modules), following.all_modules[0]
            if (len(modules) == 3 and isinstance(modules[0], _ConvNd) and FusedInstanceNorm.applies_to(modules[1])
                    and type(modules[2]) in ELEMENTWISE and isinstance(conv, _ConvNd)
                    and id(modules[0]) not in paired):
                found[id(modules[0])] = ChainedPair(conv, modules[2], end)
                paired.update((id(modules[0]), id(conv)))
    return found
