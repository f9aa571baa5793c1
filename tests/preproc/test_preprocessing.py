"""Preprocessing chain: orientation invariance, z-score, crop/pad, to_native, expected brain mask."""

import numpy as np
import pytest

from qc_pipeline.preproc.chain import PreprocResult, iterative_zscore, preprocess
from qc_pipeline.preproc.geometry import apply_crop_pad, crop_pad_to_grid, to_native

GRID = (80, 96, 80)


@pytest.fixture(scope="module")
def ref(stripped):
    img, _ = stripped
    return preprocess(img, skull_strip="none")


def _onto(r, ref_r, arr, order=1):
    from scipy import ndimage as ndi

    m = np.linalg.inv(r.info.grid_affine) @ ref_r.info.grid_affine
    return ndi.affine_transform(np.asarray(arr, np.float32), m[:3, :3], m[:3, 3], output_shape=ref_r.image.shape,
                                order=order, mode="constant")


# ----------------------------------------------------------------------------- chain basics
def test_preprocess_none_outputs(ref):
    assert isinstance(ref, PreprocResult)
    assert ref.image.shape == GRID and ref.image.dtype == np.float32
    assert ref.brain_mask.dtype == bool and ref.brain_mask is ref.expected_brain_mask
    assert np.all(ref.image[~ref.brain_mask] == 0)
    assert not np.any(ref.signal_brain_mask & ~ref.brain_mask)
    # RAS, 2 mm, world-aligned lattice
    aff = ref.info.grid_affine
    np.testing.assert_allclose(aff[:3, :3], np.diag([2.0, 2.0, 2.0]))
    np.testing.assert_allclose(aff[:3, 3] / 2.0, np.round(aff[:3, 3] / 2.0), atol=1e-6)
    # brain centred in the grid (within 2 voxels)
    idx = np.argwhere(ref.brain_mask)
    centre = (idx.min(0) + idx.max(0)) / 2
    np.testing.assert_allclose(centre, (np.array(GRID) - 1) / 2, atol=2)
    assert 1000 < ref.info.signal_brain_ml < 2200
    d = ref.info.to_dict()
    import json

    json.dumps(d)


def test_preprocess_matches_ground_truth_mask(ref, stripped, geo):
    _, gt = stripped
    g = geo.on_grid(gt, ref.info) >= 0.5
    assert geo.dice(ref.signal_brain_mask, g) > 0.93
    assert np.count_nonzero(ref.brain_mask & g) / g.sum() > 0.98  # expected mask covers the brain
    assert np.count_nonzero(ref.brain_mask & ~g) / g.sum() < 0.12  # and is not much bigger


@pytest.fixture(scope="module")
def lps(stripped, geo):
    nat = geo.reorient_copy(stripped[0], "LPS")
    return nat, preprocess(nat, skull_strip="none")


@pytest.fixture(scope="module")
def oblique(stripped, geo):
    nat = geo.oblique_copy(stripped[0], deg=(12.0, -8.0, 6.0), voxel=1.5)
    return nat, preprocess(nat, skull_strip="none")


@pytest.mark.parametrize("codes", ["LPS", "PIR"])
def test_orientation_invariance_exact(stripped, ref, geo, lps, codes):
    img, _ = stripped
    r = lps[1] if codes == "LPS" else preprocess(geo.reorient_copy(img, codes), skull_strip="none")
    np.testing.assert_allclose(r.info.grid_affine, ref.info.grid_affine, atol=1e-5)
    np.testing.assert_allclose(r.image, ref.image, atol=1e-4)
    assert np.array_equal(r.brain_mask, ref.brain_mask)


def test_orientation_invariance_oblique(ref, geo, oblique):
    r = oblique[1]
    assert r.info.oblique
    b = _onto(r, ref, r.image)
    bm = _onto(r, ref, r.brain_mask, order=0) > 0.5
    inside = ref.signal_brain_mask & bm
    a, bb = ref.image[inside], b[inside]
    assert np.corrcoef(a, bb)[0, 1] > 0.98
    assert np.median(np.abs(a - bb)) < 0.1
    assert geo.dice(ref.brain_mask, bm) > 0.95
    # the grid lands on the same lattice (world positions differ by whole voxels only)
    shift = (r.info.grid_affine[:3, 3] - ref.info.grid_affine[:3, 3]) / 2.0
    np.testing.assert_allclose(shift, np.round(shift), atol=1e-5)


# ----------------------------------------------------------------------------- z-score
def _two_tissue(seed=0, shape=(40, 40, 40)):
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.float32)
    mask = np.zeros(shape, bool)
    mask[5:35, 5:35, 5:35] = True
    vol[mask] = rng.normal(300.0, 40.0, mask.sum())
    vol[~mask] = rng.normal(10.0, 3.0, (~mask).sum())
    return vol, mask


