"""The template prior: nilearn's MNI152 brain mask, fitted to a subject's brain mask with a
robust 9-dof (translation, rotation, per-axis scale) fit and warped onto a subject grid."""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage as ndi
from scipy import optimize
from scipy.spatial.transform import Rotation

from ..io import voxel_sizes

__all__ = ["mni_brain_mask", "warp_template", "align_template_prior"]


@functools.lru_cache(maxsize=1)
def mni_brain_mask():
    """nilearn's bundled MNI152 brain mask (2 mm): (bool array, affine)."""
    from nilearn.datasets import load_mni152_brain_mask  # lazy: nilearn import is slow

    img = load_mni152_brain_mask(resolution=2)
    data = np.asarray(img.dataobj) > 0.5
    data = ndi.binary_fill_holes(data)
    return data, np.asarray(img.affine, dtype=float)


@functools.lru_cache(maxsize=1)
def _mni_surface_points(n_points: int = 2500):
    m, aff = mni_brain_mask()
    surf = m & ~ndi.binary_erosion(m)
    idx = np.argwhere(surf).astype(float)
    rng = np.random.default_rng(0)
    if len(idx) > n_points:
        idx = idx[rng.choice(len(idx), n_points, replace=False)]
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    vox_all = np.argwhere(m).astype(float)
    centre = (vox_all @ aff[:3, :3].T + aff[:3, 3]).mean(axis=0)
    cov = np.cov((vox_all @ aff[:3, :3].T).T)
    return world, centre, cov, float(m.sum() * abs(np.linalg.det(aff[:3, :3])))


def _params_to_affine(p, c_tmpl, c_subj):
    """4x4 template-world -> subject-world affine from 9 parameters."""
    t, r, s = p[:3], p[3:6], p[6:9]
    a = Rotation.from_euler("xyz", r).as_matrix() @ np.diag(np.exp(s))
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = c_subj + t - a @ c_tmpl
    return out


