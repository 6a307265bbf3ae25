"""nnU-Net's predict command on a residual-encoder model: the shipped ResEnc demo model (planned by
nnUNetPlannerResEncM, `ResidualEncoderUNet` of `BasicBlockD`s, trained by nnU-Net's trainer on the phantoms),
uncompressed, then with `TUCKER_RANK_RATIO=0.3` alone (self-calibrated on the first case), then from the cache
(subprocesses)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from helpers import dice_per_class, load_segmentations, log_lines, predict, record

from nnunet_tucker.tools.synthetic import make_test_cases

pytestmark = pytest.mark.integration

PLANS = ("-p", "nnUNetResEncUNetMPlans", "-f", "0")
SUMMARY = "nnunet-tucker: rank_ratio=0.3 policy=profiled: "
RESIDUAL = re.compile(r" convolutions decomposed, (\d+)/(\d+) in residual blocks, ")
# Worst class Dice vs the uncompressed segmentation on these 3 cases, self-calibrated at 0.3: 0.97 to 0.99 over
# repeated runs (each with a fresh device profile, which decides which layers are decomposed); a decomposition
# that is wrong anywhere, or a calibration that misses the residual blocks, gives far less (weights alone: ~0.5).
DICE_MIN = 0.9


@pytest.fixture(scope="module")
def resenc_cases(workspace):
    """Three held-out phantoms (one patch each); reference labels in the sibling 'labels'."""
    images = workspace / "resenc_cases" / "images"
    make_test_cases(images, n=3, seed=9)
    return images


@pytest.fixture(scope="module")
def resenc_baseline(nnunet_env, resenc_model_folder, resenc_cases, workspace):
    out = workspace / "resenc_baseline"
    result = predict(nnunet_env, resenc_cases, out, *PLANS)
    assert not log_lines(result.stderr), result.stderr  # nothing asked, nothing done
    return load_segmentations(out)


@pytest.fixture(scope="module")
def self_calibrated(nnunet_env, resenc_model_folder, resenc_cases, workspace):
    """The first run at ratio 0.3: its segmentations, stderr and report."""
    out, report = workspace / "resenc_0.3", workspace / "resenc_report_0.3.json"
    result = predict(nnunet_env, resenc_cases, out, *PLANS, TUCKER_RANK_RATIO="0.3", TUCKER_REPORT=str(report))
    return load_segmentations(out), result.stderr, json.loads(report.read_text())


def test_resenc_model_segments_the_phantoms(resenc_baseline, resenc_cases):
    scores = dice_per_class(resenc_baseline, load_segmentations(resenc_cases.parent / "labels"))
    record("ResEnc uncompressed vs reference labels", scores)
    assert min(scores.values()) > 0.85, scores


def test_self_calibration_decomposes_the_residual_blocks_and_keeps_the_segmentation(self_calibrated,
                                                                                     resenc_baseline):
    segs, stderr, report = self_calibrated
    lines = [line for line in log_lines(stderr) if line.startswith(SUMMARY)]
    assert len(lines) == 2 and lines[0].startswith(f"{SUMMARY}calibrating on the first case"), stderr
    assert "; self-calibrated on case_000, 2 patch(es); decomposed 1 fold(s) in " in lines[1], stderr
    match = RESIDUAL.search(lines[1])
    assert match and int(match[1]) > 0, stderr
    # the line counts what the report lists: convolutions of BasicBlockD (conv1, conv2, skip) given ranks
    residual = [layer for layer in report["layers"] if layer["in_residual_block"]]
    assert (int(match[1]), int(match[2])) == (sum(layer["ranks"] is not None for layer in residual), len(residual))
    assert all(".blocks." in layer["name"] for layer in residual), [layer["name"] for layer in residual]
    scores = dice_per_class(segs, resenc_baseline)
    record(f"ResEnc ratio 0.3 (profiled, {match[1]}/{match[2]} residual-block convolutions decomposed), "
           "self-calibrated on case_000, vs uncompressed", scores)
    assert min(scores.values()) > DICE_MIN, scores


def test_a_second_run_takes_the_compressed_model_from_the_cache(nnunet_env, resenc_cases, workspace,
                                                                self_calibrated):
    held_out = workspace / "resenc_again"
    held_out.mkdir()
    shutil.copy(resenc_cases / "case_002_0000.nii.gz", held_out)
    result = predict(nnunet_env, held_out, workspace / "resenc_0.3_again", *PLANS, TUCKER_RANK_RATIO="0.3")
    lines = [line for line in log_lines(result.stderr) if line.startswith(SUMMARY)]
    assert len(lines) == 1 and "; self-calibrated on case_000, 2 patch(es), at " in lines[0], result.stderr
    assert ", from the cache; cache hit" in lines[0] and RESIDUAL.search(lines[0]), result.stderr
    again = load_segmentations(workspace / "resenc_0.3_again")
    assert np.array_equal(again["case_002.nii.gz"], self_calibrated[0]["case_002.nii.gz"])
