"""Compression inside nnU-Net's predictor: `TuckerPredictor` and `compress_predictor`.

nnU-Net reloads every fold's state dict for every case (`predict_logits_from_preprocessed_data`),
so the network is compressed once per model load and every fold's state dict is converted once,
through the disk cache; the predictor then runs unchanged (folds, mirroring, sliding window,
CPU/CUDA, ``nnUNet_compile``).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch import nn

from .. import __version__
from ..agreement import describe_worst, measure_agreement
from ..backend import check_backend, network_for_backend
from ..calibrate import calibrate
from ..compress import compress_network
from ..config import (
    LOOSER_TARGETS,
    TuckerConfig,
    TuckerConfigError,
    default_cache_dir,
    read_env,
    read_plans,
    report_path,
    resolve_config,
)
from ..errors import CalibrationError
from ..files import atomic_write, file_lock, state_dict_digest
from ..memory import large_buffers_returned
from ..plan import LayerPlan, plan_compression, unwrap
from ..plan.timing import LayerTimer
from ..report import CompressionReport
from ..swap import RefitData, convert_state_dict, converted_shapes
from .architecture import is_compressed
from .cache import DecompositionCache, store_json
from .calibration_images import (
    calibration_cases,
    calibration_digest,
    first_case_patches,
    held_out_case,
    held_out_tiles,
    load_calibration_patches,
    load_held_out_tiles,
    patches_digest,
)
from .pipeline import speed_up_pipeline

logger = logging.getLogger("nnunet_tucker")
# The models this process has self-calibrated, in order: a run of several models (TotalSegmentator's default
# mode loads five, one after the other, each with its own predictor) calibrates each on its first case in turn,
# and no predictor knows how many will follow, so progress counts those begun.
_SELF_CALIBRATED: list[str] = []
# Below this Dice of any class against the original on held-out tiles, a calibrated compression warns.
AGREEMENT_WARNING = 0.95
# What a self-calibration with a floor (`min_agreement`) comes to when no plan reaches it: the model runs uncompressed.
UNCOMPRESSED = "uncompressed"
# A floor missed: at most this many looser targets are fitted, besides the last (every rank kept: exact, and cheap)
FLOOR_FITS = 3


def _ensure_visible_logging() -> None:
    """Route INFO lines to stderr when nothing else configured logging (nnU-Net's CLIs do not,
    and TotalSegmentator swallows stdout)."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("nnunet-tucker: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def input_shape_of(predictor: nnUNetPredictor) -> tuple[int, ...]:
    """The network input of one sliding-window patch of an initialised predictor: (1, C, *patch)."""
    channels = determine_num_input_channels(
        predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    )
    return (1, channels, *predictor.configuration_manager.patch_size)


def requested_config(predictor: nnUNetPredictor) -> TuckerConfig | None:
    """The config that applies to `predictor`: its own `tucker_config` fields > ``TUCKER_*`` > plans."""
    explicit = getattr(predictor, "tucker_config", None)
    if explicit is False:
        return None
    if isinstance(explicit, TuckerConfig):
        return explicit
    plans = predictor.plans_manager.plans if predictor.plans_manager is not None else {}
    return resolve_config(read_plans(plans), read_env(), explicit or {})


class _NeedsFirstCase(Exception):
    """Raised where self-calibration needs the patches of the first case, which is not at hand yet."""


@dataclass(frozen=True)
class Calibration:
    """The data a compression is calibrated on: `key` names their content (statistics are cached under it),
    `patches()` gives them (N, C, *patch) when first needed, `info` describes them for the log and report."""

    key: str
    patches: Callable[[], torch.Tensor]
    info: dict[str, Any]
    # tiles to measure the agreement on, their masks and the case's name (None: nothing to measure on)
    held_out: Callable[[], tuple[torch.Tensor, torch.Tensor, str] | None] = lambda: None
    # the voxels of the patches the fit uses, (N, *patch) bool (None: all; `calibrate.collect_statistics`)
    fitted: Callable[[], torch.Tensor | None] = lambda: None


