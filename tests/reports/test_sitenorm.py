"""The engine's mask against the site's own scans (qc_pipeline.sitenorm and the group level)."""
from __future__ import annotations

import csv
import json
import logging

import nibabel as nib
import numpy as np
import pytest

from qc_pipeline.group import write_group_tables
from qc_pipeline.sitenorm import (
    ScanMaps,
    SiteNormError,
    error_to_template,
    from_template,
    nearest_maps,
    site_anomaly_mask,
    site_normative,
    site_reference,
    site_reference_and_spread,
    to_template,
)

SHAPE = (40, 48, 40)
AFF = np.diag([4.0, 4.0, 4.0, 1.0])
AFF[:3, 3] = [-80.0, -110.0, -70.0]
IDENTITY = np.eye(4)  # the scans sit in MNI world: template fit = identity
COMMON = (20, 24, 20)      # where the network errs on every scan of the site ("ventricles")
ARTIFACT = (12, 30, 24)    # one scan's local artifact


def _ball(centre, r):
    g = np.indices(SHAPE)
    return sum((g[i] - centre[i]) ** 2 for i in range(3)) <= r ** 2


BRAIN = _ball((20, 24, 20), 14)


def _maps(rng, artifact: bool, shared=None):
    err = np.where(BRAIN, 0.2 + 0.05 * rng.random(SHAPE), 0.0).astype(np.float32)
    err[_ball(COMMON, 3)] = 3.0
    if shared is not None:  # where one group of the site's scans (a scanner, a person) errs
        err[_ball(shared, 4)] = 3.0
    if artifact:
        err[_ball(ARTIFACT, 3)] = 4.0
    return err, BRAIN & (err > 1.0)


def test_template_round_trip_keeps_a_smooth_volume():
    g = np.indices(SHAPE).astype(np.float32)
    vol = np.where(BRAIN, 1.0 + 0.05 * g[0], 0.0).astype(np.float32)
    back = from_template(np.nan_to_num(to_template(vol, AFF, IDENTITY)), AFF, SHAPE, IDENTITY)
    inner = _ball((20, 24, 20), 10)
    assert np.allclose(back[inner], vol[inner], atol=0.05)


def test_error_map_in_template_space_is_uncovered_outside_the_brain():
    err, _ = _maps(np.random.default_rng(0), artifact=False)
    t = error_to_template(err, AFF, IDENTITY)
    back = from_template(np.nan_to_num(t, nan=-1.0), AFF, SHAPE, IDENTITY)
    inner, outside = _ball((20, 24, 20), 10), ~_ball((20, 24, 20), 16)
    assert np.all(back[outside] < 0)  # NaN: no scan's brain, not "no error"
    assert np.all(back[inner & ~_ball(COMMON, 4)] > 0.15)
    assert np.isfinite(t).sum() > 0


def test_template_fit_that_is_not_an_affine_is_named():
    with pytest.raises(SiteNormError, match="template_fit affine"):
        to_template(np.zeros(SHAPE), AFF, np.zeros((4, 4)))


def test_reference_is_the_median_and_ignores_one_scan_and_uncovered_voxels():
    a = np.full((6, 6, 6), 1.0, np.float32)
    maps = [a.copy() for _ in range(4)] + [a * 50]
    maps[0][0, 0, 0] = np.nan
    ref = site_reference(maps, dilation=1)
    assert np.allclose(ref, 1.0)
    empty = site_reference([np.full((4, 4, 4), np.nan, np.float32)] * 3, dilation=1)
    assert np.all(empty == 0)
    spot = np.zeros((7, 7, 7), np.float32)
    spot[3, 3, 3] = 2.0
    assert site_reference([spot] * 3, dilation=3)[2:5, 2:5, 2:5].min() == 2.0


