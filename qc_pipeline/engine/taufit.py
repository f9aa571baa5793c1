"""Subject-specific stopping threshold (IterMask3D paper, section 3.4).

Units (the same on every schedule, so ``gamma`` keeps its meaning)
-----------------------------------------------------------------
``t``   percent of the brain that has been *unmasked*, 0..100 (the sweep step
        ``t`` leaves ``100 - t`` % of the brain masked). The paper's and the
        reference code's step is 1 %, so one step = one unit of ``t``.
``tau`` a squared reconstruction error of z-scored intensities (the error map
        is ``(x' - x)**2`` on images z-scored inside the brain).
The derivative ``d tau / d t`` is therefore in squared-z-units per percent of
brain, and ``gamma = 0.01`` (the paper's detection value) means the same on a
1 %-step and on a coarse schedule.

Fit
---
``tau(t) = a * tan(b * t)`` by least squares (``scipy.optimize.curve_fit``)
with ``a > 0`` and ``0 < b < pi / (2 * t_max)`` (the tangent has no pole inside
the observed range). Points above ``y_limit`` are left out, as in the
reference code. ``t*`` is the first ``t`` where the fitted derivative
``a*b / cos(b t)**2`` exceeds ``gamma``; it has the closed form
``t* = arccos(sqrt(a b / gamma)) / b``; ``t*`` is clipped to the observed range
and ``tau_stop = a * tan(b * t*)``.

Fallback
--------
A fit that raises, returns non-finite values, or has ``r2 < R2_MIN`` (0.85, the
reference code's bar) never raises: the derivative is taken as a smoothed
finite difference of the observed curve (moving average over 5 points of
``d tau / d t``, the origin ``(0, 0)`` prepended, as the reference code does),
``t*`` is the first observed ``t`` where it exceeds ``gamma`` and ``tau_stop`` the
observed ``tau`` there; with no crossing ``tau_stop`` is the largest observed
``tau`` (nothing abrupt: almost nothing stays masked). With no finite point at
all, ``tau_stop = inf`` (nothing masked) and ``path = "fallback"``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, asdict
from typing import Sequence

import numpy as np

__all__ = ["TauFit", "fit_tau_curve", "R2_MIN", "DEFAULT_GAMMA", "tan_model", "tan_derivative",
           "relative_gamma", "GAMMA_MODES", "DEFAULT_GAMMA_REFERENCE_T"]

#: minimum coefficient of determination for the tan fit (reference code: 0.85)
R2_MIN = 0.85
#: paper value of gamma for detection
DEFAULT_GAMMA = 0.01
#: how the stopping slope is set: "absolute" (the paper: gamma in squared z-units per percent)
#: or "relative" (gamma times the scan's own typical error, see :func:`relative_gamma`)
GAMMA_MODES = ("absolute", "relative")
#: sweep position whose threshold is a scan's typical error in "relative" mode (the median)
DEFAULT_GAMMA_REFERENCE_T = 50.0
#: points with tau above this are not fitted (reference code default)
DEFAULT_Y_LIMIT = 10.0


def relative_gamma(t: Sequence[float], tau: Sequence[float], gamma_relative: float,
                   t_ref: float = DEFAULT_GAMMA_REFERENCE_T) -> float:
    """Stopping slope scaled by the scan's own typical error: ``gamma_relative * tau(t_ref)``.

    ``tau(t_ref)`` is interpolated on the observed sweep (at the default ``t_ref = 50`` it is
    the median error of the brain with half of it unmasked). The paper's absolute ``gamma``
    moves the cut along the curve when a scan's errors are all larger (a scanner or anatomy the
    network was not trained on scales the whole curve); a slope relative to the scan's own error
    level does not move, while the abrupt rise of an anomaly's errors still crosses it. Returns
    ``inf`` (no crossing possible yet) until the sweep has reached ``t_ref``.
    """
    tt = np.asarray(t, dtype=float)
    yy = np.asarray(tau, dtype=float)
    ok = np.isfinite(tt) & np.isfinite(yy)
    tt, yy = tt[ok], yy[ok]
    if tt.size == 0 or tt.max() < t_ref:
        return float("inf")
    order = np.argsort(tt)
    ref = float(np.interp(t_ref, np.concatenate([[0.0], tt[order]]), np.concatenate([[0.0], yy[order]])))
    return float(gamma_relative) * max(ref, 1e-12)


def tan_model(t, a, b):
    """``a * tan(b * t)``."""
    return a * np.tan(b * np.asarray(t, dtype=float))


def tan_derivative(t, a, b):
    """``a * b / cos(b t)**2``."""
    return a * b / np.cos(b * np.asarray(t, dtype=float)) ** 2


@dataclass(frozen=True)
class TauFit:
    """Result of :func:`fit_tau_curve`.

    Attributes
    ----------
    a, b : float
        Fitted parameters (NaN when no tan fit could be made).
    r2 : float
        Coefficient of determination of the tan fit on the fitted points (NaN if none).
    path : {"tan", "fallback", "normative"}
        Which way ``tau_stop`` was found.
    t_stop : float
        ``t*`` (percent of brain unmasked) where the derivative first exceeds gamma.
    tau_stop : float
        The stopping threshold.
    gamma : float
    crossed : bool
        Whether the derivative exceeded gamma inside the observed range.
    """

    a: float
    b: float
    r2: float
    path: str
    t_stop: float = float("nan")
    tau_stop: float = float("inf")
    gamma: float = DEFAULT_GAMMA
    crossed: bool = False

    def to_dict(self) -> dict:
        """JSON-safe dict (NaN/Inf become None)."""
        return {k: _json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _json_float(v: float):
    return float(v) if math.isfinite(v) else None


def _fallback(t: np.ndarray, tau: np.ndarray, gamma: float, a=float("nan"), b=float("nan"),
              r2=float("nan"), window: int = 5) -> TauFit:
    if t.size == 0:
        return TauFit(a, b, r2, "fallback", float("nan"), float("inf"), gamma, False)
    tt = np.concatenate([[0.0], t])
    yy = np.concatenate([[0.0], tau])
    dt = np.diff(tt)
    dt[dt <= 0] = np.nan
    d = np.diff(yy) / dt
    d = np.where(np.isfinite(d), d, 0.0)
    half = window // 2
    sm = np.array([d[max(0, i - half): i + half + 1].mean() for i in range(d.size)])
    above = np.nonzero(sm > gamma)[0]
    if above.size:
        k = int(above[0])
        return TauFit(a, b, r2, "fallback", float(t[k]), float(tau[k]), gamma, True)
    return TauFit(a, b, r2, "fallback", float(t[-1]), float(np.max(tau)), gamma, False)


def fit_tau_curve(
    t: Sequence[float],
    tau: Sequence[float],
    *,
    gamma: float = DEFAULT_GAMMA,
    y_limit: float = DEFAULT_Y_LIMIT,
    r2_min: float = R2_MIN,
    min_points: int = 4,
) -> TauFit:
    """Fit ``tau(t) = a tan(b t)`` and find ``tau_stop`` (never raises on bad curves).

    Parameters
    ----------
    t : sequence of float
        Sweep positions in percent of brain unmasked (0..100), increasing.
    tau : sequence of float
        Thresholds (squared z-score error) observed at ``t``.
    gamma : float
        Derivative bar in squared-z-units per percent (paper: 0.01 detection).
    y_limit : float
        Points with ``tau > y_limit`` (and all after the first of them) are not fitted.
    r2_min : float
        Fits with ``r2`` below this take the fallback path.
    min_points : int
        Fewer finite points than this take the fallback path.

    Returns
    -------
    TauFit
    """
    t_arr = np.asarray(t, dtype=float).ravel()
    y_arr = np.asarray(tau, dtype=float).ravel()
    if t_arr.shape != y_arr.shape:
        n = min(t_arr.size, y_arr.size)
        t_arr, y_arr = t_arr[:n], y_arr[:n]
    ok = np.isfinite(t_arr) & np.isfinite(y_arr)
    t_arr, y_arr = t_arr[ok], y_arr[ok]
    order = np.argsort(t_arr, kind="stable")
    t_arr, y_arr = t_arr[order], y_arr[order]
    # fit only up to the first point above y_limit (reference code)
    over = np.nonzero(y_arr > y_limit)[0]
    n_fit = int(over[0]) if over.size else y_arr.size
    tf, yf = t_arr[:n_fit], y_arr[:n_fit]
    if tf.size < min_points or np.ptp(yf) <= 0 or tf[-1] <= 0:
        return _fallback(t_arr, y_arr, gamma)
    from scipy.optimize import curve_fit

    t_max = float(tf[-1])
    b_hi = (math.pi / 2.0) / t_max * (1.0 - 1e-6)
    b0 = min(0.5 * b_hi, 0.01) if b_hi > 0.01 else 0.5 * b_hi
    a0 = max(float(np.median(yf)) / math.tan(b0 * float(np.median(tf))), 1e-12) if np.median(tf) > 0 else 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (a, b), _ = curve_fit(tan_model, tf, yf, p0=(a0, b0),
                                  bounds=([0.0, 1e-12], [np.inf, b_hi]), maxfev=20000)
        a, b = float(a), float(b)
        pred = tan_model(tf, a, b)
        ss_res = float(np.sum((yf - pred) ** 2))
        ss_tot = float(np.sum((yf - yf.mean()) ** 2))
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    except Exception:  # noqa: BLE001 - any optimiser failure takes the fallback path
        return _fallback(t_arr, y_arr, gamma)
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(r2)) or r2 < r2_min:
        return _fallback(t_arr, y_arr, gamma, a, b, r2 if math.isfinite(r2) else float("nan"))
    t_lo, t_hi = float(t_arr[0]), float(t_arr[-1])
    ab = a * b
    if ab >= gamma:
        t_star, crossed = t_lo, True
    elif ab <= 0:
        t_star, crossed = t_hi, False
    else:
        t_star = math.acos(math.sqrt(ab / gamma)) / b
        crossed = t_star <= t_hi
        t_star = min(max(t_star, t_lo), t_hi)
    tau_stop = float(tan_model(t_star, a, b))
    if not crossed:
        # no abrupt rise inside the observed range: stop at the largest observed threshold
        tau_stop = max(tau_stop, float(np.max(y_arr)))
    return TauFit(a, b, r2, "tan", float(t_star), tau_stop, gamma, crossed)
