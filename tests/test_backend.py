"""The backends that run a compressed network: `swap.surgery.plain_modules` (what OpenVINO traces),
`backend.network_for_backend` (conversion, check, cache, fold switching, `auto`'s timing, fallbacks to PyTorch)
and the config's ``backend`` field."""

from __future__ import annotations

import builtins
import copy
import json
import logging
import sys

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from networks import build, scaled_error

from nnunet_tucker import TuckerConfig, backend, compress_network
from nnunet_tucker.config import read_env
from nnunet_tucker.errors import TuckerConfigError
from nnunet_tucker.layers import FusedInstanceNorm, PointwiseConv, TuckerConv
from nnunet_tucker.swap.forms import ORIGINAL_CLASSES
from nnunet_tucker.swap.surgery import _PlainTuckerConv, plain_modules

NEEDS_OPENVINO = "needs OpenVINO: pip install 'nnunet-tucker[openvino]'"
CPU = torch.device("cpu")
PLAIN_AGREEMENT = 1e-4  # plain modules vs the package's forms: float rounding only, relative to max |output|


def tiny_unet(num_classes: int = 3) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A compressed three-stage plain U-Net on 16^3 patches: OpenVINO traces it on 8^3 (twice its total stride)
    and reshapes to the patch, in a few seconds."""
    torch.manual_seed(0)
    net = PlainConvUNet(
        input_channels=1, n_stages=3, features_per_stage=[8, 16, 24], conv_op=torch.nn.Conv3d, kernel_sizes=3,
        strides=[1, 2, 2], n_conv_per_stage=2, num_classes=num_classes, n_conv_per_stage_decoder=1, conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
    ).eval()
    shape = (1, 1, 16, 16, 16)
    compress_network(net, TuckerConfig(rank_ratio=0.3, policy="auto"), shape)
    return net, shape


@pytest.fixture(scope="module")
def compressed_networks():
    """Compressed networks (PyTorch forms) and their input shapes, built once for the file."""
    built = {"tiny": tiny_unet()}
    for name in ("plain3d", "resenc3d"):
        net, shape = build(name)
        compress_network(net, TuckerConfig(rank_ratio=0.3, policy="auto"), shape)
        built[name] = net, shape
    return built


@pytest.fixture
def compressed(compressed_networks):
    """A fresh copy of the tiny compressed U-Net, its input shape and two fold state dicts (the network holds
    the first)."""
    net, shape = compressed_networks["tiny"]
    net = copy.deepcopy(net)
    state0 = {k: v.clone() for k, v in net.state_dict().items()}
    return net, shape, state0, perturbed(state0)


def perturbed(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Another fold: every float tensor of more than one value moved by a third of its spread."""
    generator = torch.Generator().manual_seed(seed)
    changed = {}
    for key, value in state.items():
        if value.is_floating_point() and value.numel() > 1:
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            value = value + 0.3 * value.std() * noise
        changed[key] = value.clone()
    return changed


def sample(shape, seed: int = 3) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def torch_output(net, state, x) -> torch.Tensor:
    """The PyTorch network's output with `state`; the network keeps `state`."""
    net.load_state_dict(state)
    with torch.no_grad():
        return net(x).clone()