def test_mask_keeps_only_voxels_above_the_site_level():
    err = np.array([0.5, 2.0, 5.0, 5.0])
    mask = np.array([True, True, True, False])
    ref = np.array([0.1, 1.0, 1.0, 0.1])
    assert site_anomaly_mask(err, mask, ref, 3.0).tolist() == [True, False, True, False]
    with pytest.raises(SiteNormError, match="factor"):
        site_anomaly_mask(err, mask, ref, 0.0)
    with pytest.raises(SiteNormError, match="shapes differ"):
        site_anomaly_mask(err, mask, ref[:2], 3.0)


def _write_site(root, n_clean=9, sub_prefix="c", site="A", artifact=True, rng=None, art_count_like_clean=False,
                shared=None):
    rng = rng or np.random.default_rng(0)
    names = []
    for i in range(n_clean + int(artifact)):
        is_art = artifact and i == n_clean
        sub = f"{sub_prefix}{i:02d}" + ("art" if is_art else "")
        name = f"sub-{sub}_T1w"
        d = root / f"sub-{sub}" / "anat"
        d.mkdir(parents=True)
        err, mask = _maps(rng, is_art, shared)
        nib.save(nib.Nifti1Image(err, AFF), str(d / f"{name}_desc-error_map.nii.gz"))
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFF), str(d / f"{name}_desc-anomaly_mask.nii.gz"))
        rec = {"status": "ok", "bids_name": name, "entities": {"subject": sub, "suffix": "T1w"},
               "site": site, "model_id": "m1", "anomaly_voxels": int(mask.sum()),
               "anomaly_fraction": float(mask.sum() / BRAIN.sum()),
               "template_fit": {"affine": IDENTITY.tolist(), "surface_agreement": 0.9},
               "mask_file": f"{name}_desc-anomaly_mask.nii.gz",
               "error_map_file": f"{name}_desc-error_map.nii.gz"}
        if is_art and art_count_like_clean:  # its loop counted as many voxels as a clean scan's
            rec["anomaly_voxels"] = int(_ball(COMMON, 3).sum())
            rec["anomaly_fraction"] = rec["anomaly_voxels"] / float(BRAIN.sum())
        (d / f"{name}_qc.json").write_text(json.dumps(rec))
        names.append(name)
    return names


def _scan_maps(root, name, **kw):
    d = next(root.glob(f"sub-*/anat/{name}_qc.json")).parent
    base = dict(key=name, error_map=d / f"{name}_desc-error_map.nii.gz",
                mask=d / f"{name}_desc-anomaly_mask.nii.gz",
                out_mask=d / f"{name}_desc-siteanomaly_mask.nii.gz", template_to_world=IDENTITY,
                anomaly_voxels=100.0, anomaly_fraction=0.01)
    base.update(kw)
    return ScanMaps(**base)


def test_the_site_reference_removes_what_every_scan_shares_and_keeps_the_artifact(tmp_path, caplog):
    names = _write_site(tmp_path)
    scans = [_scan_maps(tmp_path, n) for n in names]
    scans.append(_scan_maps(tmp_path, names[0], key="sub-broken_T1w",
                            error_map=tmp_path / "missing.nii.gz"))
    with caplog.at_level(logging.WARNING):
        out = site_normative(scans, factor=3.0, min_scans=8)
    assert "sub-broken_T1w" in caplog.text and "sub-broken_T1w" not in out
    art = next(n for n in names if "art" in n)
    clean = [n for n in names if n != art]
    assert all(out[n].fraction == 0.0 for n in clean)
    m = np.asarray(nib.load(str(out[art].mask_file)).dataobj) > 0
    assert m[ARTIFACT] and not m[COMMON]
    assert m.sum() >= 0.8 * _ball(ARTIFACT, 3).sum()
    assert out[art].n_reference == len(names) + 1 - 1  # the broken scan is not in the reference
    assert site_normative(scans[:5], factor=3.0, min_scans=8) == {}


