"""The network class of compressed model folders, resolved by nnU-Net from plans.json.

A compressed folder's configuration names ``nnunet_tucker.nnunet.architecture.TuckerNetwork`` as its
``network_class_name``; nnU-Net resolves it by import path (`get_network_from_plans`), so loading
needs only this package installed, not the start-up hook. Its arch_kwargs hold the original
architecture and the rank of every decomposed layer.
"""

from __future__ import annotations

import pydoc
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..plan import LayerPlan, plan_compression_from_ranks
from ..report import LayerRecord
from ..swap import swap_modules

NETWORK_CLASS_NAME = f"{__name__}.TuckerNetwork"
COMPRESSED_KEY = "tucker_compressed"  # top-level plans.json key of folders written by `compress_model_folder`


def is_compressed(plans: dict) -> bool:
    """Whether a plans dict belongs to a compressed model folder."""
    return COMPRESSED_KEY in plans


def TuckerNetwork(  # noqa: N802 - nnU-Net calls it like a class
    input_channels: int,
    num_classes: int,
    tucker_base: dict[str, Any],
    tucker_ranks: dict[str, list[int]],
    deep_supervision: bool | None = None,
) -> nn.Module:
    """Build the original architecture described by `tucker_base` and swap in the decomposed layers.

    `tucker_base` holds the original ``network_class_name``, ``arch_kwargs`` and
    ``_kw_requires_import``; `tucker_ranks` maps layer names to ``[in_rank, out_rank]``.
    """
    kwargs = dict(tucker_base["arch_kwargs"])
    for key in tucker_base.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    if deep_supervision is not None:
        kwargs["deep_supervision"] = deep_supervision
    cls = pydoc.locate(tucker_base["network_class_name"])
    if cls is None:
        raise ImportError(f"network class {tucker_base['network_class_name']!r} of the original model not found")
    network = cls(input_channels=input_channels, num_classes=num_classes, **kwargs)
    swap_modules(network, plan_compression_from_ranks(network, tucker_ranks))
    return network


def compressed_architecture(architecture: dict[str, Any], plan: Sequence[LayerPlan | LayerRecord]) -> dict[str, Any]:
    """The plans.json ``architecture`` entry of a compressed model, from the original entry and the
    plan (or the report's layer records: anything with ``name`` and ``ranks``)."""
    return {
        "network_class_name": NETWORK_CLASS_NAME,
        "arch_kwargs": {
            "tucker_base": architecture,
            "tucker_ranks": {layer.name: list(layer.ranks) for layer in plan if layer.ranks is not None},
        },
        "_kw_requires_import": [],
    }

