"""IterMask3D test-time loop: oracle reconstructor, determinism, tiny random model, typed errors."""
import json

import numpy as np
import pytest
import torch

from engine_testlib import SHAPE, Oracle, sphere, textured_volume
from qc_pipeline.engine import (IterMask3D, SCHEDULES, ModelNotFoundError, Result, ShapeMismatchError,
                                InvalidInputError, VoxelSizeMismatchError, default_card,
                                make_random_model_folder)
from qc_pipeline.engine.inference import threshold_at


def dice(a, b):
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("schedule", ["fast", "reference"])
def test_oracle_finds_planted_blob(schedule, brain_volume):
    clean, brain = brain_volume
    blob = sphere(SHAPE, (22, 17, 20), 5) & brain
    x = clean + 3.0 * blob
    oracle = Oracle(clean, x)
    res = IterMask3D(oracle, default_card(SHAPE), device="cpu").run(x, brain, schedule=schedule, seed=0)
    assert isinstance(res, Result)
    assert dice(res.mask, blob) >= 0.9
    assert res.forward_passes == oracle.calls
    assert not (res.mask & ~brain).any()
    if schedule == "reference":
        assert res.forward_passes == 101 + (res.refine_passes - 1)
        assert [t for t, _ in res.tau_curve] == list(np.arange(1.0, 101.0))
    else:
        assert res.forward_passes <= 25
    # the sweep thresholds rise, abruptly at the blob
    taus = np.array([v for _, v in res.tau_curve])
    assert taus[-1] > 1.0 > taus[0]
    assert res.anomaly_fraction == pytest.approx(res.anomaly_voxels / brain.sum())
    assert res.anomaly_mm3 == pytest.approx(res.anomaly_voxels * 8.0)
    assert res.error_map.dtype == np.float32 and (res.error_map[~brain] == 0).all()


@pytest.mark.parametrize("schedule", ["fast", "reference"])
def test_oracle_clean_volume_scores_about_zero(schedule, brain_volume):
    clean, brain = brain_volume
    res = IterMask3D(Oracle(clean, clean), default_card(SHAPE), device="cpu").run(clean, brain, schedule=schedule)
    assert res.anomaly_fraction < 0.005


def test_score_grows_with_anomaly_size(brain_volume):
    clean, brain = brain_volume
    model = IterMask3D(Oracle(clean, clean), default_card(SHAPE), device="cpu")
    scores = []
    for radius in (3, 5, 7):
        blob = sphere(SHAPE, (20, 20, 20), radius) & brain
        x = clean + 3.0 * blob
        model.net = Oracle(clean, x)
        scores.append(model.run(x, brain).anomaly_voxels)
    assert scores[0] < scores[1] < scores[2]


def test_refinement_lets_voxels_reenter(brain_volume):
    """Refinement masks are {error > tau_stop}, not intersected with the previous mask.

    The stand-in network hides half of the blob during the whole sweep (copies it:
    error 0, so those voxels are unmasked); from the first refinement pass on it
    reconstructs the clean tissue there, even though unmasked. Only a refinement
    that lets voxels re-enter the mask recovers the whole blob.
    """
    clean, brain = brain_volume
    blob = sphere(SHAPE, (22, 17, 20), 5) & brain
    x = (clean + 3.0 * blob).astype(np.float32)
    n_sweep = len(SCHEDULES["fast"].sweep_t)  # the hidden half delays the crossing: full sweep
    lower = np.zeros(SHAPE, bool)
    lower[:22] = True
    hidden = torch.from_numpy(lower & blob)

    class Forgetful(Oracle):
        def __call__(self, inp):
            out = super().__call__(inp)
            if self.calls <= n_sweep:
                out[:, 0][:, hidden] = self.observed[hidden]
            else:
                out[:, 0][:, hidden] = self.clean[hidden]
            return out

    res = IterMask3D(Forgetful(clean, x), default_card(SHAPE), device="cpu").run(x, brain, schedule="fast")
    assert len(res.tau_curve) == n_sweep and res.refine_passes >= 1
    assert res.mask[lower & blob].mean() > 0.9
    assert dice(res.mask, blob) >= 0.9


def test_same_seed_same_score_and_seed_matters(random_model):
    clean, brain = textured_volume(SHAPE, seed=3)
    model = IterMask3D.from_folder(random_model, device="cpu")
    a = model.run(clean, brain, seed=7)
    b = model.run(clean, brain, seed=7)
    c = model.run(clean, brain, seed=8)
    assert a.anomaly_voxels == b.anomaly_voxels and a.tau_stop == b.tau_stop
    assert np.array_equal(a.error_map, b.error_map)
    assert not np.array_equal(a.error_map, c.error_map)


