"""The BIDS-App end to end: the real CLI, in process, on a small realistic BIDS tree.

One participant-level run (module fixture ``run``) over a dataset with sessions, acq-
variants, runs, sidecars, func/ beside anat/, eight kinds of bad input and the same head
stored RAS / LPS / oblique; the tests check its outputs. Resume (skip + kill -9), group
level and MultiProc have their own runs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_testlib import BAD_KINDS, base_args, make_dataset, qc_of

from qc_pipeline.cli.app import main
from qc_pipeline.derivatives import QC_FIELDS
from qc_pipeline.qc.score import FEATURES

GOOD = [
    "sub-01/ses-pre/anat/sub-01_ses-pre_run-1_T1w.nii.gz",
    "sub-01/ses-pre/anat/sub-01_ses-pre_run-2_T1w.nii.gz",
    "sub-01/ses-post/anat/sub-01_ses-post_acq-mprage_T1w.nii.gz",
    "sub-02/anat/sub-02_acq-fast_rec-norm_run-01_T1w.nii.gz",
    "sub-03/anat/sub-03_acq-ras_T1w.nii.gz",
    "sub-03/anat/sub-03_acq-lps_T1w.nii.gz",
    "sub-03/anat/sub-03_acq-obl_T1w.nii.gz",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("app")
    ds = make_dataset(tmp / "bids", bad=BAD_KINDS, orientations=True)
    out, work = tmp / "out", tmp / "work"
    rc = main(base_args(ds["root"], out, work, model_dir))
    return {"rc": rc, "root": ds["root"], "out": out, "work": work, "tmp": tmp, "rels": ds["t1w"]}


def test_exit_code_and_summary_name_failed_scans(run, caplog):
    assert run["rc"] == 1  # bad inputs failed, the rest finished
    log = next((run["out"] / "logs").glob("itermask-qc-*.log")).read_text()
    summary = [ln for ln in log.splitlines() if "scans failed:" in ln]
    assert len(summary) == 1
    for kind in BAD_KINDS:
        assert f"sub-02_acq-{kind}_T1w" in summary[0]
    assert "sub-01_ses-pre_run-1_T1w" not in summary[0]
    # per-scan progress lines
    assert sum("] sub-" in ln and (": ok," in ln or ": error:" in ln) for ln in log.splitlines()) \
        == len(GOOD) + len(BAD_KINDS)


def test_good_scans_have_all_outputs_in_native_space(run):
    out, root = run["out"], run["root"]
    for rel in GOOD:
        qc = qc_of(out, rel)
        assert qc["status"] == "ok", (rel, qc["error"])
        assert list(qc) == list(QC_FIELDS)
        # the template fit reaches the qc.json (the group level's site reference and the engine's
        # normal-error step both need it); the wiring model has no map, and says so
        assert np.asarray(qc["template_fit"]["affine"]).shape == (4, 4), rel
        assert qc["normal_error"] == {"applied": False, "reason": "the model has no normal-error map"}
        stem = Path(rel).name.replace(".nii.gz", "")
        folder = out / Path(rel).parent
        mask = nib.load(folder / f"{stem}_desc-anomaly_mask.nii.gz")
        err = nib.load(folder / f"{stem}_desc-error_map.nii.gz")
        src = nib.load(root / rel)
        assert mask.shape == src.shape and err.shape == src.shape
        np.testing.assert_allclose(mask.affine, src.affine, atol=1e-5)
        np.testing.assert_allclose(err.affine, src.affine, atol=1e-5)
        m = np.asarray(mask.dataobj)
        assert set(np.unique(m)) <= {0, 1}
        assert int(m.sum()) > 0  # the random model flags something
        # the mask lies inside the head, not in the background
        assert np.asarray(src.dataobj)[m > 0].mean() > 0
        assert qc["mask_file"] == mask.get_filename().split("/")[-1]
        assert qc["anomaly_voxels"] > 0 and 0 < qc["anomaly_fraction"] <= 1
        assert qc["anomaly_mm3"] == pytest.approx(qc["anomaly_voxels"] * 4.0 ** 3)
        # the combined QC score: every measurement taken on a real-looking head, the score
        # is the largest z against the card's reference and names its driver
        assert set(qc["quality_features"]) == set(FEATURES) == set(qc["quality_z"])
        assert all(qc["quality_features"][k] is not None for k in
                   ("anomaly_fraction", "recon_error", "signal_deficit", "sharpness", "noise"))
        assert qc["quality_features"]["anomaly_fraction"] == pytest.approx(qc["anomaly_fraction"], rel=1e-5)
        zs = {k: v for k, v in qc["quality_z"].items() if v is not None}
        assert qc["qc_score"] == pytest.approx(max(zs.values()), abs=1e-5)
        assert qc["qc_score_driver"] == max(zs, key=zs.get)
        assert [c["measure"] for c in qc["qc_score_contributors"]] == \
            sorted((k for k, v in zs.items() if v >= 3.0), key=lambda k: -zs[k])
        # the mask's regions, largest first, add up to no more than the mask, centred in the head
        regions = qc["anomaly_regions"]
        assert qc["anomaly_region_count"] >= len(regions) >= 1
        assert [r["voxels"] for r in regions] == sorted((r["voxels"] for r in regions), reverse=True)
        assert sum(r["voxels"] for r in regions) <= qc["anomaly_voxels"]
        assert regions[0]["hemisphere"] in ("left", "right", "midline") and len(regions[0]["centre_mni_mm"]) == 3
        centre_vox = np.linalg.inv(src.affine) @ np.r_[regions[0]["centre_scanner_mm"], 1.0]
        assert all(-1 <= c <= n for c, n in zip(centre_vox[:3], src.shape)), (rel, centre_vox)
        assert qc["tau_curve"] and qc["fit"]["path"] in ("tan", "fallback")
        assert qc["forward_passes"] >= 1 and qc["runtime_s"] > 0
        assert qc["model_id"] == "t1w-random-seed0" and qc["schedule"] == "auto"
        assert len(qc["input_sha256"]) == 64 and qc["device"] == "cpu"
        assert qc["source_file"] == rel and qc["bids_name"] == stem
        # the out-of-head background statistic: a number in [0, 1] or a reason
        bg = qc["background"]
        assert isinstance(bg, dict) and isinstance(bg["available"], bool)
        if bg["available"]:
            assert 0.0 <= qc["background_artifact_fraction"] <= 1.0 and bg["noise_sigma"] > 0
        else:
            assert qc["background_artifact_fraction"] is None and bg["reason"]
        # the native image's spectral peak: measured on every readable 3D scan
        sp = qc["spectrum"]
        assert sp["available"] and len(sp["peak_cycles_per_mm"]) == 3
        assert qc["quality_features"]["spectral_peak"] == pytest.approx(sp["spectral_peak"], abs=1e-4)


def test_entities_sites_and_metadata(run):
    qc = qc_of(run["out"], GOOD[3])
    ents = qc["entities"]
    assert ents["subject"] == "02" and ents["acquisition"] == "fast"
    assert ents["reconstruction"] == "norm" and ents["run"] == "01" and ents["suffix"] == "T1w"
    assert qc["site"] == "siteB" and qc["metadata"]["age"] == "45"
    # sessions.tsv overrides participants.tsv
    assert qc_of(run["out"], GOOD[2])["site"] == "siteC"
    assert qc_of(run["out"], GOOD[0])["site"] == "siteA"
    assert qc_of(run["out"], GOOD[0])["entities"]["session"] == "pre"


def test_only_anat_of_screened_suffix(run):
    out = run["out"]
    names = {p.name for p in out.rglob("*_qc.json")}
    assert len(names) == len(GOOD) + len(BAD_KINDS)
    assert not any("bold" in n or "FLAIR" in n or "desc-preproc" in n for n in names)
    assert not (out / "derivatives").exists()


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_gets_error_record(run, kind):
    rel = f"sub-02/anat/sub-02_acq-{kind}_T1w.nii.gz"
    qc = qc_of(run["out"], rel)
    assert qc["status"] == "error"
    assert isinstance(qc["error"], str) and "\n" not in qc["error"] and len(qc["error"]) > 10
    assert qc["anomaly_fraction"] is None and qc["mask_file"] is None
    assert list(qc) == list(QC_FIELDS)
    assert not (run["out"] / f"sub-02/anat/sub-02_acq-{kind}_T1w_desc-anomaly_mask.nii.gz").exists()
    expected = {"empty": "empty", "truncated": "gzip", "4d": "4D", "2d": "2D", "nan": "NaN",
                "zero": "zero", "voxel": "voxel size", "nobrain": "no brain"}[kind]
    assert expected.lower() in qc["error"].lower()


def test_orientation_copies_score_alike(run):
    ras, lps, obl = (qc_of(run["out"], r) for r in GOOD[4:7])
    # LPS is the same world image: identical scores
    assert lps["anomaly_voxels"] == ras["anomaly_voxels"]
    assert lps["anomaly_fraction"] == pytest.approx(ras["anomaly_fraction"], abs=1e-9)
    # the background statistic works on the RAS-permuted native array: identical too
    assert lps["background"] == ras["background"]
    # oblique went through one more interpolation: close
    assert obl["anomaly_fraction"] == pytest.approx(ras["anomaly_fraction"], abs=0.05)
    # and the native-space LPS mask is the RAS mask, flipped back (up to boundary ties)
    m_ras = np.asarray(nib.load(run["out"] / "sub-03/anat/sub-03_acq-ras_T1w_desc-anomaly_mask.nii.gz").dataobj)
    m_lps = np.asarray(nib.load(run["out"] / "sub-03/anat/sub-03_acq-lps_T1w_desc-anomaly_mask.nii.gz").dataobj)
    flipped = m_lps[::-1, ::-1, :] > 0
    dice = 2 * np.sum(flipped & (m_ras > 0)) / (np.sum(flipped) + np.sum(m_ras > 0))
    assert dice > 0.95  # nearest-neighbour ties at half-voxel positions may differ


def test_dataset_description_logs_config_and_reports(run):
    out = run["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "itermask-qc" and gen["Version"] and gen["ModelIds"] == ["t1w-random-seed0"]
    cfgs = list((out / "logs").glob("config-*.json"))
    assert len(cfgs) == 1
    cfg = json.loads(cfgs[0].read_text())
    assert cfg["skull_strip"] == "none" and cfg["suffixes"] == ["T1w"] and cfg["plugin"] == "Linear"
    assert cfg["model_specs"]["T1w"]["grid"] == [40, 48, 40]
    for sub in ("01", "02", "03"):
        html = (out / f"sub-{sub}.html").read_text()
        assert f"sub-{sub}" in html
    assert "sub-02_acq-empty_T1w" in (out / "sub-02.html").read_text()
    # the subject page shows the QC score, its driver and every measurement
    qc = qc_of(out, GOOD[0])
    html = (out / "sub-01.html").read_text()
    assert f"driven by <code>{qc['qc_score_driver']}</code>" in html and "signal_deficit" in html


def test_rerun_skips_finished_scans(run, model_dir):
    out = run["out"]
    qc_path = out / "sub-01/ses-pre/anat/sub-01_ses-pre_run-1_T1w_qc.json"
    before = qc_path.stat().st_mtime_ns
    rc = main(base_args(run["root"], out, run["work"], model_dir, "--participant-label", "sub-01"))
    assert rc == 0
    assert qc_path.stat().st_mtime_ns == before
    logs = sorted((out / "logs").glob("itermask-qc-*.log"))
    assert "3 of 3 scans already have results" in logs[-1].read_text()
    # a different schedule is a different result: not skipped (checked without running it)
    from qc_pipeline.bids import collect_scans
    from qc_pipeline.derivatives import is_done
    from qc_pipeline.io import sha256_file

    scan = collect_scans(run["root"], suffixes=["T1w"], participant_label=["01"])[0]
    sha = sha256_file(scan.path)
    assert is_done(out, scan, input_sha256=sha, model_id="t1w-random-seed0", schedule="auto")
    assert not is_done(out, scan, input_sha256=sha, model_id="t1w-random-seed0", schedule="reference")
    assert not is_done(out, scan, input_sha256="0" * 64, model_id="t1w-random-seed0", schedule="auto")


def test_a_model_rewritten_in_place_is_screened_again(run, model_dir, tmp_path):
    """Same model id, new weights: neither the resume check nor Nipype's cache in the same -w
    serves the old result."""
    import torch

    from qc_pipeline.engine.modelio import model_content_key

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out, work = tmp_path / "out", tmp_path / "work"
    args = base_args(run["root"], out, work, model, "--participant-label", "02")
    rel = GOOD[3]  # sub-02's one good scan; its bad ones fail (rc 1) as in every run
    assert main(args) == 1
    first = qc_of(out, rel)
    assert first["status"] == "ok" and first["model_key"] == model_content_key(model)
    stem = Path(rel).name.replace(".nii.gz", "")
    err_file = out / Path(rel).parent / f"{stem}_desc-error_map.nii.gz"
    err0 = nib.load(err_file).get_fdata()
    sd = torch.load(model / "weights.pt", weights_only=True)
    torch.save({k: (v * 1.5 if v.is_floating_point() else v) for k, v in sd.items()}, model / "weights.pt")
    assert main(args) == 1
    second = qc_of(out, rel)
    assert second["status"] == "ok" and second["model_id"] == first["model_id"]
    assert second["model_key"] == model_content_key(model) != first["model_key"]
    logs = sorted((out / "logs").glob("itermask-qc-*.log"))
    assert "already have results" not in logs[-1].read_text()
    assert not np.allclose(nib.load(err_file).get_fdata(), err0)


#: what a scan's record says about the scan itself (not where it lay or how long it took)
SCAN_FIELDS = ("status", "bids_name", "qc_score", "qc_score_driver", "qc_score_contributors", "anomaly_voxels",
               "anomaly_fraction", "anomaly_region_count", "anomaly_regions",
               "raw_anomaly_voxels", "candidate_anomaly_voxels", "normal_error", "quality_features",
               "quality_z", "qc_score_reference", "tau_stop", "fit", "forward_passes", "mean_error",
               "background_artifact_fraction", "background", "spectrum", "template_fit", "model_id",
               "model_key", "schedule", "input_sha256", "package_version", "warnings")


def test_the_library_call_gives_the_apps_answer(run, model_dir, tmp_path):
    """qc_pipeline.screen on the file alone (no BIDS, no Nipype) == the app's qc.json."""
    import qc_pipeline
    from qc_pipeline.screening import screen

    assert qc_pipeline.screen is screen  # the package's one call for library users

    rel = GOOD[0]
    app = qc_of(run["out"], rel)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(run["root"] / rel, lone / Path(rel).name)
    rec = screen(lone / Path(rel).name, model_dir=model_dir, skull_strip="none")  # as base_args
    assert {k: rec[k] for k in SCAN_FIELDS} == {k: app[k] for k in SCAN_FIELDS}
    assert {k: rec["entities"][k] for k in ("subject", "session", "run")} == \
        {k: app["entities"][k] for k in ("subject", "session", "run")}
    assert rec["mask_file"] is None and not list(lone.glob("*_desc-*"))
    # with an output folder: the same record and the app's images, entity-named
    rec2 = screen(lone / Path(rel).name, model_dir=model_dir, skull_strip="none", output_dir=tmp_path / "out")
    assert {k: rec2[k] for k in SCAN_FIELDS} == {k: app[k] for k in SCAN_FIELDS}
    stem = Path(rel).name.replace(".nii.gz", "")
    for desc in ("anomaly_mask", "error_map"):
        a = nib.load(tmp_path / "out" / f"{stem}_desc-{desc}.nii.gz")
        b = nib.load(run["out"] / Path(rel).parent / f"{stem}_desc-{desc}.nii.gz")
        np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
        np.testing.assert_allclose(a.affine, b.affine)
    assert json.loads((tmp_path / "out" / f"{stem}_qc.json").read_text())["mask_file"] == \
        f"{stem}_desc-anomaly_mask.nii.gz"


