"""Fixtures of the integration tests: the shipped trained demo model in a temporary nnU-Net results
tree (checked byte for byte afterwards) and synthetic test cases."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import MEASURED, folder_digest

from nnunet_tucker.tools.demo_model import DATASET_NAME, MODEL_FOLDER_NAME, demo_model_folder
from nnunet_tucker.tools.synthetic import make_test_cases


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: hand the lines to the controller
        session.config.workeroutput["measured"] = MEASURED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):  # pytest-xdist's controller: a worker has finished
    MEASURED.extend(node.workeroutput.get("measured", []))


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured by the integration tests")
        for line in MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nnunet")


@pytest.fixture(scope="session")
def model_folder(workspace) -> Path:
    """The shipped demo model (or the folder in $NNUNET_TUCKER_TEST_MODEL) as it sits in a user's
    nnUNet_results; checked byte for byte after the session."""
    target = workspace / "results" / DATASET_NAME / MODEL_FOLDER_NAME
    shutil.copytree(os.environ.get("NNUNET_TUCKER_TEST_MODEL") or demo_model_folder(), target)
    before = folder_digest(target)
    yield target
    assert folder_digest(target) == before, "a test modified the user's model folder"


@pytest.fixture(scope="session")
def nnunet_env(workspace, model_folder) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUCKER_")}
    for name in ("raw", "preprocessed"):
        (workspace / name).mkdir(exist_ok=True)
    env.update(
        nnUNet_raw=str(workspace / "raw"),
        nnUNet_preprocessed=str(workspace / "preprocessed"),
        nnUNet_results=str(workspace / "results"),
        TUCKER_CACHE_DIR=str(workspace / "cache"),
        nnUNet_def_n_proc="2",
    )
    return env


@pytest.fixture(scope="session")
def cases(workspace) -> Path:
    """A folder of two synthetic CT inputs; reference labels lie in its sibling 'labels'."""
    images = workspace / "cases" / "images"
    make_test_cases(images, n=2, seed=7)
    return images
