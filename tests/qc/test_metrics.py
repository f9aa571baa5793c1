"""Hand-computed detection metrics: these numbers change only if a definition changes."""
import math

import numpy as np
import pytest

from qc_pipeline.qc.metrics import (detection_metrics, fnr_at_fpr, fpr_at_tpr,
                                 threshold_at_fnr)

# Example 1 (no ties): clean 0.1..0.5, artifact 0.35, 0.6..0.9
Y1 = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
S1 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.35, 0.6, 0.7, 0.8, 0.9]

# Example 2 (ties across classes at 0.5, within clean at 0.1)
ART2 = [0.9, 0.8, 0.5, 0.5, 0.2]
CLEAN2 = [0.5, 0.3, 0.1, 0.1, 0.0]
Y2 = [1] * 5 + [0] * 5
S2 = ART2 + CLEAN2


def test_example_without_ties():
    m = detection_metrics(Y1, S1)
    # TPR reaches 0.8 at t=0.6 with no clean scan >= 0.6
    assert m.FPR80 == pytest.approx(0.0)
    # TPR reaches 1.0 (first >= 0.9) at t=0.35: clean 0.4, 0.5 flagged -> 2/5
    assert m.FPR90 == pytest.approx(0.4)
    # FPR <= 0.2 allows t=0.5 (one clean flagged): TPR 0.8 -> FNR 0.2
    assert m.FNR80 == pytest.approx(0.2)
    # FPR <= 0.1 allows t=0.6: TPR 0.8 -> FNR 0.2
    assert m.FNR90 == pytest.approx(0.2)
    assert m.AUROC == pytest.approx(23 / 25)
    assert m.AUPRC == pytest.approx(0.8 + 0.2 * 5 / 7)
    assert (m.n, m.n_pos, m.n_neg, m.reason) == (10, 5, 5, None)


def test_example_with_ties_moves_tied_scans_together():
    m = detection_metrics(Y2, S2)
    # the 4th artifact is only caught at t=0.5, which also flags the clean 0.5 -> 1/5
    # (a tie-unaware walk putting artifacts first would report 0.0)
    assert m.FPR80 == pytest.approx(0.2)
    assert m.FPR90 == pytest.approx(0.4)      # t=0.2 flags clean 0.5 and 0.3
    assert m.FNR80 == pytest.approx(0.2)      # t=0.5 has FPR 0.2 exactly: allowed
    assert m.FNR90 == pytest.approx(0.6)      # FPR <= 0.1 only up to t=0.8: TPR 0.4
    assert m.AUROC == pytest.approx(22 / 25)  # tie at 0.5 counts one half
    assert m.AUPRC == pytest.approx(0.2 + 0.2 + 0.4 * 0.8 + 0.2 * 5 / 7)


def test_fnr_is_not_the_papers_code_definition():
    # the paper's code: 1 - TPR at the first ROC point with TPR >= 0.2 -> 0.8 here
    assert fnr_at_fpr(Y2, S2, 0.2) == pytest.approx(0.2)
    assert fnr_at_fpr(Y2, S2, 0.2) != pytest.approx(0.8)


def test_helpers_match_and_order_does_not_matter():
    rng = np.random.default_rng(0)
    perm = rng.permutation(10)
    y = np.array(Y2)[perm]
    s = np.array(S2)[perm]
    m = detection_metrics(y, s)
    assert m.FPR80 == fpr_at_tpr(Y2, S2, 0.8)
    assert m.FNR90 == fnr_at_fpr(Y2, S2, 0.1)


def test_perfect_and_inverted_scores():
    m = detection_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert (m.AUROC, m.FPR80, m.FPR90, m.FNR80, m.FNR90) == (1.0, 0.0, 0.0, 0.0, 0.0)
    m = detection_metrics([0, 0, 1, 1], [0.8, 0.9, 0.1, 0.2])
    assert m.AUROC == 0.0
    assert m.FPR80 == 1.0          # every clean scan flagged before any artifact is caught
    assert m.FNR80 == 1.0          # nothing caught while passing >= 80% of clean scans


def test_all_scores_tied():
    m = detection_metrics([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3])
    assert m.AUROC == 0.5
    assert m.FPR80 == 1.0          # only threshold catching artifacts flags everything
    assert m.FNR80 == 1.0          # only "flag nothing" has FPR <= 0.2


@pytest.mark.parametrize("labels, reason", [([0, 0, 0], "only clean"), ([1, 1], "only artifact"),
                                            ([], "no labelled")])
def test_degenerate_gives_nan_and_reason(labels, reason):
    m = detection_metrics(labels, [0.1] * len(labels))
    assert all(math.isnan(getattr(m, k)) for k in ("AUROC", "AUPRC", "FPR80", "FNR90"))
    assert reason in m.reason
    assert math.isnan(fpr_at_tpr(labels, [0.1] * len(labels), 0.8))


def test_nonfinite_scores_are_dropped():
    m = detection_metrics(Y1 + [1], S1 + [float("nan")])
    assert m.n == 10 and m.extra["n_dropped"] == 1
    assert m.AUROC == pytest.approx(23 / 25)


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="0/1"):
        detection_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="length"):
        detection_metrics([0, 1], [0.1])


def test_threshold_at_fnr():
    assert threshold_at_fnr(Y2, S2, 0.2) == 0.5   # misses only the 0.2 artifact
    assert threshold_at_fnr(Y2, S2, 0.5) == 0.5   # ceil(2.5) = 3 caught: third is a 0.5
    assert threshold_at_fnr(Y2, S2, 0.0) == 0.2
    assert threshold_at_fnr(Y2, S2, 0.39) == 0.5  # must catch ceil(0.61 * 5) = 4
    assert threshold_at_fnr(Y2, S2, 0.6) == 0.8   # must catch 2
    assert math.isnan(threshold_at_fnr([0, 0], [0.1, 0.2], 0.2))
    with pytest.raises(ValueError):
        threshold_at_fnr(Y2, S2, 1.0)
