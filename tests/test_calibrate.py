"""Calibration-aware Tucker-2, channel statistics and budgeted rank allocation."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from networks import build, scaled_error
from torch import nn

from nnunet_tucker import TuckerConfig, compress_network
from nnunet_tucker import calibrate as calibrate_module
from nnunet_tucker.calibrate import (
    GRAM_BLOCKS_FROM,
    POSITION_WEIGHT_SHARE,
    ResponseStatistics,
    SampledOutputs,
    _features,
    _gram,
    calibrate,
    collect_statistics,
    fisher_probes,
    responses,
    sample_targets,
)
from nnunet_tucker.config import TuckerConfigError
from nnunet_tucker.errors import CalibrationError
from nnunet_tucker.fit import Whitening, calibrated_tucker2, tucker2
from nnunet_tucker.layers import TuckerConv
from nnunet_tucker.plan import plan_compression
from nnunet_tucker.plan.ranks import BudgetLayer, ConvSpec, allocate_ranks, clamp_ranks, conv_spec
from nnunet_tucker.swap import RefitData, convert_state_dict, swap_modules
from nnunet_tucker.swap.convert import decompose_conv_weights, refit_conv_weights, refittable


def _correlated(n: int, channels: int, seed: int, size: int = 12) -> torch.Tensor:
    """Inputs whose channels mix a few smooth latent signals (as feature maps of a trained net do):
    one mixing for every seed, new signals per seed."""
    mixing = torch.randn(channels, 3, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    latent = F.avg_pool3d(torch.randn(n, 3, size, size, size, generator=g), 3, stride=1, padding=1)
    return torch.einsum("cl,nl...->nc...", mixing, latent) + 0.05 * torch.randn(n, channels, size, size, size,
                                                                             generator=g)


def _output_error(conv: nn.Conv3d, state: dict, ranks: tuple[int, int], x: torch.Tensor) -> float:
    tucker = TuckerConv(conv, *ranks)
    tucker.load_state_dict(state)
    with torch.no_grad():
        y, y_hat = conv(x), tucker(x)
    y, y_hat = (t - t.mean(dim=(2, 3, 4), keepdim=True) for t in (y, y_hat))
    return float((y_hat - y).norm() / y.norm())


def test_calibrated_fit_beats_hosvd_on_correlated_inputs():
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 16, 3, padding=1)
    stats = collect_statistics(nn.Sequential(conv), _correlated(4, 16, seed=1))["0"]
    held_out = _correlated(2, 16, seed=2)
    ranks = (4, 8)
    hosvd, _ = decompose_conv_weights(conv.weight.data, conv.bias.data, conv_spec(conv), ranks)
    calibrated, _ = decompose_conv_weights(conv.weight.data, conv.bias.data, conv_spec(conv), ranks, statistics=stats)
    assert _output_error(conv, calibrated, ranks, held_out) < 0.5 * _output_error(conv, hosvd, ranks, held_out)


def test_calibrated_fit_equals_hosvd_on_white_inputs():
    torch.manual_seed(0)
    w = torch.randn(12, 10, 3, 3, 3, dtype=torch.float64)
    eye = torch.eye(27, dtype=torch.float64)
    fit = calibrated_tucker2(w, 4, 5, Whitening.of(torch.eye(10, dtype=torch.float64),
                                                   torch.eye(12, dtype=torch.float64), eye))
    approx = torch.einsum("or,rsk,si->oik", fit.last, fit.core.flatten(2), fit.first).reshape(w.shape)
    t = tucker2(w, 5, 4)
    hosvd = torch.einsum("ab...,ia,jb->ij...", t.core, t.factor0, t.factor1)
    assert scaled_error(approx, hosvd) < 1e-8  # float64 rounding: ~1e-15


def test_calibrated_transposed_conv_and_bias_keep_the_mean():
    torch.manual_seed(0)
    conv = nn.ConvTranspose3d(12, 8, 2, stride=2)
    x = _correlated(3, 12, seed=3, size=6) + 2.0  # a mean the bias correction has to carry
    stats = collect_statistics(nn.Sequential(conv), x)["0"]
    state, _ = decompose_conv_weights(conv.weight.data, conv.bias.data, conv_spec(conv), (3, 4), statistics=stats)
    tucker = TuckerConv(conv, 3, 4)
    tucker.load_state_dict(state)
    with torch.no_grad():
        y, y_hat = conv(x), tucker(x)
    assert y_hat.shape == y.shape
    mean_error = (y_hat.mean(dim=(0, 2, 3, 4)) - y.mean(dim=(0, 2, 3, 4))).abs().max()
    assert mean_error <= 1e-4 * y.abs().max()  # float32 rounding: ~1e-7 of the outputs' scale


def test_fit_spends_ranks_on_the_outputs_the_prediction_depends_on():
    torch.manual_seed(0)
    w = torch.randn(12, 10, 3, 3, 3, dtype=torch.float64)
    fisher = torch.diag(torch.tensor([10.0] * 4 + [0.01] * 8, dtype=torch.float64))  # 4 outputs matter
    fit = calibrated_tucker2(w, 10, 4, Whitening.of(torch.eye(10, dtype=torch.float64), fisher))
    approx = torch.einsum("or,rsk,si->oik", fit.last, fit.core.flatten(2), fit.first).reshape(w.shape)
    t = tucker2(w, 4, 10)
    hosvd = torch.einsum("ab...,ia,jb->ij...", t.core, t.factor0, t.factor1)

    def loss(a):
        e = (w - a).flatten(1)
        return float(torch.einsum("oi,op,pi->", e, fisher, e))

    assert loss(approx) < 0.01 * loss(hosvd)


def test_statistics_hold_spatial_correlation_and_fisher_and_leave_the_network_alone():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.InstanceNorm3d(6), nn.LeakyReLU(),
                            nn.ConvTranspose3d(6, 3, 2, stride=2))
    smooth = F.avg_pool3d(torch.randn(3, 2, 14, 14, 14), 5, stride=1, padding=2)
    stats = collect_statistics(network, smooth)
    conv, transposed = stats["0"], stats["3"]
    assert conv.spatial_corr.shape == (27, 27) and transposed.spatial_corr.shape == (1, 1)
    assert torch.allclose(conv.spatial_corr.diagonal(), torch.ones(27, dtype=torch.float64))
    assert conv.spatial_corr[13, 14] > 0.5  # neighbours of a smooth field are correlated
    white = collect_statistics(network, torch.randn(3, 2, 14, 14, 14))["0"]
    assert white.spatial_corr[13, 14].abs() < 0.1
    for s in (conv, transposed):
        # positive semi-definite up to rounding, which is relative to the matrix's scale (its largest
        # eigenvalue): the softmax Fisher information of the logits has an exact null direction (all ones)
        eigenvalues = torch.linalg.eigvalsh(s.output_fisher)
        assert s.usable() and s.output_fisher.trace() > 0
        assert eigenvalues.min() > -1e-6 * eigenvalues.max(), eigenvalues
    assert all(p.grad is None for p in network.parameters())
    regions = collect_statistics(network, smooth, regions=True)["3"]
    assert regions.output_fisher.trace() > 0 and not torch.allclose(regions.output_fisher, transposed.output_fisher)


@pytest.mark.parametrize("regions", [False, True])
def test_fisher_probe_has_the_class_balanced_fisher_information_as_second_moment(regions):
    n = 20000
    base = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(1))
    logits = base.expand(n, -1, -1).clone().requires_grad_(True)
    (v,) = fisher_probes(logits, regions, torch.Generator().manual_seed(0), 1)
    products = torch.einsum("ncp,ndp->npcd", v, v)
    moment, standard_error = products.mean(dim=0), products.std(dim=0) / n**0.5
    p = (torch.sigmoid(base[0]) if regions else torch.softmax(base[0], dim=0)).T  # (positions, classes)
    w = 1 / (4 * p.mean(dim=0))  # a class's weight: the inverse of its share of the patch
    if regions:
        expected = torch.diag_embed(w * p * (1 - p))
    else:
        fisher = torch.diag_embed(p) - torch.einsum("pc,pd->pcd", p, p)
        expected = fisher @ torch.diag_embed(w / p) @ fisher
    # a Monte Carlo estimate: within 5 of its own standard errors (plus rounding, where the probe's square is
    # constant) of the exact moment; a wrong weighting or sign moves entries by a good part of their scale
    tolerance = 5 * standard_error + 1e-5 * expected.abs().max()
    assert ((moment - expected).abs() <= tolerance).all(), (moment - expected).abs() / tolerance


def test_refit_targets_hold_the_outputs_and_weigh_uncertain_positions_up():
    conv = nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1, 1))
        conv.bias.zero_()
    network = nn.Sequential(conv)  # its output are the logits: ±x
    x = torch.zeros(2, 1, 4, 8, 8)
    x[:, :, :, 4:] = 10.0  # half the volume certain (softmax ≈ 1), half undecided (0.5)
    targets, order = sample_targets(network, x, ["0"], positions_per_patch=100)
    assert order == ["0"] and len(targets["0"]) == 2
    for target, patch in zip(targets["0"], x, strict=True):
        assert target.outputs.shape == (100, 2)
        with torch.no_grad():
            expected = conv(patch[None])[(0, slice(None), *target.coords)].T
        assert torch.allclose(target.outputs, expected)
    weights = torch.cat([t.weights for t in targets["0"]])
    certain = torch.cat([t.coords[1] >= 4 for t in targets["0"]])
    assert weights.mean() == pytest.approx(1.0)
    assert torch.allclose(weights[certain], torch.full_like(weights[certain], 1 - POSITION_WEIGHT_SHARE), atol=1e-3)
    assert weights[~certain].mean() > 1.4
    regions, _ = sample_targets(network, x, ["0"], positions_per_patch=100, regions=True)
    assert not torch.allclose(torch.cat([t.weights for t in regions["0"]]), weights)
    assert all(p.grad is None for p in network.parameters())


def test_one_pass_gives_both_statistics_and_targets():
    network, shape = build("plain3d")
    x = F.avg_pool3d(torch.randn(2, *shape[1:]), 3, 1, 1)  # smooth, so the offsets correlate
    statistics, (targets, order) = calibrate(network, x, positions_per_patch=50)
    alone = collect_statistics(network, x)
    sampled, sampled_order = sample_targets(network, x, list(alone), positions_per_patch=50)
    assert statistics.keys() == alone.keys() == set(order) and order == sampled_order  # the convolutions run
    for name, s in statistics.items():
        a = alone[name]
        assert s.voxels == a.voxels
        for mine, theirs in ((s.input_cov, a.input_cov), (s.input_mean, a.input_mean),
                             (s.spatial_corr, a.spatial_corr)):
            assert scaled_error(mine, theirs) < 1e-6  # the same forward pass
        # the Fisher information: other random probes (targets drawn in between), the same expectation and scale
        ratio = float(s.output_fisher.trace() / a.output_fisher.trace())
        assert 0.2 < ratio < 5, (name, ratio)
        for mine, theirs in zip(targets[name], sampled[name], strict=True):
            assert all(torch.equal(c, d) for c, d in zip(mine.coords, theirs.coords, strict=True))
            assert scaled_error(mine.outputs, theirs.outputs) < 1e-6
            assert scaled_error(mine.weights, theirs.weights) < 1e-6  # the same probes


def test_statistics_taken_a_chunk_at_a_time_equal_those_of_the_whole_input(monkeypatch):
    network, shape = build("plain3d")
    x = F.avg_pool3d(torch.randn(2, *shape[1:]), 3, 1, 1)
    monkeypatch.setattr(calibrate_module, "CHUNK_ELEMENTS", 1 << 40)  # one chunk per input
    whole = collect_statistics(network, x)
    monkeypatch.setattr(calibrate_module, "CHUNK_ELEMENTS", 100)  # several positions and channels per chunk
    chunked = collect_statistics(network, x)
    for name, s in whole.items():
        for mine, theirs in ((chunked[name].input_cov, s.input_cov), (chunked[name].spatial_corr, s.spatial_corr),
                             (chunked[name].input_mean, s.input_mean)):
            assert scaled_error(mine, theirs) < 1e-5, name


def test_a_mask_of_every_voxel_changes_nothing():
    network, shape = build("plain3d")
    x = F.avg_pool3d(torch.randn(2, *shape[1:]), 3, 1, 1)
    plain, (targets, _) = calibrate(network, x, positions_per_patch=50)
    masked, (masked_targets, _) = calibrate(network, x, positions_per_patch=50,
                                            masks=torch.ones(2, *shape[2:], dtype=torch.bool))
    for name, s in plain.items():
        assert masked[name].voxels == s.voxels
        for field in ("input_cov", "input_mean", "spatial_corr", "output_fisher"):
            assert scaled_error(getattr(masked[name], field), getattr(s, field)) < 1e-5, (name, field)
        for mine, theirs in zip(masked_targets[name], targets[name], strict=True):
            assert all(torch.equal(c, d) for c, d in zip(mine.coords, theirs.coords, strict=True))


def test_masked_statistics_count_only_the_kept_positions():
    """The first convolution sees the patch itself: with the first half of an axis kept, its input statistics are
    those of that half alone (pairs of offsets within it); every layer's targets lie where all of what is under
    them is kept, and the network still runs on the whole patch (the Fisher information differs)."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.InstanceNorm3d(6), nn.LeakyReLU(),
                            nn.Conv3d(6, 6, 3, stride=2, padding=1), nn.InstanceNorm3d(6), nn.LeakyReLU(),
                            nn.ConvTranspose3d(6, 3, 2, stride=2))
    x = F.avg_pool3d(torch.randn(2, 2, 16, 12, 12), 3, 1, 1)
    kept = torch.zeros(2, 16, 12, 12, dtype=torch.bool)
    kept[:, :6] = True
    masked, (targets, _) = calibrate(network, x, positions_per_patch=1000, masks=kept)
    half = collect_statistics(network, x[:, :, :6].contiguous())
    assert masked["0"].voxels == half["0"].voxels == 2 * 6 * 12 * 12
    for field in ("input_cov", "input_mean", "spatial_corr"):
        assert scaled_error(getattr(masked["0"], field), getattr(half["0"], field)) < 1e-5, field
    assert masked["3"].voxels == 2 * 6 * 12 * 12 and masked["6"].voxels == 2 * 3 * 6 * 6  # half: 3 of 8
    whole = collect_statistics(network, x)
    assert scaled_error(masked["0"].output_fisher, whole["0"].output_fisher) > 1e-3
    for name, per_patch in targets.items():
        for sampled in per_patch:
            first_axis = sampled.coords[0]
            assert len(first_axis) and int(first_axis.max()) < (3 if name == "3" else 6), name  # "3": half size


