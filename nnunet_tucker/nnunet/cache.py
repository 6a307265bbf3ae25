"""A disk cache of decomposed weights, so parallel and repeated model loads decompose once (and of what
calibration measures: statistics, the original network's segmentations of the held-out tiles).

An entry is keyed by the content of the original state dict, the compression plan (names and
ranks), the HOOI setting and the package version. It is written to a temporary file and renamed
into place (atomic; concurrent writers of one key write the same bytes), read back with
``torch.load(weights_only=True)`` and checked against the expected keys and shapes; anything
unreadable or unexpected is recomputed, never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from .. import __version__
from ..calibrate import ChannelStatistics, statistics_digest
from ..config import default_cache_dir
from ..files import atomic_write, state_dict_digest
from ..fit import FIT_VERSION
from ..plan import LayerPlan

logger = logging.getLogger(__name__)


class DecompositionCache:
    """Decomposed state dicts and calibration statistics on disk under `directory`: stored and loaded here,
    computed by the caller (`nnunet.predictor`)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def key(self, state_dict: dict[str, torch.Tensor], plan: list[LayerPlan],
            statistics: dict[str, ChannelStatistics] | None = None, refit: bool = False,
            hooi_iterations: int = 0) -> str:
        layout = json.dumps(
            {
                "weights": state_dict_digest(state_dict),
                "plan": [layer.to_dict() for layer in plan],
                "hooi_iterations": hooi_iterations,
                "statistics": statistics_digest(statistics),
                "refit": refit,
                "version": __version__,
                "fit": FIT_VERSION,
            },
            sort_keys=True,
        )
        return hashlib.blake2b(layout.encode(), digest_size=20).hexdigest()

    def load(self, key: str, shapes: dict[str, tuple]) -> tuple[dict, dict] | None:
        """The converted state dict and per-layer errors stored under `key`, if there and of the expected
        keys and `shapes`; counted as a hit, else as a miss."""
        entry = self._load(self.directory / f"{key}.pt", shapes)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def store(self, key: str, state_dict: dict[str, torch.Tensor], errors: dict[str, float]) -> None:
        _store(self.directory / f"{key}.pt", {"state_dict": state_dict, "errors": errors})

    def _statistics_path(self, state_dict: dict[str, torch.Tensor], calibration_key: str) -> Path:
        key = hashlib.blake2b(
            f"{state_dict_digest(state_dict)}|{calibration_key}|{__version__}".encode(), digest_size=20
        ).hexdigest()
        return self.directory / f"statistics-{key}.pt"

    def load_statistics(
        self, state_dict: dict[str, torch.Tensor], calibration_key: str
    ) -> dict[str, ChannelStatistics] | None:
        """Calibration statistics of the network with `state_dict` on the data `calibration_key` names,
        if stored (a hit, else a miss)."""
        path = self._statistics_path(state_dict, calibration_key)
        if path.is_file():
            try:
                entry = torch.load(path, map_location="cpu", weights_only=True)
                self.hits += 1
                return {name: ChannelStatistics(**fields) for name, fields in entry.items()}
            except Exception as e:  # unreadable, truncated, foreign: recompute
                logger.warning("ignoring unusable cache entry %s (%s); collecting again", path, e)
        self.misses += 1
        return None

    def store_statistics(
        self, state_dict: dict[str, torch.Tensor], calibration_key: str, statistics: dict[str, ChannelStatistics]
    ) -> None:
        _store(self._statistics_path(state_dict, calibration_key),
               {name: dataclasses.asdict(s) for name, s in statistics.items()})

    def _label_maps_path(self, states: list[dict[str, torch.Tensor]], tiles_key: str) -> Path:
        digests = "|".join(state_dict_digest(state) for state in states)
        key = hashlib.blake2b(f"{digests}|{tiles_key}|{__version__}".encode(), digest_size=20).hexdigest()
        return self.directory / f"label-maps-{key}.pt"

    def load_label_maps(self, states: list[dict[str, torch.Tensor]], tiles_key: str) -> list[torch.Tensor] | None:
        """The original network's segmentations (fold weights `states`) of the tiles `tiles_key` names, if stored."""
        path = self._label_maps_path(states, tiles_key)
        if not path.is_file():
            return None
        try:
            return list(torch.load(path, map_location="cpu", weights_only=True)["label_maps"])
        except Exception as e:  # unreadable, truncated, foreign: recompute
            logger.warning("ignoring unusable cache entry %s (%s); segmenting again", path, e)
            return None

    def store_label_maps(self, states: list[dict[str, torch.Tensor]], tiles_key: str,
                         label_maps: list[torch.Tensor]) -> None:
        _store(self._label_maps_path(states, tiles_key), {"label_maps": label_maps})

    def _load(self, path: Path, shapes: dict[str, tuple]) -> tuple[dict, dict] | None:
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            state, errors = entry["state_dict"], entry["errors"]
            if {k: tuple(v.shape) for k, v in state.items()} != shapes:
                raise ValueError("keys or shapes differ from the compression plan")
            return state, {k: float(v) for k, v in errors.items()}
        except Exception as e:  # unreadable, truncated, foreign: recompute
            logger.warning("ignoring unusable cache entry %s (%s); decomposing again", path, e)
            return None


def _store(path: Path, entry: dict) -> None:
    """torch.save `entry` to `path` atomically; a failure only warns."""
    _write(path, lambda f: torch.save(entry, f))


def store_json(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` atomically; a failure only warns."""
    _write(path, json.dumps(data, indent=1))


def _write(path: Path, content: str | Callable[[IO[bytes]], Any]) -> None:
    try:
        atomic_write(path, content)
    except OSError as e:  # a read-only or full disk must not stop a prediction
        logger.warning("could not write the cache entry %s (%s)", path, e)
