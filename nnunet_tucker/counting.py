"""Parameters and multiply-accumulates of a network, what planning (a MAC budget) and accounting count.

MACs come from `torch.utils.flop_counter.FlopCounterMode` on a copy of the network on the meta
device (shapes only, no arithmetic), so counting a full-size patch costs no compute.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Measurement:
    """Parameters and MACs of a network; `macs_by_module` maps qualified names to MACs."""

    params: int
    macs: int | None
    macs_by_module: dict[str, int]


def count_params(network: nn.Module) -> int:
    """Number of distinct parameters (shared modules counted once)."""
    return sum(p.numel() for p in network.parameters())


def count_macs(network: nn.Module, input_shape: Sequence[int]) -> tuple[int, dict[str, int]]:
    """Total MACs of one forward pass on `input_shape`, and MACs per qualified module name."""
    clone = copy.deepcopy(network).to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        clone(torch.empty(tuple(input_shape), device="meta"))
    root = type(clone).__name__
    by_module = {}
    for key, ops in counter.get_flop_counts().items():
        if key.startswith(root + "."):
            by_module[key[len(root) + 1 :]] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, by_module


def measure(network: nn.Module, input_shape: Sequence[int] | None) -> Measurement:
    """Parameters, and MACs if `input_shape` is given."""
    if input_shape is None:
        return Measurement(count_params(network), None, {})
    macs, by_module = count_macs(network, input_shape)
    return Measurement(count_params(network), macs, by_module)
