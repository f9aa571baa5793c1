import nibabel as nib
import numpy as np
import pytest

from qc_pipeline.synth import ARTIFACTS, PAPER_ARTIFACTS, SynthError, UnknownArtifactError
from qc_pipeline.synth import apply_artifact, head_info


def _run(img, meta, name, sev, seed=0):
    kw = {"meta": meta} if ARTIFACTS[name].needs_meta else {}
    return apply_artifact(img, name, sev, np.random.default_rng(seed), **kw)


def _effect(img, out):
    a = np.asarray(img.dataobj, dtype=np.float64)
    b = np.asarray(out.dataobj, dtype=np.float64)
    if a.shape != b.shape:  # wrap_around: compare the window with the same region
        start = out.extra["artifact"]["start"]
        ax = out.extra["artifact"]["phase_axis"]
        idx = np.arange(start, start + b.shape[ax])
        ok = (idx >= 0) & (idx < a.shape[ax])
        a = np.take(a, idx[ok], axis=ax)
        b = np.take(b, np.nonzero(ok)[0], axis=ax)
    return float(np.mean(np.abs(a - b))) / float(np.percentile(np.abs(a), 99))


def test_registry_has_the_paper_six_and_extras():
    assert set(PAPER_ARTIFACTS) == {"different_sequence", "kspace_noise", "chunk_middle",
                                    "chunk_top", "periodic_line", "ring"}
    for extra in ("motion", "ghosting", "spike", "wrap_around", "susceptibility",
                  "bias_field", "blur"):
        assert extra in ARTIFACTS
    for a in ARTIFACTS.values():
        assert a.draw.__doc__ and len(a.draw.__doc__) > 80, a.name  # definition + params
        assert a.apply.__doc__, a.name


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_changes_image_and_severity_is_monotonic(small_subject, name):
    img, meta = small_subject
    effects = [_effect(img, _run(img, meta, name, s)) for s in (0.25, 0.6, 1.0)]
    assert effects[0] > 1e-4, (name, effects)  # local artifacts (metal) are small on average
    assert effects[0] < effects[1] < effects[2], (name, effects)


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_deterministic_for_a_given_rng(small_subject, name):
    img, meta = small_subject
    a = np.asarray(_run(img, meta, name, 0.7, seed=5).dataobj)
    b = np.asarray(_run(img, meta, name, 0.7, seed=5).dataobj)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["motion", "ghosting", "spike", "bias_field"])
def test_torchio_artifacts_ignore_global_torch_seed(small_subject, name):
    import torch

    img, meta = small_subject
    torch.manual_seed(1)
    a = np.asarray(_run(img, meta, name, 0.7, seed=3).dataobj)
    torch.manual_seed(2)
    b = np.asarray(_run(img, meta, name, 0.7, seed=3).dataobj)
    c = np.asarray(_run(img, meta, name, 0.7, seed=4).dataobj)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_motion_strength_does_not_hang_on_the_drawn_move_times(small_subject):
    """Severity sets how close to the k-space centre the moved lines reach, so no draw of
    the move times leaves a 'motion' scan that differs from the clean one only in its
    noise (the first simulator: 4 of these 8 draws changed the smoothed image by 0.1-0.3 %
    of the bright tissue, the others by 0.5-1.4 %)."""
    from scipy import ndimage as ndi

    img, meta = small_subject
    a = np.asarray(img.dataobj, dtype=np.float64)
    smooth_a, ref = ndi.gaussian_filter(a, 1.0), float(np.percentile(np.abs(a), 99))
    effects = []
    for seed in range(8):
        out = _run(img, meta, "motion", 0.6, seed=seed)
        art = out.extra["artifact"]
        assert min(abs(t - 0.5) for t in art["times"]) == pytest.approx(art["centre_gap"])
        b = np.asarray(out.dataobj, dtype=np.float64)
        effects.append(float(np.mean(np.abs(ndi.gaussian_filter(b, 1.0) - smooth_a))) / ref)
    assert min(effects) > 0.004 and max(effects) < 2 * min(effects), effects


