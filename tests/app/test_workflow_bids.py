"""Workflow graph (no model needed) and the BIDS walk."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app_testlib import make_dataset

from qc_pipeline.bids import (NoScansFound, ScanRecord, UnknownLabel, anat_ignore_patterns,
                              collect_scans, load_filter_file, InvalidFilter)
from qc_pipeline.config import Settings


def _scan(sub, name, ses=None):
    rel = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + f"anat/{name}.nii.gz"
    ents = {"subject": sub, "suffix": name.split("_")[-1]}
    if ses:
        ents["session"] = ses
    return ScanRecord(path=f"/data/{rel}", relpath=rel, bids_name=name, entities=ents, site="A")


def test_workflow_graph(tmp_path):
    from qc_pipeline.workflows import init_itermask_qc_wf

    scans = [_scan("01", "sub-01_ses-a_T1w", "a"), _scan("01", "sub-01_ses-b_T1w", "b"),
             _scan("02", "sub-02_FLAIR")]
    settings = Settings(bids_dir=Path("/data"), output_dir=tmp_path / "out",
                        analysis_level="participant", work_dir=tmp_path / "work",
                        model_specs={"T1w": {"model_dir": "/m/t1", "model_id": "t1-x",
                                             "grid": [32, 32, 32], "voxel_size": [6, 6, 6]}})
    wf = init_itermask_qc_wf(scans=scans, settings=settings)
    assert wf.name == "itermask_qc_wf"
    names = set(wf.list_node_names())
    for scan in ("scan_sub_01_ses_a_T1w", "scan_sub_01_ses_b_T1w", "scan_sub_02_FLAIR"):
        for node in ("inputnode", "load", "preprocess", "itermask", "timings",
                     "write_derivatives", "outputnode"):
            assert f"{scan}.{node}" in names
    assert {"report_sub_01", "report_sub_02", "qc_sub_01", "qc_sub_02"} <= names
    assert len(names) == 3 * 7 + 4

    flat = wf._create_flat_graph()  # noqa: SLF001
    edges = {(u.fullname.split(".", 1)[1], v.fullname.split(".", 1)[1]): d["connect"]
             for u, v, d in flat.edges(data=True)}
    s = "scan_sub_01_ses_a_T1w"
    assert ("error", "in_error") in edges[(f"{s}.load", f"{s}.preprocess")]
    assert ("out_file", "in_file") in edges[(f"{s}.preprocess", f"{s}.itermask")]
    assert ("error", "in_error") in edges[(f"{s}.itermask", f"{s}.write_derivatives")]
    assert ("input_sha256", "input_sha256") in edges[(f"{s}.load", f"{s}.write_derivatives")]
    # both of sub-01's scans feed sub-01's report; sub-02's only sub-02's
    assert ("qc_json", "qc_json") in edges[(f"{s}.write_derivatives", f"{s}.outputnode")]
    feeds = {u.split(".")[0] for (u, v) in edges if v == "qc_sub_01"}
    assert feeds == {s, "scan_sub_01_ses_b_T1w"}
    assert {u.split(".")[0] for (u, v) in edges if v == "qc_sub_02"} == {"scan_sub_02_FLAIR"}
    assert ("qc_sub_01", "report_sub_01") in edges

    node = wf.get_node(f"{s}.itermask")
    assert node.inputs.model_dir == "/m/t1" and node.inputs.contrast == "T1w"
    prep = wf.get_node(f"{s}.preprocess")
    assert prep.inputs.grid == [32, 32, 32] and prep.inputs.voxel_size == [6.0, 6.0, 6.0]
    # FLAIR has no spec here: packaged model and default geometry
    assert wf.get_node("scan_sub_02_FLAIR.itermask").inputs.model_dir == ""
    assert wf.get_node("scan_sub_02_FLAIR.preprocess").inputs.grid == [80, 96, 80]


def test_ignore_patterns_keep_only_anat_images():
    pats = anat_ignore_patterns(["T1w", "FLAIR"])

    def ignored(p):
        return any(r.search(p) for r in pats)

    for keep in ("/sub-01", "/sub-01/anat", "/sub-01/ses-a", "/sub-01/ses-a/anat",
                 "/sub-01/anat/sub-01_T1w.nii.gz", "/sub-01/ses-a/anat/sub-01_ses-a_acq-x_FLAIR.nii"):
        assert not ignored(keep), keep
    for drop in ("/derivatives", "/code", "/sourcedata", "/.git", "/participants.tsv",
                 "/sub-01/func", "/sub-01/ses-a/dwi", "/sub-01/anat/sub-01_T1w.json",
                 "/sub-01/anat/sub-01_T2w.nii.gz", "/sub-01/sub-01_sessions.tsv",
                 "/sub-01/anat/sub-01_T1w.nii.gz.bak"):
        assert ignored(drop), drop


def test_collect_scans_entities_sites_filters(tmp_path):
    ds = make_dataset(tmp_path / "bids")
    root = ds["root"]
    scans = collect_scans(root, suffixes=["T1w", "FLAIR"], database_path=tmp_path / "db")
    rels = [s.relpath for s in scans]
    assert rels == sorted(ds["t1w"] + ["sub-02/anat/sub-02_FLAIR.nii.gz"])
    by = {s.bids_name: s for s in scans}
    assert by["sub-01_ses-post_acq-mprage_T1w"].site == "siteC"
    assert by["sub-01_ses-pre_run-1_T1w"].site == "siteA"
    assert by["sub-02_acq-fast_rec-norm_run-01_T1w"].entities["run"] == "01"
    # labels with or without prefixes; sessions
    only = collect_scans(root, suffixes=["T1w"], participant_label=["sub-01"],
                         session_label=["post"], database_path=tmp_path / "db")
    assert [s.bids_name for s in only] == ["sub-01_ses-post_acq-mprage_T1w"]
    with pytest.raises(UnknownLabel, match="found 01, 02"):
        collect_scans(root, suffixes=["T1w"], participant_label=["07"])
    # filter file: null = entity absent
    filt = tmp_path / "f.json"
    filt.write_text(json.dumps({"T1W": {"acquisition": None}}))
    got = collect_scans(root, suffixes=["T1w"], bids_filters=load_filter_file(filt),
                        database_path=tmp_path / "db")
    assert [s.bids_name for s in got] == ["sub-01_ses-pre_run-1_T1w", "sub-01_ses-pre_run-2_T1w"]
    with pytest.raises(NoScansFound):
        collect_scans(root, suffixes=["T2w"], database_path=tmp_path / "db")
    filt.write_text(json.dumps({"t1w": {"not_an_entity": "x"}}))
    with pytest.raises(InvalidFilter):
        collect_scans(root, suffixes=["T1w"], bids_filters=load_filter_file(filt),
                      database_path=tmp_path / "db")


@pytest.mark.parametrize("content, match", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b"\xff\xfe\x00binary", "not valid JSON"),
    ("[1, 2]", "expected a JSON object keyed by suffix"),
])
def test_hostile_filter_files_are_one_clear_error(tmp_path, content, match):
    filt = tmp_path / "f.json"
    filt.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InvalidFilter, match=match) as err:
        load_filter_file(filt)
    assert str(filt) in str(err.value) and "\n" not in str(err.value)


def test_folder_named_like_a_scan_is_a_scan_record(tmp_path, caplog):
    from app_testlib import save_scan

    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    save_scan(root, "sub-01/anat/sub-01_T1w.nii.gz")
    (root / "sub-02" / "anat" / "sub-02_acq-x_run-2_T1w.nii.gz").mkdir(parents=True)
    got = collect_scans(root, suffixes=["T1w"], database_path=tmp_path / "db")
    # a record (the participant level turns it into an error row), entities from its name
    assert [s.bids_name for s in got] == ["sub-01_T1w", "sub-02_acq-x_run-2_T1w"]
    assert got[1].entities["acquisition"] == "x" and got[1].entities["run"] == "2"
    assert got[1].subject == "02"
    # filters apply to it as to files
    assert len(collect_scans(root, suffixes=["T1w"], database_path=tmp_path / "db",
                             bids_filters={"T1w": {"run": None}})) == 1
    assert len(collect_scans(root, suffixes=["T1w"], database_path=tmp_path / "db",
                             participant_label=["01"])) == 1


def test_odd_subject_labels_keep_their_folder_label(tmp_path, caplog):
    from app_testlib import save_scan

    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    (root / "participants.tsv").write_text("participant_id\tsite\nsub-01_x\tA\nsub-ü\tB\n")
    labels = ["01", "01_x", "ü", "#1", '">x']
    for lab in labels:
        save_scan(root, f"sub-{lab}/anat/sub-{lab}_T1w.nii.gz")
    save_scan(root, "sub-01/anat/sub-01_T1w.nii")  # same name as the .nii.gz beside it
    got = collect_scans(root, suffixes=["T1w"], database_path=tmp_path / "db")
    assert sorted(s.subject for s in got) == sorted(labels)
    by = {s.subject: s for s in got}
    assert by["01_x"].site == "A" and by["ü"].site == "B" and by["01"].site is None
    assert by["01"].relpath.endswith(".nii.gz")
    assert "sub-01/anat/sub-01_T1w.nii: not screened" in caplog.text
    assert "'#1' is not a BIDS label" in caplog.text


def test_index_database_is_reused_and_refreshed(tmp_path):
    from qc_pipeline.bids import build_layout
    from app_testlib import save_scan

    ds = make_dataset(tmp_path / "bids")
    db = tmp_path / "db"
    lay = build_layout(ds["root"], ["T1w"], db)
    n = len(lay.get(suffix="T1w", extension=".nii.gz"))
    mtime = (db / "layout_index.sqlite").stat().st_mtime_ns
    build_layout(ds["root"], ["T1w"], db)
    assert (db / "layout_index.sqlite").stat().st_mtime_ns == mtime  # reused
    save_scan(ds["root"], "sub-02/anat/sub-02_run-02_T1w.nii.gz", seed=3)
    lay = build_layout(ds["root"], ["T1w"], db)  # anat folder changed: re-indexed
    assert len(lay.get(suffix="T1w", extension=".nii.gz")) == n + 1


def test_participant_label_indexes_only_that_subject(tmp_path):
    """A job-array task for one subject must not walk the other subjects' folders."""
    from qc_pipeline.bids import build_layout

    ds = make_dataset(tmp_path / "bids")
    db = tmp_path / "db"
    everyone = build_layout(ds["root"], ["T1w"], db)
    assert {f.entities["subject"] for f in everyone.get(suffix="T1w")} == {"01", "02"}
    one = build_layout(ds["root"], ["T1w"], db, subjects=["02"])  # selection changed: re-indexed
    files = one.get(suffix="T1w", return_type="filename")
    assert files and all("/sub-02/" in f for f in files)
    assert not one.get(subject="01")


