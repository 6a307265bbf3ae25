"""Step 4, swap: the inference forms of nnU-Net's blocks around decomposed layers. A U-Net decoder hands decomposed
stages their skips unconcatenated (`SkipReadingDecoder`), stacked decomposed blocks hand each other rank-space maps
(`ChainedConvBlocks`), and so do a residual block's two, the second adding the skip in its output pass
(`ChainedResidualBlock`). Each is the original class with another `forward` (the module's `__class__` is swapped):
same parameters and state-dict keys, and the original computation in training, with hooks, or off the CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from ..layers import (
    ELEMENTWISE,
    Concatenated,
    Factored,
    TuckerConv,
    normalized_activated,
    normalized_activated_gemm,
)
from ..plan import unwrap


def read_skips_in_place(network: nn.Module) -> None:
    """Let each U-Net decoder (dynamic_network_architectures' `UNetDecoder`) hand a stage whose first layer
    is decomposed its upsampled input and skip as `Concatenated` parts at inference, instead of
    concatenating them: the layer's first GEMM reads both. Same parameters and state-dict keys; in
    training, for a hooked layer and for any other decoder, the concatenation is made as before."""
    for module in unwrap(network).modules():
        if type(module) is UNetDecoder:
            module.__class__ = SkipReadingDecoder


class SkipReadingDecoder(UNetDecoder):
    """`UNetDecoder` whose decomposed stages read upsampled input and skip without a concatenation; a
    decomposed upsampling hands them its core's output, whose last factor they fold into their first GEMM."""

    def forward(self, skips):
        lres_input = skips[-1]
        seg_outputs = []
        for s in range(len(self.stages)):
            stage, up, skip = self.stages[s], self.transpconvs[s], skips[-(s + 2)]
            if not self._reads_parts(stage):
                x = stage(torch.cat((up(lres_input), skip), 1))
            elif _factors_out(up, lres_input):  # the stage's first GEMM folds in the upsampling's last factor
                upsampled = Factored(up.core_output(up.to_rank_space(lres_input)), up.last.weight, up.last.bias)
                x = stage(Concatenated((upsampled, skip)))
            else:
                x = stage(Concatenated((up(lres_input), skip)))
            if self.deep_supervision:
                seg_outputs.append(self.seg_layers[s](x))
            elif s == (len(self.stages) - 1):
                seg_outputs.append(self.seg_layers[-1](x))
            lres_input = x
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if self.deep_supervision else seg_outputs[0]

    def _reads_parts(self, stage: nn.Module) -> bool:
        """Whether the module that receives `stage`'s input (StackedConvBlocks -> ConvDropoutNormReLU ->
        its first module) is an unhooked `TuckerConv`, at inference."""
        try:
            first = stage.convs[0].all_modules[0]
        except (AttributeError, IndexError, TypeError):
            return False
        return (not self.training and not torch.is_grad_enabled() and isinstance(first, TuckerConv)
                and _unhooked(first))


def chain_blocks(network: nn.Module) -> None:
    """Let each stack of conv blocks (dynamic_network_architectures' `StackedConvBlocks`) and each residual
    block (`BasicBlockD`) run decomposed blocks as `ChainedConvBlocks` and `ChainedResidualBlock` do on the
    CPU at inference. Same parameters and state-dict keys."""
    forms = {StackedConvBlocks: ChainedConvBlocks, BasicBlockD: ChainedResidualBlock}
    for module in unwrap(network).modules():
        if type(module) in forms:
            module.__class__ = forms[type(module)]


def _inference_on_cpu(module: nn.Module, x) -> bool:
    return (not module.training and not torch.is_grad_enabled() and isinstance(x, (torch.Tensor, Concatenated))
            and _device(x).type == "cpu")


class ChainedConvBlocks(StackedConvBlocks):
    """`StackedConvBlocks` in which a decomposed block (conv, fused instance norm, elementwise
    activation) followed by another decomposed block hands it the rank-space input of its core
    directly (`normalized_activated_gemm`), without writing the full-width map between them, and
    the last such block normalises and activates its output a chunk at a time (`normalized_activated`).
    On the CPU at inference, with no hooks on the modules involved; else as `StackedConvBlocks`."""

    def forward(self, x):
        return _chained(list(self.convs), x) if _inference_on_cpu(self, x) else self.convs(x)


class ChainedResidualBlock(BasicBlockD):
    """`BasicBlockD` (conv1 → norm → activation, conv2 → norm, + skip, activation) whose decomposed conv1 hands
    conv2 its rank-space input (as `ChainedConvBlocks`) and whose decomposed conv2 adds the skip (identity,
    or pooled 1x1 projection + norm, computed first) and activates in its output pass, a chunk at a time
    (`normalized_activated`). On the CPU at inference, without stochastic depth or squeeze-excitation and
    with no hooks on the modules involved; else as `BasicBlockD`."""

    def forward(self, x):
        if (not _inference_on_cpu(self, x) or not isinstance(x, torch.Tensor) or self.apply_stochastic_depth
                or self.apply_se):
            return super().forward(x)
        return _chained([self.conv1, self.conv2], x, self.skip(x), self.nonlin2)


def _chained(blocks: list[nn.Module], x, residual: torch.Tensor | None = None,
             end: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """`blocks` run in turn, a decomposed block handing a following decomposed one its rank-space map; with
    `residual`, `end`(their output + `residual`), added and activated in the last block's output pass where
    that block is (decomposed conv, fused norm) and `end` an unhooked elementwise activation."""
    rank_input = None  # what the block's first GEMM would make of its input, when the block before made it
    for block, following in zip(blocks, [*blocks[1:], None], strict=True):
        tail = end if following is None and residual is not None else None
        activation = _fused_activation(block, tail)
        if activation is not None:
            conv = block.all_modules[0]
            core = conv.core_output(conv.to_rank_space(x) if rank_input is None else rank_input)
            if _starts_decomposed(following):
                rank_input = normalized_activated_gemm(core, conv.last.weight, conv.norm, activation,
                                                       following.all_modules[0].first.weight)
                continue
            if activation is tail:  # the residual block's sum and activation, done
                return normalized_activated(core, conv.last.weight, conv.norm, activation, residual)
            x = normalized_activated(core, conv.last.weight, conv.norm, activation)
        elif rank_input is not None:  # a decomposed block that takes its input in rank space, not fused
            x = block.all_modules[1:](block.all_modules[0].from_rank_space(rank_input))
        else:
            x = block(x)
        rank_input = None
    if residual is not None:
        x += residual
        x = end(x)
    return x


def _device(x: torch.Tensor | Concatenated) -> torch.device:
    return (x[0] if isinstance(x, Concatenated) else x).device


def _fused_activation(block: nn.Module, end: nn.Module | None = None) -> nn.Module | None:
    """The activation that `block`'s decomposed conv applies in its output pass: the block's own if it is
    (decomposed conv, its fused norm, elementwise activation), `end` if it is (decomposed conv, its fused norm)
    and `end` is elementwise; none of them hooked. Else None."""
    if type(block) is not ConvDropoutNormReLU:
        return None
    modules = list(block.all_modules)
    activation = modules[2] if len(modules) == 3 else end if len(modules) == 2 else None
    return activation if (type(activation) in ELEMENTWISE and isinstance(modules[0], TuckerConv)
                          and modules[0].norm is modules[1]
                          and _unhooked(block, block.all_modules, *modules, activation)) else None


def _starts_decomposed(block: nn.Module | None) -> bool:
    """Whether `block` starts with a decomposed conv, neither hooked."""
    return (type(block) is ConvDropoutNormReLU and isinstance(block.all_modules[0], TuckerConv)
            and _unhooked(block, block.all_modules, block.all_modules[0]))


def _factors_out(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv` is an unhooked `TuckerConv` with no norm fused, at inference on real tensors (on
    the meta device, for MAC counting, layers run as they are)."""
    return (isinstance(conv, TuckerConv) and conv.norm is None and not conv.training and x.device.type != "meta"
            and _unhooked(*conv.modules()))


def _unhooked(*modules: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


# each form -> the class it was made from (`surgery.plain_modules` undoes them)
ORIGINAL_CLASSES = {SkipReadingDecoder: UNetDecoder, ChainedConvBlocks: StackedConvBlocks,
                    ChainedResidualBlock: BasicBlockD}
