"""Helpers of the integration tests: run the real console scripts, read segmentations, Dice."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_tucker.tools.demo_model import DATASET_ID
from nnunet_tucker.tools.synthetic import LABELS

CLASSES = {name: value for name, value in LABELS.items() if value > 0}
MEASURED: list[str] = []  # per-class Dice lines, printed in the terminal summary
LOG_PREFIX = "nnunet-tucker: "  # how every line this package writes to stderr starts (log, errors, gate)


def log_lines(output: str) -> list[str]:
    """The lines of `output` that this package wrote: those starting with `LOG_PREFIX`. Other output
    (warnings of other libraries that quote file paths, which may contain the package's name) does not count."""
    return [line for line in output.splitlines() if line.startswith(LOG_PREFIX)]


def logged(output: str, *parts: str) -> bool:
    """Whether one of the package's lines in `output` holds every one of `parts`."""
    return any(all(part in line for part in parts) for line in log_lines(output))


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def script(name: str) -> list[str]:
    """The command that runs console script `name` with this interpreter and its packages: the script
    installed beside `sys.executable`, else (a venv made with --system-site-packages, whose bin holds only
    what was installed into it) the script's entry point run by `sys.executable`. Never a script found on
    PATH: a shim or another environment's script would test another interpreter's packages."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return [str(candidate)]
    if not entry_points(group="console_scripts", name=name):
        raise AssertionError(f"console script {name!r} is not installed for {sys.executable}")
    code = ("import sys\n"
            "if sys.path[:1] == ['']:\n"  # as for a script: the working directory (a source checkout) not on the path
            "    del sys.path[0]\n"
            "from importlib.metadata import entry_points\n"
            f"sys.argv[0] = {name!r}\n"
            f"sys.exit(next(iter(entry_points(group='console_scripts', name={name!r}))).load()())\n")
    return [sys.executable, "-c", code]


def run(args: list[str], env: dict[str, str], check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    """Run a console script with `env` plus `extra_env`; on failure show its output."""
    full_env = {**env, **extra_env}
    args = [*script(args[0]), *args[1:]]
    result = subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def predict(env, cases: Path, out: Path, *flags: str, script: str = "nnUNetv2_predict", **extra_env: str):
    """nnU-Net's predict command on `cases` into `out` with light worker counts."""
    args = [script, "-i", str(cases), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres",
            "-device", "cpu", "-npp", "1", "-nps", "1", *flags]
    return run(args, env, **extra_env)


def load_segmentations(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def load_probabilities(folder: Path) -> dict[str, np.ndarray]:
    """Case -> the class probabilities nnU-Net wrote with --save_probabilities (CASE.npz), classes first,
    axes as in the segmentation."""
    return {p.name.removesuffix(".npz"): np.load(p)["probabilities"] for p in sorted(folder.glob("*.npz"))}


def dice_per_class(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Dice of each foreground class, pooled over all cases (a case set must match)."""
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    scores = {}
    for name, value in CLASSES.items():
        inter = sum(int(((a[k] == value) & (b[k] == value)).sum()) for k in a)
        total = sum(int((a[k] == value).sum() + (b[k] == value).sum()) for k in a)
        scores[name] = 1.0 if total == 0 else 2 * inter / total
    return scores


def record(title: str, scores: dict[str, float]) -> None:
    MEASURED.append(f"{title}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
