"""Group level: rank scans, flag outliers per site, summarise sites, score ratings.

Reads only the derivatives folder (``OUTPUT_DIR/sub-*/[ses-*/]anat/*_qc.json`` and the
NIfTIs they name); never the raw BIDS tree.

The score
---------
Each qc.json carries ``qc_score`` (``qc_pipeline.qc.score``: the largest robust z of
IterMask3D's anomaly and the image-quality measurements against the model's clean
reference scans) and the measurements themselves. The group level scores every scan once
more against *its own site's* scans (``qc_score_site``: per measurement, location and scale
of the site's clean scans taken from the good side of the site's distribution, the scale
at least the reference's; :func:`qc_pipeline.qc.score.relative_scores`), because a site's
clean scans can differ from the reference scans (scanner, sequence, real instead of
synthetic anatomy): the site score follows them, stays anchored on the clean scans when
many of the site's scans share an artifact, and the reference's scale keeps a tight site
from flagging trivia. Sites with fewer than ``min_site_size`` scans
with measurements (of the same model) are scored against the pool of all sites. In a site
larger than the engine's neighbourhood, each scan is scored against the same nearest scans its
engine mask is compared with (:mod:`qc_pipeline.sitenorm`; median and MAD of that
neighbourhood, :func:`qc_pipeline.qc.score.relative_z`): a site of several scanners or of a
few people scanned many times compares each scan with its own kind.

Scans are ranked, flagged and measured by ``qc_score_site``; when any successful scan of
a suffix has none (older derivatives, a model without a ``qc_score`` reference, too few
scans), by ``qc_score``; when any lacks that too, by ``anomaly_fraction``. The rule text
says which. Below, "score" is whichever is used.

Flag rules
----------
A scan's verdict, ``flagged``, is true when any of three flags fires: the score's flag
(``score_flagged``, one of the rules ``site z``, ``robust``, ``fnr`` below), the background
flag (``background_flagged``) and the engine's flag against the site's own scans
(``engine_flagged``, :mod:`qc_pipeline.sitenorm`); ``flag_reasons`` names each that fired.
The engine and the measurements see different things (a compact region no longer like its
neighbours in the site's normal heads, against a measurement beyond the site's clean
spread), so either alone is a reason to look at the scan. A scan that could not be screened
(``status`` error: unreadable, no brain found) is flagged as well, with ``flag_reasons``
"not screened: <error>": it needs a person's look as much as a bad one does; it has no rank.
The labelled metrics (AUROC ... FNR90) are of the score, over the screened scans.

``site z`` (default when ranking by ``qc_score_site``)
    The score flags a scan when ``qc_score_site > site_z`` (default 5): its measurements lie
    more than ``site_z`` robust SDs beyond the site's clean scans, one alone or several
    together (the root of their summed squares). The site score is already a distance from
    the clean side of the site in robust SDs, so the cut needs no second robust estimate
    (``docs/benchmarks.md``: how many clean scans exceed it on synthetic and real sites).
``robust`` (default when ranking by ``qc_score`` or ``anomaly_fraction``)
    Per site, a scan is flagged when ``score > median + k * s`` where ``s`` is
    the scaled MAD (``median(|x - median|) / 0.67449``, i.e. about ``1.4826 x MAD``: the
    normal-consistent robust SD, ``scipy.stats.median_abs_deviation(x, scale="normal")``) of
    that site's successful scans, ``k = 3`` by default (``mad_k``). Sites with fewer than
    ``min_site_size`` (default 8) successful scans use the pooled distribution of all
    sites of the same suffix instead. When the MAD is 0 (e.g. most scans score exactly
    0), ``s`` falls back to ``1.2533 * mean(|x - median|)``; when that is 0 too, any scan
    scoring above the median is flagged.
``background`` (always robust, a separate flag)
    The out-of-head ``background_artifact_fraction`` (``qc_pipeline.qc.background``) gets its
    own per-site flag with the same robust rule (median + ``background_k`` x scaled MAD,
    ``background_k`` = 4 by default: the background of clean scans differs between people
    and scanners, and at 3 a site of three real heads flagged 3 of its 30 clean copies,
    ``docs/benchmarks.md``; the same MAD fallbacks and pooling of small sites) and a floor: a scan is background-flagged when its fraction exceeds
    ``max(median + k x s, background_min_fraction)`` (default 0.002 = 0.2 % of the
    background), because on most clean scans the fraction is exactly 0 and the MAD rule
    alone would flag any non-zero value. Scans without the statistic (older qc.json,
    ``available: false``) are never background-flagged and do not enter the thresholds.
    A scan whose engine mask was compared with its site's nearest scans is background-flagged
    against the same scans (:func:`_nearest_thresholds`). It never changes the score's flag.
``fnr`` (``flag_at_fnr=0.2`` with labels)
    One threshold calibrated on all labelled scans of the suffix (pooled over sites, since
    few artifact scans per site make per-site calibration unstable): the highest
    score such that at most ``flag_at_fnr`` of the labelled artifact scans
    fall below it; a scan is flagged when ``score >= threshold``. Without
    labelled artifact scans for a suffix, that suffix falls back to the robust rule and
    the rule text says so.

Labels and ratings: :mod:`qc_pipeline.labels`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from scipy.stats import median_abs_deviation, rankdata

from .errors import QCPipelineError
from .qc import metrics as _metrics
from .derivatives import QCRecord, load_qc_records, normalise_bids_name, site_mask_path
from .io import atomic_write_text
from .labels import load_ratings
from .sitenorm import (DEFAULT_SITE_NEIGHBOURS, DEFAULT_SITE_NORM_FACTOR, DEFAULT_SITE_SPREAD_K, ScanMaps,
                       SiteNormError, site_normative)

__all__ = [
    "write_group_tables",
    "GroupTables",
    "SuffixTables",
    "scan_maps",
    "GroupError",
    "ROW_COLUMNS",
    "contributor_names",
    "SITE_COLUMNS",
    "DEFAULT_MAD_K",
    "DEFAULT_SITE_Z",
    "DEFAULT_MIN_SITE_SIZE",
    "DEFAULT_BACKGROUND_MIN_FRACTION",
    "DEFAULT_BACKGROUND_K",
    "DEFAULT_ENGINE_MIN_FRACTION",
    "apply_site_normative",
    "FLAG_SITE_COLUMNS",
]

LOGGER = logging.getLogger(__name__)

DEFAULT_MAD_K = 3.0
#: flag cut of the site score (robust z against the site's clean scans)
DEFAULT_SITE_Z = 5.0
DEFAULT_MIN_SITE_SIZE = 8
#: floor of the background flag threshold (share of the background volume)
DEFAULT_BACKGROUND_MIN_FRACTION = 0.002
DEFAULT_BACKGROUND_K = 4.0
#: floor of the engine's site-normative flag threshold (share of the brain)
DEFAULT_ENGINE_MIN_FRACTION = 0.005
#: ``sqrt(pi / 2)``: mean absolute deviation to SD for normal data (the MAD-is-0 fallback)
MEANAD_SCALE = 1.2533
POOLED_SITE = "ALL_SITES"

ROW_COLUMNS = [
    "bids_name", "subject", "session", "acquisition", "run", "suffix", "site", "status",
    "anomaly_voxels", "anomaly_fraction", "anomaly_mm3", "rank", "percentile_in_site",
    "flagged", "error", "qc_score", "qc_score_driver", "qc_score_contributors", "qc_score_site",
    "qc_score_site_driver", "qc_score_site_contributors",
    "threshold", "score_flagged", "label", "rated_artifacts", "warnings", "model_id", "model_adapted_from",
    "report",
    "background_artifact_fraction", "background_ghost_ratio", "background_snr",
    "background_flagged", "background_threshold", "background_note",
    "site_anomaly_voxels", "site_anomaly_fraction", "engine_flagged", "engine_threshold", "flag_reasons",
]
SITE_COLUMNS = [
    "site", "n_scans", "n_failed", "median_fraction", "p95_fraction", "threshold",
    "threshold_rule", "n_flagged", "n_labelled", "n_artifact", "AUROC", "AUPRC",
    "FPR80", "FPR90", "FNR80", "FNR90", "metrics_note",
]
#: per-site columns of the three flags (after the anomaly and metric columns)
FLAG_SITE_COLUMNS = [
    "n_score_flagged",
    "median_background_fraction", "background_threshold", "background_rule", "n_background_flagged",
    "median_site_anomaly_fraction", "engine_threshold", "engine_rule", "n_engine_flagged",
]



class GroupError(QCPipelineError, ValueError):
    """Bad arguments to the group level (e.g. ``flag_at_fnr`` without labels)."""


# --------------------------------------------------------------------------- stats
def _robust_threshold(x: np.ndarray, k: float) -> tuple[float, float, float]:
    """Robust upper cut ``median + k x s`` of the scores ``x``.

    Parameters
    ----------
    x : numpy.ndarray
        Finite scores (at least one).
    k : float
        How many robust SDs above the median the cut lies.

    Returns
    -------
    threshold, median, scale : float
        ``scale`` is the normal-scaled MAD; when that is 0 (at least half the scores equal
        the median, e.g. many scans score exactly 0), ``1.2533 x mean |x - median|`` so
        that the few scores off the median still get a finite cut; when that is 0 too,
        the cut is the median itself.
    """
    med = float(np.median(x))
    scale = float(median_abs_deviation(x, scale="normal"))
    if scale == 0.0:
        scale = MEANAD_SCALE * float(np.mean(np.abs(x - med)))
    return med + k * scale, med, scale


#: first characters that make a spreadsheet read a cell as a formula
_FORMULA_START = frozenset("=+-@\t\r")


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.6g}"
    if isinstance(v, str) and v[:1] in _FORMULA_START:
        # text a spreadsheet would run as a formula (a site name from participants.tsv, an
        # error message): quoted as OWASP advises for CSV injection; numbers are not text
        return "'" + v
    return str(v)


def _csv_text(rows: Iterable[Mapping], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r.get(c)) for c in columns})
    return buf.getvalue()


def _fnr_fallback(flag_at_fnr: float | None) -> str:
    """Prefix of the rule text when an FNR calibration was asked for but had no artifact scans."""
    if flag_at_fnr is None:
        return ""
    return f"no labelled artifact scans to calibrate FNR<={flag_at_fnr:g}; fallback: "


def compute_suffix_tables(records: list[QCRecord], *, labels: Mapping[str, int] | None,
                          flag_at_fnr: float | None, mad_k: float,
                          min_site_size: int, background_k: float | None = DEFAULT_BACKGROUND_K,
                          background_min_fraction: float = DEFAULT_BACKGROUND_MIN_FRACTION,
                          site_z: float = DEFAULT_SITE_Z, artifacts: Mapping[str, list] | None = None,
                          engine_min_fraction: float = DEFAULT_ENGINE_MIN_FRACTION,
                          ) -> tuple[list[dict], list[dict], dict]:
    """Rows (ranked), site rows and a summary for the records of ONE suffix (``artifacts``:
    the raters' artifact tags per scan, shown in ``rated_artifacts``)."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    sites = sorted({r.site for r in records})
    _set_site_scores(ok, min_site_size=min_site_size)
    use_site = bool(ok) and all(math.isfinite(r.site_score) for r in ok)
    use_qc = bool(ok) and all(math.isfinite(r.qc_score) for r in ok)
    score_name = "qc_score_site" if use_site else "qc_score" if use_qc else "anomaly_fraction"

    def S(r: QCRecord) -> float:  # noqa: N802 - the score this suffix is ranked by
        return r.site_score if use_site else r.qc_score if use_qc else r.fraction

    pooled = np.array([S(r) for r in ok], dtype=float)
    lab = {} if labels is None else {r.bids_name: labels[normalise_bids_name(r.bids_name)]
                                     for r in records if normalise_bids_name(r.bids_name) in labels}
    tags = {r.bids_name: "; ".join((artifacts or {})[normalise_bids_name(r.bids_name)])
            for r in records if normalise_bids_name(r.bids_name) in (artifacts or {})}

    # ---- threshold per site
    site_thr: dict[str, tuple[float, str]] = {}
    strict: bool = True  # robust: flag score > thr; fnr: flag score >= thr
    rule_summary = ""
    fnr_thr = math.nan
    if flag_at_fnr is not None:
        ly = [lab[r.bids_name] for r in ok if r.bids_name in lab]
        ls = [S(r) for r in ok if r.bids_name in lab]
        if sum(ly) > 0:
            fnr_thr = _metrics.threshold_at_fnr(ly, ls, flag_at_fnr)
    if math.isfinite(fnr_thr):
        strict = False
        n_lab, n_art = len(ly), int(sum(ly))
        rule = (f"calibrated at FNR<={flag_at_fnr:g}: {score_name} >= {fnr_thr:.6g} "
                f"(pooled over sites; {n_lab} labelled scans, {n_art} artifact)")
        rule_summary = rule
        for s in sites:
            site_thr[s] = (fnr_thr, rule)
    elif use_site:
        prefix = _fnr_fallback(flag_at_fnr)
        rule_summary = (f"{prefix}site z: flag when qc_score_site > {site_z:g} (the measurements more than "
                        f"{site_z:g} robust SDs beyond the site's clean scans most like it, alone or "
                        "together)")
        site_thr = {s: (float(site_z), rule_summary) for s in sites}
    else:
        prefix = _fnr_fallback(flag_at_fnr)
        site_thr = _site_thresholds(
            {s: np.array([S(r) for r in ok if r.site == s], dtype=float) for s in sites},
            pooled, k=mad_k, min_site_size=min_site_size, score=score_name,
            prefix=prefix, none="no successful scans: nothing to flag")
        rule_summary = (f"{prefix}robust per site: flag when {score_name} > median + "
                        f"{mad_k:g} x scaled MAD (1.4826 x MAD) of the site's scores; sites with "
                        f"fewer than {min_site_size} successful scans use the pooled distribution")

    def is_score_flagged(r: QCRecord) -> bool:
        thr = site_thr[r.site][0]
        if not math.isfinite(thr):
            return False
        return S(r) > thr if strict else S(r) >= thr

    bg_k = mad_k if background_k is None else background_k
    bg_thr, bg_summary = _measure_thresholds(
        ok, sites, "background_fraction", score="background_artifact_fraction",
        what="the background statistic", label="background artifact, robust per site", k=bg_k,
        floor=background_min_fraction, min_site_size=min_site_size)
    bg_near = _nearest_thresholds(ok, "background_fraction", k=bg_k, floor=background_min_fraction,
                                  min_site_size=min_site_size)
    if bg_near:
        bg_summary += ("; a scan compared with its site's nearest scans (those its engine mask is "
                       "compared with) takes the median and scaled MAD of those scans, the MAD at "
                       "least the site's usual one among near scans")

    def bg_threshold(r: QCRecord) -> float:
        return bg_near.get(id(r), bg_thr[r.site][0])

    def is_bg_flagged(r: QCRecord) -> bool:
        thr = bg_threshold(r)
        x = r.background_fraction
        return bool(r.ok and math.isfinite(thr) and math.isfinite(x) and x > thr)

    en_thr, en_summary = _measure_thresholds(
        ok, sites, "site_anomaly_fraction", score="site_anomaly_fraction",
        what="a site-normative anomaly", label="engine against the site's own scans", k=mad_k,
        floor=engine_min_fraction, min_site_size=min_site_size)

    def is_en_flagged(r: QCRecord) -> bool | None:
        thr, x = en_thr[r.site][0], r.site_anomaly_fraction
        if not (r.ok and math.isfinite(x)):
            return None
        return bool(math.isfinite(thr) and x > thr)

    def is_flagged(r: QCRecord) -> bool:
        """The scan's verdict: any flag; a scan that could not be screened needs a look too."""
        return bool(not r.ok or is_score_flagged(r) or is_bg_flagged(r) or is_en_flagged(r))

    # ---- rows
    ok_sorted = sorted(ok, key=lambda r: (-S(r), r.bids_name))
    # rank 1 = the highest score; tied scores share the smallest rank of the tie. Every
    # score here is finite (an ok record has a finite anomaly_fraction, and qc_score or
    # qc_score_site is used only when every ok record has one); failed scans get no rank.
    ranks = [int(x) for x in rankdata([-S(r) for r in ok_sorted], method="min")]
    site_scores = {s: np.array([S(r) for r in ok if r.site == s], dtype=float) for s in sites}
    rows = []
    for r, rank in zip(ok_sorted, ranks):
        xs = site_scores[r.site]
        pct = 100.0 * float(np.mean(xs <= S(r)))
        rows.append(_row(r, lab, tags, rank=rank, pct=pct, flagged=is_flagged(r),
                         score_flagged=is_score_flagged(r), thr=site_thr[r.site][0],
                         bg_flagged=is_bg_flagged(r), bg_thr=bg_threshold(r), strict=strict, score_name=score_name, score=S(r),
                         en_flagged=is_en_flagged(r), en_thr=en_thr[r.site][0]))
    for r in sorted(failed, key=lambda r: r.bids_name):
        rows.append(_row(r, lab, tags, rank=None, pct=None, flagged=True, score_flagged=None,
                         thr=site_thr[r.site][0], bg_flagged=None, bg_thr=bg_thr[r.site][0], strict=strict,
                         score_name=score_name))

    # ---- sites
    site_rows = []
    groups = [(s, [r for r in records if r.site == s]) for s in sites]
    if len(sites) > 1:
        groups.append((POOLED_SITE, records))
    for s, recs in groups:
        xs = np.array([r.fraction for r in recs if r.ok], dtype=float)
        if s == POOLED_SITE:
            thr, rule = (fnr_thr, rule_summary) if not strict else (math.nan, "per site (see rows above)")
        else:
            thr, rule = site_thr[s]
        row = {
            "site": s, "n_scans": len(recs), "n_failed": sum(not r.ok for r in recs),
            "median_fraction": float(np.median(xs)) if xs.size else math.nan,
            "p95_fraction": float(np.percentile(xs, 95)) if xs.size else math.nan,
            "threshold": thr, "threshold_rule": rule,
            "n_flagged": sum(1 for r in recs if is_flagged(r)),
            "n_score_flagged": sum(1 for r in recs if r.ok and is_score_flagged(r)),
        }
        bx = np.array([r.background_fraction for r in recs if r.ok], dtype=float)
        bx = bx[np.isfinite(bx)]
        b_thr, b_rule = ((math.nan, "per site (see rows above)") if s == POOLED_SITE else bg_thr[s])
        row.update({
            "median_background_fraction": float(np.median(bx)) if bx.size else math.nan,
            "background_threshold": b_thr, "background_rule": b_rule,
            "n_background_flagged": sum(1 for r in recs if is_bg_flagged(r)),
        })
        ex = np.array([r.site_anomaly_fraction for r in recs if r.ok], dtype=float)
        ex = ex[np.isfinite(ex)]
        e_thr, e_rule = ((math.nan, "per site (see rows above)") if s == POOLED_SITE else en_thr[s])
        row.update({
            "median_site_anomaly_fraction": float(np.median(ex)) if ex.size else math.nan,
            "engine_threshold": e_thr, "engine_rule": e_rule,
            "n_engine_flagged": sum(1 for r in recs if is_en_flagged(r)),
        })
        if labels is not None:
            ly = [lab[r.bids_name] for r in recs if r.ok and r.bids_name in lab]
            ls = [S(r) for r in recs if r.ok and r.bids_name in lab]
            m = _metrics.detection_metrics(ly, ls)
            row.update({"n_labelled": m.n, "n_artifact": m.n_pos,
                        **{k: getattr(m, k) for k in _metrics.METRIC_NAMES},
                        "metrics_note": m.reason or ""})
        site_rows.append(row)
    summary = {"rule": rule_summary, "strict": strict, "site_thresholds": site_thr,
               "background_rule": bg_summary, "background_thresholds": bg_thr,
               "n_background_flagged": sum(1 for r in ok if is_bg_flagged(r)),
               "engine_rule": en_summary, "engine_thresholds": en_thr,
               "n_engine_flagged": sum(1 for r in ok if is_en_flagged(r)),
               "n_flagged": sum(1 for r in records if is_flagged(r)),
               "n_score_flagged": sum(1 for r in ok if is_score_flagged(r)),
               "n_scans": len(records), "n_failed": len(failed), "sites": sites,
               "score": score_name,
               "labels": labels is not None}
    return rows, site_rows, summary


def scan_maps(r: QCRecord) -> ScanMaps | None:
    """The participant-level files of ``r`` for the site reference (None when missing).

    A model with a spread map writes the mask before its spread rule as the candidate: the
    site brings its own spread, so the site's mask starts from that one."""
    fit = r.data.get("template_fit")
    err, mask = r.resolve("error_map_file"), r.resolve("mask_file")
    voxels, fraction = r.voxels, r.fraction
    candidate = r.resolve("candidate_mask_file")
    if candidate:
        try:
            voxels = float(r.data["candidate_anomaly_voxels"])
            fraction = float(r.data["candidate_anomaly_fraction"])
            mask = candidate
        except (KeyError, TypeError, ValueError):
            pass  # an incomplete record: the anomaly mask itself
    if not (r.ok and isinstance(fit, dict) and fit.get("affine") is not None and err and mask):
        return None
    return ScanMaps(key=r.bids_name, error_map=err, mask=mask,
                    out_mask=site_mask_path(r.path, r.bids_name),
                    template_to_world=np.asarray(fit["affine"], dtype=float),
                    anomaly_voxels=voxels, anomaly_fraction=fraction)


def apply_site_normative(records: list[QCRecord], *, factor: float = DEFAULT_SITE_NORM_FACTOR,
                         min_site_size: int = DEFAULT_MIN_SITE_SIZE,
                         spread_k: float | None = DEFAULT_SITE_SPREAD_K,
                         neighbours: int | None = DEFAULT_SITE_NEIGHBOURS) -> int:
    """Set ``site_anomaly_fraction`` / ``site_anomaly_voxels`` of the records of ONE suffix
    (and write their ``desc-siteanomaly_mask``) against the reference of their model and site
    (:func:`qc_pipeline.sitenorm.site_normative`: each scan against the ``neighbours`` scans of
    its site most like it, None: the whole site); a site with fewer than ``min_site_size``
    usable scans uses the pool of its model's scans of every site. Returns the number of
    records set."""
    by_model: dict[str, list[tuple[QCRecord, ScanMaps]]] = {}
    for r in records:
        r.site_anomaly_fraction = r.site_anomaly_voxels = math.nan
        r.site_neighbours = ()
        sm = scan_maps(r)
        if sm is not None:
            by_model.setdefault(str(r.data.get("model_id") or ""), []).append((r, sm))
    n = 0
    for model, items in sorted(by_model.items()):
        groups: list[list[tuple[QCRecord, ScanMaps]]] = []
        small = []
        for site in sorted({r.site for r, _ in items}):
            g = [it for it in items if it[0].site == site]
            (groups if len(g) >= min_site_size else small).append(g)
        if small and len(items) >= min_site_size:
            targets = {sm.key for g in small for _, sm in g}
            found = _site_normative_safe(items, factor, spread_k, neighbours, min_site_size, model, "pooled",
                                         targets=targets)
            for g in small:
                n += _assign(g, found)
        for g in groups:
            n += _assign(g, _site_normative_safe(g, factor, spread_k, neighbours, min_site_size, model,
                                                 g[0][0].site))
    return n


def _site_normative_safe(items, factor, spread_k, neighbours, min_site_size, model, site, targets=None) -> dict:
    try:
        return site_normative([sm for _, sm in items], factor=factor, min_scans=min_site_size,
                              targets=targets, spread_k=spread_k, neighbours=neighbours)
    except SiteNormError as exc:
        LOGGER.warning("site %s (model %s): no site-normative masks: %s", site, model, exc)
        return {}


def _assign(group, found) -> int:
    n = 0
    for r, sm in group:
        a = found.get(sm.key)
        if a is not None:
            r.site_anomaly_fraction, r.site_anomaly_voxels = a.fraction, float(a.voxels)
            r.site_neighbours = a.reference
            n += 1
    return n


def _set_site_scores(ok: list[QCRecord], *, min_site_size: int) -> None:
    """Set each record's score against its own site (``site_score``, ``site_driver``).

    Records are grouped by model (their ``qc_score_reference`` must match) and site; a
    site with fewer than ``min_site_size`` records with measurements is scored against the
    pool of its model's records of every site; a pool that small gets no site score. A record
    whose engine mask was compared with some of its site's scans (``site_neighbours``, set by
    :func:`apply_site_normative`) is scored against the same scans
    (:func:`qc_pipeline.qc.score.relative_z`), the others against the whole site (or pool).
    """
    from .qc.score import relative_scores_with_contributors

    def scored(group: list[QCRecord]) -> list:
        index = {r.bids_name: i for i, r in enumerate(group)}
        nbs = [[index[k] for k in r.site_neighbours if k in index] or None for r in group]
        return relative_scores_with_contributors([r.data["quality_features"] for r in group], reference,
                                                 min_scans=min_site_size,
                                                 neighbours=nbs if any(nbs) else None)

    by_model: dict[str, list[QCRecord]] = {}
    for r in ok:
        r.site_score, r.site_driver, r.site_contributors = math.nan, None, []
        ref = r.data.get("qc_score_reference")
        if isinstance(ref, dict) and ref and isinstance(r.data.get("quality_features"), dict):
            by_model.setdefault(json.dumps(ref, sort_keys=True), []).append(r)
    for key, recs in by_model.items():
        reference = {"features": json.loads(key)}
        pooled = None
        for site in sorted({r.site for r in recs}):
            group = [r for r in recs if r.site == site]
            if len(group) < min_site_size:
                if len(recs) < min_site_size:
                    continue
                if pooled is None:
                    pooled = dict(zip((id(r) for r in recs), scored(recs)))
                scores = [pooled[id(r)] for r in group]
            else:
                scores = scored(group)
            for r, (sc, drv, contrib) in zip(group, scores):
                if sc is not None:
                    r.site_score, r.site_driver, r.site_contributors = sc, drv, contrib


def _site_thresholds(by_site: Mapping[str, np.ndarray], pooled: np.ndarray, *, k: float,
                     min_site_size: int, score: str, prefix: str = "", floor: float | None = None,
                     none: str) -> dict[str, tuple[float, str]]:
    """Robust flag threshold per site, ``{site: (threshold, rule)}``.

    ``median + k x scaled MAD`` of the site's scores, or of ``pooled`` when the site has
    fewer than ``min_site_size`` scores; raised to ``floor`` when given; NaN (rule ``none``)
    when there is nothing to pool.
    """
    out: dict[str, tuple[float, str]] = {}
    for s, xs in by_site.items():
        if xs.size >= min_site_size:
            x, where = xs, "robust per site"
        elif pooled.size:
            x, where = pooled, f"robust, pooled over sites (site has {xs.size} < {min_site_size} scans)"
        else:
            out[s] = (math.nan, prefix + none)
            continue
        thr, med, sc = _robust_threshold(x, k)
        formula = f"median + {k:g} x scaled MAD"
        value = f"{med:.4g} + {k:g} x {sc:.4g}"
        if floor is not None:
            thr = max(thr, floor)
            formula, value = f"max({formula}, {floor:g})", f"max({value}, {floor:g})"
        out[s] = (thr, f"{prefix}{where}: {score} > {formula} = {value} = {thr:.6g} (n={x.size})")
    return out


def _measure_thresholds(ok: list[QCRecord], sites: list[str], attr: str, *, score: str, what: str,
                        label: str, k: float, floor: float, min_site_size: int) -> tuple[dict, str]:
    """Per-site flag thresholds ``{site: (threshold, rule)}`` of one per-scan measurement
    (the record attribute ``attr``, named ``score`` in the rule; ``what`` names the measurement
    in the "nothing to flag" rule) and a summary sentence that starts with ``label``.

    ``max(median + k x scaled MAD, floor)`` over the site's scans that have the
    measurement (:func:`_site_thresholds`); scans without it never enter the threshold.
    """
    have = [r for r in ok if math.isfinite(getattr(r, attr))]
    out = _site_thresholds(
        {s: np.array([getattr(r, attr) for r in have if r.site == s], dtype=float) for s in sites},
        np.array([getattr(r, attr) for r in have], dtype=float), k=k,
        min_site_size=min_site_size, score=score, floor=floor,
        none=f"no scans with {what}: nothing to flag")
    summary = (f"{label}: flag when {score} > max(median + {k:g} x scaled MAD of the "
               f"site's scans, {floor:g}); sites with fewer than {min_site_size} scans with it use the "
               f"pooled distribution")
    return out, summary


def _nearest_thresholds(ok: list[QCRecord], attr: str, *, k: float, floor: float,
                        min_site_size: int) -> dict[int, float]:
    """Per-scan flag thresholds of one measurement against the scan's nearest scans,
    ``{id(record): threshold}`` for the records that have them.

    A scan whose engine mask was compared with its site's nearest scans (``site_neighbours``,
    :func:`apply_site_normative`) is flagged against the same scans: ``max(median + k x s,
    floor)`` over itself and them, ``s`` their scaled MAD (:func:`_robust_threshold`) and at
    least the median over its site's scans of these MADs (a 17-scan MAD is noisy). A site's
    clean backgrounds differ by person and scanner (neck and shoulders in the field of view, a
    coil's pattern), and against the whole site one group's ordinary background reads as an
    artifact. Fewer than ``min_site_size`` values: no entry (the site's threshold applies).
    """
    from .qc.score import neighbourhood_location_scale

    out: dict[int, float] = {}
    for site in {r.site for r in ok}:
        recs = [r for r in ok if r.site == site]
        index = {r.bids_name: i for i, r in enumerate(recs)}
        x = np.array([getattr(r, attr) for r in recs], dtype=float)
        sets = [np.array([i] + [index[n] for n in r.site_neighbours if n in index and index[n] != i])
                if r.site_neighbours else None for i, r in enumerate(recs)]
        local = neighbourhood_location_scale(x, sets, lambda v: _robust_threshold(v, k)[1:], min_n=min_site_size)
        out.update({id(r): max(p[0] + k * p[1], floor) for r, p in zip(recs, local) if p is not None})
    return out


def _contributor_pairs(items) -> list[tuple[str, float]]:
    """``[(name, z), ...]`` from a qc.json's ``qc_score_contributors`` (``[{measure, z}]``) or
    from a record's site contributors (pairs already); anything else gives nothing."""
    out = []
    for it in items or []:
        name, z = (it.get("measure"), it.get("z")) if isinstance(it, Mapping) else \
            (tuple(it) if isinstance(it, (list, tuple)) and len(it) == 2 else (None, None))
        if isinstance(name, str) and isinstance(z, (int, float)) and math.isfinite(z):
            out.append((name, float(z)))
    return out


def _contributor_names(items) -> list[str]:
    return [k for k, _ in _contributor_pairs(items)]


def _contributor_text(items) -> str:
    """The group table's contributors cell: ``name (z); name (z)``, worst first."""
    return "; ".join(f"{k} ({z:.1f})" for k, z in _contributor_pairs(items))


def contributor_names(cell: str | None) -> list[str]:
    """The measurement names of a contributors cell of the group table (the reader of what
    the table writes: ``name (z); name (z)`` -> ``[name, name]``)."""
    return [c.split(" (")[0].strip() for c in (cell or "").split(";") if c.strip()]


def _row(r: QCRecord, lab: Mapping, tags: Mapping, *, rank, pct, flagged, score_flagged, thr,
         bg_flagged=None, bg_thr=math.nan, strict: bool = True, score_name: str = "anomaly_fraction",
         score: float = math.nan, en_flagged=None, en_thr=math.nan) -> dict:
    e = r.entities
    reasons = []
    driver = r.data.get("qc_score_driver") if r.ok else None
    site_driver = r.site_driver if r.ok else None
    if not r.ok:
        reasons.append(f"not screened: {r.error or r.status}")
    contrib = _contributor_names(r.data.get("qc_score_contributors")) if r.ok else []
    site_contrib = [k for k, _ in r.site_contributors] if r.ok else []
    if score_flagged:
        d = site_driver if score_name == "qc_score_site" else driver if score_name == "qc_score" else None
        also = [k for k in (site_contrib if score_name == "qc_score_site" else contrib if score_name == "qc_score"
                            else []) if k != d]
        why = (f" (driven by {d}" + (f"; also out: {', '.join(also)}" if also else "") + ")") if d else ""
        reasons.append(f"{score_name} {score:.4g} {'>' if strict else '>='} threshold {thr:.4g}{why}")
    if bg_flagged:
        reasons.append(f"background artifact: background_artifact_fraction {r.background_fraction:.4g} "
                       f"> threshold {bg_thr:.4g}")
    if en_flagged:
        reasons.append(f"engine, against the site's scans: site_anomaly_fraction "
                       f"{r.site_anomaly_fraction:.4g} > threshold {en_thr:.4g}")
    bg = r.background
    ghost = bg.get("ghost_ratio")
    snr = bg.get("snr")
    return {
        "bids_name": r.bids_name, "subject": e.get("subject", ""), "session": e.get("session", ""),
        "acquisition": e.get("acquisition", ""), "run": e.get("run", ""),
        "suffix": e.get("suffix", ""), "site": r.site, "status": r.status,
        "qc_score": r.qc_score if r.ok and math.isfinite(r.qc_score) else None,
        "qc_score_driver": driver or "",
        "qc_score_contributors": _contributor_text(r.data.get("qc_score_contributors")) if r.ok else "",
        "qc_score_site": r.site_score if r.ok and math.isfinite(r.site_score) else None,
        "qc_score_site_driver": site_driver or "",
        "qc_score_site_contributors": _contributor_text(r.site_contributors) if r.ok else "",
        "anomaly_voxels": int(r.voxels) if r.ok and math.isfinite(r.voxels) else None,
        "anomaly_fraction": r.fraction if r.ok else None,
        "anomaly_mm3": r.mm3 if r.ok and math.isfinite(r.mm3) else None,
        "rank": rank, "percentile_in_site": pct, "flagged": flagged, "score_flagged": score_flagged,
        "error": r.error or "",
        "threshold": thr if r.ok else None,
        "label": lab.get(r.bids_name), "rated_artifacts": tags.get(r.bids_name, ""),
        "warnings": "; ".join(r.warnings),
        "model_id": r.data.get("model_id", ""), "model_adapted_from": r.data.get("model_adapted_from") or "",
        "report": f"sub-{r.subject}.html",
        "background_artifact_fraction": r.background_fraction if r.ok and math.isfinite(r.background_fraction)
        else None,
        "background_ghost_ratio": float(ghost) if r.ok and isinstance(ghost, (int, float)) else None,
        "background_snr": float(snr) if r.ok and isinstance(snr, (int, float)) else None,
        "background_flagged": bg_flagged,
        "background_threshold": bg_thr if r.ok and math.isfinite(bg_thr) else None,
        "background_note": r.background_note if r.ok else "",
        "site_anomaly_voxels": int(r.site_anomaly_voxels) if r.ok and math.isfinite(r.site_anomaly_voxels)
        else None,
        "site_anomaly_fraction": r.site_anomaly_fraction if r.ok and math.isfinite(r.site_anomaly_fraction)
        else None,
        "engine_flagged": en_flagged,
        "engine_threshold": en_thr if en_flagged is not None and math.isfinite(en_thr) else None,
        "flag_reasons": "; ".join(reasons),
        # not a CSV column: the measurements' z for the group page's plots
        "quality_z": dict(r.data.get("quality_z") or {}) if r.ok and isinstance(r.data.get("quality_z"), dict) else {},
    }


def read_group_csv(path) -> dict[str, dict]:
    """``group_<suffix>.csv`` -> ``{bids_name: row}`` (strings as written)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return {row["bids_name"]: row for row in csv.DictReader(fh)}


# --------------------------------------------------------------------------- entry
@dataclass
class SuffixTables:
    """The group tables of one suffix, as written to ``group_<suffix>.csv`` / ``_sites.csv``."""

    suffix: str
    rows: list
    site_rows: list
    summary: dict
    site_columns: list
    files: list


@dataclass
class GroupTables:
    """What :func:`write_group_tables` wrote and what the pages render."""

    output_dir: Path
    tables: list
    subjects: list
    labels_source: str | None
    mad_k: float
    flag_at_fnr: float | None


def write_group_tables(output_dir, *, labels=None, site_column: str = "site",
                       flag_at_fnr: float | None = None, mad_k: float = DEFAULT_MAD_K,
                       suffixes: Iterable[str] | None = None,
                       min_site_size: int = DEFAULT_MIN_SITE_SIZE, questionable: str = "exclude",
                       background_k: float | None = DEFAULT_BACKGROUND_K,
                       background_min_fraction: float = DEFAULT_BACKGROUND_MIN_FRACTION,
                       site_z: float = DEFAULT_SITE_Z,
                       site_norm_factor: float | None = DEFAULT_SITE_NORM_FACTOR,
                       site_norm_spread: float | None = DEFAULT_SITE_SPREAD_K,
                       site_norm_neighbours: int | None = DEFAULT_SITE_NEIGHBOURS,
                       engine_min_fraction: float = DEFAULT_ENGINE_MIN_FRACTION) -> GroupTables:
    """Write ``group_<suffix>.csv`` and ``group_<suffix>_sites.csv`` (the pages are
    :func:`qc_pipeline.reports.write_group_pages`; both: :func:`qc_pipeline.grouplevel.run_group`).

    Parameters
    ----------
    output_dir : path
        The derivatives folder written by the participant level.
    labels : path, folder, list of paths, or mapping, optional
        Ratings TSVs (one per rater, or a folder of them; merged by :func:`load_ratings`)
        or ``{bids_name: 0|1}``.
    site_column : str
        Metadata column naming the site (``qc.json`` ``site`` field, else
        ``metadata[site_column]``, else one site ``"all"``).
    flag_at_fnr : float, optional
        Calibrate the flag threshold on labelled scans at this FNR (needs ``labels``).
    mad_k : float
        ``k`` of the robust rule (median + k x scaled MAD), default 3.
    suffixes : iterable of str, optional
        Restrict to these suffixes (default: every suffix found).
    min_site_size : int
        Sites with fewer successful scans use the pooled distribution.
    questionable : {"exclude", "bad", "good"}
        How a "questionable" rating counts.
    background_k : float, optional
        ``k`` of the background flag (default: ``mad_k``).
    background_min_fraction : float
        Floor of the background flag threshold (default 0.002).
    site_z : float
        Flag cut of ``qc_score_site`` (default 5); the robust rule applies when the suffix
        is ranked by another score.
    site_norm_factor : float or None
        Keep an engine mask voxel where its error exceeds this multiple of the site's normal
        error there (:mod:`qc_pipeline.sitenorm`; default 3); None skips the site reference
        (no ``desc-siteanomaly_mask``, empty ``site_anomaly_*`` columns).
    site_norm_spread : float or None
        ... and exceeds the site's normal error by this many of the site's voxel-wise robust
        SDs (default 5); None: the factor alone.
    site_norm_neighbours : int or None
        Compare each scan (its engine mask, site score and background flag) with this many of its site's
        scans, those whose error maps are most like its own (default 16;
        :func:`qc_pipeline.sitenorm.site_normative`); None: with the whole site.
    engine_min_fraction : float
        Floor of the engine flag's threshold on ``site_anomaly_fraction`` (default 0.005).

    Returns
    -------
    GroupTables
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise GroupError(f"output directory {output_dir} does not exist")
    if flag_at_fnr is not None:
        if labels is None:
            raise GroupError("flag_at_fnr needs labels (a ratings TSV with bids_name and a rating column)")
        if not 0.0 <= float(flag_at_fnr) < 1.0:
            raise GroupError(f"flag_at_fnr must be in [0, 1), got {flag_at_fnr!r}")
    if mad_k <= 0 or not math.isfinite(mad_k):
        raise GroupError(f"mad_k must be a positive number, got {mad_k!r}")
    if not math.isfinite(site_z) or site_z <= 0:
        raise GroupError(f"site_z must be a positive number, got {site_z!r}")
    if background_k is not None and (not math.isfinite(background_k) or background_k <= 0):
        raise GroupError(f"background_k must be a positive number, got {background_k!r}")
    if not (math.isfinite(background_min_fraction) and 0.0 <= background_min_fraction < 1.0):
        raise GroupError(f"background_min_fraction must be in [0, 1), got {background_min_fraction!r}")
    if site_norm_factor is not None and not (math.isfinite(site_norm_factor) and site_norm_factor > 0):
        raise GroupError(f"site_norm_factor must be a positive number (or None to skip), got {site_norm_factor!r}")
    if site_norm_spread is not None and not (math.isfinite(site_norm_spread) and site_norm_spread >= 0):
        raise GroupError(f"site_norm_spread must be a number >= 0 (or None), got {site_norm_spread!r}")
    if not (math.isfinite(engine_min_fraction) and 0.0 <= engine_min_fraction < 1.0):
        raise GroupError(f"engine_min_fraction must be in [0, 1), got {engine_min_fraction!r}")
    tag_map: dict = {}
    if labels is not None and not isinstance(labels, Mapping):
        ratings = load_ratings(labels, questionable=questionable)
        label_map, tag_map = ratings.labels, ratings.artifacts
        n_raters = len({x for names in ratings.raters.values() for x in names})
        labels_source = (", ".join(str(p) for p in ratings.sources)
                         + (f" ({n_raters} raters, merged by majority)" if n_raters > 1 else ""))
    elif labels is not None:
        label_map = {normalise_bids_name(k): int(v) for k, v in labels.items()}
        labels_source = "labels given in memory"
    else:
        label_map, labels_source = None, None

    records = load_qc_records(output_dir, site_column=site_column)
    if not records:
        raise GroupError(f"no *_qc.json under {output_dir}/sub-*/[ses-*/]anat: run the participant level first")
    wanted = None if suffixes is None else {str(s) for s in suffixes}
    by_suffix: dict[str, list[QCRecord]] = {}
    for r in records:
        if wanted is None or r.suffix in wanted:
            by_suffix.setdefault(r.suffix or "unknown", []).append(r)
    if not by_suffix:
        raise GroupError(f"no scans with suffix {sorted(wanted)} under {output_dir} "
                         f"(found: {sorted({r.suffix for r in records})})")
    if label_map is not None:
        known = {normalise_bids_name(r.bids_name) for r in records}
        unmatched = sorted(set(label_map) - known)
        if unmatched:
            LOGGER.warning("%d labelled scans are not in %s (e.g. %s)", len(unmatched),
                           output_dir, unmatched[0])

    out = []
    for suffix, recs in sorted(by_suffix.items()):
        if site_norm_factor is not None:
            apply_site_normative(recs, factor=site_norm_factor, min_site_size=min_site_size,
                                 spread_k=site_norm_spread, neighbours=site_norm_neighbours)
        rows, site_rows, summary = compute_suffix_tables(
            recs, labels=label_map, flag_at_fnr=flag_at_fnr, mad_k=mad_k,
            min_site_size=min_site_size, background_k=background_k,
            background_min_fraction=background_min_fraction, site_z=site_z, artifacts=tag_map,
            engine_min_fraction=engine_min_fraction)
        site_cols = (SITE_COLUMNS if label_map is not None
                     else SITE_COLUMNS[:SITE_COLUMNS.index("n_labelled")]) + FLAG_SITE_COLUMNS
        row_cols = (ROW_COLUMNS if label_map is not None
                    else [c for c in ROW_COLUMNS if c not in ("label", "rated_artifacts")])
        p_rows = output_dir / f"group_{suffix}.csv"
        p_sites = output_dir / f"group_{suffix}_sites.csv"
        atomic_write_text(_csv_text(rows, row_cols), p_rows)
        atomic_write_text(_csv_text(site_rows, site_cols), p_sites)
        out.append(SuffixTables(suffix, rows, site_rows, summary, site_cols, [p_rows, p_sites]))
        LOGGER.info("group %s: %d scans (%d failed), %d flagged (score %d, background %d, engine %d, "
                    "not screened %d)", suffix, summary["n_scans"], summary["n_failed"], summary["n_flagged"],
                    summary["n_score_flagged"], summary["n_background_flagged"], summary["n_engine_flagged"],
                    summary["n_failed"])
    return GroupTables(output_dir, out, sorted({r.subject for r in records if r.subject}), labels_source,
                       mad_k, flag_at_fnr)