def test_a_contrast_enhanced_scan_says_so_among_its_warnings():
    """A ce- entity (BIDS: contrast agent) puts a note among the record's warnings, once: the
    model learned normal brains without contrast agent (docs/benchmarks.md, real lesions)."""
    from qc_pipeline.derivatives import ok_record
    from qc_pipeline.screening import scan_record_for

    plain = scan_record_for("/data/sub-07_ses-1_T1w.nii.gz")
    assert plain.subject == "07" and plain.entities["session"] == "1"
    assert plain.acquisition_notes == []
    ce = scan_record_for("/data/sub-07_ses-1_ce-gadolinium_T1w.nii.gz")
    assert len(ce.acquisition_notes) == 1 and "ce-gadolinium" in ce.acquisition_notes[0]
    common = dict(model_id="m", schedule="auto", device="cpu", input_sha256="0")
    assert ok_record(plain, {}, warnings=["w"], **common)["warnings"] == ["w"]
    rec = ok_record(ce, {}, warnings=["w", *ce.acquisition_notes], **common)
    assert rec["warnings"] == ["w", ce.acquisition_notes[0]]


def test_the_library_call_raises_a_typed_error_naming_the_file(tmp_path, model_dir):
    from qc_pipeline.errors import InputError
    from qc_pipeline.screening import screen

    bad = tmp_path / "sub-09_T1w.nii.gz"
    bad.write_bytes(b"")
    with pytest.raises(InputError, match="sub-09_T1w.nii.gz: file is empty"):
        screen(bad, model_dir=model_dir)


