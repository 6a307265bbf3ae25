"""What runs a compressed network: this package's PyTorch forms (``torch``) or OpenVINO (``openvino``, on CPUs).

OpenVINO compiles the network as plain modules (`swap.surgery.plain_modules`: each decomposed layer its three
convolutions) and fuses 1x1 stages, norms and activations and picks memory layouts per layer itself. Each set of
weights (an nnU-Net fold) is converted once: traced on a small input and reshaped to the patch (seconds, where a
trace at the patch takes most of a minute), checked against PyTorch's output on one patch, and kept in the package
cache as OpenVINO IR, keyed by the weights, the modules, the patch and the versions, with OpenVINO's cache of
compiled kernels beside it: later loads take about a second. ``auto`` times both backends on one patch, once per
architecture and machine (cached; models that differ only in their class count share it, as TotalSegmentator's five
1.5 mm parts do), and keeps the faster: never slower than the PyTorch forms. Where the timing says PyTorch, nothing
is converted.

Inside nnU-Net, `OpenVINONetwork` stands where the predictor's network stood: nnU-Net loads a fold's state dict
into it before that fold's sliding window, and it runs the model compiled for those weights.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import default_cache_dir
from .errors import TuckerConfigError
from .files import atomic_write, state_dict_digest
from .plan.timing import device_description
from .swap.surgery import plain_modules

logger = logging.getLogger("nnunet_tucker")

EXTRA = "pip install 'nnunet-tucker[openvino]'"
# OpenVINO's output may differ from PyTorch's by float rounding: at most this share of the largest |logit|
TOLERANCE = 2e-3
# `auto` keeps OpenVINO only where it is this much faster per patch: each process pays its first inference (~2 s on
# the 3 mm network, against ~1.2 s for each later one), which a tie does not earn back over a case's few tiles
AUTO_MARGIN = 0.10
TIMED_ROUNDS = 3  # `auto`: interleaved calls per backend, the fastest counts (the first of a process may be cold)
CONVERSION_VERSION = 1  # bump when what is converted or checked changes: earlier entries no longer apply


@dataclass
class BackendChoice:
    """What runs the network and why: `name` ("torch" or "openvino"), `reason` (a phrase for the log), seconds
    per patch of each backend where timed, conversion seconds, whether it came from the cache."""

    name: str
    reason: str
    torch_seconds: float | None = None
    openvino_seconds: float | None = None
    conversion_seconds: float | None = None
    from_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def openvino_missing() -> str | None:
    """Why OpenVINO cannot be used here (not installed, or failing to import), or None where it can."""
    try:
        import openvino  # noqa: F401
    except Exception as e:  # not installed (ImportError), or broken (its native libraries)
        return f"OpenVINO cannot be imported ({type(e).__name__}: {e}); {EXTRA}"
    return None


def check_backend(backend: str) -> None:
    """Before any work: a `TuckerConfigError` where ``openvino`` is asked for and cannot be imported."""
    problem = openvino_missing() if backend == "openvino" else None
    if problem:
        raise TuckerConfigError(f"TUCKER_BACKEND=openvino (--backend openvino) needs OpenVINO: {problem}")


def network_for_backend(network: nn.Module, states: Sequence[dict[str, torch.Tensor]], input_shape: Sequence[int],
                        device: torch.device, backend: str, cache_dir: Path | None = None
                        ) -> tuple[nn.Module, BackendChoice]:
    """The module to run compressed `network` (PyTorch, holding `states[0]`) with fold weights `states` on inputs of
    `input_shape`, as `backend` ("torch", "openvino", "auto") asks, and why: `network` itself, or an `OpenVINONetwork`
    around it. A conversion that fails or differs from PyTorch's output beyond `TOLERANCE` warns and keeps PyTorch."""
    if backend == "torch":
        return network, BackendChoice("torch", "asked for")
    if device.type != "cpu":
        if backend == "openvino":
            logger.warning("TUCKER_BACKEND=openvino runs on CPUs, and this prediction runs on %s: PyTorch runs it",
                           device)
        return network, BackendChoice("torch", f"the device is {device.type}")
    problem = openvino_missing()
    if problem:
        check_backend(backend)
        return network, BackendChoice("torch", "OpenVINO cannot be imported")
    training = network.training  # (nnU-Net's predictor sets eval mode only when it predicts)
    converter = _Converter(network.eval(), tuple(input_shape), cache_dir)  # checked and timed as it will run
    known = converter.timed_choice() if backend == "auto" else None
    if known is not None and known.name == "torch":  # timed before: nothing to convert
        network.train(training)
        known.from_cache = True
        return network, known
    try:
        compiled = [converter.compiled(states[0])]
        choice = converter.choice() if backend == "auto" else BackendChoice("openvino", "asked for")
        if choice.name == "openvino":
            compiled += [converter.compiled(state) for state in states[1:]]
    except _Unusable as e:
        logger.warning("OpenVINO cannot run this network (%s): PyTorch runs it", e)
        return network, BackendChoice("torch", f"OpenVINO failed: {e}")
    finally:
        network.load_state_dict(states[0])
        network.train(training)
    choice.conversion_seconds, choice.from_cache = round(converter.seconds, 2), converter.converted == 0
    if choice.name == "torch":
        return network, choice
    return OpenVINONetwork(network, list(zip(states, compiled, strict=True)), input_shape), choice


