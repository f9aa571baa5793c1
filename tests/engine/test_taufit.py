"""tan fit of the threshold curve and its fallback (paper 3.4)."""
import math

import numpy as np
import pytest

from qc_pipeline.engine import TauFit, fit_tau_curve


def test_recovers_known_parameters():
    t = np.arange(1, 101, dtype=float)
    a, b = 0.02, 0.0150
    tau = a * np.tan(b * t)
    fit = fit_tau_curve(t, tau, gamma=0.01)
    assert fit.path == "tan"
    assert fit.a == pytest.approx(a, rel=1e-3) and fit.b == pytest.approx(b, rel=1e-3)
    assert fit.r2 > 0.999
    # closed form of the gamma crossing
    t_star = math.acos(math.sqrt(a * b / 0.01)) / b
    assert fit.crossed and fit.t_stop == pytest.approx(t_star, rel=1e-3)
    assert fit.tau_stop == pytest.approx(a * math.tan(b * t_star), rel=1e-3)
    # derivative really exceeds gamma just after t_stop and not before
    d = lambda tt: a * b / math.cos(b * tt) ** 2  # noqa: E731
    assert d(fit.t_stop - 0.5) < 0.01 < d(fit.t_stop + 0.5)


def test_noisy_curve_and_coarse_schedule_agree():
    rng = np.random.default_rng(0)
    a, b = 0.05, 0.0152
    t_ref = np.arange(1, 101, dtype=float)
    t_fast = np.array([10, 25, 40, 55, 65, 75, 82, 87, 91, 94, 96, 98, 99], float)
    f_ref = fit_tau_curve(t_ref, a * np.tan(b * t_ref) * (1 + 0.02 * rng.standard_normal(t_ref.size)))
    f_fast = fit_tau_curve(t_fast, a * np.tan(b * t_fast) * (1 + 0.02 * rng.standard_normal(t_fast.size)))
    assert f_ref.path == f_fast.path == "tan"
    assert f_fast.t_stop == pytest.approx(f_ref.t_stop, abs=3.0)  # same units on both schedules


def test_gamma_changes_stopping_point():
    t = np.arange(1, 101, dtype=float)
    tau = 0.02 * np.tan(0.015 * t)
    assert fit_tau_curve(t, tau, gamma=0.05).t_stop > fit_tau_curve(t, tau, gamma=0.01).t_stop


@pytest.mark.parametrize("tau", [
    np.full(100, 0.3),                 # constant
    np.full(100, np.nan),              # NaN everywhere
    np.r_[np.zeros(50), np.full(50, np.nan)],  # half NaN, rest flat zero
])
def test_degenerate_curves_take_fallback(tau):
    fit = fit_tau_curve(np.arange(1, 101, dtype=float), tau)
    assert isinstance(fit, TauFit) and fit.path == "fallback"
    d = fit.to_dict()
    assert set(d) >= {"a", "b", "r2", "path", "tau_stop"}


def test_too_few_points_fallback():
    fit = fit_tau_curve([10.0, 20.0], [0.01, 0.5])
    assert fit.path == "fallback" and fit.crossed and fit.tau_stop == 0.01


def test_step_curve_fallback_finds_the_jump():
    # flat, then an abrupt rise: the tan fit is poor, the smoothed finite difference finds it
    t = np.arange(1, 101, dtype=float)
    tau = np.where(t < 80, 0.001 * t / 80, 5.0)
    fit = fit_tau_curve(t, tau)
    assert fit.path == "fallback" and fit.r2 < 0.85
    assert 75 <= fit.t_stop < 80 and fit.tau_stop < 0.01


def test_empty_input_does_not_raise():
    fit = fit_tau_curve([], [])
    assert fit.path == "fallback" and fit.tau_stop == float("inf")
    assert fit.to_dict()["tau_stop"] is None
