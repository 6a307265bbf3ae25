"""The decomposed convolution: 1x1 (C_in→R_in) → core (R_in→R_out, original kernel) → 1x1 (R_out→C_out)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .decomposition import ConvSpec, tucker2

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def extra_repr(self) -> str:
        return f"ranks=(in={self.in_rank}, out={self.out_rank})"


def decompose_conv_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: ConvSpec,
    ranks: tuple[int, int],
    hooi_iterations: int = 0,
) -> tuple[dict[str, torch.Tensor], float]:
    """The state dict of a `TuckerConv` (keys ``first.weight``, ``core.weight``, ``last.weight``,
    ``last.bias``) approximating a convolution with `weight` and `bias`; plus the relative error.

    A Conv weight is (C_out, C_in, *k); a ConvTranspose weight is (C_in, C_out, *k), so the roles
    of the two channel modes swap.
    """
    r_in, r_out = ranks
    ones = (1,) * (weight.ndim - 2)
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
