"""The profiled policy: per-layer timings, their cache, and the choice they drive; the GEMM layer forms."""

import copy

import pytest
import torch
from networks import build, scaled_error
from torch import nn

from nnunet_tucker import TuckerConfig, compress_network
from nnunet_tucker.calibrate import collect_statistics
from nnunet_tucker.layers import FusedInstanceNorm, PointwiseConv, TuckerConv
from nnunet_tucker.plan import plan_compression
from nnunet_tucker.plan.ranks import clamp_ranks
from nnunet_tucker.plan.timing import MAX_PROFILE_VOXELS, LayerTimer, layer_shapes, profile_input_shape


class ScriptedTimer(LayerTimer):
    """A timer whose 'measurements' are given: `seconds_of(conv, form)` per layer; a pair of layers
    that would run chained takes the sum, less `chain_saving` when both are decomposed."""

    def __init__(self, tmp_path, seconds_of, chain_saving=0.0):
        super().__init__("cpu", cache_dir=tmp_path)
        self.seconds_of, self.chain_saving = seconds_of, chain_saving
        self.pairs = 0

    def _measure(self, conv, shape, candidates, keys, instance_norm=False):
        for c in candidates:
            self.timings[keys[c]] = self.seconds_of(conv, c)
        self.measured += len(candidates)

    def pair_seconds(self, conv, input_shape, ranks, following, following_ranks, activation, end=None):
        self.pairs += 1
        return {(a, b): self.seconds_of(conv, a) + self.seconds_of(following, b) - (self.chain_saving if a and b else 0)
                for a in (None, ranks) for b in (None, following_ranks)}


def test_profiled_keeps_layers_whose_decomposition_is_not_faster(tmp_path):
    network, shape = build("plain3d")
    timer = ScriptedTimer(tmp_path, lambda conv, c: 1.0 if c is None else 0.97)  # 3 % faster: not enough
    plan = plan_compression(network, TuckerConfig(0.5, policy="profiled"), shape, timer)
    assert all(layer.ranks is None for layer in plan)
    assert any(layer.reason.startswith("not faster here") for layer in plan)


@pytest.mark.parametrize("architecture", ["plain3d", "resenc3d"])  # stacked blocks; residual blocks' two
def test_profiled_decides_chained_pairs_together(tmp_path, architecture):
    """Each decomposition alone 3 % faster (not enough), but two in a row skip a full-width map between
    them: decomposed together; a layer with no decomposed neighbour stays as it is."""
    from nnunet_tucker.plan import chainable_pairs

    network, shape = build(architecture)
    pairs = chainable_pairs(network)
    assert pairs
    timer = ScriptedTimer(tmp_path, lambda conv, c: 1.0 if c is None else 0.97, chain_saving=0.2)
    plan = plan_compression(network, TuckerConfig(0.5, policy="profiled"), shape, timer)
    in_pairs = {i for first, pair in pairs.items() for i in (first, id(pair.following))}
    by_module = {id(network.get_submodule(p.name)): p for p in plan}
    assert timer.pairs == len(pairs)
    for module_id, p in by_module.items():
        if module_id in in_pairs:
            assert p.ranks is not None and p.reason.startswith("decomposed, chained pair 1.15x faster"), p
        elif p.reason.startswith(("decomposed", "not faster")):
            assert p.ranks is None and p.reason.startswith("not faster here"), p
    none_saved = ScriptedTimer(tmp_path / "none", lambda conv, c: 1.0 if c is None else 0.97)
    assert all(p.ranks is None for p in plan_compression(network, TuckerConfig(0.5, policy="profiled"), shape,
                                                         none_saved))
    faster_alone = ScriptedTimer(tmp_path / "alone", lambda conv, c: 1.0 if c is None else 0.5, chain_saving=0.2)
    assert plan_compression(network, TuckerConfig(0.5, policy="profiled"), shape, faster_alone)
    assert faster_alone.pairs == 0  # both decomposed anyway: nothing to decide together


