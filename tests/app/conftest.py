"""Fixtures of the BIDS-App tests (helpers in ``app_testlib``)."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # app_testlib (importlib mode)

from app_testlib import MODEL_GRID, MODEL_VOXEL, make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from qc_pipeline.engine import make_random_model_folder

    return make_random_model_folder(tmp_path_factory.mktemp("model") / "t1w", grid=MODEL_GRID,
                                    voxel_size=MODEL_VOXEL, contrast="T1w", seed=0)


@pytest.fixture()
def dataset(tmp_path) -> dict:
    return make_dataset(tmp_path / "bids")