def test_iterative_zscore_mean0_sd1_background0():
    vol, mask = _two_tissue()
    z = iterative_zscore(vol, mask)
    assert np.all(z[~mask] == 0)
    core = z[mask][np.abs(z[mask]) <= 2.0]
    assert abs(z[mask].mean()) < 0.02
    assert abs(core.std() - 1.0) < 0.05 and abs(core.mean()) < 0.02
    # full in-brain sd is slightly above 1 (each pass normalises by the clipped core)
    assert 1.0 < z[mask].std() < 1.4


def test_iterative_zscore_robust_to_bright_blob():
    vol, mask = _two_tissue()
    z_clean, m0, s0 = iterative_zscore(vol, mask, return_stats=True)
    blob = np.zeros_like(mask)
    blob[8:16, 8:16, 8:16] = True  # 512 of 27000 brain voxels, 20x brighter
    dirty = vol.copy()
    dirty[blob] *= 20
    z_dirty, m1, s1 = iterative_zscore(dirty, mask, return_stats=True)
    ok = mask & ~blob
    diff = np.abs(z_dirty[ok] - z_clean[ok])
    assert np.mean(diff) < 0.05 and abs(s1 / s0 - 1) < 0.06 and abs(m1 - m0) < 0.05 * s0
    assert z_dirty[blob].min() > 50  # the blob stays an outlier
    # a single plain z-score is badly distorted by the same blob
    plain = (dirty[mask] - dirty[mask].mean()) / dirty[mask].std()
    plain_clean = (vol[mask] - vol[mask].mean()) / vol[mask].std()
    assert np.mean(np.abs(plain - plain_clean)[ok[mask]]) > 10 * np.mean(diff)


def test_iterative_zscore_passes_change_result():
    vol, mask = _two_tissue()
    z0 = iterative_zscore(vol, mask, n_extra=0)
    z3 = iterative_zscore(vol, mask, n_extra=3)
    assert abs(z0[mask].std() - 1) < 1e-3
    assert z3[mask].std() > z0[mask].std() + 0.05


# ----------------------------------------------------------------------------- crop/pad
def test_crop_pad_bookkeeping():
    vol = np.arange(30 * 20 * 10, dtype=np.float32).reshape(30, 20, 10)
    mask = np.zeros(vol.shape, bool)
    mask[20:28, 2:6, 3:7] = True
    out, crop = crop_pad_to_grid(vol, mask, (16, 16, 16))
    assert out.shape == (16, 16, 16)
    # mask centre (23.5, 3.5, 4.5) sits at the grid centre (7.5)
    assert crop.start == (16, -4, -3)
    assert crop.pad_before == (0, 4, 3) and crop.crop_before == (16, 0, 0)
    i, j, k = 5, 9, 9
    assert out[i, j, k] == vol[i + 16, j - 4, k - 3]
    assert out[0, 0, 0] == 0  # padded
    m2 = apply_crop_pad(mask, crop, fill=False)
    assert m2.sum() == mask.sum()


# ----------------------------------------------------------------------------- to_native
@pytest.mark.parametrize("codes", ["LPS", "oblique"])
def test_to_native_round_trip(lps, oblique, codes):
    nat, r = oblique if codes == "oblique" else lps
    # a ball of radius 5 voxels (10 mm) in grid space, off-centre inside the brain
    gi = np.indices(GRID)
    c = np.array([30, 55, 45])
    blob = ((gi - c[:, None, None, None]) ** 2).sum(0) <= 25
    out = to_native(blob, r.info, nat)
    assert out.shape == nat.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, nat.affine)
    back = np.asarray(out.dataobj) > 0
    wc = np.argwhere(back).mean(0) @ nat.affine[:3, :3].T + nat.affine[:3, 3]
    gc = r.info.grid_affine[:3, :3] @ c + r.info.grid_affine[:3, 3]
    assert np.linalg.norm(wc - gc) < 1.0  # mm
    vol_nat = back.sum() * abs(np.linalg.det(nat.affine[:3, :3]))
    assert abs(vol_nat / (blob.sum() * 8.0) - 1) < 0.15
    # linear maps: a smooth map comes back with the same values at the same places
    emap = np.zeros(GRID, np.float32)
    emap[blob] = 3.0
    m = np.asarray(to_native(emap, r.info, nat, order=1).dataobj)
    assert m.dtype == np.float32 and m.max() == pytest.approx(3.0, abs=1e-4)
    assert m[back].mean() > 2.0


def test_to_native_rejects_wrong_shape(ref, stripped):
    with pytest.raises(ValueError):
        to_native(np.zeros((10, 10, 10), bool), ref.info, stripped[0])