def test_residual_blocks_pair_their_convolutions_timed_as_their_form_runs(tmp_path, monkeypatch):
    """A residual block's conv1 → conv2 is a chained pair that ends in the activation after the skip's sum;
    timed with the sum and that activation in a decomposed conv2's output pass, as `ChainedResidualBlock` runs."""
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD

    from nnunet_tucker.plan import chainable_pairs, timing

    network, _ = build("resenc3d")
    pairs = chainable_pairs(network)
    blocks = [m for m in network.modules() if isinstance(m, BasicBlockD)]
    assert blocks and all(pairs[id(b.conv1.conv)] == (b.conv2.conv, b.conv1.nonlin, b.nonlin2) for b in blocks)
    ends = []
    chunked = timing.normalized_activated
    monkeypatch.setattr(timing, "normalized_activated", lambda *a: ends.append(a[3:]) or chunked(*a))
    block, shape = blocks[-1], (1, 40, 4, 8, 8)
    timer = LayerTimer("cpu", cache_dir=tmp_path)
    seconds = timer.pair_seconds(block.conv1.conv, shape, (8, 8), block.conv2.conv, (8, 8), block.conv1.nonlin,
                                 block.nonlin2)
    assert len(seconds) == timer.measured == 4 and all(s > 0 for s in seconds.values())
    assert len(ends) == 2 * (timing.ROUNDS + 1)  # conv2 decomposed, conv1 either: every call adds the skip
    assert all(type(end) is nn.LeakyReLU and skip.shape == shape for end, skip in ends)
    assert all(key.endswith("+residual LeakyReLU") for key in timer.timings)


def test_profiled_prefers_larger_aligned_ranks_when_they_cost_no_time(tmp_path):
    network, shape = build("plain3d")
    timer = ScriptedTimer(tmp_path, lambda conv, c: 1.0 if c is None else 0.5)  # every decomposition alike
    plan = plan_compression(network, TuckerConfig(0.3, policy="profiled", rank_min=2), shape, timer)
    paper = TuckerConfig(0.3, policy="paper", rank_min=2)
    auto = {p.name: p.ranks for p in plan_compression(network, paper, shape)}  # what profiled proposes
    decomposed = [p for p in plan if p.ranks]
    assert decomposed and all(p.reason.startswith(("decomposed, 2.00x", "decomposed, chained pair 2.00x"))
                              for p in decomposed)
    assert all(p.ranks[0] >= auto[p.name][0] and p.ranks[1] >= auto[p.name][1] for p in decomposed)
    assert any(p.ranks != auto[p.name] for p in decomposed)


def test_profiled_picks_the_fastest_alignment(tmp_path):
    """Ranks rounded up to a multiple of 4 are candidates too (on CPUs, GEMMs with 10 output channels
    run slower than with 12): picked where they are fastest, never below the requested ranks."""
    network, shape = build("plain3d")
    config = TuckerConfig(0.3, policy="profiled", rank_min=2)
    requested = {p.name: p.ranks for p in plan_compression(network, TuckerConfig(0.3, policy="paper", rank_min=2),
                                                           shape)}
    timer = ScriptedTimer(tmp_path, lambda conv, c: 1.0 if c is None else 0.4 if c[0] % 8 and not c[0] % 4 else 0.5)
    plan = [p for p in plan_compression(network, config, shape, timer) if p.ranks]
    assert plan and all(p.ranks[0] >= requested[p.name][0] and p.ranks[1] >= requested[p.name][1] for p in plan)
    assert any(p.ranks[0] % 8 and not p.ranks[0] % 4 and requested[p.name][0] % 4 for p in plan)


def test_a_later_load_plans_from_the_saved_profile_alone(tmp_path):
    network, shape = build("plain3d")
    network.eval()
    stats = collect_statistics(network, torch.randn(2, *shape[1:]))
    config = TuckerConfig(0.3, rank_min=2)
    first = plan_compression(network, config, shape, LayerTimer("cpu", cache_dir=tmp_path), statistics=stats)
    later = LayerTimer("cpu", cache_dir=tmp_path)
    assert plan_compression(network, config, shape, later, statistics=stats) == first and later.measured == 0


def test_layer_timer_caches_on_disk(tmp_path):
    conv = nn.Conv3d(4, 6, 3, padding=1)
    timer = LayerTimer("cpu", cache_dir=tmp_path)
    first = timer.seconds(conv, (1, 4, 8, 8, 8), [None, (2, 3)])
    assert timer.measured == 2 and all(s > 0 for s in first.values())
    timer.save()
    again = LayerTimer("cpu", cache_dir=tmp_path)
    assert again.seconds(conv, (1, 4, 8, 8, 8), [None, (2, 3)]) == first and again.measured == 0


