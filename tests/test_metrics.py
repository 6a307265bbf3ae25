import numpy as np
import pytest

from nnunet_tucker.tools.metrics import compare_segmentations, dice, normalized_surface_distance


def test_dice():
    a = np.zeros((4, 4), bool)
    assert dice(a, a) == 1.0
    b = a.copy()
    b[:2] = True
    assert dice(b, a) == 0.0 and dice(b, b) == 1.0
    c = a.copy()
    c[:1] = True
    assert dice(b, c) == pytest.approx(2 * 4 / 12)


def test_nsd_tolerance_and_empty_cases():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    shifted = np.roll(a, 1, axis=0)
    assert normalized_surface_distance(a, a, (1, 1, 1), 1.0) == pytest.approx(1.0)
    assert normalized_surface_distance(a, shifted, (1, 1, 1), 1.5) == pytest.approx(1.0)
    assert normalized_surface_distance(a, shifted, (3, 1, 1), 1.0) < 1.0  # one slice is 3 mm
    empty = np.zeros_like(a)
    assert normalized_surface_distance(empty, empty, (1, 1, 1), 1.0) == 1.0
    assert normalized_surface_distance(a, empty, (1, 1, 1), 1.0) == 0.0


def test_compare_segmentations_volumes():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    scores = compare_segmentations(ref, ref, {"organ": 1, "absent": 2}, (2.0, 1.0, 1.0))
    assert scores["organ"]["dice"] == 1.0 and scores["organ"]["volume_ml"] == pytest.approx(64 * 2 / 1000)
    assert scores["absent"] == {"dice": 1.0, "nsd": 1.0, "volume_ml": 0.0, "reference_volume_ml": 0.0}
