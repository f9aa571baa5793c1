"""Helpers of the engine tests (imported by conftest and the test modules)."""
import numpy as np
import torch

SHAPE = (40, 40, 40)


def ellipsoid_brain(shape=SHAPE, radii=(17, 16, 15)):
    g = np.indices(shape).astype(float)
    c = (np.asarray(shape, dtype=float) - 1) / 2
    d = sum(((g[i] - c[i]) / radii[i]) ** 2 for i in range(3))
    return d <= 1.0


def textured_volume(shape=SHAPE, brain=None, seed=0):
    """A z-scored, brain-like smooth texture inside the brain, 0 outside."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    brain = ellipsoid_brain(shape) if brain is None else brain
    tex = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    tex = (tex - tex[brain].mean()) / tex[brain].std()
    return np.where(brain, tex, 0.0).astype(np.float32), brain


def sphere(shape, centre, radius):
    g = np.indices(shape).astype(float)
    return sum((g[i] - centre[i]) ** 2 for i in range(3)) <= radius ** 2


class Oracle:
    """Stand-in reconstructor that knows the clean volume.

    Unmasked voxels are copied from the input (identity, like a trained network);
    masked voxels (detected as input != test image) are the clean volume plus
    ``sigma`` times the engine's noise fill (an imperfect, but normal-looking,
    inpainting). An anomaly therefore keeps a large error while masked and
    normal tissue a small one.
    """

    def __init__(self, clean, observed, sigma=0.3):
        self.clean = torch.from_numpy(np.asarray(clean, dtype=np.float32))
        self.observed = torch.from_numpy(np.asarray(observed, dtype=np.float32))
        self.sigma = sigma
        self.calls = 0

    def __call__(self, inp):
        self.calls += 1
        x_hat = inp[:, 0]
        masked = x_hat != self.observed
        out = torch.where(masked, self.clean + self.sigma * x_hat, x_hat)
        return out[:, None]


