"""Built-in architectures of the models users run, for reports and benchmarks: TotalSegmentator's and nnU-Net's
residual-encoder presets.

- ``totalseg-1.5mm-organs``, ``-vertebrae``, ``-cardiac``, ``-muscles``, ``-ribs``: the five part models of
  TotalSegmentator's default mode (``-ta total``: Datasets 291-295; ``-ta total_v3``: 831-835), one after the
  other on every CT; ``totalseg-1.5mm`` is the organs part under its older name. ``totalseg-3mm``: its
  ``--fast`` model (Dataset 297; ``total_v3``: 836). Reconstructed from the published parameter counts (the
  weights are not available offline): PlainConvUNet, 3x3x3 kernels, two convs per stage, instance norm, leaky
  ReLU, conv bias. Each output count is the part's classes in TotalSegmentator's class map + background
  (``totalsegmentator.map_to_binary``; tests/test_presets.py compares them with the installed TotalSegmentator).
- ``resenc-m``, ``resenc-l``: nnU-Net's recommended residual-encoder presets as nnU-Net's own planners
  (``nnUNetPlannerResEncM``/``L``) plan them for a CT-like dataset (`RESENC_FINGERPRINT`). The plans they
  wrote ship in ``nnunet_tucker/data/presets/`` and the network is built from their ``3d_fullres``
  configuration; ``python -m nnunet_tucker.tools.presets`` regenerates them with the installed nnU-Net
  (tests/test_presets.py checks that this gives the shipped files).

`write_preset_model_folder` writes a preset as an nnU-Net v2 model folder with random weights, so that
nnU-Net's own prediction path (or TotalSegmentator's, ``totalseg=``) can be timed on it (timing only: its
segmentations mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pydoc
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHITECTURE_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
CONFIGURATION = "3d_fullres"
DEFAULT_TRAINER = "nnUNetTrainer"
MODEL_FOLDER_NAME = f"{DEFAULT_TRAINER}__nnUNetPlans__{CONFIGURATION}"  # of the plain presets, without totalseg=
_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
# Foreground (body) intensities of a typical CT dataset, in HU, for nnU-Net's CTNormalization.
_CT_INTENSITIES = {"max": 3071.0, "mean": 64.2, "median": 42.0, "min": -1024.0, "percentile_00_5": -958.0,
                   "percentile_99_5": 1322.0, "std": 258.7}
PLANS_DIR = Path(__file__).resolve().parents[1] / "data" / "presets"  # the planned presets' plans, as written


@dataclass(frozen=True)
class TotalSegModel:
    """Where TotalSegmentator (2.18) looks for one of its models, read off its source: ``map_tasks_config.py``
    (task -> dataset ids and trainer; dataset id -> `folder`), ``nnunet.py`` (the model folder
    ``<nnUNet_results>/<folder>/<trainer>__<plans>__3d_fullres``; nnUNet_results is its weights folder,
    ``~/.totalsegmentator/nnunet/results`` or ``$TOTALSEG_WEIGHTS_PATH``) and ``map_to_binary.py`` (the classes)."""

    task: str  # TotalSegmentator's -ta
    dataset_id: int
    folder: str  # the dataset folder in its weights folder; it downloads the weights where this is missing
    trainer: str
    class_map: tuple[str, str]  # (dict in totalsegmentator.map_to_binary, key): the model's classes, 1..N
    plans: str = "nnUNetPlans"

    @property
    def model_folder_name(self) -> str:
        return f"{self.trainer}__{self.plans}__{CONFIGURATION}"


@dataclass(frozen=True)
class Preset:
    features: tuple[int, ...]
    num_classes: int  # outputs, background included
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    dataset_name: str  # of the random-weight model folder
    description: str
    totalseg: tuple[TotalSegModel, ...] = ()  # the TotalSegmentator models of this architecture
    planner: str | None = None  # the nnU-Net planner whose shipped plans give the architecture
    plans_name: str = "nnUNetPlans"


_TOTALSEG_PARTS = {  # part -> (total: id, folder; total_v3: id, folder; outputs = classes + background)
    "organs": (291, "Dataset291_TotalSegmentator_part1_organs_1559subj",
               831, "Dataset831_TotalSegmentator_part1_organs_1830subj", 25),
    "vertebrae": (292, "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
                  832, "Dataset832_TotalSegmentator_part2_vertebrae_1559subj", 27),
    "cardiac": (293, "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
                833, "Dataset833_TotalSegmentator_part3_cardiac_1830subj", 19),
    "muscles": (294, "Dataset294_TotalSegmentator_part4_muscles_1559subj",
                834, "Dataset834_TotalSegmentator_part4_muscles_1830subj", 24),
    "ribs": (295, "Dataset295_TotalSegmentator_part5_ribs_1559subj",
             835, "Dataset835_TotalSegmentator_part5_ribs_1559subj", 27),
}
TOTALSEG_PARTS_TRAINER = "nnUNetTrainerNoMirroring"  # the default mode's (both tasks)
TOTALSEG_FAST_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"  # --fast
_RANDOM_IDS = {"organs": 981, "vertebrae": 983, "cardiac": 984, "muscles": 985, "ribs": 986}


def _part_preset(part: str) -> Preset:
    total_id, total_folder, v3_id, v3_folder, outputs = _TOTALSEG_PARTS[part]
    # the organs part keeps the folder the 1.5 mm preset always had
    suffix = "" if part == "organs" else part.title()
    name = f"Dataset{_RANDOM_IDS[part]}_RandomTotalSeg1p5mm{suffix}"
    return Preset(
        (32, 64, 128, 256, 320, 320), outputs, (128, 128, 128), (1.5, 1.5, 1.5), name,
        f"TotalSegmentator 1.5 mm {part} part (Dataset {total_id}; total_v3: {v3_id}), {outputs - 1} classes + "
        "background, 6 stages, patch 128³",
        totalseg=(
            TotalSegModel("total", total_id, total_folder, TOTALSEG_PARTS_TRAINER,
                          ("class_map_5_parts", f"class_map_part_{part}")),
            TotalSegModel("total_v3", v3_id, v3_folder, TOTALSEG_PARTS_TRAINER,
                          ("class_map_5_parts_total_v3", f"class_map_part_{part}")),
        ),
    )


# nnU-Net's residual-encoder planners, run on this fingerprint: a 512×512×300 abdominal CT (0.8×0.8×1.5 mm)
# resampled to 1.5 mm isotropic as TotalSegmentator does, (z, y, x) 300×273×273 voxels; CT intensities; one
# CT channel; 24 organs + background, the size of TotalSegmentator's organs part.
RESENC_FINGERPRINT = {"spacing": (1.5, 1.5, 1.5), "shape": (300, 273, 273), "num_classes": 25}
# preset -> (planner, plans name, random-weight dataset, the 3d_fullres patch the planner chose); the network is
# built from the shipped plans, whose features, patch and spacing tests/test_presets.py compares with these
_RESENC = {
    "resenc-m": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", "Dataset987_RandomResEncM", (128, 128, 128)),
    "resenc-l": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans", "Dataset988_RandomResEncL", (192, 192, 192)),
}


def _planned_preset(name: str) -> Preset:
    planner, plans_name, dataset_name, patch = _RESENC[name]
    return Preset(
        (32, 64, 128, 256, 320, 320), RESENC_FINGERPRINT["num_classes"], patch, RESENC_FINGERPRINT["spacing"],
        dataset_name,
        f"nnU-Net ResEnc {name[-1].upper()} as {planner} plans it for a CT-like dataset (1.5 mm, 300×273×273 "
        f"voxels): ResidualEncoderUNet, 6 stages, blocks 1,3,4,6,6,6, patch {'×'.join(map(str, patch))}, "
        "25 outputs (a CT multi-organ count: 24 organs + background)",
        planner=planner, plans_name=plans_name,
    )


@functools.cache
def _shipped_plans_text(plans_name: str) -> str:
    return (PLANS_DIR / f"{plans_name}.json").read_text()


def shipped_plans(plans_name: str) -> dict[str, Any]:
    """The plans an nnU-Net planner wrote for `RESENC_FINGERPRINT`, as shipped (a fresh copy)."""
    return json.loads(_shipped_plans_text(plans_name))


PRESETS = {
    **{f"totalseg-1.5mm-{part}": _part_preset(part) for part in _TOTALSEG_PARTS},
    "totalseg-3mm": Preset(
        (32, 64, 128, 256, 320), 118, (112, 112, 128), (3.0, 3.0, 3.0), "Dataset982_RandomTotalSeg3mm",
        "TotalSegmentator 3 mm --fast (Dataset 297), 5 stages, 118 outputs, patch 112×112×128",
        totalseg=(
            TotalSegModel("total", 297, "Dataset297_TotalSegmentator_total_3mm_1559subj", TOTALSEG_FAST_TRAINER,
                          ("class_map", "total")),
            TotalSegModel("total_v3", 836, "Dataset836_TotalSegmentator_total_3mm_1559subj", TOTALSEG_FAST_TRAINER,
                          ("class_map", "total_v3")),
        ),
    ),
    **{name: _planned_preset(name) for name in _RESENC},
}
PRESETS["totalseg-1.5mm"] = PRESETS["totalseg-1.5mm-organs"]  # its name before the five parts
# TotalSegmentator's default mode (-ta total or total_v3), in the order it runs them
TOTALSEG_DEFAULT_MODE = tuple(f"totalseg-1.5mm-{part}" for part in _TOTALSEG_PARTS)


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def arch_kwargs(name: str) -> dict[str, Any]:
    """The preset's ``arch_kwargs`` as an nnU-Net plans.json writes them (classes named by import path)."""
    return _plans(name)["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]


def _plain_arch_kwargs(p: Preset) -> dict[str, Any]:
    n = len(p.features)
    return {
        "n_stages": n,
        "features_per_stage": list(p.features),
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
    """The preset's network (randomly initialised, eval mode) and its input shape (1, 1, *patch), built from
    its plans' ``3d_fullres`` architecture as nnU-Net's ``get_network_from_plans`` does (without its weight
    initialisation)."""
    p = _preset(name)
    architecture = _plans(name)["configurations"][CONFIGURATION]["architecture"]
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    network_class = pydoc.locate(architecture["network_class_name"])
    network = network_class(input_channels=1, num_classes=p.num_classes if num_classes is None else num_classes,
                            **kwargs)
    return network.eval(), (1, 1, *p.patch_size)


def _plans(name: str) -> dict[str, Any]:
    """plans.json (nnU-Net 2.8 layout) of the preset: a planned preset's as its planner wrote it, else one with
    the preset as its only configuration, ``3d_fullres``."""
    p = _preset(name)
    if p.planner is not None:
        return shipped_plans(p.plans_name)
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": p.dataset_name,
        "plans_name": p.plans_name,
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
                    "arch_kwargs": _plain_arch_kwargs(p),
                    "_kw_requires_import": list(_REQUIRES_IMPORT),
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(_CT_INTENSITIES)},
    }


