"""Scan-level detection metrics (positive = artifact, higher score = more anomalous).

All operating-point metrics are read off scikit-learn's ROC curve computed with
``drop_intermediate=False``: one operating point per *unique* score value, where the
threshold ``t`` flags every scan with ``score >= t``. Tied scores therefore move
together (a threshold can never separate two scans with the same score), which is the
only honest way to handle ties.

Definitions
-----------
AUROC
    ``sklearn.metrics.roc_auc_score`` (ties count one half).
AUPRC
    ``sklearn.metrics.average_precision_score`` (step-wise average precision, no
    interpolation).
FPR80 / FPR90
    Share of clean scans flagged at the FIRST threshold (walking from the highest score
    down) that catches at least 80% / 90% of the artifact scans (TPR >= 0.8 / 0.9).
    Lower is better.
FNR80 / FNR90
    Share of artifact scans missed at the BEST threshold that still passes at least
    80% / 90% of the clean scans (FPR <= 0.2 / 0.1); "best" = highest TPR among those
    thresholds, FNR = 1 - TPR. Lower is better. When even the strictest threshold
    (flag nothing) is the only one allowed, FNR = 1.

Difference from the paper's evaluation code
-------------------------------------------
The IterMask3D paper (section 4) describes FNR80 as the false negative rate "when
setting the TPR at 80%"; as described for its evaluation code, it is ``1 - TPR`` at the first ROC
point where TPR reaches 0.2 (so "FNR80" there is ~0.8 by construction whenever the
ROC curve has a point at TPR = 0.2), which is not a clinically meaningful operating
point. Here FNR80 is tied to the *clean-scan pass rate* (specificity >= 80%), the
mirror image of FPR80 (tied to sensitivity >= 80%). Numbers in this package are
therefore not comparable to the paper's FNR columns; AUROC, AUPRC and FPR80/FPR90 use
the same definitions as the paper.

Degenerate inputs (no scans, only one class, non-finite scores) return NaN with a
``reason`` string instead of raising.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    "DetectionMetrics",
    "detection_metrics",
    "fpr_at_tpr",
    "fnr_at_fpr",
    "threshold_at_fnr",
    "METRIC_DEFINITIONS",
    "METRIC_NAMES",
]

#: float tolerance for comparing rates such as 4/5 against 0.8
_EPS = 1e-9

METRIC_NAMES = ("AUROC", "AUPRC", "FPR80", "FPR90", "FNR80", "FNR90")

#: human-readable definitions, used by the HTML report and docs
METRIC_DEFINITIONS = {
    "AUROC": "Area under the ROC curve (artifact = positive, higher score = more "
             "anomalous); 0.5 = chance, 1 = perfect ranking. Ties count one half.",
    "AUPRC": "Average precision (area under the precision-recall curve, step-wise); "
             "chance level = share of artifact scans.",
    "FPR80": "Share of clean scans flagged at the first threshold that catches at "
             "least 80% of artifact scans. Lower is better.",
    "FPR90": "Share of clean scans flagged at the first threshold that catches at "
             "least 90% of artifact scans. Lower is better.",
    "FNR80": "Share of artifact scans missed at the best threshold that still passes "
             "at least 80% of clean scans (FPR <= 20%). Lower is better.",
    "FNR90": "Share of artifact scans missed at the best threshold that still passes "
             "at least 90% of clean scans (FPR <= 10%). Lower is better.",
}


@dataclass
class DetectionMetrics:
    """Scan-level metrics of one labelled set; NaN fields come with a ``reason``."""

    n: int = 0
    n_pos: int = 0
    n_neg: int = 0
    AUROC: float = math.nan
    AUPRC: float = math.nan
    FPR80: float = math.nan
    FPR90: float = math.nan
    FNR80: float = math.nan
    FNR90: float = math.nan
    reason: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def _clean(labels, scores):
    y = np.asarray(labels, dtype=float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"labels must be 0/1, got {sorted(set(y[bad].tolist()))[:5]}")
    keep = np.isfinite(s)
    return y[keep].astype(int), s[keep], int((~keep).sum())


def _degenerate(y) -> str | None:
    if y.size == 0:
        return "no labelled scans with a finite score"
    n_pos = int(y.sum())
    if n_pos == 0:
        return "only clean scans labelled (no artifact scans): metrics undefined"
    if n_pos == y.size:
        return "only artifact scans labelled (no clean scans): metrics undefined"
    return None


def _roc(y, s):
    # drop_intermediate=False keeps one point per unique score (ties move together)
    fpr, tpr, thr = roc_curve(y, s, pos_label=1, drop_intermediate=False)
    return fpr, tpr, thr


def fpr_at_tpr(labels: Sequence, scores: Sequence, tpr_target: float) -> float:
    """Share of clean scans flagged at the first threshold with TPR >= ``tpr_target``."""
    y, s, _ = _clean(labels, scores)
    if _degenerate(y):
        return math.nan
    fpr, tpr, _ = _roc(y, s)
    idx = int(np.argmax(tpr >= tpr_target - _EPS))  # tpr ends at 1, so always found
    return float(fpr[idx])


def fnr_at_fpr(labels: Sequence, scores: Sequence, max_fpr: float) -> float:
    """Share of artifact scans missed at the best threshold with FPR <= ``max_fpr``."""
    y, s, _ = _clean(labels, scores)
    if _degenerate(y):
        return math.nan
    fpr, tpr, _ = _roc(y, s)
    ok = fpr <= max_fpr + _EPS  # the first point (flag nothing) has fpr 0
    return float(1.0 - tpr[ok].max())


def threshold_at_fnr(labels: Sequence, scores: Sequence, fnr: float) -> float:
    """Highest score threshold whose miss rate on artifact scans is <= ``fnr``.

    Flag a scan when ``score >= threshold``. This is the threshold with the fewest
    flagged clean scans among those catching at least ``1 - fnr`` of the artifacts.
    Needs at least one artifact scan (clean scans are not required); NaN otherwise.
    """
    if not 0.0 <= fnr < 1.0:
        raise ValueError(f"fnr must be in [0, 1), got {fnr!r}")
    y, s, _ = _clean(labels, scores)
    pos = np.sort(s[y == 1])[::-1]
    if pos.size == 0:
        return math.nan
    # need k = ceil((1 - fnr) * n_pos) positives at or above the threshold
    k = max(1, int(math.ceil((1.0 - fnr) * pos.size - _EPS)))
    return float(pos[k - 1])


def detection_metrics(labels: Sequence, scores: Sequence) -> DetectionMetrics:
    """AUROC, AUPRC, FPR80/90, FNR80/90 for binary ``labels`` (1 = artifact).

    Scans with a non-finite score are dropped (counted in ``extra['n_dropped']``).
    Degenerate sets (empty, one class only) give NaN metrics and a ``reason``.
    """
    y, s, n_dropped = _clean(labels, scores)
    out = DetectionMetrics(n=int(y.size), n_pos=int(y.sum()), n_neg=int(y.size - y.sum()))
    out.extra["n_dropped"] = n_dropped
    reason = _degenerate(y)
    if reason:
        out.reason = reason
        return out
    out.AUROC = float(roc_auc_score(y, s))
    out.AUPRC = float(average_precision_score(y, s, pos_label=1))
    out.FPR80 = fpr_at_tpr(y, s, 0.8)
    out.FPR90 = fpr_at_tpr(y, s, 0.9)
    out.FNR80 = fnr_at_fpr(y, s, 0.2)
    out.FNR90 = fnr_at_fpr(y, s, 0.1)
    return out
