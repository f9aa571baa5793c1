"""Group level: CSV columns, ranking, flagging, threshold rules, labels, site metrics."""
import csv
import json
import math

import numpy as np
import pytest

from qc_pipeline.derivatives import load_qc_records
from qc_pipeline.group import DEFAULT_MAD_K, GroupError
from qc_pipeline.labels import LabelsError, load_labels
from qc_pipeline.grouplevel import run_group
from qc_pipeline.qc.metrics import detection_metrics, threshold_at_fnr

REQUIRED = ["bids_name", "subject", "session", "acquisition", "run", "suffix", "site", "status",
            "anomaly_voxels", "anomaly_fraction", "anomaly_mm3", "rank", "percentile_in_site",
            "flagged", "error"]
SITE_REQUIRED = ["site", "n_scans", "n_failed", "median_fraction", "p95_fraction", "threshold",
                 "threshold_rule", "n_flagged", "n_labelled", "AUROC", "AUPRC", "FPR80", "FPR90",
                 "FNR80", "FNR90"]


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _f(v):
    return math.nan if v in ("", "n/a") else float(v)


def test_files_written_per_suffix(group_run):
    dv, written = group_run
    names = {p.name for p in written}
    for suf in ("T1w", "FLAIR"):
        assert {f"group_{suf}.csv", f"group_{suf}_sites.csv", f"group_{suf}.html"} <= names
    assert "sub-01.html" in names and "sub-14.html" in names
    assert not list(dv.root.rglob("*.tmp")), "atomic writes leave no temp files"


def test_ranking_csv(group_run):
    dv, _ = group_run
    rows = _read(dv.root / "group_T1w.csv")
    assert list(rows[0])[:len(REQUIRED)] == REQUIRED
    t1 = [s for s in dv.scans if s.suffix == "T1w"]
    assert len(rows) == len(t1)
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "error"]
    # worst first, failed last with their reason and no rank
    fr = [float(r["anomaly_fraction"]) for r in ok]
    assert fr == sorted(fr, reverse=True)
    assert rows[-len(failed):] == failed and len(failed) == 2
    assert {r["bids_name"]: r["error"] for r in failed} == {
        "sub-09_T1w": "CorruptImage: truncated gzip stream",
        "sub-14_T1w": "Not3D: image has 4 dimensions (32, 36, 30, 5)"}
    assert all(r["rank"] == "" for r in failed)
    assert rows[0]["bids_name"] == "sub-05_T1w" and rows[0]["rank"] == "1"
    # ties share a rank (sub-01 run-2 and sub-10 have 3 voxels each)
    tied = [r for r in ok if r["anomaly_voxels"] == "3"]
    assert len(tied) == 2 and tied[0]["rank"] == tied[1]["rank"]
    # entities and sites carried from qc.json (A from 'site', B from metadata)
    r = next(r for r in rows if r["bids_name"] == "sub-01_ses-2_run-1_T1w")
    assert (r["subject"], r["session"], r["run"], r["site"]) == ("01", "2", "1", "A")
    assert next(r for r in rows if r["bids_name"] == "sub-12_T1w")["site"] == "B"
    # values match the qc.json files
    for sc in t1:
        if sc.kind != "failed":
            row = next(r for r in rows if r["bids_name"] == sc.bids_name)
            assert float(row["anomaly_fraction"]) == pytest.approx(sc.fraction, rel=1e-5)


def test_percentile_in_site(group_run):
    dv, _ = group_run
    rows = [r for r in _read(dv.root / "group_T1w.csv") if r["status"] == "ok"]
    for site in ("A", "B"):
        rs = [r for r in rows if r["site"] == site]
        x = np.array([float(r["anomaly_fraction"]) for r in rs])
        for r in rs:
            expect = 100 * np.mean(x <= float(r["anomaly_fraction"]))
            assert float(r["percentile_in_site"]) == pytest.approx(expect, abs=1e-3)
        assert max(float(r["percentile_in_site"]) for r in rs) == 100