def test_activations_kept_in_float16_for_the_probes_change_the_fisher_information_by_rounding_only(monkeypatch):
    """The probed pass keeps its activations for the backward probes in float16 (half the memory of a calibration's
    largest buffers): what forward hooks see stays float32, the probed gradients move by float16 rounding only
    (far less than another seed of the random probes moves them), and the parameters are left as they were."""
    network, shape = build("plain3d")
    network.decoder.seg_layers[-1].weight.requires_grad_(False)  # one parameter frozen by its owner: stays so
    before = [p.requires_grad for p in network.parameters()]
    x = F.avg_pool3d(torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(0)), 3, 1, 1)
    monkeypatch.setattr(calibrate_module, "SAVED_AS_IS_BELOW", 0)  # every saved activation of this small network
    packed = []
    pack = calibrate_module._pack
    monkeypatch.setattr(calibrate_module, "_pack", lambda t: packed.append(pack(t)) or packed[-1])
    monkeypatch.setattr(calibrate_module, "SAVED_ACTIVATIONS", torch.float32)
    reference = collect_statistics(network, x)
    other_seed = collect_statistics(network, x, seed=1)
    monkeypatch.setattr(calibrate_module, "SAVED_ACTIVATIONS", torch.float16)
    packed.clear()
    half = collect_statistics(network, x)
    assert any(isinstance(p, tuple) and p[0].dtype == torch.float16 for p in packed)
    assert [p.requires_grad for p in network.parameters()] == before
    assert all(p.grad is None for p in network.parameters())
    for name, s in reference.items():
        assert scaled_error(half[name].input_cov, s.input_cov) < 1e-6, name  # the forward pass is float32
        rounding = scaled_error(half[name].output_fisher, s.output_fisher)
        assert rounding < 1e-3 and rounding < 0.1 * scaled_error(other_seed[name].output_fisher, s.output_fisher), name