@pytest.fixture
def warnings_logged(caplog, monkeypatch):
    """The package logger's WARNING records (propagated to caplog's handler, whatever another test in this process
    did to the logger: the predictor stops propagation where logging is not configured)."""
    monkeypatch.setattr(logging.getLogger("nnunet_tucker"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="nnunet_tucker"):
        yield lambda: [r for r in caplog.records if r.name == "nnunet_tucker" and r.levelno == logging.WARNING]


def in_openvino(wrapped, x) -> torch.Tensor:
    """`wrapped`'s output on `x`, failing the test where the PyTorch network runs it instead of OpenVINO."""

    def forward(*args, **kwargs):
        raise AssertionError("the PyTorch network ran, not OpenVINO")

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(wrapped._orig_mod, "forward", forward)
        return wrapped(x)


def _raising(what: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{what} was called")

    return fail


def _entries(tmp_path) -> set[str]:
    """The converted-model folders of the cache (not OpenVINO's kernel cache, nor `auto`'s timings)."""
    folder = tmp_path / "openvino"
    return ({p.name for p in folder.iterdir() if p.is_dir() and p.name not in ("kernels", "timings")}
            if folder.is_dir() else set())


# 1. plain_modules

@pytest.mark.parametrize("name", ["plain3d", "resenc3d"])
def test_plain_modules_compute_the_compressed_function_in_plain_modules(compressed_networks, name):
    net, shape = compressed_networks[name]
    net = copy.deepcopy(net)
    forms_before = [type(m) for m in net.modules()]
    assert TuckerConv in forms_before and FusedInstanceNorm in forms_before and PointwiseConv in forms_before
    assert any(cls in ORIGINAL_CLASSES for cls in forms_before)  # the test would see forms left in place
    x = sample(shape)
    with torch.no_grad():
        expected = net(x)
        plain = plain_modules(net)
        found = plain(x)
    assert not plain.training
    assert found.shape == expected.shape and scaled_error(found, expected) <= PLAIN_AGREEMENT
    kinds = {type(m) for m in plain.modules()}
    assert not kinds & {TuckerConv, FusedInstanceNorm, PointwiseConv, *ORIGINAL_CLASSES}
    # only torch.nn and dynamic_network_architectures classes, and the decomposed layers as their three convolutions
    libraries = {k.__module__.split(".")[0] for k in kinds - {_PlainTuckerConv}}
    assert libraries <= {"torch", "dynamic_network_architectures"}
    assert _PlainTuckerConv in kinds
    for module in plain.modules():
        if isinstance(module, TuckerConv):
            assert all(type(child).__module__.startswith("torch.nn") for child in module.children())
    assert [type(m) for m in net.modules()] == forms_before  # the compressed network keeps its forms
    with torch.no_grad():
        assert scaled_error(net(x), expected) <= PLAIN_AGREEMENT


def test_plain_modules_share_the_weights(compressed):
    """As its docstring says and `backend._Converter` relies on (one plain copy for all folds): weights loaded
    into the compressed network afterwards are the plain copy's too."""
    net, shape, _, state1 = compressed
    plain = plain_modules(net)
    x = sample(shape)
    expected = torch_output(net, state1, x)
    with torch.no_grad():
        found = plain(x)
    assert scaled_error(found, expected) <= PLAIN_AGREEMENT


# 2. OpenVINO runs the network, fold by fold

def test_openvino_matches_pytorch_and_falls_back_for_other_shapes_and_weights(compressed, tmp_path):
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    net, shape, state0, state1 = compressed
    reference = copy.deepcopy(net)
    wrapped, choice = backend.network_for_backend(net, [state0], shape, CPU, "openvino", cache_dir=tmp_path)
    assert isinstance(wrapped, backend.OpenVINONetwork), choice
    assert choice.name == "openvino" and not choice.from_cache and choice.conversion_seconds is not None
    x = sample(shape)
    expected0 = torch_output(reference, state0, x)
    wrapped.load_state_dict(state0)
    found0 = in_openvino(wrapped, x)
    assert found0.shape == expected0.shape and scaled_error(found0, expected0) <= backend.TOLERANCE

    other = (*shape[:4], shape[4] + 8)  # another patch: the PyTorch network runs it
    y = sample(other, seed=4)
    with torch.no_grad():
        found_other = wrapped(y)
    assert found_other.shape[2:] == other[2:]
    assert scaled_error(found_other, torch_output(reference, state0, y)) <= PLAIN_AGREEMENT

    wrapped.load_state_dict(state1)  # weights it was not compiled for: the PyTorch network, with them
    with torch.no_grad():
        found1 = wrapped(x)
    assert scaled_error(found1, torch_output(reference, state1, x)) <= PLAIN_AGREEMENT
    assert scaled_error(found1, expected0) > 50 * backend.TOLERANCE  # the second fold is another function


def test_openvino_runs_each_fold_with_its_own_weights(compressed, tmp_path):
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    net, shape, state0, state1 = compressed
    reference = copy.deepcopy(net)
    wrapped, choice = backend.network_for_backend(net, [state0, state1], shape, CPU, "openvino", cache_dir=tmp_path)
    assert isinstance(wrapped, backend.OpenVINONetwork), choice
    assert len(_entries(tmp_path)) == 2  # one converted model per fold
    x = sample(shape)
    expected = [torch_output(reference, state, x) for state in (state0, state1)]
    assert scaled_error(expected[1], expected[0]) > 50 * backend.TOLERANCE
    found = []
    for state in (state0, state1, state0):  # nnU-Net loads each fold before its sliding window
        wrapped.load_state_dict(state)
        found.append(in_openvino(wrapped, x))
    for got, want in zip(found, [*expected, expected[0]], strict=True):
        assert scaled_error(got, want) <= backend.TOLERANCE
    assert scaled_error(found[1], found[0]) > 50 * backend.TOLERANCE  # the fold switch is real


# 3. The cache of converted models

def test_same_weights_load_from_the_cache_and_changed_weights_convert_again(compressed, tmp_path, monkeypatch):
    openvino = pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    net, shape, state0, state1 = compressed
    _, first = backend.network_for_backend(net, [state0], shape, CPU, "openvino", cache_dir=tmp_path)
    assert first.name == "openvino" and not first.from_cache
    entries = _entries(tmp_path)
    assert len(entries) == 1

    with monkeypatch.context() as patch:
        patch.setattr(openvino, "convert_model", _raising("openvino.convert_model"))
        wrapped, again = backend.network_for_backend(net, [state0], shape, CPU, "openvino", cache_dir=tmp_path)
    assert isinstance(wrapped, backend.OpenVINONetwork) and again.name == "openvino" and again.from_cache
    assert _entries(tmp_path) == entries
    x = sample(shape)
    reference = copy.deepcopy(net)
    assert scaled_error(in_openvino(wrapped, x), torch_output(reference, state0, x)) <= backend.TOLERANCE

    net.load_state_dict(state1)  # other weights (the network holding them, as it holds the first fold's)
    wrapped1, changed = backend.network_for_backend(net, [state1], shape, CPU, "openvino", cache_dir=tmp_path)
    assert changed.name == "openvino" and not changed.from_cache
    assert len(_entries(tmp_path)) == 2 and entries < _entries(tmp_path)
    assert scaled_error(in_openvino(wrapped1, x), torch_output(reference, state1, x)) <= backend.TOLERANCE


# 4. Fallbacks to PyTorch

def test_failed_conversion_warns_and_keeps_pytorch(compressed, tmp_path, monkeypatch, warnings_logged):
    openvino = pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    net, shape, state0, state1 = compressed
    reference = copy.deepcopy(net)
    monkeypatch.setattr(openvino, "convert_model", _raising("openvino.convert_model"))
    network, choice = backend.network_for_backend(net, [state0, state1], shape, CPU, "openvino", cache_dir=tmp_path)
    assert network is net and choice.name == "torch"
    assert "convert_model was called" in choice.reason
    assert any("PyTorch runs it" in r.getMessage() for r in warnings_logged())
    x = sample(shape)
    with torch.no_grad():
        found = net(x)  # the network is left with the first fold's weights
    assert scaled_error(found, torch_output(reference, state0, x)) <= PLAIN_AGREEMENT


def test_output_differing_from_pytorch_warns_and_keeps_pytorch(compressed, tmp_path, monkeypatch, warnings_logged):
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    net, shape, state0, _ = compressed
    monkeypatch.setattr(backend, "TOLERANCE", -1.0)  # no output can pass the check
    for asked in ("openvino", "auto"):
        network, choice = backend.network_for_backend(net, [state0], shape, CPU, asked, cache_dir=tmp_path)
        assert network is net and choice.name == "torch"
        assert "differs from PyTorch" in choice.reason
    assert len(warnings_logged()) == 2 and all("differs" in r.getMessage() for r in warnings_logged())


# 5. auto

def test_auto_times_both_backends_once_and_reads_the_timing_from_the_cache(compressed, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    net, shape, state0, _ = compressed
    network, choice = backend.network_for_backend(net, [state0], shape, CPU, "auto", cache_dir=tmp_path)
    assert choice.name in ("torch", "openvino")
    assert choice.torch_seconds > 0 and choice.openvino_seconds > 0
    assert (choice.name == "openvino") == (choice.openvino_seconds * (1 + backend.AUTO_MARGIN) <= choice.torch_seconds)
    assert isinstance(network, backend.OpenVINONetwork) if choice.name == "openvino" else network is net
    assert len(list((tmp_path / "openvino" / "timings").glob("*.json"))) == 1

    monkeypatch.setattr(backend._Converter, "_timed", _raising("_Converter._timed"))
    _, again = backend.network_for_backend(net, [state0], shape, CPU, "auto", cache_dir=tmp_path)
    assert again.name == choice.name
    assert (again.torch_seconds, again.openvino_seconds) == (choice.torch_seconds, choice.openvino_seconds)


def test_auto_timing_is_shared_by_models_that_differ_in_classes_and_a_pytorch_verdict_converts_nothing(
        compressed, tmp_path, monkeypatch):
    """TotalSegmentator's five 1.5 mm parts differ only in their heads: the first part's timing decides for all, and
    where it says PyTorch the others are not converted at all."""
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    net, shape, state0, _ = compressed
    other, _ = tiny_unet(num_classes=5)
    assert backend.architecture(plain_modules(net)) == backend.architecture(plain_modules(other))
    assert backend.architecture(plain_modules(net)) != backend.architecture(plain_modules(build("plain3d")[0]))
    monkeypatch.setattr(backend._Converter, "_timed", lambda self, compiled: {"torch": 1.0, "openvino": 0.95})
    _, first = backend.network_for_backend(net, [state0], shape, CPU, "auto", cache_dir=tmp_path)
    assert first.name == "torch" and len(_entries(tmp_path)) == 1  # converted once, to be timed

    monkeypatch.setattr(backend._Converter, "_timed", _raising("_Converter._timed"))
    monkeypatch.setattr(backend._Converter, "_convert", _raising("_Converter._convert"))
    network, again = backend.network_for_backend(other, [other.state_dict()], shape, CPU, "auto", cache_dir=tmp_path)
    assert network is other and again.name == "torch" and again.from_cache
    assert (again.torch_seconds, again.openvino_seconds) == (1.0, 0.95)
    assert len(_entries(tmp_path)) == 1

    timing = next((tmp_path / "openvino" / "timings").glob("*.json"))
    timing.write_text(json.dumps({"seconds": {"torch": 1.0, "openvino": 0.5}}))  # OpenVINO faster: converted
    monkeypatch.undo()
    network, chosen = backend.network_for_backend(other, [other.state_dict()], shape, CPU, "auto", cache_dir=tmp_path)
    assert chosen.name == "openvino" and isinstance(network, backend.OpenVINONetwork)
    assert len(_entries(tmp_path)) == 2


# 6. Where OpenVINO is missing or the device is not a CPU

def test_openvino_missing(compressed, tmp_path, monkeypatch):
    net, shape, state0, _ = compressed
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    assert backend.openvino_missing() is not None
    with pytest.raises(TuckerConfigError, match=r"nnunet-tucker\[openvino\]"):
        backend.check_backend("openvino")
    with pytest.raises(TuckerConfigError, match=r"nnunet-tucker\[openvino\]"):
        backend.network_for_backend(net, [state0], shape, CPU, "openvino", cache_dir=tmp_path)
    backend.check_backend("auto")
    backend.check_backend("torch")
    network, choice = backend.network_for_backend(net, [state0], shape, CPU, "auto", cache_dir=tmp_path)
    assert network is net and choice.name == "torch"
    assert not (tmp_path / "openvino").exists()


def test_torch_never_imports_openvino(compressed, tmp_path, monkeypatch):
    net, shape, state0, _ = compressed
    imported = []
    real_import = builtins.__import__

    def recording_import(name, *args, **kwargs):
        imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", recording_import)
    network, choice = backend.network_for_backend(net, [state0], shape, CPU, "torch", cache_dir=tmp_path)
    monkeypatch.undo()
    assert network is net and choice.name == "torch"
    assert not [name for name in imported if name.split(".")[0] == "openvino"]
    assert not (tmp_path / "openvino").exists()


@pytest.mark.parametrize("device", [torch.device("meta"), torch.device("cuda")], ids=["meta", "cuda"])
def test_other_devices_run_pytorch(compressed, tmp_path, warnings_logged, device):
    net, shape, state0, _ = compressed
    network, choice = backend.network_for_backend(net, [state0], shape, device, "auto", cache_dir=tmp_path)
    assert network is net and choice.name == "torch" and not warnings_logged()
    network, choice = backend.network_for_backend(net, [state0], shape, device, "openvino", cache_dir=tmp_path)
    assert network is net and choice.name == "torch"
    assert len(warnings_logged()) == 1 and device.type in warnings_logged()[0].getMessage()
    assert not (tmp_path / "openvino").exists()


# 7. The config field

def test_backend_config_field():
    assert TuckerConfig(rank_ratio=0.3).backend == "auto"
    for value in ("auto", "torch", "openvino"):
        assert TuckerConfig(rank_ratio=0.3, backend=value).backend == value
    with pytest.raises(TuckerConfigError, match="backend"):
        TuckerConfig(rank_ratio=0.3, backend="onnx")
    assert read_env({"TUCKER_BACKEND": "openvino"}) == {"backend": "openvino"}
    assert TuckerConfig.from_env({"TUCKER_RANK_RATIO": "0.3", "TUCKER_BACKEND": "torch"}).backend == "torch"
    with pytest.raises(TuckerConfigError, match="TUCKER_BACKEND"):
        read_env({"TUCKER_BACKEND": "onnx"})
    config = TuckerConfig(rank_ratio=0.3, backend="openvino")
    assert "backend" not in config.fitted_dict() and config.to_dict()["backend"] == "openvino"
    assert config.fitted_dict() == TuckerConfig(rank_ratio=0.3, backend="torch").fitted_dict()


def test_a_network_in_training_mode_is_checked_and_timed_in_eval_mode_and_left_as_it_was(compressed, tmp_path,
                                                                                          monkeypatch):
    """nnU-Net's predictor builds its network in training mode and sets eval mode only when it predicts: the
    conversion's check and `auto`'s timing must see the network as it will run (the PyTorch forms run at inference
    only), and leave the mode as it found it."""
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    net, shape, state0, _ = compressed
    net.train()
    modes = []
    original_forward = type(net).forward

    def recording_forward(self, x):
        modes.append(self.training)
        return original_forward(self, x)

    monkeypatch.setattr(type(net), "forward", recording_forward)
    _, choice = backend.network_for_backend(net, [state0], shape, CPU, "auto", cache_dir=tmp_path)
    assert choice.torch_seconds is not None and modes and not any(modes)
    assert net.training


def test_a_cache_that_cannot_be_written_warns_and_keeps_pytorch(compressed, tmp_path, caplog):
    """A file where the OpenVINO cache folder should be (as a read-only or full disk would): the prediction goes on
    with PyTorch, and a warning says why."""
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    net, shape, state0, _ = compressed
    (tmp_path / "openvino").write_text("in the way")
    with caplog.at_level(logging.WARNING, logger="nnunet_tucker"):
        runner, choice = backend.network_for_backend(net, [state0], shape, CPU, "openvino", cache_dir=tmp_path)
    assert runner is net and choice.name == "torch"
    assert any(r.levelno == logging.WARNING and "could not be stored" in r.getMessage() for r in caplog.records)


def test_a_damaged_cache_entry_is_converted_again(compressed, tmp_path):
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    net, shape, state0, _ = compressed
    backend.network_for_backend(net, [state0], shape, CPU, "openvino", cache_dir=tmp_path)
    (check,) = (tmp_path / "openvino").glob("*/check.json")
    check.write_text('{"passed": tr')  # cut short
    runner, choice = backend.network_for_backend(net, [state0], shape, CPU, "openvino", cache_dir=tmp_path)
    assert choice.name == "openvino" and not choice.from_cache
    x = sample(shape)
    with torch.no_grad():
        assert scaled_error(runner(x), net(x)) <= backend.TOLERANCE
