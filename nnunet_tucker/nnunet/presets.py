"""Built-in architectures of the published TotalSegmentator models, for reports and benchmarks.

Reconstructed from the published parameter counts (the weights are not available offline):
PlainConvUNet, 3x3x3 kernels, two convs per stage, instance norm, leaky ReLU, conv bias.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn


@dataclass(frozen=True)
class Preset:
    features: tuple[int, ...]
    num_classes: int
    patch_size: tuple[int, int, int]
    description: str


PRESETS = {
    "totalseg-1.5mm": Preset(
        (32, 64, 128, 256, 320, 320), 25, (128, 128, 128),
        "TotalSegmentator 1.5 mm part (Datasets 291-295), 6 stages, patch 128³",
    ),
    "totalseg-3mm": Preset(
        (32, 64, 128, 256, 320), 118, (112, 112, 128),
        "TotalSegmentator 3 mm --fast (Dataset 297), 5 stages, 118 outputs, patch 112×112×128",
    ),
}


def build_preset(name: str, num_classes: int | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """The preset's network (randomly initialised, eval mode) and its input shape (1, 1, *patch)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    n = len(p.features)
    network = PlainConvUNet(
        input_channels=1,
        n_stages=n,
        features_per_stage=list(p.features),
        conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * n,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        n_conv_per_stage=[2] * n,
        num_classes=p.num_classes if num_classes is None else num_classes,
        n_conv_per_stage_decoder=[2] * (n - 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )
    return network.eval(), (1, 1, *p.patch_size)