def test_robust_flagging_per_site_and_pooled_fallback(group_run):
    dv, _ = group_run
    rows = _read(dv.root / "group_T1w.csv")
    sites = {r["site"]: r for r in _read(dv.root / "group_T1w_sites.csv")}
    ok = [r for r in rows if r["status"] == "ok"]
    a = np.array([float(r["anomaly_fraction"]) for r in ok if r["site"] == "A"])
    med = np.median(a)
    thr_a = med + DEFAULT_MAD_K * 1.4826 * np.median(np.abs(a - med))
    assert float(sites["A"]["threshold"]) == pytest.approx(thr_a, rel=1e-5)
    assert "robust per site" in sites["A"]["threshold_rule"]
    # site B has 4 successful scans < 8: pooled distribution
    pooled = np.array([float(r["anomaly_fraction"]) for r in ok])
    pm = np.median(pooled)
    thr_b = pm + DEFAULT_MAD_K * 1.4826 * np.median(np.abs(pooled - pm))
    assert float(sites["B"]["threshold"]) == pytest.approx(thr_b, rel=1e-5)
    assert "pooled" in sites["B"]["threshold_rule"]
    flagged = {r["bids_name"] for r in ok if r["flagged"] == "1"}
    assert flagged == {s.bids_name for s in dv.scans if s.kind == "artifact" and s.suffix == "T1w"}
    for r in ok:
        assert (r["flagged"] == "1") == (float(r["anomaly_fraction"]) > float(sites[r["site"]]["threshold"]))
    # each site's failed scan needs a look too: flagged, with the reason, never ranked
    assert sites["A"]["n_flagged"] == "3" and sites["B"]["n_flagged"] == "2"
    for r in rows:
        if r["status"] == "error":
            assert r["flagged"] == "1" and r["flag_reasons"] == f"not screened: {r['error']}" and r["rank"] == ""
    assert (sites["A"]["n_scans"], sites["A"]["n_failed"]) == ("11", "1")
    x = a
    assert float(sites["A"]["median_fraction"]) == pytest.approx(np.median(x), rel=1e-5)
    assert float(sites["A"]["p95_fraction"]) == pytest.approx(np.percentile(x, 95), rel=1e-5)


def test_site_metrics_match_metrics_module(group_run):
    dv, _ = group_run
    rows = {r["bids_name"]: r for r in _read(dv.root / "group_T1w.csv")}
    sites = {r["site"]: r for r in _read(dv.root / "group_T1w_sites.csv")}
    for site in ("A", "B", "ALL_SITES"):
        names = [n for n in dv.labels if site == "ALL_SITES" or rows[n]["site"] == site]
        m = detection_metrics([dv.labels[n] for n in names],
                              [float(rows[n]["anomaly_fraction"]) for n in names])
        s = sites[site]
        assert int(s["n_labelled"]) == m.n == len(names)
        for k in ("AUROC", "AUPRC", "FPR80", "FPR90", "FNR80", "FNR90"):
            assert _f(s[k]) == pytest.approx(getattr(m, k), abs=1e-6), (site, k)
    # questionable sub-04 excluded, re-rated sub-03 counts as its latest rating (good)
    assert rows["sub-04_T1w"]["label"] == "" and rows["sub-03_T1w"]["label"] == "0"


def test_metrics_respond_to_labels(derivs):
    # a clean-looking scan rated bad lowers AUROC below 1
    labels = {"sub-02_T1w": 1, "sub-05_T1w": 1, "sub-03_T1w": 0, "sub-04_T1w": 0, "sub-07_T1w": 0}
    run_group(derivs.root, labels=labels, subject_reports=False)
    a = next(r for r in _read(derivs.root / "group_T1w_sites.csv") if r["site"] == "A")
    assert float(a["AUROC"]) < 1.0
    assert float(a["FNR80"]) == pytest.approx(0.5)  # sub-02 scores 0: never caught at FPR<=20%


def test_one_class_site_gives_nan_with_reason(derivs):
    labels = {"sub-10_T1w": 0, "sub-11_T1w": 0, "sub-05_T1w": 1, "sub-02_T1w": 0}
    run_group(derivs.root, labels=labels, subject_reports=False)
    b = next(r for r in _read(derivs.root / "group_T1w_sites.csv") if r["site"] == "B")
    assert b["AUROC"] == "n/a" and "only clean" in b["metrics_note"]


