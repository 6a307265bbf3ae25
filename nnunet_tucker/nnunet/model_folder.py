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
import glob
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

from ..config import TuckerConfig, creation_problem
from ..errors import ModelFolderError, TuckerConfigError
from ..report import CompressionReport
from .architecture import COMPRESSED_KEY, compressed_architecture, is_compressed

logger = logging.getLogger(__name__)

MANIFEST_NAME = "tucker_manifest.json"


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


def _is_fold(name: str) -> bool:
    return name.isdigit() or name == "all"


def _available_folds(folder: Path, checkpoint_name: str) -> list[str]:
    """The folds nnU-Net would use: ``fold_<n>/`` and ``fold_all/`` (a ``fold_0_backup/`` is none)."""
    folds = [p.parent.name[len("fold_"):] for p in folder.glob(f"fold_*/{checkpoint_name}")]
    return sorted(filter(_is_fold, folds), key=lambda f: (f == "all", int(f) if f != "all" else 0))


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
    wrong = [f for f in folds if not _is_fold(f)]
    if wrong:
        raise ModelFolderError(f"fold(s) {wrong} are not folds: give fold numbers such as 0 1 2, or all")
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


def sha256_of(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
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

    Refuses a source that is already compressed and every `target` that would put a model at risk
    (see `_check_target`); with `overwrite`, only a folder this package wrote is replaced. Nothing is
    left behind at `target` when anything fails, and staging folders of interrupted runs are removed.
    """
    if config.calibration is None:
        raise TuckerConfigError(
            "compress predicts no images, so it has none to calibrate on by itself: pass --calibration DIR "
            "(a few unlabelled images in the model's input format, CASE_0000.nii.gz, ...; the fit keeps the "
            "prediction on them) or --calibration none (the weights alone: quality unverified)")
    source, target = Path(source).resolve(), Path(target).resolve()
    _check_target(source, target, overwrite)
    plans_path = source / "plans.json"
    if plans_path.is_file() and is_compressed(json.loads(plans_path.read_text())):
        raise ModelFolderError(f"{source} is already compressed by nnunet-tucker (see its {MANIFEST_NAME})")
    _clean_leftovers(target)

    from .predictor import UNCOMPRESSED, folder_calibration, measured_compression

    model = load_trained_model(source, folds, checkpoint_name)
    calibration = None if config.weights_only else folder_calibration(model.predictor, config)
    compressed, chosen = measured_compression(model.predictor, config, str(source), calibration)
    if compressed is UNCOMPRESSED:
        raise ModelFolderError(f"no rank ratio or MAC budget keeps every class of {source} at min_agreement="
                               f"{config.min_agreement} on the held-out case: nothing was written to {target}")
    (report, converted), config = compressed, chosen

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
            f"fold_{f}/{checkpoint_name}": sha256_of(source / f"fold_{f}" / checkpoint_name) for f in model.folds
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
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix(target, "tmp")))
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
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix(target, "old")))
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


def _protected_folders() -> list[Path]:
    """Folders whose every ancestor must stay: nnU-Net's and TotalSegmentator's data and model folders."""
    names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH")
    return [Path(os.environ[n]).expanduser().resolve() for n in names if os.environ.get(n)]


def _check_target(source: Path, target: Path, overwrite: bool) -> None:
    """Refuse (ModelFolderError) an output folder that could cost the user data: one inside the source
    or holding it (any depth, symlinks resolved), one that holds an nnU-Net or TotalSegmentator data
    folder in use, an existing folder without `overwrite`, and with it anything but a folder this
    package wrote; also an output that cannot be created, before any long work."""
    if target == source or source in target.parents:
        raise ModelFolderError(f"the output {target} lies inside the source model folder {source}; "
                               "choose an output folder outside it")
    if target in source.parents:
        raise ModelFolderError(f"the output {target} holds the source model folder {source}; writing it would "
                               "replace the source: choose a new folder, e.g. a sibling of the source")
    for folder in _protected_folders():
        if target == folder or target in folder.parents:
            raise ModelFolderError(f"the output {target} holds {folder}, a data or model folder in use; choose a "
                                   "new folder for the compressed model, e.g. a sibling of the source")
    if target.is_file():
        raise ModelFolderError(f"the output {target} is a file; give a new folder")
    if target.exists():
        if not overwrite:
            raise ModelFolderError(f"{target} exists; pass --overwrite to replace it")
        if not (target / MANIFEST_NAME).is_file():
            raise ModelFolderError(f"{target} exists and is not a model folder written by nnunet-tucker (it has no "
                                   f"{MANIFEST_NAME}); --overwrite only replaces such a folder: choose a new one")
    problem = creation_problem(target)
    if problem:
        raise ModelFolderError(f"cannot create the output {target}: {problem}")


def _staging_prefix(target: Path, kind: str) -> str:
    """Name prefix of a hidden staging folder next to `target`; it names the writing process."""
    return f".{target.name}.{kind}-{os.getpid()}-"


def _clean_leftovers(target: Path) -> None:
    """Remove the staging folders next to `target` left by runs that were killed (their process is gone);
    a previous output caught mid-swap is put back first."""
    for leftover in sorted(target.parent.glob(f".{glob.escape(target.name)}.*-*-*")):
        kind, _, rest = leftover.name[len(target.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _running(int(pid)):
            continue
        if kind == "old" and (leftover / "previous").is_dir() and not target.exists():
            os.replace(leftover / "previous", target)
            logger.warning("restored %s from an interrupted run", target)
        shutil.rmtree(leftover, ignore_errors=True)
        logger.info("removed %s, left by an interrupted run", leftover)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _resolved_architecture(model: TrainedModel) -> dict[str, Any]:
    """The configuration's architecture entry, with inheritance (``inherits_from``) resolved."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration = PlansManager(model.plans).get_configuration(model.configuration).configuration
    return copy.deepcopy(configuration["architecture"])
