"""The brain mask stands for where brain SHOULD be; non-brain input raises NoBrainError.

Measured against the synthetic ground-truth brain (qc_pipeline.synth), on the model grid.
Numbers for several seeds and for deepbet on full heads are in docs/preprocessing.md.
"""
import nibabel as nib
import numpy as np
import pytest

from qc_pipeline.errors import NoBrainError
from qc_pipeline.preproc.chain import preprocess


def _coverage(r, gt, region_native, geo):
    g = geo.on_grid(gt, r.info) >= 0.5
    reg = g & (geo.on_grid(region_native, r.info) >= 0.5)
    return g, reg, np.count_nonzero(r.brain_mask & reg) / reg.sum(), np.count_nonzero(r.signal_brain_mask & reg) / reg.sum()


def test_normal_head_mask_not_much_bigger_than_brain(stripped, geo):
    img, gt = stripped
    r = preprocess(img, skull_strip="none")
    g = geo.on_grid(gt, r.info) >= 0.5
    assert np.count_nonzero(r.brain_mask & g) / g.sum() >= 0.98
    excess = np.count_nonzero(r.brain_mask & ~g) / g.sum()
    assert excess <= 0.12, excess


@pytest.mark.parametrize("where", ["lateral", "top"])
def test_missing_chunk_stays_inside_expected_mask(stripped, geo, where):
    img, gt = stripped
    c = geo.brain_centre_world(gt)
    top = geo.brain_top_world(gt)
    if where == "lateral":  # a 40 mm block at the right side of the brain, reaching its surface
        region = lambda x, y, z: (x - c[0] > 35) & (np.abs(y - c[1]) < 20) & (np.abs(z - c[2] - 5) < 20)
    else:  # the top 20 mm of the brain replaced by background (inside the FOV)
        region = lambda x, y, z: z > top - 20
    bad, sel = geo.blank_region(img, region)
    r = preprocess(bad, skull_strip="none")
    g, reg, cover, sig_cover = _coverage(r, gt, nib.Nifti1Image(sel.astype(np.float32), img.affine), geo)
    assert reg.sum() > 2000
    assert sig_cover < 0.95  # the signal mask loses part of the chunk ...
    assert cover >= 0.90, cover  # ... the expected mask keeps it
    assert np.count_nonzero(r.brain_mask & ~g) / g.sum() <= 0.12


def test_cut_off_fov_top_stays_inside_expected_mask(stripped, geo):
    img, gt = stripped
    cut = geo.cut_fov_top(img, geo.brain_top_world(gt) - 20)
    r = preprocess(cut, skull_strip="none")
    g = geo.on_grid(gt, r.info) >= 0.5
    reg = g & ~r.fov_mask  # true brain outside the scan's field of view
    assert reg.sum() > 2000
    assert np.count_nonzero(r.brain_mask & reg) / reg.sum() >= 0.90
    assert np.all(r.image[reg & r.brain_mask] == r.image[reg & r.brain_mask][0])  # no signal there
    assert any("outside the field of view" in w for w in r.warnings)


def test_skull_strip_mask_that_took_in_air_is_trimmed(head, geo, monkeypatch):
    """A skull-strip network shown a head whose top is blanked can call the empty space brain
    (deepbet does on real heads): the air is left out of the signal mask and the missing
    brain stays inside the expected mask, instead of 'no brain found' for a too-large mask."""
    from nibabel.processing import resample_from_to

    import qc_pipeline.preproc.skullstrip as skullstrip

    img, gt = head
    top = geo.brain_top_world(gt)
    region = lambda x, y, z: z > top - 25  # scalp, skull and the top 25 mm of the brain
    bad, sel = geo.blank_region(img, region)

    def ballooning_strip(lat_img, **kwargs):
        brain = np.asarray(resample_from_to(gt, lat_img, order=0).dataobj) > 0
        above = geo.world_coords(lat_img)[2] > top - 25
        return nib.Nifti1Image((brain | above).astype(np.uint8), lat_img.affine)

    monkeypatch.setattr(skullstrip, "skull_strip", ballooning_strip)
    r = preprocess(bad, skull_strip="deepbet")
    assert any("air around the head" in w for w in r.warnings), r.warnings
    g, reg, cover, sig_cover = _coverage(r, gt, nib.Nifti1Image(sel.astype(np.float32), img.affine), geo)
    assert reg.sum() > 2000
    assert sig_cover < 0.2, sig_cover  # the blanked brain is no signal ...
    assert cover >= 0.90, cover  # ... but brain that should be there
    assert np.count_nonzero(r.signal_brain_mask & ~g) / g.sum() <= 0.15  # no air left in it
    assert np.count_nonzero(r.brain_mask & ~g) / g.sum() <= 0.15


