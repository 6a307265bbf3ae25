"""The decomposed convolution: 1x1 (C_in→R_in) → core (R_in→R_out, original kernel) → 1x1 (R_out→C_out).

On CPUs, a 1x1 convolution of a channels-first volume runs slower than the same product as a
matrix multiplication, and small-channel 3D convolutions run faster channels-last. So the
1x1 stages run as GEMMs that read channels-first input and hand the core a channels-last tensor
(and back) without copies; results equal the plain three convolutions up to float rounding.
`PointwiseConv` applies the same to 1x1 convolutions that are kept (segmentation heads).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

_POINTWISE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class TuckerConv(nn.Module):
    """A convolution replaced by three: `first` 1x1 C_in→R_in (no bias), `core` R_in→R_out with the
    original kernel, stride, padding, dilation (and output padding if transposed; no bias), and
    `last` 1x1 R_out→C_out carrying the original bias. Built empty; weights come from a state dict.
    """

    def __init__(self, conv: _ConvNd, in_rank: int, out_rank: int) -> None:
        super().__init__()
        dims = conv.weight.ndim - 2
        pointwise = _POINTWISE[dims]
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.in_rank, self.out_rank = in_rank, out_rank
        self.first = pointwise(conv.in_channels, in_rank, 1, bias=False, **factory)
        core_kwargs = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "bias": False,
            "padding_mode": conv.padding_mode,
        }
        if conv.transposed:
            core_kwargs["output_padding"] = conv.output_padding
        self.core = type(conv)(in_rank, out_rank, conv.kernel_size, **core_kwargs, **factory)
        self.last = pointwise(out_rank, conv.out_channels, 1, bias=conv.bias is not None, **factory)
        self.__dict__["_norm"] = None  # a FusedInstanceNorm after it (a reference, not a submodule)

    def fuse_norm(self, norm: FusedInstanceNorm) -> None:
        """Normalise in the last GEMM (inference): the instance norm after this layer is `norm`."""
        self.__dict__["_norm"] = norm

    @property
    def norm(self) -> FusedInstanceNorm | None:
        return self.__dict__["_norm"]

    def forward(self, x: torch.Tensor | Concatenated) -> torch.Tensor:
        return self.from_rank_space(self.to_rank_space(x))

    def to_rank_space(self, x: torch.Tensor | Concatenated) -> torch.Tensor:
        """The first GEMM (channels-last result)."""
        return _channels_last_gemm(x, self.first.weight)

    def core_output(self, z: torch.Tensor) -> torch.Tensor:
        """The core applied to what the first GEMM made of the input (channels-last)."""
        return _core_conv(self.core, z)

    def from_rank_space(self, z: torch.Tensor) -> torch.Tensor:
        """The layer's output from what its first GEMM made of the input (channels-last)."""
        core = self.core_output(z)
        norm = self.norm
        # (on the meta device, MAC counting: statistics, like the instance norm's, are not counted)
        if norm is not None and not self.training and core.device.type != "meta":
            return _normalizing_gemm(core, self.last.weight, norm)
        return _channels_first_gemm(core, self.last.weight, self.last.bias)

    def extra_repr(self) -> str:
        return f"ranks=(in={self.in_rank}, out={self.out_rank})"


def _core_conv(core: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """`core`(z); a 3D convolution at inference on the CPU in float32 through oneDNN directly: PyTorch
    sends 3D inputs whose N·C·D·H is at most 20480 (one channel at full resolution, many channels at low
    resolution) to its native convolution, which is slower there."""
    if (type(core) is nn.Conv3d and z.device.type == "cpu" and z.dtype == torch.float32 and not core.training
            and not torch.is_grad_enabled() and core.padding_mode == "zeros" and isinstance(core.padding, tuple)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and not core._forward_hooks and not core._forward_pre_hooks):
        return torch.ops.aten.mkldnn_convolution(z, core.weight, core.bias, core.padding, core.stride, core.dilation,
                                                 core.groups)
    return core(z)


def _positions_by_channels(x: torch.Tensor) -> torch.Tensor:
    """One sample (C, *spatial) as a (V, C) matrix; a view for channels-first and channels-last memory."""
    return x.movedim(0, -1).reshape(-1, x.shape[0])


# 2D `torch.mm` per sample: batched `matmul` on transposed operands is much slower on CPU.
def _per_sample(products: list[torch.Tensor]) -> torch.Tensor:
    return products[0].unsqueeze(0) if len(products) == 1 else torch.stack(products)


class Concatenated(tuple):
    """Tensors (n, C_i, *spatial) that stand for their concatenation along the channels, never made: a
    `TuckerConv` reads the parts in its first GEMM (one product per part, summed in place), which saves
    writing and reading back the full-width concatenation (a U-Net decoder's skip + upsampled input)."""

    @property
    def shape(self) -> torch.Size:
        first = self[0].shape
        return torch.Size((first[0], sum(part.shape[1] for part in self), *first[2:]))


class Factored(NamedTuple):
    """The output of a `TuckerConv` without a norm, not made: its core's output `rank_map` (n, R, *spatial)
    and its last factor (`weight` (C, R, 1...), `bias`). The `TuckerConv` that reads it (as a part of a
    `Concatenated`) folds that factor into its own first GEMM, which then reads R channels, not C."""

    rank_map: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rank_map.shape[0], self.weight.shape[0], *self.rank_map.shape[2:]))

    @property
    def device(self) -> torch.device:
        return self.rank_map.device