def _reference_features(conv: nn.Module, z: torch.Tensor, coords: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """What each kernel offset sees of `z` (R, *spatial) at the output positions `coords`, (S, K·R)
    offsets major, by `conv`'s own operation with one-hot kernels (output channel k·R + r copies
    channel r at offset k): exact in float64, where every sum has one non-zero term."""
    r, kernel, dims = z.shape[0], tuple(conv.kernel_size), z.ndim - 1
    k = math.prod(kernel)
    one_hot = torch.zeros(k * r, r, k, dtype=z.dtype)
    one_hot[torch.arange(k * r), torch.arange(k * r) % r, torch.arange(k * r) // r] = 1
    one_hot = one_hot.view(k * r, r, *kernel)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        run = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        out = run(z[None], one_hot.transpose(0, 1), stride=conv.stride)
    else:
        run = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        out = run(z[None], one_hot, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    return out[(0, slice(None), *coords)].T


def _reference_responses(conv: nn.Module, x: torch.Tensor, first: torch.Tensor,
                         targets: list[SampledOutputs]) -> ResponseStatistics:
    """`responses` as its definition reads, all in float64: per patch, the features' and outputs'
    covariances weighted by `weights` and centred on their weighted means; summed over patches."""
    sums = []
    for patch, target in zip(x, targets, strict=True):
        z = torch.einsum("ri,i...->r...", first.flatten(1).double(), patch.double())
        f, t, w = _reference_features(conv, z, target.coords), target.outputs.double(), target.weights.double()[:, None]
        fc, tc = f - (w * f).sum(dim=0) / w.sum(), t - (w * t).sum(dim=0) / w.sum()
        sums.append(((w * fc).T @ fc, (w * tc).T @ fc, f.sum(dim=0), t.sum(dim=0), w.sum(), len(f)))
    feature_cov, cross_cov, feature_sum, output_sum, weight, samples = (sum(s) for s in zip(*sums, strict=True))
    return ResponseStatistics(feature_cov / weight, cross_cov / weight, feature_sum / samples, output_sum / samples,
                              samples)


@pytest.mark.parametrize("conv, size, rank", [
    (nn.Conv3d(6, 5, 3, padding=1), (9, 10, 11), 4),
    (nn.Conv3d(6, 5, 3, stride=2, padding=1), (9, 10, 11), 4),
    (nn.Conv3d(6, 5, (3, 1, 3), padding=(2, 0, 1), dilation=(2, 1, 1)), (9, 10, 11), 3),
    (nn.Conv3d(6, 5, 3), (9, 10, 11), 6),  # no padding
    (nn.Conv2d(6, 5, 3, padding=1), (20, 17), 4),
    (nn.ConvTranspose3d(6, 5, 2, stride=2), (5, 6, 7), 4),
    (nn.Conv3d(40, 5, 3, padding=1), (12, 12, 12), 40),  # 1080 features: the blockwise Gram product
])
def test_responses_equal_a_float64_reference(conv, size, rank):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2 * conv.in_channels * math.prod(size[:-1]), 1, size[-1], generator=g)
    x = 3.0 + F.avg_pool1d(noise, 3, stride=1, padding=1).view(2, conv.in_channels, *size)  # smooth, with a mean
    first = torch.randn(rank, conv.in_channels, *(1,) * len(size), generator=g)
    with torch.no_grad():
        out_spatial = conv(x).shape[2:]
    targets, positions = [], min(300, math.prod(out_spatial))
    for s in (positions, 2 * positions // 3):  # patches with different numbers of positions
        coords = torch.unravel_index(torch.randperm(math.prod(out_spatial), generator=g)[:s], out_spatial)
        targets.append(SampledOutputs(coords, torch.randn(s, conv.out_channels, generator=g, dtype=torch.float64),
                                      0.5 + torch.rand(s, generator=g, dtype=torch.float64)))
    z = torch.einsum("ri,i...->r...", first.flatten(1).double(), x[0].double())
    assert torch.equal(_features(conv, z, list(targets[0].coords)), _reference_features(conv, z, targets[0].coords))
    found, expected = responses(conv, x, first, targets), _reference_responses(conv, x, first, targets)
    assert found.samples == expected.samples == sum(len(t.weights) for t in targets)
    for name in ("feature_cov", "cross_cov", "feature_mean", "output_mean"):
        actual, reference = getattr(found, name), getattr(expected, name)
        assert actual.dtype == torch.float64 and actual.shape == reference.shape, name
        # the features are float32, as the network computes them: ~1e-7 of the scale
        assert scaled_error(actual, reference) < 1e-5, name


@pytest.mark.parametrize("n", [GRAM_BLOCKS_FROM - 1, GRAM_BLOCKS_FROM + 2])
def test_gram_equals_the_full_product(n):
    g = torch.randn(50, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert scaled_error(_gram(g), g.T @ g) < 1e-13


@pytest.mark.parametrize("patches, message", [
    (torch.randn(2, 3, 8, 8, 8), "3 channel"),
    (torch.full((1, 2, 8, 8, 8), float("nan")), "NaN"),
    (torch.empty(0, 2, 8, 8, 8), "N > 0"),
])
def test_bad_calibration_patches_are_clear_errors(patches, message):
    network = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1))
    with pytest.raises(CalibrationError, match=message):
        collect_statistics(network, patches)


def _budget_layers() -> list[BudgetLayer]:
    torch.manual_seed(0)
    layers = []
    for c, positions in ((16, 4096), (32, 512), (64, 64)):
        spectrum = torch.linspace(1, 0.01, c) ** 3
        layers.append(BudgetLayer(ConvSpec(c, c, (3, 3, 3), (1, 1, 1), False), positions, spectrum, spectrum))
    return layers


def test_allocation_respects_budget_and_more_budget_loses_less():
    layers = _budget_layers()
    full = sum(layer.macs(None) for layer in layers)
    losses = []
    for share in (0.15, 0.3, 0.6):
        ranks = allocate_ranks(layers, share * full, 0, rank_min=2)
        assert sum(layer.macs(r) for layer, r in zip(layers, ranks, strict=True)) <= share * full
        assert ranks == allocate_ranks(layers, share * full, 0, rank_min=2)  # deterministic
        losses.append(sum(layer.loss(r) for layer, r in zip(layers, ranks, strict=True)))
    assert losses[0] > losses[1] > losses[2]


def test_allocation_never_takes_back_a_slower_original():
    """A layer whose decomposed form is faster (`form_faster`) reaches full ranks where the budget allows, its exact
    form, never the original: that costs fewer MACs at no loss, but runs slower."""
    layers = _budget_layers()
    faster = [BudgetLayer(layer.spec, layer.positions, layer.spectrum_in, layer.spectrum_out, form_faster=True)
              for layer in layers]
    full = [clamp_ranks(layer.spec, layer.spec.in_channels, layer.spec.out_channels) for layer in layers]
    generous = sum(layer.macs(r) for layer, r in zip(layers, full, strict=True))
    assert allocate_ranks(layers, generous, 0, rank_min=2) == [None] * len(layers)
    assert allocate_ranks(faster, generous, 0, rank_min=2) == full
    tight = allocate_ranks(faster, 0.3 * sum(layer.macs(None) for layer in layers), 0, rank_min=2)
    assert None not in tight and tight != full


def test_calibrated_allocation_gives_ranks_where_the_loss_is():
    layers = _budget_layers()
    full = sum(layer.macs(None) for layer in layers)
    scaled = [BudgetLayer(layer.spec, layer.positions, layer.spectrum_in * w, layer.spectrum_out * w, calibrated=True)
              for layer, w in zip(layers, (1.0, 1.0, 1.0), strict=True)]
    heavy = list(scaled)
    heavy[1] = BudgetLayer(scaled[1].spec, scaled[1].positions, scaled[1].spectrum_in * 100,
                           scaled[1].spectrum_out * 100, calibrated=True)
    even, weighted = (allocate_ranks(ls, 0.3 * full, 0, rank_min=2) for ls in (scaled, heavy))
    assert sum(weighted[1]) > sum(even[1])
    assert scaled[0].loss(None) == 0 and scaled[0].loss((2, 2)) == pytest.approx(
        float(scaled[0].spectrum_in[2:].sum() + scaled[0].spectrum_out[2:].sum()))


def test_budget_plan_meets_budget_on_a_network(architecture):
    network, shape = build(architecture)
    report = compress_network(network, TuckerConfig(mac_budget=0.5, rank_min=2), shape)
    assert report.macs_after <= 0.5 * report.macs_before and report.decomposed_layers > 0


def test_unreachable_budget_names_the_reachable_one():
    network, shape = build("plain3d")
    with pytest.raises(TuckerConfigError, match=r"mac_budget=0.01 is below what this network can reach"):
        plan_compression(network, TuckerConfig(mac_budget=0.01), shape)


def test_budget_with_statistics_uses_them_and_stays_in_budget():
    network, shape = build("plain3d")
    network.eval()
    stats = collect_statistics(network, torch.randn(2, *shape[1:]))
    plan = plan_compression(network, TuckerConfig(mac_budget=0.6, rank_min=2), shape, statistics=stats)
    assert any(layer.ranks for layer in plan) and all("calibrated" in layer.reason
                                                      for layer in plan if layer.ranks)
    state, errors = convert_state_dict(network.state_dict(), plan, statistics=stats)
    compressed = copy.deepcopy(network)
    report = compress_network(compressed, TuckerConfig(mac_budget=0.6, rank_min=2), shape,
                              decomposed=(state, errors), plan=plan)
    assert report.macs_after <= 0.6 * report.macs_before
    with torch.no_grad():
        assert torch.isfinite(compressed(torch.randn(shape))).all()


def test_refit_on_responses_lowers_the_output_error_and_keeps_the_mean():
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 16, 3, padding=1)
    network = nn.Sequential(conv)
    x = _correlated(4, 16, seed=1) + 0.5
    stats = collect_statistics(network, x)
    plan = plan_compression(network, TuckerConfig(0.25, policy="paper", rank_min=1))
    assert refittable(conv) and plan[0].ranks == (4, 4)
    held_out = _correlated(2, 16, seed=2) + 0.5
    fitted, _ = convert_state_dict(network.state_dict(), plan, statistics=stats)
    refitted, _ = convert_state_dict(network.state_dict(), plan, statistics=stats,
                                     refit_on=lambda: RefitData(network, x))

    def strip(state):
        return {k.removeprefix("0."): v for k, v in state.items()}

    assert not torch.equal(fitted["0.core.weight"], refitted["0.core.weight"])
    assert torch.equal(fitted["0.first.weight"], refitted["0.first.weight"])
    assert _output_error(conv, strip(refitted), (4, 4), held_out) < _output_error(conv, strip(fitted), (4, 4), held_out)
    tucker = TuckerConv(conv, 4, 4)
    tucker.load_state_dict(strip(refitted))
    with torch.no_grad():
        y, y_hat = conv(x), tucker(x)
    mean_error = (y_hat.mean(dim=(0, 2, 3, 4)) - y.mean(dim=(0, 2, 3, 4))).abs().max()
    assert mean_error <= 1e-4 * y.abs().max()  # float32 rounding: ~1e-8 of the outputs' scale


def test_a_plan_that_keeps_every_rank_is_exact_without_data(architecture):
    _exact_without_data(*build(architecture))


def test_every_rank_of_a_first_layer_is_what_its_kernel_carries():
    torch.manual_seed(0)  # 1 -> 32 channels, 3x3x3: every rank kept is (1, 27), not (1, 32)
    _exact_without_data(nn.Sequential(nn.Conv3d(1, 32, 3, padding=1), nn.Conv3d(32, 8, 3, padding=1)), (1, 1, 8, 8, 8))


def _exact_without_data(network: nn.Module, shape: tuple[int, ...]) -> None:
    network.eval()
    x = torch.randn(2, *shape[1:])
    stats = collect_statistics(network, x)
    plan = plan_compression(network, TuckerConfig(1.0, policy="paper", rank_min=1))
    assert any(layer.ranks for layer in plan)

    def no_refit() -> RefitData:
        raise AssertionError("an exact plan needs no refit")

    with_data, _ = convert_state_dict(network.state_dict(), plan, statistics=stats, refit_on=no_refit)
    weights_only, errors = convert_state_dict(network.state_dict(), plan)
    assert with_data.keys() == weights_only.keys()
    assert all((with_data[k] - weights_only[k]).abs().max() <= 1e-5 * weights_only[k].abs().max() for k in with_data)
    assert max(errors.values()) < 1e-4  # full ranks: the HOSVD reproduces each weight up to float rounding
    compressed = copy.deepcopy(network)
    swap_modules(compressed, plan)
    compressed.load_state_dict(with_data)
    with torch.no_grad():
        y, y_hat = (n(x[:1]) for n in (network, compressed))
    y, y_hat = (v[0] if isinstance(v, (list, tuple)) else v for v in (y, y_hat))
    assert (y_hat - y).abs().max() <= 1e-4 * y.abs().max()


def test_no_refit_without_enough_positions():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1), nn.ConvTranspose3d(8, 4, 2, stride=2),
                            nn.ConvTranspose3d(4, 4, 3, stride=2))
    x = torch.randn(1, 8, 1, 1, 1)  # 1 and 8 output positions for output ranks 2 (20 positions needed)
    stats = collect_statistics(network, x)
    plan = plan_compression(network, TuckerConfig(0.25, policy="paper", rank_min=2))
    assert [refittable(m) for m in network] == [True, True, False]  # overlapping transposed offsets: no
    refitted, _ = convert_state_dict(network.state_dict(), plan, statistics=stats,
                                     refit_on=lambda: RefitData(network, x))
    fitted, _ = convert_state_dict(network.state_dict(), plan, statistics=stats)
    assert all(torch.equal(refitted[k], fitted[k]) for k in fitted)


