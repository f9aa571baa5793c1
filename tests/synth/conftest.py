"""Fixtures for the synth tests: coarse subjects (4 mm model, 3 mm voxels) keep them fast."""

import pytest




@pytest.fixture(scope="session")
def small_subject():
    from qc_pipeline.synth import make_subject

    return make_subject(11, "T1w", site="A", work_mm=4.0, voxel_size=3.0,
                        finalize=False, return_brain_mask=True)
