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
- `run_whole_run_total` (`time_totalsegmentator_default`): TotalSegmentator's default mode, its five 1.5 mm
  part models one after the other (random weights in their architectures), as users run it: each variant's
  first run (the compressed one self-calibrating every part) and later runs apart, by stage and by part, with
  the peak memory of every run (`run_measured`).

Runs are interleaved round by round (`benchmark.time_interleaved`); figures are medians. Compressed
variants are fitted to the weights alone (the same ranks, hence the same time, as a calibrated
compression at a rank ratio), except in the default mode's benchmark, which times the self-calibration too.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
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
# TotalSegmentator's default mode (task "total", 1.5 mm): five part models, run one after the other
TOTALSEG_PARTS = {
    "organs": "Dataset291_TotalSegmentator_part1_organs_1559subj",
    "vertebrae": "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
    "cardiac": "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
    "muscles": "Dataset294_TotalSegmentator_part4_muscles_1559subj",
    "ribs": "Dataset295_TotalSegmentator_part5_ribs_1559subj",
}
TOTALSEG_PARTS_TRAINER = "nnUNetTrainerNoMirroring"
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


def _environments(config: TuckerConfig, **variables: str) -> tuple[dict[str, str], dict[str, str], str]:
    """The environments of a run as a subprocess with `variables` set: the original's (no ``TUCKER_*`` or
    ``nnUNet_*`` variables of this process) and the compressed one's (policy, and rank ratio or MAC budget as
    `config` says), and the compressed variant's name."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TUCKER_", "nnUNet_"))}
    base.update(variables, PYTHONUNBUFFERED="1")
    compressed = {**base, "TUCKER_POLICY": config.policy}
    if config.mac_budget is not None:
        compressed["TUCKER_MAC_BUDGET"] = str(config.mac_budget)
        return base, compressed, f"MAC budget {config.mac_budget}"
    compressed["TUCKER_RANK_RATIO"] = str(config.rank_ratio)
    return base, compressed, f"ratio {config.rank_ratio}"


def time_totalsegmentator(
    ct: Path | str, home: Path | str, config: TuckerConfig, ml: bool = True, rounds: int = 2, warmup: int = 1,
    out_dir: Path | str | None = None, device: str = "cpu", backends: Sequence[str] | None = None,
) -> list[StagedTiming]:
    """Time ``TotalSegmentator -i ct --fast [--ml] -d cpu`` (``-d gpu`` for `device` cuda) with `home` as its
    TOTALSEG_HOME_DIR: the original model vs ``TUCKER_RANK_RATIO`` (or ``TUCKER_MAC_BUDGET``) as `config` says, run
    by `config.backend`, or by each of `backends` (``TUCKER_BACKEND``) side by side."""
    base, compressed, name = _environments(config, TOTALSEG_HOME_DIR=str(home))
    compressed["TUCKER_CALIBRATION"] = config.calibration or NO_CALIBRATION
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
    variants = {f"TotalSegmentator --fast{flag}": functools.partial(run, base, "original")}
    for backend in backends or [config.backend]:
        label = f", {backend}" if backends else ""
        variants[f"TotalSegmentator --fast{flag}, {name}{label}"] = functools.partial(
            run, {**compressed, "TUCKER_BACKEND": backend}, f"compressed_{backend}")
    return _interleave(variants, rounds, warmup)


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


def totalseg_home(home: Path, model_folder: Path | None = None, parts: Mapping[str, Path] | None = None) -> Path:
    """A TotalSegmentator home (offline, no usage stats) whose ``--fast`` model is `model_folder` and whose
    default mode's part models (`TOTALSEG_PARTS`) are `parts` (part name -> model folder); each copied
    under the folder name and trainer TotalSegmentator looks for."""
    results = home / "nnunet" / "results"
    if model_folder is not None:
        _install_model(model_folder, results / TOTALSEG_TASK / f"{TOTALSEG_TRAINER}__nnUNetPlans__3d_fullres",
                       TOTALSEG_TRAINER)
    for part, folder in (parts or {}).items():
        _install_model(folder, results / TOTALSEG_PARTS[part] / f"{TOTALSEG_PARTS_TRAINER}__nnUNetPlans__3d_fullres",
                       TOTALSEG_PARTS_TRAINER)
    (home / "config.json").write_text(json.dumps(
        {"totalseg_id": "nnunet_tucker_bench", "send_usage_stats": False, "prediction_counter": 0}))
    return home


def _install_model(model_folder: Path, target: Path, trainer: str) -> None:
    """`model_folder` copied to `target`, its checkpoints naming `trainer` (the trainer TotalSegmentator asks for)."""
    shutil.copytree(model_folder, target, dirs_exist_ok=True)
    for checkpoint in target.glob("fold_*/checkpoint_final.pth"):
        data = torch.load(checkpoint, map_location="cpu", weights_only=False)
        data["trainer_name"] = trainer
        torch.save(data, checkpoint)


def totalseg_part_labels() -> dict[str, dict[int, str]]:
    """Part name -> the classes of its model (value -> name, 1..N), from the installed TotalSegmentator's
    ``class_map_5_parts`` (the default mode's five models, `TOTALSEG_PARTS`)."""
    from totalsegmentator.map_to_binary import class_map_5_parts

    return {part: dict(class_map_5_parts[f"class_map_part_{part}"]) for part in TOTALSEG_PARTS}


def part_model_folder(source: Path, labels: Mapping[int, str], out_dir: Path, seed: int = 0,
                      **configuration: Any) -> Path:
    """A model folder derived from the trained (or random) model folder `source`, fold 0: the same network and
    plans, segmenting `labels` (value -> name, 1..N): dataset.json names them, the segmentation heads are cut
    to N + 1 outputs or extended with random rows (seeded, scaled like the existing ones). `configuration`
    replaces entries of the plans' ``3d_fullres`` configuration (e.g. ``patch_size``, ``spacing``). Written
    to ``out_dir/<source's dataset folder>/<source's folder name>``; for tests and timing, not for use."""
    source = Path(source)
    target = Path(out_dir) / source.parent.name / source.name
    (target / "fold_0").mkdir(parents=True, exist_ok=True)
    plans = json.loads((source / "plans.json").read_text())
    plans["configurations"]["3d_fullres"].update(configuration)
    (target / "plans.json").write_text(json.dumps(plans, indent=4))
    dataset_json = json.loads((source / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, **{name: value for value, name in sorted(labels.items())}}
    outputs = len(labels) + 1
    checkpoint = torch.load(source / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(seed)
    weights = checkpoint["network_weights"]
    for key in [k for k in weights if k.startswith("decoder.seg_layers.")]:
        tensor = weights[key]
        if tensor.shape[0] >= outputs:
            weights[key] = tensor[:outputs].clone()
        else:
            extra = torch.randn((outputs - tensor.shape[0], *tensor.shape[1:]), generator=generator)
            weights[key] = torch.cat([tensor, extra.to(tensor.dtype) * tensor.std()]).contiguous()
    checkpoint.get("init_args", {}).update(dataset_json=dataset_json, plans=plans)
    torch.save(checkpoint, target / "fold_0" / "checkpoint_final.pth")
    (target / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    return target


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
                  totalsegmentator: bool = True, work_dir: Path | None = None, device: str = "cpu",
                  backends: Sequence[str] | None = None) -> dict:
    """The whole-run benchmark on the embedded default: a generated 512×512×300 CT, the 3 mm TotalSegmentator
    architecture, on `device` (cpu or cuda), the compressed TotalSegmentator run by each of `backends` (default: the
    ``auto`` choice); writes whole_run.md, whole_run.json and whole_run.png to `out_dir`. The in-process stages
    compare nnU-Net's pipeline with this package's around the same PyTorch network."""
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
                                            out_dir=work / "totalseg_out", device=device, backends=backends)
            panels.append((f"TotalSegmentator CLI, 512×512×300 CT, -d {_totalseg_device(device)}", timings,
                           TOTALSEG_STAGES))
            results["totalsegmentator"] = [t.to_dict() for t in timings]
        resampled = work / "ct_3mm_0000.nii.gz"
        if not resampled.exists():  # the image nnU-Net receives from TotalSegmentator: 3 mm isotropic
            clinical_ct(resampled, shape=tuple(round(n * s / 3.0) for n, s in zip(CT_SHAPE, CT_SPACING, strict=True)),
                        spacing=(3.0, 3.0, 3.0))
        timings, check = time_stages(model, resampled, replace(config, backend="torch"), device=device, rounds=rounds,
                                     warmup=warmup)
        panels.append((f"nnU-Net predict_single_npy_array in process, {'×'.join(map(str, check['image_shape']))} "
                       f"at 3 mm, {device}", timings, IN_PROCESS_STAGES))
        results["in_process"] = [t.to_dict() for t in timings]
        results["identical_segmentations"] = check
    meta = {"config": config.to_dict(), "backends": list(backends or [config.backend]), "device": device,
            "rounds": rounds, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "ct_shape_zyx": CT_SHAPE, "ct_spacing_zyx": CT_SPACING}
    markdown = "\n\n".join(to_markdown(title, timings, stages) for title, timings, stages in panels)
    markdown += (f"\n\nCompressed segmentations, nnU-Net's pipeline vs this package's: "
                 f"{check['voxels_differing']} of {check['voxels']} voxels differ.")
    (out_dir / "whole_run.md").write_text(markdown + "\n")
    (out_dir / "whole_run.json").write_text(json.dumps({**meta, **results}, indent=2))
    stacked_bars(out_dir / "whole_run.png", panels)
    return {"markdown": markdown, **results}


# ---- TotalSegmentator's default mode: five 1.5 mm part models, first run and later runs ----

_PART_LINE = re.compile(r"Predicting part (\d+) of (\d+) \.\.\.")
_SUMMARY_LINE = re.compile(r"^nnunet-tucker: .* convolutions decomposed, .*?; (decomposed \d+ fold\(s\) in ([0-9.]+) s"
                           r"|cache hit) \[(.+)\]$")
_PROFILE_LINE = re.compile(r"^nnunet-tucker: profiled (\d+) layer forms on \S+ in ([0-9.]+) s")


@dataclass
class MeasuredRun:
    """One subprocess: wall seconds, CPU seconds (user and system, its own and its reaped descendants'), its
    output, when each stdout line arrived (seconds from the start), and its peak memory: `peak_rss_mb` the
    largest resident set of the process or any one of its descendants (``os.wait4``'s ``ru_maxrss``),
    `peak_tree_mb` the largest memory of the process and its live descendants together (`_tree_memory_bytes`:
    proportional set sizes), sampled every `RSS_SAMPLE_SECONDS` (None where /proc is unavailable)."""

    seconds: float
    cpu_seconds: float
    returncode: int
    stdout: str
    stderr: str
    marks: list[tuple[float, str]]
    peak_rss_mb: float
    peak_tree_mb: float | None


RSS_SAMPLE_SECONDS = 0.5


def _tree_memory_bytes(root: int) -> int | None:
    """Memory of process `root` and its live descendants, from /proc (None without /proc): the sum of their
    proportional set sizes (``Pss`` of smaps_rollup: a page shared by n processes counts 1/n in each, so forked
    workers are not counted n times), or of their resident sets where Pss cannot be read."""
    proc = Path("/proc")
    if not (proc / str(root)).exists():
        return None
    children: dict[int, list[int]] = defaultdict(list)
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    page = os.sysconf("SC_PAGE_SIZE")
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        with contextlib.suppress(OSError, IndexError, ValueError):
            rollup = (proc / str(pid) / "smaps_rollup").read_text()
            total += next(int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:"))
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((proc / str(pid) / "statm").read_text().split()[1]) * page
    return total


def run_measured(command: Sequence[str], env: Mapping[str, str]) -> MeasuredRun:
    """Run `command` with `env`, stdout read line by line as it comes (timestamped), memory measured."""
    import threading

    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(list(command), env=dict(env), stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   bufsize=1)
        marks: list[tuple[float, str]] = []
        peak_tree = [0]
        done = threading.Event()

        def read() -> None:
            for line in process.stdout:
                marks.append((time.perf_counter() - start, line.rstrip("\n")))

        def sample() -> None:
            while not done.wait(RSS_SAMPLE_SECONDS):
                size = _tree_memory_bytes(process.pid)
                if size is None:  # no /proc here
                    return
                peak_tree[0] = max(peak_tree[0], size)

        threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=sample, daemon=True)]
        for thread in threads:
            thread.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        for thread in threads:
            thread.join()
        process.stdout.close()
        stderr.seek(0)
        errors = stderr.read()
    peak = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20  # kB (Linux), bytes
    return MeasuredRun(seconds, usage.ru_utime + usage.ru_stime, process.returncode,
                       "\n".join(line for _, line in marks), errors, marks, peak,
                       peak_tree[0] / 2**20 if peak_tree[0] > 0 else None)


def part_seconds(marks: Sequence[tuple[float, str]], parts: Sequence[str]) -> dict[str, float]:
    """Seconds per part model from TotalSegmentator's ``Predicting part k of n ...`` lines (stdout, as they
    came): from one such line to the next, the last to the ``Predicted in`` line that follows."""
    starts = [(at, int(match[1])) for at, line in marks if (match := _PART_LINE.search(line))]
    end = next((at for at, line in marks if line.strip().startswith("Predicted in")), None)
    seconds = {}
    for (at, k), following in zip(starts, [*starts[1:], (end, None)], strict=True):
        if following[0] is not None and 1 <= k <= len(parts):
            seconds[parts[k - 1]] = following[0] - at
    return seconds


def compression_lines(stderr: str, parts: Mapping[str, str]) -> dict[str, Any]:
    """What the package's stderr lines say of a run of `parts` (part -> dataset folder): per part, the seconds its
    compression took at the first case ("decomposed ... in X s", a self-calibration) or 0.0 for a cache hit; and
    the device profile's layer forms timed and seconds (the first model only, later ones share it)."""
    compressed, profile = {}, {"layer_forms_timed": 0, "seconds": 0.0}
    for line in stderr.splitlines():
        if match := _SUMMARY_LINE.match(line):
            for part, folder in parts.items():
                if f"/{folder}/" in match[3] or match[3].endswith(f"/{folder}"):
                    compressed[part] = float(match[2]) if match[2] else 0.0
        elif match := _PROFILE_LINE.match(line):
            profile["layer_forms_timed"] += int(match[1])
            profile["seconds"] += float(match[2])
    return {"compression_seconds": compressed, "profile": profile}


def time_totalsegmentator_default(
    ct: Path | str, home: Path | str, config: TuckerConfig, rounds: int = 1, out_dir: Path | str | None = None,
    cache_dir: Path | str | None = None, device: str = "cpu", ml: bool = False, original_once: bool = False,
) -> list[dict]:
    """Time ``TotalSegmentator -i ct -o out -d cpu`` (its default mode, task total: the five part models in
    `home`) as users run it: the original, and with ``TUCKER_RANK_RATIO`` (or ``TUCKER_MAC_BUDGET``) and
    ``TUCKER_POLICY`` as `config` says, self-calibrated (the default). Round 0 is each variant's first run: the
    compressed one starts from an empty cache (`cache_dir`, emptied), so it compresses and self-calibrates
    every part on the CT; then `rounds` more rounds, in which it loads them from the cache. Interleaved
    (original, compressed, original, ...); with `original_once`, the later rounds run the compressed variant alone
    (the original caches nothing: its first run is each of its runs; for CTs whose original run takes most of an
    hour). Returns one record per run, in order."""
    from .benchmark import time_interleaved

    out = Path(out_dir or tempfile.mkdtemp(prefix="nnunet_tucker_totalseg_default_"))
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    base, compressed, name = _environments(config, TOTALSEG_HOME_DIR=str(home))
    compressed["TUCKER_CACHE_DIR"] = str(cache)
    if config.calibration is not None:
        compressed["TUCKER_CALIBRATION"] = str(config.calibration)
    command = ["TotalSegmentator", "-i", str(ct), "-d", _totalseg_device(device), *(["--ml"] if ml else [])]
    parts = list(TOTALSEG_PARTS)
    records: list[dict] = []

    def run(env: dict[str, str], variant: str) -> MeasuredRun:
        target = out / variant.replace(" ", "_")
        shutil.rmtree(target, ignore_errors=True)
        measured = run_measured([*command, "-o", str(target / "seg.nii.gz" if ml else target)], env)
        if measured.returncode != 0:
            raise RuntimeError(f"TotalSegmentator failed ({measured.returncode}):\n{measured.stderr[-3000:]}")
        return measured

    def record(variant: str, seconds: float, measured: MeasuredRun, timed: bool) -> None:
        round_index = sum(r["variant"] == variant for r in records)
        entry = {"variant": variant, "round": round_index, "run": "first" if round_index == 0 else "later",
                 "seconds": measured.seconds, "cpu_seconds": round(measured.cpu_seconds, 1),
                 "stages": totalseg_stages(measured.stdout, measured.seconds),
                 "parts": part_seconds(measured.marks, parts), "peak_rss_mb": round(measured.peak_rss_mb, 1),
                 "peak_tree_mb": None if measured.peak_tree_mb is None else round(measured.peak_tree_mb, 1),
                 **compression_lines(measured.stderr, TOTALSEG_PARTS),
                 "log": [line for line in measured.stderr.splitlines() if line.startswith("nnunet-tucker: ")]}
        if variant != "original" and len(entry["compression_seconds"]) != len(parts):
            raise RuntimeError(f"{variant}: expected one compression line per part model, found "
                               f"{sorted(entry['compression_seconds'])}:\n{measured.stderr[-3000:]}")
        records.append(entry)
        logger.info("%s, %s run: %.1f s (%s), CPU %.0f s, peak RSS %.0f MB", variant, entry["run"],
                    measured.seconds, ", ".join(f"{k} {v:.1f}" for k, v in entry["stages"].items()),
                    measured.cpu_seconds, measured.peak_rss_mb)

    runs = {"original": functools.partial(run, base, "original"), name: functools.partial(run, compressed, name)}
    if original_once:
        time_interleaved(runs, torch.device(device), 1, 0, on_run=record)
        time_interleaved({name: runs[name]}, torch.device(device), rounds, 0, on_run=record)
    else:
        time_interleaved(runs, torch.device(device), 1 + rounds, 0, on_run=record)
    return records


def summarize_default_mode(records: Sequence[dict]) -> list[dict]:
    """Rows of the default-mode table: each variant's first run, then each variant's later runs (medians of the
    stages, the whole run and per part; the largest peak). Speed-ups are the original's over each row's, first
    run against first run, later runs against later runs (against the original's first where it ran once)."""
    rows = []
    for run in ("first", "later"):
        for variant in dict.fromkeys(r["variant"] for r in records):
            chosen = [r for r in records if r["variant"] == variant and r["run"] == run]
            if not chosen:
                continue
            parts = {part: statistics.median(r["parts"][part] for r in chosen) for part in chosen[0]["parts"]}
            rows.append({
                "variant": variant, "run": run, "runs": len(chosen),
                "seconds": statistics.median(r["seconds"] for r in chosen),
                "cpu_seconds": statistics.median(r["cpu_seconds"] for r in chosen),
                "stages": {s: statistics.median(r["stages"][s] for r in chosen) for s in TOTALSEG_STAGES},
                "parts": parts,
                "compression_seconds": {part: statistics.median(r["compression_seconds"][part] for r in chosen)
                                        for part in chosen[0]["compression_seconds"]},
                "profile_seconds": statistics.median(r["profile"]["seconds"] for r in chosen),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in chosen),
                "peak_tree_mb": max((r["peak_tree_mb"] or 0.0) for r in chosen) or None,
            })
    originals = {r["run"]: r for r in rows if r["variant"] == "original"}
    for row in rows:
        original = originals.get(row["run"]) or originals["first"]
        row["speedup"] = original["seconds"] / row["seconds"]
    return rows


