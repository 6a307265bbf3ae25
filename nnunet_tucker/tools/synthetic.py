"""Synthetic CT-like phantoms with label maps, for tests, demos and the shipped demo model.

Every phantom is a small abdominal CT look-alike in Hounsfield units: air outside an elliptic body
with a subcutaneous fat layer (~-100 HU), a soft-tissue wall (~40 HU), an abdominal cavity of visceral
fat with bowel loops (mottled fluid and soft tissue, some gas) mostly in front, and four labelled
structures whose position, size and shape vary with the seed (smooth, randomly deformed and rotated
ellipsoids):

    1 liver (~60 HU), 2 spleen (~45 HU), 3 kidneys (left and right, ~30 HU), 4 bone (a column of
    vertebra-like blobs, ~400-700 HU).

Each organ sits in a thin fat capsule (as in real CT, where visceral and perirenal fat outline the
organs), the image is smoothed slightly (partial volume) and Gaussian noise is added. Arrays are in
(z, y, x) order; y runs anterior to posterior, x from the patient's right to left (radiological view).

Files are written with SimpleITK as NIfTI in the layouts nnU-Net v2 expects: a raw dataset folder
(``make_raw_dataset``) or a folder of prediction inputs with reference labels (``make_test_cases``).
Training and test phantoms come from disjoint seed ranges.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

logger = logging.getLogger(__name__)

LABELS: dict[str, int] = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "bone": 4}
# 128 x 192 x 192 mm: small enough that the demo model trains in minutes and predicts in seconds on a CPU.
DEFAULT_SHAPE: tuple[int, int, int] = (32, 64, 64)
DEFAULT_SPACING: tuple[float, float, float] = (4.0, 3.0, 3.0)

# Per-case phantom seeds: train case i of dataset seed s uses s * _CASES_PER_SEED + i, test cases add
# _TEST_SEED_OFFSET, so the two ranges never overlap.
_CASES_PER_SEED = 10_000
_TEST_SEED_OFFSET = 1_000_000

AIR_HU = -1000.0
FAT_HU = -100.0
TISSUE_HU = 40.0


def _rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> np.ndarray:
    """Random rotation matrix with angles (about z, y, x) uniform in +-max_deg."""
    a, b, c = (np.deg2rad(rng.uniform(-m, m)) for m in max_deg)
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: np.ndarray) -> np.ndarray:
    """Smooth random field with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="wrap")
    return field / (field.std() + 1e-8)


