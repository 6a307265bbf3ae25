"""Built-in architectures of the published TotalSegmentator models, for reports and benchmarks.

Reconstructed from the published parameter counts (the weights are not available offline):
PlainConvUNet, 3x3x3 kernels, two convs per stage, instance norm, leaky ReLU, conv bias.
`write_preset_model_folder` writes one as an nnU-Net v2 model folder with random weights, so that
nnU-Net's own prediction path can be timed on it (timing only: its segmentations mean nothing).
"""

from __future__ import annotations

import json
import pydoc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHITECTURE_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
CONFIGURATION = "3d_fullres"
MODEL_FOLDER_NAME = f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
# Foreground (body) intensities of a typical CT dataset, in HU, for nnU-Net's CTNormalization.
_CT_INTENSITIES = {"max": 3071.0, "mean": 64.2, "median": 42.0, "min": -1024.0, "percentile_00_5": -958.0,
                   "percentile_99_5": 1322.0, "std": 258.7}


@dataclass(frozen=True)
class Preset:
    features: tuple[int, ...]
    num_classes: int
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    dataset_name: str  # of the random-weight model folder
    description: str


PRESETS = {
    "totalseg-1.5mm": Preset(
        (32, 64, 128, 256, 320, 320), 25, (128, 128, 128), (1.5, 1.5, 1.5), "Dataset981_RandomTotalSeg1p5mm",
        "TotalSegmentator 1.5 mm part (Datasets 291-295), 6 stages, patch 128³",
    ),
    "totalseg-3mm": Preset(
        (32, 64, 128, 256, 320), 118, (112, 112, 128), (3.0, 3.0, 3.0), "Dataset982_RandomTotalSeg3mm",
        "TotalSegmentator 3 mm --fast (Dataset 297), 5 stages, 118 outputs, patch 112×112×128",
    ),
}


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def arch_kwargs(name: str) -> dict[str, Any]:
    """The preset's ``arch_kwargs`` as an nnU-Net plans.json writes them (classes named by import path)."""
    n = len(_preset(name).features)
    return {
        "n_stages": n,
        "features_per_stage": list(_preset(name).features),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def build_preset(name: str, num_classes: int | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """The preset's network (randomly initialised, eval mode) and its input shape (1, 1, *patch)."""
    p = _preset(name)
    kwargs = arch_kwargs(name)
    for key in _REQUIRES_IMPORT:  # as nnU-Net's get_network_from_plans does
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    network_class = pydoc.locate(ARCHITECTURE_CLASS)
    network = network_class(input_channels=1, num_classes=p.num_classes if num_classes is None else num_classes,
                            **kwargs)
    return network.eval(), (1, 1, *p.patch_size)


def _plans(name: str) -> dict[str, Any]:
    """plans.json (nnU-Net 2.8 layout) with the preset as its only configuration, ``3d_fullres``."""
    p = _preset(name)
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": p.dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(p.spacing),
        "original_median_shape_after_transp": list(p.patch_size),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            CONFIGURATION: {
                "data_identifier": f"nnUNetPlans_{CONFIGURATION}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(p.patch_size),
                "median_image_size_in_voxels": [float(s) for s in p.patch_size],
                "spacing": list(p.spacing),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
                "architecture": {
                    "network_class_name": ARCHITECTURE_CLASS,
                    "arch_kwargs": arch_kwargs(name),
                    "_kw_requires_import": _REQUIRES_IMPORT,
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(_CT_INTENSITIES)},
    }


def write_preset_model_folder(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Write the preset as a trained nnU-Net v2 model folder with random (seeded) weights; return it.

    The folder is ``out_dir/<preset.dataset_name>/nnUNetTrainer__nnUNetPlans__3d_fullres`` (``out_dir``
    is laid out like nnUNet_results) and holds dataset.json, plans.json and fold_0/checkpoint_final.pth,
    so nnU-Net's predictors load it as they load any trained model. For timing only.
    """
    p = _preset(name)
    folder = Path(out_dir) / p.dataset_name / MODEL_FOLDER_NAME
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    plans = _plans(name)
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{f"class_{i:03d}": i for i in range(1, p.num_classes)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "name": p.dataset_name.split("_", 1)[1],
        "description": f"{p.description}; random weights (seed {seed}), for timing only",
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network, _ = build_preset(name)
    checkpoint = {
        "network_weights": {k: v.contiguous() for k, v in network.state_dict().items()},
        "trainer_name": "nnUNetTrainer",
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset_json,
                      "device": torch.device("cpu")},
        "inference_allowed_mirroring_axes": (0, 1, 2),
        "current_epoch": 0,
        "optimizer_state": None,
    }
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder
