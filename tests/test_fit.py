import math

import pytest
import torch
from networks import scaled_error
from torch import nn

from nnunet_tucker.fit import feasible_ranks, tucker2
from nnunet_tucker.layers import TuckerConv
from nnunet_tucker.plan.ranks import ConvSpec, choose_ranks, conv_spec, paper_rank
from nnunet_tucker.swap.convert import decompose_conv_weights


def test_full_rank_is_exact_and_error_is_reported():
    torch.manual_seed(0)
    w = torch.randn(12, 7, 3, 3, 3, dtype=torch.float64)
    t = tucker2(w, 12, 7)
    approx = torch.einsum("ab...,ia,jb->ij...", t.core, t.factor0, t.factor1)
    assert scaled_error(approx, w) < 1e-10 and t.relative_error < 1e-6
    t = tucker2(w, 4, 3, hooi_iterations=5)
    approx = torch.einsum("ab...,ia,jb->ij...", t.core, t.factor0, t.factor1)
    assert math.isclose(t.relative_error, float((approx - w).norm() / w.norm()), rel_tol=1e-6)


def test_hosvd_factors_match_svd_subspaces():
    torch.manual_seed(0)
    w = torch.randn(16, 24, 3, 3)
    t = tucker2(w, 5, 6)
    u = torch.linalg.svd(w.reshape(16, -1).double(), full_matrices=False)[0][:, :5].float()
    assert torch.allclose((t.factor0 @ t.factor0.T), (u @ u.T), atol=1e-4)


def test_hooi_does_not_increase_error():
    torch.manual_seed(0)
    w = torch.randn(32, 32, 3, 3, 3)
    assert tucker2(w, 8, 8, hooi_iterations=10).relative_error <= tucker2(w, 8, 8).relative_error + 1e-6


def test_ranks_beyond_unfolding_are_clamped():
    assert feasible_ranks((2, 32, 1, 1, 1), 8, 8) == (2, 2)
    torch.manual_seed(0)
    t = tucker2(torch.randn(2, 32, 1, 1, 1), 8, 8)  # 1x1 head: must not crash
    assert t.core.shape == (2, 2, 1, 1, 1) and t.relative_error < 1e-5


@pytest.mark.parametrize(
    "channels, ratio, rank_min, multiple, expected",
    [(32, 0.3, 8, 1, 10), (320, 0.4, 8, 1, 128), (32, 0.1, 8, 1, 8), (30, 0.1, 1, 1, 3), (4, 0.5, 8, 1, 4),
     (32, 0.3, 8, 8, 16), (320, 0.05, 8, 1, 16), (64, 1.0, 8, 1, 64)],
)
def test_paper_rank(channels, ratio, rank_min, multiple, expected):
    assert paper_rank(channels, ratio, rank_min, multiple) == expected


def test_policies():
    stem = ConvSpec(1, 32, (3, 3, 3), (1, 1, 1), False)
    head = ConvSpec(32, 118, (1, 1, 1), (1, 1, 1), False)
    body = ConvSpec(64, 64, (3, 3, 3), (1, 1, 1), False)
    assert choose_ranks(stem, 0.3, "auto", 8)[0] is None
    assert choose_ranks(stem, 0.3, "paper", 8)[0] == (1, 10)
    assert choose_ranks(head, 0.3, "auto", 8) == (None, "1x1 convolution")
    strided = ConvSpec(16, 16, (3, 3, 3), (2, 2, 2), False)  # the leading 1x1 runs at 8x the positions
    assert choose_ranks(strided, 0.9, "auto", 1) == (None, "no MAC saving")
    assert choose_ranks(strided, 0.9, "paper", 1)[0] == (15, 15)
    assert choose_ranks(head, 0.3, "paper", 8) == (None, "1x1 convolution")
    assert choose_ranks(body, 0.3, "auto", 8)[0] == (20, 20)
    assert choose_ranks(body, 1.0, "auto", 8) == (None, "full ranks")
    assert choose_ranks(body, 1.0, "paper", 8)[0] == (64, 64)
    grouped = ConvSpec(64, 64, (3, 3, 3), (1, 1, 1), False, groups=4)
    assert choose_ranks(grouped, 0.3, "paper", 8) == (None, "grouped convolution")


with torch.random.fork_rng(devices=[]):  # the same weights whatever ran before (and the global generator left alone)
    torch.manual_seed(0)
    CONVS = [
        nn.Conv3d(12, 10, (1, 3, 3), padding=(0, 1, 1)),
        nn.Conv3d(12, 10, 3, stride=(1, 2, 2), padding=1, bias=False),
        nn.Conv3d(12, 10, 3, dilation=2, padding=2, padding_mode="reflect"),
        nn.Conv2d(12, 10, 3, stride=2, padding=1),
        nn.Conv1d(12, 10, 5, padding=2),
        nn.ConvTranspose3d(12, 10, (1, 2, 2), stride=(1, 2, 2)),
        nn.ConvTranspose3d(12, 10, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.ConvTranspose2d(12, 10, 2, stride=2),
    ]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: repr(c))
def test_decomposed_layer_equals_conv_at_full_rank(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 12, *([9] * (conv.weight.ndim - 2)))
    spec = conv_spec(conv)
    layer = TuckerConv(conv, 12, 10)
    state, error = decompose_conv_weights(conv.weight, conv.bias, spec, (12, 10))
    layer.load_state_dict(state)
    with torch.no_grad():
        assert scaled_error(layer(x), conv(x)) < 1e-5  # float32 rounding: ~1e-6
    assert error < 1e-5


@pytest.mark.parametrize("conv", CONVS[:2] + CONVS[5:6], ids=lambda c: repr(c))
def test_low_rank_layer_output_error_follows_weight_error(conv):
    layer = TuckerConv(conv, 6, 5)
    state, error = decompose_conv_weights(conv.weight, conv.bias, conv_spec(conv), (6, 5))
    layer.load_state_dict(state)
    assert 0 < error < 1
    assert layer.first.weight.shape[:2] == (6, 12) and layer.last.weight.shape[:2] == (10, 5)