def test_too_few_positions_for_the_core_refit_the_last_factor_alone():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1), nn.InstanceNorm3d(16, affine=True), nn.LeakyReLU(),
                            nn.Conv3d(16, 16, 3, padding=1)).eval()
    x = _correlated(4, 16, seed=1, size=6)  # 864 positions: under 10 per core feature (27·8), over 10 per rank
    stats = collect_statistics(network, x)
    config = TuckerConfig(0.5, policy="paper", rank_min=1)
    plan = plan_compression(network, config)
    assert [layer.ranks for layer in plan if layer.ranks] == [(8, 8), (8, 8)]
    held_out = _correlated(2, 16, seed=2, size=6)
    with torch.no_grad():
        reference = network(held_out)
    states, errors = [], []
    for refit_on in (None, lambda: RefitData(network, x)):
        state, _ = convert_state_dict(network.state_dict(), plan, statistics=stats, refit_on=refit_on)
        compressed = copy.deepcopy(network)
        compress_network(compressed, config, decomposed=(state, {}), plan=plan)
        with torch.no_grad():
            y = compressed(held_out)
        states.append(state)
        errors.append(float((y - reference).norm() / reference.norm()))
    fitted, refitted = states
    for name in ("0", "3"):
        assert torch.equal(fitted[f"{name}.first.weight"], refitted[f"{name}.first.weight"])
        assert torch.equal(fitted[f"{name}.core.weight"], refitted[f"{name}.core.weight"])
        assert not torch.equal(fitted[f"{name}.last.weight"], refitted[f"{name}.last.weight"])
    assert errors[1] < 0.98 * errors[0]  # 0.96 here