def compress_predictor(predictor: nnUNetPredictor, source: str | None = None) -> CompressionReport | None:
    """Compress an initialised predictor's network and fold weights if compression is asked for.

    Does nothing (returns None) when no config applies, when the predictor carries no fold
    weights (nnU-Net's trainer validates its live training network that way), or when this
    load was already compressed. A config without a calibration folder is calibrated on the first
    case the predictor segments: from the cache when this model was so calibrated before, else
    the compression waits for that case (`finish_compression`).
    """
    config = requested_config(predictor)
    if predictor.plans_manager is not None and is_compressed(predictor.plans_manager.plans):
        if config is not None:
            _ensure_visible_logging()
            logger.warning("%s is already compressed by nnunet-tucker; the compression request is ignored",
                           source or "this model")
        _run_compressed_folder(predictor)
        return None
    if config is None:
        return None
    folds = predictor.list_of_parameters
    if not folds:
        logger.debug("no fold weights to compress (training-time validation); left as is")
        return None
    if getattr(predictor, "_tucker_compressed_folds", None) is folds or getattr(predictor, "_tucker_pending", None):
        return None
    _ensure_visible_logging()
    report_file = report_path()  # a bad path is an error now, not after the work
    check_backend(config.backend)  # so is OpenVINO asked for and missing

    if config.calibration is None:
        record = _calibration_record(predictor, config)
        compressed = _from_record(predictor, config, source, record)
        if compressed is UNCOMPRESSED:
            return None
        if compressed is None:
            predictor._tucker_pending = (config, source, report_file, record)
            # nnU-Net's worker processes would start for this first case too: the faster pipeline from now on
            speed_up_pipeline(predictor)
            hint = "" if _SELF_CALIBRATED else ("; set TUCKER_CALIBRATION to a folder of images to choose others, "
                                                "or to 'none' for the weights alone")
            logger.info("%s: calibrating on the first case this run segments (once per model%s)%s",
                        config.describe(), hint, f" [{source}]" if source else "")
            return None
        return _apply(predictor, *compressed, source, report_file)
    if config.weights_only:
        logger.warning("TUCKER_CALIBRATION=none: the factors are fitted to the weights alone, and the quality of "
                       "the compressed model is unverified; check it with nnunet-tucker evaluate")
    with large_buffers_returned():  # one-off work, the backend's conversion included
        if config.weights_only:
            compressed, _ = measured_compression(predictor, config, source, None)
        else:  # measured once per model, folder content and config; later loads read what it chose and measured
            calibration = folder_calibration(predictor, config)
            record = _calibration_record(predictor, config, calibration.key)
            compressed = _from_record(predictor, config, source, record, calibration.patches)
            if compressed is None:
                compressed, chosen = measured_compression(predictor, config, source, calibration)
                _store_record(record, calibration, chosen)
        return None if compressed is UNCOMPRESSED else _apply(predictor, *compressed, source, report_file)


def finish_compression(predictor: nnUNetPredictor, data: torch.Tensor | Any) -> CompressionReport | None:
    """Finish a compression that waits for the first case (`compress_predictor`): calibrate on `data`,
    that case as nnU-Net preprocessed it (C, *spatial), unless another process calibrated this model
    meanwhile; processes that start together calibrate under one lock, once. No-op otherwise."""
    pending = getattr(predictor, "_tucker_pending", None)
    if not pending:
        return None
    config, source, report_file, record = pending
    case = _case_name(predictor, data)
    # one-off work (the backend's conversion included), not on top of what the previous prediction left kept
    with large_buffers_returned():
        with file_lock(record.with_suffix(".lock")), torch.inference_mode(False), torch.enable_grad():
            predictor.network.to(predictor.device)  # where nnU-Net will run it: calibrate there
            # another process may have calibrated this model meanwhile
            compressed = _from_record(predictor, config, source, record)
            if compressed is None:
                compressed = _self_calibrate(predictor, config, source, data, case, record)
        predictor._tucker_pending = None
        if compressed is UNCOMPRESSED:
            return None
        return _apply(predictor, *compressed, source, report_file)


