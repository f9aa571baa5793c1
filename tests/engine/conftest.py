"""Fixtures of the engine tests: small synthetic brains and an oracle reconstructor."""
import os

import pytest
import torch

os.environ.setdefault("NIPYPE_NO_ET", "1")
torch.set_num_threads(1)

from engine_testlib import SHAPE, textured_volume  # noqa: E402


@pytest.fixture
def brain_volume():
    return textured_volume()


@pytest.fixture
def random_model(tmp_path):
    from qc_pipeline.engine import make_random_model_folder

    return make_random_model_folder(tmp_path / "model", grid=SHAPE, features=(4, 8, 16))
