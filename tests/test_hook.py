"""The start-up hook, in fresh interpreters as users get it, and what its wrappers do, in process."""

import logging
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

WRAPPED = ("initialize_from_trained_model_folder", "manual_initialization", "_manage_input_and_output_lists",
           "predict_logits_from_preprocessed_data")
CHECK = (
    "import sys; assert 'torch' not in sys.modules, 'the hook imported torch at start-up'; "
    "import nnunetv2.inference.predict_from_raw_data as m; "
    f"print('wrapped:', *[getattr(getattr(m.nnUNetPredictor, n), '__nnunet_tucker_wrapped__', False) "
    f"for n in {WRAPPED}])"
)


def _run(code, unset=(), **env) -> list[str]:
    """The words of the line `code` prints after 'wrapped: ' (a library may print lines of its own), run with `env`
    added to this process's environment and the variables in `unset` taken out."""
    full_env = {k: v for k, v in {**os.environ, **env}.items() if k not in unset}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=True)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("wrapped: ")]
    return line.split()[1:]


def test_hook_is_installed_light_and_patches_on_import():
    assert _run(CHECK) == ["True"] * len(WRAPPED)


def test_hook_can_be_switched_off():
    assert _run(CHECK, TUCKER_HOOK="0") == ["False"] * len(WRAPPED)


def test_patching_is_idempotent_and_keeps_the_original():
    code = (
        "import nnunetv2.inference.predict_from_raw_data as m; from nnunet_tucker.nnunet import hook; "
        "f = m.nnUNetPredictor.initialize_from_trained_model_folder; hook.patch_predictor_class(m.nnUNetPredictor); "
        "print('wrapped:', f is m.nnUNetPredictor.initialize_from_trained_model_folder, f.__wrapped__.__name__)"
    )
    assert _run(code) == ["True", "initialize_from_trained_model_folder"]


# What the hook may import at start-up: its own modules and the standard library (frozen, or imported anyway by
# most programs); never a third-party package (torch, numpy, nnU-Net, ...), which would cost every Python process.
PTH = Path(__file__).parents[1] / "nnunet_tucker" / "nnunet_tucker.pth"
START = (
    "import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); exec(open(sys.argv[2]).read()); "
    "print('added:', *sorted(set(sys.modules) - before))"
)


def _interpreters() -> list[str]:
    """This interpreter and each other supported CPython minor version found on PATH or under pyenv, that runs."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = {sys.executable}
    for minor in set(range(10, 14)) - {sys.version_info.minor}:
        name = f"python3.{minor}"
        found.update(str(p) for p in [shutil.which(name), *pyenv_root.glob(f"versions/3.{minor}*/bin/{name}")] if p)
    return sorted(p for p in found if subprocess.run([p, "-S", "-c", ""], capture_output=True).returncode == 0)


INTERPRETERS = _interpreters()


def _interpreter_id(path: str) -> str:
    return "this" if path == sys.executable else Path(path).name


def _added_at_start(python: str, **env: str) -> set[str]:
    """Modules that running the .pth line adds to an interpreter started bare (`-S`: no site, nothing else loaded),
    with the package's source first on its path."""
    result = subprocess.run([python, "-S", "-B", "-c", START, str(PTH.parents[1]), str(PTH)], capture_output=True,
                            text=True, env={**os.environ, **env}, check=True)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("added:")]
    return set(line.split()[1:])


def _not_allowed_at_start(modules: set[str], stdlib: set[str]) -> list[str]:
    return sorted(m for m in modules if m.partition(".")[0] not in stdlib | {"nnunet_tucker"})


@pytest.mark.parametrize("python", INTERPRETERS, ids=_interpreter_id)
def test_start_up_hook_imports_only_its_own_modules_and_the_standard_library(python):
    stdlib_code = "import sys; print(*sys.stdlib_module_names)"
    stdlib = set(subprocess.run([python, "-S", "-c", stdlib_code], capture_output=True, text=True,
                                check=True).stdout.split())
    added = _added_at_start(python)
    assert "nnunet_tucker.nnunet.hook" in added, sorted(added)
    assert not _not_allowed_at_start(added, stdlib), _not_allowed_at_start(added, stdlib)
    assert _not_allowed_at_start({"numpy", "torch.nn", "json", "nnunet_tucker.x"}, stdlib) == ["numpy", "torch.nn"]
    assert not {m for m in _added_at_start(python, TUCKER_HOOK="0") if m.startswith("nnunet_tucker")}