def _self_calibrate(predictor: nnUNetPredictor, config: TuckerConfig, source: str | None, data: Any, case: str,
                    record: Path) -> tuple[CompressionReport, list] | str:
    """Calibrate on the first case `data`, compress, and measure the agreement with the original on held-out tiles
    of it; with a floor (`config.min_agreement`) missed, the least loosened target that reaches it
    (`measured_compression`), or `UNCOMPRESSED`. The outcome goes to `record`."""
    patches, fitted = first_case_patches(data, predictor, config.patches(first_case=True), case)
    _SELF_CALIBRATED.append(model_name(predictor, source))
    logger.info("self-calibrating %s (model %d in this process) on %s: %d patch(es) of %s%s, once per model",
                _SELF_CALIBRATED[-1], len(_SELF_CALIBRATED), case, len(patches), "×".join(map(str, patches.shape[2:])),
                "" if fitted is None else " (a slab across them left out of the fit, to measure on)")
    info = {"on": "first case", "case": case, "patches": len(patches),
            "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if fitted is not None:
        info["fitted_share"] = round(float(fitted.float().mean()), 3)
    tiles, masks = held_out_tiles(data, predictor.configuration_manager, config.patches(first_case=True))
    calibration = Calibration(patches_digest(patches, fitted), lambda: patches, info, lambda: (tiles, masks, case),
                              lambda: fitted)
    compressed, chosen = measured_compression(predictor, config, source, calibration)
    _store_record(record, calibration, chosen)
    return compressed


def _store_record(record: Path, calibration: Calibration, chosen: TuckerConfig | None) -> None:
    """Record a calibrated compression for `_from_record`: its calibration key, what was measured (`calibration.info`,
    the agreement included) and the config chosen (None: a floor kept the original network)."""
    store_json(record, {"key": calibration.key, "info": calibration.info, "config": chosen and chosen.fitted_dict()})


def measured_compression(predictor: nnUNetPredictor, config: TuckerConfig, source: str | None,
                         calibration: Calibration | None
                         ) -> tuple[tuple[CompressionReport, list] | str, TuckerConfig | None]:
    """`compress_folds` on `calibration` (None: the weights alone, nothing measured), and the agreement of the
    compressed network with the original on the tiles `calibration.held_out` gives (in `calibration.info` and the
    report); with a floor (`config.min_agreement`) missed, the least loosened target (`TuckerConfig.looser`) whose
    agreement reaches it for every class, searched as `next_target` says. Returns (report and converted folds, or
    `UNCOMPRESSED` where no target reached the floor) and the config chosen (None for `UNCOMPRESSED`)."""
    held_out = calibration.held_out() if calibration is not None else None
    if held_out is None:
        if config.min_agreement is not None:
            raise CalibrationError(f"min_agreement={config.min_agreement} needs a case to measure on: "
                                   f"{calibration.info.get('folder', 'the calibration')} has one case; add another "
                                   "(the last in sorted order is held out), or leave the floor unset")
        return compress_folds(predictor, config, source, calibration), config
    info = calibration.info
    tiles, masks, case = held_out
    network = unwrap(predictor.network)
    original = _original_label_maps(predictor, network, tiles)
    floor = config.min_agreement
    pristine = copy.deepcopy(network) if floor is not None else None
    targets = [config, *config.looser()] if floor is not None else [config]
    tried: dict[int, bool] = {}  # index in targets: whether its agreement reached the floor
    index, chosen = 0, None  # chosen: (config, report, converted folds, network, agreement) of the least that reached
    while index is not None:
        attempt = targets[index]
        report, converted = compress_folds(predictor, attempt, source, calibration)
        compressed = label_maps(predictor, network, [state for state, _ in converted], tiles)
        agreement = {"case": case, **measure_agreement(original, compressed, masks, class_names(predictor))}
        worst = agreement["worst"]
        passed = tried[index] = floor is None or worst is None or worst[1] >= floor
        if passed:
            chosen = (attempt, report, converted, network, agreement)  # each one reached is less loosened
        if index == 0 and passed:
            break
        index = next_target(tried, len(targets) - 1)
        logger.info("%s: %s on held-out tiles of %s, %s min_agreement=%s; %s", attempt.describe(),
                    describe_worst(agreement), case, "reaches" if passed else "below", floor,
                    "no other target is left to try" if index is None else f"trying {targets[index].describe()}")
        if index is not None:
            network = _replace_network(predictor, copy.deepcopy(pristine))
    if chosen is None:
        info["agreement"] = agreement
        logger.warning("no rank ratio or MAC budget up to %s keeps every class at min_agreement=%s on held-out tiles "
                       "of %s: the model runs uncompressed", LOOSER_TARGETS[-1], floor, case)
        return UNCOMPRESSED, None
    attempt, report, converted, kept, info["agreement"] = chosen
    if kept is not network:
        _replace_network(predictor, kept)
    if attempt is not config:
        logger.info("%s: the least loosened target tried that reaches min_agreement=%s (%s), kept", attempt.describe(),
                    floor, describe_worst(info["agreement"]))
    worst = info["agreement"]["worst"]
    if config.min_agreement is not None and worst is None:
        logger.warning("min_agreement=%s could not be checked: nothing of %s was held out; check the model with "
                       "nnunet-tucker evaluate", config.min_agreement, case)
    report.extra["calibration"]["agreement"] = info["agreement"]
    return (report, converted), attempt


def next_target(tried: dict[int, bool], last: int) -> int | None:
    """Where a floor was missed, which target to fit next: an index into the target asked for (0) and the looser ones
    (1 … `last`, every rank kept), given whether each tried reached the floor (0 did not). Galloping (the next
    target, then steps doubling: 1, 3, 7, …) up to the first that reaches it, then bisecting below that one: a near
    miss costs one fit. At most `FLOOR_FITS` targets besides the last are fitted; when they are spent, the last (exact
    and cheap) unless one was reached. None: done, the least target reached is kept."""
    reached = min((i for i, ok in tried.items() if ok), default=None)
    missed = max(i for i, ok in tried.items() if not ok and (reached is None or i < reached))
    if reached is not None and reached - missed == 1:
        return None
    if sum(0 < i < last for i in tried) >= FLOOR_FITS:
        return last if reached is None and last not in tried else None
    if reached is None:
        step = min(2 * missed + 1, last)
        return None if step in tried else step
    return (missed + reached) // 2


def _original_label_maps(predictor: nnUNetPredictor, network: nn.Module, tiles: torch.Tensor) -> list[torch.Tensor]:
    """The original network's `label_maps` of `tiles`, computed once per model and tiles (cached): another setting
    calibrated on the same case or folder measures against them without running the original again."""
    cache, key = DecompositionCache(), patches_digest(tiles)
    found = cache.load_label_maps(predictor.list_of_parameters, key)
    if found is not None and [tuple(m.shape) for m in found] == [tuple(t.shape[1:]) for t in tiles]:
        return found
    maps = label_maps(predictor, network, predictor.list_of_parameters, tiles)
    cache.store_label_maps(predictor.list_of_parameters, key, maps)
    return maps


def _replace_network(predictor: nnUNetPredictor, network: nn.Module) -> nn.Module:
    """Put `network` in the place of the predictor's (behind a `torch.compile` wrapper where there is one)."""
    owner, inner = predictor.network, unwrap(predictor.network)
    if owner is inner:
        predictor.network = network
        return network
    while owner._orig_mod is not inner:
        owner = owner._orig_mod
    owner._orig_mod = network
    return network


def model_name(predictor: nnUNetPredictor, source: str | None) -> str:
    """A model's name for progress lines: the dataset folder of an nnU-Net model folder
    (``Dataset292_.../nnUNetTrainer__nnUNetPlans__3d_fullres`` gives ``Dataset292_...``), another folder's own
    name, or the plans' dataset name for a model not loaded from a folder."""
    if source:
        folder = Path(source)
        return folder.parent.name if folder.name.count("__") == 2 and folder.parent.name else folder.name
    plans = predictor.plans_manager.plans if predictor.plans_manager is not None else {}
    return str(plans.get("dataset_name") or "the model")


def _apply(predictor: nnUNetPredictor, report: CompressionReport, converted: list, source: str | None,
           report_file: Path | None) -> CompressionReport:
    """Hand the compressed fold weights to `predictor`, log its one line and write the report."""
    predictor.list_of_parameters = [state for state, _ in converted]
    predictor._tucker_compressed_folds = predictor.list_of_parameters
    predictor.tucker_report = report
    speed_up_pipeline(predictor)
    timing = (
        "cache hit" if report.extra["cache_misses"] == 0
        else f"decomposed {len(converted)} fold(s) in {report.decomposition_seconds:.1f} s"
    )
    logger.info("%s; %s; %s%s", report.summary(), calibration_phrase(report.extra.get("calibration")), timing,
                f" [{source}]" if source else "")
    _log_agreement(report)
    report.extra["backend"] = _use_backend(predictor, report.config.get("backend", "auto"))
    if report_file is not None:
        _write_report(report, report_file)
    return report


def _run_compressed_folder(predictor: nnUNetPredictor) -> None:
    """A model folder that `compress` wrote, loaded: nothing to compress, but the faster pipeline and the backend
    ``TUCKER_BACKEND`` asks for (default auto), as a compression at load would get. Once per load; not for
    training-time validation (no fold weights)."""
    folds = predictor.list_of_parameters
    if not folds or getattr(predictor, "_tucker_compressed_folds", None) is folds:
        return
    backend = read_env().get("backend", "auto")
    check_backend(backend)
    _ensure_visible_logging()
    predictor._tucker_compressed_folds = folds
    speed_up_pipeline(predictor)
    _use_backend(predictor, backend)


def _use_backend(predictor: nnUNetPredictor, backend: str) -> dict[str, Any]:
    """Run the compressed network with `backend` (`backend.network_for_backend`): OpenVINO's compiled models take
    the network's place. Says which, and why; returns that for the report."""
    network, choice = network_for_backend(unwrap(predictor.network), predictor.list_of_parameters,
                                          input_shape_of(predictor), predictor.device, backend)
    if network is not unwrap(predictor.network):
        predictor.network = network
    if choice.name == "openvino" or choice.torch_seconds is not None:  # (failures have warned already)
        converted = "" if choice.conversion_seconds is None else (
            "; from the cache" if choice.from_cache else f"; converted in {choice.conversion_seconds:.1f} s")
        logger.info("backend %s: %s%s", choice.name, choice.reason, converted if choice.name == "openvino" else "")
    return choice.to_dict()


def _log_agreement(report: CompressionReport) -> None:
    """The agreement line of a calibrated compression (measured now, or read from the cache), and a
    warning that names the class and the setting to raise where a class falls below `AGREEMENT_WARNING`."""
    info = report.extra.get("calibration") or {}
    agreement = info.get("agreement")
    if agreement is None:
        return
    when = " (measured when it was calibrated)" if info.get("from_cache") else ""
    if not agreement["tiles"]:
        logger.info("agreement with the original not measured: the fitting tiles cover all of %s%s; check with "
                    "nnunet-tucker evaluate on cases of your own", agreement["case"], when)
        return
    logger.info("agreement with the original on %d held-out tile(s) of %s: %s%s", agreement["tiles"],
                agreement["case"], describe_worst(agreement), when)
    if agreement["worst"] is not None and agreement["worst"][1] < AGREEMENT_WARNING:
        config = TuckerConfig(**report.config)
        setting = (f"TUCKER_MAC_BUDGET (now {config.mac_budget})" if config.mac_budget is not None
                   else f"TUCKER_RANK_RATIO (now {config.rank_ratio})")
        logger.warning("class %s keeps only %.3f Dice of the original's segmentation on held-out tiles (below "
                       "%.2f): raise %s, or calibrate on a folder of your own cases (TUCKER_CALIBRATION)",
                       agreement["worst"][0], agreement["worst"][1], AGREEMENT_WARNING, setting)


def label_maps(predictor: nnUNetPredictor, network: nn.Module, states: list[dict], tiles: torch.Tensor
               ) -> list[torch.Tensor]:
    """nnU-Net's segmentation of each of `tiles` (N, C, *patch) on its own: the logits of `network` averaged
    over the fold weights `states` (as nnU-Net averages folds), its nonlinearity, argmax or region order. The
    network is left with the first fold's weights."""
    maps = []
    with torch.no_grad():
        for tile in tiles:
            total = None
            for state in states:
                network.load_state_dict(state)
                logits = network(tile[None].to(predictor.device))[0].float()
                total = logits if total is None else total.add_(logits)
            probabilities = predictor.label_manager.apply_inference_nonlin(total / len(states))
            maps.append(predictor.label_manager.convert_probabilities_to_segmentation(probabilities).cpu())
            del total, probabilities
    if states:
        network.load_state_dict(states[0])
    return maps


def class_names(predictor: nnUNetPredictor) -> dict[int, str]:
    """Label value -> class name of the segmentations `predictor` makes (dataset.json's labels; regions by
    their value in ``regions_class_order``), background and the ignore label left out."""
    labels = predictor.dataset_json["labels"]
    manager = predictor.label_manager
    if manager.has_regions:
        names = [name for name, value in labels.items() if value not in (0, [0], (0,))
                 and value != manager.ignore_label]
        return dict(zip((int(v) for v in manager.regions_class_order), names, strict=False))
    return {int(value): name for name, value in labels.items()
            if isinstance(value, int) and value != 0 and value != manager.ignore_label}


def calibration_phrase(info: dict[str, Any] | None) -> str:
    """What a compression was fitted to, in a few words, from its report's calibration record."""
    if info is None:
        return "fitted to the weights alone (unverified)"
    if info["on"] == "folder":
        return f"calibrated on {info['patches']} patch(es) of {len(info['cases'])} case(s) in {info['folder']}"
    text = f"self-calibrated on {info['case']}, {info['patches']} patch(es)"
    return text + (f", at {info['utc']}, from the cache" if info.get("from_cache") else "")


def note_output_files(predictor: nnUNetPredictor, lists: Any) -> None:
    """Note the output files of the prediction run `predictor` starts, from what nnU-Net's
    `_manage_input_and_output_lists` returned: (input files, truncated output file names in the order
    the cases are predicted, or None, previous-stage segmentations). Called (by the start-up hook and
    by `TuckerPredictor`) while a compression waits for the first case, which `_case_name` names so."""
    outputs = lists[1] if isinstance(lists, tuple) and len(lists) == 3 else None
    predictor._tucker_output_files = list(outputs) if isinstance(outputs, list) else None


def _case_name(predictor: nnUNetPredictor, data: Any) -> str:
    """The name of the first case `predictor` segments, whose preprocessed image is `data`: the name of
    its output file, noted by `note_output_files` when the run predicts from files (nnU-Net's and
    TotalSegmentator's `predict_from_files` and `predict_from_files_sequential`); else (arrays, as
    `predict_single_npy_array` predicts, or an nnU-Net without the method noted) "the first image" and
    its shape, logged at DEBUG. See docs/nnunet-integration.md."""
    outputs = vars(predictor).pop("_tucker_output_files", None)
    if outputs and isinstance(outputs[0], str) and outputs[0]:
        return Path(outputs[0]).name
    name = f"the first image ({'×'.join(map(str, tuple(data.shape)))})"
    logger.debug("the first case's name is unknown (it was not predicted from files): it is called %s", name)
    return name


def _calibration_record(predictor: nnUNetPredictor, config: TuckerConfig, calibration_key: str | None = None) -> Path:
    """Where the calibrated compression of this model (all its folds) under `config` is recorded: self-calibrated (no
    `calibration_key`: the first case is known only when it comes), or on a calibration folder of that content."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{__version__}|{json.dumps(config.fitted_dict(), sort_keys=True)}".encode())
    if config.min_agreement is not None:  # what a floor may choose from
        digest.update(f"|looser {LOOSER_TARGETS}".encode())
    if calibration_key is not None:
        digest.update(f"|calibration {calibration_key}".encode())
    for state in predictor.list_of_parameters:
        digest.update(state_dict_digest(state).encode())
    kind = "self-calibration" if calibration_key is None else "calibration"
    return default_cache_dir() / f"{kind}-{digest.hexdigest()}.json"


def _from_record(
    predictor: nnUNetPredictor, config: TuckerConfig, source: str | None, record: Path,
    patches: Callable[[], torch.Tensor] | None = None,
) -> tuple[CompressionReport, list] | str | None:
    """`compress_folds` as the calibration `record` says (what a floor chose, the agreement measured), from the cache
    (statistics and fitted weights are cached under its key) or, where the cache lacks them, from `patches`; None
    when there is no usable record, or the cache lacks what it needs and no `patches` are given (a first case's
    are gone); `UNCOMPRESSED` where a floor kept the original network."""
    try:
        data = json.loads(record.read_text())
        key, info = str(data["key"]), dict(data["info"])
        # what a floor chose, run by the backend asked for now
        chosen = TuckerConfig(**{**data["config"], "backend": config.backend}) if data.get("config") else config
    except (OSError, ValueError, KeyError, TypeError, TuckerConfigError):
        return None
    if "config" in data and data["config"] is None:
        logger.warning("%s: no rank ratio or MAC budget kept every class at min_agreement=%s on held-out tiles of %s "
                       "when it was calibrated (%s): the model runs uncompressed", config.describe(),
                       config.min_agreement, (info.get("agreement") or {}).get("case", "the held-out case"),
                       info.get("utc", "recorded"))
        return UNCOMPRESSED

    def first_case_gone() -> torch.Tensor:
        raise _NeedsFirstCase

    patches = patches or first_case_gone
    try:
        return compress_folds(predictor, chosen, source, Calibration(key, patches, {**info, "from_cache": True}))
    except _NeedsFirstCase:
        return None


def folder_calibration(predictor: nnUNetPredictor, config: TuckerConfig) -> Calibration:
    """Calibration on the images in the folder `config.calibration`, loaded when first needed."""
    folder = config.calibration
    loaded: list[torch.Tensor] = []

    def patches() -> torch.Tensor:
        if not loaded:
            loaded.append(load_calibration_patches(folder, predictor, config.patches(first_case=False)))
        return loaded[0]

    cases = calibration_cases(folder, predictor.dataset_json)
    kept_apart = held_out_case(cases)
    info = {"on": "folder", "folder": str(Path(folder).resolve()),
            "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cases": sorted(case for case in cases if case != kept_apart), "held_out_case": kept_apart,
            "patches": config.patches(first_case=False)}
    return Calibration(calibration_digest(folder, predictor.dataset_json, info["patches"]), patches, info,
                       lambda: load_held_out_tiles(folder, predictor))


def compress_folds(
    predictor: nnUNetPredictor, config: TuckerConfig, source: str | None = None, calibration: Calibration | None = None,
) -> tuple[CompressionReport, list[tuple[dict[str, torch.Tensor], dict[str, float]]]]:
    """Compress an initialised predictor's network as `config` says, and convert every fold's weights.

    With `calibration`, statistics are collected per fold on the original network; the plan (ranks)
    is made once, from fold 0, so that every fold gets the same structure. Statistics and decomposed
    weights go through the disk cache. Returns the report and, per fold, the converted state dict and
    the per-layer relative errors. The predictor's fold list is not touched.
    """
    network = unwrap(predictor.network)
    folds = predictor.list_of_parameters
    input_shape = input_shape_of(predictor)
    cache = DecompositionCache()
    start = time.perf_counter()
    seconds = {}
    statistics: list[dict | None] = [None] * len(folds)
    refit_on: list[Callable | None] = [None] * len(folds)
    if calibration is not None:
        with large_buffers_returned():
            statistics, targets = _calibration_statistics(predictor, network, folds, calibration, cache)
        seconds["statistics"] = time.perf_counter() - start
        regions = predictor.label_manager.has_regions
        refit_on = [_network_with(network, state, calibration, regions, sampled)
                    for state, sampled in zip(folds, targets, strict=True)]
    timer = LayerTimer(predictor.device)
    planned = time.perf_counter()
    plan = plan_compression(network, config, input_shape, timer, statistics[0])
    seconds["planning"] = time.perf_counter() - planned
    fitted = time.perf_counter()
    try:
        with large_buffers_returned():
            converted = [converted_weights(cache, state, plan, config.hooi_iterations, stats, refit)
                         for state, stats, refit in zip(folds, statistics, refit_on, strict=True)]
    finally:
        network.load_state_dict(folds[0])
    seconds["fitting"] = time.perf_counter() - fitted
    report = compress_network(network, config, input_shape, decomposed=converted[0], plan=plan)
    report.decomposition_seconds = time.perf_counter() - start
    report.extra.update(
        {"model": source, "folds": len(folds), "cache_hits": cache.hits, "cache_misses": cache.misses,
         "cache_dir": str(cache.directory), "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    )
    if timer.consulted:
        report.extra["profile"] = {"device": timer.description, "layer_forms_timed": timer.measured,
                                   "seconds": round(timer.seconds_spent, 2), "file": str(timer.path)}
    if calibration is not None:
        report.extra["calibration"] = {**calibration.info, "key": calibration.key}
    return report, converted


def _calibration_statistics(
    predictor: nnUNetPredictor, network: nn.Module, folds: list[dict], calibration: Calibration,
    cache: DecompositionCache,
) -> tuple[list[dict], list[tuple | None]]:
    """Per fold, the channel statistics of the original network on the calibration patches (cached), and
    the refit's targets where the same pass sampled them (None where the statistics came from the cache)."""
    targets: list[tuple | None] = [None] * len(folds)

    def collect(fold: int) -> dict:
        network.load_state_dict(folds[fold])
        statistics, targets[fold] = calibrate(network, calibration.patches(), predictor.label_manager.has_regions,
                                              masks=calibration.fitted())
        cache.store_statistics(folds[fold], calibration.key, statistics)
        return statistics

    try:
        statistics = [cache.load_statistics(state, calibration.key) or collect(fold)
                      for fold, state in enumerate(folds)]
    finally:
        network.load_state_dict(folds[0])
    return statistics, targets


def converted_weights(
    cache: DecompositionCache, state: dict[str, torch.Tensor], plan: list[LayerPlan], hooi_iterations: int = 0,
    statistics: dict | None = None, refit_on: Callable[[], RefitData] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`convert_state_dict` from `cache`, else computed and stored there (`refit_on` must give the
    patches the statistics were collected on)."""
    key = cache.key(state, plan, statistics, refit_on is not None, hooi_iterations)
    found = cache.load(key, converted_shapes(state, plan))
    if found is not None:
        return found
    converted, errors = convert_state_dict(state, plan, hooi_iterations, statistics, refit_on)
    cache.store(key, converted, errors)
    return converted, errors


def _network_with(network: nn.Module, state: dict, calibration: Calibration, regions: bool,
                  targets: tuple | None) -> Callable:
    """`convert_state_dict`'s `refit_on` for one fold: the network loaded with that fold's weights, the
    calibration's patches and what the fit uses of them, and the targets if sampled already."""

    def load() -> RefitData:
        network.load_state_dict(state)
        return RefitData(network, calibration.patches(), regions, targets, calibration.fitted())

    return load


def _write_report(report: CompressionReport, path: Path) -> None:
    """Write the report as JSON to `path` atomically; a failure only warns (the prediction goes on)."""
    try:
        atomic_write(path, report.to_json())
    except OSError as e:
        logger.warning("could not write the report to %s (%s)", path, e)


class TuckerPredictor(nnUNetPredictor):
    """`nnUNetPredictor` that compresses the model it loads (without a calibration folder: calibrated on
    the first case it segments, or from the cache).

    `tucker_config` is a `TuckerConfig` (used as is) or a mapping of config fields that take
    precedence over ``TUCKER_*`` variables and the plans' ``"tucker"`` field; with None, those
    two decide, as they do for every predictor when the start-up hook is active; False loads the
    model uncompressed whatever they say.
    """

    def __init__(
        self, *args: Any, tucker_config: TuckerConfig | Mapping[str, Any] | bool | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.tucker_config = tucker_config
        self.tucker_report: CompressionReport | None = None

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, *args: Any, **kwargs: Any):
        super().initialize_from_trained_model_folder(model_training_output_dir, *args, **kwargs)
        compress_predictor(self, source=str(model_training_output_dir))

    def manual_initialization(self, *args: Any, **kwargs: Any):
        super().manual_initialization(*args, **kwargs)
        compress_predictor(self)

    def _manage_input_and_output_lists(self, *args: Any, **kwargs: Any):
        lists = super()._manage_input_and_output_lists(*args, **kwargs)
        if getattr(self, "_tucker_pending", None):
            note_output_files(self, lists)
        return lists

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        finish_compression(self, data)
        return super().predict_logits_from_preprocessed_data(data)
