import json
import pickle

import pytest
import torch
from networks import build, scaled_error
from torch import nn

from nnunet_tucker import TuckerConfig, compress_network
from nnunet_tucker.counting import count_macs, count_params
from nnunet_tucker.layers import TuckerConv
from nnunet_tucker.plan import plan_compression
from nnunet_tucker.swap import convert_state_dict, converted_shapes, swap_modules
from nnunet_tucker.tools.presets import build_preset


def _relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_full_rank_paper_compression_is_exact(architecture):
    net, shape = build(architecture)
    x = torch.randn(shape)
    with torch.no_grad():
        reference = net(x)
        report = compress_network(net, TuckerConfig(1.0, policy="paper", rank_min=1), shape)
        out = net(x)
    assert report.decomposed_layers > 0
    assert sum(isinstance(m, TuckerConv) for m in net.modules()) == report.decomposed_layers
    assert _relative_error(out, reference) <= 1e-5


def test_shared_modules_are_decomposed_once_and_every_alias_points_at_it():
    net, shape = build("plain3d")
    first_conv = net.encoder.stages[0][0].convs[1]
    report = compress_network(net, TuckerConfig(0.5, policy="auto", rank_min=4), shape)
    assert first_conv.conv is first_conv.all_modules[0] and isinstance(first_conv.conv, TuckerConv)
    assert net.decoder.encoder is net.encoder
    names = [layer.name for layer in report.layers]
    assert len(names) == len(set(names)) and not any("all_modules" in n for n in names)
    distinct = {id(m) for m in net.modules() if isinstance(m, TuckerConv)}
    assert len(distinct) == report.decomposed_layers


def test_converted_state_dict_loads_strictly_into_a_fresh_compressed_network(architecture):
    config = TuckerConfig(0.5, policy="auto", rank_min=2)
    original, shape = build(architecture, seed=1)
    compressed, _ = build(architecture, seed=1)
    compress_network(compressed, config)

    fresh, _ = build(architecture, seed=2)  # other weights: everything must come from the state dict
    plan = plan_compression(fresh, config)
    converted, errors = convert_state_dict(original.state_dict(), plan)
    assert converted_shapes(original.state_dict(), plan) == {k: tuple(v.shape) for k, v in converted.items()}
    swap_modules(fresh, plan)
    fresh.load_state_dict(converted, strict=True)
    x = torch.randn(shape)
    with torch.no_grad():
        assert scaled_error(fresh(x), compressed(x)) < 1e-6  # the same weights and layers
    assert set(errors) == {layer.name for layer in plan if layer.ranks}


def test_plan_is_deterministic_and_exclude_patterns_apply():
    a, _ = build("resenc3d", seed=0)
    b, _ = build("resenc3d", seed=5)
    config = TuckerConfig(0.3, policy="auto", rank_multiple=8, exclude=("decoder.*",))
    plan_a, plan_b = plan_compression(a, config), plan_compression(b, config)
    assert plan_a == plan_b
    assert all(layer.ranks is None for layer in plan_a if layer.name.startswith("decoder."))
    assert all(r % 8 == 0 or r in (layer.spec.in_channels, layer.spec.out_channels)
               for layer in plan_a if layer.ranks for r in layer.ranks)


def test_report_counts_and_serialises():
    net, shape = build("plain3d")
    params, (macs, _) = count_params(net), count_macs(net, shape)
    report = compress_network(net, TuckerConfig(0.5, policy="auto", rank_min=4), shape)
    assert (report.params_before, report.macs_before) == (params, macs)
    assert report.params_after == count_params(net) < params
    assert report.macs_after == count_macs(net, shape)[0] < macs
    data = json.loads(report.to_json())
    assert data["config"]["rank_ratio"] == 0.5 and len(data["layers"]) == len(report.layers)
    for layer in report.layers:
        assert layer.macs_before is not None
        if layer.ranks:
            assert 0 <= layer.relative_error < 1 and layer.params_after < layer.params_before
    table = report.to_table()
    assert "encoder.stages.0.0.convs.0.conv" in table and report.summary() in table


PUBLISHED_1_5MM = {0.9: 27.92, 0.7: 17.35, 0.5: 9.24, 0.4: 6.18, 0.3: 3.69, 0.2: 1.85, 0.1: 0.62, 0.05: 0.25}


@pytest.mark.parametrize("ratio, published", sorted(PUBLISHED_1_5MM.items()))
def test_paper_policy_reproduces_published_parameter_counts(ratio, published):
    net, _ = build_preset("totalseg-1.5mm")
    assert abs(count_params(net) / 1e6 - 31.19) < 0.03
    swap_modules(net, plan_compression(net, TuckerConfig(ratio, policy="paper", rank_min=8)))
    millions = count_params(net) / 1e6
    assert abs(millions - published) <= max(0.03, 0.02 * published), millions