def test_flag_at_fnr_calibrated_threshold(derivs):
    run_group(derivs.root, labels=derivs.labels_tsv, flag_at_fnr=0.2, subject_reports=False)
    rows = _read(derivs.root / "group_T1w.csv")
    sites = _read(derivs.root / "group_T1w_sites.csv")
    lab = load_labels(derivs.labels_tsv)
    names = [n for n in lab if any(r["bids_name"] == n for r in rows)]
    sc = {r["bids_name"]: float(r["anomaly_fraction"]) for r in rows if r["status"] == "ok"}
    thr = threshold_at_fnr([lab[n] for n in names], [sc[n] for n in names], 0.2)
    for s in sites:
        assert "calibrated at FNR<=0.2" in s["threshold_rule"]
    assert float(sites[0]["threshold"]) == pytest.approx(thr, rel=1e-5)
    for r in rows:
        if r["status"] == "ok":
            assert (r["flagged"] == "1") == (float(r["anomaly_fraction"]) >= thr)
    html = (derivs.root / "group_T1w.html").read_text()
    assert "calibrated at FNR&lt;=0.2" in html


def test_flag_at_fnr_without_artifact_labels_falls_back(derivs):
    run_group(derivs.root, labels={"sub-02_T1w": 0}, flag_at_fnr=0.2, subject_reports=False)
    s = _read(derivs.root / "group_T1w_sites.csv")[0]
    assert s["threshold_rule"].startswith("no labelled artifact scans")
    assert "robust" in s["threshold_rule"]


def test_bad_arguments(derivs, tmp_path):
    with pytest.raises(GroupError, match="needs labels"):
        run_group(derivs.root, flag_at_fnr=0.2)
    with pytest.raises(GroupError, match="does not exist"):
        run_group(tmp_path / "nope")
    with pytest.raises(GroupError, match="participant level"):
        run_group(tmp_path)
    with pytest.raises(GroupError, match="suffix"):
        run_group(derivs.root, suffixes=["T2w"])


def test_suffix_filter_and_single_site(tmp_path, derivs):
    for p in derivs.root.rglob("*_qc.json"):
        d = json.loads(p.read_text())
        d["site"] = None
        d["metadata"] = {}
        p.write_text(json.dumps(d))
    written = run_group(derivs.root, suffixes=["FLAIR"], subject_reports=False)
    assert [p.name for p in written] == ["group_FLAIR.csv", "group_FLAIR_sites.csv", "group_FLAIR.html",
                                         "index.html"]
    sites = _read(derivs.root / "group_FLAIR_sites.csv")
    assert [s["site"] for s in sites] == ["all"]
    assert "n_labelled" not in sites[0]  # no labels: no metric columns


def _set_scanner(root, first: str, rest: str) -> None:
    """metadata.scanner = ``first`` for sub-01..04, ``rest`` for the others."""
    for p in root.rglob("*_qc.json"):
        d = json.loads(p.read_text())
        d.setdefault("metadata", {})["scanner"] = first if d["bids_name"] < "sub-05" else rest
        p.write_text(json.dumps(d))


def test_site_column_from_metadata(derivs):
    _set_scanner(derivs.root, "S1", "S2")
    run_group(derivs.root, site_column="scanner", subject_reports=False)
    assert sorted({r["site"] for r in _read(derivs.root / "group_T1w.csv")}) == ["S1", "S2"]


def test_cells_a_spreadsheet_would_run_are_quoted(derivs):
    _set_scanner(derivs.root, '=HYPERLINK("http://x","y")', "S2")
    run_group(derivs.root, site_column="scanner", subject_reports=False)
    rows = _read(derivs.root / "group_T1w.csv")
    assert sorted({r["site"] for r in rows}) == ["'=HYPERLINK(\"http://x\",\"y\")", "S2"]
    from qc_pipeline.group import _fmt

    assert _fmt(-1.5) == "-1.5" and _fmt(-2) == "-2"  # numbers keep their sign
    assert _fmt("-cmd") == "'-cmd" and _fmt("@SUM(A1)") == "'@SUM(A1)" and _fmt("sub-01") == "sub-01"


