"""Segmentation agreement per class: Dice, normalised surface distance (MONAI) and volumes. NumPy in, floats out."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def normalized_surface_distance(
    a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float
) -> float:
    """Share of both surfaces within `tolerance_mm` of the other (MONAI's surface Dice); 1.0 when
    both masks are empty, 0.0 when only one is."""
    if not a.any() and not b.any():
        return 1.0
    if not a.any() or not b.any():
        return 0.0
    from monai.metrics import compute_surface_dice

    def one_hot(mask: np.ndarray) -> torch.Tensor:
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
        return torch.stack([1 - m, m])[None]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(
            one_hot(a), one_hot(b), [tolerance_mm], include_background=False, spacing=tuple(spacing)
        )
    return float(value.reshape(-1)[0])


def compare_segmentations(
    prediction: np.ndarray,
    reference: np.ndarray,
    classes: dict[str, int],
    spacing: tuple[float, ...],
    tolerance_mm: float = 2.0,
) -> dict[str, dict[str, float]]:
    """Per class name: dice, nsd, and the volumes (ml) of `prediction` and `reference`."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    scores = {}
    for name, value in classes.items():
        a, b = prediction == value, reference == value
        scores[name] = {
            "dice": dice(a, b),
            "nsd": normalized_surface_distance(a, b, spacing, tolerance_mm),
            "volume_ml": float(a.sum()) * voxel_ml,
            "reference_volume_ml": float(b.sum()) * voxel_ml,
        }
    return scores