def test_3mm_preset_matches_published_macs():
    net, shape = build_preset("totalseg-3mm")
    assert round(count_macs(net, shape)[0] / 1e9, 1) == 367.8


def test_decoder_reads_skips_without_concatenating_at_inference(monkeypatch):
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

    from nnunet_tucker.layers import Factored
    from nnunet_tucker.swap import forms as swap
    from nnunet_tucker.swap.forms import SkipReadingDecoder

    net, shape = build("plain3d")
    x = torch.randn(shape)
    compress_network(net, TuckerConfig(0.5, policy="auto", rank_min=4), shape)
    keys = set(net.state_dict())
    assert type(net.decoder) is SkipReadingDecoder and set(pickle.loads(pickle.dumps(net)).state_dict()) == keys
    made, folded = [], []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *args, **kwargs: made.append(1) or cat(*args, **kwargs))
    monkeypatch.setattr(swap, "Factored", lambda *args: folded.append(1) or Factored(*args))
    with torch.no_grad():
        out = net(x)
        kept = sum(not isinstance(stage.convs[0].all_modules[0], TuckerConv) for stage in net.decoder.stages)
        assert len(made) == kept < len(net.decoder.stages)  # only stages whose first layer is kept concatenate
        assert 0 < len(folded) == sum(isinstance(stage.convs[0].all_modules[0], TuckerConv)
                                      and isinstance(up, TuckerConv)
                                      for stage, up in zip(net.decoder.stages, net.decoder.transpconvs, strict=True))
        macs = count_macs(net, shape)[0]
        net.decoder.__class__ = UNetDecoder
        reference = net(x)
        assert scaled_error(out, reference) < 1e-5  # the same sums, split over the two parts
        assert count_macs(net, shape)[0] == macs
        net.decoder.__class__ = SkipReadingDecoder
        made.clear()
        net.train()
        net(x)
    assert len(made) == len(net.decoder.stages)  # training concatenates


def test_stacked_decomposed_blocks_chain_their_rank_space_maps_at_inference(monkeypatch):
    """Two decomposed blocks in a row: the first hands the second its first GEMM's output (chunked, the
    full-width map between them never written), the second normalises and activates its output chunk by
    chunk; the same result (activations in place or not), and as before when hooked or training."""
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

    from nnunet_tucker import layers
    from nnunet_tucker.swap import forms as swap

    monkeypatch.setattr(layers, "FUSED_CHUNK", 1000)  # several chunks, the last one short
    monkeypatch.setattr(layers, "OUTPUT_CHUNK", 700)
    net, shape = build("plain3d")
    x = torch.randn(shape)
    compress_network(net, TuckerConfig(0.5, policy="paper", rank_min=4), shape)
    keys = set(net.state_dict())
    stacks = [m for m in net.modules() if isinstance(m, StackedConvBlocks)]
    assert stacks and all(type(m) is swap.ChainedConvBlocks for m in stacks)
    assert set(pickle.loads(pickle.dumps(net)).state_dict()) == keys
    chained, activated = [], []
    fused, chunked = layers.normalized_activated_gemm, layers.normalized_activated
    monkeypatch.setattr(swap, "normalized_activated_gemm", lambda *a: chained.append(1) or fused(*a))
    monkeypatch.setattr(swap, "normalized_activated", lambda *a: activated.append(1) or chunked(*a))
    net.eval()
    with torch.no_grad():
        for inplace in (True, False):
            for m in stacks:
                for block in m.convs:
                    block.nonlin.inplace = inplace
            chained.clear(), activated.clear()
            out = net(x)
            assert len(chained) == len(activated) == len(stacks)  # every stack: two decomposed blocks
            for m in stacks:
                m.__class__ = StackedConvBlocks
            reference = net(x)
            assert scaled_error(out, reference) < 1e-5
            for m in stacks:
                m.__class__ = swap.ChainedConvBlocks
        seen = []
        stacks[0].convs[1].conv.register_forward_hook(lambda m, args, y: seen.append(y.shape))
        chained.clear()
        assert scaled_error(net(x), reference) < 1e-5
        assert len(seen) == 1 and len(chained) == len(stacks) - 1  # the hooked layer runs whole
        net.train()
        chained.clear()
        net(x)
    assert not chained


@pytest.mark.parametrize("architecture", ["plain3d", "resenc3d"])
def test_compressed_network_runs_under_autocast(architecture):
    """nnU-Net autocasts to fp16 on CUDA; CPU autocast to bfloat16 takes the same paths (the skip-reading
    decoder's and the residual blocks' in-place products included) and must give the fp32 result to bfloat16
    precision."""
    net, shape = build(architecture)
    x = torch.randn(shape)
    compress_network(net, TuckerConfig(0.3, policy="paper", rank_min=4), shape)
    net.eval()
    with torch.no_grad():
        reference = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
    assert out.dtype == torch.bfloat16
    assert scaled_error(out.float(), reference) < 0.05