def totalseg_model(name: str, task: str) -> TotalSegModel:
    """The TotalSegmentator model of task `task` (``total``, ``total_v3``) that preset `name` is."""
    for model in _preset(name).totalseg:
        if model.task == task:
            return model
    tasks = sorted({m.task for m in _preset(name).totalseg})
    raise ValueError(f"preset {name!r} is no model of TotalSegmentator's task {task!r}"
                     + (f" (it is one of {tasks})" if tasks else ""))


def write_preset_model_folder(name: str, out_dir: Path, seed: int = 0, totalseg: str | None = None,
                              labels: Mapping[int, str] | None = None) -> Path:
    """Write the preset as a trained nnU-Net v2 model folder with random (seeded) weights; return it.

    ``out_dir`` is laid out like nnUNet_results; the folder holds dataset.json, plans.json (a planned preset's:
    all of its planner's configurations) and fold_0/checkpoint_final.pth, so nnU-Net's predictors load it as
    they load any trained model. For timing only.

    - Without `totalseg`: ``out_dir/<preset.dataset_name>/nnUNetTrainer__<plans name>__3d_fullres``
      (``nnUNetv2_predict -d <id> -c 3d_fullres -f 0``, plus ``-p nnUNetResEncUNetLPlans`` for ``resenc-l``).
    - With `totalseg` (a TotalSegmentator task, ``total`` or ``total_v3``): the folder that TotalSegmentator
      looks for when ``out_dir`` is its weights folder (``<home>/nnunet/results``, or
      ``$TOTALSEG_WEIGHTS_PATH``): ``out_dir/<its dataset folder>/<trainer>__nnUNetPlans__3d_fullres``, the
      checkpoint naming that trainer (`totalseg_model`). TotalSegmentator then finds it and downloads nothing.

    `labels` (value -> name, 1..N; e.g. TotalSegmentator's class map of the part) name the classes in
    dataset.json (default ``class_001``...); there must be one per output but background.
    """
    p = _preset(name)
    model = totalseg_model(name, totalseg) if totalseg is not None else None
    dataset_folder = model.folder if model else p.dataset_name
    trainer = model.trainer if model else DEFAULT_TRAINER
    folder = Path(out_dir) / dataset_folder / f"{trainer}__{p.plans_name}__{CONFIGURATION}"
    labels = dict(labels) if labels is not None else {i: f"class_{i:03d}" for i in range(1, p.num_classes)}
    if sorted(labels) != list(range(1, p.num_classes)):
        raise ValueError(f"preset {name!r} segments {p.num_classes - 1} classes (1..{p.num_classes - 1}); "
                         f"labels give {len(labels)}")
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    plans = _plans(name)
    plans["dataset_name"] = dataset_folder
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{labels[i]: i for i in sorted(labels)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "name": dataset_folder.split("_", 1)[1],
        "description": f"{p.description}; random weights (seed {seed}), for timing only",
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network, _ = build_preset(name)
    checkpoint = {
        "network_weights": {k: v.contiguous() for k, v in network.state_dict().items()},
        "trainer_name": trainer,
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset_json,
                      "device": torch.device("cpu")},
        # as nnUNetTrainerNoMirroring (and its variants) save it
        "inference_allowed_mirroring_axes": None if "NoMirroring" in trainer else (0, 1, 2),
        "current_epoch": 0,
        "optimizer_state": None,
    }
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def write_totalseg_models(weights_dir: Path, task: str = "total", seed: int = 0,
                          labels: Mapping[str, Mapping[int, str]] | None = None) -> dict[str, Path]:
    """The five part models of TotalSegmentator's default mode for `task` (``total``, ``total_v3``), random
    weights, written where TotalSegmentator looks for them under its weights folder `weights_dir`; preset ->
    model folder. `labels`: preset -> its class names (`write_preset_model_folder`)."""
    return {name: write_preset_model_folder(name, weights_dir, seed=seed, totalseg=task,
                                            labels=(labels or {}).get(name))
            for name in TOTALSEG_DEFAULT_MODE}


