"""Domain-randomised training volumes, made on the training device (GPU or CPU).

Real scans differ from any training cohort in anatomy, scanner, resolution and contrast. As
SynthSeg does for segmentation, every training volume here is drawn afresh from tissue maps
(:mod:`qc_pipeline.synth.bank`) with everything a scanner or a person changes randomised, so
that real scans fall inside the training distribution instead of beside it:

* **anatomy**: random affine (rotation, per-axis scale, shear, shift, left-right flip) and a
  smooth random displacement field; grey/white boundary sharpness and CSF-filled sulci drawn
  per subject; deep grey nuclei (grey matter far from the brain's hull) with their own
  intensity; skull, marrow, scalp fat and skin thicknesses drawn per subject;
* **contrast**: every tissue's intensity drawn per subject from a wide per-contrast prior
  (``T1w``, ``T2w``, ``FLAIR``) or, with ``p_random_contrast``, uniformly at random
  (any contrast); slow regional changes of each brain tissue (cerebellum, brainstem and
  cortex are not one intensity in a real scan) and a fine texture;
* **scanner**: bias field, resolution (per-axis blur, thick slices), Rician noise and a
  gamma curve;
* **preprocessing as the app does it**: 2 mm voxels, a brain mask from a random threshold of
  the brain fraction, the "expected brain" mask that closes it and, in random places,
  reaches past it (the aligned template prior does that on real scans), the iterative
  z-score of paper 4.1.1, the high-frequency image (paper 3.3) and a fresh random training
  mask (paper 3.5) per volume.

Everything is torch on one device; one :class:`torch.Generator` drives the randomness.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidInputError

__all__ = ["DomainRandConfig", "DomainRandomizer", "CONTRAST_PRIORS", "hf_torch", "training_masks",
           "iterative_zscore_torch", "BANK_CHANNELS", "BANK_SCALE", "load_bank"]

#: channels of an anatomy bank (built by :mod:`qc_pipeline.synth.bank`)
BANK_CHANNELS = ("gm", "wm", "csf", "depth", "hull_dist", "ext_dist", "fat", "eye", "air", "marrow")
#: stored as uint8: value * scale (fractions x255, millimetres x4, up to 63.75 mm)
BANK_SCALE = {"gm": 255.0, "wm": 255.0, "csf": 255.0, "depth": 4.0, "hull_dist": 4.0, "ext_dist": 4.0}


def load_bank(path) -> dict:
    """Read an anatomy bank ``.npz`` (numpy only: usable on a bare GPU machine)."""
    with np.load(path) as z:
        missing = [c for c in BANK_CHANNELS + ("voxel_mm",) if c not in z.files]
        if missing:
            raise InvalidInputError(f"{path} is not an anatomy bank: it lacks {missing}")
        out = {c: z[c].astype(np.float32) / BANK_SCALE.get(c, 255.0) for c in BANK_CHANNELS}
        out["voxel_mm"] = float(z["voxel_mm"])
    return out

#: Per-contrast tissue intensity priors (uniform ranges, relative to white matter in T1w and
#: FLAIR, to CSF in T2w). Wider than any one scanner: a model trained on them has seen the
#: contrast of a real scan. ``deep`` is the position of deep grey nuclei between grey (0)
#: and white matter (1).
CONTRAST_PRIORS: dict[str, dict[str, tuple[float, float]]] = {
    "T1w": {"wm": (0.85, 1.15), "gm": (0.40, 0.80), "deep": (0.05, 0.75), "csf": (0.03, 0.40),
            "bone": (0.0, 0.12), "marrow": (0.30, 1.0), "muscle": (0.25, 0.65), "fat": (0.7, 1.5),
            "skin": (0.3, 0.8), "eye": (0.05, 0.45), "dura": (0.1, 0.7)},
    "T2w": {"wm": (0.25, 0.55), "gm": (0.45, 0.80), "deep": (-0.3, 0.8), "csf": (0.80, 1.20),
            "bone": (0.0, 0.10), "marrow": (0.25, 0.8), "muscle": (0.15, 0.40), "fat": (0.4, 1.0),
            "skin": (0.2, 0.5), "eye": (0.7, 1.2), "dura": (0.1, 0.6)},
    "FLAIR": {"wm": (0.45, 0.80), "gm": (0.65, 1.00), "deep": (-0.2, 0.7), "csf": (0.0, 0.25),
              "bone": (0.0, 0.10), "marrow": (0.25, 0.8), "muscle": (0.2, 0.5), "fat": (0.4, 1.0),
              "skin": (0.25, 0.6), "eye": (0.0, 0.2), "dura": (0.1, 0.6)},
}
#: the lateral ventricles' centre in the bank canvas's centred millimetres (MNI (0, -10, 15)
#: less the canvas centre (0, -17, 4))
_VENTRICLE_CENTRE = (0.0, 7.0, 11.0)
_TISSUES = ("wm", "gm", "deep", "csf", "bone", "marrow", "muscle", "fat", "skin", "eye", "dura")


@dataclass
class DomainRandConfig:
    """What is randomised, and how widely (written to the model card)."""

    grid: tuple = (80, 96, 80)
    voxel_mm: float = 2.0
    contrast_probs: Mapping[str, float] = field(default_factory=lambda: {"T1w": 1.0})
    p_random_contrast: float = 0.15
    rotation_deg: tuple = (20.0, 10.0, 10.0)
    scale_sd: float = 0.06
    shear: float = 0.04
    shift_mm: tuple = (6.0, 6.0, 3.0)
    flip_p: float = 0.5
    deform_mm: tuple = (0.0, 4.0)
    deform_spacing_mm: float = 24.0
    ventricle_scale: tuple = (-0.05, 0.3)
    steepness: tuple = (1.0, 6.0)
    sulci: tuple = (0.0, 1.0)
    deep_depth_mm: tuple = (10.0, 20.0)
    regional_amp: float = 0.10
    texture: tuple = (0.0, 0.05)
    bias_amp: tuple = (0.0, 0.4)
    resolution_mm: tuple = (0.8, 1.6)
    thick_slice_p: float = 0.2
    thick_slice_mm: tuple = (2.0, 5.0)
    noise: tuple = (0.0, 0.06)
    gamma_sd: float = 0.15
    brain_threshold: tuple = (0.3, 0.65)
    close_vox: int = 3
    prior_overshoot_vox: tuple = (0, 2)
    mask_factors: tuple = (2, 4, 8)
    mask_factor_probs: tuple = (0.25, 0.5, 0.25)
    mask_points: int = 100_000
    mask_eig: tuple = (0.3, 10.0)
    #: also return ``target``: the same head without the scanner's noise (z-scored with the
    #: noisy image's statistics). Training on it teaches the network normal anatomy rather
    #: than to carry noise (and the artifacts that look like it) through from the input.
    clean_target: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["contrast_probs"] = dict(self.contrast_probs)
        d["contrast_priors"] = {c: {t: list(r) for t, r in CONTRAST_PRIORS[c].items()} for c in d["contrast_probs"]}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- pure helpers
def _u(gen, shape, lo, hi, device):
    return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)


def _lowpass_mask(shape, radius, device) -> torch.Tensor:
    """Frequencies (unshifted FFT layout) inside the ellipsoid of ``radius`` index units."""
    axes = []
    for n, r in zip(shape, radius):
        k = torch.fft.fftfreq(n, d=1.0 / n, device=device)
        axes.append((k / float(r)) ** 2)
    d2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    return d2 <= 1.0


def hf_torch(x: torch.Tensor, radius: Sequence[float]) -> torch.Tensor:
    """High-frequency image of a batch ``(B, X, Y, Z)``: the same filter as
    :func:`qc_pipeline.engine.hf.high_frequency` (amplitude zeroed in the ellipsoid of
    ``radius``, phase kept), on the tensor's device."""
    keep = ~_lowpass_mask(x.shape[-3:], radius, x.device)
    spec = torch.fft.fftn(x.double() if x.device.type == "cpu" else x.float(), dim=(-3, -2, -1))
    return torch.fft.ifftn(spec * keep, dim=(-3, -2, -1)).real.float()


