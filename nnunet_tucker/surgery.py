"""Network surgery: plan which convolutions to decompose, swap them for `TuckerConv`, convert state dicts.

dynamic_network_architectures registers one conv module under several names (``convs.0.conv`` and
``convs.0.all_modules.0``; the decoder also holds the encoder). Every name of one module ends up
pointing at one `TuckerConv`, and state-dict conversion writes the decomposed weights under every name.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from tqdm import tqdm

from .accounting import CompressionReport, count_macs, measure
from .config import TuckerConfig, TuckerConfigError
from .decomposition import (
    BudgetError,
    BudgetLayer,
    ConvSpec,
    aligned_ranks,
    allocate_ranks,
    channel_spectra,
    choose_ranks,
    kept_by_shape,
)
from .layers import (
    FusedInstanceNorm,
    PointwiseConv,
    TuckerConv,
    conv_spec,
    decompose_conv_weights,
    refit_conv_weights,
    refit_positions_needed,
    refittable,
)
from .profile import LayerTimer, layer_shapes
from .statistics import ChannelStatistics, Targets, responses, sample_targets

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
    by layer name) where given.

    The ``paper`` and ``auto`` policies decide from shapes alone (so does ``profiled`` without
    `input_shape`, by the ``auto`` rules). ``profiled`` times, at each layer's input shape for
    `input_shape`, the original layer against its decomposition with the requested ranks and with
    ranks rounded up to multiples of 8 and 16 (on `timer`'s device; a CPU `LayerTimer` if None)
    and keeps the fastest: the original unless a decomposition is at least `PROFILE_MARGIN`
    faster, and among decompositions within `TIE_MARGIN` of the fastest, the one with the
    largest ranks (accuracy for free).
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
        plan = _budgeted(network, plan, config, input_shape, statistics or {})
    elif profiled:
        plan = _profiled(network, plan, input_shape, timer or LayerTimer("cpu"))
    return plan


def _budgeted(network: nn.Module, plan: list[LayerPlan], config: TuckerConfig, input_shape: Sequence[int],
              statistics: dict[str, ChannelStatistics]) -> list[LayerPlan]:
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
            f"budget: est. error {budget_layer.error(layer_ranks):.3f}" + (" (calibrated)" if statistics else ""))
        refined[i] = dataclasses.replace(plan[i], ranks=layer_ranks, reason=reason)
    return refined


PROFILE_MARGIN = 0.05  # a decomposition must beat the original by this much to replace it
TIE_MARGIN = 0.02  # timings closer than this count as equal


def _profiled(network: nn.Module, plan: list[LayerPlan], input_shape: Sequence[int],
              timer: LayerTimer) -> list[LayerPlan]:
    network = unwrap(network)
    shapes = {k: v[0] for k, v in layer_shapes(network, input_shape).items()}
    norms = _instance_norms_after(network)
    with timer.exclusive():
        refined = _fastest_forms(network, plan, shapes, norms, timer)
    if timer.measured:
        stored = f"cached in {timer.path}" if timer.saved else f"not cached: {timer.path} could not be written"
        logger.info("profiled %d layer forms on %s in %.1f s (%s)", timer.measured, timer.device,
                    timer.seconds_spent, stored)
    return refined


def _fastest_forms(network: nn.Module, plan: list[LayerPlan], shapes: dict, norms: dict,
                   timer: LayerTimer) -> list[LayerPlan]:
    refined = []
    for layer in plan:
        conv = network.get_submodule(layer.name)
        if layer.ranks is None or id(conv) not in shapes:
            refined.append(layer)
            continue
        candidates = list(dict.fromkeys([layer.ranks, *(aligned_ranks(layer.spec, layer.ranks, m) for m in (8, 16))]))
        seconds = timer.seconds(conv, shapes[id(conv)], [None, *candidates], id(conv) in norms)
        fastest = min(seconds[c] for c in candidates)
        original = seconds[None]
        if fastest > original * (1 - PROFILE_MARGIN):
            ranks, reason = None, f"not faster here ({fastest * 1e3:.1f} vs {original * 1e3:.1f} ms)"
        else:
            ranks = max((c for c in candidates if seconds[c] <= fastest * (1 + TIE_MARGIN)),
                        key=lambda c: (c[0] * c[1], c))
            reason = f"decomposed, {original / seconds[ranks]:.2f}x faster here"
        refined.append(dataclasses.replace(layer, ranks=ranks, reason=reason))
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


def _instance_norms_after(network: nn.Module) -> dict[int, nn.Module]:
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


def swap_modules(network: nn.Module, plan: Iterable[LayerPlan]) -> None:
    """Replace every planned convolution, under all of its names, by an (untrained) `TuckerConv`;
    kept 1x1 convolutions become `PointwiseConv` (same weights, computed as a GEMM), and an instance
    norm right after a decomposed layer becomes a `FusedInstanceNorm` done in that layer's last GEMM."""
    network = unwrap(network)
    norms = _instance_norms_after(network)
    replacements: dict[int, nn.Module] = {}
    for layer in plan:
        conv = network.get_submodule(layer.name)
        if not isinstance(conv, _ConvNd) or conv_spec(conv) != layer.spec:
            raise ValueError(f"layer {layer.name!r} does not match the compression plan: found {conv!r}")
        if layer.ranks is not None:
            tucker = replacements[id(conv)] = TuckerConv(conv, *layer.ranks)
            if id(conv) in norms:
                fused = replacements[id(norms[id(conv)])] = FusedInstanceNorm(norms[id(conv)])
                tucker.fuse_norm(fused)
        elif PointwiseConv.applies_to(conv):
            replacements[id(conv)] = PointwiseConv(conv)
    originals = {id(m): m for m in network.modules()}
    for key, replacement in replacements.items():
        replacement.train(originals[key].training)  # a fresh module would be in training mode
    for module in list(network.modules()):
        for child_name, child in list(module._modules.items()):
            if child is not None and id(child) in replacements:
                module._modules[child_name] = replacements[id(child)]


