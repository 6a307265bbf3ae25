"""Compression inside nnU-Net's predictor: `TuckerPredictor` and `compress_predictor`.

nnU-Net reloads every fold's state dict for every case (`predict_logits_from_preprocessed_data`),
so the network is compressed once per model load and every fold's state dict is converted once,
through the disk cache; the predictor then runs unchanged (folds, mirroring, sliding window,
CPU/CUDA, ``nnUNet_compile``).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch import nn

from ..accounting import CompressionReport
from ..config import TuckerConfig, read_env, read_plans, report_path, resolve_config
from ..profile import LayerTimer
from ..statistics import collect_statistics
from ..surgery import RefitData, compress_network, plan_compression, unwrap
from .architecture import is_compressed
from .cache import DecompositionCache

logger = logging.getLogger("nnunet_tucker")


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


def compress_predictor(predictor: nnUNetPredictor, source: str | None = None) -> CompressionReport | None:
    """Compress an initialised predictor's network and fold weights if compression is asked for.

    Does nothing (returns None) when no config applies, when the predictor carries no fold
    weights (nnU-Net's trainer validates its live training network that way), or when this
    load was already compressed.
    """
    config = requested_config(predictor)
    if config is None:
        return None
    if predictor.plans_manager is not None and is_compressed(predictor.plans_manager.plans):
        _ensure_visible_logging()
        logger.warning("%s is already compressed by nnunet-tucker; the compression request is ignored",
                       source or "this model")
        return None
    folds = predictor.list_of_parameters
    if not folds:
        logger.debug("no fold weights to compress (training-time validation); left as is")
        return None
    if getattr(predictor, "_tucker_compressed_folds", None) is folds:
        return None
    _ensure_visible_logging()
    report_file = report_path()  # a bad path is an error now, not after the work

    report, converted = compress_folds(predictor, config, source)
    predictor.list_of_parameters = [state for state, _ in converted]
    predictor._tucker_compressed_folds = predictor.list_of_parameters
    predictor.tucker_report = report

    timing = (
        "cache hit" if report.extra["cache_misses"] == 0
        else f"decomposed {len(converted)} fold(s) in {report.decomposition_seconds:.1f} s"
    )
    logger.info("%s; %s%s", report.summary(), timing, f" [{source}]" if source else "")
    if report_file is not None:
        _write_report(report, report_file)
    return report


def compress_folds(
    predictor: nnUNetPredictor, config: TuckerConfig, source: str | None = None
) -> tuple[CompressionReport, list[tuple[dict[str, torch.Tensor], dict[str, float]]]]:
    """Compress an initialised predictor's network as `config` says, and convert every fold's weights.

    Calibration statistics (if asked for) are collected per fold on the original network; the
    plan (ranks) is made once, from fold 0, so that every fold gets the same structure. Statistics
    and decomposed weights go through the disk cache. Returns the report and, per fold, the
    converted state dict and the per-layer relative errors. The predictor's fold list is not touched.
    """
    network = unwrap(predictor.network)
    folds = predictor.list_of_parameters
    input_shape = input_shape_of(predictor)
    cache = DecompositionCache(hooi_iterations=config.hooi_iterations)
    start = time.perf_counter()
    statistics: list[dict | None] = [None] * len(folds)
    refit_on: list[Callable | None] = [None] * len(folds)
    calibration = None
    if config.calibration:
        statistics, calibration, patches = _calibration_statistics(predictor, network, folds, config, cache)
        regions = predictor.label_manager.has_regions
        refit_on = [_network_with(network, state, patches, regions) for state in folds]
    timer = LayerTimer(predictor.device)
    plan = plan_compression(network, config, input_shape, timer, statistics[0])
    try:
        converted = [cache.convert(state, plan, stats, measure)
                     for state, stats, measure in zip(folds, statistics, refit_on, strict=True)]
    finally:
        network.load_state_dict(folds[0])
    report = compress_network(network, config, input_shape, decomposed=converted[0], plan=plan)
    report.decomposition_seconds = time.perf_counter() - start
    report.extra.update(
        {"model": source, "folds": len(folds), "cache_hits": cache.hits, "cache_misses": cache.misses,
         "cache_dir": str(cache.directory)}
    )
    if timer.consulted:
        report.extra["profile"] = {"device": timer.description, "layer_forms_timed": timer.measured,
                                   "seconds": round(timer.seconds_spent, 2), "file": str(timer.path)}
    if calibration is not None:
        report.extra["calibration"] = calibration
    return report, converted


def _calibration_statistics(
    predictor: nnUNetPredictor, network: nn.Module, folds: list[dict], config: TuckerConfig, cache: DecompositionCache
) -> tuple[list[dict], dict, Callable[[], torch.Tensor]]:
    """Per fold, the channel statistics of the original network on the calibration images; a record of
    the calibration for the report; and the calibration patches (loaded once, when first needed)."""
    from .calibration import calibration_cases, calibration_digest, load_calibration_patches

    folder = config.calibration
    digest = calibration_digest(folder, predictor.dataset_json, config.calibration_patches)
    loaded: list[torch.Tensor] = []

    def patches() -> torch.Tensor:
        if not loaded:
            loaded.append(load_calibration_patches(folder, predictor, config.calibration_patches))
        return loaded[0]

    def collect(state: dict) -> dict:
        network.load_state_dict(state)
        return collect_statistics(network, patches(), regions=predictor.label_manager.has_regions)

    start = time.perf_counter()
    try:
        statistics = [cache.statistics(state, digest, lambda state=state: collect(state)) for state in folds]
    finally:
        network.load_state_dict(folds[0])
    voxels = next(iter(statistics[0].values())).voxels
    info = {"folder": str(Path(folder).resolve()), "cases": sorted(calibration_cases(folder, predictor.dataset_json)),
            "patches": config.calibration_patches, "voxels_at_input": voxels, "digest": digest,
            "seconds": round(time.perf_counter() - start, 2)}
    logger.info("calibration statistics from %s: %d case(s), %d voxels per layer input, %.1f s",
                folder, len(info["cases"]), voxels, info["seconds"])
    return statistics, info, patches


def _network_with(network: nn.Module, state: dict, patches: Callable[[], torch.Tensor], regions: bool) -> Callable:
    """`convert_state_dict`'s `refit_on` for one fold: the network loaded with that fold's weights, and the patches."""

    def load() -> RefitData:
        network.load_state_dict(state)
        return RefitData(network, patches(), regions)

    return load


def _write_report(report: CompressionReport, path: Path) -> None:
    """Write the report as JSON to `path` atomically; a failure only warns (the prediction goes on)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(report.to_json())
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not write the report to %s (%s)", path, e)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


class TuckerPredictor(nnUNetPredictor):
    """`nnUNetPredictor` that compresses the model it loads.

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