def test_air_in_mask_finds_the_air_and_not_the_brain(head):
    """A brain mask on a clean head holds (almost) no air; grown into the air, the air is found."""
    from qc_pipeline.preproc.masks import AIR_IN_MASK_ML, air_in_mask

    img, gt = head
    data = img.get_fdata(dtype=np.float32)
    m = np.asarray(gt.dataobj) > 0
    voxel_ml = float(np.prod(gt.header.get_zooms()[:3])) / 1e3
    assert np.count_nonzero(air_in_mask(data, m, np.ones_like(m))) * voxel_ml < 0.05 * AIR_IN_MASK_ML
    # the same mask grown into the air around the head: the grown part is found
    grown = np.zeros_like(m)
    grown[:, :, : m.shape[2] // 2] = True
    air = air_in_mask(data, m | grown, np.ones_like(m))
    assert np.count_nonzero(air & m) * voxel_ml < 0.05 * AIR_IN_MASK_ML
    assert np.count_nonzero(air) > 0.3 * np.count_nonzero(grown & (data <= np.percentile(data, 20)))


def test_only_a_thick_body_of_air_makes_a_mask_untrusted():
    """A thin sheet of air-level voxels (CSF and skull in a noisy scan) is not counted; a
    blanked block of the same volume is."""
    from qc_pipeline.preproc.masks import AIR_IN_MASK_ML, thick_air_ml

    sheet = np.zeros((80, 80, 80), bool)
    sheet[5:75, 5:75, 40:42] = True  # 4 mm thick at 2 mm voxels: 78 mL
    block = np.zeros_like(sheet)
    block[20:35, 20:35, 20:35] = True  # 30 mm cube: 27 mL
    assert np.count_nonzero(sheet) * 8e-3 > np.count_nonzero(block) * 8e-3 > AIR_IN_MASK_ML
    assert thick_air_ml(sheet, (2.0, 2.0, 2.0)) < AIR_IN_MASK_ML
    assert thick_air_ml(block, (2.0, 2.0, 2.0)) > AIR_IN_MASK_ML


def _phantom(kind, rng):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-100, -120, -90]
    x, y, z = np.indices((100, 120, 100)) * 2.0 - np.array([100, 120, 100])[:, None, None, None]
    if kind == "cylinder":  # a water phantom, 1.1 L
        d = ((x**2 + y**2 <= 60**2) & (np.abs(z) < 50)) * 100.0
    elif kind == "knee":  # an elongated limb-like blob, 1.4 L
        d = (((x / 45) ** 2 + (y / 55) ** 2 <= 1) & (np.abs(z) < 90)) * 80.0
    elif kind == "ellipsoid":  # brain-sized ellipsoid, 1.45 L: right volume, wrong shape
        d = (((x / 68) ** 2 + (y / 85) ** 2 + (z / 60) ** 2) <= 1) * 100.0
    else:  # noise
        d = rng.random(x.shape) * 100
    d = d + rng.normal(0, 1.0, d.shape) * (d > 0)
    return nib.Nifti1Image(d.astype(np.float32), aff)


@pytest.mark.parametrize("kind", ["cylinder", "knee", "ellipsoid", "noise"])
def test_non_brain_raises_no_brain(kind):
    img = _phantom(kind, np.random.default_rng(0))
    with pytest.raises(NoBrainError, match="no brain found") as err:
        preprocess(img, skull_strip="none", name=f"sub-x_{kind}.nii.gz")
    assert f"sub-x_{kind}.nii.gz" in str(err.value)


def test_unstripped_head_with_none_is_no_brain(head):
    img, _ = head
    with pytest.raises(NoBrainError, match="skull-strip"):
        preprocess(img, skull_strip="none")


def test_template_claims_missing_brain_where_there_is_no_signal_not_where_there_is_tissue():
    """The prior's fit tolerates template points outside the mask (missing brain) only where
    the scan shows no signal: the same flat-topped mask keeps its missing top when the space
    above is dark, and not when the scan shows other tissue there (a brain flatter than the
    template under the scalp, as clinical thick-slice masks are)."""
    from scipy import ndimage as ndi

    from qc_pipeline.preproc.prior import align_template_prior, warp_template

    grid_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    grid_aff[:3, 3] = [-96, -132, -78]
    shape = (96, 112, 96)
    full = warp_template(np.diag([0.9, 0.9, 0.9, 1.0]), grid_aff, shape)
    top = int(np.nonzero(full.any(axis=(0, 1)))[0].max())
    mask = full.copy()
    mask[:, :, top - 7:] = False  # the top 16 mm are not in the mask
    missing = full & ~mask
    above = (ndi.distance_transform_edt(~mask, sampling=2.0) <= 20) & ~mask
    above[:, :, :top - 7] = False
    covered = {}
    for name, tissue in (("dark", None), ("tissue", above)):
        prior = warp_template(align_template_prior(mask, grid_aff, None, tissue=tissue)["affine"], grid_aff, shape)
        covered[name] = np.count_nonzero(prior & missing) / missing.sum()
        assert np.count_nonzero(prior & mask) / mask.sum() >= 0.95
    assert covered["dark"] >= 0.85, covered
    assert covered["tissue"] <= 0.5, covered


def test_an_opening_removes_what_is_thinner_than_its_ball_and_keeps_bodies_whole():
    from qc_pipeline.preproc import open_mask

    m = np.zeros((30, 30, 30), bool)
    body = (np.indices(m.shape) - 10) ** 2
    body = body.sum(0) <= 16                       # a ball of radius 4 voxels
    m |= body
    m[20, 5:25, 20] = True                         # a one-voxel thread
    m[25, 25, 25] = True                           # a speck
    out = open_mask(m, 1)
    assert np.array_equal(out, body)
    assert np.array_equal(open_mask(m, 0), m) and open_mask(m, 0) is not m