def test_group_table_flags_the_artifact_by_the_engine_against_its_site(tmp_path):
    names = _write_site(tmp_path)
    write_group_tables(tmp_path)
    with open(tmp_path / "group_T1w.csv", newline="") as fh:
        rows = {r["bids_name"]: r for r in csv.DictReader(fh)}
    art = next(n for n in names if "art" in n)
    assert rows[art]["engine_flagged"] == "1"
    assert "site_anomaly_fraction" in rows[art]["flag_reasons"]
    assert float(rows[art]["site_anomaly_fraction"]) > 0.005
    for n in names:
        if n != art:
            assert rows[n]["engine_flagged"] == "0" and float(rows[n]["site_anomaly_fraction"]) == 0.0
    assert (tmp_path / f"sub-{art[4:-4]}" / "anat" / f"{art}_desc-siteanomaly_mask.nii.gz").is_file()
    with open(tmp_path / "group_T1w_sites.csv", newline="") as fh:
        site = next(csv.DictReader(fh))
    assert site["n_engine_flagged"] == "1"
    assert rows[art]["flagged"] == "1"
    assert int(site["n_flagged"]) == sum(r["flagged"] == "1" for r in rows.values())


def test_the_engines_flag_alone_makes_the_verdict(tmp_path):
    """A scan whose loop counted as many voxels as every clean scan's (so the score, its
    count, does not flag it) but whose error map stands out against the site's scans where
    theirs does not: the engine's flag alone flags it, and the reason says so."""
    names = _write_site(tmp_path, art_count_like_clean=True)
    write_group_tables(tmp_path, engine_min_fraction=0.001)
    with open(tmp_path / "group_T1w.csv", newline="") as fh:
        rows = {r["bids_name"]: r for r in csv.DictReader(fh)}
    art = next(n for n in names if "art" in n)
    assert rows[art]["score_flagged"] == "0" and rows[art]["engine_flagged"] == "1"
    assert rows[art]["flagged"] == "1"
    assert rows[art]["flag_reasons"].startswith("engine, against the site's scans")
    for n in names:
        if n != art:
            assert rows[n]["flagged"] == rows[n]["score_flagged"]
    with open(tmp_path / "group_T1w_sites.csv", newline="") as fh:
        site = next(csv.DictReader(fh))
    assert site["n_flagged"] == str(sum(r["flagged"] == "1" for r in rows.values()))
    assert site["n_score_flagged"] == str(sum(r["score_flagged"] == "1" for r in rows.values()))


