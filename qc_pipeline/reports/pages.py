"""The pages: per-subject reports, the dataset overview and the group pages (jinja2).

They render what they are handed (the group level's tables, the scans' records and the
figures of :mod:`qc_pipeline.reports.figures`); templates in ``qc_pipeline.templates``.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import math
import re
from importlib import resources
from pathlib import Path

import numpy as np
from markupsafe import Markup

from .. import __version__
from ..qc import metrics as _metrics
from ..derivatives import QCRecord, load_qc_records, one_line, read_qc
from ..group import POOLED_SITE, GroupTables, contributor_names, read_group_csv
from ..errors import ModelCardError, ModelNotFoundError
from ..io import atomic_write_text
from ..modelcard import load_model_card
from .figures import figure_place, scan_figures, site_mask_of


LOGGER = logging.getLogger(__name__)

#: artifact checklist offered in each scan's rating control
ARTIFACT_CHOICES = ("motion", "ghosting/wrap-around", "metal/susceptibility", "missing or cut-off brain",
                    "noise", "intensity inhomogeneity", "spike/zipper", "other")

#: each QC-score measurement in a rater's words, and the artifact tag it most often points to
MEASURE_WORDS: dict[str, tuple[str, str]] = {
    "anomaly_fraction": ("a region of the brain the model cannot reconstruct (lesion, artifact or missing tissue)",
                         "other"),
    "recon_error": ("the whole brain looks unlike a clean scan to the model", "other"),
    "anomaly_cluster_fraction": ("one large abnormal region inside the brain", "other"),
    "signal_deficit": ("missing or cut-off brain (field of view, signal dropout)", "missing or cut-off brain"),
    "signal_void": ("dark signal voids in the brain (metal / susceptibility)", "metal/susceptibility"),
    "nonuniformity": ("intensity inhomogeneity (bias field, coil shading)", "intensity inhomogeneity"),
    "background_artifact_fraction": ("ghosting / wrap-around in the background", "ghosting/wrap-around"),
    "fov_contact": ("the head runs off both ends of the field of view (wrap-around, or a field of view "
                    "too small)", "ghosting/wrap-around"),
    "sharpness": ("blurring (motion or low resolution)", "motion"),
    "axis_sharpness": ("blurring along one axis (thick slices or through-plane motion)", "motion"),
    "noise": ("noise in the brain", "noise"),
    "snr": ("low signal-to-noise ratio", "noise"),
    "spectral_peak": ("spike / zipper stripes (a k-space spike)", "spike/zipper"),
    "line_comb": ("ghosting along the phase-encode direction (motion or pulsation)", "ghosting/wrap-around"),
    "site_anomaly_fraction": ("a region unlike the same place in this site's other scans (the model, "
                              "against the site)", "other"),
}


def describe_measure(name: str | None) -> str:
    """A measurement's name in a rater's words (the name itself when it is not known)."""
    if not name:
        return ""
    return MEASURE_WORDS.get(str(name), (str(name), ""))[0]


def scan_anchor(bids_name: str) -> str:
    """The HTML id of a scan's section (``scan-`` + the name with unsafe characters as ``_``).

    Every page derives a scan's anchor from its name with this one function, so a link
    from the group table or the overview lands on the scan's section.
    """
    return "scan-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(bids_name))


#: the key that toggles each artifact tag in the rating mode (good/questionable/bad: 1/2/3)
ARTIFACT_KEYS = dict(zip(ARTIFACT_CHOICES, ("m", "g", "s", "c", "n", "i", "z", "x")))


# --------------------------------------------------------------------------- jinja
@functools.lru_cache(maxsize=1)
def _env():
    import jinja2

    folder = resources.files("qc_pipeline.templates")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)),
                             autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    env.filters["anchor"] = scan_anchor
    env.filters["words"] = describe_measure
    return env


def _asset(name: str) -> Markup:
    text = resources.files("qc_pipeline.templates").joinpath(name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():
        raise RuntimeError(f"template asset {name} must not contain a closing script/style tag")
    return Markup(text)


def _num(v, digits: int = 4):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a" if v in (None, "", "n/a") else str(v)
    if math.isnan(f):
        return "n/a"
    if f == int(f) and abs(f) < 1e12:
        return f"{int(f)}"
    return f"{f:.{digits}g}"


def _pct(v, digits: int = 3):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    if math.isnan(f):
        return "n/a"
    return f"{100.0 * f:.{digits}g}%"


# --------------------------------------------------------------------------- provenance
def _provenance(output_dir: Path, records: list[QCRecord]) -> dict:
    prov: dict = {"report_version": __version__,
                  "generated": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    dd = output_dir / "dataset_description.json"
    try:
        desc = json.loads(dd.read_text(encoding="utf-8"))
        gen = desc.get("GeneratedBy") or []
        if isinstance(gen, list) and gen:
            g = gen[0]
            prov["generated_by"] = f"{g.get('Name', '')} {g.get('Version', '')}".strip()
            for key in ("CommandLine", "command_line"):
                if g.get(key):
                    prov["command_line"] = g[key]
            if g.get("ModelIds") or g.get("models"):
                prov["model_ids"] = g.get("ModelIds") or g.get("models")
    except (OSError, ValueError, AttributeError):
        pass
    logs = output_dir / "logs"
    if logs.is_dir():
        for p in sorted(logs.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                cfg = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(cfg, dict):
                continue
            for key in ("command_line", "argv", "cmdline"):
                v = cfg.get(key)
                if v:
                    prov.setdefault("command_line", " ".join(v) if isinstance(v, list) else str(v))
            for key in ("started", "start_time", "run_started", "timestamp"):
                if cfg.get(key):
                    prov.setdefault("run_time", str(cfg[key]))
            if "command_line" in prov:
                prov.setdefault("config_file", f"logs/{p.name}")
                break
    for r in records:
        for key in ("command_line", "started", "created"):
            if r.data.get(key) and key == "command_line":
                prov.setdefault("command_line", str(r.data[key]))
            elif r.data.get(key):
                prov.setdefault("run_time", str(r.data[key]))
    # model cards: qc.json "model_card" (dict) or a packaged card with the same id
    cards = {}
    for r in records:
        mid = r.data.get("model_id")
        if not mid or mid in cards:
            continue
        card = (r.data.get("model_card") if isinstance(r.data.get("model_card"), dict)
                else _packaged_card(mid) or _adapted_card(output_dir, mid))
        cards[mid] = _card_summary(card) if card else {"note": "model card not found with the derivatives"}
    prov["models"] = cards
    return prov


def _packaged_card(model_id: str) -> dict | None:
    try:
        root = resources.files("qc_pipeline.models")
        folders = [Path(str(sub)) for sub in root.iterdir() if sub.is_dir()]
    except (OSError, TypeError):  # provenance is best effort
        return None
    return _card_with_id(folders, model_id)


def _adapted_card(output_dir: Path, model_id: str) -> dict | None:
    """The card of a model the adapt level wrote beside the derivatives (``models/<suffix>``)."""
    return _card_with_id(sorted(p for p in (output_dir / "models").glob("*") if p.is_dir()), model_id)


def _card_with_id(folders, model_id: str) -> dict | None:
    for folder in folders:
        try:
            card = load_model_card(folder)
        except (ModelNotFoundError, ModelCardError):
            continue
        if str(card.get("model_id") or card.get("id")) == str(model_id):
            return card
    return None


def _card_summary(card: dict) -> dict:
    keys = ("model_id", "id", "contrast", "voxel_size", "grid", "training_data", "n_training",
            "steps", "wall_time", "code_version", "r", "gamma", "schedule", "params")
    out = {}
    for k in keys:
        if k in card and card[k] not in (None, ""):
            v = card[k]
            out[k] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    ad = card.get("adaptation")
    if isinstance(ad, dict):
        out["adapted_from"] = str(ad.get("base_model_id"))
        out["adapted_on"] = (f"{len(ad.get('training_scans') or [])} scans of {ad.get('dataset')} "
                             f"({len(ad.get('excluded_scans') or {})} left out), {ad.get('steps')} steps "
                             f"on {ad.get('device')}")
    return out


# --------------------------------------------------------------------------- subject page
def ranking_score(rows) -> str:
    """The score a group table is ranked by, from its rows: ``qc_score_site`` when every
    successful scan has one, else ``qc_score``, else ``anomaly_fraction`` (the group
    level's own rule, :func:`qc_pipeline.group.compute_suffix_tables`)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    for key in ("qc_score_site", "qc_score"):
        if ok and all(r.get(key) not in (None, "", "n/a") for r in ok):
            return key
    return "anomaly_fraction"


@functools.lru_cache(maxsize=8)
def _group_rows_cached(path: str, stamp: tuple) -> dict:
    return read_group_csv(path)


def _group_rows(path: Path) -> dict:
    """``read_group_csv`` read once per version of the file: every scan's section of every
    subject page looks up the same table."""
    st = path.stat()
    return _group_rows_cached(str(path), (st.st_mtime_ns, st.st_size))


def _group_info(output_dir: Path, rec: QCRecord) -> dict | None:
    """The scan's verdict from ``group_<suffix>.csv`` (score, driver, rank, flags) and its
    neighbours in the ranking; None when the table is absent, ``{"stale": True}`` when it
    no longer matches the qc.json."""
    p = output_dir / f"group_{rec.suffix}.csv"
    if not p.is_file() or not rec.ok:
        return None
    try:
        rows = _group_rows(p)
    except (OSError, KeyError, ValueError):
        return None
    row = rows.get(rec.bids_name)
    if row is None:
        return None
    try:
        frac = float(row.get("anomaly_fraction", "nan"))
    except ValueError:
        return None
    if not math.isclose(frac, rec.fraction, rel_tol=1e-5, abs_tol=1e-12):
        return {"stale": True}
    site = row.get("site", "")
    key = ranking_score(rows.values())
    site_ok = [r for r in rows.values() if r.get("site") == site and r.get("status") == "ok"]
    mine = float(row.get(key) or "nan")
    rank_site = 1 + sum(1 for r in site_ok if float(r[key]) > mine)
    n_all = sum(1 for r in rows.values() if r.get("status") == "ok")
    driver = {"qc_score_site": row.get("qc_score_site_driver"),
              "qc_score": row.get("qc_score_driver")}.get(key) or ""
    contributors = {"qc_score_site": row.get("qc_score_site_contributors"),
                    "qc_score": row.get("qc_score_contributors")}.get(key) or ""
    rule = bg_rule = ""
    sp = output_dir / f"group_{rec.suffix}_sites.csv"
    if sp.is_file():
        import csv

        with open(sp, encoding="utf-8", newline="") as fh:
            for srow in csv.DictReader(fh):
                if srow.get("site") == site:
                    rule = srow.get("threshold_rule", "")
                    bg_rule = srow.get("background_rule", "") or ""
    return {"stale": False, "site": site, "rank_in_site": rank_site, "n_site": len(site_ok),
            "rank": row.get("rank"), "n_all": n_all,
            "percentile": row.get("percentile_in_site"), "flagged": row.get("flagged") == "1",
            "threshold": row.get("threshold"), "rule": rule, "csv": p.name,
            "page": f"group_{rec.suffix}.html", "score": key, "score_value": row.get(key),
            "driver": driver, "driver_words": describe_measure(driver),
            "contributors": contributor_names(contributors),
            "background_flagged": row.get("background_flagged") == "1",
            "engine_flagged": row.get("engine_flagged") == "1",
            "score_flagged": row.get("score_flagged") == "1",
            "site_mask": site_mask_of(rec, row.get("site_anomaly_fraction")),
            "background_threshold": row.get("background_threshold"), "background_rule": bg_rule,
            "flag_reasons": row.get("flag_reasons", "") or ""}


def _scan_nav(output_dir: Path, rec: QCRecord) -> dict | None:
    """Links of a scan's section: its row of the group table and its neighbours in the
    ranking (worst first, failed scans last); None before the group level."""
    p = output_dir / f"group_{rec.suffix}.csv"
    try:
        rows = _group_rows(p) if p.is_file() else {}
    except (OSError, KeyError, ValueError):
        rows = {}
    if rec.bids_name not in rows:
        return None
    order = list(rows)  # the CSV is written worst first
    i = order.index(rec.bids_name)

    def link(j: int) -> dict | None:
        if not 0 <= j < len(order):
            return None
        return {"bids_name": order[j], "href": f"{rows[order[j]].get('report', '')}#{scan_anchor(order[j])}"}

    return {"page": f"group_{rec.suffix}.html", "previous": link(i - 1), "next": link(i + 1),
            "position": i + 1, "n": len(order)}


_SCORE_BASIS = {
    "qc_score_site": "robust z against this site's clean scans most like it",
    "qc_score": "robust z against the model's clean reference scans",
    "anomaly_fraction": "share of the brain the model could not reconstruct",
}


def scan_verdict(data: dict, group: dict | None) -> dict:
    """The one verdict a subject page leads with: the number the group table ranks the scan
    by, the measurement that drove it in a rater's words, and the flags.

    Before the group level (or with a stale table) it is the qc.json's own QC score against
    the model's reference, and ``ranked`` is False.
    """
    ranked = bool(group) and not group.get("stale")
    if ranked:
        score, value, driver = group["score"], group["score_value"], group["driver"]
        flagged, bg_flagged = group["flagged"], group["background_flagged"]
        en_flagged = bool(group.get("engine_flagged"))
        # a table without the column (older group level): the score's flag is what is left
        score_flagged = bool(group.get("score_flagged", flagged and not (bg_flagged or en_flagged)))
        also = list(group.get("contributors") or [])
    else:
        score, value, driver = "qc_score", data.get("qc_score"), data.get("qc_score_driver") or ""
        flagged = bg_flagged = en_flagged = score_flagged = False
        also = [c.get("measure") for c in data.get("qc_score_contributors") or []
                if isinstance(c, dict) and isinstance(c.get("measure"), str)]
        if value is None:
            score, value, driver = "anomaly_fraction", data.get("anomaly_fraction"), ""
    # the flags that fired lead; the score's driver then says why the scan ranks where it does,
    # and the other measurements that are out too follow it
    fired = ([driver] if score_flagged and driver else []) + \
        (["background_artifact_fraction"] if bg_flagged else []) + (["site_anomaly_fraction"] if en_flagged else [])
    reasons = [describe_measure(d) for d in dict.fromkeys(fired + ([driver] if driver else []) + also)]
    pointers = ([driver] if driver else []) + (["background_artifact_fraction"] if bg_flagged else [])
    tags = [MEASURE_WORDS[d][1] for d in pointers
            if d in MEASURE_WORDS]
    return {"ranked": ranked, "score": score, "value": value, "driver": driver, "reasons": reasons,
            "basis": _SCORE_BASIS[score], "flagged": flagged, "background_flagged": bg_flagged,
            "engine_flagged": en_flagged,
            "tags": sorted(set(tags))}


def _measurements(data: dict, driver: str) -> list[dict]:
    """The QC-score measurements of a qc.json, worst first, each in a rater's words."""
    z = data.get("quality_z") if isinstance(data.get("quality_z"), dict) else {}
    feats = data.get("quality_features") if isinstance(data.get("quality_features"), dict) else {}
    out = []
    for name in sorted(set(z) | set(feats)):
        zv = z.get(name)
        zf = float(zv) if isinstance(zv, (int, float)) and math.isfinite(zv) else -math.inf
        out.append({"name": name, "words": describe_measure(name), "value": feats.get(name), "z": zv,
                    "driver": name == driver, "sort": zf})
    return sorted(out, key=lambda m: (-m["sort"], m["name"]))


def _site_plots(rows: list[dict] | None, verdict: dict, bids_name: str, site: str) -> list[Markup]:
    """The scan against its site: the ranking score and the driving measurement of every
    scan of the site as strip plots, this scan drawn large (none without the group rows)."""
    if not rows or not verdict["ranked"]:
        return []
    mine = [r for r in rows if r["status"] == "ok" and r["site"] == site]

    def pts(get):
        return [{"name": r["bids_name"], "site": site, "value": get(r), "flagged": r["flagged"] or
                 r.get("background_flagged"), "label": r.get("label"),
                 "href": f"{r['report']}#{scan_anchor(r['bids_name'])}"} for r in mine]

    key, driver = verdict["score"], verdict["driver"]
    thr = {float(r["threshold"]) for r in mine if r.get("threshold") is not None}
    out = [strip_plot_svg(pts(lambda r: r.get(key)), [site], title="QC score in its site",
                          percent=key == "anomaly_fraction", threshold=thr.pop() if len(thr) == 1 else None,
                          highlight=bids_name, width=220)]
    if driver:
        def z(r):
            v = (r.get("quality_z") or {}).get(driver)
            return float(v) if isinstance(v, (int, float)) else None
        out.append(strip_plot_svg(pts(z), [site], title=f"{driver} (z)",
                                  caption=f"{describe_measure(driver)}: robust z against the reference",
                                  highlight=bids_name, width=220))
    return [p for p in out if p is not None]


def render_subject_report(output_dir, subject: str, *, site_column: str = "site",
                          tables: GroupTables | None = None) -> str:
    """HTML text of ``sub-<subject>.html`` (see :func:`write_subject_report`); with the
    group level's ``tables``, each scan's verdict is drawn against its site's scans."""
    output_dir = Path(output_dir)
    subject = str(subject).removeprefix("sub-")
    records = load_qc_records(output_dir, subject=subject, site_column=site_column)
    if not records:
        raise FileNotFoundError(f"no *_qc.json for sub-{subject} under {output_dir}")
    order = lambda r: (str(r.entities.get("session", "")), r.suffix, str(r.entities.get("acquisition", "")),
                       str(r.entities.get("run", "")), r.bids_name)
    scans = []
    for i, rec in enumerate(sorted(records, key=order)):
        ent = {k: v for k, v in rec.entities.items() if k not in ("subject",) and v not in (None, "")}
        d = rec.data
        group = _group_info(output_dir, rec)
        verdict = scan_verdict(d, group)
        suffix_rows = next((t.rows for t in (tables.tables if tables else []) if t.suffix == rec.suffix), None)
        scans.append({
            "idx": i, "anchor": scan_anchor(rec.bids_name), "rec": rec, "bids_name": rec.bids_name,
            "entities": ent, "site": rec.site, "ok": rec.ok, "status": rec.status,
            "error": rec.error, "warnings": rec.warnings,
            "voxels": d.get("anomaly_voxels"), "fraction": d.get("anomaly_fraction"),
            "qc_score": d.get("qc_score"), "driver": d.get("qc_score_driver"),
            "quality_z": d.get("quality_z") or {}, "quality_features": d.get("quality_features") or {},
            "mm3": d.get("anomaly_mm3"),
            "region_count": d.get("anomaly_region_count") or 0,
            "regions": [r for r in d.get("anomaly_regions") or [] if isinstance(r, dict)],
            "background": rec.background, "bg_fraction": d.get("background_artifact_fraction"),
            "group": group, "verdict": verdict, "nav": _scan_nav(output_dir, rec),
            "measurements": _measurements(d, verdict["driver"]),
            "site_plots": _site_plots(suffix_rows, verdict, rec.bids_name, rec.site) if rec.ok else [],
            "fig": scan_figures(rec, output_dir, site_mask=(group or {}).get("site_mask")),
            "details": [(k, d.get(k)) for k in ("model_id", "model_adapted_from", "schedule", "device", "forward_passes",
                                                 "tau_stop", "mean_error", "raw_anomaly_fraction", "runtime_s",
                                                 "package_version", "input_sha256", "source_file",
                                                 "mask_file", "error_map_file") if d.get(k) not in (None, "")],
            "fit": d.get("fit") or {},
        })
    sites = sorted({r.site for r in records})
    return _env().get_template("subject.html").render(
        subject=subject, scans=scans, sites=sites, prov=_provenance(output_dir, records),
        css=_asset("report.css"), js=_asset("report.js"), artifacts=ARTIFACT_CHOICES,
        ratings_key=study_key(output_dir), n_failed=sum(not s["ok"] for s in scans), version=__version__)


def write_subject_report(output_dir, subject: str, *, site_column: str = "site",
                         tables: GroupTables | None = None) -> Path:
    """Write ``OUTPUT_DIR/sub-<subject>.html`` for every scan of the subject (atomic).

    Uses the group tables (``group_<suffix>.csv``) for ranks and percentiles when they
    exist and still match the scan's qc.json; otherwise the page says to run the group
    level. Needs only the derivatives folder.
    """
    output_dir = Path(output_dir)
    subject = str(subject).removeprefix("sub-")
    html = render_subject_report(output_dir, subject, site_column=site_column, tables=tables)
    path = output_dir / f"sub-{subject}.html"
    atomic_write_text(html, path)
    return path


# --------------------------------------------------------------------------- group page
def study_key(output_dir) -> str:
    """The browser-storage key of one study's ratings.

    Every local page shares one storage in a browser (Chromium gives all ``file://``
    pages one origin), so ratings are kept per study: a hash of the dataset's name (from
    ``dataset_description.json``) and the derivatives folder's name, which stays the same
    when the folder is copied to another disk.
    """
    import hashlib

    output_dir = Path(output_dir)
    try:
        name = str(json.loads((output_dir / "dataset_description.json").read_text(encoding="utf-8")).get("Name", ""))
    except (OSError, ValueError, AttributeError):
        name = ""
    digest = hashlib.sha256(json.dumps([name, output_dir.resolve().name]).encode("utf-8")).hexdigest()[:12]
    return f"itermask-qc-ratings:v2:{digest}"


def _overview_cards(output_dir: Path, table, records: dict) -> list[dict]:
    """One card per row of a suffix table, in the table's order (worst first, failed last)."""
    from urllib.parse import quote

    key = table.summary.get("score", "anomaly_fraction")
    cards = []
    for r in table.rows:
        rec = records.get((table.suffix, r["bids_name"]))
        fig = scan_figures(rec, output_dir, site_mask=site_mask_of(rec, r.get("site_anomaly_fraction"))) \
            if rec is not None and r["status"] == "ok" else {}
        mosaic = None
        if rec is not None:
            figdir, stem = figure_place(output_dir, rec)
            cached = figdir / f"{stem}_desc-mosaic.png"
            if cached.is_file():
                mosaic = quote(cached.relative_to(output_dir).as_posix())
        driver = (r.get("qc_score_site_driver") if key == "qc_score_site"
                  else r.get("qc_score_driver") if key == "qc_score" else "") or ""
        cards.append({
            "bids_name": r["bids_name"], "anchor": scan_anchor(r["bids_name"]), "suffix": table.suffix,
            "href": f"{r['report']}#{scan_anchor(r['bids_name'])}", "site": r["site"], "status": r["status"],
            "error": r.get("error") or "", "rank": r.get("rank"), "score": r.get(key), "score_name": key,
            "driver": driver, "words": describe_measure(driver), "flagged": bool(r.get("flagged")),
            "background_flagged": bool(r.get("background_flagged")),
            "engine_flagged": bool(r.get("engine_flagged")), "label": r.get("label"),
            "thumb": fig.get("thumb"), "mosaic": mosaic,
            "tags": sorted({MEASURE_WORDS[d][1] for d in (driver, "background_artifact_fraction"
                                                            if r.get("background_flagged") else "")
                            if d in MEASURE_WORDS}),
        })
    return cards


def render_overview(tables: GroupTables, *, site_column: str = "site") -> str:
    """HTML text of ``OUTPUT_DIR/index.html``: every scan of every suffix as a thumbnail
    through its worst slice, worst first, with filters, links to the reports, and the
    keyboard rating mode."""
    out = Path(tables.output_dir)
    records = {(r.suffix, r.bids_name): r for r in load_qc_records(out, site_column=site_column)}
    suffixes = [{"suffix": t.suffix, "cards": _overview_cards(out, t, records), "score": t.summary.get("score"),
                 "rule": t.summary.get("rule", ""), "page": f"group_{t.suffix}.html"} for t in tables.tables]
    sites = sorted({c["site"] for s in suffixes for c in s["cards"]})
    n = sum(len(s["cards"]) for s in suffixes)
    return _env().get_template("overview.html").render(
        suffixes=suffixes, sites=sites, n_scans=n, labels_source=tables.labels_source,
        artifacts=ARTIFACT_CHOICES, artifact_keys=ARTIFACT_KEYS, ratings_key=study_key(out),
        css=_asset("report.css"), js=_asset("report.js"), version=__version__,
        generated=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))