# In process, on a subclass of nnU-Net's predictor (nnU-Net's own class is left as it is): what each wrapper does.
class _Predictor:
    """Stands in for nnU-Net's four wrapped methods (what they return, what they were given)."""

    def initialize_from_trained_model_folder(self, model_training_output_dir, *args, **kwargs):
        self.events.append("initialized")

    def manual_initialization(self, *args, **kwargs):
        self.events.append("initialized by hand")

    def _manage_input_and_output_lists(self, inputs, outputs, *args, **kwargs):
        return [[f"{case}_0000.nii.gz"] for case in outputs], [f"/out/{case}" for case in outputs], None

    def predict_logits_from_preprocessed_data(self, data):
        self.events.append(("predicted", data))
        return "logits"


@pytest.fixture
def patched(monkeypatch):
    """A patched subclass of nnU-Net's predictor whose wrapped methods are `_Predictor`'s, and the events its
    wrappers cause: `finish_compression` and `compress_predictor` are recorded, not run."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_tucker.nnunet import hook
    from nnunet_tucker.nnunet import predictor as predictor_module

    events = []
    cls = type("Patched", (nnUNetPredictor,), {name: vars(_Predictor)[name] for name in (
        "initialize_from_trained_model_folder", "manual_initialization", "_manage_input_and_output_lists",
        "predict_logits_from_preprocessed_data")})
    hook.patch_predictor_class(cls)
    monkeypatch.setattr(predictor_module, "compress_predictor",
                        lambda predictor, source=None: events.append(("compress", source)))
    name_case = predictor_module._case_name  # what finish_compression calls the case: recorded too
    monkeypatch.setattr(predictor_module, "finish_compression",
                        lambda predictor, data: events.append(("finish", data, name_case(predictor, _Image()))))
    predictor = cls.__new__(cls)  # (nnU-Net's __init__ is not what is tested)
    predictor.events = events
    return predictor, events


class _Image:
    shape = (1, 4, 5, 6)


def test_every_wrapped_method_is_wrapped_once(patched):
    from nnunet_tucker.nnunet import hook

    predictor, _ = patched
    names = ("initialize_from_trained_model_folder", "manual_initialization", "_manage_input_and_output_lists",
             "predict_logits_from_preprocessed_data")
    wrapped = {name: getattr(type(predictor), name) for name in names}
    assert all(getattr(method, "__nnunet_tucker_wrapped__", False) for method in wrapped.values())
    assert {name: method.__wrapped__ for name, method in wrapped.items()} == {n: vars(_Predictor)[n] for n in names}
    hook.patch_predictor_class(type(predictor))
    assert {name: getattr(type(predictor), name) for name in names} == wrapped  # idempotent


def test_loading_ends_with_compress_predictor(patched):
    predictor, events = patched
    predictor.initialize_from_trained_model_folder("/models/liver", (0,))
    predictor.manual_initialization("network", "plans")
    assert events == ["initialized", ("compress", "/models/liver"), "initialized by hand", ("compress", None)]


def test_a_pending_compression_is_finished_on_the_first_case_named_by_its_output_file(patched):
    predictor, events = patched
    predictor._manage_input_and_output_lists(None, ["case_007", "case_008"])  # nothing pending: not noted
    assert predictor.predict_logits_from_preprocessed_data("image") == "logits"
    assert events == [("predicted", "image")]  # nothing pending: nnU-Net's method alone

    events.clear()
    predictor._tucker_pending = ("config", "source", None, "record")
    lists = predictor._manage_input_and_output_lists(None, ["case_007", "case_008"])
    assert lists[1] == ["/out/case_007", "/out/case_008"]  # nnU-Net's result, unchanged
    assert predictor.predict_logits_from_preprocessed_data(data="image") == "logits"
    assert events == [("finish", "image", "case_007"), ("predicted", "image")]  # before nnU-Net's prediction


def test_a_case_not_predicted_from_files_is_named_by_its_shape_and_logged(patched, caplog):
    predictor, events = patched
    predictor._tucker_pending = ("config", "source", None, "record")
    with caplog.at_level(logging.DEBUG, logger="nnunet_tucker"):
        predictor.predict_logits_from_preprocessed_data("image")
    assert events[0] == ("finish", "image", "the first image (1×4×5×6)")
    (line,) = [r.getMessage() for r in caplog.records if r.name.startswith("nnunet_tucker")]
    assert line.startswith("the first case's name is unknown") and "the first image (1×4×5×6)" in line


@pytest.mark.parametrize("kind", ["TuckerConfigError", "CalibrationError", "ModelFolderError"])
def test_the_package_s_errors_in_a_wrapper_end_an_uncaught_run_in_one_line_with_exit_code_2(
        patched, monkeypatch, capsys, kind):
    from nnunet_tucker import errors
    from nnunet_tucker.nnunet import predictor as predictor_module

    predictor, _ = patched
    predictor._tucker_pending = ("config", "source", None, "record")

    def refuse(predictor, data):
        raise getattr(errors, kind)("cannot calibrate on this")

    monkeypatch.setattr(predictor_module, "finish_compression", refuse)
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    with pytest.raises(getattr(errors, kind)) as raised:
        predictor.predict_logits_from_preprocessed_data("image")
    frames = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
    assert "refuse" not in frames and raised.value.__cause__ is None  # the traceback inside the package is gone
    other = RuntimeError("another error")
    sys.excepthook(RuntimeError, other, None)  # another exception: the previous hook's usual output
    assert "RuntimeError: another error" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ended:
        sys.excepthook(type(raised.value), raised.value, None)  # as Python calls it when nothing caught it
    assert ended.value.code == 2
    assert capsys.readouterr().err == "nnunet-tucker: error: cannot calibrate on this\n"


def test_other_exceptions_in_a_wrapper_pass_untouched(patched, monkeypatch):
    from nnunet_tucker.nnunet import predictor as predictor_module

    predictor, _ = patched
    predictor._tucker_pending = ("config", "source", None, "record")

    def bug(predictor, data):
        raise ValueError("a bug")

    monkeypatch.setattr(predictor_module, "finish_compression", bug)
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    with pytest.raises(ValueError, match="a bug") as raised:
        predictor.predict_logits_from_preprocessed_data("image")
    assert "bug" in [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
    assert sys.excepthook is sys.__excepthook__


def test_an_nnunet_without_a_wrapped_method_runs_uncompressed_and_says_so():
    code = (
        "import sys; from nnunet_tucker.nnunet import hook\n"
        "class Predictor:\n"
        "    def initialize_from_trained_model_folder(self, *a): return 'loaded'\n"
        "    def predict_logits_from_preprocessed_data(self, data): return data\n"
        "original = Predictor.initialize_from_trained_model_folder\n"
        "hook.patch_predictor_class(Predictor)\n"
        "print('wrapped:', Predictor.initialize_from_trained_model_folder is not original)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "TUCKER_HOOK": "0"})
    assert [line for line in result.stdout.splitlines() if line.startswith("wrapped:")] == ["wrapped: False"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("nnunet-tucker: warning: ")]
    assert len(warnings) == 1 and "manual_initialization" in warnings[0], result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
@pytest.mark.parametrize(("env", "expected"), [
    ({"TUCKER_RANK_RATIO": "0.3"}, "1"),
    ({"TUCKER_MAC_BUDGET": "0.2"}, "1"),
    ({}, None),  # nothing asks for compression: PyTorch is left as it is
    ({"TUCKER_RANK_RATIO": "0.3", "THP_MEM_ALLOC_ENABLE": "0"}, "0"),  # the user's own value stays
    ({"TUCKER_RANK_RATIO": "0.3", "TUCKER_MALLOC": "default"}, None),
])
def test_a_process_asked_to_compress_asks_torch_for_huge_pages_at_start_up(env, expected):
    unset = {"TUCKER_RANK_RATIO", "TUCKER_MAC_BUDGET", "TUCKER_MALLOC", "THP_MEM_ALLOC_ENABLE"} - set(env)
    code = "import os; print('wrapped:', os.environ.get('THP_MEM_ALLOC_ENABLE'))"  # _run's marker, whatever it shows
    assert _run(code, unset, **env) == [str(expected)]