def test_small_sites_use_the_pool_and_the_step_can_be_skipped(tmp_path):
    _write_site(tmp_path, n_clean=6, sub_prefix="a", site="A", artifact=True)
    _write_site(tmp_path, n_clean=4, sub_prefix="b", site="B", artifact=False, rng=np.random.default_rng(1))
    write_group_tables(tmp_path)
    with open(tmp_path / "group_T1w.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["site_anomaly_fraction"] != "" for r in rows)
    assert [r["engine_flagged"] for r in rows if "art" in r["bids_name"]] == ["1"]
    write_group_tables(tmp_path, site_norm_factor=None)
    with open(tmp_path / "group_T1w.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["site_anomaly_fraction"] == "" and r["engine_flagged"] == "" for r in rows)


def test_scans_outside_the_targets_only_make_the_reference(tmp_path):
    names = _write_site(tmp_path)
    scans = [_scan_maps(tmp_path, n) for n in names]
    art = next(n for n in names if "art" in n)
    out = site_normative(scans, factor=3.0, min_scans=8, targets={art})
    assert list(out) == [art] and out[art].n_reference == len(names)
    assert out[art].fraction > 0.0
    written = sorted(p.name for p in tmp_path.glob("sub-*/anat/*_desc-siteanomaly_mask.nii.gz"))
    assert written == [f"{art}_desc-siteanomaly_mask.nii.gz"]


def test_where_the_sites_people_differ_one_persons_anatomy_is_not_an_anomaly():
    """At one place the error differs from person to person (skewed, as the error of a sulcus
    or a ventricle's edge does); one person's lies above three times the site's median, so
    the factor alone keeps it in the mask; within the site's spread it is not an anomaly. An
    artifact where nobody differs stays."""
    rng = np.random.default_rng(1)
    person = _ball((28, 20, 20), 3)
    levels = [0.12, 1.5, 0.18, 0.22, 0.26, 0.3, 0.34, 0.4, 0.5, 0.65, 0.9, 1.2]  # scan 1: 1.5
    maps, masks = [], []
    for i, level in enumerate(levels):
        err, _ = _maps(rng, artifact=(i == 11))
        err[person] = level
        maps.append(err)
        masks.append(BRAIN & (err > 1.0))
    t = [error_to_template(e, AFF, IDENTITY) for e in maps]
    ref_t, spread_t = site_reference_and_spread(t)
    assert np.allclose(ref_t, site_reference(t))
    ref, spread = (from_template(x, AFF, SHAPE, IDENTITY) for x in (ref_t, spread_t))
    inner = _ball((28, 20, 20), 1)
    with_factor = site_anomaly_mask(maps[1], masks[1], ref, 3.0)
    assert with_factor[inner].all()  # the factor alone: this person's anatomy is an anomaly
    with_spread = site_anomaly_mask(maps[1], masks[1], ref, 3.0, spread=spread)
    assert not with_spread[person].any()
    art = site_anomaly_mask(maps[11], masks[11], ref, 3.0, spread=spread)
    assert art[ARTIFACT] and art.sum() >= 0.8 * _ball(ARTIFACT, 3).sum()
    with pytest.raises(SiteNormError, match="spread_k"):
        site_anomaly_mask(maps[1], masks[1], ref, 3.0, spread=spread, spread_k=-1.0)


SHARED = (28, 18, 20)  # where the minority group of a mixed site errs


def test_a_minority_group_of_a_site_is_compared_with_its_own_scans(tmp_path):
    """A site of two groups (a second scanner, or a few people scanned many times): 13 scans err
    only where every scan does, 7 also at SHARED. Against the whole site the minority's
    ordinary error is an anomaly in every one of its scans; against each scan's nearest
    scans it is not, and both groups' artifacts stay."""
    names = _write_site(tmp_path, n_clean=12, sub_prefix="a")
    names += _write_site(tmp_path, n_clean=6, sub_prefix="b", rng=np.random.default_rng(1), shared=SHARED)
    scans = [_scan_maps(tmp_path, n) for n in names]
    minority_clean = [n for n in names if n.startswith("sub-b") and "art" not in n]
    arts = [n for n in names if "art" in n]
    whole = site_normative(scans, factor=3.0, min_scans=8, neighbours=None)
    assert all(whole[n].fraction > 0 for n in minority_clean)
    assert all(whole[n].n_reference == len(names) for n in names)
    near = site_normative(scans, factor=3.0, min_scans=8, neighbours=8)
    assert all(near[n].fraction == 0.0 for n in minority_clean)
    assert all(near[n].n_reference == 8 for n in names)
    assert all(len(near[n].reference) == 8 and n not in near[n].reference for n in names)
    assert all(a.reference == () for a in whole.values())
    assert all(sum(k.startswith("sub-b") for k in near[n].reference) == 6 for n in minority_clean)
    for art in arts:
        m = np.asarray(nib.load(str(near[art].mask_file)).dataobj) > 0
        assert m[ARTIFACT] and not m[SHARED] and m.sum() >= 0.8 * _ball(ARTIFACT, 3).sum()
    # a site no larger than the neighbours (+ the scan itself) is compared as a whole
    small = site_normative(scans[:9], factor=3.0, min_scans=8, neighbours=8)
    assert all(a.n_reference == 9 for a in small.values())
    with pytest.raises(SiteNormError, match="neighbours"):
        site_normative(scans, neighbours=0)


def test_the_site_score_compares_each_scan_with_the_scans_its_engine_mask_was(tmp_path):
    """The same two-group site, the minority also differing in its signal deficit and its
    background (as one person's or one scanner's traits do): the group level scores each
    scan's measurements and its background against the scans its engine mask was compared
    with. Against the whole site every clean minority scan is flagged by the site score and
    the background; against its nearest scans none is, and an artifact in either group is."""
    names = _write_site(tmp_path, n_clean=12, sub_prefix="a")
    names += _write_site(tmp_path, n_clean=6, sub_prefix="b", rng=np.random.default_rng(1), shared=SHARED)
    ref = {"signal_deficit": {"median": 0.0, "scale": 0.002, "direction": "up", "transform": "identity"}}
    rng = np.random.default_rng(2)
    arts_b = next(n for n in names if n.startswith("sub-b") and "art" in n)
    for n in names:
        p = next(tmp_path.glob(f"sub-*/anat/{n}_qc.json"))
        q = json.loads(p.read_text())
        deficit = (0.04 if n.startswith("sub-b") else 0.0) + 0.002 * rng.normal() + (0.04 if "art" in n else 0.0)
        # the minority's clean backgrounds also differ (neck in the field of view, another coil)
        background = (0.03 if n.startswith("sub-b") else 0.0) + 0.001 * rng.random() + (0.1 if n == arts_b else 0.0)
        q.update(qc_score=1.0, quality_features={"signal_deficit": deficit}, qc_score_reference=ref,
                 background_artifact_fraction=background)
        p.write_text(json.dumps(q))
    minority_clean = [n for n in names if n.startswith("sub-b") and "art" not in n]
    arts = [n for n in names if "art" in n]

    def rows(**kw):
        write_group_tables(tmp_path, **kw)
        with open(tmp_path / "group_T1w.csv", newline="") as fh:
            return {r["bids_name"]: r for r in csv.DictReader(fh)}

    whole = rows(site_norm_neighbours=None)
    assert all(whole[n]["score_flagged"] == "1" for n in minority_clean)
    assert all(whole[n]["background_flagged"] == "1" for n in minority_clean)
    near = rows(site_norm_neighbours=8)
    assert "qc_score_site" in near[names[0]]
    assert not any(near[n]["score_flagged"] == "1" or near[n]["background_flagged"] == "1"
                   for n in names if n not in arts)
    assert all(near[n]["score_flagged"] == "1" and near[n]["qc_score_site_driver"] == "signal_deficit" for n in arts)
    assert all(float(near[n]["qc_score_site"]) < 3 for n in minority_clean)
    assert near[arts_b]["background_flagged"] == "1"
    assert float(near[minority_clean[0]]["background_threshold"]) > 0.03 > float(near[names[0]]["background_threshold"])


def test_nearest_maps_are_the_most_alike_and_never_the_scan_itself():
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    vectors = np.stack([a + 0.01 * rng.random(50) for _ in range(5)] + [b + 0.01 * rng.random(50) for _ in range(4)])
    vectors[0, :10] = np.nan  # a block a scan does not cover takes the others' median
    got = nearest_maps(vectors, vectors[[0, 6]], 3, exclude=[0, 6])
    assert set(got[0]) <= {1, 2, 3, 4} and set(got[1]) <= {5, 7, 8}
    assert got == [tuple(sorted(g)) for g in got]
    with pytest.raises(SiteNormError, match="k must be"):
        nearest_maps(vectors, vectors[:1], 9)
    with pytest.raises(SiteNormError, match="disagree"):
        nearest_maps(vectors, vectors[:1, :10], 2)


def _red_pixels(data_uri: str) -> int:
    import base64
    import io

    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).convert("RGB")).astype(int)
    return int(((rgb[..., 0] - rgb[..., 1] > 60) & (rgb[..., 0] - rgb[..., 2] > 60)).sum())