class _Unusable(Exception):
    """OpenVINO cannot run the network: its conversion failed, or its output differs from PyTorch's."""


class _Converter:
    """Converts, checks, caches and compiles one network's fold weights for OpenVINO; times it against PyTorch."""

    def __init__(self, network: nn.Module, input_shape: tuple[int, ...], cache_dir: Path | None) -> None:
        import openvino

        self.ov = openvino
        self.network, self.input_shape = network, input_shape
        self.plain = plain_modules(network)  # shares the weights: follows each `load_state_dict`
        self.folder = (cache_dir or default_cache_dir()) / "openvino"
        self.core = openvino.Core()
        self.settings = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                         "INFERENCE_NUM_THREADS": torch.get_num_threads(), "CACHE_DIR": str(self.folder / "kernels")}
        self.seconds = 0.0
        self.converted = 0
        self.first: Any = None  # fold 0's compiled model, for `choice`

    def key(self, state: dict[str, torch.Tensor]) -> str:
        layout = (f"{state_dict_digest(state)}|{self.plain!r}|{self.input_shape}|{self.ov.__version__}|{__version__}|"
                  f"{CONVERSION_VERSION}")
        return hashlib.blake2b(layout.encode(), digest_size=20).hexdigest()

    def compiled(self, state: dict[str, torch.Tensor]) -> Any:
        """The compiled model of the network with `state` (from the cache, else converted and checked there)."""
        start = time.perf_counter()
        self.network.load_state_dict(state)
        entry = self.folder / self.key(state)
        check = _read_json(entry / "check.json")
        if check is None:  # not there, or not whole: converted (again)
            shutil.rmtree(entry, ignore_errors=True)
            try:
                self._convert(entry)
            except OSError as e:  # a read-only or full cache: PyTorch runs it, the prediction goes on
                raise _Unusable(f"the converted model could not be stored in {self.folder} ({e})") from e
            self.converted += 1
            check = _read_json(entry / "check.json") or {"passed": False, "problem": f"{entry} is unreadable"}
        if not check.get("passed"):
            raise _Unusable(check.get("problem") or "its check failed")
        try:
            compiled = self.core.compile_model(str(entry / "model.xml"), "CPU", self.settings)
        except Exception as e:  # an unreadable cache entry, an unsupported CPU: PyTorch, with the reason
            raise _Unusable(f"compiling {entry / 'model.xml'} failed: {e}") from e
        self.seconds += time.perf_counter() - start
        if self.first is None:
            self.first = compiled
        return compiled

    def _convert(self, entry: Path) -> None:
        """Convert the network as loaded now, check it against PyTorch on one patch, and store both in `entry`
        (a folder renamed into place whole; a failed check is stored too, so that it is not tried again)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=entry.name, suffix=".tmp"))
        try:
            check = self._converted_and_checked(staging)
            atomic_write(staging / "check.json", json.dumps(check, indent=1))
            with contextlib.suppress(OSError):  # another process stored the same entry meanwhile
                os.replace(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _converted_and_checked(self, staging: Path) -> dict[str, Any]:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the tracer's remarks on Python control flow
                model = self.ov.convert_model(self.plain, example_input=torch.zeros(_trace_shape(self.network,
                                                                                               self.input_shape)))
            model.reshape({model.inputs[0]: self.ov.PartialShape(list(self.input_shape))})
            self.ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
            compiled = self.core.compile_model(model, "CPU", self.settings)
        except Exception as e:
            return {"passed": False, "problem": f"conversion failed: {type(e).__name__}: {e}"}
        x = check_input(self.input_shape)
        with torch.no_grad():
            expected = self.network(x).float()
        found = torch.from_numpy(compiled(x.numpy())[0])
        if found.shape != expected.shape:
            return {"passed": False, "problem": f"output shape {tuple(found.shape)}, PyTorch's {tuple(expected.shape)}"}
        scale = float(expected.abs().max())
        difference = float((found - expected).abs().max())
        passed = difference <= TOLERANCE * max(scale, 1e-6)
        problem = None if passed else (f"its output differs from PyTorch's by up to {difference:.3g} (largest "
                                       f"|logit| {scale:.3g}; allowed {TOLERANCE:g} of it)")
        return {"passed": passed, "problem": problem, "max_difference": difference, "scale": scale}

    @functools.cached_property
    def timing_path(self) -> Path:
        """Where `auto`'s timing of this architecture on this machine is kept."""
        machine = f"{device_description(torch.device('cpu'))}|openvino {self.ov.__version__}"
        layout = f"{architecture(self.plain)}|{self.input_shape}|{machine}|{__version__}|{CONVERSION_VERSION}"
        return self.folder / "timings" / f"{hashlib.blake2b(layout.encode(), digest_size=20).hexdigest()}.json"

    def timed_choice(self) -> BackendChoice | None:
        """`auto`'s choice from the timing kept for this architecture and machine; None where there is none."""
        seconds = (_read_json(self.timing_path) or {}).get("seconds")
        if not (isinstance(seconds, dict) and {"torch", "openvino"} <= set(seconds)):
            return None
        return _faster(seconds["torch"], seconds["openvino"])

    def choice(self) -> BackendChoice:
        """`auto`: the faster backend on one patch, timed interleaved (`TIMED_ROUNDS`) once per architecture and
        machine, with fold 0's compiled model."""
        known = self.timed_choice()
        if known is not None:
            return known
        seconds = self._timed(self.first)
        with contextlib.suppress(OSError):
            path = self.timing_path
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({"architecture": architecture(self.plain), "seconds": seconds}))
        return _faster(seconds["torch"], seconds["openvino"])

    def _timed(self, compiled: Any) -> dict[str, float]:
        x = check_input(self.input_shape)
        request = compiled.create_infer_request()
        runs = {"torch": lambda: self.network(x), "openvino": lambda: request.infer({0: x.numpy()})}
        best = dict.fromkeys(runs, float("inf"))
        with torch.inference_mode():
            for _ in range(TIMED_ROUNDS):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - start)
        return best


