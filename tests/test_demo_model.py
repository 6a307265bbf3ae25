"""The shipped demo models are what demo_model builds: ordinary nnU-Net model folders of the planned networks,
narrowed (fast)."""

import json

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_tucker.tools.demo_model import (
    BATCH_SIZE_CAP,
    CHECKPOINT_KEYS,
    CONFIGURATION,
    PLAIN,
    RESENC,
    _narrow_architecture,
    demo_model_folder,
    resenc_demo_model_folder,
)


@pytest.mark.parametrize("folder, variant, network_class", [
    (demo_model_folder, PLAIN, PlainConvUNet),
    (resenc_demo_model_folder, RESENC, ResidualEncoderUNet),
])
def test_shipped_model_folders_load_in_nnunet_as_planned_and_narrowed(folder, variant, network_class):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = folder()
    assert folder.name == variant.model_folder_name
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["plans_name"] == variant.plans_name
    assert plans["experiment_planner_used"] == (variant.planner or "ExperimentPlanner")
    configuration = plans["configurations"][CONFIGURATION]
    kwargs = configuration["architecture"]["arch_kwargs"]
    assert kwargs["features_per_stage"] == list(variant.features_cap)
    assert configuration["batch_size"] <= BATCH_SIZE_CAP
    if variant is RESENC:  # the residual blocks as nnUNetPlannerResEncM plans them
        assert kwargs["n_blocks_per_stage"] == [1, 3, 4, 6, 6]
    assert sorted(p.name for p in folder.glob("fold_*")) == [f"fold_{f}" for f in variant.folds]
    for fold in variant.folds:
        checkpoint = torch.load(folder / f"fold_{fold}" / "checkpoint_final.pth", weights_only=False)
        assert set(checkpoint) == set(CHECKPOINT_KEYS) and checkpoint["trainer_name"] == "nnUNetTrainer"
        assert checkpoint["inference_allowed_mirroring_axes"] is None
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), variant.folds)
    assert type(predictor.network) is network_class


def test_narrowing_caps_features_and_batch_size(tmp_path):
    plans_file = tmp_path / "plans.json"
    arch = {"arch_kwargs": {"features_per_stage": [32, 64, 128, 256, 320]}}
    plans_file.write_text(json.dumps({"configurations": {CONFIGURATION: {"batch_size": 16, "architecture": arch}}}))
    assert _narrow_architecture(plans_file, RESENC.features_cap) == [8, 16, 32, 32, 32]
    configuration = json.loads(plans_file.read_text())["configurations"][CONFIGURATION]
    assert configuration["batch_size"] == BATCH_SIZE_CAP
    assert configuration["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 32, 32]
    arch["arch_kwargs"]["features_per_stage"] = [32] * 6
    plans_file.write_text(json.dumps({"configurations": {CONFIGURATION: {"batch_size": 2, "architecture": arch}}}))
    with pytest.raises(RuntimeError, match="6 stages"):
        _narrow_architecture(plans_file)
