"""Random training masks (paper 3.5)."""
import numpy as np
import pytest

from engine_testlib import textured_volume
from qc_pipeline.engine import InvalidInputError, noise_fill, random_training_mask


@pytest.fixture(scope="module")
def draws():
    _, brain = textured_volume((48, 48, 48))
    rng = np.random.default_rng(0)
    out = [random_training_mask(brain, rng, voxel_size=(2, 2, 2), n_points=20_000, return_info=True)
           for _ in range(48)]
    return brain, out


def test_masks_stay_inside_brain(draws):
    brain, out = draws
    for mask, _ in out:
        assert mask.dtype == bool and mask.shape == brain.shape
        assert not (mask & ~brain).any()
        assert mask.any()


def test_size_distribution_spans_small_to_most_brain(draws):
    brain, out = draws
    frac = np.array([m.sum() / brain.sum() for m, _ in out])
    factors = np.array([info["factor"] for _, info in out])
    assert frac.min() < 0.02  # small blobs
    assert (frac > 0.5).mean() >= 0.1  # a share of masks covers most of the brain
    assert set(factors) == {2, 4, 8}
    assert 0.1 < (factors == 8).mean() < 0.45 and 0.3 < (factors == 4).mean() < 0.7
    # bigger factor -> bigger masks on average
    assert frac[factors == 8].mean() > frac[factors == 4].mean() > frac[factors == 2].mean()


def test_successive_draws_differ(draws):
    _, out = draws
    masks = [m for m, _ in out[:10]]
    assert all(not np.array_equal(masks[i], masks[i + 1]) for i in range(9))


def test_masks_are_solid_regions(draws):
    from scipy import ndimage

    for mask, info in draws[1][:20]:
        filled = ndimage.binary_fill_holes(mask)
        assert filled.sum() == mask.sum()


def test_seeded_generator_reproduces_and_noise_fill():
    _, brain = textured_volume((32, 32, 32))
    a = random_training_mask(brain, np.random.default_rng(5), n_points=5000)
    b = random_training_mask(brain, np.random.default_rng(5), n_points=5000)
    assert np.array_equal(a, b)
    img = np.ones(brain.shape, np.float32)
    filled = noise_fill(img, a, np.random.default_rng(1))
    assert (filled[~a] == 1).all()
    vals = filled[a]
    assert abs(vals.mean()) < 0.2 and 0.7 < vals.std() < 1.3


def test_empty_brain_is_typed_error():
    with pytest.raises(InvalidInputError):
        random_training_mask(np.zeros((8, 8, 8), bool), 0)