def _close(actual, expected, tolerance=1e-5):
    """Equal up to float rounding, relative to the output's scale."""
    return torch.allclose(actual, expected, rtol=0, atol=tolerance * float(expected.abs().max()))


def _plain_output(net, x, monkeypatch):
    """`net`(x) with each decomposed layer as its three convolutions, each norm on its own and nnU-Net's own
    block forwards (training mode, no forms; these networks have no dropout)."""
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(TuckerConv, "forward", lambda self, z: self.last(self.core(self.first(z))))
        out = net.train()(x)
    net.eval()
    return out


@pytest.fixture
def counted_forms(monkeypatch):
    """Calls of the chained GEMM and of the chunked output pass ("residual" where it adds a skip)."""
    from nnunet_tucker import layers
    from nnunet_tucker.swap import forms

    monkeypatch.setattr(layers, "FUSED_CHUNK", 1000)  # several chunks, the last one short
    monkeypatch.setattr(layers, "OUTPUT_CHUNK", 700)
    calls = []
    fused, chunked = layers.normalized_activated_gemm, layers.normalized_activated
    monkeypatch.setattr(forms, "normalized_activated_gemm", lambda *a: calls.append("chained") or fused(*a))
    monkeypatch.setattr(forms, "normalized_activated", lambda *a: calls.append(
        "residual" if len(a) > 4 and a[4] is not None else "output") or chunked(*a))
    return calls


def test_residual_blocks_chain_and_add_their_skip_in_the_output_pass(monkeypatch, counted_forms):
    """ResEnc's `BasicBlockD`s with both convolutions decomposed: conv1 hands conv2 its rank-space map, conv2
    adds the skip (identity, or pooled 1x1 projection + norm in strided blocks) and activates in its output
    pass; the plain result (activations in place or not); as before with grad, hooked or training."""
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD

    from nnunet_tucker.layers import PointwiseConv
    from nnunet_tucker.swap.forms import ChainedResidualBlock

    net, shape = build("resenc3d")
    x = torch.randn(shape)
    compress_network(net, TuckerConfig(0.5, policy="paper", rank_min=4), shape)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlockD)]
    assert blocks and all(type(b) is ChainedResidualBlock for b in blocks)
    projected = [b for b in blocks if isinstance(b.skip, nn.Sequential)]
    assert 0 < len(projected) < len(blocks)  # identity skips too
    assert all(isinstance(b.skip[-1].conv, PointwiseConv) and max(b.stride) > 1 for b in projected)
    assert all(isinstance(c, TuckerConv) for b in blocks for c in (b.conv1.conv, b.conv2.conv))
    stacks = len(net.decoder.stages) + 1  # one-block stacks (stem, decoder): their output pass
    for inplace in (True, False):
        for b in blocks:
            b.conv1.nonlin.inplace = b.nonlin2.inplace = inplace
        reference = _plain_output(net, x, monkeypatch)
        counted_forms.clear()
        with torch.no_grad():
            out = net(x)
        assert sorted(counted_forms) == sorted(["chained", "residual"] * len(blocks) + ["output"] * stacks)
        assert _close(out, reference)
    counted_forms.clear()
    with torch.enable_grad():  # the plain forms, decoder included
        assert _close(net(x).detach(), reference) and not counted_forms
    seen = []
    blocks[0].conv2.conv.register_forward_hook(lambda m, args, y: seen.append(1))
    projected[0].nonlin2.register_forward_hook(lambda m, args, y: seen.append(2))
    with torch.no_grad():
        assert _close(net(x), reference)
    assert seen == [1, 2]
    assert counted_forms.count("chained") == len(blocks) - 1  # the hooked conv2 runs whole
    assert counted_forms.count("residual") == len(blocks) - 2  # ... and so does the hooked activation's sum
    counted_forms.clear()
    net.train()
    with torch.no_grad():
        net(x)
    assert not counted_forms


def test_residual_block_with_one_decomposed_conv_keeps_what_applies(monkeypatch, counted_forms):
    """conv2 kept: conv1's output pass is chunked, the sum as nnU-Net does it; conv1 kept: conv2 adds the skip."""
    net, shape = build("resenc3d")
    x = torch.randn(shape)
    kept = ("encoder.stages.1.blocks.0.conv2.conv", "encoder.stages.2.blocks.1.conv1.conv")
    compress_network(net, TuckerConfig(0.5, policy="paper", rank_min=4, exclude=kept), shape)
    blocks = [m for m in net.modules() if type(m).__name__ == "ChainedResidualBlock"]
    reference = _plain_output(net, x, monkeypatch)
    with torch.no_grad():
        out = net(x)
    assert _close(out, reference)
    assert counted_forms.count("chained") == len(blocks) - 2
    assert counted_forms.count("residual") == len(blocks) - 1
