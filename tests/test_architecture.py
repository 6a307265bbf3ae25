import pytest
import torch
from networks import build
from torch import nn

from nnunet_tucker import TuckerConfig, compress_network
from nnunet_tucker.layers import TuckerConv
from nnunet_tucker.nnunet.architecture import NETWORK_CLASS_NAME, TuckerNetwork, compressed_architecture
from nnunet_tucker.plan import plan_compression, plan_compression_from_ranks

BASE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [8, 16, 24], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2] * 3,
        "n_conv_per_stage_decoder": [2] * 2, "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def test_compressed_architecture_rebuilds_the_compressed_structure():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    original = get_network_from_plans(BASE["network_class_name"], BASE["arch_kwargs"], BASE["_kw_requires_import"],
                                      1, 3, deep_supervision=False).eval()
    config = TuckerConfig(0.5, policy="auto", rank_min=4)
    plan = plan_compression(original, config)
    entry = compressed_architecture(BASE, plan)
    assert entry["network_class_name"] == NETWORK_CLASS_NAME
    compress_network(original, config)
    # nnU-Net's own builder, as used when a compressed model folder is loaded
    rebuilt = get_network_from_plans(entry["network_class_name"], entry["arch_kwargs"], entry["_kw_requires_import"],
                                     1, 3, deep_supervision=False).eval()
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original(x))


def test_ranks_for_unknown_layers_are_rejected():
    net, _ = build("plain3d")
    with pytest.raises(ValueError, match="does not have"):
        plan_compression_from_ranks(net, {"encoder.nope": [2, 2]})
    with pytest.raises(ValueError, match="does not have"):
        TuckerNetwork(1, 3, BASE, {"encoder.nope": [2, 2]})


def test_decomposed_layers_are_never_planned_again():
    net, _ = build("plain3d")
    config = TuckerConfig(0.5, rank_min=2)
    kept = {layer.name for layer in plan_compression(net, config) if layer.ranks is None}
    compress_network(net, config)
    inside_decomposed = {inner for name, module in net.named_modules() if isinstance(module, TuckerConv)
                         for inner, _ in module.named_modules(prefix=name)}
    plain = {name for name, module in net.named_modules() if type(module) in (nn.Conv3d, nn.ConvTranspose3d)
             and name not in inside_decomposed}
    again = [layer.name for layer in plan_compression(net, config)]
    assert plain and plain <= kept  # the stem (one input channel) is kept as it was: a plan of it is not empty
    assert sorted(again) == sorted(plain)  # every convolution not decomposed is planned again, once
    assert inside_decomposed and not set(again) & inside_decomposed
