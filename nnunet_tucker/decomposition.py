"""Decomposition math: Tucker-2 of a convolution weight and the rank policies. Tensors in, tensors out.

A weight W of shape (A, B, k1, ..., kd) is approximated on its two channel modes,

    W ≈ G ×₀ U₀ ×₁ U₁,    G: (R₀, R₁, k1, ..., kd),  U₀: (A, R₀),  U₁: (B, R₁),

with orthonormal factors from the HOSVD (leading left singular vectors of each mode's
unfolding), optionally refined by HOOI iterations. The spatial modes stay full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker


@dataclass(frozen=True)
class Tucker2:
    """Result of `tucker2`: core G, factors U₀ and U₁, and ‖W − Ŵ‖ / ‖W‖."""

    core: torch.Tensor
    factor0: torch.Tensor
    factor1: torch.Tensor
    relative_error: float


def feasible_ranks(shape: tuple[int, ...], rank0: int, rank1: int) -> tuple[int, int]:
    """Clamp (R₀, R₁) to what the unfoldings of a tensor of `shape` can carry.

    R₀ ≤ min(A, R₁·K) and R₁ ≤ min(B, R₀·K) with K the number of spatial positions; larger
    ranks would only add zero directions (this matters for 1x1 kernels).
    """
    a, b = shape[0], shape[1]
    k = math.prod(shape[2:])
    rank0 = min(rank0, a, b * k)
    rank1 = min(rank1, b, a * k)
    rank0 = min(rank0, rank1 * k)
    rank1 = min(rank1, rank0 * k)
    return rank0, rank1


def _gram_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **_: object):
    """Truncated SVD through the eigendecomposition of the smaller Gram matrix.

    Unfoldings of conv weights are wide (C × C'·k); the C × C Gram matrix is far cheaper to
    decompose than the unfolding itself. tensorly's own 'symeig_svd' takes the larger Gram
    matrix for wide inputs, so it is used only through this callable.
    """
    transpose = matrix.shape[0] > matrix.shape[1]
    m = matrix.T if transpose else matrix
    gram = m @ m.T
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's eigh on a few hundred rows: 100x slower with threads on a busy CPU
    try:
        eigenvalues, u = torch.linalg.eigh(gram)
    finally:
        torch.set_num_threads(threads)
    eigenvalues, u = eigenvalues.flip(0), u.flip(1)
    n = m.shape[0] if n_eigenvecs is None else n_eigenvecs
    u, s = u[:, :n], eigenvalues[:n].clamp_min(0).sqrt()
    v = (u.T @ m) / s.clamp_min(torch.finfo(m.dtype).tiny)[:, None]
    return (v.T, s, u.T) if transpose else (u, s, v)


def tucker2(weight: torch.Tensor, rank0: int, rank1: int, hooi_iterations: int = 0) -> Tucker2:
    """Tucker-2 decomposition of `weight` on modes 0 and 1 with ranks clamped by `feasible_ranks`.

    Computed in float64 with tensorly's pytorch backend; returned in the weight's dtype.
    """
    rank0, rank1 = feasible_ranks(tuple(weight.shape), rank0, rank1)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    with tl.backend_context("pytorch"):
        (core, (u0, u1)), _ = partial_tucker(
            w, rank=[rank0, rank1], modes=(0, 1), n_iter_max=hooi_iterations, init="svd",
            svd=_gram_svd,
        )
    # orthonormal factors and a projected core: ‖W − Ŵ‖² = ‖W‖² − ‖G‖²
    w_sq, g_sq = float(w.square().sum()), float(core.square().sum())
    error = math.sqrt(max(w_sq - g_sq, 0.0) / w_sq) if w_sq > 0 else 0.0
    return Tucker2(*(t.to(dtype=weight.dtype).contiguous() for t in (core, u0, u1)), relative_error=error)


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


def choose_ranks(
    spec: ConvSpec, ratio: float, policy: str, rank_min: int, rank_multiple: int = 1
) -> tuple[tuple[int, int] | None, str]:
    """(in_rank, out_rank) for a layer, or None to leave it as it is; plus the reason in words.

    The ``profiled`` policy starts from the ``auto`` decision; timings refine it (see surgery).
    Deterministic in its arguments, so every fold of a model gets the same structure.
    """
    if spec.groups != 1:
        return None, "grouped convolution"
    if spec.pointwise:  # segmentation heads, projections: a bottleneck on logits, little to save
        return None, "1x1 convolution"
    r_in, r_out = clamp_ranks(spec, paper_rank(spec.in_channels, ratio, rank_min, rank_multiple),
                              paper_rank(spec.out_channels, ratio, rank_min, rank_multiple))
    if policy == "paper":
        return (r_in, r_out), "decomposed"
    if spec.in_channels == 1:
        return None, "single input channel"
    if (r_in, r_out) == (spec.in_channels, spec.out_channels):
        return None, "full ranks"
    if spec.macs_per_position((r_in, r_out)) >= spec.macs_per_position():
        return None, "no MAC saving"
    return (r_in, r_out), "decomposed"