def test_chunk_middle_blanks_a_box_in_the_brain(small_subject):
    img, meta = small_subject
    out = _run(img, meta, "chunk_middle", 0.8)
    info = out.extra["artifact"]
    a, b = np.asarray(img.dataobj), np.asarray(out.dataobj)
    changed = a != b
    assert changed.sum() > 50
    assert np.allclose(b[changed], info["fill"])
    brain = np.asarray(meta["brain_mask"].dataobj).astype(bool)
    assert brain[changed].mean() > 0.9  # the box lies in the brain
    # the box is where the extra says (world coords)
    ijk = np.array(np.nonzero(changed))
    xyz = img.affine[:3, :3] @ ijk + img.affine[:3, 3:]
    lo, hi = np.array(info["box_world_lo"]), np.array(info["box_world_hi"])
    assert np.all(xyz.min(1) >= lo - 1e-3) and np.all(xyz.max(1) <= hi + 1e-3)


def test_chunk_top_removes_the_top(small_subject):
    img, meta = small_subject
    out = _run(img, meta, "chunk_top", 0.8)
    a, b = np.asarray(img.dataobj), np.asarray(out.dataobj)
    changed = a != b
    ijk = np.array(np.nonzero(changed))
    z_changed = (img.affine[:3, :3] @ ijk + img.affine[:3, 3:])[2]
    brain = np.asarray(meta["brain_mask"].dataobj).astype(bool)
    bijk = np.array(np.nonzero(brain))
    z_brain = (img.affine[:3, :3] @ bijk + img.affine[:3, 3:])[2]
    assert brain[changed].sum() > 20  # brain removed too, not only scalp
    assert np.median(z_changed) > np.percentile(z_brain, 85)


def test_wrap_around_puts_signal_in_background(small_subject):
    img, meta = small_subject
    out = _run(img, meta, "wrap_around", 0.8)
    info = out.extra["artifact"]
    ax, start, n = info["phase_axis"], info["start"], out.shape[info["phase_axis"]]
    assert n < img.shape[ax]
    a = np.asarray(img.dataobj)
    b = np.asarray(out.dataobj)
    idx = np.arange(start, start + n)
    ok = (idx >= 0) & (idx < a.shape[ax])
    win = np.take(a, idx[ok], axis=ax)
    bw = np.take(b, np.nonzero(ok)[0], axis=ax)
    hi = head_info(img)
    bg = win < hi.background + 0.1 * hi.ref  # background in the original window
    assert np.sum(bw[bg] > hi.background + 0.2 * hi.ref) > 500
    # the stored position of the window moves with the affine
    assert np.allclose(out.affine[:3, 3], img.affine[:3, 3] + img.affine[:3, ax] * start)


def test_susceptibility_void_and_rim(small_subject):
    img, meta = small_subject
    out = _run(img, meta, "susceptibility", 1.0)
    b = np.asarray(out.dataobj)
    c = np.array(out.extra["artifact"]["centre_world"])
    ijk = np.round(np.linalg.solve(img.affine[:3, :3], c - img.affine[:3, 3])).astype(int)
    hi = head_info(img)
    assert b[tuple(ijk)] < hi.background + 0.1 * hi.ref  # void at the centre


def test_bad_inputs(small_subject):
    img, meta = small_subject
    with pytest.raises(UnknownArtifactError, match="unknown artifact 'nope'"):
        apply_artifact(img, "nope", 0.5, 0)
    with pytest.raises(SynthError, match="severity"):
        apply_artifact(img, "blur", 1.5, 0)
    with pytest.raises(SynthError, match="meta"):
        apply_artifact(img, "different_sequence", 0.5, 0)
    four_d = nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4))
    with pytest.raises(SynthError, match="3D"):
        apply_artifact(four_d, "blur", 0.5, 0)


def test_different_sequence_flips_contrast(small_subject):
    img, meta = small_subject
    out = _run(img, meta, "different_sequence", 1.0)
    assert out.extra["artifact"]["other"] == "T2w"
    brain = np.asarray(meta["brain_mask"].dataobj).astype(bool)
    a, b = np.asarray(img.dataobj), np.asarray(out.dataobj)
    # T2w: CSF-rich ventricles/sulci bright -> brain brighter relative to scalp, and
    # correlation with the T1w image inside the brain is low or negative
    r = np.corrcoef(a[brain], b[brain])[0, 1]
    assert r < 0.5
