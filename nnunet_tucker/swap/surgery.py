"""Step 4, swap: module surgery. Every planned convolution of a network becomes a `TuckerConv` (under all of
its names), kept 1x1 convolutions `PointwiseConv`s, and the network's blocks take their inference forms (`forms`)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..layers import (
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
