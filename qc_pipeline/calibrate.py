"""Fit a model's QC-score reference on clean scans (the library behind ``itermask-qc-calibrate``,
:mod:`qc_pipeline.cli.calibrate`).

The QC score (:mod:`qc_pipeline.qc.score`) compares each measurement of a scan with the
same measurement on clean scans. The packaged models carry a reference fitted on held-out
synthetic normal heads. A site whose scans differ from those (scanner, sequence, anatomy)
gets a better-calibrated score by fitting the reference on its own clean scans:

    itermask-qc /bids /out participant --model-dir my_t1w_model   # clean scans
    itermask-qc-calibrate /out my_t1w_model --suffix T1w [--labels ratings.tsv]
    itermask-qc /bids /out2 participant --model-dir my_t1w_model   # now calibrated

Only successful scans of the suffix that were screened with that model enter the fit;
with ``--labels``, scans rated as artifacts are left out (unrated ones are kept). The
card's ``qc_score`` section is replaced atomically, and the model gets a new id,
``<id>-cal-<8 hex>`` of the new reference and slope (:func:`calibrated_id`; the card keeps
``calibrated_from``): results of the model before calibration are never reused for it.

With ``--gamma`` the engine's stopping slope is fitted on the same scans too: ``gamma`` =
``--gamma-factor`` (0.5) x the median over the scans of ``tau(50)``, the median error of a
brain half unmasked, read from each qc.json's sweep (no forward pass is run). The paper's
``gamma = 0.01`` belongs to its network and data; scaled to what the network's error is on a
site's own clean scans, the mask of a clean scan from that site stays near empty while a
scan whose errors rise above the site's level stops the sweep earlier.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Mapping

from .errors import ModelCardError, ModelNotFoundError, QCPipelineError
from .modelcard import CARD_NAME, load_model_card, write_model_card
from .qc.score import QCScoreError, fit_reference

log = logging.getLogger(__name__)

__all__ = ["write_card_reference", "reference_from_outputs", "gamma_from_tau50", "gamma_from_outputs",
           "write_card_gamma", "DEFAULT_GAMMA_FACTOR"]

#: stopping slope = this x the median tau(50) of clean scans (see the module docstring)
DEFAULT_GAMMA_FACTOR = 0.5


class CalibrationError(QCPipelineError, ValueError):
    """Nothing usable to calibrate on; the message names the folder and what was found."""


def _read_card(model_dir) -> tuple[Path, dict]:
    try:
        return Path(model_dir) / CARD_NAME, load_model_card(Path(model_dir))
    except ModelNotFoundError as exc:
        raise CalibrationError(f"{model_dir}: no {CARD_NAME} (expected a model folder)") from exc
    except ModelCardError as exc:
        raise CalibrationError(str(exc)) from exc


def write_card_reference(model_dir, reference: Mapping) -> Path:
    """Replace the ``qc_score`` section of ``model_dir/model_card.json`` (atomic)."""
    path, card = _read_card(model_dir)
    card["qc_score"] = dict(reference)
    write_model_card(path.parent, card)
    return path


def gamma_from_tau50(tau50, *, factor: float = DEFAULT_GAMMA_FACTOR, source: str, min_scans: int = 8) -> dict:
    """The card's ``gamma`` and its ``gamma_calibration`` record from clean scans' ``tau(50)``."""
    import numpy as np

    vals = np.asarray([v for v in tau50 if v is not None and np.isfinite(v) and v > 0], float)
    if vals.size < min_scans:
        raise CalibrationError(f"{source}: {vals.size} clean scans with a sweep reaching t = 50, "
                               f"need at least {min_scans}")
    med = float(np.median(vals))
    return {"gamma": round(factor * med, 5),
            "gamma_calibration": {"rule": f"gamma = {factor} x the median tau(t=50) of clean scans",
                                  "median_tau50": round(med, 5), "factor": factor, "n": int(vals.size),
                                  "source": source}}


def gamma_from_outputs(output_dir, *, model_id: str | None, suffix: str, labels=None,
                       factor: float = DEFAULT_GAMMA_FACTOR, min_scans: int = 8) -> dict:
    """:func:`gamma_from_tau50` on the sweeps stored in the qc.json files of ``output_dir``."""
    from .engine.taufit import relative_gamma
    from .derivatives import load_qc_records, normalise_bids_name
    from .labels import load_labels

    records = [r for r in load_qc_records(output_dir) if r.suffix == suffix and r.ok]
    if model_id:
        ids = {model_id} if isinstance(model_id, str) else set(model_id)
        records = [r for r in records if r.data.get("model_id") in ids]
    bad = {k for k, v in load_labels(labels).items() if v == 1} if labels is not None else set()
    tau50 = []
    for r in records:
        curve = r.data.get("tau_curve") or []
        if normalise_bids_name(r.bids_name) in bad or not curve:
            continue
        pts = [(t, v) for t, v in curve if t is not None and v is not None]
        tau50.append(relative_gamma([t for t, _ in pts], [v for _, v in pts], 1.0))
    return gamma_from_tau50(tau50, factor=factor, min_scans=min_scans,
                            source=f"{len(tau50)} clean {suffix} scans in {Path(output_dir).resolve()}")


_CAL_SUFFIX = re.compile(r"-cal-[0-9a-f]{8}$")


def uncalibrated_id(model_id: str) -> str:
    """The id a model had before :func:`calibrated_id` named it."""
    return _CAL_SUFFIX.sub("", str(model_id))


def calibrated_id(card: Mapping) -> str:
    """``<id before calibration>-cal-<8 hex>`` of the card's QC-score reference and stopping
    slope: a calibrated model never shares an id (and so a cached or resumed result) with the
    model it was calibrated from, and the same calibration gives the same id."""
    content = json.dumps({k: card.get(k) for k in ("qc_score", "gamma", "gamma_mode", "gamma_relative",
                                                    "normative", "schedule")},
                         sort_keys=True, default=str)
    return f"{uncalibrated_id(card['model_id'])}-cal-{hashlib.sha256(content.encode()).hexdigest()[:8]}"


def rename_calibrated(model_dir) -> str:
    """Give the card of ``model_dir`` its :func:`calibrated_id` (atomic); returns the id."""
    path, card = _read_card(model_dir)
    card.setdefault("calibrated_from", uncalibrated_id(card["model_id"]))
    card["model_id"] = calibrated_id(card)
    write_model_card(path.parent, card)
    return card["model_id"]


def write_card_gamma(model_dir, gamma: Mapping) -> Path:
    """Set ``gamma`` (absolute mode) and ``gamma_calibration`` in the model card (atomic)."""
    path, card = _read_card(model_dir)
    card["gamma_mode"] = "absolute"
    card["gamma"] = float(gamma["gamma"])
    card["gamma_calibration"] = dict(gamma["gamma_calibration"])
    write_model_card(path.parent, card)
    return path


def reference_from_outputs(output_dir, *, model_id: str | None, suffix: str,
                           labels=None, min_scans: int = 8) -> dict:
    """Fit the reference from the ``quality_features`` of the qc.json files in ``output_dir``."""
    from .derivatives import load_qc_records, normalise_bids_name
    from .labels import load_labels

    records = [r for r in load_qc_records(output_dir) if r.suffix == suffix and r.ok]
    if model_id:
        ids = {model_id} if isinstance(model_id, str) else set(model_id)
        records = [r for r in records if r.data.get("model_id") in ids]
    bad = set()
    if labels is not None:
        bad = {k for k, v in load_labels(labels).items() if v == 1}
    rows = [r.data.get("quality_features") for r in records
            if normalise_bids_name(r.bids_name) not in bad]
    rows = [q for q in rows if isinstance(q, dict)]
    if not rows:
        raise CalibrationError(
            f"{output_dir}: no successful {suffix} scans with quality measurements"
            + (f" screened with model {model_id}" if model_id else "")
            + " (run the participant level with this model first)")
    try:
        return fit_reference(rows, min_scans=min_scans,
                             source=f"{len(rows)} clean {suffix} scans in {Path(output_dir).resolve()}")
    except QCScoreError as exc:
        raise CalibrationError(f"{output_dir}: {exc}") from exc
