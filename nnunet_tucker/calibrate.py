"""Step 2, calibrate: what the calibration-aware fit needs to know of every convolution, measured on data.

The calibration-aware fit (`fit.calibrated_tucker2`) keeps the directions that matter for
the network's prediction on real data rather than the largest ones of the weights. Per layer it
needs the covariance of the input channels (centred per sample and channel: a per-channel constant
is what the instance norm after nearly every nnU-Net convolution removes), the correlation of the
input between kernel offsets, and the Fisher information of the prediction with respect to the
layer's output: which output directions change the segmentation, and by how much. The Fisher
information comes from backward passes that probe the network's own prediction with random signs,
so no labels are needed. Means are kept for a bias correction.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from tqdm import tqdm

from .errors import CalibrationError
from .fit import Whitening


@dataclass(frozen=True)
class ChannelStatistics:
    """Second moments of one convolution on calibration data, float64 on the CPU.

    input_cov (C_in, C_in): covariance of the input channels, centred per sample; input_mean (C_in,):
    mean input; spatial_corr (K, K): correlation of the input between the kernel's K offsets (a
    product of per-axis lag correlations; 1x1 for transposed convolutions, whose offsets never see
    the same input twice); output_fisher (C_out, C_out): Fisher information of the prediction with
    respect to the layer's output, summed over positions, per patch; voxels: input positions seen.
    """

    input_cov: torch.Tensor
    input_mean: torch.Tensor
    spatial_corr: torch.Tensor
    output_fisher: torch.Tensor
    voxels: int

    def usable(self) -> bool:
        """Finite, and not fed only constants (which leave nothing to calibrate on)."""
        return bool(
            self.voxels > 0
            and all(torch.isfinite(t).all() for t in (self.input_cov, self.input_mean, self.spatial_corr,
                                                      self.output_fisher))
            and self.input_cov.diagonal().sum() > 0
        )

    def whitening(self) -> Whitening:
        return Whitening.of(self.input_cov, self.output_fisher, self.spatial_corr)


CHUNK_ELEMENTS = 1 << 22  # the size of the statistics' temporaries (16 MB of float32)


class _Accumulator:
    """Running sums for one convolution; the spatial correlation from lag products along each axis."""

    def __init__(self, conv: _ConvNd) -> None:
        self.transposed = isinstance(conv, _ConvTransposeNd)
        self.kernel, self.dilation = tuple(conv.kernel_size), tuple(conv.dilation)
        self.input_cov = torch.zeros(conv.in_channels, conv.in_channels, dtype=torch.float64)
        self.input_sum = torch.zeros(conv.in_channels, dtype=torch.float64)
        self.fisher = torch.zeros(conv.out_channels, conv.out_channels, dtype=torch.float64)
        self.lags = {}  # (axis, lag) -> [sum x·x_shifted, sum x², sum x_shifted²]
        self.voxels = 0

    def add(self, x: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Add the input `x` (n, C, *spatial) of a pass, at the positions `kept` ((n, *spatial) bool; None: all):
        means per sample and channel over them, products of pairs of them."""
        flat = x.detach().flatten(2).float()  # (n, C, V)
        parts = flat.split(max(1, CHUNK_ELEMENTS // (flat.shape[0] * flat.shape[1])), dim=2)
        if kept is None:
            weight, weights = None, [None] * len(parts)
            mean = flat.mean(dim=2, keepdim=True)
            self.input_sum += flat.sum(dim=(0, 2)).double().cpu()
            self.voxels += flat.shape[0] * flat.shape[2]
        else:
            weight = kept.flatten(1)[:, None].to(device=flat.device, dtype=flat.dtype)  # (n, 1, V)
            weights = weight.split(parts[0].shape[2], dim=2)
            total = sum((part * w).sum(dim=2, keepdim=True) for part, w in zip(parts, weights, strict=True))
            mean = total / weight.sum(dim=2, keepdim=True).clamp_min(1)
            self.input_sum += total.sum(dim=(0, 2)).double().cpu()
            self.voxels += int(weight.sum())
        # centred a chunk at a time: temporaries of CHUNK_ELEMENTS, not of the whole input (a 128³ full-resolution
        # input of a decoder stage is 0.5 GB)
        for part, w in zip(parts, weights, strict=True):
            centred = part - mean if w is None else (part - mean).mul_(w)
            self.input_cov += torch.einsum("ncv,ndv->cd", centred, centred).double().cpu()
        if self.transposed:
            return
        centre = mean.view(*mean.shape[:2], *[1] * (x.ndim - 2))
        mask = None if weight is None else weight.view(x.shape[0], 1, *x.shape[2:])
        per_chunk = max(1, CHUNK_ELEMENTS // math.prod(x.shape[2:]))
        for sample in range(x.shape[0]):
            in_sample = None if mask is None else mask[sample:sample + 1]
            for first in range(0, x.shape[1], per_chunk):
                channels = slice(first, first + per_chunk)
                centred = x[sample:sample + 1, channels].detach().float() - centre[sample:sample + 1, channels]
                self._add_lags(centred if in_sample is None else centred.mul_(in_sample), in_sample)

    def _add_lags(self, centred: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Lag products along each axis of `centred` (1, c, *spatial), some of the channels; with `mask`
        (1, 1, *spatial; `centred` is 0 outside it) of the pairs of positions both in it."""
        squares = centred.square()
        total = float(squares.sum())
        for axis, (k, d) in enumerate(zip(self.kernel, self.dilation, strict=True)):
            dim, n = 2 + axis, centred.shape[2 + axis]
            for lag in range(d, min((k - 1) * d, n - 1) + 1, d):
                a, b = centred.narrow(dim, 0, n - lag), centred.narrow(dim, lag, n - lag)
                if mask is None:  # Σa² and Σb²: the total less the `lag` slices each leaves out (one pass less each)
                    sums = [float((a * b).sum()), total - float(squares.narrow(dim, n - lag, lag).sum()),
                            total - float(squares.narrow(dim, 0, lag).sum())]
                else:  # ... where the other of the pair is in the mask too
                    first, second = mask.narrow(dim, 0, n - lag), mask.narrow(dim, lag, n - lag)
                    sums = [float((a * b).sum()), float((squares.narrow(dim, 0, n - lag) * second).sum()),
                            float((squares.narrow(dim, lag, n - lag) * first).sum())]
                self.lags[axis, lag] = [s + t for s, t in zip(self.lags.get((axis, lag), [0.0] * 3), sums,
                                                               strict=True)]

    def add_gradient(self, g: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        flat = g.detach().flatten(2).float()
        if kept is not None:
            flat = flat * kept.flatten(1)[:, None].to(device=flat.device, dtype=flat.dtype)
        self.fisher += torch.einsum("ncv,ndv->cd", flat, flat).double().cpu()

    def _spatial_corr(self) -> torch.Tensor:
        if self.transposed:
            return torch.ones(1, 1, dtype=torch.float64)
        corr = torch.ones(1, 1, dtype=torch.float64)
        for axis, (k, d) in enumerate(zip(self.kernel, self.dilation, strict=True)):
            rho = [1.0]
            for step in range(1, k):
                ab, aa, bb = self.lags.get((axis, step * d), (0.0, 0.0, 0.0))
                rho.append(ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0)
            offsets = torch.arange(k)
            corr = torch.kron(corr, torch.tensor(rho, dtype=torch.float64)[(offsets[:, None] - offsets).abs()])
        return corr

    def result(self, probes: int) -> ChannelStatistics:
        """The statistics, the Fisher information per patch from `probes` backward probes in all."""
        n = max(self.voxels, 1)
        return ChannelStatistics(self.input_cov / n, self.input_sum / n, self._spatial_corr(),
                                 self.fisher / max(probes, 1), self.voxels)


@contextmanager
def _evaluated_with(network: nn.Module, handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """`network` in eval mode with the hooks of `handles`; afterwards the hooks removed, the mode restored."""
    was_training = network.training
    network.eval()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        network.train(was_training)


CLASS_SHARE_FLOOR = 1e-3  # classes predicted in less of a patch than this count as this small


def fisher_probes(logits: torch.Tensor, regions: bool, generator: torch.Generator, probes: int
                  ) -> Iterator[torch.Tensor]:
    """`probes` random v shaped like `logits` (n, C, *spatial), each to be back-propagated as the
    gradient of the logits, with E[v vᵀ] = the class-balanced Fisher information of the prediction
    at each position.

    The Fisher information S = diag(p) − p pᵀ of a softmax (diag(σ(1−σ)) for the independent
    sigmoids of region-based models) weighs every voxel's change of the prediction alike, so a
    small class counts for little; per-class Dice, what users check, weighs a class's errors by
    the inverse of its size. So the change of each class probability is weighted by w_c = 1 /
    (C · its predicted share of the patch): the metric is S diag(w/p) S (diag(w σ(1−σ)) for
    regions), equal to S for classes of equal size. v = S diag(√(w/p)) ε with random signs ε (a
    Hutchinson probe: lower variance than labels drawn from p)."""
    with torch.no_grad():
        p = torch.sigmoid(logits.detach()) if regions else torch.softmax(logits.detach(), dim=1)
        share = p.mean(dim=tuple(range(2, p.ndim)), keepdim=True).clamp_min(CLASS_SHARE_FLOOR)
        weights = 1 / (p.shape[1] * share)
        scale = (weights * p * (1 - p)).sqrt() if regions else (weights * p).sqrt()
        for _ in range(probes):
            v = _random_signs(p, generator).mul_(scale)
            if not regions:
                v.sub_(p * v.sum(dim=1, keepdim=True))
            yield v


def _random_signs(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Independent random ±1 shaped like `like`: eight per random byte (faster than `bernoulli_`
    on CPUs, where the full-resolution logits of a 118-class model are 190 M values)."""
    count = like.numel()
    random = torch.randint(0, 256, (count // 8 + 1,), generator=generator, dtype=torch.uint8, device=like.device)
    bits = (random[:, None] >> torch.arange(8, dtype=torch.uint8, device=like.device)).bitwise_and_(1)
    return torch.empty_like(like).copy_(bits.flatten()[:count].view(like.shape)).mul_(2).sub_(1)


# What the probed pass keeps of each activation for its backward probes: half the memory of float32 for the
# largest buffers of a calibration (every activation of a 128³ patch, kept until the backward). Rounding to float16
# (~5e-4) moves the probed gradients far less than the random signs of the probes do.
SAVED_ACTIVATIONS = torch.float16
SAVED_AS_IS_BELOW = 1 << 16  # elements: smaller saved tensors (norm statistics) are kept as they are


def _pack(t: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor]:
    if t.dtype != torch.float32 or not t.requires_grad or t.numel() < SAVED_AS_IS_BELOW:
        return t  # parameters (frozen for the pass), small tensors
    return (t.detach().to(SAVED_ACTIVATIONS),)


def _unpack(packed: torch.Tensor | tuple[torch.Tensor]) -> torch.Tensor:
    return packed[0].float() if isinstance(packed, tuple) else packed


@contextmanager
def _parameters_frozen(network: nn.Module) -> Iterator[None]:
    """Within: no parameter of `network` requires a gradient (so no convolution keeps its input for one); after, each
    as it was."""
    parameters = [p for p in network.parameters() if p.requires_grad]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


def _probed_pass(network: nn.Module, batch: torch.Tensor, regions: bool, generator: torch.Generator,
                 probes: int = 1) -> None:
    """Run `network` forward on `batch` with gradients for the input only, then backward `probes`
    times from `fisher_probes` of its full-resolution logits (the first output with deep
    supervision): hooks on intermediate outputs see gradients whose second moment is the Fisher
    information there; the forward pass itself (what forward hooks see) is float32 throughout, the activations
    kept for the backward probes are `SAVED_ACTIVATIONS`. Parameters and their `.grad` are left untouched."""
    device = next(network.parameters()).device
    x = batch.to(device=device, dtype=torch.float32).requires_grad_(True)
    with (torch.enable_grad(), _parameters_frozen(network),
          torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)):
        output = network(x)
        logits = output[0] if isinstance(output, (list, tuple)) else output
        del output
        directions = list(fisher_probes(logits, regions, generator, probes))  # its softmax freed before the backward
        while directions:
            torch.autograd.grad(logits, x, grad_outputs=directions.pop(0), retain_graph=bool(directions))


def collect_statistics(
    network: nn.Module, patches: Iterable[torch.Tensor] | torch.Tensor, names: Sequence[str] | None = None,
    batch_size: int = 1, regions: bool = False, seed: int = 0, masks: torch.Tensor | None = None,
) -> dict[str, ChannelStatistics]:
    """Run `network` (eval mode, its own device) forward and backward on `patches` (N, C, *spatial)
    and return the statistics of every convolution module (or of those in `names`), keyed by
    qualified name. The network's output (or the first of several) are class logits, or region
    logits if `regions`; the Fisher information is probed with random signs drawn with `seed`
    (`fisher_probes`). `masks` (N, *spatial) bool: the voxels of each patch the statistics use, at every layer the
    positions all of whose voxels are in it (None: all); the network runs on the whole patches. The network's
    parameters and their gradients are left untouched."""
    channels = _ChannelHooks(network, names)
    _probe(network, patches, [channels], regions, seed, probes=1, batch_size=batch_size, masks=masks)
    return channels.result()


@dataclass(frozen=True)
class ResponseStatistics:
    """What refitting a decomposed layer's core needs, on calibration data: f, its first factor's
    outputs at the K kernel offsets around an output position (K·R_in, offsets major), and y, the
    original layer's output there. feature_cov and cross_cov = Cov(y, f) are centred per sample
    and weighted by how much each position matters (`SampledOutputs.weights`); feature_mean
    (K·R_in,) and output_mean (C_out,) are plain means; samples: positions used."""

    feature_cov: torch.Tensor
    cross_cov: torch.Tensor
    feature_mean: torch.Tensor
    output_mean: torch.Tensor
    samples: int


@dataclass(frozen=True)
class SampledOutputs:
    """The original output of one convolution at positions drawn from one patch: `coords` (one index
    tensor per spatial axis), `outputs` (S, C_out; float32, as the network computes them) and `weights` (S,)
    how much an error there costs."""

    coords: tuple[torch.Tensor, ...]
    outputs: torch.Tensor
    weights: torch.Tensor


Targets = dict[str, list[SampledOutputs]]

FISHER_PROBES = 1  # backward passes per patch that estimate the Fisher information at each sampled position
POSITION_WEIGHT_SHARE = 0.5  # weights: this share from the position's own Fisher information, the rest uniform


def sample_targets(
    network: nn.Module, patches: torch.Tensor, names: Sequence[str], positions_per_patch: int = 16384, seed: int = 0,
    regions: bool = False, masks: torch.Tensor | None = None,
) -> tuple[Targets, list[str]]:
    """One pass of the original `network` over `patches`: for each convolution in `names` and each
    patch, up to `positions_per_patch` output positions drawn with `seed`, the output there and a
    weight per position; plus the names in the order the forward pass runs them.

    An output error e at position p costs about eᵀ F_p e (F_p: the Fisher information of the
    prediction with respect to the output there, `fisher_probes`; `regions` as in
    `collect_statistics`). The refit uses the mean F over positions as the metric; the weights say
    how much more or less than average position p matters: a mix of uniform and trace(F_p) / mean
    trace (the trace is probed `FISHER_PROBES` times, and alone would give a few positions nearly
    all the weight). With `masks` (as in `collect_statistics`) positions are drawn among those kept."""
    targets = _TargetHooks(network, names, positions_per_patch, seed)
    _probe(network, patches, [targets], regions, seed, probes=FISHER_PROBES, masks=masks)
    return targets.result()


def calibrate(
    network: nn.Module, patches: torch.Tensor, regions: bool = False, seed: int = 0, positions_per_patch: int = 16384,
    masks: torch.Tensor | None = None,
) -> tuple[dict[str, ChannelStatistics], tuple[Targets, list[str]]]:
    """`collect_statistics` and `sample_targets` of every convolution in one pass (forward, and
    `FISHER_PROBES` backward probes per patch, whose mean gives the Fisher information): what a
    calibrated fit and its refit need, for the cost of the targets alone; `masks` as in `collect_statistics`."""
    channels = _ChannelHooks(network, None)
    targets = _TargetHooks(network, list(channels.wanted.values()), positions_per_patch, seed)
    _probe(network, patches, [channels, targets], regions, seed, probes=FISHER_PROBES, masks=masks)
    return channels.result(), targets.result()


class _ChannelHooks:
    """A forward hook accumulating `ChannelStatistics` of the convolutions named (all if `names` is None)."""

    def __init__(self, network: nn.Module, names: Sequence[str] | None) -> None:
        self.wanted: dict[int, str] = {}
        for name, module in network.named_modules():
            if isinstance(module, _ConvNd) and (names is None or name in names) and id(module) not in self.wanted:
                self.wanted[id(module)] = name
        self.accumulators = {name: _Accumulator(network.get_submodule(name)) for name in self.wanted.values()}
        self.probes = 0
        self.kept: torch.Tensor | None = None  # of the current batch

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        accumulator = self.accumulators[self.wanted[id(module)]]
        accumulator.add(args[0], _kept_at(self.kept, args[0].shape[2:]))
        if output.requires_grad:
            kept = _kept_at(self.kept, output.shape[2:])
            output.register_hook(lambda g: accumulator.add_gradient(g, kept))

    def start(self, batch: torch.Tensor, probes: int, kept: torch.Tensor | None = None) -> None:
        self.probes += batch.shape[0] * probes
        self.kept = kept

    def result(self) -> dict[str, ChannelStatistics]:
        statistics = {name: acc.result(self.probes) for name, acc in self.accumulators.items() if acc.voxels}
        if not statistics:
            raise CalibrationError("no calibration patches were given")
        return statistics


class _TargetHooks:
    """A forward hook sampling each named convolution's output at random positions of each patch, with
    the trace of the Fisher information there (`sample_targets`); patches one at a time."""

    def __init__(self, network: nn.Module, names: Sequence[str], positions_per_patch: int, seed: int) -> None:
        self.wanted = {id(network.get_submodule(name)): name for name in names}
        self.positions_per_patch = positions_per_patch
        self.generator = torch.Generator().manual_seed(seed)
        self.sampled: dict[str, list[tuple]] = {name: [] for name in names}
        self.order: list[str] = []
        self.ran: set[str] = set()  # in the current pass
        self.kept: torch.Tensor | None = None  # of the current patch

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        name = self.wanted[id(module)]
        if name not in self.order:
            self.order.append(name)
        if name in self.ran:  # a module run twice in one pass: its first run only
            return
        self.ran.add(name)
        spatial = output.shape[2:]
        kept = _kept_at(self.kept, spatial)
        if kept is None:
            chosen = torch.randperm(math.prod(spatial), generator=self.generator)[:self.positions_per_patch]
        else:
            allowed = kept[0].flatten().nonzero().squeeze(1).cpu()
            chosen = allowed[torch.randperm(len(allowed), generator=self.generator)[:self.positions_per_patch]]
        coords = torch.unravel_index(chosen, spatial)
        index = (0, slice(None), *(c.to(output.device) for c in coords))
        fisher = torch.zeros(len(chosen), dtype=torch.float64)
        self.sampled[name].append((coords, output[index].T.detach().float().cpu(), fisher))

        def add_gradient(g: torch.Tensor) -> None:
            fisher.add_(g[index].square().sum(dim=0).double().cpu())

        if output.requires_grad:
            output.register_hook(add_gradient)

    def start(self, batch: torch.Tensor, probes: int, kept: torch.Tensor | None = None) -> None:
        if batch.shape[0] != 1:
            raise ValueError("targets are sampled one patch at a time")
        self.ran.clear()
        self.kept = kept

    def result(self) -> tuple[Targets, list[str]]:
        targets: Targets = {}
        for name, per_patch in self.sampled.items():
            mean = float(torch.cat([fisher for *_, fisher in per_patch]).mean()) if per_patch else 0.0
            targets[name] = [
                SampledOutputs(coords, outputs, (1 - POSITION_WEIGHT_SHARE)
                               + POSITION_WEIGHT_SHARE * (fisher / mean if mean > 0 else torch.ones_like(fisher)))
                for coords, outputs, fisher in per_patch
            ]
        return targets, self.order


def _kept_at(kept: torch.Tensor | None, spatial: Sequence[int]) -> torch.Tensor | None:
    """`kept` ((n, *patch) bool: the voxels the statistics use; None: all) at a feature map of shape `spatial`: a
    position is kept where every voxel under it is."""
    if kept is None or tuple(kept.shape[1:]) == tuple(spatial):
        return kept
    pool = getattr(F, f"adaptive_max_pool{len(spatial)}d")
    return pool((~kept)[:, None].float(), tuple(spatial))[:, 0] == 0


def _probe(network: nn.Module, patches: Iterable[torch.Tensor] | torch.Tensor, hooks: list, regions: bool, seed: int,
           probes: int, batch_size: int = 1, masks: torch.Tensor | None = None) -> None:
    """`_probed_pass` over `patches` (checked: the network's channel count, finite) with `hooks` on the
    convolutions they want, in eval mode; each hook's `start` is told of every batch first, and of the voxels of it
    the statistics use (`masks` (N, *spatial) bool; None: all)."""
    device = next(network.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    expected = _input_channels(network)
    wanted = set().union(*(hook.wanted for hook in hooks))
    handles = [module.register_forward_hook(hook) for module in network.modules() if id(module) in wanted
               for hook in hooks if id(module) in hook.wanted]
    with _evaluated_with(network, handles):
        batches = list(_batches(patches, batch_size))
        kept = [None] * len(batches) if masks is None else masks.split(batch_size)
        for batch, batch_kept in tqdm(zip(batches, kept, strict=True), total=len(batches), unit="patch",
                                      desc="calibrating: probing the network", disable=None, leave=False):
            if expected is not None and batch.shape[1] != expected:
                raise CalibrationError(
                    f"calibration patches have {batch.shape[1]} channel(s) but the network takes {expected}"
                )
            if not torch.isfinite(batch).all():
                raise CalibrationError("calibration patches contain NaN or infinite values")
            if batch_kept is not None:
                batch_kept = batch_kept.to(device=device, dtype=torch.bool)
            for hook in hooks:
                hook.start(batch, probes, batch_kept)
            _probed_pass(network, batch, regions, generator, probes)


def _features(conv: _ConvNd, z: torch.Tensor, coords: list[torch.Tensor]) -> torch.Tensor:
    """What each kernel offset of `conv` sees of `z` (R_in, *spatial) at the output positions `coords`:
    (S, K·R_in), offsets major, on the device of `z`. A transposed convolution whose offsets tile the
    output (kernel = stride) gives each output position one input position and one offset; the other
    blocks are 0.

    One gather: `z`, zero-padded and channels last, as rows of R_in values, indexed by the row of
    each position plus the row shift of each offset (flattened, (S, K) at once)."""
    kernel, stride = tuple(conv.kernel_size), tuple(conv.stride)
    rows = z.movedim(0, -1)  # (*spatial, R_in), a view
    if isinstance(conv, _ConvTransposeNd):
        rows = rows.contiguous()
        index = _flat_index(rows.shape[:-1], [c // s for c, s in zip(coords, stride, strict=True)])
        source = rows.view(-1, rows.shape[-1])[index]  # (S, R_in)
        offset = torch.zeros_like(coords[0])
        for c, k in zip(coords, kernel, strict=True):
            offset = offset * k + c % k
        features = torch.zeros(source.shape[0], math.prod(kernel), source.shape[1], dtype=source.dtype,
                               device=source.device)
        features[torch.arange(source.shape[0], device=source.device), offset] = source
        return features.flatten(1)
    rows = F.pad(rows, [0, 0, *(p for p in reversed(conv.padding) for _ in range(2))]).contiguous()
    spatial = rows.shape[:-1]
    corners = _flat_index(spatial, [c * s for c, s in zip(coords, stride, strict=True)])  # (S,)
    offsets = torch.tensor(list(itertools.product(*(range(k) for k in kernel))), device=z.device)  # (K, dims)
    shifts = _flat_index(spatial, list((offsets * torch.tensor(conv.dilation, device=z.device)).unbind(1)))
    index = (corners[:, None] + shifts).flatten()
    return rows.view(-1, rows.shape[-1])[index].view(corners.shape[0], -1)


def _flat_index(shape: Sequence[int], coords: Sequence[torch.Tensor]) -> torch.Tensor:
    """The row-major flat index into `shape` of the positions `coords` (one tensor per axis)."""
    index = torch.zeros_like(coords[0])
    for c, n in zip(coords, shape, strict=True):
        index = index * n + c
    return index


def _gram(g: torch.Tensor) -> torch.Tensor:
    """gᵀg for g (S, n). On the CPU, for n from `GRAM_BLOCKS_FROM`, by three block rows of its upper
    triangle, mirrored (torch has no symmetric product): 2/3 of the multiply-adds of the full product."""
    n = g.shape[1]
    if g.device.type != "cpu" or n < GRAM_BLOCKS_FROM:
        return g.T @ g
    gram = g.new_empty(n, n)
    edges = [n * i // 3 for i in range(4)]
    for a, b in itertools.pairwise(edges):
        block = g[:, a:b].T @ g[:, a:]  # rows a:b, columns a:
        gram[a:b, a:] = block
        gram[b:, a:b] = block[:, b - a:].T
    return gram


GRAM_BLOCKS_FROM = 1024


def responses(
    conv: _ConvNd, x: torch.Tensor, first: torch.Tensor, targets: Sequence[SampledOutputs],
) -> ResponseStatistics:
    """`ResponseStatistics` of the convolution `conv` from its input `x` (N, C_in, *spatial) on the
    calibration patches (in a network that may already have the layers before it compressed, so
    that the refit makes up for their error): each patch's input, mapped by `first` (R_in, C_in),
    gives the features at the kernel offsets around the positions of its `targets` entry (one per
    patch, in order), paired with the original network's outputs there.

    Features are gathered (float32, as the network computes) and their covariances computed on the
    device of `x` (the CPU for devices without float64). The covariances are float64 products of
    the values centred per patch: float32 products, though within ~1e-6 of their scale, move the
    refitted weights by up to ~1e-4 of theirs (the regression amplifies their rounding)."""
    device = x.device if x.device.type != "mps" else torch.device("cpu")
    first = first.detach().flatten(1).to(device=x.device, dtype=torch.float32)
    sums, samples = None, 0
    for patch, target in zip(x, targets, strict=True):
        z = torch.mm(first, patch.reshape(patch.shape[0], -1).float()).view(-1, *patch.shape[1:])
        f = _features(conv, z, [c.to(x.device) for c in target.coords]).to(device)  # (S, K·R_in), float32
        w, t = target.weights.to(device=device, dtype=torch.float64), target.outputs.to(device, torch.float64)
        weight, root = w.sum(), w.sqrt()[:, None]
        centred = f.double()
        weighted_sum, feature_sum = torch.stack([w, torch.ones_like(w)]) @ centred  # one pass over f
        centred.sub_(weighted_sum / weight).mul_(root)  # in place: √w (f − weighted mean)
        t_centred = (t - (w @ t) / weight).mul_(root)
        patch_sums = (_gram(centred).cpu(), (t_centred.T @ centred).cpu(), feature_sum.cpu(), t.sum(dim=0).cpu(),
                      weight.cpu())
        sums = patch_sums if sums is None else tuple(a + b for a, b in zip(sums, patch_sums, strict=True))
        samples += f.shape[0]
    if sums is None:
        raise CalibrationError("no calibration patches reach this layer")
    *weighted, feature_sum, output_sum, weight = sums
    return ResponseStatistics(*(t / weight for t in weighted), feature_sum / samples, output_sum / samples, samples)


def _input_channels(network: nn.Module) -> int | None:
    first = next((m for m in network.modules() if isinstance(m, _ConvNd)), None)
    return None if first is None else first.in_channels


def _batches(patches: Iterable[torch.Tensor] | torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(patches, torch.Tensor):
        if patches.ndim < 3 or patches.shape[0] == 0:
            raise CalibrationError(
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
        for t in (s.input_cov, s.input_mean, s.spatial_corr, s.output_fisher):
            h.update(t.contiguous().numpy())  # the buffer itself, not a copy
    return h.hexdigest()
