"""Domain-randomised training on the device: the generator's pieces match the app's numpy
ones, batches look like preprocessed scans, training runs and resumes at tiny size."""
import numpy as np
import pytest
import torch

from qc_pipeline.engine import IterMask3D, load_model_card
from qc_pipeline.engine.domainrand import (BANK_CHANNELS, DomainRandConfig, DomainRandomizer, hf_torch,
                                           iterative_zscore_torch, load_bank, training_masks)
from qc_pipeline.engine.errors import InvalidInputError
from qc_pipeline.engine.hf import high_frequency, hf_radius
from qc_pipeline.engine.masks import random_training_mask
from qc_pipeline.engine.train_synth import CHECKPOINT_NAME, train_synthetic
from qc_pipeline.preproc import iterative_zscore

#: a 4 mm model grid over the whole brain (a 2 mm bank, pooled by 2): small and fast
GRID, VOXEL = (40, 48, 40), 4.0


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    from qc_pipeline.synth.bank import build_anatomy_bank, save_bank

    path = save_bank(build_anatomy_bank(voxel_mm=2.0), tmp_path_factory.mktemp("bank") / "bank.npz")
    return load_bank(path)


def _cfg(**kw):
    return DomainRandConfig(grid=GRID, voxel_mm=VOXEL, mask_points=20_000, **kw)


def test_bank_roundtrip_keeps_channels_and_scales(bank):
    assert set(BANK_CHANNELS) <= set(bank) and bank["voxel_mm"] == 2.0
    brain = bank["gm"] + bank["wm"] + bank["csf"]
    assert 0.99 <= brain.max() <= 1.01 and brain.mean() > 0.1
    # distances in mm: the hull distance grows outwards, depth inwards
    assert bank["hull_dist"][brain > 0.9].max() == 0.0 and bank["depth"].max() > 30