def test_after_the_group_level_the_overlay_is_the_mask_against_the_site(tmp_path):
    """The participant mask of every scan keeps the error all of them share; once the group
    level has the site's reference, the figures overlay the mask against it: empty on a
    clean scan, the artifact on the other."""
    from qc_pipeline.derivatives import load_qc_records
    from qc_pipeline.reports import scan_figures, site_mask_of

    names = _write_site(tmp_path)
    art = next(n for n in names if "art" in n)
    recs = {r.bids_name: r for r in load_qc_records(tmp_path)}
    before = {n: scan_figures(recs[n], tmp_path) for n in (names[0], art)}
    assert _red_pixels(before[names[0]]["thumb"]) > 0  # the shared error, on a clean scan
    write_group_tables(tmp_path)
    with open(tmp_path / "group_T1w.csv", newline="") as fh:
        rows = {r["bids_name"]: r for r in csv.DictReader(fh)}
    after = {}
    for n in (names[0], art):
        site_mask = site_mask_of(recs[n], rows[n]["site_anomaly_fraction"])
        assert site_mask is not None
        after[n] = scan_figures(recs[n], tmp_path, site_mask=site_mask)
        assert any("against this site's other scans" in note for note in after[n]["notes"])
    assert _red_pixels(after[names[0]]["mosaic"]) == 0
    assert _red_pixels(after[art]["mosaic"]) > 0
    # a table without the scan's site anomaly (an earlier file left behind) is not used
    assert site_mask_of(recs[art], "") is None
    assert _red_pixels(scan_figures(recs[names[0]], tmp_path)["thumb"]) > 0  # redrawn, not the cached one


