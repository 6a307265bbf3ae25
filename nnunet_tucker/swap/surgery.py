"""Step 4, swap: module surgery. Every planned convolution of a network becomes a `TuckerConv` (under all of
its names), kept 1x1 convolutions `PointwiseConv`s, and the network's blocks take their inference forms (`forms`)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..layers import (
    _POINTWISE,
    FusedInstanceNorm,
    PointwiseConv,
    TuckerConv,
)
from ..plan import LayerPlan, instance_norms_after, unwrap
from ..plan.ranks import conv_spec
from . import forms


def swap_modules(network: nn.Module, plan: Iterable[LayerPlan]) -> None:
    """Replace every planned convolution, under all of its names, by an (untrained) `TuckerConv`;
    kept 1x1 convolutions become `PointwiseConv` (same weights, computed as a GEMM), an instance
    norm right after a decomposed layer becomes a `FusedInstanceNorm` done in that layer's last GEMM,
    U-Net decoders hand decomposed stages their skips unconcatenated (`read_skips_in_place`), and stacked
    decomposed blocks and those of residual blocks hand each other their rank-space maps (`chain_blocks`)."""
    network = unwrap(network)
    norms = instance_norms_after(network)
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
    forms.read_skips_in_place(network)
    forms.chain_blocks(network)


class _PlainTuckerConv(TuckerConv):
    """A `TuckerConv` as its three plain convolutions, for graph compilers that fuse them themselves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


def plain_modules(network: nn.Module) -> nn.Module:
    """A copy of a compressed `network` in plain PyTorch modules, computing the same function: each `TuckerConv`
    its three convolutions, fused instance norms and GEMM-form 1x1 convolutions their own modules again, the
    blocks their original classes (`forms` undone). Shares the weights; in eval mode. What a graph compiler
    (`backend`) traces."""
    network = unwrap(network)
    network = copy.deepcopy(network, {id(t): t for t in (*network.parameters(), *network.buffers())})
    for module in list(network.modules()):
        if isinstance(module, TuckerConv):
            module.__class__ = _PlainTuckerConv
        elif type(module) in forms.ORIGINAL_CLASSES:
            module.__class__ = forms.ORIGINAL_CLASSES[type(module)]
        for child_name, child in list(module._modules.items()):
            if isinstance(child, FusedInstanceNorm):
                module._modules[child_name] = _plain_norm(child)
            elif isinstance(child, PointwiseConv):
                module._modules[child_name] = _plain_pointwise(child)
    return network.eval()


def _plain_norm(fused: FusedInstanceNorm) -> nn.Module:
    norm = fused.original_class(fused.weight.shape[0], eps=fused.eps, affine=True)
    norm.weight, norm.bias = fused.weight, fused.bias
    return norm


def _plain_pointwise(pointwise: PointwiseConv) -> nn.Module:
    conv = _POINTWISE[pointwise.weight.ndim - 2](*pointwise.channels, 1, bias=pointwise.bias is not None)
    conv.weight, conv.bias = pointwise.weight, pointwise.bias
    return conv