_TICKS = (-1000, -100, -20, -10, -5, -2, 0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000)
_PCT_TICKS = (0, 0.01, 0.1, 1, 10, 100)


def strip_plot_svg(points: list[dict], sites: list[str], *, title: str, percent: bool = False,
                   threshold: float | None = None, caption: str | None = None, highlight: str | None = None,
                   width: int = 330, height: int = 210) -> Markup | None:
    """One measurement per site as a static SVG strip plot with a box (quartiles, median).

    ``points``: ``{"name", "site", "value", "flagged", "label", "href"}``; every dot links
    to its scan's report section, names it on hover (``<title>``) and carries
    ``data-scan`` so that the page's script can highlight one scan in every plot. The axis
    is symmetric-log (``sign(v) log10(1 + |v| / c)``, ``c`` = 1 for z, 0.01 for percent) and
    spans every value: outliers are never clipped. Every text is escaped. ``caption`` is
    the plot's tooltip (default: ``title``); the scan named ``highlight`` is drawn large,
    on top. None when no point has a finite value.
    """
    from markupsafe import escape

    pts = [p for p in points if p.get("value") is not None and math.isfinite(float(p["value"]))]
    if not pts:
        return None
    scale = 100.0 if percent else 1.0
    unit = "%" if percent else ""
    c = 0.01 if percent else 1.0
    f = lambda v: math.copysign(math.log10(1.0 + abs(v) / c), v)
    vals = [float(p["value"]) * scale for p in pts]
    ys = [f(v) for v in vals] + ([f(threshold * scale)] if threshold is not None and math.isfinite(threshold) else [])
    lo, hi = min(ys + [0.0]), max(ys + [f(2.0 * c) if not percent else f(0.1)])
    pad = 0.06 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    left, right, top, bottom = 44, 8, 20, 30
    pw, ph = width - left - right, height - top - bottom
    Y = lambda y: top + ph * (1.0 - (y - lo) / (hi - lo))
    band = pw / max(1, len(sites))
    X = lambda i: left + band * (i + 0.5)
    # inline in HTML: the parser puts it in the SVG namespace, no xmlns (and no URL) needed
    out = [f'<svg class="strip" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{escape(title)}"><title>{escape(caption or title)}</title>',
           f'<text x="{left}" y="13" font-weight="600">{escape(title)}</text>',
           f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>']
    for t in (_PCT_TICKS if percent else _TICKS):
        y = f(t)
        if lo <= y <= hi:
            out.append(f'<line class="axis" x1="{left - 3}" y1="{Y(y):.1f}" x2="{left}" y2="{Y(y):.1f}"/>'
                       f'<text x="{left - 5}" y="{Y(y) + 3:.1f}" text-anchor="end">{t:g}{unit}</text>')
    for i, site in enumerate(sites):
        ys_site = sorted(f(float(p["value"]) * scale) for p in pts if p["site"] == site)
        label = str(site) if len(str(site)) <= 14 else str(site)[:13] + "…"
        out.append(f'<text x="{X(i):.1f}" y="{height - 10}" text-anchor="middle">{escape(label)}</text>')
        if len(ys_site) >= 3:
            q1, med, q3 = (float(np.percentile(ys_site, q)) for q in (25, 50, 75))
            out.append(f'<rect class="box" x="{X(i) - band * 0.3:.1f}" y="{Y(q3):.1f}" width="{band * 0.6:.1f}" '
                       f'height="{max(1.0, Y(q1) - Y(q3)):.1f}"/><line class="axis" x1="{X(i) - band * 0.3:.1f}" '
                       f'y1="{Y(med):.1f}" x2="{X(i) + band * 0.3:.1f}" y2="{Y(med):.1f}"/>')
    if threshold is not None and math.isfinite(threshold):
        y = Y(f(threshold * scale))
        out.append(f'<line class="thr" x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}"><title>flag threshold '
                   f'{threshold * scale:.3g}</title></line>')
    order = sorted(range(len(pts)), key=lambda j: pts[j]["name"] == highlight)  # highlight last: on top
    for p, v in ((pts[j], vals[j]) for j in order):
        i = sites.index(p["site"]) if p["site"] in sites else 0
        # jitter from the name, so a scan sits at the same x in every plot
        jit = (int.from_bytes(p["name"].encode("utf-8")[-4:].rjust(4, b"\0"), "big") % 1000 / 1000.0 - 0.5) * band * 0.5
        cls = "flag" if p.get("flagged") else "ok"
        if p.get("label") == 1:
            cls += " art"
        if p["name"] == highlight:
            cls += " me"
        tip = f'{p["name"]} (site {p["site"]}): {v:.3g}{"%" if percent else ""}'
        out.append(f'<a href="{escape(p["href"])}"><circle class="{cls}" cx="{X(i) + jit:.1f}" '
                   f'cy="{Y(f(v)):.1f}" r="3.5" '
                   f'data-scan="{escape(p["name"])}" tabindex="0"><title>{escape(tip)}</title></circle></a>')
    out.append("</svg>")
    return Markup("".join(out))


def group_plots(rows: list[dict], summary: dict) -> list[Markup]:
    """The group page's linked plots: the ranking score (with the flag threshold when every
    site shares it), the anomaly and background fractions, then each QC-score measurement
    (robust z against the reference), worst-reaching first."""
    ok = [r for r in rows if r["status"] == "ok"]
    sites = list(summary["sites"])

    def pts(get):
        return [{"name": r["bids_name"], "site": r["site"], "value": get(r), "flagged": r["flagged"] or
                 r.get("background_flagged"), "label": r.get("label"),
                 "href": f"{r['report']}#{scan_anchor(r['bids_name'])}"} for r in ok]

    key = summary.get("score", "anomaly_fraction")
    thr = {t for t, _ in summary.get("site_thresholds", {}).values()}
    shared = thr.pop() if len(thr) == 1 else None
    out = [strip_plot_svg(pts(lambda r: r.get(key)), sites, title=f"{key} (ranks and flags)",
                          percent=key == "anomaly_fraction", threshold=shared)]
    if key != "anomaly_fraction":
        out.append(strip_plot_svg(pts(lambda r: r.get("anomaly_fraction")), sites, title="anomaly fraction",
                                  percent=True))
    out.append(strip_plot_svg(pts(lambda r: r.get("background_artifact_fraction")), sites,
                              title="background artifact fraction", percent=True))
    names = sorted({k for r in ok for k in r.get("quality_z", {})},
                   key=lambda k: -max((float(r["quality_z"][k]) for r in ok
                                       if isinstance(r.get("quality_z", {}).get(k), (int, float))), default=0.0))
    for name in names:
        def z(r, name=name):
            v = r.get("quality_z", {}).get(name)
            return float(v) if isinstance(v, (int, float)) else None
        out.append(strip_plot_svg(pts(z), sites, title=f"{describe_measure(name)} (z)",
                                  caption=f"{name}: robust z against the reference"))
    return [p for p in out if p is not None]


def write_group_pages(tables: GroupTables, *, site_column: str = "site",
                      subject_reports: bool = True) -> list[Path]:
    """Write ``group_<suffix>.html`` for each table and (``subject_reports``) re-render every
    subject's ``sub-<label>.html`` with its ranks; returns the pages written (group pages
    first). A subject page that fails is logged, never raised: a report must not sink the
    group level."""
    out = Path(tables.output_dir)
    subject_pages = []
    if subject_reports:  # subject pages read the CSVs just written; the group pages link to them
        for subject in tables.subjects:
            try:
                subject_pages.append(write_subject_report(out, subject, site_column=site_column, tables=tables))
            except Exception as exc:  # noqa: BLE001
                LOGGER.error("subject report for sub-%s failed: %s", subject, exc)
    group_pages = []
    for t in tables.tables:
        html = render_group_report(out, suffix=t.suffix, rows=t.rows, site_rows=t.site_rows,
                                   summary=t.summary, labels_source=tables.labels_source,
                                   mad_k=tables.mad_k, flag_at_fnr=tables.flag_at_fnr,
                                   site_columns=t.site_columns)
        group_pages.append(atomic_write_text(html, out / f"group_{t.suffix}.html"))
    group_pages.append(atomic_write_text(render_overview(tables, site_column=site_column), out / "index.html"))
    return group_pages + subject_pages


def render_group_report(output_dir, *, suffix: str, rows: list[dict], site_rows: list[dict],
                        summary: dict, labels_source: str | None, mad_k: float,
                        flag_at_fnr: float | None, site_columns: list[str]) -> str:
    """HTML text of ``group_<suffix>.html``."""
    output_dir = Path(output_dir)
    failed = [r for r in rows if r["status"] != "ok"]
    reasons: dict[str, int] = {}
    for r in failed:
        reasons[r["error"] or "unknown"] = reasons.get(r["error"] or "unknown", 0) + 1
    for r in rows:
        r["report_exists"] = (output_dir / r["report"]).is_file()
    metric_cols = [c for c in _metrics.METRIC_NAMES if c in site_columns]
    return _env().get_template("group.html").render(
        suffix=suffix, rows=rows, site_rows=site_rows, summary=summary, failed=failed,
        reasons=sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])),
        plots=group_plots(rows, summary), labels_source=labels_source,
        mad_k=mad_k, flag_at_fnr=flag_at_fnr, metric_cols=metric_cols,
        definitions=_metrics.METRIC_DEFINITIONS, pooled=POOLED_SITE,
        sites=summary["sites"], css=_asset("report.css"), js=_asset("report.js"),
        version=__version__,
        generated=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        n_flagged=sum(1 for r in rows if r["flagged"]))