def test_a_second_group_run_leaves_an_unchanged_site_mask_file_alone(tmp_path):
    names = _write_site(tmp_path)
    write_group_tables(tmp_path)
    art = next(n for n in names if "art" in n)
    path = next(tmp_path.rglob(f"{art}_desc-siteanomaly_mask.nii.gz"))
    first = path.stat().st_mtime_ns
    write_group_tables(tmp_path)
    assert path.stat().st_mtime_ns == first  # the cached figures drawn from it stay fresh
    path.write_bytes(b"not a nifti")
    write_group_tables(tmp_path)
    assert (np.asarray(nib.load(str(path)).dataobj) > 0).any()


def test_the_site_mask_starts_from_the_candidate_mask_before_the_models_spread_rule(tmp_path):
    names = _write_site(tmp_path)
    art = next(n for n in names if "art" in n)
    d = next(tmp_path.glob(f"sub-*/anat/{art}_qc.json")).parent
    rec = json.loads((d / f"{art}_qc.json").read_text())
    # the model's spread rule emptied this scan's mask; the mask before it holds the artifact
    (d / f"{art}_desc-anomaly_mask.nii.gz").rename(d / f"{art}_desc-candidate_mask.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(BRAIN.shape, np.uint8), AFF), str(d / f"{art}_desc-anomaly_mask.nii.gz"))
    rec.update(candidate_mask_file=f"{art}_desc-candidate_mask.nii.gz",
               candidate_anomaly_voxels=rec["anomaly_voxels"], candidate_anomaly_fraction=rec["anomaly_fraction"],
               anomaly_voxels=0, anomaly_fraction=0.0)
    (d / f"{art}_qc.json").write_text(json.dumps(rec))
    write_group_tables(tmp_path)
    with open(tmp_path / "group_T1w.csv", newline="") as fh:
        rows = {r["bids_name"]: r for r in csv.DictReader(fh)}
    assert rows[art]["engine_flagged"] == "1" and float(rows[art]["site_anomaly_fraction"]) > 0.005
    m = np.asarray(nib.load(str(d / f"{art}_desc-siteanomaly_mask.nii.gz")).dataobj) > 0
    assert m[ARTIFACT] and not m[COMMON]
    # a record that names no candidate: the site starts from the (empty) anomaly mask
    for key in ("candidate_mask_file", "candidate_anomaly_voxels", "candidate_anomaly_fraction"):
        rec.pop(key)
    (d / f"{art}_qc.json").write_text(json.dumps(rec))
    write_group_tables(tmp_path)
    with open(tmp_path / "group_T1w.csv", newline="") as fh:
        rows = {r["bids_name"]: r for r in csv.DictReader(fh)}
    assert rows[art]["engine_flagged"] == "0"
