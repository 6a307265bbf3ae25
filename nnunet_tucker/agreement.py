"""How closely a compressed network's segmentation follows the original's: per-class Dice of the two label maps
over the voxels they are compared on (held-out tiles of a case), and the share of voxels given the same label.

No labels are involved: this measures what compression changed, not how good either segmentation is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

# A class's Dice over fewer voxels than this (in either map) is recorded but not taken as the worst class: a
# few voxels at a tile's edge give a Dice that says nothing of the class.
MIN_VOXELS = 100


def measure_agreement(original: Sequence[torch.Tensor], compressed: Sequence[torch.Tensor],
                      masks: Sequence[torch.Tensor], names: Mapping[int, str]) -> dict[str, Any]:
    """Per-class agreement of label maps `compressed` with `original` (one pair per tile, integer labels, any
    shape), over the voxels where `masks` (bool, the same shapes) is True. `names`: label value -> class name,
    background left out. Returns {"tiles", "voxels", "voxel_agreement", "classes": {name: {"dice", "voxels"}}
    for the classes present in either map, "worst": [name, dice] among those with at least `MIN_VOXELS` voxels
    in either map (None where there is none)}."""
    empty = torch.zeros(0, dtype=torch.long)  # no tile: nothing held out
    a = torch.cat([empty, *(o[m].long() for o, m in zip(original, masks, strict=True))])
    b = torch.cat([empty, *(c[m].long() for c, m in zip(compressed, masks, strict=True))])
    length = max(names, default=0) + 1
    both = torch.bincount(a[a == b], minlength=length)
    in_a, in_b = torch.bincount(a, minlength=length), torch.bincount(b, minlength=length)
    classes = {}
    for value, name in names.items():
        total = int(in_a[value] + in_b[value]) if value < len(in_a) else 0
        if total:
            classes[name] = {"dice": round(2 * int(both[value]) / total, 4),
                             "voxels": max(int(in_a[value]), int(in_b[value]))}
    measurable = [(c["dice"], name) for name, c in classes.items() if c["voxels"] >= MIN_VOXELS]
    worst = min(measurable, default=None)
    return {"tiles": len(masks), "voxels": int(a.numel()),
            "voxel_agreement": round(float((a == b).float().mean()), 5) if a.numel() else None,
            "classes": classes, "worst": None if worst is None else [worst[1], worst[0]]}


def describe_worst(agreement: Mapping[str, Any]) -> str:
    """'worst class 0.983 (kidney_left)', or why there is none."""
    if agreement["worst"] is None:
        return (f"no class covers {MIN_VOXELS} voxels there (voxels given the same label: "
                f"{agreement['voxel_agreement']:.2%})" if agreement["voxels"] else "no voxel to compare")
    name, dice = agreement["worst"]
    return f"worst class {dice:.3f} ({name})"
