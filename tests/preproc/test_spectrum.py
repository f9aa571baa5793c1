"""Spectral peak of the native image (qc_pipeline.spectrum): k-space spikes.

Hand-built heads (a smooth ellipsoid with texture and Rayleigh background noise), the same
head with one k-space spike (a plane wave across the field of view), with a sharp k-space
cut-off (zero-filled reconstruction), a synthetic head with torchio's spike, and degenerate
inputs.
"""
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from qc_pipeline.qcscore import FEATURES, combine, fit_reference, scan_features
from qc_pipeline.spectrum import SpectralPeak, spectral_peak, spectral_peak_for_image


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
