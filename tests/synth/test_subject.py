import nibabel as nib
import numpy as np
import pytest

from qc_pipeline.synth import SynthError, make_subject

WORK_MM = 4.0
VOX = 3.0


def _mk(seed, contrast="T1w", **kw):
    kw.setdefault("work_mm", WORK_MM)
    kw.setdefault("voxel_size", VOX)
    return make_subject(seed, contrast, **kw)


def test_deterministic_per_seed():
    a, ma = _mk(3)
    b, mb = _mk(3)
    c, _ = _mk(4)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert np.allclose(a.affine, b.affine)
    assert ma["tissue_values"] == mb["tissue_values"]
    assert a.shape != c.shape or not np.allclose(np.asarray(a.dataobj), np.asarray(c.dataobj))


@pytest.mark.parametrize("contrast,order", [
    ("T1w", ("wm", "gm", "csf")), ("T2w", ("csf", "gm", "wm")), ("FLAIR", ("gm", "wm", "csf")),
])
def test_contrast_orderings_hold_in_tissue(contrast, order):
    from qc_pipeline.synth import template

    for seed in (1, 2, 3):
        _, meta = _mk(seed, contrast, finalize=False)
        v = meta["tissue_values"]
        assert v[order[0]] > v[order[1]] > v[order[2]]
    # in the image: median over pure-tissue template voxels, looked up at the same
    # world point of the scan (pose and deformation are a few mm/degrees, so most
    # pure voxels stay in their tissue)
    img, meta = make_subject(5, contrast, work_mm=2.0, voxel_size=2.0, site="A",
                             finalize=False, deform_mm=0.0, pose=False)
    model = template.load_head_model(2.0)
    data = np.asarray(img.dataobj)
    inv = np.linalg.inv(img.affine)
    med = {}
    for k in order:
        pts = np.argwhere(getattr(model, k) > 0.95)[::10]
        xyz = model.affine[:3, :3] @ pts.T + model.affine[:3, 3:]
        ijk = np.round(inv[:3, :3] @ xyz + inv[:3, 3:]).astype(int)
        ok = np.all((ijk >= 0) & (ijk < np.array(data.shape)[:, None]), axis=0)
        med[k] = float(np.median(data[tuple(ijk[:, ok])]))
    assert med[order[0]] > med[order[1]] > med[order[2]], med


def test_head_has_skull_and_scalp_outside_brain():
    img, meta = make_subject(11, "T1w", site="A", work_mm=2.0, voxel_size=1.5,
                             finalize=False, return_brain_mask=True, max_voxels=3e6)
    data = np.asarray(img.dataobj)
    brain = np.asarray(meta["brain_mask"].dataobj).astype(bool)
    from scipy import ndimage as ndi
    shell = ndi.binary_dilation(brain, iterations=10) & ~ndi.binary_dilation(brain, iterations=1)
    noise = meta["noise_sigma"]
    wm_level = meta["tissue_values"]["wm"] * meta["intensity_scale"]
    vals = data[shell]
    # scalp/fat is bright, bone is dark: both present around the brain
    assert np.mean(vals > 0.7 * wm_level) > 0.05
    assert np.mean(vals < 0.25 * wm_level) > 0.05
    # far corners are air: only noise
    corner = data[:5, :5, :5]
    assert corner.mean() < 4 * noise


def test_geometry_varies_between_subjects():
    codes, vox = set(), set()
    for seed in range(12):
        img, meta = make_subject(seed, "T1w", work_mm=WORK_MM, max_voxels=2e5, finalize=False)
        codes.add(nib.aff2axcodes(img.affine))
        zooms = np.round(img.header.get_zooms()[:3], 3)
        vox.add(tuple(zooms))
        obl = np.abs(img.affine[:3, :3] / np.asarray(zooms)) 
        if meta["acquisition"]["oblique_deg"] != [0.0, 0.0, 0.0]:
            assert np.sort(obl, axis=0)[-2:-1].max() > 1e-3  # off-axis components
    assert len(codes) >= 3
    assert any(len(set(v)) > 1 for v in vox)  # anisotropic present


def test_dtypes_and_slope():
    seen = {}
    for seed in range(8):
        img, meta = _mk(seed, site="A" if seed % 2 else "C")
        seen[meta["dtype"]] = img
        assert img.get_data_dtype() == np.dtype(meta["dtype"])
    assert "int16" in seen
    assert seen["int16"].dataobj.slope != 1.0


def test_bad_arguments():
    with pytest.raises(SynthError, match="contrast"):
        make_subject(1, "T3w")
    with pytest.raises(SynthError, match="site"):
        make_subject(1, "T1w", site="Z")


def test_cortical_detail_keeps_brain_fraction_and_adds_fine_structure():
    """A single brain's detail: same brain fraction, GM turned to CSF only in cortex,
    and more fine-scale gradient energy than the averaged template (on real heads the
    QC score's ``sharpness`` is far above the template's)."""
    from scipy import ndimage as ndi

    from qc_pipeline.synth import template
    from qc_pipeline.synth.subject import cortical_detail

    model = template.load_head_model(2.0)
    gm, wm, csf = cortical_detail(model, np.random.default_rng(0), sulci=0.9, steepness=5.0)
    assert min(gm.min(), wm.min(), csf.min()) >= 0
    assert np.allclose(gm + wm + csf, model.brain, atol=1e-4)
    # sulci: CSF gained in the cortex, not in deep white matter
    gained = csf - model.csf
    deep_wm = model.wm > 0.95
    cortex = (model.gm > 0.6) & (model.wm < 0.2)
    assert gained[deep_wm].max() < 0.05
    assert np.percentile(gained[cortex], 90) > 0.2

    def fine_energy(g, w, c):
        img = 1.0 * w + 0.65 * g + 0.2 * c
        inside = ndi.binary_erosion(model.brain > 0.5, iterations=3)
        fine = sum(np.square(ndi.sobel(img, axis=a)) for a in range(3))[inside].mean()
        coarse = sum(np.square(ndi.sobel(ndi.gaussian_filter(img, 1.0), axis=a)) for a in range(3))[inside].mean()
        return fine / coarse

    assert fine_energy(gm, wm, csf) > 1.1 * fine_energy(model.gm, model.wm, model.csf)
    # the strength is per subject (different sulci for another random stream) and validated
    gm2, _, _ = cortical_detail(model, np.random.default_rng(1), sulci=0.9, steepness=5.0)
    assert not np.allclose(gm, gm2)
    with pytest.raises(SynthError, match="sulci"):
        cortical_detail(model, np.random.default_rng(0), sulci=1.5, steepness=5.0)
    with pytest.raises(SynthError, match="steepness"):
        cortical_detail(model, np.random.default_rng(0), sulci=0.5, steepness=0.5)


def test_cortex_detail_is_anatomy_and_can_be_turned_off():
    _, m1 = _mk(7, "T1w", finalize=False)
    _, m2 = _mk(7, "T2w", finalize=False)
    assert m1["cortex_detail"] == m2["cortex_detail"]  # same brain in every contrast
    assert 0.6 <= m1["cortex_detail"]["sulci"] <= 1.0
    a, m3 = _mk(7, "T1w", finalize=False, cortex_detail=False)
    b, _ = _mk(7, "T1w", finalize=False)
    assert m3["cortex_detail"] == {"sulci": 0.0, "steepness": 1.0}
    assert not np.allclose(np.asarray(a.dataobj), np.asarray(b.dataobj))