# ------------------------------------------------------------------------------- the planned presets' plans
_PLANNER_MODULE = "nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners"


def plan_with_nnunet(name: str, work_dir: Path) -> dict[str, Any]:
    """The plans nnU-Net's planner of the planned preset `name` writes for `RESENC_FINGERPRINT`, run now with
    the installed nnU-Net in a subprocess: a dataset.json and dataset_fingerprint.json of a CT-like dataset in
    a fresh nnUNet_raw and nnUNet_preprocessed under `work_dir` (no images: the planner reads only those two)."""
    p = _preset(name)
    if p.planner is None:
        raise ValueError(f"preset {name!r} is not planned by nnU-Net")
    raw, preprocessed = Path(work_dir) / "nnUNet_raw", Path(work_dir) / "nnUNet_preprocessed"
    (raw / p.dataset_name).mkdir(parents=True)
    (preprocessed / p.dataset_name).mkdir(parents=True)
    classes = RESENC_FINGERPRINT["num_classes"]
    (raw / p.dataset_name / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{f"class_{i:03d}": i for i in range(1, classes)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO",  # no image to guess the reader from
        "dataset": {"case_000": {"images": ["imagesTr/case_000_0000.nii.gz"], "label": "labelsTr/case_000.nii.gz"}},
    }, indent=4))
    (preprocessed / p.dataset_name / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": [list(RESENC_FINGERPRINT["spacing"])],
        "shapes_after_crop": [list(RESENC_FINGERPRINT["shape"])],
        "foreground_intensity_properties_per_channel": {"0": dict(_CT_INTENSITIES)},
        "median_relative_size_after_cropping": 1.0,
    }, indent=4))
    code = f"from {_PLANNER_MODULE} import {p.planner}; {p.planner}({p.dataset_name!r}).plan_experiment()"
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
           "nnUNet_results": str(Path(work_dir) / "nnUNet_results")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{p.planner} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads((preprocessed / p.dataset_name / f"{p.plans_name}.json").read_text())


def _plans_text(plans: dict[str, Any]) -> str:
    return json.dumps(plans, indent=4) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_tucker.tools.presets",
        description=f"Regenerate the planned presets' plans in {PLANS_DIR} with the installed nnU-Net's planners.")
    parser.parse_args(argv)
    PLANS_DIR.mkdir(parents=True, exist_ok=True)
    for name, p in PRESETS.items():
        if p.planner is not None:
            with tempfile.TemporaryDirectory(prefix="nnunet_tucker_plans_") as tmp:
                plans = plan_with_nnunet(name, Path(tmp))
            path = PLANS_DIR / f"{p.plans_name}.json"
            path.write_text(_plans_text(plans))
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