def test_refit_of_a_transposed_convolution_maps_offsets_right():
    torch.manual_seed(0)
    conv = nn.ConvTranspose3d(12, 8, 2, stride=2)
    network = nn.Sequential(conv)
    x = _correlated(4, 12, seed=3, size=8)
    stats = collect_statistics(network, x)
    plan = plan_compression(network, TuckerConfig(0.5, policy="paper", rank_min=1))
    held_out = _correlated(2, 12, seed=4, size=8)
    errors = []
    for refit_on in (None, lambda: RefitData(network, x)):
        state, _ = convert_state_dict(network.state_dict(), plan, statistics=stats, refit_on=refit_on)
        errors.append(_output_error(conv, {k.removeprefix("0."): v for k, v in state.items()}, plan[0].ranks,
                                    held_out))
    assert errors[1] < 1.05 * errors[0]  # a wrong offset layout would be far worse


def test_refit_in_order_makes_up_for_the_layers_before():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(12, 12, 3, padding=1), nn.InstanceNorm3d(12, affine=True), nn.LeakyReLU(),
                            nn.Conv3d(12, 12, 3, padding=1)).eval()
    x = _correlated(4, 12, seed=1, size=16)
    stats = collect_statistics(network, x)
    plan = plan_compression(network, TuckerConfig(0.34, policy="paper", rank_min=1))
    held_out = _correlated(2, 12, seed=2, size=16)
    with torch.no_grad():
        reference = network(held_out)
    errors = []
    for refit_on in (None, lambda: RefitData(network, x)):
        state, _ = convert_state_dict(network.state_dict(), plan, statistics=stats, refit_on=refit_on)
        compressed = copy.deepcopy(network)
        compress_network(compressed, TuckerConfig(0.34, policy="paper", rank_min=1), decomposed=(state, {}),
                         plan=plan)
        with torch.no_grad():
            y = compressed(held_out)
        errors.append(float((y - reference).norm() / reference.norm()))
    assert errors[1] < 0.95 * errors[0]


