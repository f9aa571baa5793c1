"""Adapt the model of each suffix to the dataset being screened (``itermask-qc BIDS OUT adapt``).

IterMask3D learns "normal" from normal scans of the distribution it screens. A site has
many scans of its own scanner and protocol and no labels; this level learns from them:

1. **Screen** every scan with the base model (the packaged one, or ``--model-dir``): the
   ordinary participant level into OUTPUT_DIR (resumable, keyed by the base model's id).
2. **Choose the training scans** (:func:`select_training_scans`): leave out failed scans,
   scans rated as artifacts in ``--labels``, the worst ``exclude_fraction`` of the site by
   its own QC score (each scan scored against the site's scans,
   :func:`qc_pipeline.qc.score.relative_scores`) and any scan whose site score is a robust
   outlier beyond that.
3. **Fine-tune** the base network on their preprocessed volumes
   (:func:`qc_pipeline.engine.train_model`, ``init_from`` the base model) with a trimmed loss
   that leaves out each volume's worst-reconstructed voxels, so that an artifact the
   selection missed is not learned as normal; bounded by ``steps`` and ``minutes``,
   resumable from ``OUTPUT_DIR/models/<suffix>/checkpoint.pt``.
4. **Calibrate** the adapted model on the training scans: the stopping slope from their
   ``tau(50)`` (:func:`qc_pipeline.calibrate.gamma_from_tau50`), the site's own normal error
   (median and spread of the adapted model's error over them in template space,
   :func:`_site_normal_error`), then, after step 5, the
   QC-score reference from their measurements (until then the base reference is kept, so no
   score is ever "n/a"; the stored scores are recomputed with the site's reference).
5. **Screen again** with the adapted model (``OUTPUT_DIR/models/<suffix>``, a new model id
   made from the base id and the training scans' content); only the engine reruns, the
   preprocessing is reused from the work directory.

The card of the adapted model records its base model, the training and excluded scans (with
why), steps, wall time, device and the before/after figures on the training scans.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import ModelCardError, ModelNotFoundError, QCPipelineError
from .modelcard import load_model_card

log = logging.getLogger(__name__)

__all__ = ["AdaptOptions", "AdaptError", "select_training_scans", "adaptation_key", "adapted_model_id",
           "adapted_model_dir", "adapt_dataset", "MODELS_DIRNAME"]

#: adapted models live in OUTPUT_DIR/<this>/<suffix>/
MODELS_DIRNAME = "models"
#: a site score above this robust z (beyond the excluded share) also leaves the training set
OUTLIER_Z = 3.5


class AdaptError(QCPipelineError, RuntimeError):
    """Adaptation cannot proceed; the message names the suffix and what was found."""


@dataclass(frozen=True)
class AdaptOptions:
    """Settings of the ``adapt`` level (the CLI's ``--adapt-*`` options).

    minutes, steps
        Budget of the fine-tuning: it stops at whichever comes first.
    exclude_fraction
        Share of the site's scans, worst first by the site's own QC score, never trained on.
    trim
        Share of each training volume's worst-reconstructed brain voxels left out of the loss.
    lr, batch_size
        Adam learning rate (a tenth of the paper's, for fine-tuning) and batch size.
    patch
        Edge (voxels) of the cubic crops trained on, centred in the training mask as
        ``itermask-qc-train`` does (0 = whole volumes): a 64-voxel crop costs about a third of
        a whole 80 x 96 x 80 volume per step, so a CPU budget buys three times the steps.
    min_scans
        Fewest training scans to adapt at all, and to refit the stopping slope and the
        QC-score reference (else the base model's are kept).
    max_scans
        At most this many training scans (a random subset of the clean ones) are held in memory.
    gamma_factor
        Stopping slope = this x the median ``tau(50)`` of the training scans.
    site_normal_error
        Replace the carried normal-error map by the site's own (the adapted model's error
        over the training scans, :func:`_site_normal_error`); False keeps the base model's.
    """

    minutes: float = 20.0
    steps: int = 400
    exclude_fraction: float = 0.2
    trim: float = 0.05
    lr: float = 2e-4
    batch_size: int = 2
    patch: int = 64
    min_scans: int = 8
    max_scans: int = 200
    gamma_factor: float = 0.5
    site_normal_error: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.exclude_fraction < 1:
            raise AdaptError(f"exclude_fraction must be in [0, 1), got {self.exclude_fraction}")
        if self.minutes <= 0 or self.steps < 1:
            raise AdaptError(f"the fine-tuning budget must be positive, got {self.minutes} min, "
                             f"{self.steps} steps")
        if self.patch < 0:
            raise AdaptError(f"patch must be 0 (whole volumes) or a positive edge, got {self.patch}")
        if self.min_scans < 1 or self.max_scans < self.min_scans:
            raise AdaptError(f"need 1 <= min_scans <= max_scans, got {self.min_scans}, {self.max_scans}")


# --------------------------------------------------------------------------- selection
def select_training_scans(rows: Sequence[Mapping[str, Any]], *, exclude_fraction: float,
                          bad: set[str] = frozenset(), min_scans: int = 8) -> tuple[list[str], dict[str, str]]:
    """Which screened scans a site adapts on.

    Parameters
    ----------
    rows : list of dict
        One per scan: ``bids_name``, ``status`` ("ok"/"error"), ``quality_features`` (the
        qc.json's), ``qc_score`` and ``anomaly_fraction`` (fallbacks when the site is too
        small for its own score).
    exclude_fraction : float
        The worst share of the ok scans (rounded up) is left out.
    bad : set of str
        Scans rated as artifacts.
    min_scans : int
        Fewest scans with a measurement for the site-relative score.

    Returns
    -------
    kept : list of str
    excluded : dict
        ``{bids_name: reason}``.
    """
    from scipy.stats import median_abs_deviation

    from .qc.score import relative_scores

    excluded: dict[str, str] = {}
    ok = []
    for r in rows:
        name = str(r["bids_name"])
        if r.get("status") != "ok":
            excluded[name] = "failed screening"
        elif name in bad:
            excluded[name] = "rated as an artifact"
        else:
            ok.append(r)
    scores = _site_scores(ok, min_scans=min_scans, relative=relative_scores)
    order = np.argsort(-scores, kind="stable")
    n_drop = int(math.ceil(exclude_fraction * len(ok) - 1e-9))
    finite = scores[np.isfinite(scores)]
    med = float(np.median(finite)) if finite.size else 0.0
    mad = float(median_abs_deviation(finite, scale="normal")) if finite.size else 0.0
    for rank, i in enumerate(order):
        name, s = str(ok[i]["bids_name"]), float(scores[i])
        if rank < n_drop:
            excluded[name] = f"among the worst {100 * exclude_fraction:g} % of the site (score {s:.2f})"
        elif mad > 0 and (s - med) / mad > OUTLIER_Z:
            excluded[name] = f"site outlier (score {s:.2f}, robust z {(s - med) / mad:.1f})"
    kept = [str(r["bids_name"]) for r in ok if str(r["bids_name"]) not in excluded]
    return kept, excluded


def _site_scores(rows, *, min_scans: int, relative) -> np.ndarray:
    """The site's own QC score when it can be had, else the stored score, else the anomaly share."""
    if not rows:
        return np.zeros(0)
    # a qc.json's ``qc_score_reference`` holds the reference's per-measurement entries
    ref = next((r.get("qc_score_reference") for r in rows if isinstance(r.get("qc_score_reference"), Mapping)),
               None)
    if ref and "features" not in ref:
        ref = {"features": ref}
    feats = [r.get("quality_features") for r in rows]
    if ref and all(isinstance(f, Mapping) for f in feats) and len(rows) >= min_scans:
        rel = relative([dict(f) for f in feats], ref, min_scans=min_scans)
        vals = np.array([np.nan if s is None else float(s) for s, _ in rel])
        if np.isfinite(vals).all():
            return vals
    for key in ("qc_score", "anomaly_fraction"):
        vals = np.array([_num(r.get(key)) for r in rows])
        if np.isfinite(vals).all():
            return vals
    return np.nan_to_num(np.array([_num(r.get("anomaly_fraction")) for r in rows]), nan=np.inf)


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


# --------------------------------------------------------------------------- identity
def adaptation_key(base_id: str, training: Sequence[tuple[str, str]], options: AdaptOptions) -> str:
    """Hex digest of what an adaptation trains from: the base model, the training scans'
    names and content hashes, and the options except the wall-clock budget. An interrupted
    adaptation resumes only into the same key."""
    h = hashlib.sha256()
    h.update(str(base_id).encode())
    for name, sha in sorted(training):
        h.update(f"\n{name}:{sha}".encode())
    opts = {k: v for k, v in asdict(options).items() if k != "minutes"}
    h.update(json.dumps(opts, sort_keys=True).encode())
    return h.hexdigest()


def adapted_model_id(base_id: str, key: str, steps_taken: int) -> str:
    """``<base id>-adapted-<8 hex>`` from the :func:`adaptation_key` and the optimiser steps
    actually taken (a budget may stop early): another training set, option or step count gives
    another id, so results of another model are never reused."""
    digest = hashlib.sha256(f"{key}:{int(steps_taken)}".encode()).hexdigest()[:8]
    return f"{base_id}-adapted-{digest}"


def adapted_model_dir(output_dir, suffix: str) -> Path:
    """``OUTPUT_DIR/models/<suffix>``: where the adapted model of ``suffix`` is written."""
    return Path(output_dir) / MODELS_DIRNAME / suffix


# --------------------------------------------------------------------------- volumes
def _preprocessed(scan, settings, spec) -> Any:
    """The scan's :class:`~qc_pipeline.preproc.PreprocResult`: the participant
    workflow's cached output in the work directory, else preprocessed again."""
    from qc_pipeline.workflows.base import cached_preprocessing
    from qc_pipeline.workflows.interfaces import read_node_record

    cached = cached_preprocessing(settings.work_dir, scan)
    if cached.is_file():
        try:
            prep = read_node_record(cached)
            if tuple(prep.image.shape) == tuple(spec["grid"]):
                return prep
        except Exception as exc:  # noqa: BLE001 - a broken cache is made again
            log.debug("%s: cached preprocessing unreadable (%s); preprocessing again", scan.bids_name, exc)
    from .io import load_image
    from .preproc import preprocess

    img = load_image(scan.path, name=scan.relpath, max_bytes=settings.max_image_bytes)
    return preprocess(img, voxel_size=tuple(spec["voxel_size"]), grid=tuple(spec["grid"]),
                      skull_strip=settings.skull_strip, contrast=scan.suffix, name=scan.relpath)


# --------------------------------------------------------------------------- the level
def adapt_dataset(settings, scans, *, screen: Callable, options: AdaptOptions) -> int:
    """Run the ``adapt`` level (module docstring); returns the exit code of the final screen,
    at least 1 when a suffix could not be adapted (too few clean scans: its scans keep the
    base model's results, and the log says why).

    ``screen(settings, scans) -> int`` is the participant level (passed in by the CLI, which
    owns it). ``settings.model_specs`` is updated to the adapted models before the final
    screen, so the run's config snapshot names them.
    """
    from .derivatives import output_paths, read_qc
    from .engine.modelio import model_content_key
    from .engine import default_model_dir

    from .labels import load_labels

    out = Path(settings.output_dir)
    # a bad ratings file stops the level before any work (LabelsError)
    bad = ({k for k, v in load_labels(settings.labels, questionable="bad").items() if v == 1}
           if settings.labels is not None else set())
    todo_before = []
    plans = {}
    for suffix in settings.suffixes:
        if not any(s.suffix == suffix for s in scans):
            continue
        spec = settings.model_specs[suffix]
        base_dir = Path(spec["model_dir"]) if spec.get("model_dir") else default_model_dir(suffix)
        base_card = load_model_card(base_dir)
        if base_card.get("adaptation"):
            raise AdaptError(f"{suffix}: the model {base_dir} is itself adapted to a site "
                             f"({base_card['model_id']}); adapt from its base model instead")
        mine = [s for s in scans if s.suffix == suffix]
        target = adapted_model_dir(out, suffix)
        done = _finished(target, base_card.get("model_id"))
        plans[suffix] = dict(suffix=suffix, spec=spec, base_dir=base_dir, base_card=base_card, scans=mine,
                             target=target, done=done)
        if not done:
            todo_before.extend(mine)
    if todo_before:
        log.info("adapt: screening %d scans with the base models first", len(todo_before))
        screen(settings, todo_before)

    for suffix, plan in plans.items():
        if plan["done"]:
            log.info("adapt: %s model already adapted in %s (%s)", suffix, plan["target"],
                     plan["done"])
        else:
            rows = []
            for scan in plan["scans"]:
                rec = read_qc(output_paths(out, scan)["qc_json"]) or {"status": "error"}
                if rec.get("model_id") != plan["base_card"].get("model_id"):
                    rec = {"status": "error"}
                rows.append({**rec, "bids_name": scan.bids_name})
            try:
                _adapt_one(settings, plan, rows, options, bad=bad)
            except AdaptError as exc:  # this suffix keeps its base model; the others go on
                log.error("adapt: %s; its scans keep the results of the base model %s", exc,
                          plan["base_card"].get("model_id"))
                plan["failed"] = str(exc)
                continue
        card = load_model_card(plan["target"])
        settings.model_specs[suffix] = {**plan["spec"], "model_dir": str(plan["target"].resolve()),
                                        "model_id": card["model_id"],
                                        "model_key": model_content_key(plan["target"])}
    settings.snapshot()
    from .screening import clear_model_cache

    clear_model_cache()
    rc = screen(settings, scans)
    for suffix, plan in plans.items():
        if not plan.get("failed"):
            _refit_reference(settings, plan, options)
    # a suffix that could not be adapted is screened with its base model and reported as failed
    return max(rc, 1) if any(p.get("failed") for p in plans.values()) else rc


def _finished(target: Path, base_id) -> str | None:
    """The adapted model id when ``target`` holds a finished adaptation of ``base_id``."""
    try:
        card = load_model_card(target)
    except (ModelNotFoundError, ModelCardError):
        return None
    ad = card.get("adaptation") or {}
    if ad.get("base_model_id") == base_id and ad.get("complete") and (target / "weights.pt").is_file():
        return card.get("model_id")
    return None


def _adapt_one(settings, plan, rows, options: AdaptOptions, *, bad: set[str]) -> None:
    from .engine import train_model
    from .engine.inference import resolve_device
    from .derivatives import normalise_bids_name

    suffix, spec, target = plan["suffix"], plan["spec"], plan["target"]
    rows = [{**r, "bids_name": normalise_bids_name(r["bids_name"])} for r in rows]
    kept, excluded = select_training_scans(rows, exclude_fraction=options.exclude_fraction, bad=bad,
                                           min_scans=options.min_scans)
    if len(kept) > options.max_scans:
        rng = np.random.default_rng(options.seed)
        chosen = set(rng.choice(kept, size=options.max_scans, replace=False).tolist())
        for name in kept:
            if name not in chosen:
                excluded[name] = f"beyond the {options.max_scans} scans held in memory"
        kept = [k for k in kept if k in chosen]
    if len(kept) < options.min_scans:
        raise AdaptError(f"{suffix}: {len(kept)} scans judged clean enough to adapt on "
                         f"({len(excluded)} left out); need at least {options.min_scans}")
    by_name = {s.bids_name: s for s in plan["scans"]}
    before = {r["bids_name"]: r for r in rows}
    training = [(n, str(before[n].get("input_sha256") or "")) for n in kept]
    key = adaptation_key(plan["base_card"]["model_id"], training, options)

    state_file = target / "adapt_state.json"
    state = {}
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        pass
    if state.get("key") != key and target.exists():
        log.info("adapt: %s: starting afresh in %s (different training set or options)", suffix, target)
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    from .io import atomic_write_json

    atomic_write_json({"key": key, "base_model_id": plan["base_card"]["model_id"]}, state_file)

    log.info("adapt: %s: fine-tuning %s on %d scans (%d left out), at most %d steps / %.0f min",
             suffix, plan["base_card"]["model_id"], len(kept), len(excluded), options.steps, options.minutes)
    preps = [_preprocessed(by_name[n], settings, spec) for n in kept]
    pairs = [(p.image.astype(np.float32), p.brain_mask) for p in preps]
    t0 = time.time()
    res = train_model(pairs, target, steps=options.steps, batch_size=options.batch_size, lr=options.lr,
                      seed=options.seed, resume=True, device=settings.device,
                      features=plan["base_card"]["network"]["features"],
                      norm=plan["base_card"]["network"].get("norm", "batch"),
                      voxel_size=tuple(spec["voxel_size"]), contrast=suffix,
                      init_from=plan["base_dir"], time_budget_s=60.0 * options.minutes, trim=options.trim,
                      patch=options.patch or None)
    trained = load_model_card(target)
    new_id = adapted_model_id(plan["base_card"]["model_id"], key, res["steps"])
    card = copy.deepcopy(plan["base_card"])
    card.pop("model_dir", None)
    # the base model's normal-error map goes with the new weights: fine-tuning on the site
    # lowers the network's error on the site's normal anatomy, so the base map errs toward
    # removing more (the loop's mask without it keeps a tenth of a clean brain); its
    # fitted_for_model_id names the base weights
    carried = bool(card.get("normal_error"))
    if carried:
        from .engine.modelio import NORMAL_ERROR_NAME, NORMAL_ERROR_SPREAD_NAME

        sec = dict(card["normal_error"])
        shutil.copyfile(Path(plan["base_dir"]) / sec.get("file", NORMAL_ERROR_NAME), target / NORMAL_ERROR_NAME)
        sec["file"] = NORMAL_ERROR_NAME
        if sec.get("spread_file"):
            shutil.copyfile(Path(plan["base_dir"]) / sec["spread_file"], target / NORMAL_ERROR_SPREAD_NAME)
            sec["spread_file"] = NORMAL_ERROR_SPREAD_NAME
        card["normal_error"] = sec
    card["model_id"] = new_id
    card["training"] = trained.get("training")  # the fine-tuning; its init_from names the base model
    card["adaptation"] = {
        "base_model_id": plan["base_card"]["model_id"],
        "base_model_dir": str(plan["base_dir"]),
        "dataset": str(settings.bids_dir),
        "complete": False,
        "options": asdict(options),
        "training_scans": kept,
        "excluded_scans": excluded,
        "key": key,
        "steps": res["steps"],
        "resumed_from_step": res["start_step"],
        "normal_error": ("the base model's map, carried over (fitted for the base weights)"
                         if carried else "the base model has none"),
        "wall_time_s": (trained.get("training") or {}).get("wall_time_s"),
        "final_loss": (trained.get("training") or {}).get("final_loss"),
        "device": str(resolve_device(settings.device)),
        "machine": (trained.get("training") or {}).get("machine"),
        "before": _summary([before[n] for n in kept]),
    }
    from .engine import IterMask3D

    _write_card(target, card)  # complete: False until the stopping slope is calibrated
    model = IterMask3D.from_folder(target, device=settings.device)
    tau50 = [model.typical_error(p.image, p.brain_mask, voxel_size=tuple(p.info.voxel_size),
                                 seed=settings.seed) for p in preps]
    from .calibrate import CalibrationError, gamma_from_tau50

    try:
        g = gamma_from_tau50(tau50, factor=options.gamma_factor, min_scans=options.min_scans,
                             source=f"{len(kept)} training scans of {settings.bids_dir}")
        card["gamma_mode"], card["gamma"] = "absolute", g["gamma"]
        card["gamma_calibration"] = g["gamma_calibration"]
    except CalibrationError as exc:
        log.warning("adapt: %s: %s; keeping the base model's stopping slope", suffix, exc)
    if options.site_normal_error:
        _write_card(target, card)
        site = _site_normal_error(target, preps, settings, options,
                                  source=f"{len(kept)} training scans of {settings.bids_dir}")
        if site is not None:
            card["normal_error"] = load_model_card(target)["normal_error"]
            card["adaptation"]["normal_error"] = site
    card["adaptation"]["complete"] = True
    card["adaptation"]["seconds"] = round(time.time() - t0, 1)
    _write_card(target, card)
    log.info("adapt: %s model %s written to %s (%d steps, gamma %.4g)", suffix, new_id, target,
             res["steps"], card.get("gamma"))


def _site_normal_error(target: Path, preps, settings, options: AdaptOptions, *, source: str) -> str | None:
    """The site's own normal error for the adapted model in ``target``: the voxel-wise median
    and robust spread (template space, :func:`qc_pipeline.sitenorm.site_reference_and_spread`)
    of its error over the training scans, written as the folder's normal-error map with the
    group level's rule (factor :data:`~qc_pipeline.sitenorm.DEFAULT_SITE_NORM_FACTOR`, spread
    :data:`~qc_pipeline.sitenorm.DEFAULT_SITE_SPREAD_K`). The participant level then keeps a
    mask voxel only where the scan errs beyond the site's normal scans, as the group level's
    site mask does, and a later run with ``--model-dir`` screens new scans of the site that
    way. Returns the card's note, or None (fewer than ``min_scans`` scans with a template fit:
    the carried map stays)."""
    from .engine import IterMask3D
    from .engine.modelio import save_normal_error
    from .sitenorm import (DEFAULT_SITE_NORM_FACTOR, DEFAULT_SITE_SPREAD_K, error_to_template,
                           site_reference_and_spread, template_grid)

    model = IterMask3D.from_folder(target, device=settings.device)
    maps = []
    for p in preps:
        aff, t2w = getattr(p.info, "grid_affine", None), (getattr(p.info, "prior", None) or {}).get("affine")
        if aff is None or t2w is None:
            continue
        r = model.run(p.image, p.brain_mask, voxel_size=tuple(p.info.voxel_size), seed=settings.seed)
        maps.append(error_to_template(r.error_map, aff, t2w))
    if len(maps) < options.min_scans:
        log.warning("adapt: %s: %d training scans with a template fit, fewer than %d; keeping the "
                    "base model's normal-error map", model.model_id, len(maps), options.min_scans)
        return None
    ref, spread = site_reference_and_spread(maps)
    _, t_aff = template_grid()
    # the base model's opening carries over: a site's clean scans leave specks just the same
    opening = {"open_vox": model.normal_error_open} if model.normal_error_open else {}
    save_normal_error(target, ref, t_aff, {
        "factor": DEFAULT_SITE_NORM_FACTOR, "spread_k": DEFAULT_SITE_SPREAD_K, **opening,
        "space": "MNI152 brain-mask grid, 2 mm (qc_pipeline.sitenorm.template_grid)",
        "statistic": "voxel-wise median of the adapted model's squared error over the site's training "
                     "scans, grey-dilated by one voxel",
        "spread_statistic": "voxel-wise normal-consistent MAD of the same errors, grey-dilated by one voxel",
        "n_scans": len(maps), "training_data": source, "fitted_for_model_id": model.model_id,
    }, spread_t=spread)
    log.info("adapt: %s: the site's normal error from %d training scans", model.model_id, len(maps))
    return f"the site's own: median and spread of the adapted model's error over {len(maps)} training scans"


def _write_card(target: Path, card: Mapping) -> None:
    from .engine.modelio import write_model_card

    write_model_card(target, card)


def _summary(recs: Sequence[Mapping]) -> dict:
    """Medians of the engine's figures over screened records (the card's before/after)."""
    def med(key):
        vals = [_num(r.get(key)) for r in recs if r.get("status") == "ok"]
        vals = [v for v in vals if math.isfinite(v)]
        return round(float(np.median(vals)), 5) if vals else None

    return {"n": len(recs), "median_anomaly_fraction": med("anomaly_fraction"),
            "median_mean_error": med("mean_error"), "median_first_pass_mean_error": med("first_pass_mean_error"),
            "median_qc_score": med("qc_score")}


def _refit_reference(settings, plan, options: AdaptOptions) -> None:
    """QC-score reference of the adapted model from its training scans' measurements; the
    stored scores of every scan screened with it are recomputed (atomically, per file)."""
    from .derivatives import output_paths, read_qc, rescore_qc
    from .reports import write_subject_page
    from .qc.score import QCScoreError, fit_reference

    target = plan["target"]
    card = load_model_card(target)
    ad = card.get("adaptation") or {}
    if ad.get("reference_refit"):
        return
    out = Path(settings.output_dir)
    recs = {}
    for scan in plan["scans"]:
        rec = read_qc(output_paths(out, scan)["qc_json"])
        if rec and rec.get("status") == "ok" and rec.get("model_id") == card["model_id"]:
            recs[scan.bids_name] = (scan, rec)
    train = [recs[n][1] for n in ad.get("training_scans", []) if n in recs]
    rows = [r.get("quality_features") for r in train if isinstance(r.get("quality_features"), dict)]
    try:
        card["qc_score"] = fit_reference(rows, min_scans=options.min_scans,
                                         source=f"{len(rows)} training scans of {settings.bids_dir} "
                                                f"screened with {card['model_id']}")
    except QCScoreError as exc:
        log.warning("adapt: %s: %s; keeping the base model's QC-score reference", card["model_id"], exc)
    ad["after"] = _summary(train)
    ad["reference_refit"] = True
    card["adaptation"] = ad
    _write_card(target, card)
    subjects = set()
    for scan, rec in recs.values():
        rescore_qc(output_paths(out, scan)["qc_json"], card.get("qc_score"))
        subjects.add(scan.subject)
    for sub in sorted(subjects):
        write_subject_page(out, sub, site_column=settings.site_column)
    log.info("adapt: %s: QC-score reference from %d training scans; %d scans rescored "
             "(median anomaly share of the training scans %s -> %s)", card["model_id"], len(rows),
             len(recs), (ad.get("before") or {}).get("median_anomaly_fraction"),
             ad["after"].get("median_anomaly_fraction"))
