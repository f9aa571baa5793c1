"""Spectral peak of the native image (qc_pipeline.qc.spectrum): k-space spikes; and the line
comb (every p-th k-space line scaled: phase-encode ghosting).

Hand-built heads (a smooth ellipsoid with texture and Rayleigh background noise), the same
head with one k-space spike (a plane wave across the field of view), with a sharp k-space
cut-off (zero-filled reconstruction), a synthetic head with torchio's spike, and degenerate
inputs.
"""
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from qc_pipeline.qc.score import FEATURES, combine, fit_reference, scan_features
from qc_pipeline.qc.spectrum import (SpectralPeak, line_comb, line_energy_profiles, spectral_peak,
                                   spectral_peak_for_image)


def _head(n=48, seed=0, zooms=(1.0, 1.0, 1.0)):
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(n) - n / 2 for _ in range(3)], indexing="ij")
    r = np.sqrt((g[0] / 0.38) ** 2 + (g[1] / 0.45) ** 2 + (g[2] / 0.40) ** 2) / n
    head = ndi.gaussian_filter((r < 1).astype(np.float32), 1.0)
    texture = 1.0 + 0.2 * ndi.gaussian_filter(rng.standard_normal((n, n, n)), 1.5)
    signal = 100.0 * head * texture
    noise = 3.0
    return np.sqrt((signal + noise * rng.standard_normal(signal.shape)) ** 2
                   + (noise * rng.standard_normal(signal.shape)) ** 2).astype(np.float32)


def _with_spike(img, k=(11, -7, 5), amplitude=0.5):
    """Add one k-space spike of ``amplitude`` x the image mean (torchio's model)."""
    g = np.meshgrid(*[np.arange(s) for s in img.shape], indexing="ij")
    phase = 2 * np.pi * sum(kk * gg / s for kk, gg, s in zip(k, g, img.shape))
    return np.abs(img + amplitude * img.mean() * np.cos(phase + 0.3)).astype(np.float32)


@pytest.mark.parametrize("n", [32, 48, 64])
def test_noise_and_clean_heads_read_about_zero_at_any_size(n):
    rng = np.random.default_rng(n)
    assert abs(spectral_peak(rng.rayleigh(1.0, (n, n, n)), (1, 1, 1)).spectral_peak) < 0.4
    sp = spectral_peak(_head(n, seed=n), (1, 1, 1))
    assert sp.available and sp.reason is None
    assert abs(sp.spectral_peak) < 0.5


def test_a_kspace_spike_stands_out_and_its_frequency_is_reported():
    img = _head(48, seed=1)
    clean = spectral_peak(img, (1.0, 1.0, 1.2)).spectral_peak
    sp = spectral_peak(_with_spike(img, k=(11, -7, 5)), (1.0, 1.0, 1.2))
    assert sp.spectral_peak > clean + 1.5 and sp.spectral_peak > 1.5
    # the peak at +-k: (11, -7, 5) cycles per field of view of 48 voxels of (1, 1, 1.2) mm
    want = np.array([11 / 48, -7 / 48, 5 / (48 * 1.2)])
    got = np.array(sp.peak_cycles_per_mm)
    assert np.allclose(got, want, atol=1e-3) or np.allclose(got, -want, atol=1e-3)
    # a weaker spike still counts, less
    weak = spectral_peak(_with_spike(img, amplitude=0.05), (1, 1, 1)).spectral_peak
    assert clean + 0.5 < weak < sp.spectral_peak


def test_a_sharp_kspace_cutoff_counts_far_less_than_a_spike():
    img = _head(48, seed=2)
    k = np.fft.fftshift(np.fft.fftn(img))
    keep = np.zeros(k.shape, bool)
    keep[10:38, 10:38, 10:38] = True  # zero filling beyond 58 % of each axis
    zf = np.abs(np.fft.ifftn(np.fft.ifftshift(np.where(keep, k, 0)))).astype(np.float32)
    cut = spectral_peak(zf, (1, 1, 1)).spectral_peak
    spike = spectral_peak(_with_spike(img), (1, 1, 1)).spectral_peak
    assert cut < 0.5 and spike > cut + 2.0