def align_template_prior(signal_mask: np.ndarray, affine: np.ndarray, fov: np.ndarray | None = None, *,
                         extra_tissue: bool = False, tissue: np.ndarray | None = None) -> dict:
    """Fit the MNI152 brain mask to a (hole-filled) subject brain mask, robustly.

    9-dof (translation, rotation, per-axis scale) fit of the template's surface points to
    the subject mask's surface. The cost is asymmetric on purpose: a template point
    *inside* the subject mask (brain signal beyond the template surface) pays the full
    squared distance (truncated at 12 mm, then 8 mm), a template point *outside* it (the
    template claims brain where there is no signal: a missing chunk, a blanked top, a
    void) pays at most (3 mm)^2, so missing brain cannot drag the template in. Template
    points outside the field of view pay a small constant. Weak priors keep the scales
    near 0.95 (MNI152 is larger than most brains) and rotations small.

    With ``extra_tissue`` the mask is also expected to hold non-brain (a skull-strip mask
    that spilled into the face or neck): a template point inside the mask then pays no
    more than one outside it, so neither missing brain nor extra tissue drags the fit.

    ``tissue`` (optional, same grid): voxels outside the mask where the scan shows bright
    tissue (scalp fat, marrow, muscle at the brain's own intensity or above). Brain can be
    missing where the scan shows no signal, not where it shows other tissue, so a template
    point on such a voxel pays as one inside the mask does. Without it, a template tilted or
    scaled past the brain into the scalp costs no more than one lying over a missing chunk,
    and the engine marks the scalp it took in as missing brain (``docs/preprocessing.md``).

    Returns a dict with ``affine`` (template world -> subject world, 4x4), ``scales``,
    ``rotation_deg``, ``surface_agreement`` (fraction of in-FOV template surface points
    within 4 mm of the subject surface), ``cost``.
    """
    vs = voxel_sizes(affine)
    m = np.asarray(signal_mask, dtype=bool)
    fov = np.ones_like(m) if fov is None else np.asarray(fov, dtype=bool)
    # surface of the subject mask, not counting faces created by the FOV/array edge
    ero = ndi.binary_erosion(m | ~fov, border_value=1)
    surf = m & ~ero
    if not surf.any():
        surf = m & ~ndi.binary_erosion(m)
    dist = ndi.distance_transform_edt(~surf, sampling=vs).astype(np.float32)
    # where a template point pays in full: inside the mask, and on bright tissue outside it
    full_f = (m if tissue is None else m | np.asarray(tissue, dtype=bool)).astype(np.float32)

    pts, c_t, cov_t, vol_t = _mni_surface_points()
    idx = np.argwhere(m).astype(float)
    world_idx = idx @ affine[:3, :3].T + affine[:3, 3]
    c_s = world_idx.mean(axis=0)
    vol_s = float(m.sum() * np.prod(vs))
    s_prior = np.log(0.95)
    s0 = float(np.clip(np.log(max(vol_s / vol_t, 1e-3)) / 3.0, np.log(0.8), np.log(1.1)))
    inv_aff = np.linalg.inv(affine)
    shape = np.array(m.shape)

    def lookup(p):
        a = _params_to_affine(p, c_t, c_s)
        w = pts @ a[:3, :3].T + a[:3, 3]
        v = w @ inv_aff[:3, :3].T + inv_aff[:3, 3]
        in_fov = np.all((v >= -0.5) & (v <= shape - 0.5), axis=1)
        vi = np.clip(np.round(v).astype(int), 0, shape - 1)
        in_fov &= fov[vi[:, 0], vi[:, 1], vi[:, 2]]
        d = ndi.map_coordinates(dist, v.T, order=1, mode="nearest")
        ins = ndi.map_coordinates(full_f, v.T, order=1, mode="constant") >= 0.5
        return d, in_fov, ins

    def cost(p, cap_in, cap_out):
        d, in_fov, ins = lookup(p)
        c = np.where(ins, np.minimum(d, cap_in) ** 2, np.minimum(d, cap_out) ** 2)
        c = np.where(in_fov, c, (0.5 * cap_out) ** 2)
        reg = 0.5 * np.sum((p[6:9] - s_prior) ** 2) / 0.12**2 + 0.5 * np.sum(p[3:6] ** 2) / 0.35**2
        return float(c.mean()) + 0.3 * reg

    p = np.r_[np.zeros(6), np.full(3, s0)]
    stages = ((6.0, 6.0), (3.0, 3.0)) if extra_tissue else ((12.0, 6.0), (8.0, 3.0))
    for cap_in, cap_out in stages:
        res = optimize.minimize(cost, p, args=(cap_in, cap_out), method="Powell",
                                options={"xtol": 1e-3, "ftol": 1e-4, "maxfev": 4000})
        p = res.x
    d, in_fov, _ = lookup(p)
    agree = float(np.mean(d[in_fov] <= 4.0)) if in_fov.any() else 0.0
    return {
        "affine": _params_to_affine(p, c_t, c_s),
        "params": p,
        "scales": np.exp(p[6:9]),
        "rotation_deg": np.degrees(p[3:6]),
        "surface_agreement": agree,
        "in_fov_fraction": float(in_fov.mean()),
        "cost": float(cost(p, *stages[-1])),
    }


def warp_template(t2s: np.ndarray, out_affine: np.ndarray, out_shape) -> np.ndarray:
    """MNI brain mask warped by ``t2s`` (template->subject world) onto a subject grid."""
    m, aff_t = mni_brain_mask()
    vox = np.linalg.inv(aff_t) @ np.linalg.inv(t2s) @ out_affine
    w = ndi.affine_transform(m.astype(np.float32), vox[:3, :3], vox[:3, 3], output_shape=tuple(out_shape),
                             order=1, mode="constant", cval=0.0, prefilter=False)
    return w >= 0.5
