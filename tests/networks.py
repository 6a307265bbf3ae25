"""Small networks of the kinds nnU-Net 2.8 plans, for fast unit tests."""

from __future__ import annotations

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

# in-plane-only first stage and downsampling, as nnU-Net plans for thick-slice CT
ANISOTROPIC_4_STAGES = dict(
    kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
)

ARCHITECTURES = {
    "plain3d": dict(
        cls=PlainConvUNet, dims=3, input_shape=(1, 1, 16, 32, 32),
        kwargs=dict(
            input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 48], conv_op=nn.Conv3d,
            **ANISOTROPIC_4_STAGES,
            n_conv_per_stage=2, num_classes=3, n_conv_per_stage_decoder=2, conv_bias=True,
        ),
    ),
    "plain3d_nobias": dict(
        cls=PlainConvUNet, dims=3, input_shape=(1, 2, 16, 16, 16),
        kwargs=dict(
            input_channels=2, n_stages=3, features_per_stage=[8, 16, 24], conv_op=nn.Conv3d,
            kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=2, num_classes=2,
            n_conv_per_stage_decoder=1, conv_bias=False,
        ),
    ),
    "plain2d": dict(
        cls=PlainConvUNet, dims=2, input_shape=(1, 1, 32, 32),
        kwargs=dict(
            input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 32], conv_op=nn.Conv2d,
            kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage=2, num_classes=4,
            n_conv_per_stage_decoder=2, conv_bias=True,
        ),
    ),
    "resenc3d": dict(
        cls=ResidualEncoderUNet, dims=3, input_shape=(1, 1, 16, 32, 32),
        kwargs=dict(
            input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 40], conv_op=nn.Conv3d,
            **ANISOTROPIC_4_STAGES,
            n_blocks_per_stage=[1, 2, 2, 2], num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True,
        ),
    ),
    "resenc2d_nobias": dict(
        cls=ResidualEncoderUNet, dims=2, input_shape=(1, 1, 32, 32),
        kwargs=dict(
            input_channels=1, n_stages=3, features_per_stage=[8, 16, 32], conv_op=nn.Conv2d,
            kernel_sizes=3, strides=[1, 2, 2], n_blocks_per_stage=[1, 1, 2], num_classes=2,
            n_conv_per_stage_decoder=1, conv_bias=False,
        ),
    ),
}


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest deviation of `actual` from `expected`, relative to the largest magnitude of `expected`.
    Float rounding is relative to the values' scale, and its size depends on the CPU, the BLAS and the
    thread count: a tolerance on this holds on every machine where an absolute one on raw outputs may not."""
    return float((actual - expected).abs().max() / expected.abs().max())


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A network of the named kind with random weights (random affine norms too), in eval mode."""
    spec = ARCHITECTURES[name]
    norm = nn.InstanceNorm3d if spec["dims"] == 3 else nn.InstanceNorm2d
    torch.manual_seed(seed)
    net = spec["cls"](
        **spec["kwargs"], norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, norm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval(), spec["input_shape"]
