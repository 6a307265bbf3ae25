"""Where the time of a whole prediction goes: original vs compressed, side by side, split by stage.

- `time_stages`: nnU-Net's `predict_single_npy_array` in this process, one image, per stage
  (preprocessing, network, sliding-window bookkeeping, logits → segmentation, other), for the original
  model, the compressed one with nnU-Net's own pipeline around the network, and the compressed one with
  this package's (`pipeline.py`); the two compressed segmentations are compared voxel for voxel.
- `time_totalsegmentator`: TotalSegmentator's CLI as a subprocess, its stages read off its own
  ``Resampled in``/``Predicted in``/``Saved in`` lines; start-up and the rest are what is left of the
  wall time.
- `run_whole_run`: both on a generated clinical-size CT (512×512×300 at 0.8×0.8×1.5 mm) with the 3 mm
  TotalSegmentator architecture (random weights) as its local ``--fast`` model; table, JSON, PNG.

Runs are interleaved round by round (`benchmark.time_interleaved`); figures are medians. Compressed
variants are fitted to the weights alone: the same ranks, hence the same time, as a calibrated
compression at a rank ratio.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import NO_CALIBRATION, TuckerConfig
from .benchmark import environment, time_interleaved

logger = logging.getLogger(__name__)

CT_SHAPE = (300, 512, 512)  # z, y, x
CT_SPACING = (1.5, 0.8, 0.8)
TOTALSEG_TASK = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TOTALSEG_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
IN_PROCESS_STAGES = ("preprocessing", "network", "sliding window", "logits to segmentation", "other")
TOTALSEG_STAGES = ("start-up and other", "resampling", "prediction (nnU-Net)", "saving")
_TOTALSEG_LINES = {"Resampled in": "resampling", "Predicted in": "prediction (nnU-Net)", "Saved in": "saving"}


@dataclass
class StagedTiming:
    """Whole-run seconds of one variant per round, and seconds per stage per round."""

    name: str
    seconds: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    speedup: float = 1.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def stage_medians(self) -> dict[str, float]:
        return {stage: statistics.median(values) for stage, values in self.stages.items()}

    def to_dict(self) -> dict:
        return {"name": self.name, "seconds": self.seconds, "median": self.median, "speedup": self.speedup,
                "stages": dict(self.stages), "stage_medians": self.stage_medians()}


class StageClock:
    """Seconds per stage of wrapped calls; a call's time counts for its stage less the time of the
    wrapped calls inside it, so the stages of one run add up to the time they cover."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []

    def wrap(self, stage: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            self._inner.append(0.0)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[stage] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed

        return timed

    def reset(self) -> None:
        self.seconds.clear()


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` (a class's method, a module's function) is `value` while inside; after, what it was."""
    before = vars(owner)[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def _interleave(variants: dict[str, Callable[[], dict[str, float]]], rounds: int, warmup: int,
                device: str = "cpu") -> list[StagedTiming]:
    """Run every variant once per round, in turn (`benchmark.time_interleaved`), each run logged; each
    run returns its seconds per stage. The first variant is the one speed-ups are relative to."""
    timings = {name: StagedTiming(name) for name in variants}

    def record(name: str, total: float, stages: dict[str, float], timed: bool) -> None:
        logger.info("%s: %.1f s (%s)", name, total, ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
        if timed:
            for stage, seconds in stages.items():
                timings[name].stages[stage].append(seconds)

    seconds = time_interleaved(variants, torch.device(device), rounds, warmup, on_run=record)
    result = list(timings.values())
    for timing in result:
        timing.seconds = seconds[timing.name]
        timing.speedup = result[0].median / timing.median
    return result


def time_stages(
    model_folder: Path | str, image_file: Path | str, config: TuckerConfig, device: str = "cpu",
    fold: str = "0", rounds: int = 2, warmup: int = 1,
) -> tuple[list[StagedTiming], dict]:
    """Time `predict_single_npy_array` on `image_file` (TTA off, step 0.5) per stage: the original model,
    the compressed one with nnU-Net's pipeline, and the compressed one with this package's. Returns the
    timings and a check that both compressed pipelines segment identically."""
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    from ..nnunet.pipeline import nnunet_pipeline
    from ..nnunet.predictor import TuckerPredictor

    clock = StageClock()
    if config.calibration is None:
        config = replace(config, calibration=NO_CALIBRATION)
    name = f"ratio {config.rank_ratio}" if config.mac_budget is None else f"MAC budget {config.mac_budget}"
    variants = {"original": False, f"{name}, nnU-Net's pipeline": config, f"{name}": config}
    predictors = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(  # nnU-Net's preprocessing, timed as a stage
            DefaultPreprocessor, "run_case_npy", clock.wrap("preprocessing", DefaultPreprocessor.run_case_npy)))
        stack.enter_context(_replaced(  # nnU-Net's export, looked up in its module when called
            predict_from_raw_data, "convert_predicted_logits_to_segmentation_with_correct_shape",
            clock.wrap("logits to segmentation",
                       predict_from_raw_data.convert_predicted_logits_to_segmentation_with_correct_shape)))
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        if config.calibration == NO_CALIBRATION:
            stack.enter_context(_quiet_weights_only_warning())
        for variant, tucker_config in variants.items():
            predictor = TuckerPredictor(tile_step_size=0.5, use_mirroring=False, perform_everything_on_device=True,
                                        device=torch.device(device), allow_tqdm=False, tucker_config=tucker_config)
            predictor.initialize_from_trained_model_folder(str(model_folder), [fold if fold == "all" else int(fold)])
            if "nnU-Net's pipeline" in variant:
                nnunet_pipeline(predictor)
            predictor.predict_sliding_window_return_logits = clock.wrap(
                "sliding window", predictor.predict_sliding_window_return_logits)
            predictor._internal_maybe_mirror_and_predict = clock.wrap(
                "network", predictor._internal_maybe_mirror_and_predict)
            predictors[variant] = predictor
        image, properties = _read_image(predictors["original"], image_file)
        segmentations = {}

        def run(variant: str) -> dict[str, float]:
            clock.reset()
            start = time.perf_counter()
            segmentations[variant] = predictors[variant].predict_single_npy_array(image, properties)
            total = time.perf_counter() - start
            stages = {stage: clock.seconds.get(stage, 0.0) for stage in IN_PROCESS_STAGES[:-1]}
            return {**stages, "other": max(0.0, total - sum(stages.values()))}

        timings = _interleave({variant: functools.partial(run, variant) for variant in variants}, rounds, warmup,
                              device)
    a, b = (segmentations[v] for v in list(variants)[1:])
    check = {"voxels": int(a.size), "voxels_differing": int(np.count_nonzero(a != b)),
             "compared": list(variants)[1:], "image_shape": list(image.shape[1:])}
    return timings, check


@contextlib.contextmanager
def _quiet_weights_only_warning():
    """The benchmark fits to the weights alone for timing's sake; its warning is not meant for the reader."""
    predictor_logger = logging.getLogger("nnunet_tucker")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("TUCKER_CALIBRATION=none")

    predictor_logger.addFilter(keep)
    try:
        yield
    finally:
        predictor_logger.removeFilter(keep)


def _read_image(predictor, image_file: Path | str) -> tuple[np.ndarray, dict]:
    reader = predictor.plans_manager.image_reader_writer_class()
    return reader.read_images([str(image_file)])


def time_totalsegmentator(
    ct: Path | str, home: Path | str, config: TuckerConfig, ml: bool = True, rounds: int = 2, warmup: int = 1,
    out_dir: Path | str | None = None, device: str = "cpu",
) -> list[StagedTiming]:
    """Time ``TotalSegmentator -i ct --fast [--ml] -d cpu`` (``-d gpu`` for `device` cuda) with `home` as its
    TOTALSEG_HOME_DIR: the original model vs ``TUCKER_RANK_RATIO`` (or ``TUCKER_MAC_BUDGET``) as `config` says."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TUCKER_", "nnUNet_"))}
    base.update(TOTALSEG_HOME_DIR=str(home), PYTHONUNBUFFERED="1")
    compressed = {**base, "TUCKER_POLICY": config.policy,
                  "TUCKER_CALIBRATION": config.calibration or NO_CALIBRATION}
    if config.mac_budget is not None:
        compressed["TUCKER_MAC_BUDGET"] = str(config.mac_budget)
        name = f"MAC budget {config.mac_budget}"
    else:
        compressed["TUCKER_RANK_RATIO"] = str(config.rank_ratio)
        name = f"ratio {config.rank_ratio}"
    out = Path(out_dir or tempfile.mkdtemp(prefix="nnunet_tucker_totalseg_"))
    command = ["TotalSegmentator", "-i", str(ct), "--fast", "-d", _totalseg_device(device)] + (["--ml"] if ml else [])

    def run(env: dict[str, str], label: str) -> dict[str, float]:
        target = out / label
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        result = subprocess.run([*command, "-o", str(target / "seg.nii.gz" if ml else target)], env=env,
                                capture_output=True, text=True)
        total = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"TotalSegmentator failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return totalseg_stages(result.stdout, total)

    flag = " --ml" if ml else ""
    return _interleave({f"TotalSegmentator --fast{flag}": functools.partial(run, base, "original"),
                        f"TotalSegmentator --fast{flag}, {name}": functools.partial(run, compressed, "compressed")},
                       rounds, warmup)


def _totalseg_device(device: str) -> str:
    """TotalSegmentator's ``-d`` for a torch device name: cuda → gpu, cuda:1 → gpu:1."""
    return device.replace("cuda", "gpu")


def totalseg_stages(stdout: str, total: float) -> dict[str, float]:
    """Seconds per stage from TotalSegmentator's own timing lines (``  Resampled in 0.91s``, ...); what is
    left of `total` is start-up (imports, model load, compression from the cache) and the rest."""
    stages = dict.fromkeys(TOTALSEG_STAGES[1:], 0.0)
    for line in stdout.splitlines():
        match = re.match(r"\s*(Resampled in|Predicted in|Saved in) ([0-9.]+)s", line)
        if match:
            stages[_TOTALSEG_LINES[match.group(1)]] += float(match.group(2))
    return {TOTALSEG_STAGES[0]: max(0.0, total - sum(stages.values())), **stages}


def clinical_ct(path: Path, seed: int = 4242, shape: tuple[int, int, int] = CT_SHAPE,
                spacing: tuple[float, float, float] = CT_SPACING) -> Path:
    """A synthetic CT of `shape` at `spacing` (z, y, x), written to `path`: a phantom made at 3 mm and
    interpolated up (a phantom made at full resolution takes minutes; timing does not need the detail)."""
    from scipy.ndimage import zoom

    from .synthetic import make_phantom, write_nifti

    coarse_shape = tuple(max(1, round(n * s / 3.0)) for n, s in zip(shape, spacing, strict=True))
    image, _, _ = make_phantom(seed, coarse_shape, (3.0, 3.0, 3.0))
    fine = zoom(image, [n / c for n, c in zip(shape, coarse_shape, strict=True)], order=1, grid_mode=True,
                mode="nearest")
    write_nifti(path, fine.astype(np.float32), spacing)
    return path


def totalseg_home(home: Path, model_folder: Path) -> Path:
    """A TotalSegmentator home whose ``--fast`` model is `model_folder` (copied; offline, no usage stats)."""
    target = home / "nnunet" / "results" / TOTALSEG_TASK / f"{TOTALSEG_TRAINER}__nnUNetPlans__3d_fullres"
    shutil.copytree(model_folder, target, dirs_exist_ok=True)
    for checkpoint in target.glob("fold_*/checkpoint_final.pth"):
        data = torch.load(checkpoint, map_location="cpu", weights_only=False)
        data["trainer_name"] = TOTALSEG_TRAINER
        torch.save(data, checkpoint)
    (home / "config.json").write_text(json.dumps(
        {"totalseg_id": "nnunet_tucker_bench", "send_usage_stats": False, "prediction_counter": 0}))
    return home


def to_markdown(title: str, timings: Sequence[StagedTiming], stages: Sequence[str]) -> str:
    """One table: median seconds per stage and in all, speed-up of the whole run."""
    head = "| " + " | ".join(["variant", *stages, "whole run", "speed-up"]) + " |"
    lines = [f"### {title}", "", head, "|---" * (len(stages) + 3) + "|"]
    for t in timings:
        medians = t.stage_medians()
        cells = [f"{medians.get(s, 0.0):.1f}" for s in stages]
        lines.append(f"| {t.name} | " + " | ".join(cells) + f" | {t.median:.1f} | {t.speedup:.2f}x |")
    return "\n".join(lines)


def stacked_bars(png: Path, panels: Sequence[tuple[str, Sequence[StagedTiming], Sequence[str]]]) -> None:
    """One horizontal stacked bar per variant (median seconds per stage), one panel per table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels) + 0.6), squeeze=False)
    for ax, (title, timings, stages) in zip(axes[:, 0], panels, strict=True):
        names = [t.name for t in timings][::-1]
        left = np.zeros(len(names))
        for stage in stages:
            widths = np.array([t.stage_medians().get(stage, 0.0) for t in timings][::-1])
            ax.barh(names, widths, left=left, label=stage)
            left += widths
        for y, t in enumerate(timings[::-1]):
            ax.annotate(f"{t.median:.0f} s ({t.speedup:.2f}x)", (left[y], y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("median seconds")
        ax.set_xlim(0, left.max() * 1.25)
        ax.legend(fontsize=7, ncol=len(stages), loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run_whole_run(out_dir: Path, ratio: float = 0.3, rounds: int = 2, warmup: int = 1, policy: str = "profiled",
                  totalsegmentator: bool = True, work_dir: Path | None = None, device: str = "cpu") -> dict:
    """The whole-run benchmark on the embedded default: a generated 512×512×300 CT, the 3 mm TotalSegmentator
    architecture, on `device` (cpu or cuda); writes whole_run.md, whole_run.json and whole_run.png to `out_dir`."""
    from .presets import write_preset_model_folder

    out_dir.mkdir(parents=True, exist_ok=True)
    config = TuckerConfig(ratio, policy=policy)
    with contextlib.ExitStack() as stack:
        work = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nnunet_tucker_whole_run_")))
        stack.enter_context(environment(TUCKER_CACHE_DIR=str(work / "cache")))
        model = write_preset_model_folder("totalseg-3mm", work / "models")
        ct = work / "ct_0000.nii.gz"
        if not ct.exists():
            logger.info("generating a %s CT at %s mm", "×".join(map(str, CT_SHAPE[::-1])), CT_SPACING[::-1])
            clinical_ct(ct)
        panels, results = [], {}
        if totalsegmentator and shutil.which("TotalSegmentator") is None:
            logger.warning("TotalSegmentator is not installed (pip install TotalSegmentator): timing nnU-Net only")
            totalsegmentator = False
        if totalsegmentator:
            home = totalseg_home(work / "totalseg_home", model)
            timings = time_totalsegmentator(ct, home, config, ml=True, rounds=rounds, warmup=warmup,
                                            out_dir=work / "totalseg_out", device=device)
            panels.append((f"TotalSegmentator CLI, 512×512×300 CT, -d {_totalseg_device(device)}", timings,
                           TOTALSEG_STAGES))
            results["totalsegmentator"] = [t.to_dict() for t in timings]
        resampled = work / "ct_3mm_0000.nii.gz"
        if not resampled.exists():  # the image nnU-Net receives from TotalSegmentator: 3 mm isotropic
            clinical_ct(resampled, shape=tuple(round(n * s / 3.0) for n, s in zip(CT_SHAPE, CT_SPACING, strict=True)),
                        spacing=(3.0, 3.0, 3.0))
        timings, check = time_stages(model, resampled, config, device=device, rounds=rounds, warmup=warmup)
        panels.append((f"nnU-Net predict_single_npy_array in process, {'×'.join(map(str, check['image_shape']))} "
                       f"at 3 mm, {device}", timings, IN_PROCESS_STAGES))
        results["in_process"] = [t.to_dict() for t in timings]
        results["identical_segmentations"] = check
    meta = {"config": config.to_dict(), "device": device, "rounds": rounds, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "ct_shape_zyx": CT_SHAPE, "ct_spacing_zyx": CT_SPACING}
    markdown = "\n\n".join(to_markdown(title, timings, stages) for title, timings, stages in panels)
    markdown += (f"\n\nCompressed segmentations, nnU-Net's pipeline vs this package's: "
                 f"{check['voxels_differing']} of {check['voxels']} voxels differ.")
    (out_dir / "whole_run.md").write_text(markdown + "\n")
    (out_dir / "whole_run.json").write_text(json.dumps({**meta, **results}, indent=2))
    stacked_bars(out_dir / "whole_run.png", panels)
    return {"markdown": markdown, **results}