# --------------------------------------------------------------------------- the page that never fails
# Its template stays here, not in templates/: it must render when the package's template files
# (or the environment that loads them) are what failed.
_FALLBACK_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>itermask-qc: sub-{{ subject }}</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #999;padding:2px 6px}.error{color:#a00}</style></head>
<body><h1>itermask-qc report: sub-{{ subject }}</h1>
<p>itermask-qc {{ version }} &mdash; minimal report (the full report could not be drawn).</p>
<table><tr><th>scan</th><th>site</th><th>status</th><th>anomaly voxels</th>
<th>anomaly fraction</th><th>anomaly mm&sup3;</th><th>error / warnings</th></tr>
{% for r in records %}<tr><td>{{ r.bids_name }}</td><td>{{ r.site }}</td><td>{{ r.status }}</td>
<td>{{ r.anomaly_voxels }}</td><td>{{ r.anomaly_fraction }}</td><td>{{ r.anomaly_mm3 }}</td>
<td class="{{ 'error' if r.status != 'ok' else '' }}">{{ r.error or '' }}
{{ (r.warnings or [])|join('; ') }}</td></tr>
{% endfor %}</table></body></html>
"""


def fallback_subject_report(output_dir, subject: str) -> Path:
    """A minimal, escaped jinja2 page listing the subject's ``_qc.json`` records."""
    import jinja2

    output_dir = Path(output_dir)
    subject = str(subject)
    subject = subject[4:] if subject.startswith("sub-") else subject
    files = sorted((output_dir / f"sub-{subject}").glob("**/anat/*_qc.json"))
    records = [r for r in (read_qc(f) for f in files) if r]
    env = jinja2.Environment(autoescape=True)
    page = env.from_string(_FALLBACK_TEMPLATE).render(subject=subject, records=records,
                                                      version=__version__)
    path = output_dir / f"sub-{subject}.html"
    atomic_write_text(page, path)
    return path


def write_subject_page(output_dir, subject: str, *, site_column: str = "site") -> Path:
    """Write ``sub-<label>.html`` with :func:`write_subject_report`; fall back to
    :func:`fallback_subject_report` if it fails (a report problem never fails the run; it
    is logged)."""
    try:
        return write_subject_report(output_dir, subject, site_column=site_column)
    except Exception as exc:  # noqa: BLE001 - reports must not fail the run
        LOGGER.warning("sub-%s: report failed (%s: %s); writing a minimal report",
                       subject, type(exc).__name__, one_line(exc))
        return fallback_subject_report(output_dir, subject)
