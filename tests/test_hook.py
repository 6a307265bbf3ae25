"""The start-up hook, in fresh interpreters as users get it."""

import os
import subprocess
import sys

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
