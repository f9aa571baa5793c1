"""The IterMask3D test-time loop (paper sections 3.2 and 3.4, Algorithm 1).

One inference class, :class:`IterMask3D`, loads a model folder once and returns
a typed :class:`Result` per scan. See ``docs/engine.md`` for the algorithm as
implemented, its units and every deviation from the paper / reference code.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..preproc import open_mask
from .errors import (EngineError, InvalidInputError, ModelCardError, ModelNotFoundError,
                     ShapeMismatchError, VoxelSizeMismatchError)
from .hf import high_frequency, hf_radius
from .modelio import (CARD_NAME, WEIGHTS_NAME, build_network, default_model_dir, load_model_card,
                      load_normal_error, load_normal_error_opening, load_normal_error_spread,
                      model_content_key)
from .schedules import Schedule, get_schedule
from .taufit import (DEFAULT_GAMMA, DEFAULT_GAMMA_REFERENCE_T, DEFAULT_Y_LIMIT, GAMMA_MODES, R2_MIN, TauFit,
                     fit_tau_curve, relative_gamma)

__all__ = ["IterMask3D", "Result", "cuda_problem", "normative_threshold", "resolve_device", "threshold_at",
           "torch_build"]

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineError(f"unknown device {device!r}; expected 'auto', 'cpu' or 'cuda[:N]'") from exc


def torch_build() -> str:
    """The installed torch in words, for logs: ``"torch 2.13.0 (CUDA 12.8)"`` or ``"... (CPU-only build)"``."""
    cuda = getattr(torch.version, "cuda", None)
    return f"torch {torch.__version__} ({f'CUDA {cuda}' if cuda else 'CPU-only build'})"


def cuda_problem(*, build_only: bool = False) -> str | None:
    """Why ``--device cuda`` cannot run here, or ``None``: the build (a CPU-only torch fails on
    every machine, GPU nodes included) or, unless ``build_only``, this machine (a CUDA build
    that sees no device: no GPU, driver, ``CUDA_VISIBLE_DEVICES``)."""
    if getattr(torch.version, "cuda", None) is None:
        return (f"the installed torch {torch.__version__} was built without CUDA and cannot use a GPU "
                f"on any machine; install a CUDA build of torch==2.13.0 (docs/usage.md, 'On a GPU machine')")
    if not build_only and not torch.cuda.is_available():
        return (f"the installed {torch_build()} sees no CUDA device on this machine (no GPU, "
                f"driver, or CUDA_VISIBLE_DEVICES)")
    return None


def _jf(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class Result:
    """Outcome of one IterMask3D run on one scan.

    Attributes
    ----------
    anomaly_voxels : int
        Voxels in the final mask (the paper's detection score).
    anomaly_fraction : float
        ``anomaly_voxels`` / brain voxels.
    anomaly_mm3 : float
        ``anomaly_voxels`` x voxel volume (mm^3).
    mask : (X, Y, Z) bool array
        Final anomaly mask (inside the brain).
    error_map : (X, Y, Z) float32 array
        Squared error ``(x' - x)**2`` of the last forward pass, 0 outside the brain.
    tau_curve : list of (t, tau)
        Sweep thresholds: t in percent of brain unmasked, tau in squared z-units.
    fit : TauFit
        Tan fit (or fallback) and the stopping point.
    tau_stop : float
    forward_passes : int
    seconds : float
        Engine wall time for this scan (a batch's wall time is split equally).
    schedule : str
    mean_error : float
        Mean error inside the brain at the final iteration (the paper's baseline score).
    first_pass_mean_error : float
        Mean error inside the brain after the first, whole-brain-masked pass
        ("frequency masking only" ablation score).
    first_pass_error_map : (X, Y, Z) float32 array or None
        Squared error of that first pass, 0 outside the brain.
    converged : bool
        False when the refinement hit the schedule's pass cap.
    device, seed : run settings.
    gamma : float
        The stopping slope the tau fit used (squared z-units per percent); in "relative" mode
        the card's relative gamma times this scan's typical error.
    gamma_mode : {"absolute", "relative"}
    raw_anomaly_voxels, raw_anomaly_fraction : int, float or None
        The test-time loop's own mask before the model's normal-error map removed the voxels
        where every brain's error is this high (:meth:`IterMask3D.against_normal_error`);
        None when that step did not run.
    candidate_mask : (X, Y, Z) bool array or None
        With a spread map: the loop's mask against the median map alone, before the spread
        rule; the group level compares it with the site's scans, whose own spread replaces
        the model's (:mod:`qc_pipeline.sitenorm`). None when no spread rule ran.
    candidate_voxels, candidate_fraction : int, float or None
        Its size, as ``anomaly_voxels`` / ``anomaly_fraction``.
    normal_error : dict
        How the normal-error step went: ``applied``, ``factor``, ``spread_k`` (when the model
        carries the normal heads' spread), ``open_vox`` (when the mask was opened), and
        ``reason`` when it did not run (the model has no map, the scan has no template fit).
    """

    anomaly_voxels: int
    anomaly_fraction: float
    anomaly_mm3: float
    mask: np.ndarray
    error_map: np.ndarray
    tau_curve: list
    fit: TauFit
    tau_stop: float
    forward_passes: int
    seconds: float
    schedule: str
    mean_error: float
    first_pass_mean_error: float = float("nan")
    first_pass_error_map: np.ndarray | None = None
    converged: bool = True
    refine_passes: int = 0
    brain_voxels: int = 0
    device: str = "cpu"
    seed: int = 0
    gamma: float = DEFAULT_GAMMA
    gamma_mode: str = "absolute"
    raw_anomaly_voxels: int | None = None
    raw_anomaly_fraction: float | None = None
    normal_error: dict = field(default_factory=dict)
    candidate_mask: np.ndarray | None = None
    candidate_voxels: int | None = None
    candidate_fraction: float | None = None

    @property
    def fallback(self) -> bool:
        """True when tau_stop came from the finite-difference fallback."""
        return self.fit.path == "fallback"

    def to_dict(self) -> dict:
        """JSON-safe scalars and the tau curve (no arrays; NaN/Inf -> None)."""
        return {
            "anomaly_voxels": int(self.anomaly_voxels),
            "anomaly_fraction": _jf(self.anomaly_fraction),
            "anomaly_mm3": _jf(self.anomaly_mm3),
            "tau_curve": [[_jf(t), _jf(v)] for t, v in self.tau_curve],
            "tau_stop": _jf(self.tau_stop),
            "fit": {"a": _jf(self.fit.a), "b": _jf(self.fit.b), "r2": _jf(self.fit.r2),
                    "path": self.fit.path, "t_stop": _jf(self.fit.t_stop), "crossed": bool(self.fit.crossed)},
            "fallback": self.fallback,
            "forward_passes": int(self.forward_passes),
            "refine_passes": int(self.refine_passes),
            "converged": bool(self.converged),
            "seconds": _jf(self.seconds),
            "schedule": self.schedule,
            "mean_error": _jf(self.mean_error),
            "first_pass_mean_error": _jf(self.first_pass_mean_error),
            "brain_voxels": int(self.brain_voxels),
            "device": self.device,
            "seed": int(self.seed),
            "gamma": _jf(self.gamma),
            "gamma_mode": self.gamma_mode,
            "raw_anomaly_voxels": None if self.raw_anomaly_voxels is None else int(self.raw_anomaly_voxels),
            "raw_anomaly_fraction": None if self.raw_anomaly_fraction is None else _jf(self.raw_anomaly_fraction),
            "normal_error": dict(self.normal_error),
            "candidate_anomaly_voxels": None if self.candidate_voxels is None else int(self.candidate_voxels),
            "candidate_anomaly_fraction": None if self.candidate_fraction is None else _jf(self.candidate_fraction),
        }


def threshold_at(errors_in_brain_sorted: np.ndarray, t: float) -> float:
    """Threshold that leaves ``(100 - t)`` % of the brain voxels strictly above it.

    ``errors_in_brain_sorted`` is ascending. With ``k = round(n (100 - t) / 100)``
    voxels to keep masked, the threshold is the ``(n - k)``-th smallest error
    (ties can leave fewer voxels above it, as in the reference code).
    """
    n = errors_in_brain_sorted.size
    k = int(round(n * (100.0 - float(t)) / 100.0))
    k = min(max(k, 0), n)
    if k >= n:
        return float(errors_in_brain_sorted[0]) - 1.0  # everything stays masked
    return float(errors_in_brain_sorted[n - k - 1])


def _kth_threshold(errors_in_brain: torch.Tensor, t: float) -> float:
    """:func:`threshold_at` on an unsorted tensor of brain errors, on its own device.

    ``torch.kthvalue`` picks the same element as the ascending sort does, so the threshold
    (and every mask built from it) is bitwise that of the NumPy reference.
    """
    n = int(errors_in_brain.numel())
    k = int(round(n * (100.0 - float(t)) / 100.0))
    k = min(max(k, 0), n)
    if k >= n:
        return float(errors_in_brain.min()) - 1.0
    return float(torch.kthvalue(errors_in_brain, n - k).values)


def normative_threshold(card: Mapping[str, Any]) -> float | None:
    """The ``normative`` schedule's ``tau_stop`` (squared z-units) from a model card:
    ``normative.factor`` x the median tau(50) of clean scans (``gamma_calibration.median_tau50``,
    the same reference the stopping slope is calibrated on). None when the card has neither."""
    norm = card.get("normative") or {}
    if norm.get("threshold") is not None:
        return float(norm["threshold"])
    ref = (card.get("gamma_calibration") or {}).get("median_tau50")
    if ref is None or not norm.get("factor"):
        return None
    return float(norm["factor"]) * float(ref)


class _ScanLoop:
    """State machine of the loop for one scan: asks for forward passes, consumes error maps.

    Every volume (image, brain, high-frequency image, masks, error maps) stays a tensor on the
    model's device; the noise fill comes from a generator of that device seeded per scan, and
    only scalars (the tau curve, mask sizes, mean errors) come back to the host.
    """

    def __init__(self, x: torch.Tensor, brain: torch.Tensor, hf: torch.Tensor, sched: Schedule, *,
                 gamma: float, seed: int, y_limit: float, r2_min: float,
                 gamma_mode: str = "absolute", gamma_reference_t: float = DEFAULT_GAMMA_REFERENCE_T,
                 normative_threshold: float | None = None):
        self.x, self.brain, self.hf = x, brain, hf
        self.normative_threshold = normative_threshold
        self.sched, self.gamma, self.y_limit, self.r2_min = sched, gamma, y_limit, r2_min
        self.gamma_mode, self.gamma_reference_t = gamma_mode, float(gamma_reference_t)
        self.gamma_used = float(gamma)
        self.seed = int(seed)
        self.gen = torch.Generator(device=x.device).manual_seed(self.seed)
        # flat indices of the brain: gathering through them avoids a host sync per pass
        self.brain_idx = torch.nonzero(brain.reshape(-1)).reshape(-1)
        self.n_brain = int(self.brain_idx.numel())
        self.passes = 0
        self.phase = "sweep"
        self.sweep_i = 0
        self.ts: list[float] = []
        self.taus: list[float] = []
        self.pending: torch.Tensor | None = brain.clone()  # t = 0: whole brain masked
        self.prev_n = 0
        self.refine_passes = 0
        self.first_pass_mean_error = float("nan")
        self.first_pass_error_map: torch.Tensor | None = None
        self.fit: TauFit | None = None
        self.final: dict | None = None

    @property
    def done(self) -> bool:
        return self.final is not None

    def noise(self) -> torch.Tensor:
        return torch.randn(self.x.shape, generator=self.gen, dtype=torch.float32, device=self.x.device)

    def model_input(self) -> torch.Tensor:
        x_hat = torch.where(self.pending, self.noise(), self.x)  # eq. 1-3
        return torch.stack([x_hat, self.hf])

    def _confirmed(self) -> bool:
        c = self.sched.confirm
        if len(self.ts) < max(4, c + 1):
            return False
        t = np.asarray([0.0] + self.ts)
        y = np.asarray([0.0] + self.taus)
        slopes = np.diff(y) / np.diff(t)
        return bool(np.all(slopes[-c:] > self.gamma_now()))

    def gamma_now(self) -> float:
        """The stopping slope for the sweep observed so far (see ``gamma_mode``)."""
        if self.gamma_mode == "relative":
            return relative_gamma(self.ts, self.taus, self.gamma, self.gamma_reference_t)
        return self.gamma

    def consume(self, recon: torch.Tensor) -> None:
        self.passes += 1
        err = ((recon.float() - self.x) ** 2) * self.brain  # eq. 5, inside the brain
        in_brain = err.reshape(-1).index_select(0, self.brain_idx)
        if self.passes == 1:
            self.first_pass_mean_error = float(in_brain.mean())
            self.first_pass_error_map = err  # never modified below
        if self.phase == "sweep":
            t = self.sched.sweep_t[self.sweep_i]
            tau = _kth_threshold(in_brain, t)
            self.ts.append(float(t))
            self.taus.append(tau)
            self.sweep_i += 1
            last = self.sweep_i >= len(self.sched.sweep_t)
            if last or (self.sched.early_stop and self._confirmed()):
                self._end_sweep(err)
            else:
                self.pending = (err > tau) & self.brain
            return
        # refinement (eq. 6 with tau_stop; voxels may leave AND re-enter the mask)
        self.refine_passes += 1
        new = (err > self.tau_stop) & self.brain
        if self.sched.shrink:
            new &= self.pending
        new_n = int(new.sum())
        change = abs(new_n - self.prev_n) / max(self.prev_n, 1)
        if change < self.sched.tol:
            self._finish(new, err, in_brain, True)
        elif self.refine_passes >= self.sched.max_refine:
            # the normative refinement is a fixed number of shrinking passes, not a search
            self._finish(new, err, in_brain, self.sched.stop == "normative")
        else:
            self.pending = new
            self.prev_n = new_n

    def _end_sweep(self, err: torch.Tensor) -> None:
        self.gamma_used = self.gamma_now()
        if self.sched.stop == "normative":
            # the anomaly is still masked half-way through the sweep; what stands out there is
            # error above what the network leaves on normal tissue (docs/engine.md)
            if self.normative_threshold is None:
                raise ModelCardError(
                    f"schedule {self.sched.name!r} needs a normative_threshold: the model card has "
                    "neither normative.threshold nor normative.factor with gamma_calibration.median_tau50 "
                    "(benchmarks/calibrate_gamma.py --normative-factor writes them)")
            tau = float(self.normative_threshold)
            self.fit = TauFit(a=float("nan"), b=float("nan"), r2=float("nan"), path="normative",
                              t_stop=float(self.ts[-1]), tau_stop=tau, gamma=self.gamma_used,
                              crossed=bool(self.taus[-1] > tau))
        else:
            self.fit = fit_tau_curve(self.ts, self.taus, gamma=self.gamma_used, y_limit=self.y_limit,
                                     r2_min=self.r2_min)
        self.tau_stop = float(self.fit.tau_stop)
        self.phase = "refine"
        if self.sched.refine_start == "brain":
            start = self.brain.clone()
        elif self.sched.refine_start == "sweep_t":
            start = (err > self.taus[-1]) & self.brain
        else:
            start = (err > self.tau_stop) & self.brain
        if self.sched.max_refine <= 0:
            self._finish(start, err, err.reshape(-1).index_select(0, self.brain_idx), False)
            return
        self.pending = start
        self.prev_n = int(start.sum())

    def _finish(self, mask: torch.Tensor, err: torch.Tensor, in_brain: torch.Tensor, converged: bool) -> None:
        self.pending = None
        self.final = {"mask": mask, "error_map": err, "mean_error": float(in_brain.mean()),
                      "converged": converged}


class IterMask3D:
    """IterMask3D inference: a reconstructor plus its model card.

    Parameters
    ----------
    net : nn.Module or callable
        Maps a float32 tensor ``(B, 2, X, Y, Z)`` (noise-filled masked image,
        high-frequency image) to ``(B, 1, X, Y, Z)``. A plain callable (e.g. an
        oracle in tests) is used as is.
    card : dict, optional
        Model card. ``grid`` and ``voxel_size`` (when present) are enforced;
        ``gamma``, ``hf.radius`` and ``schedule`` supply defaults.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
    batch_size : int, optional
        Scans kept in flight together by :meth:`run_batch` (default 1 on CPU, 16 on CUDA).
    micro_batch : int, optional
        Volumes per forward pass (default 1 on CPU, 4 on CUDA). Every pass has this shape (a
        short last group is padded), so the kernels, and a scan's result, do not depend on how
        many or which other scans share its batch.
    """

    def __init__(self, net: torch.nn.Module | Callable, card: Mapping[str, Any] | None = None, *,
                 device: str = "auto", batch_size: int | None = None, micro_batch: int | None = None):
        self.card = dict(card or {})
        self.device = resolve_device(device)
        self.net = net
        if isinstance(net, torch.nn.Module):
            self.net = net.to(self.device).eval()
        cuda = self.device.type == "cuda"
        self.micro_batch = int(micro_batch) if micro_batch else (4 if cuda else 1)
        self.batch_size = int(batch_size) if batch_size else (16 if cuda else 1)
        if self.micro_batch < 1 or self.batch_size < 1:
            raise EngineError(f"batch_size and micro_batch must be >= 1, got {batch_size} and {micro_batch}")
        self.gamma_mode = str(self.card.get("gamma_mode", "absolute"))
        if self.gamma_mode not in GAMMA_MODES:
            raise ModelCardError(f"model card gamma_mode {self.gamma_mode!r} is not one of {GAMMA_MODES}")
        # relative mode: the card's gamma_relative times each scan's own typical error
        self.gamma = float(self.card.get("gamma_relative" if self.gamma_mode == "relative" else "gamma",
                                         DEFAULT_GAMMA))
        self.gamma_reference_t = float(self.card.get("gamma_reference_t", DEFAULT_GAMMA_REFERENCE_T))
        self.r2_min = float(self.card.get("r2_min", R2_MIN))
        self.default_schedule = str(self.card.get("schedule", "fast"))
        self.grid = tuple(int(g) for g in self.card["grid"]) if self.card.get("grid") else None
        self.voxel_size = tuple(float(v) for v in self.card["voxel_size"]) if self.card.get("voxel_size") else None
        self.model_id = str(self.card.get("model_id", "unnamed"))
        #: the folder's content key (modelio.model_content_key; from_folder sets it)
        self.model_key: str | None = None
        self.normative_threshold = normative_threshold(self.card)
        #: the model's normal error on the template grid and its factor (from_folder loads them)
        self.normal_error: np.ndarray | None = None
        self.normal_error_factor: float | None = None
        #: normal heads' voxel-wise spread around that map and its multiple (optional)
        self.normal_error_spread: np.ndarray | None = None
        self.normal_error_spread_k: float | None = None
        #: radius (grid voxels) of the opening after the normal-error rule (0: none)
        self.normal_error_open: int = 0

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, path=None, device: str = "auto", *, contrast: str = "T1w",
                    batch_size: int | None = None, micro_batch: int | None = None) -> "IterMask3D":
        """Load ``weights.pt`` + ``model_card.json`` from ``path`` (None: the packaged model).

        Raises
        ------
        ModelNotFoundError
            The folder, its weights or its card is missing (the message names the folder).
        ModelCardError
            The card is unreadable or does not match the weights.
        """
        folder = Path(path) if path is not None else default_model_dir(contrast)
        if not (folder / WEIGHTS_NAME).is_file() or not (folder / CARD_NAME).is_file():
            raise ModelNotFoundError(
                f"no IterMask3D model in {folder}: expected {WEIGHTS_NAME} and {CARD_NAME} there"
                + (f" (packaged {contrast} weights are not installed; train them or pass a model folder)"
                   if path is None else ""))
        card = load_model_card(folder)
        net = build_network(card)
        try:
            state = torch.load(folder / WEIGHTS_NAME, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001
            raise ModelCardError(f"weights in {folder} do not load into the card's network: {exc}") from exc
        card.setdefault("model_dir", str(folder))
        model = cls(net, card, device=device, batch_size=batch_size, micro_batch=micro_batch)
        model.model_key = model_content_key(folder)
        model.normal_error, model.normal_error_factor = load_normal_error(folder, card)
        model.normal_error_spread, model.normal_error_spread_k = load_normal_error_spread(folder, card)
        model.normal_error_open = load_normal_error_opening(folder, card)
        return model

    # ------------------------------------------------------------------ normal error
    def against_normal_error(self, res: Result, *, grid_affine, template_to_world) -> Result:
        """``res`` with its mask kept only where the error exceeds the model's normal error.

        The network leaves a high error on the same anatomy of every brain (ventricles,
        sulcal CSF, deep grey matter); the model folder's normal-error map (median error of
        normal heads, template grid; :mod:`qc_pipeline.sitenorm`) says how high, and a voxel
        stays in the mask only where its error exceeds the card's ``normal_error.factor``
        times that. Where the folder also carries the normal heads' spread (their voxel-wise
        robust SD around that median), the error must also exceed the median by
        ``normal_error.spread_k`` spreads: where people differ most (ventricle size, sulcal
        width) one person's anatomy is not an anomaly; the mask before that rule is kept as
        ``candidate_mask``. With the card's ``normal_error.open_vox`` the mask is then opened
        by a ball of that many grid voxels: much of a normal brain's residue is specks and
        threads along sulci and the brain's edge, an anomaly is a body (a lesion, a missing piece, a
        void), so what cannot hold the ball goes.
        ``grid_affine``: the model grid's voxel -> scanner mm;
        ``template_to_world``: the scan's template fit (MNI mm -> scanner mm), None when the
        preprocessing made none.
        Without a map or a fit the result is returned as it is, saying why.
        """
        if self.normal_error is None:
            return replace(res, normal_error={"applied": False, "reason": "the model has no normal-error map"})
        if template_to_world is None or grid_affine is None:
            return replace(res, normal_error={"applied": False, "factor": self.normal_error_factor,
                                              "reason": "the scan has no template fit"})
        from ..sitenorm import normal_error_masks

        before, mask = normal_error_masks(
            res.error_map, res.mask, self.normal_error, grid_affine=grid_affine,
            template_to_world=template_to_world, factor=self.normal_error_factor,
            spread_t=self.normal_error_spread, spread_k=self.normal_error_spread_k or 0.0)
        applied = {"applied": True, "factor": self.normal_error_factor}
        candidate = {}
        if self.normal_error_spread is not None:
            c = int(before.sum())
            candidate = {"candidate_mask": before, "candidate_voxels": c,
                         "candidate_fraction": c / res.brain_voxels if res.brain_voxels else 0.0}
            applied["spread_k"] = self.normal_error_spread_k
        if self.normal_error_open:
            mask = open_mask(mask, self.normal_error_open)
            applied["open_vox"] = self.normal_error_open
        n = int(mask.sum())
        vox_mm3 = abs(float(np.linalg.det(np.asarray(grid_affine, dtype=float)[:3, :3])))
        return replace(res, mask=mask, anomaly_voxels=n,
                       anomaly_fraction=n / res.brain_voxels if res.brain_voxels else 0.0,
                       anomaly_mm3=n * vox_mm3, raw_anomaly_voxels=int(res.anomaly_voxels),
                       raw_anomaly_fraction=float(res.anomaly_fraction),
                       normal_error=applied, **candidate)

    # ------------------------------------------------------------------ checks
    def _check(self, image, brain_mask, voxel_size) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(image)
        b = np.asarray(brain_mask)
        if x.ndim != 3:
            raise InvalidInputError(f"image must be a 3D volume, got shape {x.shape}")
        if self.grid is not None and tuple(x.shape) != self.grid:
            raise ShapeMismatchError(f"image grid {tuple(x.shape)} is not the model grid {self.grid}")
        if b.shape != x.shape:
            raise ShapeMismatchError(f"brain mask shape {b.shape} differs from image shape {x.shape}")
        vs = tuple(float(v) for v in (voxel_size if not np.isscalar(voxel_size) else (voxel_size,) * 3))
        if self.voxel_size is not None and not np.allclose(vs, self.voxel_size, rtol=1e-3, atol=1e-4):
            raise VoxelSizeMismatchError(f"voxel size {vs} mm is not the model voxel size {self.voxel_size} mm")
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise InvalidInputError("image contains NaN or Inf values")
        b = b.astype(bool)
        if not b.any():
            raise InvalidInputError("brain mask is empty")
        return x, b

    def _forward(self, items: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One forward pass of at most ``micro_batch`` inputs ``(2, X, Y, Z)``; reconstructions
        ``(X, Y, Z)`` on the model's device. The pass always has ``micro_batch`` volumes."""
        n = len(items)
        inp = torch.stack(list(items))
        if n < self.micro_batch:
            inp = torch.cat([inp, inp.new_zeros((self.micro_batch - n,) + tuple(inp.shape[1:]))])
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=False,
                                                                 deterministic=True):
            out = self.net(inp)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out, dtype=np.float32), device=self.device)
        out = out.float()
        if out.ndim == 5:
            out = out[:, 0]
        return list(out[:n])

    # ------------------------------------------------------------------ running
    def run(self, image, brain_mask, *, voxel_size=(2.0, 2.0, 2.0), schedule: str | Schedule | None = None,
            seed: int = 0, hf: np.ndarray | None = None) -> Result:
        """Screen one scan.

        Parameters
        ----------
        image : (X, Y, Z) array
            z-scored volume on the model grid (background 0).
        brain_mask : (X, Y, Z) bool array
            Where brain should be; the error map only counts inside it.
        voxel_size : 3 floats (mm)
        schedule : "fast" | "reference" | Schedule, optional
            Default: the model card's schedule (``"fast"``).
        seed : int
            Seeds the noise fill: same input + seed -> identical result.
        hf : array, optional
            Precomputed high-frequency image (else :func:`high_frequency`).
        """
        return self.run_batch([image], [brain_mask], voxel_size=voxel_size, schedule=schedule,
                              seed=seed, hf=None if hf is None else [hf])[0]

    def typical_error(self, image, brain_mask, *, voxel_size=(2.0, 2.0, 2.0), seed: int = 0,
                      t_ref: float = DEFAULT_GAMMA_REFERENCE_T) -> float:
        """``tau(t_ref)`` of the sweep: the median error of the brain with half of it unmasked at
        the default ``t_ref = 50`` (4 forward passes). The stopping slope of a model is
        calibrated on it (:func:`qc_pipeline.calibrate.gamma_from_tau50`)."""
        probe = Schedule("probe", tuple(t for t in get_schedule("fast").sweep_t if t <= t_ref) + (
            min(t for t in get_schedule("fast").sweep_t if t >= t_ref),), early_stop=False,
            refine_start="sweep", max_refine=0)
        res = self.run(image, brain_mask, voxel_size=voxel_size, schedule=probe, seed=seed)
        return relative_gamma([t for t, _ in res.tau_curve], [v for _, v in res.tau_curve], 1.0, t_ref)

    def _loop(self, x: np.ndarray, b: np.ndarray, h, vs, radius, sched: Schedule, seed: int) -> _ScanLoop:
        if h is None:
            h = high_frequency(x, radius if radius is not None else hf_radius(x.shape, vs), voxel_size=vs)
        else:
            h = np.asarray(h, dtype=np.float32)
            if h.shape != x.shape:
                raise ShapeMismatchError(f"hf image shape {h.shape} differs from image shape {x.shape}")
        dev = self.device
        return _ScanLoop(torch.from_numpy(x).to(dev), torch.from_numpy(b).to(dev),
                         torch.from_numpy(np.ascontiguousarray(h, dtype=np.float32)).to(dev),
                         sched, gamma=self.gamma, seed=seed, y_limit=DEFAULT_Y_LIMIT, r2_min=self.r2_min,
                         gamma_mode=self.gamma_mode, gamma_reference_t=self.gamma_reference_t,
                         normative_threshold=self.normative_threshold)

    def _result(self, lp: _ScanLoop, sched: Schedule, vox_mm3: float) -> Result:
        f = lp.final
        mask = f["mask"].cpu().numpy()
        nvox = int(mask.sum())
        log.debug("itermask3d: %s passes=%d tau_stop=%.4g path=%s voxels=%d", sched.name, lp.passes,
                  lp.tau_stop, lp.fit.path, nvox)
        return Result(
            anomaly_voxels=nvox, anomaly_fraction=nvox / lp.n_brain, anomaly_mm3=nvox * vox_mm3,
            mask=mask, error_map=f["error_map"].cpu().numpy(), tau_curve=list(zip(lp.ts, lp.taus)),
            fit=lp.fit, tau_stop=lp.tau_stop, forward_passes=lp.passes, seconds=0.0,
            schedule=sched.name, mean_error=f["mean_error"], first_pass_mean_error=lp.first_pass_mean_error,
            first_pass_error_map=lp.first_pass_error_map.cpu().numpy(), converged=f["converged"],
            refine_passes=lp.refine_passes, brain_voxels=lp.n_brain, device=str(self.device),
            seed=lp.seed, gamma=lp.gamma_used, gamma_mode=self.gamma_mode)

    def run_batch(self, images: Sequence, brain_masks: Sequence, *, voxel_size=(2.0, 2.0, 2.0),
                  schedule: str | Schedule | None = None, seed: int | Sequence[int] = 0,
                  hf: Sequence | None = None) -> list[Result]:
        """Screen several scans, ``batch_size`` at a time, their forward passes stacked into
        micro-batches of a fixed shape.

        Each scan keeps its own noise generator and every pass has the same shape, so a scan's
        result is :meth:`run`'s whatever the batch (bitwise on the CPU; on CUDA cuDNN is asked
        for deterministic kernels).
        """
        sched = get_schedule(schedule or self.default_schedule)
        n = len(images)
        if len(brain_masks) != n:
            raise InvalidInputError(f"{n} images but {len(brain_masks)} brain masks")
        seeds = [int(seed)] * n if np.isscalar(seed) else [int(s) for s in seed]
        if len(seeds) != n:
            raise InvalidInputError(f"{n} images but {len(seeds)} seeds")
        vs = tuple(float(v) for v in (voxel_size if not np.isscalar(voxel_size) else (voxel_size,) * 3))
        radius = None
        if self.card.get("hf", {}).get("radius") and self.grid is not None:
            radius = tuple(float(r) for r in self.card["hf"]["radius"])
        t0 = time.perf_counter()
        checked = [self._check(images[i], brain_masks[i], vs) for i in range(n)]  # fail before any pass
        if hf is not None and len(hf) != n:
            raise InvalidInputError(f"{n} images but {len(hf)} hf images")
        vox_mm3 = float(np.prod(vs))
        results: list[Result] = []
        for g in range(0, n, self.batch_size):
            group = [self._loop(*checked[i], None if hf is None else hf[i], vs, radius, sched, seeds[i])
                     for i in range(g, min(n, g + self.batch_size))]
            while True:
                active = [lp for lp in group if not lp.done]
                if not active:
                    break
                for j in range(0, len(active), self.micro_batch):
                    chunk = active[j: j + self.micro_batch]
                    for lp, rec in zip(chunk, self._forward([lp.model_input() for lp in chunk])):
                        lp.consume(rec)
            results.extend(self._result(lp, sched, vox_mm3) for lp in group)
        seconds = (time.perf_counter() - t0) / max(n, 1)
        for r in results:
            r.seconds = seconds
        return results