class _Grid:
    """Voxel-centre coordinates in mm, relative to the volume centre."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=float)
        axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
        self.zz, self.yy, self.xx = np.meshgrid(*axes, indexing="ij", sparse=True)

    def blob(self, rng: np.random.Generator, centre: np.ndarray, semi_axes: np.ndarray,
             deform: float, max_rot_deg: tuple[float, float, float] = (20.0, 10.0, 10.0)) -> np.ndarray:
        """Mask of a rotated ellipsoid (centre, semi-axes in mm, z/y/x) whose surface is deformed smoothly.

        ``deform`` is the relative amplitude of the deformation of the normalised radius.
        """
        rot = _rotation(rng, max_rot_deg)
        d = [self.zz - centre[0], self.yy - centre[1], self.xx - centre[2]]
        # Coordinates along the rotated principal axes, scaled by the semi-axes.
        r2 = sum(((rot[i, 0] * d[0] + rot[i, 1] * d[1] + rot[i, 2] * d[2]) / semi_axes[i]) ** 2
                 for i in range(3))
        # Deformation correlated over about a third of the smallest semi-axis.
        sigma = np.maximum(semi_axes.min() / 3 / self.spacing, 1.0)
        return np.sqrt(r2) < 1.0 + deform * _smooth_field(rng, self.shape, sigma)


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Make one phantom, deterministic given ``seed``.

    Returns (image float32 in HU, labels uint8, spacing) with arrays of ``shape`` (z, y, x) and
    ``spacing`` in mm (z, y, x). Anatomy is laid out in mm, so other shapes/spacings crop or pad it.
    """
    rng = np.random.default_rng(seed)
    grid = _Grid(shape, spacing)
    sp = grid.spacing
    labels = np.zeros(shape, dtype=np.uint8)

    # Body: an elliptic cylinder along z whose outline wobbles smoothly: a subcutaneous fat layer, a
    # muscular wall, and an abdominal cavity of visceral fat with bowel loops, mostly anterior.
    body_c = np.array([0.0, rng.uniform(-6, 6), rng.uniform(-6, 6)])
    body_ax = np.array([1e6, rng.uniform(66, 76), rng.uniform(82, 90)])
    fat, wall = rng.uniform(6, 12), rng.uniform(8, 12)
    body = grid.blob(rng, body_c, body_ax, 0.03, (0.0, 0.0, 0.0))
    inner = grid.blob(rng, body_c, body_ax - fat, 0.03, (0.0, 0.0, 0.0)) & body
    cavity = grid.blob(rng, body_c, body_ax - fat - wall, 0.03, (0.0, 0.0, 0.0)) & inner
    anteriority = (body_c[1] - grid.yy) / body_ax[1]  # 1 at the front skin, -1 at the back
    bowel = cavity & (_smooth_field(rng, shape, 5 / sp) > 0.2 - 2.5 * anteriority)
    gas = bowel & (_smooth_field(rng, shape, 2 / sp) > 1.8)
    image = np.full(shape, AIR_HU)
    image[body] = FAT_HU
    image[inner] = (TISSUE_HU + 8 * _smooth_field(rng, shape, 6 / sp))[inner]  # slowly varying soft tissue
    image[cavity & ~bowel] = FAT_HU + 10
    image[bowel] = (15 + 20 * _smooth_field(rng, shape, 3 / sp))[bowel]
    image[gas] = -700

    y_back = body_c[1] + body_ax[1]  # posterior skin surface, y in mm
    z_len = shape[0] * sp[0]

    def jitter(scale: float) -> float:
        return rng.uniform(-scale, scale)

    # Organs painted in order: later ones win where shapes touch. (label, HU, mask)
    organs: list[tuple[int, float, np.ndarray]] = []
    # Liver: large, on the patient's right (image left), anterior, upper abdomen.
    centre = np.array([0.15 * z_len + jitter(8), body_c[1] - 8 + jitter(6), body_c[2] - 38 + jitter(6)])
    axes = np.array([rng.uniform(42, 55), rng.uniform(38, 46), rng.uniform(38, 46)])
    organs.append((LABELS["liver"], 60 + jitter(6), grid.blob(rng, centre, axes, 0.12)))
    # Spleen: patient's left, posterior-lateral, upper abdomen.
    centre = np.array([0.2 * z_len + jitter(8), y_back - 50 + jitter(6), body_c[2] + 52 + jitter(5)])
    axes = np.array([rng.uniform(30, 38), rng.uniform(22, 28), rng.uniform(15, 19)])
    organs.append((LABELS["spleen"], 45 + jitter(4), grid.blob(rng, centre, axes, 0.12)))
    # Kidneys: both sides of the spine, lower than liver and spleen.
    kidneys = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        centre = np.array([-0.12 * z_len + jitter(8), y_back - 40 + jitter(4),
                           body_c[2] + side * 44 + jitter(4)])
        axes = np.array([rng.uniform(28, 34), rng.uniform(16, 20), rng.uniform(14, 17)])
        kidneys |= grid.blob(rng, centre, axes, 0.1)
    organs.append((LABELS["kidney"], 30 + jitter(4), kidneys))

    for _label, _hu, mask in organs:
        # Fat capsule two voxels thick around each organ (perirenal and visceral fat), inside the wall.
        capsule = ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 1), iterations=2) & inner
        image[capsule] = FAT_HU + 20
    for label, hu, mask in organs:
        mask = mask & inner
        labels[mask] = label
        image[mask] = hu

    # Spine: vertebral bodies and posterior arches, separated by discs, around a spinal canal.
    spine_c = np.array([0.0, y_back - 34 + jitter(3), body_c[2] + jitter(4)])
    column = grid.blob(rng, spine_c + [0, 6, 0], np.array([1e6, 22, 19]), 0.05, (0, 5, 5)) & inner
    image[column & (labels == 0)] = 70  # discs and ligaments
    height, disc = rng.uniform(18, 22), rng.uniform(5, 7)
    bone = np.zeros(shape, dtype=bool)
    for z in np.arange(-z_len / 2 + jitter(height / 2), z_len / 2 + height, height + disc):
        vertebra = grid.blob(rng, spine_c + [z, 0, 0], np.array([height / 2, 12, 15]), 0.05, (5, 5, 5))
        vertebra |= grid.blob(rng, spine_c + [z, 18, 0], np.array([height / 2.5, 10, 14]), 0.08, (5, 5, 5))
        bone |= vertebra & inner
        hu = rng.uniform(400, 550)
        image[vertebra & inner] = hu
        image[vertebra & inner & ~ndimage.binary_erosion(vertebra)] = hu + 150  # denser cortical shell
    canal = grid.blob(rng, spine_c + [0, 13, 0], np.array([1e6, 4.5, 6]), 0.05, (0, 5, 5))
    bone &= ~canal
    image[canal & inner] = 10
    labels[bone] = LABELS["bone"]

    # Partial-volume blur, then scanner noise.
    image = ndimage.gaussian_filter(image, 0.6)
    image += rng.normal(0.0, rng.uniform(15, 25), shape)
    return image.astype(np.float32), labels, tuple(float(s) for s in spacing)


