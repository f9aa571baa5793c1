"""Synthetic cohorts from ICBM152 and acquisition-artifact simulators.

Public API::

    from qc_pipeline.synth import (make_subject, apply_artifact, draw_artifact_params,
                                   replay_artifact, ARTIFACTS, write_cohort)
    img, meta = make_subject(seed=3, contrast="T1w", site="A")
    bad = apply_artifact(img, "ghosting", 0.7, rng=0)
    # the same in two steps: random draw, deterministic replay (bad.extra["artifact"] == params)
    params = draw_artifact_params(img, "ghosting", 0.7, rng=0)
    again = replay_artifact(img, "ghosting", params)

Importing has no side effects (torchio is imported only when a torchio-based
artifact runs).
"""
from .artifacts import ARTIFACTS, PAPER_ARTIFACTS, apply_artifact, draw_artifact_params, replay_artifact
from .bids import LABEL_COLUMNS, LABELS_RELPATH, read_labels, write_cohort, write_demo
from .errors import OutputExistsError, SynthError, UnknownArtifactError
from .simulator_base import head_info
from .subject import CONTRASTS, SITES, finalize_dtype, make_subject

__all__ = [
    "ARTIFACTS", "PAPER_ARTIFACTS", "apply_artifact", "draw_artifact_params", "replay_artifact",
    "head_info", "make_subject",
    "finalize_dtype", "write_cohort", "write_demo", "read_labels", "LABEL_COLUMNS",
    "LABELS_RELPATH", "CONTRASTS", "SITES", "SynthError", "UnknownArtifactError",
    "OutputExistsError",
]