def _channels_last_gemm(x: torch.Tensor | Concatenated, weight: torch.Tensor) -> torch.Tensor:
    """1x1 convolution (no bias) of `x` (n, C, *spatial) with `weight` (R, C, 1...); channels-last result."""
    w = weight.flatten(1).t()
    parts = x if isinstance(x, Concatenated) else (x,)
    inputs, weights, shift = [], [], None  # a Factored part's last factor folded in: (h·Lᵀ + b)·W = h·(LᵀW) + b·W
    for part, part_weight in zip(parts, w.split([part.shape[1] for part in parts]), strict=True):
        if isinstance(part, Factored):
            if part.bias is not None:
                shift = part.bias @ part_weight if shift is None else shift + part.bias @ part_weight
            part, part_weight = part.rank_map, part.weight.flatten(1).t() @ part_weight
        inputs.append(part)
        weights.append(part_weight)
    products = []
    for n in range(x.shape[0]):
        out = torch.mm(_positions_by_channels(inputs[0][n]), weights[0])
        for part, part_weight in zip(inputs[1:], weights[1:], strict=True):
            # autocast skips out= ops: cast the operands to what it made of the first product (fp16 on CUDA)
            positions, part_weight = _positions_by_channels(part[n]).to(out.dtype), part_weight.to(out.dtype)
            torch.addmm(out, positions, part_weight, out=out)  # (counted as a GEMM)
        products.append(out if shift is None else out.add_(shift.to(out.dtype)))
    out = _per_sample(products)  # (n, V, R)
    return out.view(x.shape[0], *x.shape[2:], w.shape[1]).movedim(-1, 1)


def _channels_first_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """1x1 convolution of `x` (n, R, *spatial) with `weight` (C, R, 1...) and `bias`; channels-first result."""
    w = weight.flatten(1)
    if bias is None:
        products = [torch.mm(w, _positions_by_channels(sample).t()) for sample in x]
    else:  # the bias as the product's start: one pass less over the output than adding it after
        products = [torch.addmm(bias[:, None], w, _positions_by_channels(sample).t()) for sample in x]
    return _per_sample(products).view(x.shape[0], w.shape[0], *x.shape[2:])  # (n, C, *spatial)