def test_run_batch_matches_run(random_model):
    v1, brain = textured_volume(SHAPE, seed=1)
    v2, _ = textured_volume(SHAPE, seed=2)
    model = IterMask3D.from_folder(random_model, device="cpu", batch_size=2)
    batch = model.run_batch([v1, v2], [brain, brain], seed=[0, 1])
    single = [model.run(v1, brain, seed=0), model.run(v2, brain, seed=1)]
    for r_b, r_s in zip(batch, single):
        assert r_b.forward_passes == r_s.forward_passes
        assert r_b.anomaly_voxels == r_s.anomaly_voxels
        np.testing.assert_array_equal(r_b.mask, r_s.mask)
        np.testing.assert_array_equal(r_b.error_map, r_s.error_map)


def test_result_does_not_depend_on_batch_company(random_model):
    """With a fixed micro-batch shape, a scan's passes see the same kernels whether it runs
    alone, first or last in a batch, or beside scans that finish earlier (padding)."""
    vols = [textured_volume(SHAPE, seed=s)[0] for s in (1, 2, 3)]
    _, brain = textured_volume(SHAPE, seed=1)
    blob = sphere(SHAPE, (18, 16, 20), 4) & brain
    vols[2] = vols[2] + 4.0 * blob  # a scan whose loop length differs from the others'
    model = IterMask3D.from_folder(random_model, device="cpu", batch_size=3, micro_batch=2)
    together = model.run_batch(vols, [brain] * 3, seed=[5, 6, 7])
    reordered = model.run_batch(vols[::-1], [brain] * 3, seed=[7, 6, 5])[::-1]
    alone = [model.run(v, brain, seed=s) for v, s in zip(vols, (5, 6, 7))]
    for a, b, c in zip(together, reordered, alone):
        assert a.anomaly_voxels == b.anomaly_voxels == c.anomaly_voxels
        assert a.tau_curve == b.tau_curve == c.tau_curve
        np.testing.assert_array_equal(a.error_map, c.error_map)
        np.testing.assert_array_equal(b.error_map, c.error_map)


def test_kth_threshold_matches_sorted_reference():
    from qc_pipeline.engine.inference import _kth_threshold
    v = np.random.default_rng(3).random(5001).astype(np.float32)
    s = np.sort(v)
    for t in (0, 1, 37.5, 90, 99, 100):
        assert _kth_threshold(torch.from_numpy(v), t) == threshold_at(s, t)


def test_tiny_random_model_end_to_end(random_model):
    clean, brain = textured_volume(SHAPE, seed=4)
    model = IterMask3D.from_folder(random_model, device="auto")
    res = model.run(clean, brain, voxel_size=(2, 2, 2), schedule="fast", seed=0)
    assert 0 < res.forward_passes <= 25
    assert res.mask.shape == SHAPE and res.mask.dtype == bool
    assert 0 <= res.anomaly_voxels <= brain.sum()
    assert np.isfinite(res.mean_error) and res.mean_error >= 0
    assert np.isfinite(res.first_pass_mean_error) and res.first_pass_mean_error > 0
    assert res.fit.path in ("tan", "fallback") and np.isfinite(res.tau_stop)
    assert len(res.tau_curve) >= 4 and res.seconds > 0 and res.schedule == "fast"
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["anomaly_voxels"] == res.anomaly_voxels and d["fit"]["path"] == res.fit.path
    assert "mask" not in d and "error_map" not in d


def test_wrong_grid_raises_shape_mismatch(random_model):
    model = IterMask3D.from_folder(random_model, device="cpu")
    img, brain = textured_volume((32, 40, 40))
    with pytest.raises(ShapeMismatchError, match=r"\(32, 40, 40\).*\(40, 40, 40\)"):
        model.run(img, brain)
    clean, brain40 = textured_volume(SHAPE)
    with pytest.raises(VoxelSizeMismatchError):
        model.run(clean, brain40, voxel_size=(1, 1, 1))
    with pytest.raises(InvalidInputError):
        model.run(np.full(SHAPE, np.nan, np.float32), brain40)
    with pytest.raises(InvalidInputError):
        model.run(clean, np.zeros(SHAPE, bool))


def test_missing_folder_raises_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        IterMask3D.from_folder(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match="no_such_contrast"):
        IterMask3D.from_folder(None, contrast="no_such_contrast")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for generic callers
        IterMask3D.from_folder(tmp_path / "nowhere")


def test_random_model_folder_card(tmp_path):
    from qc_pipeline.engine import load_model_card

    path = make_random_model_folder(tmp_path / "m", grid=(32, 32, 32), voxel_size=(2, 2, 2),
                                    features=(4, 8, 16), contrast="T2w", seed=1)
    card = load_model_card(path)
    assert card["contrast"] == "T2w" and card["grid"] == [32, 32, 32]
    assert card["network"]["features"] == [4, 8, 16]
    assert card["params"] > 0 and card["macs_per_pass"] > 0
    assert card["hf"]["radius"] == pytest.approx([5.0, 5.0, 5.0])  # 15 * 64 mm / 192 mm
    assert (path / "weights.pt").is_file()


