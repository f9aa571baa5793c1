"""The ``normative`` schedule: half a sweep, then the model's normal error level as tau_stop."""
import numpy as np
import pytest

from engine_testlib import SHAPE, Oracle, sphere
from qc_pipeline.engine import IterMask3D, ModelCardError, default_card
from qc_pipeline.engine.inference import normative_threshold


def _card(threshold=1.0):
    return {**default_card(SHAPE), "schedule": "normative", "normative": {"threshold": threshold}}


def dice(a, b):
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_normative_finds_a_blob_and_leaves_a_clean_brain_empty(brain_volume):
    clean, brain = brain_volume
    blob = sphere(SHAPE, (22, 17, 20), 5) & brain
    x = clean + 3.0 * blob
    oracle = Oracle(clean, x)
    res = IterMask3D(oracle, _card(), device="cpu").run(x, brain, seed=0)
    assert res.schedule == "normative" and res.fit.path == "normative"
    assert res.tau_stop == 1.0 and res.to_dict()["fit"]["path"] == "normative"
    assert [t for t, _ in res.tau_curve] == [25.0, 50.0]
    assert res.forward_passes == oracle.calls == 3 and res.converged
    assert dice(res.mask, blob) >= 0.9
    ok = IterMask3D(Oracle(clean, clean), _card(), device="cpu").run(clean, brain, seed=0)
    assert ok.anomaly_fraction < 0.005


def test_normative_count_rises_with_the_artifact(brain_volume):
    clean, brain = brain_volume
    blob = sphere(SHAPE, (20, 20, 20), 6) & brain
    counts = []
    for amp in (0.0, 1.5, 3.0):
        x = clean + amp * blob
        counts.append(IterMask3D(Oracle(clean, x), _card(), device="cpu").run(x, brain, seed=0).anomaly_voxels)
    assert counts[0] < counts[1] <= counts[2]


def test_normative_mask_only_shrinks(brain_volume):
    """A voxel unmasked by the refinement does not come back, even when its error rises again."""
    clean, brain = brain_volume
    blob = sphere(SHAPE, (20, 20, 20), 6) & brain
    x = clean + 3.0 * blob
    seen = []

    class Recorder(Oracle):
        def __call__(self, inp):
            seen.append((inp[0, 0] != self.observed).numpy())
            return super().__call__(inp)

    res = IterMask3D(Recorder(clean, x), _card(), device="cpu").run(x, brain, seed=0)
    masks = seen[2:] + [res.mask]  # the refinement's input masks, then the final one
    for before, after in zip(masks, masks[1:]):
        assert not (after & ~before).any()


def test_normative_without_a_threshold_is_a_card_error(brain_volume):
    clean, brain = brain_volume
    card = {**default_card(SHAPE), "schedule": "normative"}
    with pytest.raises(ModelCardError, match="normative_threshold"):
        IterMask3D(Oracle(clean, clean), card, device="cpu").run(clean, brain)


def test_normative_threshold_from_the_card():
    assert normative_threshold({}) is None
    assert normative_threshold({"normative": {"factor": 5.0}}) is None
    cal = {"gamma_calibration": {"median_tau50": 0.2}}
    assert normative_threshold({**cal, "normative": {"factor": 5.0}}) == pytest.approx(1.0)
    assert normative_threshold({**cal, "normative": {"factor": 5.0, "threshold": 0.7}}) == 0.7
    assert np.isfinite(normative_threshold({**cal, "normative": {"factor": 2}}))


def test_shipped_t1w_card_screens_with_the_normative_schedule():
    from qc_pipeline.engine import load_model_card
    from qc_pipeline.engine.modelio import default_model_dir

    card = load_model_card(default_model_dir("T1w"))
    assert card["schedule"] == "normative" and "normative" in card["model_id"]
    level = normative_threshold(card)
    assert level == pytest.approx(card["normative"]["factor"] * card["gamma_calibration"]["median_tau50"])
    assert 0 < level < 10
