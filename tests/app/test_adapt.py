"""The ``adapt`` level end to end on a tiny synthetic site with planted artifacts.

One module run (``site``): twelve heads of one site, two with planted artifacts and one rated
bad in ``--labels``; the site is screened with the base model, fine-tuned on the scans it
judged clean, calibrated and screened again. The tests check the choice of training scans,
the adapted model's card and id, that every result comes from the adapted model, the group
table, a rerun that does not retrain, resume after an interruption and bad input. The base
network is the tiny random one: this checks the wiring, not the quality of adaptation
(``docs/benchmarks.md`` holds that).
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_testlib import brain_image, save_scan

from qc_pipeline.adapt import (AdaptError, AdaptOptions, adaptation_key, adapted_model_id,
                               select_training_scans)
from qc_pipeline.cli.app import main
from qc_pipeline.engine import load_model_card
from qc_pipeline.engine.modelio import save_normal_error
from qc_pipeline.sitenorm import DEFAULT_SITE_NORM_FACTOR, DEFAULT_SITE_SPREAD_K, template_grid
from qc_pipeline.synth.artifacts import apply_artifact

N_SUBJECTS = 12
PLANTED = {"11": "chunk_top", "12": "chunk_middle"}
RATED_BAD = "05"
STEPS = 6


def _site(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "site", "BIDSVersion": "1.9.0"}))
    subs = [f"{i:02d}" for i in range(1, N_SUBJECTS + 1)]
    (root / "participants.tsv").write_text("participant_id\tsite\n" + "".join(f"sub-{s}\tA\n" for s in subs))
    for i, s in enumerate(subs):
        img = brain_image(100 + i)
        if s in PLANTED:
            img = apply_artifact(img, PLANTED[s], 1.0, np.random.default_rng(i))
        save_scan(root, f"sub-{s}/anat/sub-{s}_T1w.nii.gz", img)
    return root


def _args(root, out, work, model, *extra):
    return [str(root), str(out), "adapt", "-w", str(work), "--model-dir", str(model), "--skull-strip",
            "none", "--device", "cpu", "--adapt-steps", str(STEPS), "--adapt-exclude", "0.2", *extra]


def _qcs(out: Path) -> dict[str, dict]:
    return {p.name.replace("_qc.json", ""): json.loads(p.read_text()) for p in sorted(out.glob("sub-*/anat/*_qc.json"))}


@pytest.fixture(scope="module")
def site(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("adapt")
    root = _site(tmp / "bids")
    labels = tmp / "ratings.tsv"
    labels.write_text(f"bids_name\trating\nsub-{RATED_BAD}_T1w\tbad\nsub-01_T1w\tgood\n")
    out, work = tmp / "out", tmp / "work"
    # the base model carries a (flat, low) normal-error map and an opening, which the adapted
    # model must carry too
    model = tmp / "base_model"
    shutil.copytree(model_dir, model)
    shape, t_aff = template_grid()
    save_normal_error(model, np.full(shape, 1e-3, np.float32), t_aff,
                      {"factor": 4.0, "spread_k": 5.0, "open_vox": 1}, spread_t=np.full(shape, 1e-3, np.float32))
    rc = main(_args(root, out, work, model, "--labels", str(labels), "--nprocs", "2"))
    return {"rc": rc, "root": root, "out": out, "work": work, "labels": labels, "tmp": tmp,
            "base": load_model_card(model), "model": model}


def test_adapt_screens_every_scan_with_the_adapted_model(site):
    assert site["rc"] == 0
    card = load_model_card(site["out"] / "models" / "T1w")
    base_id = site["base"]["model_id"]
    assert card["model_id"].startswith(f"{base_id}-adapted-") and card["model_id"] != base_id
    qcs = _qcs(site["out"])
    assert len(qcs) == N_SUBJECTS
    for name, qc in qcs.items():
        assert qc["status"] == "ok", (name, qc.get("error"))
        assert qc["model_id"] == card["model_id"], name  # no result of the base model is left
        assert qc["model_adapted_from"] == base_id
        assert qc["qc_score"] is not None, name  # the refitted reference scores every scan
        assert qc["qc_score_reference"] == card["qc_score"]["features"]  # the site's reference


def test_planted_and_rated_artifacts_are_never_trained_on_and_still_rank_worst(site):
    ad = load_model_card(site["out"] / "models" / "T1w")["adaptation"]
    excluded = ad["excluded_scans"]
    for s in PLANTED:
        assert f"sub-{s}_T1w" in excluded and "worst" in excluded[f"sub-{s}_T1w"]
    assert "rated as an artifact" in excluded[f"sub-{RATED_BAD}_T1w"]
    assert set(ad["training_scans"]).isdisjoint(excluded)
    assert len(ad["training_scans"]) + len(excluded) == N_SUBJECTS
    assert len(ad["training_scans"]) >= AdaptOptions().min_scans
    # after adaptation the planted artifacts are still the two worst scans of the site
    scores = {n: q["qc_score"] for n, q in _qcs(site["out"]).items()}
    worst = sorted(scores, key=scores.get, reverse=True)[:2]
    assert set(worst) == {f"sub-{s}_T1w" for s in PLANTED}, scores
    clean = [v for n, v in scores.items() if n.split("_")[0][4:] not in PLANTED]
    for s in PLANTED:
        assert scores[f"sub-{s}_T1w"] > 3 * np.median(clean)


def test_card_records_the_adaptation(site):
    card = load_model_card(site["out"] / "models" / "T1w")
    ad = card["adaptation"]
    assert ad["base_model_id"] == site["base"]["model_id"]
    assert ad["complete"] and ad["reference_refit"]
    # the site's own normal error (the adapted model's error over its training scans), with
    # the group level's rule, replaces the base model's map
    sec = card["normal_error"]
    assert "site's own" in ad["normal_error"] and sec["n_scans"] == len(ad["training_scans"])
    assert sec["factor"] == DEFAULT_SITE_NORM_FACTOR and sec["spread_k"] == DEFAULT_SITE_SPREAD_K
    assert sec["open_vox"] == 1
    assert sec["fitted_for_model_id"] == card["model_id"]
    site_map = site["out"] / "models" / "T1w" / sec["file"]
    base_map = site["model"] / site["base"]["normal_error"]["file"]
    assert not np.array_equal(nib.load(str(site_map)).get_fdata(), nib.load(str(base_map)).get_fdata())
    assert (site["out"] / "models" / "T1w" / sec["spread_file"]).is_file()
    # with a spread map every scan keeps the mask before the spread rule for the group level
    for name, qc in _qcs(site["out"]).items():
        assert qc["normal_error"] == {"applied": True, "factor": DEFAULT_SITE_NORM_FACTOR,
                                      "spread_k": DEFAULT_SITE_SPREAD_K, "open_vox": 1}, name
        assert qc["candidate_anomaly_voxels"] >= qc["anomaly_voxels"], name
        cand = next(site["out"].glob(f"sub-*/anat/{qc['candidate_mask_file']}"))
        assert np.asarray(nib.load(str(cand)).dataobj).sum() >= np.asarray(
            nib.load(str(cand.parent / qc["mask_file"])).dataobj).sum(), name
    assert ad["steps"] == STEPS and ad["resumed_from_step"] == 0
    assert ad["device"] == "cpu" and ad["wall_time_s"] > 0 and ad["seconds"] > 0
    assert ad["options"]["exclude_fraction"] == 0.2 and ad["options"]["steps"] == STEPS
    assert Path(ad["dataset"]) == site["root"]
    for when in ("before", "after"):
        assert ad[when]["n"] == len(ad["training_scans"])
        assert ad[when]["median_anomaly_fraction"] is not None
    # stopping slope and QC-score reference come from the site's training scans
    assert card["gamma_mode"] == "absolute" and card["gamma"] > 0
    assert str(len(ad["training_scans"])) in card["gamma_calibration"]["source"]
    assert card["qc_score"] != site["base"]["qc_score"]
    assert "training scans" in card["qc_score"]["source"]
    assert card["training"]["init_from"]["path"] == str(site["model"])
    # a later rerun in a fresh folder of the same scans and options gives the same id
    key = adaptation_key(site["base"]["model_id"],
                         [(n, _qcs(site["out"])[n]["input_sha256"]) for n in ad["training_scans"]],
                         AdaptOptions(**ad["options"]))
    assert key == ad["key"]
    assert card["model_id"] == adapted_model_id(site["base"]["model_id"], key, STEPS)


def test_the_base_models_normal_error_can_be_kept(site, tmp_path):
    """--adapt-base-normal-error carries the base map over (same work folder: the
    preprocessing is reused)."""
    out = tmp_path / "out"
    assert main(_args(site["root"], out, site["work"], site["model"], "--labels", str(site["labels"]),
                      "--adapt-base-normal-error")) == 0
    card = load_model_card(out / "models" / "T1w")
    assert "carried over" in card["adaptation"]["normal_error"]
    assert card["normal_error"]["factor"] == 4.0 and card["normal_error"]["spread_k"] == 5.0
    assert card["normal_error"]["open_vox"] == 1
    folder = out / "models" / "T1w"
    np.testing.assert_array_equal(nib.load(str(folder / card["normal_error"]["file"])).get_fdata(),
                                  nib.load(str(site["model"] / site["base"]["normal_error"]["file"])).get_fdata())
    # another option, another adapted model
    assert card["model_id"] != load_model_card(site["out"] / "models" / "T1w")["model_id"]


def test_group_table_and_report_name_the_adapted_model(site):
    assert main([str(site["root"]), str(site["out"]), "group"]) == 0
    with open(site["out"] / "group_T1w.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    card = load_model_card(site["out"] / "models" / "T1w")
    assert len(rows) == N_SUBJECTS
    assert {r["model_id"] for r in rows} == {card["model_id"]}
    assert {r["model_adapted_from"] for r in rows} == {site["base"]["model_id"]}
    html = (site["out"] / "sub-03.html").read_text()
    assert card["model_id"] in html and "model_adapted_from" in html
    # the provenance names the adapted model's card: its base and what it was adapted on
    assert "adapted_on" in html and f"{len(card['adaptation']['training_scans'])} scans of" in html


def test_rerun_reuses_the_adapted_model_without_training(site, monkeypatch):
    import qc_pipeline.engine as engine

    card_before = (site["out"] / "models" / "T1w" / "model_card.json").read_text()

    def no_training(*a, **k):
        raise AssertionError("a finished adaptation was trained again")

    monkeypatch.setattr(engine, "train_model", no_training)
    rc = main(_args(site["root"], site["out"], site["work"], site["model"], "--labels", str(site["labels"])))
    assert rc == 0
    assert (site["out"] / "models" / "T1w" / "model_card.json").read_text() == card_before
    card = json.loads(card_before)
    assert {q["model_id"] for q in _qcs(site["out"]).values()} == {card["model_id"]}


def test_interrupted_adaptation_resumes_from_its_checkpoint(site, monkeypatch, tmp_path):
    import qc_pipeline.engine as engine

    real = engine.train_model

    def interrupted(pairs, out_dir, **kw):
        real(pairs, out_dir, **{**kw, "steps": 2, "checkpoint_every": 1})
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(engine, "train_model", interrupted)
    assert main(_args(site["root"], out, site["work"], site["model"])) == 130
    assert (out / "models" / "T1w" / "checkpoint.pt").is_file()
    assert not (load_model_card(out / "models" / "T1w").get("adaptation") or {}).get("complete")
    monkeypatch.setattr(engine, "train_model", real)
    assert main(_args(site["root"], out, site["work"], site["model"])) == 0
    ad = load_model_card(out / "models" / "T1w")["adaptation"]
    assert ad["complete"] and ad["resumed_from_step"] == 2 and ad["steps"] == STEPS


def test_too_few_clean_scans_keep_the_base_model_and_say_why(site, tmp_path, caplog):
    out = tmp_path / "out"
    subs = ["01", "02", "03", "04", "11"]
    rc = main(_args(site["root"], out, site["work"], site["model"], "--participant-label", *subs))
    assert rc == 1
    assert "scans judged clean enough to adapt on" in caplog.text and "need at least 8" in caplog.text
    qcs = _qcs(out)
    assert sorted(qcs) == [f"sub-{s}_T1w" for s in subs]
    for qc in qcs.values():
        assert qc["model_id"] == site["base"]["model_id"] and qc["model_adapted_from"] is None


def test_bad_ratings_file_stops_before_any_work(site, tmp_path, caplog):
    bad = tmp_path / "ratings.tsv"
    bad.write_text("subject\tscore\nsub-01\t3\n")
    out = tmp_path / "out"
    rc = main(_args(site["root"], out, tmp_path / "work", site["model"], "--labels", str(bad)))
    assert rc != 0
    assert "bids_name" in caplog.text and str(bad) in caplog.text
    assert not list(out.glob("sub-*/anat/*_qc.json")) and not (out / "models").exists()


@pytest.mark.parametrize("argv,expected", [
    (["--adapt-exclude", "1"], "expected a number in [0, 1)"),
    (["--adapt-minutes", "0"], "expected a positive number"),
    (["--adapt-steps", "0"], "expected a positive integer, got '0'"),
])
def test_bad_budget_options_are_usage_errors(argv, expected, tmp_path, capsys):
    rc = main([str(tmp_path), str(tmp_path / "out"), "adapt", *argv])
    assert rc == 64
    assert expected in capsys.readouterr().err


# --------------------------------------------------------------------------- units
def _rows(scores, **extra):
    return [{"bids_name": f"sub-{i:02d}_T1w", "status": "ok", "qc_score": s, **extra} for i, s in enumerate(scores)]


def test_selection_leaves_out_the_worst_share_failures_and_ratings():
    rows = _rows([0.1, 0.2, 9.0, 0.15, 0.3, 5.0, 0.12, 0.25, 0.18, 0.22])
    rows.append({"bids_name": "sub-99_T1w", "status": "error"})
    kept, excluded = select_training_scans(rows, exclude_fraction=0.1, bad={"sub-00_T1w"}, min_scans=8)
    assert excluded["sub-99_T1w"] == "failed screening"
    assert excluded["sub-00_T1w"] == "rated as an artifact"
    assert "worst 10 %" in excluded["sub-02_T1w"]  # 9 ok scans x 0.1 -> one left out
    assert "outlier" in excluded["sub-05_T1w"]  # far beyond the rest, though not in the share
    assert sorted(kept) == sorted(f"sub-{i:02d}_T1w" for i in (1, 3, 4, 6, 7, 8, 9))


def test_selection_scores_the_site_against_itself_from_the_qc_json_fields():
    # the stored scores (against an unrelated reference) miss sub-03; its measurements, seen
    # against the site's other scans, do not
    ref = {"signal_void": {"median": 0.0, "scale": 0.25, "direction": "up", "transform": "log", "offset": 0.001}}
    voids = [0.0, 0.0001, 0.0, 0.2, 0.0002, 0.0, 0.0001, 0.0, 0.0, 0.0001]
    rows = [{"bids_name": f"sub-{i:02d}_T1w", "status": "ok", "qc_score": 1.0 if i != 3 else 0.5,
             "quality_features": {"signal_void": v}, "qc_score_reference": ref} for i, v in enumerate(voids)]
    kept, excluded = select_training_scans(rows, exclude_fraction=0.1, min_scans=8)
    assert list(excluded) == ["sub-03_T1w"] and len(kept) == 9


def test_selection_with_nothing_to_leave_out_keeps_every_ok_scan():
    rows = _rows([0.1, 0.2, 0.15, 0.12])
    kept, excluded = select_training_scans(rows, exclude_fraction=0.0, min_scans=8)
    assert len(kept) == 4 and not excluded


def test_adapted_model_id_changes_with_training_set_options_and_steps():
    opts = AdaptOptions()
    k1 = adaptation_key("base", [("a", "1"), ("b", "2")], opts)
    assert k1 == adaptation_key("base", [("b", "2"), ("a", "1")], opts)  # order of scans is irrelevant
    assert k1 == adaptation_key("base", [("a", "1"), ("b", "2")], AdaptOptions(minutes=3))  # budget is not
    assert k1 != adaptation_key("base", [("a", "1"), ("b", "3")], opts)  # content is
    assert k1 != adaptation_key("other", [("a", "1"), ("b", "2")], opts)
    assert k1 != adaptation_key("base", [("a", "1"), ("b", "2")], AdaptOptions(trim=0.1))
    ids = {adapted_model_id("base", k1, s) for s in (100, 400)}
    assert len(ids) == 2 and all(i.startswith("base-adapted-") for i in ids)


def test_options_are_checked():
    with pytest.raises(AdaptError, match="exclude_fraction"):
        AdaptOptions(exclude_fraction=1.5)
    with pytest.raises(AdaptError, match="budget"):
        AdaptOptions(steps=0)