def test_threshold_leaves_requested_fraction():
    s = np.sort(np.random.default_rng(0).random(1000))
    for t in (1, 37, 90, 99):
        tau = threshold_at(s, t)
        assert (s > tau).sum() == round(1000 * (100 - t) / 100)
    assert (s > threshold_at(s, 100)).sum() == 0


def test_relative_gamma_is_blind_to_a_global_error_scale(brain_volume):
    """A network that reconstructs every voxel of a scan worse (an unseen scanner: the oracle's
    sigma) scales the whole tau curve. The paper's absolute gamma then cuts early and leaves much
    of a clean brain masked; the relative gamma cuts at the same place, and still finds a blob."""
    clean, brain = brain_volume
    blob = sphere(SHAPE, (22, 17, 20), 5) & brain
    x = clean + 6.0 * blob
    relative = {**default_card(SHAPE), "gamma_mode": "relative", "gamma_relative": 0.5}
    # a systematic error everywhere (masked or not), as a network has on a scanner it never saw
    bias = textured_volume(SHAPE, brain, seed=7)[0] * 0.5

    class Unseen(Oracle):
        def __call__(self, inp):
            return super().__call__(inp) + self.sigma * torch.from_numpy(bias)

    fractions = {}
    for sigma in (0.3, 1.0):
        for name, card in (("absolute", default_card(SHAPE)), ("relative", relative)):
            model = IterMask3D(Unseen(clean, clean, sigma=sigma), card, device="cpu")
            res = model.run(clean, brain, seed=0)
            fractions[name, sigma] = res.anomaly_fraction
            assert res.gamma_mode == name and res.to_dict()["gamma_mode"] == name
            if name == "relative":
                found = IterMask3D(Unseen(clean, x, sigma=sigma), card, device="cpu").run(x, brain, seed=0)
                assert dice(found.mask, blob) >= 0.6
    assert fractions["relative", 0.3] == pytest.approx(fractions["relative", 1.0], abs=1e-3)
    assert fractions["relative", 1.0] < 0.04
    assert fractions["absolute", 1.0] > 3 * fractions["relative", 1.0]


def test_relative_gamma_waits_for_the_reference_point_and_scales_with_tau():
    from qc_pipeline.engine.taufit import relative_gamma

    assert relative_gamma([10.0, 25.0, 40.0], [0.1, 0.2, 0.3], 0.5) == float("inf")
    g = relative_gamma([10.0, 40.0, 60.0], [0.1, 0.3, 0.5], 0.5)
    assert g == pytest.approx(0.5 * 0.4)
    assert relative_gamma([10.0, 40.0, 60.0], [1.0, 3.0, 5.0], 0.5) == pytest.approx(10 * g)


def test_unknown_gamma_mode_is_a_card_error():
    from qc_pipeline.engine import ModelCardError

    with pytest.raises(ModelCardError, match="gamma_mode"):
        IterMask3D(lambda x: x[:, :1], {**default_card(SHAPE), "gamma_mode": "knee"}, device="cpu")


def test_a_bad_scan_in_an_engine_batch_keeps_its_own_error(random_model, caplog):
    """qc_pipeline.screening.engine_batch: the scans the batch can take get engine_step's
    result; one the loop refuses (non-finite voxels) gets its own typed error."""
    from types import SimpleNamespace

    from qc_pipeline.screening import engine_batch, engine_step

    def prep(vol, brain):
        return SimpleNamespace(image=vol, brain_mask=brain,
                               info=SimpleNamespace(voxel_size=(2.0, 2.0, 2.0), grid_affine=None, prior=None))

    v1, brain = textured_volume(SHAPE, seed=1)
    v2, _ = textured_volume(SHAPE, seed=2)
    bad = v2.copy()
    bad[10, 10, 10] = np.nan
    model = IterMask3D.from_folder(random_model, device="cpu", batch_size=3)
    preps = [prep(v1, brain), prep(bad, brain), prep(v2, brain)]
    with caplog.at_level("INFO", logger="qc_pipeline.screening"):
        got = engine_batch(model, preps, schedule="fast", seed=4, names=["a", "b", "c"])
    assert isinstance(got[1], InvalidInputError)
    for k in (0, 2):
        res, _ = got[k]
        alone, _ = engine_step(model, preps[k], schedule="fast", seed=4)
        assert res.anomaly_voxels == alone.anomaly_voxels
        np.testing.assert_array_equal(res.mask, alone.mask)
    assert "screened one by one" in caplog.text
    # the same three scans, all good: one batched pass (no fallback), each scan as alone
    caplog.clear()
    preps[1] = prep(v2 * 0.5, brain)
    with caplog.at_level("INFO", logger="qc_pipeline.screening"):
        got = engine_batch(model, preps, schedule="fast", seed=4)
    assert "screened one by one" not in caplog.text
    alone, _ = engine_step(model, preps[1], schedule="fast", seed=4)
    np.testing.assert_array_equal(got[1][0].error_map, alone.error_map)
