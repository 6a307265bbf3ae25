"""Build the small demo models shipped with the package: genuine nnU-Net v2 models trained on phantoms.

Everything is done by nnU-Net's own code, so the result is an ordinary nnU-Net model folder:

1. ``synthetic.make_raw_dataset`` writes Dataset990_Phantom into a temporary nnUNet_raw;
2. ``nnUNetv2_plan_and_preprocess`` (run as a subprocess) fingerprints, plans and preprocesses
   ``3d_fullres`` with the variant's planner: nnU-Net's default (``PlainConvUNet``, plans
   nnUNetPlans) or, with ``--resenc``, its residual-encoder preset ``nnUNetPlannerResEncM``
   (``ResidualEncoderUNet`` of ``BasicBlockD``s, 1-3-4-6-6 blocks per encoder stage as planned,
   plans nnUNetResEncUNetMPlans);
3. the 3d_fullres architecture in the plans is narrowed (fewer features per stage) and the batch size
   capped at 2 (the default planner's for this dataset; ResEnc M drops the 5 % cap on the share of
   the dataset a batch covers and plans 16), so that training and inference are quick on a CPU; the
   preprocessed data do not depend on either;
4. a subclass of ``nnUNetTrainer`` (short schedule, AdamW, no mirroring) trains the variant's folds
   in-process on the CPU: about 5 minutes per fold on 2 idle cores (plain: folds 0 and 1; ResEnc:
   fold 0);
5. dataset.json, plans.json and the final checkpoints, stripped of optimizer state and training
   logs and relabelled as trained by 'nnUNetTrainer' (same network builder), are moved to
   ``<out_dir>/Dataset990_Phantom/nnUNetTrainer__<plans>__3d_fullres``.

``out_dir`` is laid out like an nnUNet_results folder, so ``nnUNet_results=<out_dir> nnUNetv2_predict
-d 990 -c 3d_fullres -f 0 1`` (ResEnc: ``-p nnUNetResEncUNetMPlans -f 0``) uses it directly.
``python -m nnunet_tucker.tools.demo_model [--resenc]`` regenerates the shipped copies (see
``demo_model_folder`` and ``resenc_demo_model_folder``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from nnunet_tucker.tools.synthetic import make_raw_dataset

logger = logging.getLogger(__name__)

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID:03d}_Phantom"
CONFIGURATION = "3d_fullres"
SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "data" / "demo_model"


@dataclass(frozen=True)
class Variant:
    """One demo model: the nnU-Net planner that plans it (None: the default), the plans it writes, the cap of
    its features per stage and the folds trained."""

    planner: str | None
    plans_name: str
    features_cap: tuple[int, ...]
    folds: tuple[int, ...]

    @property
    def model_folder_name(self) -> str:
        return f"nnUNetTrainer__{self.plans_name}__{CONFIGURATION}"


# nnU-Net's own plans for the phantoms have features [32, 64, 128, 256, 320] (both planners). Plain: capped
# at [8, 16, 32, 64, 64]. ResEnc M keeps the 1-3-4-6-6 residual blocks it plans per encoder stage; with 64
# features its 12 deepest blocks would hold 80 % of the parameters (12.8 MB per fold), so they are capped at
# 32 too (4.3 MB per fold; those stages run on 4x8x8 and 4x4x4 voxels and add little to the compute).
PLAIN = Variant(None, "nnUNetPlans", (8, 16, 32, 64, 64), (0, 1))
RESENC = Variant("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", (8, 16, 32, 32, 32), (0,))
MODEL_FOLDER_NAME = PLAIN.model_folder_name
RESENC_MODEL_FOLDER_NAME = RESENC.model_folder_name
FEATURES_PER_STAGE_CAP = PLAIN.features_cap
FOLDS = PLAIN.folds
BATCH_SIZE_CAP = 2
# Checkpoint entries nnU-Net's predictor reads, plus the epoch count for the record.
CHECKPOINT_KEYS = ("network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes",
                   "current_epoch")


def demo_model_folder() -> Path:
    """Path of the model folder shipped inside the package (dataset.json, plans.json, fold_0, fold_1)."""
    return SHIPPED_ROOT / DATASET_NAME / MODEL_FOLDER_NAME


def resenc_demo_model_folder() -> Path:
    """Path of the shipped residual-encoder model folder (ResEnc M plans, narrowed; dataset.json, plans.json,
    fold_0): ``nnUNetv2_predict -d 990 -c 3d_fullres -p nnUNetResEncUNetMPlans -f 0``."""
    return SHIPPED_ROOT / DATASET_NAME / RESENC_MODEL_FOLDER_NAME


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, restoring the old values afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _narrow_architecture(plans_file: Path, cap: Sequence[int] = FEATURES_PER_STAGE_CAP) -> list[int]:
    """Cap features_per_stage and the batch size (`BATCH_SIZE_CAP`) of the 3d_fullres plan in place; return the
    new feature counts."""
    plans = json.loads(plans_file.read_text())
    configuration = plans["configurations"][CONFIGURATION]
    configuration["batch_size"] = min(configuration["batch_size"], BATCH_SIZE_CAP)
    arch = configuration["architecture"]
    features = arch["arch_kwargs"]["features_per_stage"]
    if len(features) > len(cap):
        raise RuntimeError(f"nnU-Net planned {len(features)} stages, at most {len(cap)} expected")
    arch["arch_kwargs"]["features_per_stage"] = [
        min(f, c) for f, c in zip(features, cap[:len(features)], strict=True)]
    plans_file.write_text(json.dumps(plans, indent=4))
    return arch["arch_kwargs"]["features_per_stage"]


_CPU = torch.device("cpu")


def _trainer_class(epochs: int, iterations_per_epoch: int, val_iterations_per_epoch: int,
                   lr: float) -> type:
    """nnUNetTrainer with a recipe sized for a few minutes on a CPU.

    Short schedule; AdamW with poly LR decay (as nnU-Net's nnUNetTrainerAdam), which converges in far
    fewer iterations than the default SGD; no mirroring, so left and right organs keep their sides (as
    in TotalSegmentator's nnUNetTrainerNoMirroring; the checkpoint then disables mirroring at inference).
    The architecture is built by the inherited code, so the checkpoints load as plain 'nnUNetTrainer'.
    Built on demand because importing nnU-Net is slow.
    """
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerDemo(nnUNetTrainer):
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = _CPU):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations_per_epoch
            self.num_val_iterations_per_epoch = val_iterations_per_epoch
            self.initial_lr = lr
            self.save_every = epochs + 1  # no intermediate checkpoint_latest.pth

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr,
                                          weight_decay=self.weight_decay, amsgrad=True)
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            rotation, dummy_2d, initial_patch_size, _ = \
                super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            self.inference_allowed_mirroring_axes = None
            return rotation, dummy_2d, initial_patch_size, None

    return nnUNetTrainerDemo


def _train_fold(trainer_class: type, plans_name: str, fold: int) -> list[float]:
    """Train one fold on the CPU (needs the nnUNet_* environment variables); return the last pseudo Dice."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    plans = load_json(str(preprocessed / f"{plans_name}.json"))
    plans["continue_training"] = False  # nnUNetTrainer pops this key
    trainer = trainer_class(plans, CONFIGURATION, fold, load_json(str(preprocessed / "dataset.json")), _CPU)
    trainer.run_training()
    return [float(d) for d in trainer.logger.get_value("dice_per_class_or_region", step=-1)]


def _export(trained_folder: Path, out_folder: Path, folds: Sequence[int]) -> None:
    """Copy dataset.json, plans.json and slimmed final checkpoints of `folds` to ``out_folder``."""
    out_folder.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(trained_folder / name, out_folder / name)
    for fold in folds:
        checkpoint = torch.load(trained_folder / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu",
                                weights_only=False)
        slim = {k: checkpoint[k] for k in CHECKPOINT_KEYS}
        slim["trainer_name"] = "nnUNetTrainer"  # same network builder; a name nnU-Net's inference can find
        slim["network_weights"] = {k: v.float().contiguous() for k, v in slim["network_weights"].items()}
        (out_folder / f"fold_{fold}").mkdir()
        torch.save(slim, out_folder / f"fold_{fold}" / "checkpoint_final.pth")


def build_demo_model(
    out_dir: Path,
    seed: int = 0,
    n_train: int = 16,
    epochs: int = 30,
    iterations_per_epoch: int = 20,
    val_iterations_per_epoch: int = 2,
    lr: float = 2e-3,
    n_proc_da: int = 1,
    overwrite: bool = False,
    features_cap: Sequence[int] | None = None,
    folds: Sequence[int] | None = None,
    variant: Variant = PLAIN,
) -> Path:
    """Generate phantoms, plan, preprocess and train `folds`; return the new model folder.

    The model folder is ``out_dir/Dataset990_Phantom/<variant.model_folder_name>``; `features_cap` and `folds`
    default to the variant's. All intermediate files live in a temporary directory; the finished folder is moved
    into place at the end, replacing an existing one only if ``overwrite``. ``n_proc_da`` is nnU-Net's number of
    data augmentation worker processes (nnUNet_n_proc_DA).
    """
    features_cap = variant.features_cap if features_cap is None else features_cap
    folds = variant.folds if folds is None else folds
    target = Path(out_dir) / DATASET_NAME / variant.model_folder_name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    torch.manual_seed(seed)

    with tempfile.TemporaryDirectory(prefix="nnunet_tucker_demo_") as tmp:
        tmp_path = Path(tmp)
        paths = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        with _environment(**{k: str(v) for k, v in paths.items()}, nnUNet_n_proc_DA=str(n_proc_da)):
            make_raw_dataset(paths["nnUNet_raw"], DATASET_ID, "Phantom", n_train, seed)

            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                 "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "2", "-npfp", "2",
                 "--verify_dataset_integrity", *(["-pl", variant.planner] if variant.planner else [])],
                check=True,
            )
            plans_file = paths["nnUNet_preprocessed"] / DATASET_NAME / f"{variant.plans_name}.json"
            features = _narrow_architecture(plans_file, features_cap)
            logger.info("Planned and preprocessed in %.0f s; features per stage %s",
                        time.perf_counter() - start, features)

            trainer_class = _trainer_class(epochs, iterations_per_epoch, val_iterations_per_epoch, lr)
            for fold in folds:
                start = time.perf_counter()
                dice = _train_fold(trainer_class, variant.plans_name, fold)
                logger.info("Fold %d trained in %.0f s; pseudo Dice per class %s", fold,
                            time.perf_counter() - start, [round(d, 3) for d in dice])

        exported = tmp_path / "export"
        trained = f"{trainer_class.__name__}__{variant.plans_name}__{CONFIGURATION}"
        _export(paths["nnUNet_results"] / DATASET_NAME / trained, exported, folds)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(exported), str(target))
    logger.info("Demo model written to %s", target)
    return target


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: regenerate a shipped demo model (or build one elsewhere with --out-dir)."""
    parser = argparse.ArgumentParser(prog="python -m nnunet_tucker.tools.demo_model",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=SHIPPED_ROOT,
                        help="nnUNet_results-like folder to write into (default: the shipped copy)")
    parser.add_argument("--resenc", action="store_true",
                        help="the residual-encoder model (nnUNetPlannerResEncM) instead of the plain one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training phantoms")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    caps = {name: " ".join(map(str, v.features_cap)) for name, v in (("plain", PLAIN), ("ResEnc", RESENC))}
    parser.add_argument("--features", type=int, nargs="+", help="cap of the features per stage (default: the "
                        f"shipped model's, plain {caps['plain']}, ResEnc {caps['ResEnc']})")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to train (default: plain 0 1, ResEnc 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        build_demo_model(args.out_dir, seed=args.seed, overwrite=args.overwrite, features_cap=args.features,
                         folds=args.folds, variant=RESENC if args.resenc else PLAIN)
    except FileExistsError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
