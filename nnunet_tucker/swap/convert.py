"""Step 4, swap: state dicts. An original state dict becomes the compressed one: each planned layer's weights
fitted (`fit`), on calibration data refitted in the order the network runs them."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from tqdm import tqdm

from ..calibrate import ChannelStatistics, ResponseStatistics, Targets, responses, sample_targets
from ..fit import (
    REFIT_SAMPLES_PER_FEATURE,
    calibrated_tucker2,
    core_by_offset,
    refit_core_and_last,
    refit_last,
    tucker2,
)
from ..plan import LayerPlan, unwrap
from ..plan.ranks import ConvSpec, clamp_ranks
from .surgery import swap_modules


class RefitData(NamedTuple):
    """What refitting on calibration data needs: the network holding the weights being converted,
    the calibration patches (N, C, *spatial), whether its outputs are region (sigmoid) logits, the
    targets if already sampled on them (`calibrate.calibrate`; else `sample_targets` runs), and the
    voxels of the patches the fit uses (`calibrate.collect_statistics`' masks; None: all)."""

    network: nn.Module
    patches: torch.Tensor
    regions: bool = False
    targets: tuple[Targets, list[str]] | None = None
    masks: torch.Tensor | None = None


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
    (`_refit_in_order`). A plan that keeps every rank of every layer it decomposes is exact: HOSVD alone, no data.
    """
    statistics = statistics or {}
    plan = [layer for layer in plan if layer.ranks is not None]
    if all(layer.ranks == clamp_ranks(layer.spec, layer.spec.in_channels, layer.spec.out_channels) for layer in plan):
        statistics, refit_on = {}, None  # every rank kept: the HOSVD is exact, data has nothing to add
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
    forward pass of a compressed copy over all patches at once (and, unless `data.targets` has them
    from the statistics' pass, the targets' own probed pass of the original network): a pre-hook
    refits each layer on the input the pass gives it and loads the result before the layer runs (a
    module run twice: on its first run).
    Layers with too few sampled positions to refit on (`refit_positions_needed`) are left as they are."""
    network, patches = unwrap(data.network), data.patches
    targets, order = data.targets or sample_targets(network, patches, [layer.name for layer in plan],
                                                    regions=data.regions, masks=data.masks)
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
        return positions >= refit_positions_needed(decomposed[name], by_name[name].spec, core=False)

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


def decompose_conv_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: ConvSpec,
    ranks: tuple[int, int],
    hooi_iterations: int = 0,
    statistics: ChannelStatistics | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """The state dict of a `TuckerConv` (keys ``first.weight``, ``core.weight``, ``last.weight``,
    ``last.bias``) approximating a convolution with `weight` and `bias`; plus the relative error.

    A Conv weight is (C_out, C_in, *k); a ConvTranspose weight is (C_in, C_out, *k), so the roles
    of the two channel modes swap.
    """
    r_in, r_out = ranks
    ones = (1,) * (weight.ndim - 2)
    if statistics is not None and statistics.usable():
        fit = calibrated_tucker2(
            weight.transpose(0, 1) if spec.transposed else weight, r_in, r_out, statistics.whitening(),
            statistics.input_mean, positions_per_output=1 / math.prod(spec.stride) if spec.transposed else 1.0,
        )
        state = {
            "first.weight": fit.first.reshape(r_in, -1, *ones),
            "core.weight": fit.core.transpose(0, 1).contiguous() if spec.transposed else fit.core,
            "last.weight": fit.last.reshape(-1, r_out, *ones),
        }
        if bias is not None:
            state["last.bias"] = bias.detach() + fit.bias_shift
        return state, fit.relative_error
    if spec.transposed:
        t = tucker2(weight, r_in, r_out, hooi_iterations)
        u_in, u_out = t.factor0, t.factor1
    else:
        t = tucker2(weight, r_out, r_in, hooi_iterations)
        u_out, u_in = t.factor0, t.factor1
    state = {
        "first.weight": u_in.T.reshape(u_in.shape[1], u_in.shape[0], *ones).contiguous(),
        "core.weight": t.core,
        "last.weight": u_out.reshape(*u_out.shape, *ones).contiguous(),
    }
    if bias is not None:
        state["last.bias"] = bias.detach().clone()
    return state, t.relative_error


def refittable(conv: _ConvNd) -> bool:
    """Whether `refit_conv_weights` applies: zero padding and no groups; a transposed convolution
    only when its kernel offsets tile the output (kernel = stride, no padding), as in nnU-Net."""
    if conv.groups != 1 or conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
        return False
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return (tuple(conv.kernel_size) == tuple(conv.stride) and not any(conv.padding)
                and not any(conv.output_padding) and all(d == 1 for d in conv.dilation))
    return True


def refit_positions_needed(state: dict[str, torch.Tensor], spec: ConvSpec, core: bool = True) -> int:
    """Calibration positions `refit_conv_weights` needs to refit `state` (of `decompose_conv_weights`):
    `REFIT_SAMPLES_PER_FEATURE` per feature, of the core (kernel offset × input rank) or, if not
    `core`, of the last factor alone (output rank); with fewer it would overfit."""
    if not core:
        return REFIT_SAMPLES_PER_FEATURE * state["last.weight"].shape[1]
    return REFIT_SAMPLES_PER_FEATURE * math.prod(spec.kernel_size) * state["first.weight"].shape[0]


def refit_conv_weights(
    state: dict[str, torch.Tensor], weight: torch.Tensor, spec: ConvSpec, responses: ResponseStatistics,
    output_fisher: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], float] | None:
    """`state` (of `decompose_conv_weights`) with core and last factor refitted on calibration
    `responses` for its first factor (`refit_core_and_last`), or with too few positions for the core
    the last factor alone (`refit_last`), and the bias set to keep the mean output; plus the new
    relative weight error. None if there are too few positions for either."""
    first = state["first.weight"].flatten(1).double()
    r_in, r_out = first.shape[0], state["last.weight"].shape[1]
    if responses.samples >= refit_positions_needed(state, spec):
        core, last = refit_core_and_last(responses.feature_cov, responses.cross_cov, output_fisher, r_out, r_in,
                                         spec.kernel_size)
    elif responses.samples >= refit_positions_needed(state, spec, core=False):
        core = state["core.weight"].double()
        core = core.transpose(0, 1) if spec.transposed else core
        last = refit_last(responses.feature_cov, responses.cross_cov, core)
    else:
        return None
    dtype, ones = weight.dtype, (1,) * len(spec.kernel_size)
    refitted = dict(state)
    refitted["core.weight"] = (core.transpose(0, 1) if spec.transposed else core).to(dtype).contiguous()
    refitted["last.weight"] = last.reshape(-1, r_out, *ones).to(dtype).contiguous()
    if "last.bias" in state:
        mean_out = last @ (core_by_offset(core) @ responses.feature_mean.double())
        refitted["last.bias"] = (responses.output_mean.double() - mean_out).to(dtype)
    flat = (weight.transpose(0, 1) if spec.transposed else weight).detach().double().flatten(2)
    approx = torch.einsum("or,rsk,si->oik", last, core.flatten(2), first)
    return refitted, float((flat - approx).norm() / flat.norm()) if flat.norm() > 0 else 0.0