def test_profile_shapes_are_bounded_and_layer_shapes_recorded():
    assert profile_input_shape((2, 32, 128, 128, 128), (2, 2, 2)) == (1, 32, 32, 64, 64)  # halved, first axis first
    shape = profile_input_shape((1, 8, 112, 112, 128), (1, 1, 1))
    assert torch.Size(shape[2:]).numel() <= MAX_PROFILE_VOXELS
    network, input_shape = build("plain3d")
    shapes = layer_shapes(network, input_shape)
    stem = network.encoder.stages[0][0].convs[0].conv
    assert shapes[id(stem)] == (input_shape, (1, 8, *input_shape[2:]))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_gemm_forms_match_plain_convolutions(memory_format):
    torch.manual_seed(0)
    conv = nn.Conv3d(12, 10, 3, stride=(1, 2, 2), padding=1)
    tucker = TuckerConv(conv, 5, 4)
    x = torch.randn(2, 12, 6, 8, 10).to(memory_format=memory_format)
    with torch.no_grad():
        plain = tucker.last(tucker.core(tucker.first(x)))
        assert scaled_error(tucker(x), plain) < 1e-5 and tucker(x).is_contiguous()
        tucker.eval()  # at inference on the CPU the core goes to oneDNN directly
        assert scaled_error(tucker(x), plain) < 1e-5 and tucker(x).is_contiguous()
        single = TuckerConv(nn.Conv3d(1, 10, 3, padding=1), 1, 4).eval()  # PyTorch's native-kernel case
        y = torch.randn(1, 1, 16, 16, 20).to(memory_format=memory_format)
        assert scaled_error(single(y), single.last(single.core(single.first(y)))) < 1e-5
        head = nn.Conv3d(12, 3, 1)
        assert scaled_error(PointwiseConv(head)(x), head(x)) < 1e-5


def test_instance_norm_fused_into_the_last_gemm_gives_the_same_outputs():
    network, shape = build("plain3d")
    compressed = copy.deepcopy(network)
    compress_network(compressed, TuckerConfig(0.5, policy="auto", rank_min=2), shape)
    fused = [m for m in compressed.modules() if isinstance(m, TuckerConv) and m.__dict__["_norm"] is not None]
    assert fused and set(compressed.state_dict()) >= {k for k in network.state_dict() if ".norm." in k}
    x = torch.randn(shape)
    with torch.no_grad():
        fast = compressed(x)
        compressed.train()  # unfused: the convolution, then the instance norm on its own
        for m in compressed.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        slow = compressed(x)
    assert scaled_error(fast, slow) < 1e-4  # float32 rounding of two ways to normalise: ~1e-6


def test_fused_instance_norm_statistics_of_any_voxel_count():
    """The channel means come from rows of 16 positions folded: voxel counts that are no multiple of
    16, and rank maps in either memory layout, normalise as the instance norm does."""
    torch.manual_seed(0)
    conv, norm = nn.Conv3d(6, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True)
    nn.init.normal_(norm.weight)
    tucker = TuckerConv(conv, 5, 3)
    for p in tucker.parameters():
        nn.init.normal_(p)
    tucker.fuse_norm(FusedInstanceNorm(norm))
    x = 3 + torch.randn(2, 6, 5, 7, 9)  # 315 voxels; an offset so that the means matter
    with torch.no_grad():
        reference = norm(tucker.last(tucker.core(tucker.first(x))))
        tucker.eval()
        assert scaled_error(tucker(x), reference) < 1e-4
        channels_first = tucker.to_rank_space(x).contiguous()
        assert scaled_error(tucker.from_rank_space(channels_first), reference) < 1e-4


def test_real_timings_of_a_2d_network_with_instance_norms(tmp_path):
    network, shape = build("plain2d")
    plan = plan_compression(network, TuckerConfig(0.5, rank_min=2), shape, LayerTimer("cpu", cache_dir=tmp_path))
    timed = [p for p in plan if p.reason.startswith(("decomposed,", "not faster here"))]
    assert timed and (tmp_path / LayerTimer("cpu", cache_dir=tmp_path).path.name).is_file()


def test_profiled_budget_keeps_forms_that_are_faster_even_exact(tmp_path):
    """Under a MAC budget, a layer whose exact decomposed form (full ranks) times faster than the original stays
    decomposed, up to full ranks, instead of going back to the slower original when the budget allows; where no
    form is faster, the original is taken back as before. Both plans within the budget."""
    network, shape = build("plain3d")
    config = TuckerConfig(mac_budget=0.95, rank_min=2)
    plans = {name: plan_compression(network, config, shape, ScriptedTimer(tmp_path / name, seconds))
             for name, seconds in (("faster", lambda conv, c: 1.0 if c is None else 0.5),
                                   ("slower", lambda conv, c: 1.0 if c is None else 0.97))}
    eligible = [i for i, p in enumerate(plans["slower"]) if p.reason.startswith("budget")]
    assert eligible and any(plans["slower"][i].reason == "budget: kept" for i in eligible)
    faster = [plans["faster"][i] for i in eligible]
    assert all(p.ranks and p.reason.endswith("exact form 2.00x faster here") for p in faster)
    assert any(p.ranks == clamp_ranks(p.spec, p.spec.in_channels, p.spec.out_channels) for p in faster)
    for plan in plans.values():
        report = compress_network(copy.deepcopy(network), config, shape, plan=plan)
        assert report.macs_after <= 0.95 * report.macs_before