def _normalization(positions: torch.Tensor, weight: torch.Tensor, norm: FusedInstanceNorm
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """InstanceNorm(1x1 conv of one sample's `positions` (V, R)) as weights and shift: the mean and
    variance of each output channel follow from the mean and covariance of the R rank channels, so
    the C output channels are never read twice. `weight` (C, R) float64; results in its dtype."""
    with torch.autocast(positions.device.type, enabled=False):  # statistics in fp32 at least
        as_float = positions.float()
        mean = _column_sums(as_float).double() / positions.shape[0]
        covariance = torch.mm(as_float.t(), as_float).double() / positions.shape[0] - torch.outer(mean, mean)
        variance = ((weight @ covariance) * weight).sum(dim=1).clamp_min(0)
        scale = torch.rsqrt(variance + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        scaled = weight * scale[:, None]
        shift = -(scaled @ mean)
        if norm.bias is not None:
            shift = shift + norm.bias.double()
    return scaled, shift


_FOLD = 16  # positions per row in `_column_sums`


def _column_sums(positions: torch.Tensor) -> torch.Tensor:
    """`positions` (V, R) summed over V. A row-major (V, R) summed as rows of 16·R values, then folded: CPUs
    reduce rows of 12 or 20 values much more slowly than rows that fill their vector registers."""
    if not positions.is_contiguous():
        return positions.sum(dim=0)
    whole = positions.shape[0] - positions.shape[0] % _FOLD
    folded = positions[:whole].reshape(-1, _FOLD * positions.shape[1]).sum(dim=0)
    return folded.view(_FOLD, -1).sum(dim=0) + positions[whole:].sum(dim=0)


def _normalizing_gemm(x: torch.Tensor, weight: torch.Tensor, norm: FusedInstanceNorm) -> torch.Tensor:
    """InstanceNorm(1x1 conv of `x`) as one GEMM (`_normalization`); channels-first. Any conv bias cancels."""
    w = weight.flatten(1).double()
    products = []
    for sample in x:
        positions = _positions_by_channels(sample)  # (V, R)
        scaled, shift = _normalization(positions, w, norm)
        y = torch.mm(scaled.to(positions.dtype), positions.t())
        products.append(y.add_(shift.to(y.dtype)[:, None]))
    return _per_sample(products).view(x.shape[0], -1, *x.shape[2:])


def normalized_activated(x: torch.Tensor, weight: torch.Tensor, norm: FusedInstanceNorm,
                         activation: nn.Module, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`activation`(InstanceNorm(1x1 conv of `x` (n, R, *spatial) with `weight` (C, R, 1...)) + `residual`),
    channels-first, a chunk of positions at a time: the shift (plus the `residual` (n, C, *spatial), any memory
    layout: a residual block's skip) is the product's start and the activation acts on each chunk while it is
    in cache (on CPUs faster than a product, then a pass for each). `activation` must act on each value alone."""
    w = weight.flatten(1).double()
    products = []
    for n, sample in enumerate(x):
        positions = _positions_by_channels(sample)  # (V, R)
        skip = None if residual is None else _positions_by_channels(residual[n]).t()  # (C, V), a view
        scaled, shift = _normalization(positions, w, norm)
        scaled, shift = scaled.to(positions.dtype), shift.to(positions.dtype)[:, None]
        out = positions.new_empty(w.shape[0], positions.shape[0])  # out= products: the operands' dtype
        for start in range(0, positions.shape[0], OUTPUT_CHUNK):
            rows = slice(start, start + OUTPUT_CHUNK)
            if skip is None:
                chunk = torch.addmm(shift, scaled, positions[rows].t(), out=out[:, rows])
            else:  # the skip plus the shift as the product's start: a pass less than adding it after
                chunk = torch.add(skip[:, rows], shift, out=out[:, rows]).addmm_(scaled, positions[rows].t())
            activated = activation(chunk)
            if activated is not chunk:  # an activation that is not in place
                chunk.copy_(activated)
        products.append(out)
    return _per_sample(products).view(x.shape[0], -1, *x.shape[2:])


ELEMENTWISE = (nn.LeakyReLU, nn.ReLU, nn.ELU, nn.GELU, nn.SiLU)  # activations that may act a chunk at a time
FUSED_CHUNK = 8192  # positions per step of `normalized_activated_gemm`: its rows of C channels stay in cache
OUTPUT_CHUNK = 32768  # positions per step of `normalized_activated` (its chunks are rows of a channels-first map)


def normalized_activated_gemm(x: torch.Tensor, weight: torch.Tensor, norm: FusedInstanceNorm,
                              activation: nn.Module, next_weight: torch.Tensor) -> torch.Tensor:
    """The first GEMM of the next `TuckerConv` (`next_weight` (R', C, 1...)) applied to
    `activation`(InstanceNorm(1x1 conv of `x` (n, R, *spatial) with `weight` (C, R, 1...))), a
    chunk of positions at a time, so that the C-channel map between them is never written out and
    read back (the costliest pass at full resolution on CPUs); channels-last result (n, R', *spatial), as
    `_channels_last_gemm` gives. `activation` must act on each value alone."""
    w, following = weight.flatten(1).double(), next_weight.flatten(1).t()
    products = []
    for sample in x:
        positions = _positions_by_channels(sample)  # (V, R)
        scaled, shift = _normalization(positions, w, norm)
        scaled, shift = scaled.t().to(positions.dtype).contiguous(), shift.to(positions.dtype)
        out = None
        for start in range(0, positions.shape[0], FUSED_CHUNK):
            rows = slice(start, start + FUSED_CHUNK)
            y = activation(torch.addmm(shift, positions[rows], scaled))
            if out is None:  # in the dtype autocast gives y, which it does not give out= products
                out, following = y.new_empty(positions.shape[0], following.shape[1]), following.to(y.dtype)
            torch.mm(y, following, out=out[rows])
        products.append(out)
    return _per_sample(products).view(x.shape[0], *x.shape[2:], following.shape[1]).movedim(-1, 1)


class FusedInstanceNorm(nn.Module):
    """An instance norm whose work the `TuckerConv` before it does at inference (identity then);
    same parameters and state-dict keys; normalises itself in training mode."""

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.original_class = type(norm)  # what `swap.surgery.plain_modules` makes of it again

    @staticmethod
    def applies_to(norm: nn.Module) -> bool:
        return isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


class PointwiseConv(nn.Module):
    """A kept 1x1 convolution (stride 1, no groups) computed as a GEMM; same parameters and state-dict keys."""

    def __init__(self, conv: _ConvNd) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.channels = (conv.in_channels, conv.out_channels)

    @staticmethod
    def applies_to(conv: _ConvNd) -> bool:
        return (not conv.transposed and conv.groups == 1 and conv.padding_mode == "zeros"
                and all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
                and all(p == 0 for p in conv.padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channels_first_gemm(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.channels[0]}, {self.channels[1]}, GEMM"
