"""The decomposed convolution: 1x1 (C_in→R_in) → core (R_in→R_out, original kernel) → 1x1 (R_out→C_out).

On CPUs, a 1x1 convolution of a channels-first volume runs 3-4x slower than the same product as a
matrix multiplication, and small-channel 3D convolutions run ~1.6x faster channels-last. So the
1x1 stages run as GEMMs that read channels-first input and hand the core a channels-last tensor
(and back) without copies; results equal the plain three convolutions up to float rounding.
`PointwiseConv` applies the same to 1x1 convolutions that are kept (segmentation heads).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .decomposition import REFIT_SAMPLES_PER_FEATURE, ConvSpec, calibrated_tucker2, refit_core_and_last, tucker2
from .statistics import ChannelStatistics, ResponseStatistics

_POINTWISE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


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
        self.spec = conv_spec(conv)
        self.__dict__["_norm"] = None  # a FusedInstanceNorm after it (a reference, not a submodule)

    def fuse_norm(self, norm: FusedInstanceNorm) -> None:
        """Normalise in the last GEMM (inference): the instance norm after this layer is `norm`."""
        self.__dict__["_norm"] = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        core = self.core(_channels_last_gemm(x, self.first.weight))
        norm = self.__dict__["_norm"]
        # (on the meta device, MAC counting: statistics, like the instance norm's, are not counted)
        if norm is not None and not self.training and core.device.type != "meta":
            return _normalizing_gemm(core, self.last.weight, norm)
        return _channels_first_gemm(core, self.last.weight, self.last.bias)

    def extra_repr(self) -> str:
        return f"ranks=(in={self.in_rank}, out={self.out_rank})"


def _positions_by_channels(x: torch.Tensor) -> torch.Tensor:
    """One sample (C, *spatial) as a (V, C) matrix; a view for channels-first and channels-last memory."""
    return x.movedim(0, -1).reshape(-1, x.shape[0])


# 2D `torch.mm` per sample: batched `matmul` on transposed operands is ~6x slower on CPU.
def _per_sample(products: list[torch.Tensor]) -> torch.Tensor:
    return products[0].unsqueeze(0) if len(products) == 1 else torch.stack(products)


def _channels_last_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1x1 convolution (no bias) of `x` (n, C, *spatial) with `weight` (R, C, 1...); channels-last result."""
    w = weight.flatten(1).t()
    out = _per_sample([torch.mm(_positions_by_channels(sample), w) for sample in x])  # (n, V, R)
    return out.view(x.shape[0], *x.shape[2:], w.shape[1]).movedim(-1, 1)


def _channels_first_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """1x1 convolution of `x` (n, R, *spatial) with `weight` (C, R, 1...) and `bias`; channels-first result."""
    w = weight.flatten(1)
    out = _per_sample([torch.mm(w, _positions_by_channels(sample).t()) for sample in x])  # (n, C, V)
    if bias is not None:
        out.add_(bias[:, None])
    return out.view(x.shape[0], w.shape[0], *x.shape[2:])


def _normalizing_gemm(x: torch.Tensor, weight: torch.Tensor, norm: FusedInstanceNorm) -> torch.Tensor:
    """InstanceNorm(1x1 conv of `x`) as one GEMM. The per-sample mean and variance of each output
    channel follow from the mean and covariance of the R rank channels of `x`, so the C output
    channels are never read twice; scale and shift fold into the weights. Any conv bias cancels."""
    w = weight.flatten(1).double()
    products = []
    for sample in x:
        positions = _positions_by_channels(sample)  # (V, R)
        with torch.autocast(positions.device.type, enabled=False):  # statistics in fp32 at least
            as_float = positions.float()
            mean = as_float.mean(dim=0).double()
            covariance = torch.mm(as_float.t(), as_float).double() / positions.shape[0] - torch.outer(mean, mean)
            variance = ((w @ covariance) * w).sum(dim=1).clamp_min(0)
            scale = torch.rsqrt(variance + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight.double()
            scaled = w * scale[:, None]
            shift = -(scaled @ mean)
            if norm.bias is not None:
                shift = shift + norm.bias.double()
        y = torch.mm(scaled.to(positions.dtype), positions.t())
        products.append(y.add_(shift.to(y.dtype)[:, None]))
    return _per_sample(products).view(x.shape[0], -1, *x.shape[2:])


class FusedInstanceNorm(nn.Module):
    """An instance norm whose work the `TuckerConv` before it does at inference (identity then);
    same parameters and state-dict keys; normalises itself in training mode."""

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

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
        self.spec = conv_spec(conv)

    @staticmethod
    def applies_to(conv: _ConvNd) -> bool:
        return (not conv.transposed and conv.groups == 1 and conv.padding_mode == "zeros"
                and all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
                and all(p == 0 for p in conv.padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channels_first_gemm(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.spec.in_channels}, {self.spec.out_channels}, GEMM"


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


def refit_positions_needed(state: dict[str, torch.Tensor], spec: ConvSpec) -> int:
    """Calibration positions `refit_conv_weights` needs to refit `state` (of `decompose_conv_weights`):
    `REFIT_SAMPLES_PER_FEATURE` per feature (kernel offset × input rank); with fewer it would overfit."""
    return REFIT_SAMPLES_PER_FEATURE * math.prod(spec.kernel_size) * state["first.weight"].shape[0]


def refit_conv_weights(
    state: dict[str, torch.Tensor], weight: torch.Tensor, spec: ConvSpec, responses: ResponseStatistics,
    output_fisher: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], float] | None:
    """`state` (of `decompose_conv_weights`) with core and last factor refitted on calibration
    `responses` for its first factor (`refit_core_and_last`) and the bias set to keep the mean
    output; plus the new relative weight error. None if there are too few positions to fit on."""
    first = state["first.weight"].flatten(1).double()
    r_in, r_out = first.shape[0], state["last.weight"].shape[1]
    if responses.samples < refit_positions_needed(state, spec):
        return None
    core, last = refit_core_and_last(responses.feature_cov, responses.cross_cov, output_fisher, r_out, r_in,
                                     spec.kernel_size)
    dtype, ones = weight.dtype, (1,) * len(spec.kernel_size)
    refitted = dict(state)
    refitted["core.weight"] = (core.transpose(0, 1) if spec.transposed else core).to(dtype).contiguous()
    refitted["last.weight"] = last.reshape(-1, r_out, *ones).to(dtype).contiguous()
    if "last.bias" in state:
        by_offset = core.flatten(2).transpose(1, 2).flatten(1)  # (R_out, K·R_in), offsets major like f
        mean_out = last @ (by_offset @ responses.feature_mean.double())
        refitted["last.bias"] = (responses.output_mean.double() - mean_out).to(dtype)
    flat = (weight.transpose(0, 1) if spec.transposed else weight).detach().double().flatten(2)
    approx = torch.einsum("or,rsk,si->oik", last, core.flatten(2), first)
    return refitted, float((flat - approx).norm() / flat.norm()) if flat.norm() > 0 else 0.0
