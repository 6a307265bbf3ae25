"""Channel statistics of every convolution's input and output on calibration data.

The calibration-aware fit (`decomposition.calibrated_tucker2`) keeps the directions the data
uses rather than the largest ones of the weights. It needs, per layer, the covariance of the
input channels and of the output channels. Covariances are centred per sample and channel: a
per-channel constant is what the instance norm after (nearly) every nnU-Net convolution removes,
so only the variation around it matters. Means are kept for a bias correction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd


class CalibrationDataError(ValueError):
    """Calibration data that cannot be used (wrong channel count, not finite, empty)."""


@dataclass(frozen=True)
class ChannelStatistics:
    """Second moments of one convolution on calibration data, float64 on the CPU.

    input_cov (C_in, C_in) and output_cov (C_out, C_out): covariances of the channels, centred per
    sample; input_mean (C_in,): mean input over all positions; voxels: positions seen.
    """

    input_cov: torch.Tensor
    output_cov: torch.Tensor
    input_mean: torch.Tensor
    voxels: int

    def usable(self) -> bool:
        """Finite and not all zero (a layer fed only constants has nothing to calibrate on)."""
        return bool(
            self.voxels > 0
            and all(torch.isfinite(t).all() for t in (self.input_cov, self.output_cov, self.input_mean))
            and self.input_cov.diagonal().sum() > 0
            and self.output_cov.diagonal().sum() > 0
        )


class _Accumulator:
    def __init__(self) -> None:
        self.input_cov = self.output_cov = self.input_sum = 0.0  # tensors after the first `add`
        self.voxels = 0

    @staticmethod
    def _centred_gram(x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().flatten(2).float()  # (n, C, V)
        centred = flat - flat.mean(dim=2, keepdim=True)
        return torch.einsum("ncv,ndv->cd", centred, centred).double().cpu()

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.input_cov = self.input_cov + self._centred_gram(x)
        self.output_cov = self.output_cov + self._centred_gram(y)
        self.input_sum = self.input_sum + x.detach().float().sum(dim=(0, *range(2, x.ndim))).double().cpu()
        self.voxels += x[:, 0].numel()

    def result(self) -> ChannelStatistics:
        n = max(self.voxels, 1)
        return ChannelStatistics(self.input_cov / n, self.output_cov / n, self.input_sum / n, self.voxels)


def collect_statistics(
    network: nn.Module, patches: Iterable[torch.Tensor] | torch.Tensor, names: Sequence[str] | None = None,
    batch_size: int = 1,
) -> dict[str, ChannelStatistics]:
    """Run `network` (eval mode, its own device) on `patches` (N, C, *spatial) and return the
    statistics of every convolution module (or of those in `names`), keyed by qualified name."""
    device = next(network.parameters()).device
    wanted = {}
    for name, module in network.named_modules():
        if isinstance(module, _ConvNd) and (names is None or name in names) and id(module) not in wanted:
            wanted[id(module)] = name
    accumulators = {name: _Accumulator() for name in wanted.values()}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        accumulators[wanted[id(module)]].add(args[0], output)

    handles = [m.register_forward_hook(hook) for m in network.modules() if id(m) in wanted]
    was_training = network.training
    network.eval()
    try:
        expected = _input_channels(network)
        with torch.inference_mode():
            for batch in _batches(patches, batch_size):
                if expected is not None and batch.shape[1] != expected:
                    raise CalibrationDataError(
                        f"calibration patches have {batch.shape[1]} channel(s) but the network takes {expected}"
                    )
                if not torch.isfinite(batch).all():
                    raise CalibrationDataError("calibration patches contain NaN or infinite values")
                network(batch.to(device=device, dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
        network.train(was_training)
    statistics = {name: acc.result() for name, acc in accumulators.items() if acc.voxels}
    if not statistics:
        raise CalibrationDataError("no calibration patches were given")
    return statistics


def _input_channels(network: nn.Module) -> int | None:
    first = next((m for m in network.modules() if isinstance(m, _ConvNd)), None)
    return None if first is None else first.in_channels


def _batches(patches: Iterable[torch.Tensor] | torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(patches, torch.Tensor):
        if patches.ndim < 3 or patches.shape[0] == 0:
            raise CalibrationDataError(
                f"calibration patches must be (N, C, *spatial) with N > 0, got {tuple(patches.shape)}"
            )
        yield from patches.split(batch_size)
    else:
        yield from patches


def statistics_digest(statistics: dict[str, ChannelStatistics] | None) -> str | None:
    """A content hash of statistics (for cache keys), None for none."""
    if statistics is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(statistics):
        s = statistics[name]
        h.update(f"{name}|{s.voxels}|".encode())
        for t in (s.input_cov, s.output_cov, s.input_mean):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