def test_torchio_spike_on_a_synthetic_head_and_reorientation():
    from qc_pipeline.synth import apply_artifact, make_subject

    img, _ = make_subject(3, "T1w", work_mm=4.0, voxel_size=2.0)
    clean = spectral_peak_for_image(img)
    spiked = spectral_peak_for_image(apply_artifact(img, "spike", 0.8, rng=3))
    assert clean.available and spiked.available
    assert spiked.spectral_peak > clean.spectral_peak + 1.0
    # the measurement is taken on the RAS-reoriented image: a copy stored flipped along x
    # reports the same spike frequency (a stored-array reading would flip its x component
    # against the other two)
    def stored_flipped(im):
        return nib.Nifti1Image(np.asarray(im.dataobj)[::-1], im.affine @ np.array(
            [[-1, 0, 0, im.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))

    spike_img = apply_artifact(img, "spike", 0.8, rng=3)
    again = spectral_peak_for_image(stored_flipped(spike_img))
    assert again.spectral_peak == pytest.approx(spiked.spectral_peak, abs=1e-3)
    f0, f1 = np.array(spiked.peak_cycles_per_mm), np.array(again.peak_cycles_per_mm)
    assert abs(f0[0]) > 0 and np.linalg.norm(f0[1:]) > 0
    assert np.allclose(f1, f0, atol=1e-3) or np.allclose(f1, -f0, atol=1e-3)


@pytest.mark.parametrize("data, zooms, reason", [
    (np.ones((8, 8)), (1, 1, 1), "3D"),
    (np.ones((40, 40, 40, 2)), (1, 1, 1), "3D"),
    (np.ones((10, 40, 40)), (1, 1, 1), "too small"),
    (np.zeros((32, 32, 32)), (1, 1, 1), "all zero"),
    (np.full((32, 32, 32), 7.0), (1, 1, 1), "constant"),
    (np.full((32, 32, 32), np.nan), (1, 1, 1), "NaN"),
    (np.random.default_rng(0).rayleigh(1, (32, 32, 32)), (1, 0, 1), "voxel sizes"),
])
def test_bad_input_is_unavailable_with_a_reason(data, zooms, reason):
    sp = spectral_peak(data, zooms)
    assert not sp.available and reason in sp.reason and sp.spectral_peak is None
    assert sp.to_dict()["available"] is False


def test_image_reader_never_raises_and_a_few_nans_are_tolerated():
    img = _head(32, seed=4)
    img[0, 0, :5] = np.nan  # fewer than 1 %
    sp = spectral_peak_for_image(nib.Nifti1Image(img, np.eye(4)))
    assert sp.available and math.isfinite(sp.spectral_peak)
    four_d = nib.Nifti1Image(np.stack([img, img], -1), np.eye(4))
    assert not spectral_peak_for_image(four_d).available
    assert isinstance(spectral_peak_for_image(object()), SpectralPeak)


def test_qc_score_uses_the_spectral_peak_and_old_references_ignore_it():
    brain = np.zeros((24, 24, 24), bool)
    brain[6:18, 6:18, 6:18] = True
    rng = np.random.default_rng(0)

    def feats(peak):
        sp = {"available": True, "spectral_peak": peak} if peak is not None else {"available": False}
        return scan_features(image_head=None, brain_mask=brain, signal_mask=None, final_mask=None,
                             anomaly_fraction=0.1 * rng.uniform(0.9, 1.1), recon_error=0.2,
                             background=None, spectrum=sp)

    assert "spectral_peak" in FEATURES
    assert feats(None)["spectral_peak"] is None
    ref = fit_reference([feats(p) for p in rng.normal(0.05, 0.05, 20)])
    assert "spectral_peak" in ref["features"]
    assert ref["features"]["spectral_peak"]["transform"] == "identity"
    spike = combine(feats(2.0), ref)
    assert spike.driver == "spectral_peak" and spike.qc_score > 10
    assert combine(feats(0.1), ref).z["spectral_peak"] < 2
    # a model card fitted before the measurement existed: the score leaves it out
    old = {**ref, "features": {k: v for k, v in ref["features"].items() if k != "spectral_peak"}}
    assert "spectral_peak" not in combine(feats(2.0), old).z


def _with_line_comb(img, axis=1, period=3, scale=0.5):
    """Every ``period``-th k-space line along ``axis`` scaled by ``scale`` (torchio's ghosting
    model; the magnitude image is kept)."""
    k = np.fft.fftshift(np.fft.fftn(img))
    sl = [slice(None)] * 3
    sl[axis] = slice(None, None, period)
    centre = [slice(None)] * 3
    n = img.shape[axis]
    centre[axis] = slice(n // 2 - 1, n // 2 + 2)  # the centre restored, as torchio does
    keep = k[tuple(centre)].copy()
    k[tuple(sl)] *= scale
    k[tuple(centre)] = keep
    return np.abs(np.fft.ifftn(np.fft.ifftshift(k))).astype(np.float32)


@pytest.mark.parametrize("shape", [(40, 36, 30), (41, 37, 31)])
def test_line_energy_profiles_are_the_plane_sums_of_the_full_spectrum(shape):
    a = np.random.default_rng(1).random(shape).astype(np.float32)
    power = np.abs(np.fft.fftn(a - a.mean())) ** 2
    for ax, e in enumerate(line_energy_profiles(a)):
        want = power.sum(axis=tuple(b for b in range(3) if b != ax))[: shape[ax] // 2 + 1]
        assert e.shape == want.shape and np.allclose(e, want, rtol=1e-4)


@pytest.mark.parametrize("axis, period", [(0, 2), (1, 3), (2, 5)])
def test_a_line_comb_stands_out_on_its_axis_and_period(axis, period):
    img = _head(64, seed=5)  # 28 lines out to Nyquist: periods up to 5 have 5 lines a class
    clean = spectral_peak(img, (1, 1, 1))
    assert clean.line_comb < 0.15
    sp = spectral_peak(_with_line_comb(img, axis, period, scale=0.5), (1, 1, 1))
    # (the magnitude image mirrors k-space: a comb whose lines are not symmetric about the
    # centre is halved over twice the lines)
    assert sp.line_comb > 0.25 and sp.line_comb > 5 * clean.line_comb
    assert (sp.line_comb_axis, sp.line_comb_period) == (axis, period)
    # a milder comb counts less, but still
    mild = spectral_peak(_with_line_comb(img, axis, period, scale=0.8), (1, 1, 1)).line_comb
    assert 2 * clean.line_comb < mild < sp.line_comb
    # the same image stored flipped: the plane energies are mirror images, the comb the same
    flipped = spectral_peak(_with_line_comb(img, axis, period, scale=0.5)[::-1, :, ::-1], (1, 1, 1))
    assert flipped.line_comb == pytest.approx(sp.line_comb, rel=0.2)


def test_a_sharp_kspace_cutoff_and_a_spike_are_not_a_comb():
    img = _head(48, seed=2)
    k = np.fft.fftshift(np.fft.fftn(img))
    keep = np.zeros(k.shape, bool)
    keep[10:38, 10:38, 10:38] = True
    zf = np.abs(np.fft.ifftn(np.fft.ifftshift(np.where(keep, k, 0)))).astype(np.float32)
    assert spectral_peak(zf, (1, 1, 1)).line_comb < 0.3
    spiked = spectral_peak(_with_spike(img), (1, 1, 1))
    assert spiked.spectral_peak > 1.5 and spiked.line_comb < 0.3
    comb = spectral_peak(_with_line_comb(img, 1, 2), (1, 1, 1)).line_comb
    assert comb > 0.5
    assert line_comb([np.zeros(10), np.ones(3), np.ones(25)]) == (0.0, 0, 2)  # flat or empty: nothing


def test_torchio_ghosting_on_a_synthetic_head_raises_the_comb_and_the_qc_score_reads_it():
    from qc_pipeline.synth import apply_artifact, make_subject

    img, _ = make_subject(4, "T1w", work_mm=4.0, voxel_size=2.0)
    clean = spectral_peak_for_image(img)
    ghost = spectral_peak_for_image(apply_artifact(img, "ghosting", 0.6, rng=4))
    assert clean.line_comb < 0.15 and ghost.line_comb > 0.3
    d = ghost.to_dict()
    assert d["line_comb"] == pytest.approx(ghost.line_comb, abs=1e-4) and d["line_comb_period"] >= 2
    brain = np.zeros((24, 24, 24), bool)
    brain[6:18, 6:18, 6:18] = True
    feats = scan_features(image_head=None, brain_mask=brain, signal_mask=None, final_mask=None,
                          anomaly_fraction=0.1, recon_error=0.2, background=None, spectrum=d)
    assert "line_comb" in FEATURES and feats["line_comb"] == d["line_comb"]


def test_native_measurements_and_when_stored_ones_are_stale():
    from qc_pipeline.qc.background import DEFAULTS
    from qc_pipeline.qc.score import native_measurements, native_measurements_stale

    img = nib.Nifti1Image(_head(32, seed=6), np.eye(4))
    info = native_measurements(img)
    assert set(info) == {"background", "spectrum"} and not native_measurements_stale(info)
    assert not native_measurements_stale(json.loads(json.dumps(info)))  # as a cache stores it
    assert info["spectrum"]["line_comb"] is not None
    old_spectrum = {**info, "spectrum": {k: v for k, v in info["spectrum"].items() if not k.startswith("line_comb")}}
    assert native_measurements_stale(old_spectrum)
    old_params = {k: v for k, v in DEFAULTS.items() if k != "trend_order"}
    assert native_measurements_stale({**info, "background": {**info["background"], "parameters": old_params}})
    assert native_measurements_stale({})
    # odd input: measured as unavailable, not raised
    bad = native_measurements(object())
    assert bad["background"]["available"] is False and bad["spectrum"]["available"] is False