def write_nifti(path: Path | str, array: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Write a (z, y, x) array as NIfTI with ``spacing`` given in mm as (z, y, x)."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK wants (x, y, z)
    sitk.WriteImage(img, str(path), useCompression=True)


def _write_case(image_path: Path, label_path: Path, phantom_seed: int) -> None:
    image, labels, spacing = make_phantom(phantom_seed)
    # CT scanners store integers; int16 halves the file size compared to float32.
    write_nifti(image_path, np.round(image).astype(np.int16), spacing)
    write_nifti(label_path, labels, spacing)


def _check_seed(seed: int, n: int) -> None:
    if not (0 <= seed < _TEST_SEED_OFFSET // _CASES_PER_SEED and 0 <= n <= _CASES_PER_SEED):
        raise ValueError(f"seed must be in [0, {_TEST_SEED_OFFSET // _CASES_PER_SEED}) and n in "
                         f"[0, {_CASES_PER_SEED}], got seed={seed}, n={n}")


def make_raw_dataset(raw_root: Path, dataset_id: int, name: str, n_train: int, seed: int = 0) -> Path:
    """Write ``n_train`` phantoms as nnU-Net v2 raw dataset ``raw_root/DatasetXXX_name``; return its path."""
    _check_seed(seed, n_train)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        case = f"phantom_{i:03d}"
        _write_case(folder / "imagesTr" / f"{case}_0000.nii.gz", folder / "labelsTr" / f"{case}.nii.gz",
                    seed * _CASES_PER_SEED + i)
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "Synthetic CT-like phantoms made by nnunet_tucker.tools.synthetic",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    logger.info("Wrote %d training cases to %s", n_train, folder)
    return folder


def make_test_cases(out_dir: Path, n: int, seed: int) -> list[Path]:
    """Write ``n`` held-out phantoms as nnU-Net inputs ``out_dir/case_XXX_0000.nii.gz``.

    Reference labels go to the sibling folder ``out_dir.parent / "labels"`` as ``case_XXX.nii.gz``
    (outside ``out_dir``, which nnU-Net's predictor must see holding images only). Seeds never overlap
    those of ``make_raw_dataset``. Returns the image paths.
    """
    _check_seed(seed, n)
    out_dir = Path(out_dir)
    label_dir = out_dir.parent / "labels"
    out_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image_path = out_dir / f"case_{i:03d}_0000.nii.gz"
        phantom_seed = _TEST_SEED_OFFSET + seed * _CASES_PER_SEED + i
        _write_case(image_path, label_dir / f"case_{i:03d}.nii.gz", phantom_seed)
        paths.append(image_path)
    logger.info("Wrote %d test cases to %s (labels in %s)", n, out_dir, label_dir)
    return paths