def iterative_zscore_torch(img: torch.Tensor, stats_mask: torch.Tensor, out_mask: torch.Tensor,
                           n_extra: int = 3, clip: float = 2.0, return_stats: bool = False):
    """Batched :func:`qc_pipeline.preproc.iterative_zscore` (paper 4.1.1); with
    ``return_stats`` also the per-volume (mean, sd) it divided by."""
    dims = (-3, -2, -1)
    m = stats_mask.float()
    n = m.sum(dims, keepdim=True).clamp_min(2.0)
    mean = (img * m).sum(dims, keepdim=True) / n
    sd = (((img - mean) ** 2) * m).sum(dims, keepdim=True).div(n).sqrt().clamp_min(1e-6)
    for _ in range(int(n_extra)):
        core = m * (((img - mean) / sd).abs() <= clip).float()
        nc = core.sum(dims, keepdim=True).clamp_min(2.0)
        mean = (img * core).sum(dims, keepdim=True) / nc
        sd = (((img - mean) ** 2) * core).sum(dims, keepdim=True).div(nc).sqrt().clamp_min(1e-6)
    out = ((img - mean) / sd) * out_mask.float()
    return (out, mean, sd) if return_stats else out


def _random_rotations(n: int, gen, device) -> torch.Tensor:
    """``n`` uniformly random 3D rotations (QR of Gaussian matrices, sign-fixed)."""
    a = torch.randn((n, 3, 3), generator=gen, device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.det(q)
    q[:, :, 0] *= det.sign().unsqueeze(-1)
    return q.float()


def training_masks(brain: torch.Tensor, gen: torch.Generator, *, voxel_mm: float,
                   factors=(2, 4, 8), factor_probs=(0.25, 0.5, 0.25), n_points: int = 100_000,
                   eig=(0.3, 10.0), reference_voxel_mm: float = 1.0) -> torch.Tensor:
    """One random Gaussian point-cloud mask per brain (paper 3.5), on the brain's device.

    The torch twin of :func:`qc_pipeline.engine.masks.random_training_mask`: centre drawn
    from the brain, covariance ``O diag(l) O^T`` (``l ~ U(eig)``, ``O`` a random rotation),
    ``n_points`` Gaussian points scaled by a factor ``f`` of the paper's 1 mm grid, each
    grown to the block of side ``f`` mm, small holes closed, clipped to the brain.

    Parameters
    ----------
    brain : (B, X, Y, Z) bool tensor
    """
    dev = brain.device
    b, shape = brain.shape[0], brain.shape[1:]
    flat = brain.reshape(b, -1).float()
    if bool((flat.sum(1) == 0).any()):
        raise InvalidInputError("training_masks: a brain mask is empty")
    idx = torch.multinomial(flat, 1, generator=gen).squeeze(1)
    centre = torch.stack(torch.unravel_index(idx, shape), dim=1).float()
    lam = _u(gen, (b, 3), eig[0], eig[1], dev)
    rot = _random_rotations(b, gen, dev)
    chol = rot * lam.sqrt().unsqueeze(1)  # O diag(sqrt l): points = chol @ N(0, I)
    probs = torch.tensor(factor_probs, dtype=torch.float32, device=dev)
    fidx = torch.multinomial(probs.expand(b, -1), 1, generator=gen).squeeze(1)
    f = torch.tensor(factors, dtype=torch.float32, device=dev)[fidx]
    cell = f * reference_voxel_mm / voxel_mm  # one coarse voxel in grid voxels
    out = torch.zeros((b,) + tuple(shape), dtype=torch.bool, device=dev)
    for i in range(b):
        z = torch.randn((n_points, 3), generator=gen, device=dev)
        q = torch.round(centre[i] + (z @ chol[i].T) * cell[i]).long()
        ok = ((q >= 0) & (q < torch.tensor(shape, device=dev))).all(1)
        q = q[ok]
        vol = torch.zeros(tuple(shape), dtype=torch.float32, device=dev)
        vol[q[:, 0], q[:, 1], q[:, 2]] = 1.0
        side = max(1, int(round(float(cell[i]))))
        v = vol[None, None]
        if side > 1:  # the block a coarse voxel becomes (even sides padded on one end)
            lo, hi = (side - 1) // 2, side // 2
            v = F.max_pool3d(F.pad(v, (lo, hi, lo, hi, lo, hi)), side, stride=1)
        # close small holes (a 3-voxel closing; a cloud of 100k points has no large ones)
        v = F.max_pool3d(v, 3, stride=1, padding=1)
        v = -F.max_pool3d(-v, 3, stride=1, padding=1)
        out[i] = v[0, 0] > 0.5
    return out & brain


# ----------------------------------------------------------------------------- generator
class DomainRandomizer:
    """Draws batches of training volumes from an anatomy bank on one device.

    Parameters
    ----------
    bank : dict of (X, Y, Z) float arrays (:func:`qc_pipeline.synth.bank.load_bank`) with
        ``voxel_mm``; its voxel must divide the model voxel (1 mm bank for a 2 mm model).
    config : DomainRandConfig
    device : torch.device or str
    seed : int
    """

    def __init__(self, bank: Mapping, config: DomainRandConfig | None = None, *, device="cpu",
                 seed: int = 0):
        self.cfg = config or DomainRandConfig()
        self.device = torch.device(device)
        self.bank_mm = float(bank["voxel_mm"])
        factor = self.cfg.voxel_mm / self.bank_mm
        if abs(factor - round(factor)) > 1e-6 or round(factor) < 1:
            raise InvalidInputError(
                f"the bank's voxel ({self.bank_mm} mm) must divide the model voxel ({self.cfg.voxel_mm} mm)")
        self.pool = int(round(factor))
        self.channels = BANK_CHANNELS
        vols = np.stack([np.asarray(bank[c], np.float32) for c in BANK_CHANNELS])
        self.bank = torch.from_numpy(vols).to(self.device)[None]  # (1, C, X, Y, Z)
        self.work_shape = tuple(int(g) * self.pool for g in self.cfg.grid)
        probs = {k: float(v) for k, v in self.cfg.contrast_probs.items() if float(v) > 0}
        bad = [k for k in probs if k not in CONTRAST_PRIORS]
        if bad or not probs:
            raise InvalidInputError(f"contrast_probs must weight some of {sorted(CONTRAST_PRIORS)}, got {dict(self.cfg.contrast_probs)}")
        self.contrasts = list(probs)
        self.contrast_p = torch.tensor([probs[k] for k in self.contrasts], device=self.device)
        self.gen = torch.Generator(device=self.device)
        self.reseed(seed)
        from .hf import hf_radius

        self.hf_radius = hf_radius(self.cfg.grid, (self.cfg.voxel_mm,) * 3)

    def reseed(self, seed: int) -> None:
        self.gen.manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)

    # -- pieces
    def _rand(self, shape, lo, hi):
        return _u(self.gen, shape, lo, hi, self.device)

    def _smooth(self, b: int, coarse: Sequence[int], shape: Sequence[int], channels: int = 1):
        c = torch.randn((b, channels) + tuple(coarse), generator=self.gen, device=self.device)
        return F.interpolate(c, size=tuple(shape), mode="trilinear", align_corners=True)

    def _gauss_fft(self, x: torch.Tensor, sigma_vox: torch.Tensor) -> torch.Tensor:
        """Per-sample Gaussian blur of ``x`` (B, X, Y, Z) with per-axis sigmas (B, 3), via FFT."""
        shape = x.shape[-3:]
        spec = torch.fft.rfftn(x, dim=(-3, -2, -1))
        filt = None
        for a, n in enumerate(shape):
            fr = torch.fft.rfftfreq(n, device=x.device) if a == 2 else torch.fft.fftfreq(n, device=x.device)
            g = torch.exp(-2.0 * math.pi ** 2 * (sigma_vox[:, a:a + 1] ** 2) * fr[None] ** 2)
            view = [x.shape[0], 1, 1, 1]
            view[a + 1] = fr.numel()
            g = g.reshape(view)
            filt = g if filt is None else filt * g
        return torch.fft.irfftn(spec * filt, s=shape, dim=(-3, -2, -1))

    def _sampling_grid(self, b: int) -> torch.Tensor:
        cfg, dev = self.cfg, self.device
        out = self.work_shape
        src = self.bank.shape[-3:]
        axes = [(torch.arange(n, device=dev, dtype=torch.float32) - (n - 1) / 2.0) * self.bank_mm for n in out]
        pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # mm, centred
        ang = self._rand((b, 3), -1.0, 1.0) * torch.tensor(cfg.rotation_deg, device=dev) * math.pi / 180
        ca, sa = torch.cos(ang), torch.sin(ang)
        one, zero = torch.ones(b, device=dev), torch.zeros(b, device=dev)
        rx = torch.stack([one, zero, zero, zero, ca[:, 0], -sa[:, 0], zero, sa[:, 0], ca[:, 0]], 1).reshape(b, 3, 3)
        ry = torch.stack([ca[:, 1], zero, sa[:, 1], zero, one, zero, -sa[:, 1], zero, ca[:, 1]], 1).reshape(b, 3, 3)
        rz = torch.stack([ca[:, 2], -sa[:, 2], zero, sa[:, 2], ca[:, 2], zero, zero, zero, one], 1).reshape(b, 3, 3)
        scale = torch.exp(torch.randn((b, 3), generator=self.gen, device=dev) * cfg.scale_sd)
        shear = torch.eye(3, device=dev).repeat(b, 1, 1) + self._rand((b, 3, 3), -cfg.shear, cfg.shear) * (1 - torch.eye(3, device=dev))
        flip = torch.where(torch.rand(b, generator=self.gen, device=dev) < cfg.flip_p, -1.0, 1.0)
        a = rx @ ry @ rz @ shear @ torch.diag_embed(scale)
        a[:, :, 0] *= flip[:, None]
        shift = self._rand((b, 3), -1.0, 1.0) * torch.tensor(cfg.shift_mm, device=dev)
        coords = torch.einsum("bij,nj->bni", a, pts) + shift[:, None]
        coarse = [max(3, int(math.ceil(n * self.bank_mm / cfg.deform_spacing_mm)) + 1) for n in out]
        amp = self._rand((b, 1, 1, 1, 1), *cfg.deform_mm)
        disp = self._smooth(b, coarse, out, channels=3) * amp  # mm
        coords = coords + disp.permute(0, 2, 3, 4, 1).reshape(b, -1, 3)
        # ventricles and the deep brain grow or shrink about the ventricles' centre (ageing,
        # atrophy): a radial displacement that fades out over ~3 cm
        vc = torch.tensor(_VENTRICLE_CENTRE, device=dev)
        rel = coords - vc
        fade = torch.exp(-(rel ** 2).sum(-1, keepdim=True) / (2 * 30.0 ** 2))
        coords = coords - self._rand((b, 1, 1), *cfg.ventricle_scale) * rel * fade
        half = torch.tensor([(n - 1) / 2.0 * self.bank_mm for n in src], device=dev)
        norm = coords / half  # align_corners=True: -1/+1 are the first/last voxel centres
        # grid_sample wants (x, y, z) = (last, middle, first) axis order
        return norm.flip(-1).reshape((b,) + tuple(out) + (3,))

    def _draw_values(self, b: int) -> dict[str, torch.Tensor]:
        dev = self.device
        which = torch.multinomial(self.contrast_p.expand(b, -1), 1, generator=self.gen).squeeze(1)
        rand_c = torch.rand(b, generator=self.gen, device=dev) < self.cfg.p_random_contrast
        vals = {}
        for t in _TISSUES:
            lo = torch.tensor([CONTRAST_PRIORS[c][t][0] for c in self.contrasts], device=dev)[which]
            hi = torch.tensor([CONTRAST_PRIORS[c][t][1] for c in self.contrasts], device=dev)[which]
            v = lo + (hi - lo) * torch.rand(b, generator=self.gen, device=dev)
            r = torch.rand(b, generator=self.gen, device=dev) * 1.2
            vals[t] = torch.where(rand_c, r, v)
        # deep grey nuclei sit between grey and white matter (a position, not an intensity)
        vals["deep"] = vals["gm"] + vals["deep"].clamp(-0.5, 1.0) * (vals["wm"] - vals["gm"])
        return vals

    @torch.no_grad()
    def sample(self, batch: int, *, return_tissue: bool = False) -> dict[str, torch.Tensor]:
        """A batch of training volumes on the model grid.

        Returns
        -------
        dict of tensors: ``image`` (B, X, Y, Z) z-scored, 0 outside ``brain``; ``brain``
        (expected-brain mask, bool); ``hf`` (high-frequency image); ``mask`` (training mask,
        bool, inside ``brain``); with ``clean_target``, ``target`` (the noise-free head); with ``return_tissue``, ``tissue`` (B, 4, X, Y, Z): the
        fractions of cortical grey matter, deep grey nuclei, white matter and CSF on the grid.
        """
        cfg, dev, b = self.cfg, self.device, int(batch)
        grid = self._sampling_grid(b)
        maps = F.grid_sample(self.bank.expand(b, -1, -1, -1, -1), grid, mode="bilinear",
                             padding_mode="zeros", align_corners=True)
        del grid
        ch = {c: maps[:, i] for i, c in enumerate(self.channels)}
        gm, wm, csf = ch["gm"], ch["wm"], ch["csf"]
        brain = (gm + wm + csf).clamp(0, 1)
        shape = self.work_shape
        vox = self.bank_mm
        # -- cortical detail: steeper tissue classes, CSF sulci through the cortex
        steep = self._rand((b, 1, 1, 1), *cfg.steepness)
        tot = (gm + wm + csf).clamp_min(1e-6)
        p = [torch.pow((t / tot).clamp_min(0), steep) for t in (gm, wm, csf)]
        s = brain / (p[0] + p[1] + p[2]).clamp_min(1e-12)
        gm, wm, csf = p[0] * s, p[1] * s, p[2] * s
        noise = torch.randn((b,) + shape, generator=self.gen, device=dev)
        wl = 6.0 / vox
        f = self._gauss_fft(noise, torch.full((b, 3), 0.4 * wl, device=dev))
        f = f - self._gauss_fft(f, torch.full((b, 3), wl, device=dev))
        f = f / f.flatten(1).std(1).reshape(b, 1, 1, 1).clamp_min(1e-9)
        sulci = self._rand((b, 1, 1, 1), *cfg.sulci)
        moved = gm * sulci * torch.exp(-(f / 0.25) ** 2) * gm / (gm + wm).clamp_min(1e-6)
        gm, csf = gm - moved, csf + moved
        d0 = self._rand((b, 1, 1, 1), *cfg.deep_depth_mm)
        deep = gm * torch.sigmoid((ch["depth"] - d0) / 2.0)
        gm = gm - deep
        # -- non-brain tissue by distance rules with per-subject thicknesses (head_labels)
        th = {k: self._rand((b, 1, 1, 1), lo, hi) for k, (lo, hi) in {
            "csf": (1.0, 4.0), "inner": (1.0, 2.5), "diploe": (1.5, 5.0), "outer": (1.0, 2.5),
            "skin": (1.0, 2.5), "fat": (1.5, 6.0), "dura": (0.0, 1.0)}.items()}
        v = self._draw_values(b)
        vv = {k: t.reshape(b, 1, 1, 1) for k, t in v.items()}
        d, e = ch["hull_dist"], ch["ext_dist"]
        b1 = th["csf"]
        b2 = b1 + th["inner"]
        b3 = b2 + th["diploe"]
        b4 = b3 + th["outer"]
        outside = vv["muscle"].expand(-1, *shape).clone()
        outside = torch.where(e <= th["skin"] + th["fat"], vv["fat"], outside)
        outside = torch.where(e <= th["skin"], vv["skin"], outside)
        outside = torch.where(ch["fat"] > 0.5, vv["fat"], outside)
        outside = torch.where(ch["marrow"] > 0.5, vv["marrow"], outside)
        outside = torch.where(ch["eye"] > 0.5, vv["eye"], outside)
        outside = torch.where(ch["air"] > 0.5, torch.zeros_like(outside), outside)
        outside = torch.where(d <= b4, vv["bone"], outside)
        outside = torch.where(d <= b3, vv["marrow"], outside)
        outside = torch.where(d <= b2, vv["bone"], outside)
        outside = torch.where(d <= b1, vv["csf"], outside)
        outside = torch.where(d <= th["dura"], vv["dura"], outside)
        outside = torch.where(e <= 0.0, torch.zeros_like(outside), outside)
        # -- intensities, with slow regional changes per brain tissue and a fine texture
        coarse = [4, 5, 4]
        reg = 1.0 + self._smooth(b, coarse, shape, channels=4) * self._rand((b, 1, 1, 1, 1), 0, cfg.regional_amp)
        img = (gm * vv["gm"] * reg[:, 0] + deep * vv["deep"] * reg[:, 1] + wm * vv["wm"] * reg[:, 2]
               + csf * vv["csf"] * reg[:, 3] + (1.0 - brain) * outside)
        del reg, outside, f, noise, moved, p
        tex = self._gauss_fft(torch.randn((b,) + shape, generator=self.gen, device=dev),
                              torch.full((b, 3), 1.0 / vox, device=dev))
        tex = tex / tex.flatten(1).std(1).reshape(b, 1, 1, 1).clamp_min(1e-9)
        img = img * (1.0 + tex * self._rand((b, 1, 1, 1), *cfg.texture))
        del tex
        # -- scanner: bias field, resolution, noise, gamma
        bias = self._smooth(b, [5, 6, 5], shape)[:, 0]
        bias = bias / bias.flatten(1).abs().amax(1).reshape(b, 1, 1, 1).clamp_min(1e-6)
        img = img * torch.exp(bias * self._rand((b, 1, 1, 1), *cfg.bias_amp) / 2.0)
        res = self._rand((b, 3), *cfg.resolution_mm)
        thick = torch.rand(b, generator=self.gen, device=dev) < cfg.thick_slice_p
        axis = torch.randint(0, 3, (b,), generator=self.gen, device=dev)
        tmm = self._rand((b,), *cfg.thick_slice_mm)
        res[torch.arange(b, device=dev)[thick], axis[thick]] = tmm[thick]
        sigma = 0.3 * res / vox  # a box of width w has SD w / sqrt(12) ~ 0.29 w
        img = self._gauss_fft(img, sigma).clamp_min(0)
        ref = torch.quantile(img.flatten(1)[:, ::97], 0.99, dim=1).reshape(b, 1, 1, 1).clamp_min(1e-6)
        img = img / ref
        sd = self._rand((b, 1, 1, 1), *cfg.noise)
        n1 = torch.randn((b,) + shape, generator=self.gen, device=dev)
        n2 = torch.randn((b,) + shape, generator=self.gen, device=dev)
        clean = img if cfg.clean_target else None
        img = torch.sqrt((img + sd * n1) ** 2 + (sd * n2) ** 2)
        del n1, n2
        gam = torch.exp(torch.randn((b, 1, 1, 1), generator=self.gen, device=dev) * cfg.gamma_sd)
        img = img.clamp_min(0) ** gam
        if clean is not None:
            clean = clean.clamp_min(0) ** gam
        # -- to the model grid (what resampling with anti-aliasing does), masks, z-score
        tissue = torch.stack([gm, deep, wm, csf], 1) if return_tissue else None
        if self.pool > 1:
            img = F.avg_pool3d(img[:, None], self.pool)[:, 0]
            clean = F.avg_pool3d(clean[:, None], self.pool)[:, 0] if clean is not None else None
            brain = F.avg_pool3d(brain[:, None], self.pool)[:, 0]
            tissue = F.avg_pool3d(tissue, self.pool) if tissue is not None else None
        thr = self._rand((b, 1, 1, 1), *cfg.brain_threshold)
        sig = brain > thr
        k = 2 * int(cfg.close_vox) + 1
        s5 = sig[:, None].float()
        closed = -F.max_pool3d(-F.max_pool3d(s5, k, 1, k // 2), k, 1, k // 2)
        expected = (closed[:, 0] > 0.5) | sig
        r = int(torch.randint(cfg.prior_overshoot_vox[0], cfg.prior_overshoot_vox[1] + 1, (1,),
                              generator=self.gen, device=dev))
        if r > 0:
            grown = F.max_pool3d(expected[:, None].float(), 2 * r + 1, 1, r)[:, 0] > 0.5
            where = self._smooth(b, [4, 5, 4], self.cfg.grid)[:, 0] > 0.3
            expected = expected | (grown & where)
        image, mean, sd = iterative_zscore_torch(img, sig & expected, expected, return_stats=True)
        hf = hf_torch(image, self.hf_radius)
        mask = training_masks(expected, self.gen, voxel_mm=cfg.voxel_mm, factors=cfg.mask_factors,
                              factor_probs=cfg.mask_factor_probs, n_points=cfg.mask_points,
                              eig=cfg.mask_eig)
        out = {"image": image, "brain": expected, "hf": hf, "mask": mask}
        if clean is not None:
            out["target"] = ((clean - mean) / sd) * expected.float()
        if tissue is not None:
            out["tissue"] = tissue
        return out
