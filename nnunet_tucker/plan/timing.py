"""Step 1, plan: layer timings on the device at hand, for the ``profiled`` policy: which form is fastest here.

A decomposed layer is faster or slower than the original depending on its shape, the device and
the kernels of the installed library (on CPUs, unaligned ranks such as 13 fall back to a slow
convolution path; at high ranks three convolutions cost more than one). `LayerTimer` times the
original layer and decomposed candidates at the layer's real input shape (spatially cropped to a
bounded size, so profiling a full-size network takes seconds) and caches every timing on disk,
keyed by device, library versions, threads and shapes, so that later loads decide instantly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..config import default_cache_dir
from ..files import atomic_write, file_lock
from ..layers import FusedInstanceNorm, TuckerConv, normalized_activated, normalized_activated_gemm
from ..memory import freed_memory_reused, reuse_freed_memory
from .ranks import conv_spec

logger = logging.getLogger(__name__)

MAX_PROFILE_VOXELS = 1 << 17  # 64×64×32: per-voxel cost is settled by then; bounds profiling time
ROUNDS = 3
_INSTANCE_NORMS = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
FORMS_VERSION = 4  # bump when `TuckerConv`'s computation changes: earlier timings no longer apply


def device_description(device: torch.device) -> str:
    """What decides kernel speed: device model, torch (and cuDNN) version, threads, the CPU allocator's
    setting; and how the forms are computed (`FORMS_VERSION`)."""
    forms = f"forms {FORMS_VERSION} torch {torch.__version__}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{forms} cuda {name} cudnn {torch.backends.cudnn.version()} fp16 autocast"
    return f"{forms} {device.type} {platform.machine()} {platform.processor()} threads {torch.get_num_threads()} " \
           f"cores {os.cpu_count()} malloc {'reuse' if freed_memory_reused() else 'default'}"


def profile_input_shape(shape: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """`shape` (n, C, *spatial) with batch 1 and spatial extents halved (largest first) until the
    volume is at most `MAX_PROFILE_VOXELS`, keeping each a multiple of the stride."""
    spatial = list(shape[2:])
    while torch.Size(spatial).numel() > MAX_PROFILE_VOXELS:
        i = max(range(len(spatial)), key=lambda d: spatial[d])
        halved = spatial[i] // 2 // stride[i] * stride[i]
        if halved < max(2 * stride[i], 4):
            break
        spatial[i] = halved
    return (1, shape[1], *spatial)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LayerTimer:
    """Seconds per forward call of a layer's original and decomposed forms, cached per device."""

    def __init__(self, device: torch.device | str = "cpu", cache_dir: Path | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cpu":
            reuse_freed_memory()  # time the forms as a compressed prediction will run them
        self.description = device_description(self.device)
        key = hashlib.blake2b(self.description.encode(), digest_size=8).hexdigest()
        self.path = (cache_dir or default_cache_dir()) / f"profile-{key}.json"
        self.timings: dict[str, float] = self._read()
        self.consulted = False  # whether a plan asked this timer anything
        self.measured = 0
        self.seconds_spent = 0.0
        self.saved = False  # whether the timings were written to `path`

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
            if data.get("device") == self.description:
                return {k: float(v) for k, v in data["timings"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return {}

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the profile's lock file (where the OS and the disk allow one), reading what others
        stored first, and save on leaving: processes that load a model together (``-num_parts``)
        time once and decide alike."""
        with file_lock(self.path.with_suffix(".lock")) as locked:
            try:
                if locked:
                    self.timings = {**self.timings, **self._read()}
                yield
            finally:
                self.save()

    def save(self) -> None:
        """Write the timings (merged with what other processes wrote meanwhile), atomically."""
        if not self.measured:
            return
        merged = {**self._read(), **self.timings}
        try:
            atomic_write(self.path, json.dumps({"device": self.description, "timings": merged}, indent=0,
                                               sort_keys=True))
            self.saved = True
        except OSError as e:
            logger.warning("could not write the device profile %s (%s)", self.path, e)

    def seconds(
        self, conv: _ConvNd, input_shape: Sequence[int], candidates: Sequence[tuple[int, int] | None],
        instance_norm: bool = False,
    ) -> dict[tuple[int, int] | None, float]:
        """Seconds per call of each candidate: None is the original layer, (in_rank, out_rank) a
        `TuckerConv`, each followed by its instance norm if `instance_norm` (fused into the
        `TuckerConv`); measured interleaved (unless cached), minimum of `ROUNDS`."""
        self.consulted = True
        shape = profile_input_shape(input_shape, conv.stride if not conv.transposed else (1,) * len(conv.stride))
        keys = {c: self._key(conv, shape, c) + (" +instancenorm" if instance_norm else "") for c in candidates}
        missing = [c for c in candidates if keys[c] not in self.timings]
        if missing:
            self._measure(conv, shape, missing, keys, instance_norm)
        return {c: self.timings[keys[c]] for c in candidates}

    @staticmethod
    def _key(conv: _ConvNd, shape: Sequence[int] | None, candidate: tuple[int, int] | None) -> str:
        s = conv_spec(conv)
        form = "original" if candidate is None else f"tucker{candidate[0]}x{candidate[1]}"
        return (f"{type(conv).__name__} {s.in_channels}->{s.out_channels} k{s.kernel_size} s{s.stride} "
                f"p{tuple(conv.padding)} d{tuple(conv.dilation)} bias{conv.bias is not None} "
                f"in{tuple(shape) if shape is not None else '(after)'} {form}")

    def pair_seconds(
        self, conv: _ConvNd, input_shape: Sequence[int], ranks: tuple[int, int], following: _ConvNd,
        following_ranks: tuple[int, int], activation: nn.Module, end: nn.Module | None = None,
    ) -> dict[tuple, float]:
        """Seconds per call of `conv`, its instance norm, `activation`, then `following` and its instance
        norm (then, with `end`, a residual block's sum with a skip and `end`), for each (conv's form,
        following's form) of None (original) and the given ranks; run as `swap.forms.ChainedConvBlocks` and
        `ChainedResidualBlock` run them on the CPU (both decomposed chained, a decomposed `following`
        adding the skip and activating in its output pass)."""
        self.consulted = True
        shape = profile_input_shape(input_shape, conv.stride)
        combos = [(a, b) for a in (None, ranks) for b in (None, following_ranks)]
        residual_key = "" if end is None else f" +residual {type(end).__name__}"
        keys = {(a, b): f"{self._key(conv, shape, a)} +instancenorm {type(activation).__name__} "
                        f"{self._key(following, None, b)} +instancenorm{' chained' if a and b else ''}{residual_key}"
                for a, b in combos}
        missing = [c for c in combos if keys[c] not in self.timings]
        if missing:
            a, b = self._forms(conv, [None, ranks], True), self._forms(following, [None, following_ranks], True)
            act, end = copy.deepcopy(activation), copy.deepcopy(end)
            if end is not None:  # the skip: as the blocks' output
                with torch.inference_mode():
                    skip = torch.randn_like(b[None](a[None](torch.zeros(shape, device=self.device))))

            def unit(first: nn.Module, second: nn.Module):
                def run(x):
                    if not isinstance(second, TuckerConv):
                        y = second(act(first(x)))
                        return y if end is None else end(y.add_(skip))
                    if isinstance(first, TuckerConv):  # chained
                        z = normalized_activated_gemm(first.core_output(first.to_rank_space(x)), first.last.weight,
                                                      first.norm, act, second.first.weight)
                    else:
                        z = second.to_rank_space(act(first(x)))
                    if end is None:
                        return second.from_rank_space(z)
                    return normalized_activated(second.core_output(z), second.last.weight, second.norm, end, skip)
                return run

            self._time({c: unit(a[c[0]], b[c[1]]) for c in missing}, shape, keys)
        return {c: self.timings[keys[c]] for c in combos}

    def _forms(self, conv: _ConvNd, candidates: Sequence, instance_norm: bool) -> dict:
        """Each candidate's module on the device: the original layer (None) or a `TuckerConv`, each
        followed by a fresh instance norm if `instance_norm` (fused into the `TuckerConv`)."""
        factory = {"device": self.device, "dtype": torch.float32}
        original = copy.deepcopy(conv).to(**factory)
        forms: dict = {c: original if c is None else TuckerConv(original, *c) for c in candidates}
        if instance_norm:
            norm = _INSTANCE_NORMS[conv.weight.ndim - 2](conv.out_channels, affine=True, **factory)
            for c, form in forms.items():
                if c is None:
                    forms[c] = nn.Sequential(form, norm)
                else:
                    form.fuse_norm(FusedInstanceNorm(norm))
        return {c: form.eval() for c, form in forms.items()}

    def _measure(self, conv: _ConvNd, shape: Sequence[int], candidates: Sequence, keys: dict,
                 instance_norm: bool = False) -> None:
        self._time(self._forms(conv, candidates, instance_norm), shape, keys)

    def _time(self, forms: dict, shape: Sequence[int], keys: dict) -> None:
        """Time each of `forms` (candidate -> callable) on a random input of `shape`, interleaved, the
        minimum of `ROUNDS` after a warm-up round; stored under `keys`."""
        start = time.perf_counter()
        x = torch.randn(tuple(shape), device=self.device)
        best = {c: float("inf") for c in forms}
        # nnU-Net predicts in fp16 autocast on CUDA, so that is what is timed there
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        with torch.inference_mode(), autocast:
            for round_index in range(ROUNDS + 1):  # the first round warms up
                for c, module in forms.items():
                    _synchronize(self.device)
                    t0 = time.perf_counter()
                    module(x)
                    _synchronize(self.device)
                    if round_index:
                        best[c] = min(best[c], time.perf_counter() - t0)
        for c in forms:
            self.timings[keys[c]] = best[c]
        self.measured += len(forms)
        self.seconds_spent += time.perf_counter() - start


def layer_shapes(network: nn.Module, input_shape: Sequence[int]) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """id(conv module) -> (input shape, output shape) in one forward pass on `input_shape` (meta
    device, no arithmetic). Layers the forward pass does not run (deep-supervision heads) are absent."""
    originals = {id(m): m for m in network.modules() if isinstance(m, _ConvNd)}
    clone = copy.deepcopy(network)
    clones = {id(c): o for o, c in zip(network.modules(), clone.modules(), strict=True)}
    shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        shapes.setdefault(id(clones[id(module)]), (tuple(args[0].shape), tuple(output.shape)))

    clone = clone.to("meta")
    handles = [m.register_forward_hook(record) for m in clone.modules() if id(clones[id(m)]) in originals]
    try:
        with torch.no_grad():
            clone(torch.empty(tuple(input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return shapes