def test_tables_and_pages_are_readable_by_the_lab(derivs):
    import os
    import stat

    old = os.umask(0o022)
    try:
        written = run_group(derivs.root, labels=derivs.labels_tsv)
    finally:
        os.umask(old)
    assert any(p.suffix == ".html" for p in written) and any(p.suffix == ".csv" for p in written)
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_unreadable_qc_json_is_a_failed_row(derivs):
    p = derivs.root / "sub-15" / "anat"
    p.mkdir(parents=True)
    (p / "sub-15_T1w_qc.json").write_text('{"status": "ok", "anomaly_fr')
    run_group(derivs.root, subject_reports=False)
    row = next(r for r in _read(derivs.root / "group_T1w.csv") if r["bids_name"] == "sub-15_T1w")
    assert row["status"] == "error" and "unreadable qc.json" in row["error"]


def test_group_needs_no_raw_data(derivs):
    import shutil

    shutil.rmtree(derivs.bids)
    written = run_group(derivs.root, labels=derivs.labels_tsv)
    assert (derivs.root / "group_T1w.csv").is_file() and len(written) == 6 + 1 + 14  # tables, pages, overview, subjects
    html = (derivs.root / "sub-05.html").read_text()
    assert "source scan not available" in html and html.count("data:image/png;base64,") == 4  # mosaic, without overlay, error map, tau


# --------------------------------------------------------------------------- labels files
@pytest.mark.parametrize("header, rows, expect", [
    ("bids_name\tlabel", ["sub-01_T1w\t1", "sub-02_T1w\t0"], {"sub-01_T1w": 1, "sub-02_T1w": 0}),
    ("participant\tbids_name\tqc", ["x\tsub-01_T1w.nii.gz\tbad", "y\t/data/sub-02_T1w.nii\tgood"],
     {"sub-01_T1w": 1, "sub-02_T1w": 0}),
    ("bids_name,rating", ["sub-01_T1w,Questionable", "sub-02_T1w,PASS", "sub-03_T1w,"],
     {"sub-02_T1w": 0}),
    ("bids_name\tartifact", ["sub-01_T1w_qc.json\ttrue", "sub-02_T1w\tfalse"],
     {"sub-01_T1w": 1, "sub-02_T1w": 0}),
])
def test_label_file_variants(tmp_path, header, rows, expect):
    p = tmp_path / "labels.tsv"
    p.write_text("\n".join([header] + rows) + "\n")
    assert load_labels(p) == expect


def test_questionable_policy(tmp_path):
    p = tmp_path / "r.tsv"
    p.write_text("bids_name\trating\nsub-01_T1w\tquestionable\n")
    assert load_labels(p) == {}
    assert load_labels(p, questionable="bad") == {"sub-01_T1w": 1}
    assert load_labels(p, questionable="good") == {"sub-01_T1w": 0}


def test_latest_timestamp_wins(tmp_path):
    p = tmp_path / "r.tsv"
    p.write_text("bids_name\trating\ttimestamp\n"
                 "sub-01_T1w\tgood\t2024-02-01T00:00:00Z\n"
                 "sub-01_T1w\tbad\t2024-01-01T00:00:00Z\n")
    assert load_labels(p) == {"sub-01_T1w": 0}


def test_conflicting_duplicate_ratings_are_warned_about(tmp_path, caplog):
    p = tmp_path / "r.tsv"
    p.write_text("bids_name\trating\nsub-01_T1w\tgood\nsub-02_T1w\tbad\nsub-02_T1w\tbad\nsub-01_T1w\tbad\n")
    assert load_labels(p) == {"sub-01_T1w": 1, "sub-02_T1w": 1}
    assert "rates 1 scans more than once with different ratings (e.g. sub-01_T1w)" in caplog.text
    assert "last rating" in caplog.text


def test_binary_ratings_file_is_a_labels_error(tmp_path):
    p = tmp_path / "r.tsv"
    p.write_bytes(b"\xff\xfe\x00\x81binary\x00\x9c")
    with pytest.raises(LabelsError, match=str(p)):
        load_labels(p)


@pytest.mark.parametrize("text, match", [
    ("name\tlabel\nsub-01_T1w\t1\n", "no 'bids_name' column"),
    ("bids_name\tscore\nsub-01_T1w\t1\n", "no rating column"),
    ("bids_name\tlabel\nsub-01_T1w\tmaybe-ish\n", "row 2"),
    ("", "empty"),
])
def test_bad_label_files(tmp_path, text, match):
    p = tmp_path / "bad.tsv"
    p.write_text(text)
    with pytest.raises(LabelsError, match=match):
        load_labels(p)


