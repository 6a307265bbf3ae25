"""Step 3, fit: the Tucker-2 math. Tensors in, tensors out: no modules, no nnU-Net.

A weight W of shape (A, B, k1, ..., kd) is approximated on its two channel modes,

    W ≈ G ×₀ U₀ ×₁ U₁,    G: (R₀, R₁, k1, ..., kd),  U₀: (A, R₀),  U₁: (B, R₁),

with orthonormal factors from the HOSVD (leading left singular vectors of each mode's
unfolding), optionally refined by HOOI iterations. The spatial modes stay full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


def eigh_descending(symmetric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's eigh on a few hundred rows: threads gain nothing, and on a busy CPU stall
    try:
        eigenvalues, vectors = torch.linalg.eigh(symmetric)
    finally:
        torch.set_num_threads(threads)
    return eigenvalues.flip(0), vectors.flip(1)


def _gram_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **_: object):
    """Truncated SVD through the eigendecomposition of the smaller Gram matrix.

    Unfoldings of conv weights are wide (C × C'·k); the C × C Gram matrix is far cheaper to
    decompose than the unfolding itself. tensorly's own 'symeig_svd' takes the larger Gram
    matrix for wide inputs, so it is used only through this callable.
    """
    transpose = matrix.shape[0] > matrix.shape[1]
    m = matrix.T if transpose else matrix
    eigenvalues, u = eigh_descending(m @ m.T)
    n = m.shape[0] if n_eigenvecs is None else n_eigenvecs
    u, s = u[:, :n], eigenvalues[:n].clamp_min(0).sqrt()
    v = (u.T @ m) / s.clamp_min(torch.finfo(m.dtype).tiny)[:, None]
    return (v.T, s, u.T) if transpose else (u, s, v)


def tucker2(weight: torch.Tensor, rank0: int, rank1: int, hooi_iterations: int = 0) -> Tucker2:
    """Tucker-2 decomposition of `weight` on modes 0 and 1 with ranks clamped by `feasible_ranks`.

    Computed in float64 with tensorly's pytorch backend; returned in the weight's dtype.
    """
    import tensorly as tl  # here, not at import: it pulls in scipy, which would slow every nnU-Net start-up
    from tensorly.decomposition import partial_tucker

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


@dataclass(frozen=True)
class CalibratedTucker2:
    """Result of `calibrated_tucker2`, in convolution order: `first` (R_in, C_in) maps input channels
    to the rank space, `core` (R_out, R_in, *k), `last` (C_out, R_out); `bias_shift` (C_out,) keeps
    the mean output; `relative_error` is ‖W − Ŵ‖ / ‖W‖ of the weights."""

    first: torch.Tensor
    core: torch.Tensor
    last: torch.Tensor
    bias_shift: torch.Tensor
    relative_error: float


METRIC_FLOOR = 1e-4  # eigenvalues of a covariance or metric below this share of the largest are raised to it


def _root_and_inverse(symmetric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A^½ and A^-½ of a positive semi-definite matrix, near-null directions floored for stability
    (the identity for an all-zero matrix)."""
    eigenvalues, vectors = eigh_descending(symmetric.double())
    if not float(eigenvalues[0]) > 0:
        eye = torch.eye(symmetric.shape[0], dtype=torch.float64)
        return eye, eye
    root = eigenvalues.clamp_min(float(eigenvalues[0]) * METRIC_FLOOR).sqrt()
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


@dataclass(frozen=True)
class Whitening:
    """The metric in which `calibrated_tucker2` fits a convolution weight (C_out, C_in, K): the loss
    of an error E is ‖M^½ E (Σ_s^½ ⊗ Σ^½)‖², with Σ the input-channel covariance, Σ_s the correlation
    of the input between kernel offsets (so that E·x, summed over the offsets, has that expected
    square) and M the output metric (the Fisher information of the prediction with respect to the
    layer's output: the loss then estimates twice the expected increase of the KL divergence from
    the original prediction). Holds each root and its inverse."""

    input_root: tuple[torch.Tensor, torch.Tensor]
    output_root: tuple[torch.Tensor, torch.Tensor]
    spatial_root: tuple[torch.Tensor, torch.Tensor] | None

    @classmethod
    def of(cls, input_cov: torch.Tensor, output_metric: torch.Tensor,
           spatial_corr: torch.Tensor | None = None) -> Whitening:
        spatial = None if spatial_corr is None or spatial_corr.shape[0] == 1 else _root_and_inverse(spatial_corr)
        return cls(_root_and_inverse(input_cov), _root_and_inverse(output_metric), spatial)

    def apply(self, flat: torch.Tensor) -> torch.Tensor:
        """The whitened weight M^½ W (Σ_s^½ ⊗ Σ^½) of a float64 weight (C_out, C_in, K)."""
        w = torch.einsum("po,oik,ij->pjk", self.output_root[0], flat, self.input_root[0])
        return w if self.spatial_root is None else torch.einsum("pjk,kl->pjl", w, self.spatial_root[0])


def _mode_grams(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices of the input-mode and output-mode unfoldings of a weight (C_out, C_in, K)."""
    return torch.einsum("oik,ojk->ij", flat, flat), torch.einsum("oik,pik->op", flat, flat)


def channel_spectra(weight: torch.Tensor, whitening: Whitening | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy per rank direction of the input and output modes of a convolution weight
    (C_out, C_in, *k), descending: the squared singular values of the mode unfoldings, of the
    weight itself (HOSVD) or, with calibration, of the whitened weight that `calibrated_tucker2`
    truncates (then in units of the loss, comparable across layers)."""
    w = weight.detach().double().cpu().flatten(2)
    if whitening is not None:
        w = whitening.apply(w)
    gram_in, gram_out = _mode_grams(w)
    return eigh_descending(gram_in)[0].clamp_min(0), eigh_descending(gram_out)[0].clamp_min(0)


def calibrated_tucker2(
    weight: torch.Tensor, rank_in: int, rank_out: int, whitening: Whitening,
    input_mean: torch.Tensor | None = None, positions_per_output: float = 1.0,
) -> CalibratedTucker2:
    """Tucker-2 of a convolution weight (C_out, C_in, *k) fitted to keep the network's prediction.

    The HOSVD of the whitened weight W' = M^½ W (Σ_s^½ ⊗ Σ^½) (see `Whitening`), mapped back:
    with U (C_out, R_out) and V (C_in, R_in) the leading left singular vectors of W''s output and
    input unfoldings, first = VᵀΣ^-½, last = M^-½U and core = UᵀW'V with its kernel offsets
    un-whitened by Σ_s^-½. With identity covariances and metric this is the HOSVD of W.
    `bias_shift` restores the mean output for inputs of mean `input_mean` (`positions_per_output`:
    kernel offsets per output position, 1/stride volume for transposed convolutions).
    """
    w = weight.detach().double().cpu()
    kernel = w.shape[2:]
    flat = w.flatten(2)
    whitened = whitening.apply(flat)
    gram_in, gram_out = _mode_grams(whitened)
    v, u = eigh_descending(gram_in)[1][:, :rank_in], eigh_descending(gram_out)[1][:, :rank_out]
    core = torch.einsum("or,osk,si->rik", u, whitened, v)
    if whitening.spatial_root is not None:
        core = torch.einsum("rik,kl->ril", core, whitening.spatial_root[1])
    first = v.T @ whitening.input_root[1]
    last = whitening.output_root[1] @ u
    approx = torch.einsum("or,rsk,si->oik", last, core, first)
    error = float((flat - approx).norm() / flat.norm()) if flat.norm() > 0 else 0.0
    if input_mean is None:
        shift = torch.zeros(w.shape[0], dtype=torch.float64)
    else:
        shift = (flat - approx).sum(dim=2) @ input_mean.double() * positions_per_output
    dtype = weight.dtype
    return CalibratedTucker2(
        first.to(dtype).contiguous(), core.reshape(rank_out, rank_in, *kernel).to(dtype).contiguous(),
        last.to(dtype).contiguous(), shift.to(dtype), error,
    )


FIT_VERSION = 2  # part of the cache key of fitted weights: raised by every change that alters them (2: refit_last)
REFIT_SAMPLES_PER_FEATURE = 10  # fewer calibration positions than this per feature: no refit (it would overfit)
RIDGE = 1e-6  # share of the mean feature variance added to the diagonal of the feature covariance


def refit_core_and_last(
    feature_cov: torch.Tensor, cross_cov: torch.Tensor, output_metric: torch.Tensor, rank_out: int, rank_in: int,
    kernel: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Core (R_out, R_in, *kernel) and last factor (C_out, R_out) refitted on data for a fixed first factor.

    f are the first factor's outputs at the K kernel offsets around an output position (offsets
    major, covariance `feature_cov`), y the original layer's output there (`cross_cov` = Cov(y, f)).
    Minimises E‖M^½(y − last·core·f)‖² over all rank-R_out maps (reduced-rank regression): the
    least-squares map B = Cov(y, f) Cov(f)⁻¹, then its fitted outputs, whitened by M^½, projected
    on their R_out leading principal directions U: last = M^-½U, core = UᵀM^½B. Unlike the fit
    from the weights alone this uses how the inputs really co-vary across offsets and channels.
    """
    f_cov = feature_cov.double()
    f_cov = f_cov + RIDGE * float(f_cov.diagonal().mean()) * torch.eye(f_cov.shape[0], dtype=torch.float64)
    b = _solve_positive_definite(f_cov, cross_cov.double().T).T  # (C_out, K·R_in)
    root, inverse_root = _root_and_inverse(output_metric)
    u = eigh_descending(root @ b @ f_cov @ b.T @ root)[1][:, :rank_out]
    core = (u.T @ root @ b).reshape(rank_out, math.prod(kernel), rank_in).transpose(1, 2)
    return core.reshape(rank_out, rank_in, *kernel), inverse_root @ u


def core_by_offset(core: torch.Tensor) -> torch.Tensor:
    """A core (R_out, R_in, *kernel) as the map (R_out, K·R_in) of the refit's features f (offsets major)."""
    return core.flatten(2).transpose(1, 2).flatten(1)


def refit_last(feature_cov: torch.Tensor, cross_cov: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """Last factor (C_out, R_out) refitted on data for a fixed first factor and core (R_out, R_in, *kernel),
    where there are too few positions to refit the core: the least-squares map from the core's outputs
    h = core·f to y (Cov(h) = C Cov(f) Cᵀ, Cov(h, y) = C Cov(f, y): R_out features, not K·R_in)."""
    c = core_by_offset(core.double())
    h_cov = c @ feature_cov.double() @ c.T
    h_cov = h_cov + RIDGE * float(h_cov.diagonal().mean()) * torch.eye(h_cov.shape[0], dtype=torch.float64)
    return _solve_positive_definite(h_cov, c @ cross_cov.double().T).T


def _solve_positive_definite(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹b for a symmetric positive definite `a`: by Cholesky (faster than the LU of
    `torch.linalg.solve`, same result up to rounding); by LU where `a` is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(a)
    return torch.cholesky_solve(b, factor) if int(info) == 0 else torch.linalg.solve(a, b)
