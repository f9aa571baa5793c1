"""High-frequency filter (paper 3.3)."""
import numpy as np
import pytest

from qc_pipeline.engine import high_frequency, hf_radius, InvalidInputError


def test_smooth_volume_maps_to_about_zero():
    g = np.indices((48, 48, 48)).astype(float)
    smooth = 3.0 + np.sin(2 * np.pi * g[0] / 48) + np.cos(2 * np.pi * 2 * g[1] / 48)
    hf = high_frequency(smooth, voxel_size=(2, 2, 2))
    assert np.abs(hf).max() < 1e-6 * np.abs(smooth).max()


def test_edge_survives():
    vol = np.zeros((48, 48, 48), np.float32)
    vol[:, :, 24:] = 1.0
    hf = high_frequency(vol, voxel_size=(2, 2, 2))
    edge = np.abs(hf[:, :, 22:26]).mean()
    far = np.abs(hf[:, :, 8:14]).mean()
    assert edge > 0.1 and edge > 5 * far


def test_phase_kept_high_frequencies_unchanged():
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((32, 32, 32))
    hf = high_frequency(vol, radius=3)
    spec_in = np.fft.fftshift(np.fft.fftn(vol))
    spec_out = np.fft.fftshift(np.fft.fftn(hf))
    k = np.indices(vol.shape) - 16
    far = (k ** 2).sum(0) > 4 ** 2
    near = (k ** 2).sum(0) <= 3 ** 2
    np.testing.assert_allclose(np.angle(spec_out[far]), np.angle(spec_in[far]), atol=1e-3)
    assert np.abs(spec_out[near]).max() < 1e-3


def test_radius_scales_with_grid_and_voxel_size():
    assert hf_radius((192, 192, 192), (1, 1, 1)) == pytest.approx((15, 15, 15))
    assert hf_radius((96, 96, 96), (2, 2, 2)) == pytest.approx((15, 15, 15))  # same FOV, same cut
    assert hf_radius((96, 96, 96), (1, 1, 1)) == pytest.approx((7.5, 7.5, 7.5))
    assert hf_radius((80, 96, 80), (2, 2, 2)) == pytest.approx((12.5, 15, 12.5))
    # same physical cut-off in cycles/mm on two grids covering the same FOV
    for shape, vs in [((192,) * 3, (1,) * 3), ((80, 96, 80), (2, 2, 2))]:
        r = hf_radius(shape, vs)
        assert [ri / (n * d) for ri, n, d in zip(r, shape, vs)] == pytest.approx([15 / 192] * 3)


def test_anisotropic_grid_uses_ellipsoid():
    # a sinusoid of 0.05 cycles/mm (below the 0.078 cut) vanishes on every axis,
    # one of 0.125 cycles/mm survives, whatever the axis' voxel count
    shape, vs = (40, 80, 40), (2.0, 1.0, 2.0)
    g = np.indices(shape).astype(float) * np.asarray(vs)[:, None, None, None]
    for axis, n_mm in ((0, 80.0), (1, 80.0), (2, 80.0)):
        low = np.sin(2 * np.pi * 4 / n_mm * g[axis])  # 4 cycles over 80 mm = 0.05 c/mm
        high = np.sin(2 * np.pi * 10 / n_mm * g[axis])  # 0.125 c/mm
        assert np.abs(high_frequency(low, voxel_size=vs)).max() < 1e-6
        assert np.abs(high_frequency(high, voxel_size=vs)).max() > 0.9


def test_bad_input_is_typed():
    with pytest.raises(InvalidInputError):
        high_frequency(np.zeros((4, 4)))
    with pytest.raises(InvalidInputError):
        high_frequency(np.full((8, 8, 8), np.nan))
