"""Helpers of the integration tests: run the real console scripts, read segmentations, Dice."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_tucker.demo_model import DATASET_ID
from nnunet_tucker.synthetic import LABELS

CLASSES = {name: value for name, value in LABELS.items() if value > 0}
MEASURED: list[str] = []  # per-class Dice lines, printed in the terminal summary


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def script(name: str) -> str:
    """The console script `name` installed beside this interpreter (no reliance on PATH or shims)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def run(args: list[str], env: dict[str, str], check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    """Run a console script with `env` plus `extra_env`; on failure show its output."""
    full_env = {**env, **extra_env}
    args = [script(args[0]), *args[1:]]
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