class RefitData(NamedTuple):
    """What refitting on calibration data needs: the network holding the weights being converted,
    the calibration patches (N, C, *spatial), whether its outputs are region (sigmoid) logits, and
    the targets if already sampled on them (`statistics.calibrate`; else `sample_targets` runs)."""

    network: nn.Module
    patches: torch.Tensor
    regions: bool = False
    targets: tuple[Targets, list[str]] | None = None


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], plan: Iterable[LayerPlan], hooi_iterations: int = 0,
    statistics: dict[str, ChannelStatistics] | None = None,
    refit_on: Callable[[], RefitData] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """An original state dict in the compressed layout, plus each decomposed layer's relative error.

    Keys of layers left as they are pass through unchanged; each decomposed layer is decomposed
    once and written under all of its aliases. Layers with (usable) `statistics` for these
    weights get the calibration-aware fit, the others the HOSVD. `refit_on` returns the
    `RefitData`: the core and last factor of calibrated layers are then refitted on data
    (`_refit_in_order`).
    """
    statistics = statistics or {}
    plan = [layer for layer in plan if layer.ranks is not None]
    decomposed: dict[str, dict[str, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    for layer in plan:
        decomposed[layer.name], errors[layer.name] = decompose_conv_weights(
            state_dict[f"{layer.name}.weight"], state_dict.get(f"{layer.name}.bias"), layer.spec, layer.ranks,
            hooi_iterations, statistics.get(layer.name)
        )
    refit = {layer.name for layer in plan if layer.name in statistics and statistics[layer.name].usable()}
    if refit_on is not None and refit:
        _refit_in_order(refit_on(), plan, refit, decomposed, errors, statistics, state_dict)
    converted = dict(state_dict)
    for layer in plan:
        for alias in layer.aliases:
            converted.pop(f"{alias}.weight", None)
            converted.pop(f"{alias}.bias", None)
            converted.update({f"{alias}.{k}": v for k, v in decomposed[layer.name].items()})
    return converted, errors


def _refit_in_order(
    data: RefitData, plan: list[LayerPlan], refit: set[str],
    decomposed: dict[str, dict[str, torch.Tensor]], errors: dict[str, float],
    statistics: dict[str, ChannelStatistics], state_dict: dict[str, torch.Tensor],
) -> None:
    """Refit, in place, core and last factor of the layers in `refit` (those `refittable`) on the
    calibration patches, in the order the forward pass runs them: each on the input that the
    network, with every layer before it already compressed and refitted, gives it, against the
    original network's output — so that each refit makes up for the error of the layers before it;
    positions weighted by how much the prediction depends on them (`sample_targets`). Costs one
    forward and a few backward passes of the original network per patch, and one forward pass of a
    compressed copy over all patches at once: a pre-hook refits each layer on the input the pass
    gives it and loads the result before the layer runs (a module run twice: on its first run).
    Layers with too few sampled positions to refit on (`refit_positions_needed`) are left as they are."""
    network, patches = unwrap(data.network), data.patches
    targets, order = data.targets or sample_targets(network, patches, [layer.name for layer in plan],
                                                    regions=data.regions)
    compressed = copy.deepcopy(network).eval()
    swap_modules(compressed, plan)
    for layer in plan:
        compressed.get_submodule(layer.name).load_state_dict(decomposed[layer.name])
    by_name = {layer.name: layer for layer in plan}
    pending: dict[int, str] = {}  # id(module) -> name, of the layers not refitted yet

    def refit_here(module: nn.Module, args: tuple) -> None:
        name = pending.pop(id(module), None)
        if name is None:  # a module run twice: refitted on its first run
            return
        found = responses(network.get_submodule(name), args[0], decomposed[name]["first.weight"], targets[name])
        result = refit_conv_weights(decomposed[name], state_dict[f"{name}.weight"], by_name[name].spec, found,
                                    statistics[name].output_fisher)
        if result is not None:
            decomposed[name], errors[name] = result
            module.load_state_dict(decomposed[name])
        progress.update()

    def enough_positions(name: str) -> bool:
        positions = sum(len(target.weights) for target in targets[name])
        return positions >= refit_positions_needed(decomposed[name], by_name[name].spec)

    for name in order:
        if name in refit and refittable(network.get_submodule(name)) and enough_positions(name):
            module = compressed.get_submodule(name)
            pending[id(module)] = name
            module.register_forward_pre_hook(refit_here)
    progress = tqdm(total=len(pending), desc="refitting on calibration data", unit="layer", disable=None, leave=False)
    device = next(network.parameters()).device
    with progress, torch.inference_mode():
        compressed(patches.to(device=device, dtype=torch.float32))


def converted_shapes(state_dict: dict[str, torch.Tensor], plan: Iterable[LayerPlan]) -> dict[str, tuple]:
    """Key -> shape of `convert_state_dict(state_dict, plan)`, without decomposing anything."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for layer in plan:
        if layer.ranks is None:
            continue
        (r_in, r_out), s = layer.ranks, layer.spec
        ones = (1,) * len(s.kernel_size)
        core = (r_in, r_out) if s.transposed else (r_out, r_in)
        new = {
            "first.weight": (r_in, s.in_channels, *ones),
            "core.weight": (*core, *s.kernel_size),
            "last.weight": (s.out_channels, r_out, *ones),
        }
        if layer.bias:
            new["last.bias"] = (s.out_channels,)
        for alias in layer.aliases:
            shapes.pop(f"{alias}.weight", None)
            shapes.pop(f"{alias}.bias", None)
            shapes.update({f"{alias}.{k}": v for k, v in new.items()})
    return shapes


def compress_network(
    network: nn.Module,
    config: TuckerConfig,
    input_shape: tuple[int, ...] | None = None,
    decomposed: tuple[dict[str, torch.Tensor], dict[str, float]] | None = None,
    plan: list[LayerPlan] | None = None,
) -> CompressionReport:
    """Decompose the convolutions of `network` in place, as `config` says; return the report.

    `input_shape` (e.g. ``(1, 1, *patch_size)``) lets the report count multiply-accumulates.
    `decomposed` is the `convert_state_dict` result for the network's weights when it is already at
    hand (e.g. from a cache), computed for `plan` (the `plan_compression` result, else planned here).
    """
    network = unwrap(network)
    plan = plan if plan is not None else plan_compression(network, config, input_shape)
    before = measure(network, input_shape)
    start = time.perf_counter()
    if decomposed is None:
        decomposed = convert_state_dict(network.state_dict(), plan, config.hooi_iterations)
    state, errors = decomposed
    seconds = time.perf_counter() - start
    swap_modules(network, plan)
    network.load_state_dict(state)
    after = measure(network, input_shape)
    return CompressionReport.build(plan, errors, before, after, config, seconds, input_shape)
