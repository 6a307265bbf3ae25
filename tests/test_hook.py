"""The start-up hook, in fresh interpreters as users get it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = (
    "import sys; assert 'torch' not in sys.modules, 'the hook imported torch at start-up'; "
    "import nnunetv2.inference.predict_from_raw_data as m; "
    "print('wrapped:', getattr(m.nnUNetPredictor.initialize_from_trained_model_folder, '__nnunet_tucker_wrapped__', "
    "False), getattr(m.nnUNetPredictor.manual_initialization, '__nnunet_tucker_wrapped__', False))"
)


def _run(code, **env) -> list[str]:
    """The words of the line `code` prints after 'wrapped: ' (a library may print lines of its own)."""
    full_env = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=True)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("wrapped: ")]
    return line.split()[1:]


def test_hook_is_installed_light_and_patches_on_import():
    assert _run(CHECK) == ["True", "True"]


def test_hook_can_be_switched_off():
    assert _run(CHECK, TUCKER_HOOK="0") == ["False", "False"]


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