def _scores(out: Path, rels) -> dict:
    res = {}
    for rel in rels:
        qc = qc_of(out, rel)
        res[rel] = (qc["status"], qc["anomaly_voxels"], qc["anomaly_fraction"], qc["tau_stop"],
                    qc["input_sha256"])
    return res


def test_kill_9_then_resume_equals_uninterrupted(run, model_dir, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = base_args(run["root"], out, work, model_dir, "--participant-label", "01", "--nprocs", "2")
    code = "import sys; from qc_pipeline.cli.app import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, NIPYPE_NO_ET="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if list(out.glob("sub-01/**/*_qc.json")) or list(work.glob("**/result.npz")):
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # no half-written outputs
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    n_before = len(list(out.glob("sub-01/**/*_qc.json")))
    assert n_before < 3
    rc = main(base_args(run["root"], out, work, model_dir, "--participant-label", "01"))
    assert rc == 0
    rels = GOOD[:3]
    assert _scores(out, rels) == _scores(run["out"], rels)
    for rel in rels:
        stem = Path(rel).name.replace(".nii.gz", "")
        a = nib.load(out / Path(rel).parent / f"{stem}_desc-error_map.nii.gz").get_fdata()
        b = nib.load(run["out"] / Path(rel).parent / f"{stem}_desc-error_map.nii.gz").get_fdata()
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_group_level_from_derivatives_alone(run, tmp_path):
    # copy the derivatives away from the raw tree, point BIDS_DIR at nothing
    out = tmp_path / "derivs"
    shutil.copytree(run["out"], out)
    labels = tmp_path / "labels.tsv"
    labels.write_text("bids_name\trating\n" + "".join(
        f"{Path(r).name.replace('.nii.gz', '')}\t{'bad' if i % 2 else 'good'}\n"
        for i, r in enumerate(GOOD)))
    rc = main([str(tmp_path / "no-such-bids"), str(out), "group", "--labels", str(labels)])
    assert rc == 0
    import csv

    rows = list(csv.DictReader((out / "group_T1w.csv").open()))
    assert len(rows) == len(GOOD) + len(BAD_KINDS)
    by_name = {r["bids_name"]: r for r in rows}
    assert by_name["sub-02_acq-empty_T1w"]["status"] == "error"
    assert "empty" in by_name["sub-02_acq-empty_T1w"]["error"]
    assert by_name["sub-01_ses-post_acq-mprage_T1w"]["site"] == "siteC"
    assert (out / "group_T1w.html").is_file() and (out / "group_T1w_sites.csv").is_file()
    assert list((out / "logs").glob("config-*.json"))


def test_calibrate_fits_the_qc_reference_from_clean_outputs(run, model_dir, tmp_path, capsys):
    from qc_pipeline.cli.calibrate import main as calibrate
    from qc_pipeline.cli.exits import EXIT_NO_INPUT

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    n_ok = sum(qc_of(run["out"], rel)["status"] == "ok" for rel in GOOD)
    # too few clean scans for the default minimum: a clear refusal, the card untouched
    before = (model / "model_card.json").read_text()
    assert calibrate([str(run["out"]), str(model)]) == EXIT_NO_INPUT
    assert "need >= 8" in capsys.readouterr().err
    assert (model / "model_card.json").read_text() == before
    assert calibrate([str(run["out"]), str(model), "--min-scans", "5"]) == 0
    card = json.loads((model / "model_card.json").read_text())
    ref = card["qc_score"]
    assert ref["n_scans"] == n_ok and set(ref["features"]) <= set(FEATURES)
    assert {"anomaly_fraction", "recon_error", "sharpness", "noise"} <= set(ref["features"])
    # a new id, so that no result of the uncalibrated model is reused; the rest is kept
    assert card["model_id"].startswith("t1w-random-seed0-cal-") and card["calibrated_from"] == "t1w-random-seed0"
    assert card["grid"] == json.loads(before)["grid"] and card["network"] == json.loads(before)["network"]
    # calibrating again from the same outputs fits the same reference: the same id
    assert calibrate([str(run["out"]), str(model), "--min-scans", "5"]) == 0
    assert json.loads((model / "model_card.json").read_text())["model_id"] == card["model_id"]
    # a folder that is not a model folder is named in the error
    assert calibrate([str(run["out"]), str(tmp_path / "nowhere")]) == EXIT_NO_INPUT
    assert "nowhere" in capsys.readouterr().err


def test_calibrate_gamma_from_the_sweeps_of_clean_outputs(run, model_dir, tmp_path):
    """--gamma sets the stopping slope to factor x the median tau(50) of the scans' stored sweeps."""
    from qc_pipeline.cli.calibrate import main as calibrate
    from qc_pipeline.engine.taufit import relative_gamma

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    tau50 = []
    for rel in GOOD:
        q = qc_of(run["out"], rel)
        if q["status"] == "ok":
            tau50.append(relative_gamma([t for t, _ in q["tau_curve"]], [v for _, v in q["tau_curve"]], 1.0))
    assert calibrate([str(run["out"]), str(model), "--min-scans", "5", "--gamma", "--gamma-factor", "0.4"]) == 0
    card = json.loads((model / "model_card.json").read_text())
    assert card["gamma_mode"] == "absolute"
    assert card["gamma"] == pytest.approx(0.4 * float(np.median(tau50)), rel=1e-3)
    assert card["gamma_calibration"]["n"] == len(tau50) and card["gamma_calibration"]["factor"] == 0.4


def test_the_scan_command_screens_a_folder_of_loose_files(run, model_dir, tmp_path, capsys):
    """itermask-qc-scan on a non-BIDS folder: the app's record per good file, one error line
    per bad file (the others finish), outputs mirroring the folder, rc 1."""
    from qc_pipeline.cli.scan import main as scan_main

    rel = GOOD[0]
    loose = tmp_path / "console"
    (loose / "day1").mkdir(parents=True)
    shutil.copyfile(run["root"] / rel, loose / "day1" / Path(rel).name)
    (loose / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (loose / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    capsys.readouterr()
    rc = scan_main([str(loose), "-o", str(out), "--model-dir", str(model_dir), "--skull-strip", "none",
                    "--json", str(tmp_path / "all.json")])
    cap = capsys.readouterr()
    assert rc == 1
    lines = [ln.split("\t") for ln in cap.out.strip().splitlines()]
    assert lines[0][:3] == ["file", "status", "qc_score"] and len(lines) == 3  # notes.txt is not a scan
    good = [ln for ln in lines[1:] if ln[1] == "ok"]
    bad = [ln for ln in lines[1:] if ln[1] == "error"]
    assert len(good) == 1 and len(bad) == 1 and bad[0][0].endswith("broken.nii.gz")
    assert "broken.nii.gz" in cap.err and "1 of 2 file(s) could not be screened" in cap.err
    stem = Path(rel).name.replace(".nii.gz", "")
    rec = json.loads((out / "day1" / f"{stem}_qc.json").read_text())
    app = qc_of(run["out"], rel)
    assert {k: rec[k] for k in SCAN_FIELDS} == {k: app[k] for k in SCAN_FIELDS}
    assert float(good[0][2]) == pytest.approx(app["qc_score"], abs=0.005)
    assert (out / "day1" / f"{stem}_desc-anomaly_mask.nii.gz").is_file()
    err = json.loads((out / "broken_qc.json").read_text())
    assert err["status"] == "error" and "broken.nii.gz" in err["error"]
    assert [r["status"] for r in json.loads((tmp_path / "all.json").read_text())] == ["ok", "error"]


def test_the_scan_command_says_when_there_is_nothing_to_screen(tmp_path, capsys):
    from qc_pipeline.cli.scan import main as scan_main

    (tmp_path / "empty").mkdir()
    assert scan_main([str(tmp_path / "empty")]) == 66
    assert "no NIfTI file" in capsys.readouterr().err


def test_engine_batches_give_each_scan_its_own_result(run, model_dir, tmp_path):
    """--engine-batch 3: scans share IterMask3D nodes (the GPU stage's shape, here on the
    CPU); every scan's record and images equal the per-scan run's, and the bad inputs in the
    same batches keep their own error rows."""
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main(base_args(run["root"], out, work, model_dir, "--engine-batch", "3"))
    assert rc == run["rc"] == 1
    batch_nodes = sorted(p.name for p in (work / "itermask_qc_wf").glob("itermask_batch_*") if p.is_dir())
    assert batch_nodes and all(n.startswith("itermask_batch_t1w_") for n in batch_nodes)
    assert not list((work / "itermask_qc_wf").glob("scan_*/itermask/result.npz"))
    for rel in GOOD:
        a, b = qc_of(out, rel), qc_of(run["out"], rel)
        assert {k: a[k] for k in SCAN_FIELDS} == {k: b[k] for k in SCAN_FIELDS}, rel
        stem = Path(rel).name.replace(".nii.gz", "")
        for desc in ("anomaly_mask", "error_map"):
            np.testing.assert_array_equal(
                nib.load(out / Path(rel).parent / f"{stem}_desc-{desc}.nii.gz").get_fdata(),
                nib.load(run["out"] / Path(rel).parent / f"{stem}_desc-{desc}.nii.gz").get_fdata())
    bad = [p for p in run["out"].rglob("*_qc.json") if json.loads(p.read_text())["status"] == "error"]
    assert bad
    for p in bad:
        other = json.loads((out / p.relative_to(run["out"])).read_text())
        assert other["status"] == "error" and other["error"] == json.loads(p.read_text())["error"]
