"""Trained nnU-Net model folders: load one uncompressed, and write a compressed copy of one.

A compressed folder is an ordinary nnU-Net model folder (dataset.json, plans.json,
fold_X/checkpoint_*.pth) whose checkpoints hold the decomposed weights and whose plans.json names
`TuckerNetwork` with every layer's ranks, plus ``tucker_manifest.json`` recording what was done.
The source folder is only read; the output is built in a temporary folder and moved into place.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..accounting import CompressionReport
from ..config import TuckerConfig
from .architecture import COMPRESSED_KEY, compressed_architecture, is_compressed

logger = logging.getLogger(__name__)

MANIFEST_NAME = "tucker_manifest.json"


class ModelFolderError(ValueError):
    """A model folder or checkpoint that cannot be used; the message says which file and why."""


@dataclass
class TrainedModel:
    """A model folder loaded by nnU-Net's own predictor, uncompressed."""

    folder: Path
    network: nn.Module
    input_shape: tuple[int, ...]
    plans: dict
    dataset_json: dict
    configuration: str
    folds: list[str]
    checkpoints: list[dict[str, Any]]  # each fold's checkpoint entries but its weights
    fold_state_dicts: list[dict[str, torch.Tensor]]
    predictor: Any  # the nnUNetPredictor that loaded it (preprocessing for calibration)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelFolderError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    missing = {"network_weights", "trainer_name", "init_args"} - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise ModelFolderError(f"{path} is not an nnU-Net checkpoint: it lacks {sorted(missing)}")
    return checkpoint


def _available_folds(folder: Path, checkpoint_name: str) -> list[str]:
    return sorted(p.parent.name[len("fold_"):] for p in folder.glob(f"fold_*/{checkpoint_name}"))


def load_trained_model(
    folder: str | Path, folds: list[str] | None = None, checkpoint_name: str = "checkpoint_final.pth"
) -> TrainedModel:
    """Load `folder` with `nnUNetPredictor.initialize_from_trained_model_folder` on the CPU.

    Checkpoints are checked first, so a truncated or foreign one gives a clear error. Compression
    is switched off for this load (whatever ``TUCKER_*`` or plans.json say).
    """
    from .predictor import TuckerPredictor, input_shape_of

    folder = Path(folder)
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise ModelFolderError(f"{folder} is not an nnU-Net model folder: it has no {name}")
    folds = [str(f) for f in folds] if folds else _available_folds(folder, checkpoint_name)
    if not folds:
        raise ModelFolderError(f"{folder} has no fold_*/{checkpoint_name}")
    checkpoints = [
        {k: v for k, v in _read_checkpoint(folder / f"fold_{f}" / checkpoint_name).items() if k != "network_weights"}
        for f in folds
    ]

    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints; keep stdout clean for --json
        predictor = TuckerPredictor(device=torch.device("cpu"), tucker_config=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(
            str(folder), [f if f == "all" else int(f) for f in folds], checkpoint_name
        )
    return TrainedModel(
        folder, predictor.network, input_shape_of(predictor), predictor.plans_manager.plans,
        predictor.dataset_json, checkpoints[0]["init_args"]["configuration"], folds, checkpoints,
        predictor.list_of_parameters, predictor,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    versions = {}
    for name in ("nnunet-tucker", "nnunetv2", "torch", "tensorly", "dynamic-network-architectures"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))


def compress_model_folder(
    source: str | Path,
    target: str | Path,
    config: TuckerConfig,
    folds: list[str] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
    overwrite: bool = False,
) -> CompressionReport:
    """Write a compressed copy of the model folder `source` to `target`; return the report.

    Refuses an existing `target` unless `overwrite`, a `target` inside `source`, and a source that
    is already compressed. Nothing is left behind at `target` when anything fails.
    """
    source, target = Path(source).resolve(), Path(target).resolve()
    if target == source or source in target.parents:
        raise ModelFolderError(f"the output {target} must lie outside the source model folder {source}")
    if target.exists() and not overwrite:
        raise ModelFolderError(f"{target} exists; pass --overwrite to replace it")
    plans_path = source / "plans.json"
    if plans_path.is_file() and is_compressed(json.loads(plans_path.read_text())):
        raise ModelFolderError(f"{source} is already compressed by nnunet-tucker (see its {MANIFEST_NAME})")

    from .predictor import compress_folds

    model = load_trained_model(source, folds, checkpoint_name)
    report, converted = compress_folds(model.predictor, config, str(source))

    plans = copy.deepcopy(model.plans)
    configuration = plans["configurations"][model.configuration]
    configuration["architecture"] = compressed_architecture(_resolved_architecture(model), report.layers)
    plans = {
        COMPRESSED_KEY: {
            "note": "compressed by nnunet-tucker; loading it needs the package: pip install nnunet-tucker",
            "config": config.to_dict(),
            "configuration": model.configuration,
            "manifest": MANIFEST_NAME,
        },
        **plans,
    }
    manifest = {
        "source": str(source),
        "source_checkpoints": {
            f"fold_{f}/{checkpoint_name}": _sha256(source / f"fold_{f}" / checkpoint_name) for f in model.folds
        },
        "configuration": model.configuration,
        "config": config.to_dict(),
        "layers": [
            {"name": r.name, "ranks": list(r.ranks) if r.ranks else None, "reason": r.reason,
             "relative_error": r.relative_error}
            for r in report.layers
        ],
        "per_fold_relative_errors": [errors for _, errors in converted],
        **{k: report.extra[k] for k in ("calibration", "profile") if k in report.extra},
        "params_before": report.params_before, "params_after": report.params_after,
        "macs_before": report.macs_before, "macs_after": report.macs_after, "input_shape": report.input_shape,
        "versions": _versions(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the model folder should look like any other
    try:
        shutil.copy2(source / "dataset.json", staging / "dataset.json")
        _write_json(staging / "plans.json", plans)
        _write_json(staging / MANIFEST_NAME, manifest)
        for fold, checkpoint, (state, _) in zip(model.folds, model.checkpoints, converted, strict=True):
            (staging / f"fold_{fold}").mkdir()
            torch.save(
                {
                    "network_weights": state,
                    "trainer_name": checkpoint["trainer_name"],
                    "init_args": {"configuration": model.configuration, "fold": fold},
                    "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes"),
                    "current_epoch": checkpoint.get("current_epoch"),
                },
                staging / f"fold_{fold}" / checkpoint_name,
            )
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "previous")
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s: %s", target, report.summary())
    return report


def _resolved_architecture(model: TrainedModel) -> dict[str, Any]:
    """The configuration's architecture entry, with inheritance (``inherits_from``) resolved."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration = PlansManager(model.plans).get_configuration(model.configuration).configuration
    return copy.deepcopy(configuration["architecture"])
