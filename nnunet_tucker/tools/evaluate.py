"""The safety check: predict a folder of images with the original and the compressed model through
nnU-Net's own prediction path, and compare per class (Dice, NSD, volumes), optionally against
reference labels; gate on a tolerance. Writes JSON, Markdown and PNG figures."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from ..config import TuckerConfig
from ..errors import InputError, ModelFolderError, OutputFolderError, TuckerConfigError
from ..nnunet.model_folder import MANIFEST_NAME, sha256_of
from ..nnunet.predictor import TuckerPredictor, calibration_phrase
from .metrics import compare_segmentations

logger = logging.getLogger(__name__)


WORKERS_FROM_CASES = 3  # fewer cases are predicted in process: nnU-Net's workers take longer to start than they save


@dataclass
class PredictionRun:
    """One model's prediction of the image folder."""

    label: str
    model: str
    output_folder: Path
    seconds: float
    report: dict[str, Any] | None = None


def predict_folder(
    model_folder: Path,
    images: Path,
    output_folder: Path,
    tucker_config: TuckerConfig | bool,
    folds: list[str] | None,
    checkpoint_name: str,
    device: torch.device,
    use_mirroring: bool,
    label: str,
    in_process: bool = False,
) -> PredictionRun:
    """Run nnU-Net's predictor on a folder; `tucker_config=False` = uncompressed. `in_process`: without
    nnU-Net's worker processes (`predict_from_files_sequential`)."""
    predictor = TuckerPredictor(
        tile_step_size=0.5, use_mirroring=use_mirroring, device=device, tucker_config=tucker_config,
        allow_tqdm=True,
    )
    start = time.perf_counter()
    use_folds = [f if f == "all" else int(f) for f in folds] if folds else None
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds, checkpoint_name)
    if in_process:
        output_folder.mkdir(parents=True, exist_ok=True)  # (nnU-Net's sequential path assumes it exists)
        predictor.predict_from_files_sequential(str(images), str(output_folder), save_probabilities=False)
    else:
        predictor.predict_from_files(
            str(images), str(output_folder), save_probabilities=False, overwrite=True,
            num_processes_preprocessing=1, num_processes_segmentation_export=1,
        )
    seconds = time.perf_counter() - start
    report = predictor.tucker_report.to_dict() if predictor.tucker_report else None
    return PredictionRun(label, str(model_folder), output_folder, seconds, report)


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


