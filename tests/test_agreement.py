"""Agreement of two label maps per class over the voxels compared."""

import pytest
import torch

from nnunet_tucker.agreement import MIN_VOXELS, describe_worst, measure_agreement

NAMES = {1: "liver", 2: "spleen", 3: "kidney"}


def test_dice_per_class_over_the_masked_voxels_only():
    original = torch.zeros(20, 20, dtype=torch.long)
    original[:10, :] = 1  # 200 liver voxels
    original[10:, :10] = 2  # 100 spleen voxels
    compressed = original.clone()
    compressed[:5, :] = 0  # half the liver lost
    compressed[15:, 10:] = 1  # outside the mask below: does not count
    mask = torch.ones(20, 20, dtype=torch.bool)
    mask[15:, 10:] = False
    result = measure_agreement([original], [compressed], [mask], NAMES)
    assert result["tiles"] == 1 and result["voxels"] == 350
    assert result["classes"] == {"liver": {"dice": pytest.approx(2 * 100 / 300, abs=1e-4), "voxels": 200},
                                 "spleen": {"dice": 1.0, "voxels": 100}}  # kidney in neither: left out
    assert result["voxel_agreement"] == pytest.approx(250 / 350, abs=1e-5)
    assert result["worst"] == ["liver", pytest.approx(0.6667, abs=1e-4)]
    assert describe_worst(result) == "worst class 0.667 (liver)"


def test_a_class_of_a_few_voxels_is_recorded_but_not_the_worst():
    original = torch.zeros(2 * MIN_VOXELS, dtype=torch.long)
    original[:MIN_VOXELS] = 1
    original[-3:] = 3  # a kidney tip at the tile's edge
    compressed = original.clone()
    compressed[-1] = 0
    masks = [torch.ones_like(original, dtype=torch.bool)]
    result = measure_agreement([original], [compressed], masks, NAMES)
    assert result["classes"]["kidney"] == {"dice": 0.8, "voxels": 3}
    assert result["worst"] == ["liver", 1.0]
    result = measure_agreement([original[-10:]], [compressed[-10:]], [masks[0][-10:]], NAMES)
    assert result["worst"] is None and describe_worst(result).startswith(f"no class covers {MIN_VOXELS} voxels")


def test_tiles_are_pooled():
    a = [torch.tensor([1, 1, 0, 0]), torch.tensor([2, 2, 2, 0])]
    b = [torch.tensor([1, 0, 0, 0]), torch.tensor([2, 2, 2, 0])]
    masks = [torch.ones(4, dtype=torch.bool)] * 2
    result = measure_agreement(a, b, masks, NAMES)
    assert result["tiles"] == 2 and result["voxels"] == 8 and result["voxel_agreement"] == pytest.approx(7 / 8)
    assert result["classes"]["liver"]["dice"] == pytest.approx(2 / 3, abs=1e-4)


def test_nothing_held_out_is_said_so():
    result = measure_agreement([], [], [], NAMES)
    assert result == {"tiles": 0, "voxels": 0, "voxel_agreement": None, "classes": {}, "worst": None}
    assert describe_worst(result) == "no voxel to compare"