def default_mode_markdown(title: str, rows: Sequence[dict]) -> str:
    """The default-mode tables: by stage (with peak memory), and by part model."""
    head = ["variant", "run", *TOTALSEG_STAGES, "whole run", "speed-up", "CPU time", "peak RSS, largest process",
            "peak memory, process tree (PSS)"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        run = "first (self-calibration)" if row["run"] == "first" and row["compression_seconds"] else row["run"]
        if row["run"] == "later":
            run += f" (median of {row['runs']})" if row["runs"] > 1 else ""
        tree = f"{row['peak_tree_mb'] / 1024:.2f} GB" if row["peak_tree_mb"] else "n/a"
        lines.append(f"| {row['variant']} | {run} | " + " | ".join(f"{row['stages'][s]:.1f}" for s in TOTALSEG_STAGES)
                     + f" | {row['seconds']:.1f} | {row['speedup']:.2f}x | {row['cpu_seconds']:.0f}"
                     f" | {row['peak_rss_mb'] / 1024:.2f} GB"
                     f" | {tree} |")
    parts = list(rows[0]["parts"]) if rows else []
    lines += ["", "Seconds per part model (TotalSegmentator's `Predicting part k of 5` lines; compressed first run: of "
              "which compressing and self-calibrating it at its first case):", "",
              "| " + " | ".join(["variant", "run", *parts]) + " |", "|---" * (len(parts) + 2) + "|"]
    for row in rows:
        cells = []
        for part in parts:
            cell = f"{row['parts'].get(part, float('nan')):.1f}"
            if row["compression_seconds"].get(part):
                cell += f" ({row['compression_seconds'][part]:.1f})"
            cells.append(cell)
        lines.append(f"| {row['variant']} | {row['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_part_presets(out_dir: Path) -> dict[str, Path]:
    """The five part models of TotalSegmentator's default mode, random weights (seeded, one seed per part) in the
    exact architectures (`presets`: ``totalseg-1.5mm-<part>``), as model folders under `out_dir`."""
    from .presets import write_preset_model_folder

    return {part: write_preset_model_folder(f"totalseg-1.5mm-{part}", out_dir, seed=index)
            for index, part in enumerate(TOTALSEG_PARTS)}


def run_whole_run_total(out_dir: Path, ratio: float = 0.3, rounds: int = 1, policy: str = "profiled",
                        ct_shape: tuple[int, int, int] = CT_SHAPE, work_dir: Path | None = None, device: str = "cpu",
                        ml: bool = False, invocation: str | None = None, original_once: bool = False) -> dict:
    """The whole-run benchmark of TotalSegmentator's default mode: a generated CT of `ct_shape` (z, y, x) at
    0.8×0.8×1.5 mm (default 512×512×300), the five 1.5 mm part models with random weights, original vs
    `ratio` (self-calibrated, `policy`), the original once where `original_once`; writes whole_run_total.json (with
    `invocation`, the command that ran the benchmark) and whole_run_total.md to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = TuckerConfig(ratio, policy=policy)
    ct_name = "×".join(map(str, ct_shape[::-1]))
    with contextlib.ExitStack() as stack:
        work = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nnunet_tucker_total_")))
        home = work / "totalseg_home"
        if not (home / "config.json").exists():
            totalseg_home(home, parts=write_part_presets(work / "models"))
        ct = work / f"ct_{ct_name.replace('×', 'x')}.nii.gz"
        if not ct.exists():
            logger.info("generating a %s CT at %s mm", ct_name, CT_SPACING[::-1])
            clinical_ct(ct, shape=ct_shape)
        records = time_totalsegmentator_default(ct, home, config, rounds=rounds, out_dir=work / "totalseg_out",
                                                cache_dir=work / "cache", device=device, ml=ml,
                                                original_once=original_once)
    rows = summarize_default_mode(records)
    title = (f"TotalSegmentator default mode (task total: five 1.5 mm models), {ct_name} CT at "
             f"{'×'.join(map(str, CT_SPACING[::-1]))} mm, -d {_totalseg_device(device)}{' --ml' if ml else ''}")
    markdown = default_mode_markdown(title, rows)
    meta = {"benchmark": invocation, "config": config.to_dict(), "device": device, "rounds": rounds,
            "original_once": original_once,
            "cpus": os.cpu_count(), "torch": torch.__version__, "ct_shape_zyx": list(ct_shape),
            "ct_spacing_zyx": list(CT_SPACING),
            "command": f"TotalSegmentator -i CT -o OUT -d {_totalseg_device(device)}{' --ml' if ml else ''}",
            "models": {part: f"totalseg-1.5mm-{part}" for part in TOTALSEG_PARTS},
            "peak_memory": "peak_rss_mb: os.wait4's ru_maxrss of the TotalSegmentator process (the larger of its "
                           "own peak resident set and any one reaped descendant's); peak_tree_mb: the largest sum of "
                           "proportional set sizes (Pss: shared pages split among the processes sharing them) over "
                           "the process and its live descendants, sampled from /proc every "
                           f"{RSS_SAMPLE_SECONDS} s"}
    (out_dir / "whole_run_total.md").write_text(markdown + "\n")
    (out_dir / "whole_run_total.json").write_text(json.dumps({**meta, "summary": rows, "runs": records}, indent=2))
    return {"markdown": markdown, "summary": rows, "runs": records}


# ---- nnU-Net's own nnUNetv2_predict on one case: first run and later runs ----

PREDICT_STAGES = ("start-up and model load", "preprocessing", "network", "export", "exit")
# nnU-Net's stdout lines (predict_from_raw_data) that end each stage but the last, for one case
_PREDICT_MARKS = ("There are ", "Predicting ", "sending off prediction", "Segmentation export complete.")


def predict_stages(marks: Sequence[tuple[float, str]], total: float) -> dict[str, float]:
    """Seconds per stage (`PREDICT_STAGES`) of one ``nnUNetv2_predict`` run on one case, from the arrival of
    nnU-Net's own stdout lines (`_PREDICT_MARKS`, the first of each); the last stage ends at `total`."""
    ends = []
    for prefix in _PREDICT_MARKS:
        at = next((at for at, line in marks if line.strip().startswith(prefix)), None)
        if at is None:
            raise RuntimeError(f"nnUNetv2_predict printed no line starting {prefix!r}")
        ends.append(at)
    bounds = [0.0, *ends, total]
    return {stage: bounds[i + 1] - bounds[i] for i, stage in enumerate(PREDICT_STAGES)}


def run_whole_run_predict(out_dir: Path, preset: str = "resenc-l", ratio: float = 0.3, rounds: int = 1,
                          policy: str = "profiled", case_shape: tuple[int, int, int] = (192, 224, 224),
                          tta: bool = False, work_dir: Path | None = None,
                          invocation: str | None = None) -> dict:
    """``nnUNetv2_predict`` (nnU-Net's unchanged CLI, a subprocess) of one generated case of `case_shape` (z, y, x)
    voxels at the preset's spacing, with `preset` as a model folder of random weights: the original against
    ``TUCKER_RANK_RATIO=ratio`` (self-calibrated on the case), interleaved; round 0 is each variant's first run
    (the compressed one from an empty cache), then `rounds` later rounds from the cache. By stage
    (`predict_stages`), with the peak memory of every run; writes whole_run_predict.json and .md to `out_dir`."""
    from .presets import PRESETS, write_preset_model_folder

    out_dir.mkdir(parents=True, exist_ok=True)
    config = TuckerConfig(ratio, policy=policy)
    p = PRESETS[preset]
    records: list[dict] = []
    with contextlib.ExitStack() as stack:
        work = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nnunet_tucker_predict_")))
        folder = write_preset_model_folder(preset, work / "results")
        plans = json.loads((folder / "plans.json").read_text())
        spacing = tuple(plans["configurations"]["3d_fullres"]["spacing"])
        images = work / "images"
        images.mkdir(parents=True, exist_ok=True)
        clinical_ct(images / "case_000_0000.nii.gz", shape=case_shape, spacing=spacing)
        base, compressed, name = _environments(config, nnUNet_results=str(work / "results"), nnUNet_raw=str(work),
                                               nnUNet_preprocessed=str(work))
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        compressed["TUCKER_CACHE_DIR"] = str(cache)
        command = ["nnUNetv2_predict", "-i", str(images), "-d", p.dataset_name, "-c", "3d_fullres", "-f", "0",
                   "-p", p.plans_name, "-device", "cpu", *([] if tta else ["--disable_tta"])]

        def run(env: dict[str, str], variant: str) -> MeasuredRun:
            target = work / "out" / variant.replace(" ", "_")
            shutil.rmtree(target, ignore_errors=True)
            measured = run_measured([*command, "-o", str(target)], env)
            if measured.returncode != 0:
                raise RuntimeError(f"nnUNetv2_predict failed ({measured.returncode}):\n{measured.stderr[-3000:]}")
            return measured

        def record(variant: str, seconds: float, measured: MeasuredRun, timed: bool) -> None:
            round_index = sum(r["variant"] == variant for r in records)
            lines = compression_lines(measured.stderr, {"model": folder.parent.name})
            entry = {"variant": variant, "round": round_index, "run": "first" if round_index == 0 else "later",
                     "seconds": measured.seconds, "cpu_seconds": round(measured.cpu_seconds, 1),
                     "stages": predict_stages(measured.marks, measured.seconds),
                     "compression_seconds": lines["compression_seconds"].get("model"),
                     "profile_seconds": lines["profile"]["seconds"],
                     "peak_rss_mb": round(measured.peak_rss_mb, 1),
                     "peak_tree_mb": None if measured.peak_tree_mb is None else round(measured.peak_tree_mb, 1),
                     "log": [line for line in measured.stderr.splitlines() if line.startswith("nnunet-tucker: ")]}
            records.append(entry)
            logger.info("%s, %s run: %.1f s (%s), peak RSS %.0f MB", variant, entry["run"], measured.seconds,
                        ", ".join(f"{k} {v:.1f}" for k, v in entry["stages"].items()), measured.peak_rss_mb)

        time_interleaved({"original": functools.partial(run, base, "original"),
                          name: functools.partial(run, compressed, name)},
                         torch.device("cpu"), 1 + rounds, 0, on_run=record)
    rows = []
    for run_kind in ("first", "later"):
        for variant in ("original", name):
            chosen = [r for r in records if r["variant"] == variant and r["run"] == run_kind]
            if chosen:
                rows.append({"variant": variant, "run": run_kind, "runs": len(chosen),
                             "seconds": statistics.median(r["seconds"] for r in chosen),
                             "stages": {s: statistics.median(r["stages"][s] for r in chosen) for s in PREDICT_STAGES},
                             "compression_seconds": chosen[0]["compression_seconds"],
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in chosen),
                             "peak_tree_mb": max((r["peak_tree_mb"] or 0.0) for r in chosen) or None})
    for row in rows:
        row["speedup"] = next(r for r in rows if r["run"] == row["run"])["seconds"] / row["seconds"]
    case = "×".join(map(str, case_shape[::-1]))
    title = (f"nnUNetv2_predict, {preset} ({p.description}), one {case} case at "
             f"{'×'.join(map(str, spacing[::-1]))} mm, -device cpu{'' if tta else ' --disable_tta'}")
    head = ["variant", "run", *PREDICT_STAGES, "whole run", "speed-up", "peak RSS", "peak memory, tree (PSS)"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        run_name = row["run"] + (f" (compressed and self-calibrated in {row['compression_seconds']:.1f} s)"
                                 if row["compression_seconds"] else "")
        tree = f"{row['peak_tree_mb'] / 1024:.2f} GB" if row["peak_tree_mb"] else "n/a"
        stages = " | ".join(f"{row['stages'][s]:.1f}" for s in PREDICT_STAGES)
        lines.append(f"| {row['variant']} | {run_name} | {stages} | {row['seconds']:.1f} | {row['speedup']:.2f}x | "
                     f"{row['peak_rss_mb'] / 1024:.2f} GB | {tree} |")
    markdown = "\n".join(lines)
    meta = {"benchmark": invocation, "config": config.to_dict(), "preset": preset, "rounds": rounds,
            "cpus": os.cpu_count(), "torch": torch.__version__, "case_shape_zyx": list(case_shape),
            "spacing_zyx": list(spacing), "tta": tta, "command": " ".join([*command, "-o", "OUT"])}
    (out_dir / "whole_run_predict.md").write_text(markdown + "\n")
    (out_dir / "whole_run_predict.json").write_text(json.dumps({**meta, "summary": rows, "runs": records}, indent=2))
    return {"markdown": markdown, "summary": rows, "runs": records}
