"""Trained nnU-Net model folders: load one as nnU-Net does, without compressing it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class TrainedModel:
    """A model folder loaded by nnU-Net's own predictor, uncompressed."""

    folder: Path
    network: nn.Module
    input_shape: tuple[int, ...]
    plans: dict
    fold_state_dicts: list[dict[str, torch.Tensor]]


def load_trained_model(
    folder: str | Path, folds: list[str] | None = None, checkpoint_name: str = "checkpoint_final.pth"
) -> TrainedModel:
    """Load `folder` with `nnUNetPredictor.initialize_from_trained_model_folder` on the CPU.

    Compression is switched off for this load (whatever ``TUCKER_*`` or plans.json say).
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    from .predictor import TuckerPredictor

    folder = Path(folder)
    if not (folder / "plans.json").is_file():
        raise FileNotFoundError(f"{folder} is not an nnU-Net model folder: it has no plans.json")
    predictor = TuckerPredictor(device=torch.device("cpu"), tucker_config=False, allow_tqdm=False)
    use_folds = [f if f == "all" else int(f) for f in folds] if folds else None
    predictor.initialize_from_trained_model_folder(str(folder), use_folds, checkpoint_name)
    input_shape = (
        1,
        determine_num_input_channels(predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json),
        *predictor.configuration_manager.patch_size,
    )
    return TrainedModel(folder, predictor.network, input_shape, predictor.plans_manager.plans,
                        predictor.list_of_parameters)