def test_calibrated_budget_with_refit_on_every_architecture(architecture):
    network, shape = build(architecture)
    network.eval()
    x = torch.randn(2, *shape[1:])
    stats = collect_statistics(network, x)
    config = TuckerConfig(mac_budget=0.5, rank_min=2)
    plan = plan_compression(network, config, shape, statistics=stats)
    decomposed = convert_state_dict(network.state_dict(), plan, statistics=stats,
                                    refit_on=lambda: RefitData(network, x))
    compressed = copy.deepcopy(network)
    report = compress_network(compressed, config, shape, decomposed=decomposed, plan=plan)
    assert report.macs_after <= 0.5 * report.macs_before
    with torch.no_grad():
        out = compressed(x[:1])
    assert torch.isfinite(out[0] if isinstance(out, (list, tuple)) else out).all()


class _Reached(Exception):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


def _refit_layer_by_layer(data, plan, refit, decomposed, errors, statistics, state_dict):
    """The refit as it was (reference for `surgery._refit_in_order`): per layer in forward order, the
    compressed copy (the layers before it swapped in, refitted) runs on each patch alone up to that
    layer; its input there, through the first factor, gives the features at the sampled positions."""
    targets, order = sample_targets(data.network, data.patches, [layer.name for layer in plan], regions=data.regions)
    compressed = copy.deepcopy(data.network).eval()
    by_name = {layer.name: layer for layer in plan}

    def stop(module, args):
        raise _Reached(args[0])

    for name in order:
        conv = compressed.get_submodule(name)
        if name in refit and refittable(conv):
            handle, sums = conv.register_forward_pre_hook(stop), []
            first = decomposed[name]["first.weight"].flatten(1)
            for patch, target in zip(data.patches.split(1), targets[name], strict=True):
                with torch.no_grad(), pytest.raises(_Reached) as reached:
                    compressed(patch)
                z = torch.einsum("ri,ni...->nr...", first, reached.value.x)[0]
                f, t = _features(conv, z, list(target.coords)).double(), target.outputs.double()
                w = target.weights[:, None]
                fc, tc = f - (w * f).sum(dim=0) / w.sum(), t - (w * t).sum(dim=0) / w.sum()
                sums.append(((w * fc).T @ fc, (w * tc).T @ fc, f.sum(dim=0), t.sum(dim=0), w.sum(), len(f)))
            handle.remove()
            feature_cov, cross_cov, feature_sum, output_sum, weight, samples = (sum(s) for s in zip(*sums, strict=True))
            found = ResponseStatistics(feature_cov / weight, cross_cov / weight, feature_sum / samples,
                                       output_sum / samples, samples)
            result = refit_conv_weights(decomposed[name], state_dict[f"{name}.weight"], by_name[name].spec, found,
                                        statistics[name].output_fisher)
            if result is not None:
                decomposed[name], errors[name] = result
        swap_modules(compressed, [by_name[name]])
        compressed.get_submodule(name).load_state_dict(decomposed[name])