def test_load_records_reads_sessions_and_plain_layout(derivs):
    recs = load_qc_records(derivs.root)
    assert len(recs) == len(derivs.scans)
    assert {r.bids_name for r in recs} == {s.bids_name for s in derivs.scans}
    assert len(load_qc_records(derivs.root, subject="sub-01")) == 4


def test_robust_threshold_when_mad_is_zero():
    from qc_pipeline.group import _robust_threshold

    x = np.array([0.0] * 9 + [0.05])
    thr, med, scale = _robust_threshold(x, 3.0)
    assert med == 0.0
    assert scale == pytest.approx(1.2533 * 0.005)       # mean |x - median| fallback
    assert thr == pytest.approx(3 * 1.2533 * 0.005)
    assert 0.05 > thr > 0.0
    thr, _, _ = _robust_threshold(np.zeros(10), 3.0)
    assert thr == 0.0                                     # then: anything above the median


def test_background_flag_is_separate_and_robust_per_site(derivs):
    """background_artifact_fraction gets its own per-site robust flag (with a floor); the
    anomaly flag is unchanged; unavailable statistics are explained, never flagged."""
    from qc_pipeline.group import DEFAULT_BACKGROUND_K, DEFAULT_BACKGROUND_MIN_FRACTION

    run_group(derivs.root, subject_reports=False)
    before_rows = _read(derivs.root / "group_T1w.csv")
    before = {r["bids_name"]: r["score_flagged"] for r in before_rows}
    assert all(r["flagged"] == r["score_flagged"] for r in before_rows if r["status"] == "ok")  # no other flag yet
    rng = np.random.default_rng(0)
    ok_t1 = [s for s in derivs.scans if s.suffix == "T1w" and s.kind != "failed"]
    clean_a = [s for s in ok_t1 if s.site == "A" and s.kind == "clean"]
    ghost, unavailable = clean_a[0].bids_name, clean_a[1].bids_name
    values = {}
    for s in ok_t1:
        d = json.loads(s.qc_path.read_text())
        if s.bids_name == unavailable:
            d["background_artifact_fraction"] = None
            d["background"] = {"available": False, "reason": "the head fills the field of view"}
        else:
            v = 0.12 if s.bids_name == ghost else float(rng.uniform(0.002, 0.004))
            values[s.bids_name] = v
            d["background_artifact_fraction"] = v
            d["background"] = {"available": True, "background_artifact_fraction": v, "ghost_ratio": 0.001,
                               "snr": 20.0}
        s.qc_path.write_text(json.dumps(d))
    run_group(derivs.root, subject_reports=False)
    rows = {r["bids_name"]: r for r in _read(derivs.root / "group_T1w.csv")}
    sites = {r["site"]: r for r in _read(derivs.root / "group_T1w_sites.csv")}
    # the score's flag did not move; the verdict took the background flag in
    assert {n: r["score_flagged"] for n, r in rows.items()} == before
    for n, r in rows.items():
        want = "1" if before[n] == "1" or n == ghost or r["status"] != "ok" else "0"
        assert r["flagged"] == want, n
    # site A: median + 3 x scaled MAD of its scans with the statistic (floor not binding)
    a = np.array([v for n, v in values.items() if rows[n]["site"] == "A"])
    med = np.median(a)
    thr = max(med + DEFAULT_BACKGROUND_K * 1.4826 * np.median(np.abs(a - med)), DEFAULT_BACKGROUND_MIN_FRACTION)
    assert float(sites["A"]["background_threshold"]) == pytest.approx(thr, rel=1e-5)
    assert "max(median + 4 x scaled MAD" in sites["A"]["background_rule"]
    assert "pooled" in sites["B"]["background_rule"]  # 4 scans < 8
    flagged = {n for n, r in rows.items() if r["background_flagged"] == "1"}
    assert flagged == {ghost}
    assert sites["A"]["n_background_flagged"] == "1"
    assert "background artifact" in rows[ghost]["flag_reasons"]
    assert float(rows[ghost]["background_artifact_fraction"]) == pytest.approx(0.12)
    # unavailable: no number, the reason shown, not flagged
    assert rows[unavailable]["background_artifact_fraction"] == ""
    assert rows[unavailable]["background_flagged"] == "0"
    assert "fills the field of view" in rows[unavailable]["background_note"]
    html = (derivs.root / "group_T1w.html").read_text()
    assert "Background flag rule" in html and "fills the field of view" in html
    assert 'data-bgflagged="1"' in html