def _faster(torch_s: float, openvino_s: float) -> BackendChoice:
    """`auto`'s choice from seconds per patch: OpenVINO where it is `AUTO_MARGIN` faster, else PyTorch."""
    measured = f"{openvino_s:.2f} s vs {torch_s:.2f} s for PyTorch on one patch here, measured once"
    if openvino_s * (1 + AUTO_MARGIN) <= torch_s:
        return BackendChoice("openvino", f"{torch_s / openvino_s:.2f}× faster than PyTorch ({measured})", torch_s,
                             openvino_s)
    return BackendChoice("torch", f"OpenVINO is not {AUTO_MARGIN:.0%} faster, what pays for its start in each process "
                         f"({measured})", torch_s, openvino_s)


def architecture(network: nn.Module) -> str:
    """`network`'s modules as text, one line per module without children, with the class count of its
    segmentation heads (nnU-Net's ``seg_layers``) left out: a last 1x1x1 convolution changes the backends' speeds
    alike, so models of one architecture with other classes share `auto`'s timing."""
    lines = []
    for name, module in network.named_modules():
        if next(module.children(), None) is not None:
            continue
        if ".seg_layers." in f".{name}" and isinstance(module, nn.modules.conv._ConvNd):
            lines.append(f"{name}: {type(module).__name__} head from {module.in_channels} channels")
        else:
            lines.append(f"{name}: {type(module).__name__}({module.extra_repr()})")
    return "\n".join(lines)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_input(input_shape: Sequence[int]) -> torch.Tensor:
    """The patch both backends are compared and timed on: standard normal values (nnU-Net's CT and z-score
    normalisations give inputs of that scale), the same on every machine."""
    return torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0))


def _trace_shape(network: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """A small input the network takes like the patch: twice its total stride per axis (U-Net encoders' `strides`),
    at most the patch; the patch itself where the strides are unknown."""
    strides = getattr(getattr(network, "encoder", None), "strides", None)
    spatial = tuple(input_shape[2:])
    if strides is None:
        return tuple(input_shape)
    total = [1] * len(spatial)
    for stride in strides:
        stride = [stride] * len(spatial) if isinstance(stride, int) else list(stride)
        total = [t * s for t, s in zip(total, stride, strict=True)]
    return (1, input_shape[1], *(min(2 * t, s) for t, s in zip(total, spatial, strict=True)))


class OpenVINONetwork(nn.Module):
    """A compressed network run by OpenVINO where the predictor's network stood: `load_state_dict` with one of
    the fold state dicts it was compiled for picks that compiled model (and loads the PyTorch network too);
    `forward` on a CPU float32 patch of the compiled shape, outside autograd, runs it. Anything else (other weights,
    shapes, devices, gradients) runs the PyTorch network, kept as ``_orig_mod`` as `torch.compile` keeps it (so
    `plan.unwrap` finds it)."""

    def __init__(self, network: nn.Module, compiled: Sequence[tuple[dict[str, torch.Tensor], Any]],
                 input_shape: Sequence[int]) -> None:
        super().__init__()
        self._orig_mod = network
        self.input_shape = tuple(input_shape)
        self._states = [state for state, _ in compiled]  # held, so that their ids stay theirs
        self._requests = {id(state): model.create_infer_request() for state, model in compiled}
        self._request = self._requests[id(self._states[0])]

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        self._request = self._requests.get(id(state_dict))
        return self._orig_mod.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._request is None or tuple(x.shape) != self.input_shape or x.device.type != "cpu"
                or x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad)):
            return self._orig_mod(x)
        return torch.from_numpy(self._request.infer({0: x.contiguous().numpy()})[0])

    def extra_repr(self) -> str:
        return f"OpenVINO, {len(self._states)} fold(s), input {self.input_shape}"
