"""Test-time schedules of the IterMask3D loop.

``reference``
    Paper-exact (and reference-code-exact): the sweep unmasks 1 % of the brain
    per step, t = 1..100 (100 forward passes: the whole-brain pass plus one per
    step up to t = 99; tau(100) comes from the last error map), then the
    refinement restarts from the whole brain and iterates with ``tau_stop``
    until the mask size changes by < 1 % (1 + K passes). Total 101 + K.

``fast``
    Coarse sweep steps where tau(t) is flat (early t), 1-3 % steps near the
    end where the abrupt rise usually happens; the sweep stops as soon as the
    crossing is confirmed (observed slope above gamma on ``confirm``
    consecutive intervals); the refinement starts from the sweep's mask at
    ``tau_stop`` (no whole-brain restart) and is capped at ``max_refine``
    passes. At most 13 + 8 = 21 forward passes.

``normative``
    The sweep stops half-way (t = 25, 50: the anomaly is still masked and the network
    reconstructs it from normal surroundings); ``tau_stop`` is not read from the end of the tau
    curve but is the model's *normative* error level (``normative_threshold``: a multiple of the
    median tau(50) of clean scans, from the model card or refitted on a site's own clean scans);
    one more pass from the t = 50 mask keeps the voxels still above ``tau_stop`` (a mask only
    shrinks in this schedule). 2 + 1 = 3 forward passes. Further shrinking passes erode a
    clean brain's mask but erode the artifacts' faster (``docs/benchmarks.md``), so there is one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import EngineError

__all__ = ["Schedule", "SCHEDULES", "get_schedule"]


@dataclass(frozen=True)
class Schedule:
    """One test-time schedule.

    Attributes
    ----------
    name : str
    sweep_t : tuple of float
        Sweep positions, percent of the brain unmasked, increasing, last = 100 or below.
    early_stop : bool
        Stop the sweep once the gamma crossing is confirmed.
    confirm : int
        Number of consecutive observed slopes above gamma that confirm the crossing.
    refine_start : {"brain", "sweep", "sweep_t"}
        Refinement starts from the whole brain (paper/reference), from the
        sweep's last error map thresholded at tau_stop (warm start), or from the
        sweep's own last mask (thresholded at tau of the last sweep position).
    max_refine : int
        Cap on refinement forward passes (a safety net for the reference schedule).
    tol : float
        Relative change in mask size that ends the refinement (paper: 0.01).
    stop : {"tanfit", "normative"}
        ``tau_stop`` from the tan fit of the sweep (paper) or the model's normative level.
    shrink : bool
        Refinement masks are intersected with the previous mask (a voxel once unmasked stays
        unmasked); the paper lets voxels re-enter.
    """

    name: str
    sweep_t: tuple = field(default_factory=tuple)
    early_stop: bool = False
    confirm: int = 2
    refine_start: str = "brain"
    max_refine: int = 100
    tol: float = 0.01
    stop: str = "tanfit"
    shrink: bool = False

    @property
    def max_passes(self) -> int:
        return len(self.sweep_t) + self.max_refine + (1 if self.refine_start == "brain" else 0)


SCHEDULES: dict[str, Schedule] = {
    "reference": Schedule("reference", tuple(float(t) for t in range(1, 101)), early_stop=False,
                          refine_start="brain", max_refine=100),
    "fast": Schedule("fast", (10.0, 25.0, 40.0, 55.0, 65.0, 75.0, 82.0, 87.0, 91.0, 94.0, 96.0, 98.0, 99.0),
                     early_stop=True, confirm=2, refine_start="sweep", max_refine=8),
    "normative": Schedule("normative", (25.0, 50.0), early_stop=False, refine_start="sweep_t",
                          max_refine=1, stop="normative", shrink=True),
}


def get_schedule(schedule) -> Schedule:
    """Return a :class:`Schedule` from a name or pass one through."""
    if isinstance(schedule, Schedule):
        return schedule
    try:
        return SCHEDULES[str(schedule)]
    except KeyError:
        raise EngineError(f"unknown schedule {schedule!r}; expected one of {sorted(SCHEDULES)}") from None