def test_background_floor_keeps_zero_sites_quiet(derivs):
    """Most clean scans score exactly 0: a tiny non-zero value is not flagged (floor)."""
    ok_t1 = [s for s in derivs.scans if s.suffix == "T1w" and s.kind != "failed"]
    for i, s in enumerate(ok_t1):
        d = json.loads(s.qc_path.read_text())
        d["background_artifact_fraction"] = 0.0005 if i == 0 else (0.01 if i == 1 else 0.0)
        s.qc_path.write_text(json.dumps(d))
    run_group(derivs.root, subject_reports=False)
    rows = {r["bids_name"]: r for r in _read(derivs.root / "group_T1w.csv")}
    assert rows[ok_t1[0].bids_name]["background_flagged"] == "0"
    assert rows[ok_t1[1].bids_name]["background_flagged"] == "1"
    with pytest.raises(GroupError, match="background_min_fraction"):
        run_group(derivs.root, background_min_fraction=1.5)


def _records(scores, site="A"):
    """In-memory ok records of one site ranked by ``anomaly_fraction`` (no qc_score)."""
    from pathlib import Path

    from qc_pipeline.derivatives import QCRecord

    return [QCRecord(path=Path(f"sub-{i:02d}_T1w_qc.json"), data={"anomaly_fraction": s},
                     bids_name=f"sub-{i:02d}_T1w", entities={"subject": f"{i:02d}", "suffix": "T1w"},
                     site=site, status="ok") for i, s in enumerate(scores, start=1)]


def test_tied_scores_share_the_minimum_rank_and_nan_scores_are_not_ranked():
    from qc_pipeline.group import compute_suffix_tables

    recs = _records([0.2, 0.5, math.nan, 0.2, 0.1, 0.2])
    recs[2].data["anomaly_fraction"] = math.nan          # status ok, but no score
    broken = _records([0.9])[0]
    broken.bids_name, broken.status, broken.error = "sub-99_T1w", "error", "CorruptImage: truncated"
    rows, _, _ = compute_suffix_tables(recs + [broken], labels=None, flag_at_fnr=None,
                                       mad_k=DEFAULT_MAD_K, min_site_size=8)
    rank = {r["bids_name"]: r["rank"] for r in rows}
    # 0.5 first; the three 0.2 share rank 2 (the smallest of 2, 3, 4); 0.1 is 5th, not 3rd
    assert rank == {"sub-02_T1w": 1, "sub-01_T1w": 2, "sub-04_T1w": 2, "sub-06_T1w": 2,
                    "sub-05_T1w": 5, "sub-03_T1w": None, "sub-99_T1w": None}
    assert all(type(r["rank"]) is int for r in rows if r["rank"] is not None)
    # unranked scans come last, after every ranked one
    assert [r["rank"] is None for r in rows] == [False] * 5 + [True] * 2


def test_robust_threshold_is_median_plus_k_normal_scaled_mad():
    from scipy.stats import norm

    from qc_pipeline.group import _robust_threshold, compute_suffix_tables

    # median 3, |x - 3| = 2 1 0 1 97 -> MAD 1; normal-scaled MAD = 1 / Phi^-1(3/4) = 1.4826
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    thr, med, scale = _robust_threshold(x, 3.0)
    assert med == 3.0
    assert scale == pytest.approx(1.0 / norm.ppf(0.75), rel=1e-12)
    assert thr == pytest.approx(3.0 + 3.0 / norm.ppf(0.75), rel=1e-12)
    # the same rule in the site table: 8 scans (>= min_site_size), median 0.3, MAD 0.1
    scores = [0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 5.0]
    _, site_rows, _ = compute_suffix_tables(_records(scores), labels=None, flag_at_fnr=None,
                                            mad_k=2.5, min_site_size=8)
    site = next(r for r in site_rows if r["site"] == "A")
    assert site["threshold"] == pytest.approx(0.3 + 2.5 * 0.1 / norm.ppf(0.75), rel=1e-9)
    assert "robust per site" in site["threshold_rule"] and site["n_flagged"] == 1