@dataclass
class Evaluation:
    """Per-case, per-class scores of the compressed vs the original segmentation (and vs references)."""

    classes: dict[str, int]
    runs: list[PredictionRun]
    cases: dict[str, dict[str, Any]]
    tolerance: float | None
    failing: list[str] = field(default_factory=list)

    def mean(self, comparison: str, metric: str) -> dict[str, float]:
        """Mean over cases of `metric` for each class, for a comparison key of `cases`."""
        out = {}
        for name in self.classes:
            values = [c[comparison][name][metric] for c in self.cases.values() if comparison in c]
            if values:
                out[name] = float(np.mean(values))
        return out

    def to_dict(self) -> dict[str, Any]:
        summary = {
            "compressed_vs_original": {m: self.mean("compressed_vs_original", m) for m in ("dice", "nsd")},
            "wall_seconds": {r.label: r.seconds for r in self.runs},
        }
        if any("original_vs_reference" in c for c in self.cases.values()):
            for key in ("original_vs_reference", "compressed_vs_reference"):
                summary[key] = {m: self.mean(key, m) for m in ("dice", "nsd")}
        return {
            "classes": self.classes,
            "runs": [{"label": r.label, "model": r.model, "seconds": r.seconds, "compression": r.report}
                     for r in self.runs],
            "summary": summary,
            "cases": self.cases,
            "tolerance": self.tolerance,
            "passed": not self.failing,
            "failing_classes": self.failing,
        }

    def to_markdown(self) -> str:
        d = self.to_dict()["summary"]
        with_ref = "original_vs_reference" in d
        head = "| class | Dice vs original | NSD vs original |" + (
            " Dice original vs ref | Dice compressed vs ref |" if with_ref else ""
        )
        lines = ["# nnunet-tucker evaluation", "", head, "|" + "---|" * (head.count("|") - 1)]
        for name in self.classes:
            row = (f"| {name} | {d['compressed_vs_original']['dice'][name]:.4f} "
                   f"| {d['compressed_vs_original']['nsd'][name]:.4f} |")
            if with_ref:
                row += (f" {d['original_vs_reference']['dice'][name]:.4f} "
                        f"| {d['compressed_vs_reference']['dice'][name]:.4f} |")
            lines.append(row)
        lines += ["", "| run | wall time (s) |", "|---|---|"]
        lines += [f"| {r.label} | {r.seconds:.1f} |" for r in self.runs]
        compressed = next((r.report for r in self.runs if r.report), None)
        if compressed:
            c = compressed
            lines += ["", f"Parameters {c['params_before'] / 1e6:.3f}M → {c['params_after'] / 1e6:.3f}M, "
                      f"MACs {c['macs_before'] / 1e9:.2f}G → {c['macs_after'] / 1e9:.2f}G per patch."]
            calibration = c.get("calibration", c.get("extra", {}).get("calibration"))
            phrase = calibration_phrase(calibration)
            lines += ["", phrase[0].upper() + phrase[1:] + (
                " (a case evaluated here too: for a held-out check, calibrate on other images with --calibration)"
                if calibration and calibration["on"] == "first case" else "") + "."]
        if self.tolerance is not None:
            verdict = "PASSED" if not self.failing else f"FAILED: {', '.join(self.failing)}"
            lines += ["", f"Gate (tolerance {self.tolerance}): {verdict}"]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> list[Path]:
        """evaluation.json, evaluation.md, dice_per_class.png and quality_vs_speed.png in `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "evaluation.json").write_text(json.dumps(self.to_dict(), indent=2, default=str))
        (folder / "evaluation.md").write_text(self.to_markdown())
        return [folder / "evaluation.json", folder / "evaluation.md", *self._plots(folder)]

    def plot_dice(self, ax: Any) -> None:
        """Per-class mean Dice as grouped bars on a matplotlib `ax`: compressed vs original, and (with
        reference labels) original and compressed vs the reference. The gate's thresholds are drawn
        over the bars they apply to only: 1 - tolerance over each compressed-vs-original bar, and the
        original's Dice vs reference minus tolerance over each compressed-vs-reference bar; the
        original-vs-reference bars are the baseline, not gated."""
        summary = self.to_dict()["summary"]
        names = list(self.classes)
        x = np.arange(len(names))
        bars = [("compressed vs original", summary["compressed_vs_original"]["dice"], "#1f77b4")]
        if "original_vs_reference" in summary:
            bars += [("original vs reference", summary["original_vs_reference"]["dice"], "#aaaaaa"),
                     ("compressed vs reference", summary["compressed_vs_reference"]["dice"], "#ff7f0e")]
        width = 0.8 / len(bars)
        centres = {label: x + i * width - 0.4 + width / 2 for i, (label, _, _) in enumerate(bars)}
        for label, values, colour in bars:
            ax.bar(centres[label], [values[n] for n in names], width, label=label, color=colour)
        lows = [min(values.values()) for _, values, _ in bars]
        if self.tolerance is not None:
            gated = centres["compressed vs original"]
            ax.hlines([1 - self.tolerance] * len(names), gated - width / 2, gated + width / 2, colors="red",
                      linestyles="--", linewidth=1.5, label=f"gate on compressed vs original: ≥ {1 - self.tolerance:g}")
            lows.append(1 - self.tolerance)
            if "original_vs_reference" in summary:
                gated = centres["compressed vs reference"]
                floor = [summary["original_vs_reference"]["dice"][n] - self.tolerance for n in names]
                ax.hlines(floor, gated - width / 2, gated + width / 2, colors="darkred", linestyles=":", linewidth=1.5,
                          label=f"gate on compressed vs reference: ≥ original vs reference − {self.tolerance:g}")
                lows += floor
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
        ax.set_ylabel("Dice")
        handles, labels = ax.get_legend_handles_labels()  # bars in the first column, gates in the second
        order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("gate"))
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)

    def _plots(self, folder: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        summary = self.to_dict()["summary"]
        fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(self.classes)), 4.4))  # room for the legend below
        self.plot_dice(ax)
        ax.set_title("Per-class Dice")
        fig.tight_layout()
        dice_png = folder / "dice_per_class.png"
        fig.savefig(dice_png, dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        original = next(r for r in self.runs if r.report is None)
        for run in self.runs:
            worst = 1.0 if run is original else min(summary["compressed_vs_original"]["dice"].values())
            ax.scatter(original.seconds / run.seconds, worst, s=60)
            ax.annotate(run.label, (original.seconds / run.seconds, worst), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        ax.set_xlabel("speed-up (wall time, original / run)")
        ax.set_ylabel("worst-class Dice vs original")
        ax.set_title("Quality vs speed")
        fig.tight_layout()
        speed_png = folder / "quality_vs_speed.png"
        fig.savefig(speed_png, dpi=120)
        plt.close(fig)
        return [dice_png, speed_png]


def evaluate(
    original: Path,
    images: Path,
    output: Path,
    compressed: Path | None = None,
    config: TuckerConfig | None = None,
    labels: Path | None = None,
    folds: list[str] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
    device: str = "cpu",
    use_mirroring: bool = True,
    tolerance: float | None = None,
    nsd_tolerance_mm: float = 2.0,
    overwrite: bool = False,
    force: bool = False,
) -> Evaluation:
    """Predict `images` with the original model and with the compressed one (a compressed model
    folder, or `config` applied on the fly) and compare them per class; see `Evaluation`.

    Everything that can be checked is checked before predicting: the output folder is new or empty
    unless `overwrite` (then its predictions are replaced, so only this run's cases are compared;
    else OutputFolderError); `images` holds input images and, when `labels` is given, every case has a
    reference label map of its image's size (else InputError); a compressed folder was compressed from
    `original` (its manifest's checkpoint hashes) unless `force` (else ModelFolderError).
    """
    if (compressed is None) == (config is None):
        raise TuckerConfigError("give either a compressed model folder or a compression config, not both or neither")
    images, output, original = Path(images), Path(output), Path(original)
    ending = json.loads((original / "dataset.json").read_text())["file_ending"] if (
        original / "dataset.json").is_file() else ".nii.gz"
    inputs = {p.name[: -len("_0000" + ending)]: p for p in sorted(images.glob(f"*_0000{ending}"))}
    if not images.is_dir() or not inputs:
        raise InputError(f"{images} holds no nnU-Net input images (CASE_0000{ending}, ...)")
    if labels is not None:
        _check_labels(Path(labels), inputs, ending)
    if compressed is not None and not force:
        _check_source(Path(compressed), original)
    _prepare_output(output, overwrite)

    dev = torch.device(device)
    in_process = len(inputs) < WORKERS_FROM_CASES
    runs = [
        predict_folder(original, images, output / "original", False, folds, checkpoint_name, dev,
                       use_mirroring, "original", in_process),
        predict_folder(Path(compressed or original), images, output / "compressed",
                       False if compressed is not None else config, folds, checkpoint_name, dev,
                       use_mirroring, "compressed", in_process),
    ]
    manifest = Path(compressed or "") / MANIFEST_NAME
    if compressed is not None and manifest.is_file():
        runs[1].report = json.loads(manifest.read_text())

    dataset = json.loads((original / "dataset.json").read_text())
    classes = {k: int(v) for k, v in dataset["labels"].items() if isinstance(v, int) and int(v) > 0}
    cases: dict[str, dict[str, Any]] = {}
    for case in tqdm(inputs, desc="comparing", unit="case"):
        name = case + ending
        seg_original, spacing = _read(output / "original" / name)
        seg_compressed, _ = _read(output / "compressed" / name)
        result = {"compressed_vs_original": compare_segmentations(
            seg_compressed, seg_original, classes, spacing, nsd_tolerance_mm)}
        if labels is not None:
            reference, _ = _read(Path(labels) / name)
            result["original_vs_reference"] = compare_segmentations(
                seg_original, reference, classes, spacing, nsd_tolerance_mm)
            result["compressed_vs_reference"] = compare_segmentations(
                seg_compressed, reference, classes, spacing, nsd_tolerance_mm)
        cases[name] = result

    evaluation = Evaluation(classes, runs, cases, tolerance)
    if tolerance is not None:
        agreement = evaluation.mean("compressed_vs_original", "dice")
        failing = {n for n, v in agreement.items() if v < 1 - tolerance}
        if labels is not None:
            before = evaluation.mean("original_vs_reference", "dice")
            after = evaluation.mean("compressed_vs_reference", "dice")
            failing |= {n for n in before if before[n] - after[n] > tolerance}
        evaluation.failing = sorted(failing, key=list(classes).index)
    return evaluation


def _size(path: Path) -> tuple[int, ...]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(reader.GetSize())


def _check_labels(labels: Path, inputs: dict[str, Path], ending: str) -> None:
    """Every case has its reference `labels/CASE<ending>`, of its image's size."""
    if not labels.is_dir():
        raise InputError(f"the reference labels folder {labels} does not exist")
    missing = [case + ending for case in inputs if not (labels / (case + ending)).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"{labels} has no reference label map for {len(missing)} of {len(inputs)} case(s): "
                         f"{shown}; give labels for every case in the input folder, or no -r")
    for case, image in inputs.items():
        label_size, image_size = _size(labels / (case + ending)), _size(image)
        if label_size != image_size:
            raise InputError(f"{labels / (case + ending)} has size {label_size} but its image {image.name} has "
                             f"size {image_size}: the reference must be a label map of that image")


def _check_source(compressed: Path, original: Path) -> None:
    """`compressed` was written by nnunet-tucker from the checkpoints in `original` (by content)."""
    manifest_path = compressed / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ModelFolderError(f"{compressed} is not a model folder written by nnunet-tucker compress (it has no "
                               f"{MANIFEST_NAME})")
    manifest = json.loads(manifest_path.read_text())
    for relative, digest in manifest["source_checkpoints"].items():
        path = original / relative
        if not path.is_file() or sha256_of(path) != digest:
            raise ModelFolderError(
                f"{compressed} was compressed from {manifest['source']}, whose {relative} is not the one in "
                f"{original}: comparing them would gate the wrong model; give the model it came from as -m, "
                "or pass --force to compare anyway")


def _prepare_output(output: Path, overwrite: bool) -> None:
    """An output folder for this run only: new or empty, or with `overwrite` cleared of earlier predictions."""
    if output.is_file():
        raise OutputFolderError(f"the output {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise OutputFolderError(f"{output} is not empty; pass --overwrite to replace its predictions and "
                                    "evaluation, or choose a new folder")
        for sub in ("original", "compressed"):
            shutil.rmtree(output / sub, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)