def test_load_bank_names_a_file_that_is_not_a_bank(tmp_path):
    np.savez(tmp_path / "x.npz", gm=np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(InvalidInputError, match="not an anatomy bank"):
        load_bank(tmp_path / "x.npz")


def test_hf_torch_is_the_numpy_filter():
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((20, 24, 18)).astype(np.float32)
    r = hf_radius(vol.shape, 2.0)
    ref = high_frequency(vol, voxel_size=2.0)
    got = hf_torch(torch.from_numpy(vol)[None], r)[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_iterative_zscore_torch_is_the_preprocessing_one():
    rng = np.random.default_rng(1)
    vol = rng.gamma(2.0, 1.0, (16, 16, 16)).astype(np.float32)
    stats = np.zeros(vol.shape, bool)
    stats[3:13, 3:13, 3:13] = True
    out = np.zeros(vol.shape, bool)
    out[2:14, 2:14, 2:14] = True
    ref = iterative_zscore(vol, stats, out_mask=out)
    got = iterative_zscore_torch(torch.from_numpy(vol)[None].double(), torch.from_numpy(stats)[None],
                                 torch.from_numpy(out)[None])[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_training_masks_are_clouds_inside_the_brain_like_the_numpy_ones():
    brain = np.zeros((40, 48, 40), bool)
    brain[5:35, 6:42, 5:35] = True
    gen = torch.Generator().manual_seed(0)
    masks = training_masks(torch.from_numpy(brain)[None].repeat(16, 1, 1, 1), gen, voxel_mm=2.0)
    sizes = masks.flatten(1).sum(1).numpy()
    assert masks.shape == (16,) + brain.shape
    assert not (masks.numpy() & ~brain).any() and (sizes > 0).all()
    assert len(set(sizes.tolist())) > 8  # a fresh mask per volume
    ref = [random_training_mask(brain, np.random.default_rng(s), voxel_size=2.0).sum() for s in range(16)]
    # the same distribution of sizes (same recipe; torch vs numpy random streams)
    assert 0.3 < np.median(sizes) / np.median(ref) < 3.0
    with pytest.raises(InvalidInputError, match="empty"):
        training_masks(torch.zeros((1, 8, 8, 8), dtype=torch.bool), gen, voxel_mm=2.0)


def test_batches_look_like_preprocessed_scans(bank):
    gen = DomainRandomizer(bank, _cfg(), seed=3)
    b = gen.sample(3)
    x, brain, hf, mask = b["image"], b["brain"], b["hf"], b["mask"]
    assert x.shape == (3,) + GRID and brain.dtype == torch.bool
    assert float(x[~brain].abs().max()) == 0.0  # zero outside the expected brain
    assert not (mask & ~brain).any() and (mask.flatten(1).sum(1) > 0).all()
    for i in range(3):
        v = x[i][brain[i]]
        core = v[v.abs() <= 2]
        assert abs(float(core.mean())) < 0.3 and 0.6 < float(core.std()) < 1.3
        frac = float(brain[i].float().mean())
        assert 0.15 < frac < 0.6  # the brain fills the grid as preprocessing centres it
    np.testing.assert_allclose(hf[0].numpy(), high_frequency(x[0].numpy(), voxel_size=VOXEL), atol=1e-4)
    # the same seed draws the same heads, another seed other heads
    again = DomainRandomizer(bank, _cfg(), seed=3).sample(3)["image"]
    other = DomainRandomizer(bank, _cfg(), seed=4).sample(3)["image"]
    assert torch.equal(again, x) and not torch.equal(other, x)


def test_contrast_priors_order_the_tissues(bank):
    """Mean z of nearly pure tissue in the orders the priors guarantee: T1w WM > GM > CSF,
    T2w CSF above GM and WM, FLAIR GM and WM above CSF (their GM/WM ranges overlap on purpose)."""
    order = {"T1w": [(2, 0), (0, 3)], "T2w": [(3, 0), (3, 2)], "FLAIR": [(0, 3), (2, 3)]}  # (brighter, darker)
    for contrast, pairs in order.items():
        gen = DomainRandomizer(bank, _cfg(contrast_probs={contrast: 1.0}, p_random_contrast=0.0), seed=5)
        b = gen.sample(3, return_tissue=True)
        for x, m, t in zip(b["image"], b["brain"], b["tissue"]):
            mean = [float(x[m & (t[c] > 0.7)].mean()) for c in range(4)]
            assert all(mean[a] > mean[b] for a, b in pairs), (contrast, mean)


def test_config_rejects_unknown_contrasts_and_voxels(bank):
    with pytest.raises(InvalidInputError, match="contrast_probs"):
        DomainRandomizer(bank, _cfg(contrast_probs={"PD": 1.0}))
    with pytest.raises(InvalidInputError, match="must divide"):
        DomainRandomizer(bank, DomainRandConfig(grid=GRID, voxel_mm=3.0))


def test_train_resume_and_load_at_tiny_size(bank, tmp_path):
    cfg = _cfg(contrast_probs={"T1w": 0.5, "FLAIR": 0.5})
    first = train_synthetic(bank, tmp_path / "m", config=cfg, steps=3, batch_size=2, features=(4, 8),
                            device="cpu", seed=0)
    assert first["start_step"] == 0 and first["steps"] == 3 and first["samples"] == 6
    ck = torch.load(tmp_path / "m" / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    # a checkpoint holds CPU tensors only: a run on any device (GPU or CPU) resumes it
    tensors = [v for v in ck["model"].values()] + [
        t for s in ck["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t)]
    assert all(t.device.type == "cpu" for t in tensors) and ck["step"] == 3
    second = train_synthetic(bank, tmp_path / "m", config=cfg, steps=5, batch_size=2, features=(4, 8),
                             device="cpu", seed=0)
    assert second["start_step"] == 3 and second["steps"] == 5 and second["samples"] == 10
    card = load_model_card(tmp_path / "m")
    assert card["training"]["steps"] == 5 and card["training"]["generator"]["contrast_probs"]["FLAIR"] == 0.5
    assert card["grid"] == list(GRID) and card["voxel_size"] == [VOXEL] * 3
    state = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float16}
    model = IterMask3D.from_folder(tmp_path / "m", device="cpu")
    s = DomainRandomizer(bank, cfg, seed=9).sample(1)
    res = model.run(s["image"][0].numpy(), s["brain"][0].numpy(), voxel_size=(VOXEL,) * 3)
    assert res.forward_passes > 0 and 0.0 <= res.anomaly_fraction <= 1.0
    with pytest.raises(InvalidInputError, match="network"):
        train_synthetic(bank, tmp_path / "m", config=cfg, steps=6, batch_size=2, features=(4, 8, 16),
                        device="cpu")


def test_a_minutes_budget_plans_its_steps(bank, tmp_path):
    res = train_synthetic(bank, tmp_path / "b", config=_cfg(), minutes=0.25, batch_size=1, features=(4, 8),
                          device="cpu")
    assert res["steps"] >= 1 and res["wall_time_s"] < 0.25 * 60 + 30


def test_clean_target_is_the_same_head_without_its_noise(bank, tmp_path):
    cfg = _cfg(noise=(0.05, 0.06), clean_target=True)
    b = DomainRandomizer(bank, cfg, seed=11).sample(2)
    plain = DomainRandomizer(bank, _cfg(noise=(0.05, 0.06)), seed=11).sample(2)
    assert torch.equal(b["image"], plain["image"])  # the option draws nothing of its own
    x, t, m = b["image"], b["target"], b["brain"]
    assert float(t[~m].abs().max()) == 0.0
    diff = (x - t)[m]
    # the difference is noise: small against the tissue contrast, and not the image itself
    assert 0.02 < float(diff.std()) < 0.5 * float(x[m].std())
    res = train_synthetic(bank, tmp_path / "c", config=cfg, steps=2, batch_size=1, features=(4, 8), device="cpu")
    assert res["steps"] == 2
    assert "noise-free" in load_model_card(tmp_path / "c")["training"]["loss"]