def test_nipype_layers_switch_telemetry_off_when_imported_as_a_library():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NIPYPE_NO_ET"}
    code = ("import os, qc_pipeline; assert 'NIPYPE_NO_ET' not in os.environ; "
            "import qc_pipeline.workflows.base; print(os.environ.get('NIPYPE_NO_ET'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_node_names_of_odd_bids_names_never_collide():
    from qc_pipeline.bids import ScanRecord
    from qc_pipeline.workflows.base import scan_node_name, subject_node_name

    def rec(rel):
        name = rel.rsplit("/", 1)[1].replace(".nii.gz", "")
        return ScanRecord(path="/b/" + rel, relpath=rel, bids_name=name, entities={})

    rels = ["sub-01/anat/sub-01_acq-a b_T1w.nii.gz", "sub-01/anat/sub-01_acq-a#b_T1w.nii.gz",
            "sub-01/anat/sub-01_acq-a?b_T1w.nii.gz", "sub-ü/anat/sub-ü_T1w.nii.gz",
            "sub-u/anat/sub-u_T1w.nii.gz", "sub-01_x/anat/sub-01_x_T1w.nii.gz",
            "sub-01-x/anat/sub-01-x_T1w.nii.gz", "sub-01/anat/sub-01_acq-x_T1w.nii.gz",
            "sub-01/ses-x/anat/sub-01_acq-x_T1w.nii.gz", "sub-01/anat/sub-01_acq_x_T1w.nii.gz"]
    got = [scan_node_name(rec(r)) for r in rels]
    assert len(set(got)) == len(rels)
    assert all(g.replace("_", "").isalnum() and g.isascii() for g in got)
    # BIDS names in their own folders map as before (the work dir's cache stays valid)
    assert scan_node_name(rec("sub-01/ses-pre/anat/sub-01_ses-pre_run-1_T1w.nii.gz")) \
        == "scan_sub_01_ses_pre_run_1_T1w"
    labels = ["01", "01_x", "01-x", "ü", "u", "#1", '">x']
    subs = [subject_node_name("report_sub", s) for s in labels]
    assert len(set(subs)) == len(labels) and subs[0] == "report_sub_01"
