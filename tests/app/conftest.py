"""Fixtures of the BIDS-App tests (helpers in ``app_testlib``)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")

from app_testlib import MODEL_GRID, MODEL_VOXEL, make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from qc_pipeline.calibrate import write_card_reference
    from qc_pipeline.engine import make_random_model_folder
    from qc_pipeline.qc.score import FEATURES

    folder = make_random_model_folder(tmp_path_factory.mktemp("model") / "t1w", grid=MODEL_GRID,
                                      voxel_size=MODEL_VOXEL, contrast="T1w", seed=0)
    # a QC-score reference (arbitrary centre, unit scale) so that the app writes a qc_score
    write_card_reference(folder, {"features": {
        k: {"median": 0.0, "scale": 1.0, "direction": s.direction, "transform": s.transform,
            "offset": s.offset} for k, s in FEATURES.items()}, "source": "test"})
    return folder


@pytest.fixture()
def dataset(tmp_path) -> dict:
    return make_dataset(tmp_path / "bids")


