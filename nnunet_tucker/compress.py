"""One network, compressed in place: plan → (calibrate → fit) → swap → account.

The steps, one module each: `plan` (which layers, which ranks), `calibrate` (data → statistics →
targets), `fit` (the Tucker math), `swap` (modules and state dicts, the in-order refit), `account`
(the report). `nnunet.predictor` runs the same steps for every fold of an nnU-Net model, with
calibration data and a cache.
"""

from __future__ import annotations

import time

import torch
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from torch import nn

from .config import TuckerConfig
from .counting import measure
from .plan import LayerPlan, plan_compression, unwrap
from .report import CompressionReport
from .swap import convert_state_dict, swap_modules


def compress_network(
    network: nn.Module,
    config: TuckerConfig,
    input_shape: tuple[int, ...] | None = None,
    decomposed: tuple[dict[str, torch.Tensor], dict[str, float]] | None = None,
    plan: list[LayerPlan] | None = None,
) -> CompressionReport:
    """Decompose the convolutions of `network` in place, as `config` says; return the report.

    `input_shape` (e.g. ``(1, 1, *patch_size)``) lets the report count multiply-accumulates.
    `decomposed` is the `convert_state_dict` result for the network's weights when it is already at
    hand (e.g. from a cache), computed for `plan` (the `plan_compression` result, else planned here).
    """
    network = unwrap(network)
    plan = plan if plan is not None else plan_compression(network, config, input_shape)
    before = measure(network, input_shape)
    start = time.perf_counter()
    if decomposed is None:
        decomposed = convert_state_dict(network.state_dict(), plan, config.hooi_iterations)
    state, errors = decomposed
    seconds = time.perf_counter() - start
    residual = _in_residual_blocks(network)
    swap_modules(network, plan)
    network.load_state_dict(state)
    after = measure(network, input_shape)
    return CompressionReport.build(plan, errors, before, after, config, seconds, input_shape, residual)


def _in_residual_blocks(network: nn.Module) -> frozenset[str]:
    """Qualified names of the modules inside residual blocks (dynamic_network_architectures' `BasicBlockD`
    and `BottleneckD`, those of nnU-Net's residual encoders)."""
    return frozenset(f"{name}.{inner}" for name, block in network.named_modules(remove_duplicate=False)
                     if isinstance(block, (BasicBlockD, BottleneckD))
                     for inner, _ in block.named_modules(remove_duplicate=False) if inner)