def _twice_through_one_conv() -> nn.Module:
    """A network that runs one convolution twice in one pass (its first run is the one refitted)."""
    shared = nn.Conv3d(8, 8, 3, padding=1)
    return nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.LeakyReLU(), shared, nn.InstanceNorm3d(8, affine=True),
                         nn.LeakyReLU(), nn.Conv3d(8, 8, 3, padding=1), nn.LeakyReLU(), shared,
                         nn.Conv3d(8, 2, 1)).eval()


@pytest.mark.parametrize("kind", ["plain3d", "twice"])
def test_one_pass_refit_equals_the_layer_by_layer_refit(kind):
    network, shape = (_twice_through_one_conv(), (1, 1, 12, 16, 16)) if kind == "twice" else build(kind)
    torch.manual_seed(1)
    x = F.avg_pool3d(torch.randn(2, *shape[1:]), 3, stride=1, padding=1)  # smooth, as images are
    stats = collect_statistics(network, x)
    plan = [layer for layer in plan_compression(network, TuckerConfig(0.5, policy="paper", rank_min=2))
            if layer.ranks is not None]
    state = network.state_dict()
    fitted, errors = {}, {}
    for layer in plan:
        fitted[layer.name], errors[layer.name] = decompose_conv_weights(
            state[f"{layer.name}.weight"], state.get(f"{layer.name}.bias"), layer.spec, layer.ranks,
            statistics=stats[layer.name])
    expected, expected_errors = dict(fitted), dict(errors)
    refit = {layer.name for layer in plan if stats[layer.name].usable()}
    _refit_layer_by_layer(RefitData(network, x), plan, refit, expected, expected_errors, stats, state)
    refitted, refitted_errors = convert_state_dict(state, plan, statistics=stats,
                                                   refit_on=lambda: RefitData(network, x))

    changed = [name for name in expected if not torch.equal(expected[name]["core.weight"], fitted[name]["core.weight"])]
    assert len(changed) >= len(plan) // 2  # most layers have enough positions to be refitted
    for name, weights in expected.items():
        for key, value in weights.items():
            # float rounding (one batched pass vs per-patch passes) carried through the layers: ~1e-6;
            # the refit itself moves the weights by about their own scale
            assert scaled_error(refitted[f"{name}.{key}"], value) < 1e-4, (name, key)
        assert refitted_errors[name] == pytest.approx(expected_errors[name], rel=1e-4)
