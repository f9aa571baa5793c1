"""The combined QC score: measurements move the right way, the combination is a calibrated max."""
import math
import re

import numpy as np
import pytest
from scipy import ndimage as ndi

from qc_pipeline.qc.score import (CONTRIBUTOR_Z, ENGINE_MEASURES, FEATURES, QCScoreError, combine,
                                 contributors, fit_reference,
                                 axis_sharpness, largest_component_fraction, nonuniformity,
                                 scan_features, sharpness_and_noise, signal_void)

SHAPE = (48, 48, 48)


def _head(seed=0, noise=0.05):
    """A smooth 'brain' with fine texture (the grid image of a sharp scan) and its mask."""
    rng = np.random.default_rng(seed)
    g = np.indices(SHAPE).astype(float)
    r = np.sqrt(((g - 23.5) ** 2).sum(0))
    brain = r < 18
    tex = ndi.gaussian_filter(rng.normal(size=SHAPE), 1.0)
    img = np.where(r < 21, 1.0 + 3.0 * tex / tex.std(), -2.0) + noise * rng.normal(size=SHAPE)
    return img.astype(np.float32), brain


def test_sharpness_drops_with_blur_and_noise_rises_with_noise():
    img, brain = _head()
    s0, n0 = sharpness_and_noise(img, brain)
    s_blur, n_blur = sharpness_and_noise(ndi.gaussian_filter(img, 1.2), brain)
    noisy = img + np.random.default_rng(1).normal(0, 1.0, SHAPE).astype(np.float32)
    s_noise, n_noise = sharpness_and_noise(noisy, brain)
    assert s_blur < 0.8 * s0 and n_blur < n0
    assert n_noise > 1.5 * n0 and s_noise > s0


def test_axis_sharpness_sees_blur_along_one_axis():
    """Thick slices (slab average along one axis) lower the least sharp axis much more than
    the three-axis ratio; the measurement does not care which axis or which way round."""
    img, brain = _head()
    a0, (s0, _) = axis_sharpness(img, brain), sharpness_and_noise(img, brain)
    thick = ndi.uniform_filter1d(img, 4, axis=2, mode="nearest")
    a1, (s1, _) = axis_sharpness(thick, brain), sharpness_and_noise(thick, brain)
    assert a1 < 0.75 * a0
    assert math.log(a0 / a1) > 2 * math.log(s0 / s1)  # the one-axis loss is not diluted
    # the same slab along another axis, or the image flipped, reads the same
    other = ndi.uniform_filter1d(img, 4, axis=0, mode="nearest")
    assert axis_sharpness(other, brain) == pytest.approx(a1, rel=0.1)
    assert axis_sharpness(img[::-1, :, ::-1], brain[::-1, :, ::-1]) == pytest.approx(a0, rel=1e-3)
    # isotropic detail: no axis stands out, so the lowest axis is close to the three-axis ratio
    assert a0 == pytest.approx(s0, rel=0.15)
    assert math.isnan(axis_sharpness(img, np.zeros(SHAPE, bool)))
    assert math.isnan(axis_sharpness(np.zeros(SHAPE, np.float32), brain))


def test_noise_ignores_anatomical_detail_in_part_of_the_brain():
    """Fine anatomy in an outer shell (a real brain's cortical folding) leaves ``noise``
    nearly unchanged; the same noise added everywhere raises it."""
    rng = np.random.default_rng(3)
    g = np.indices(SHAPE).astype(float)
    r = np.sqrt(((g - 23.5) ** 2).sum(0))
    brain = r < 18
    flat = np.where(r < 21, 1.0, -2.0) + 0.1 * rng.normal(size=SHAPE)
    detail = rng.normal(size=SHAPE) * ((r > 13) & (r < 21))  # voxel-scale folds, outer shell
    _, n_flat = sharpness_and_noise(flat.astype(np.float32), brain)
    _, n_detail = sharpness_and_noise((flat + 0.6 * detail).astype(np.float32), brain)
    _, n_noisy = sharpness_and_noise((flat + 0.1 * rng.normal(size=SHAPE)).astype(np.float32), brain)
    assert n_detail < 1.15 * n_flat
    assert n_noisy > 1.3 * n_flat


def test_largest_component_sees_one_block_not_speckle():
    _, brain = _head()
    rng = np.random.default_rng(2)
    speckle = brain & (rng.random(SHAPE) < 0.08)
    block = brain.copy()
    block[:, :, :20] = False
    block[:, :18, :] = False
    n = int(brain.sum())
    # the same number of voxels scattered vs in one piece
    assert largest_component_fraction(speckle, n) < 0.02
    assert largest_component_fraction(block, n) > 0.2
    assert largest_component_fraction(np.zeros(SHAPE, bool), n) == 0.0


def test_signal_void_sees_a_dark_hole_not_dark_tissue_or_a_thin_cleft():
    rng = np.random.default_rng(4)
    _, brain = _head()
    mean, sd = 400.0, 100.0
    x = np.where(brain, 450.0, 20.0) + 30.0 * rng.normal(size=SHAPE)  # tissue and air
    x[brain & (np.indices(SHAPE)[0] == 24)] = 25.0  # a one-voxel dark cleft (a sulcus)
    g = np.indices(SHAPE)
    ventricle = (np.abs(g - 23.5) < 4).all(0)
    x[ventricle] = 140.0  # CSF: dark, but well above air
    z = lambda a: ((a - mean) / sd).astype(np.float32)  # noqa: E731
    assert signal_void(z(x), brain, mean, sd) == 0.0
    hole = x.copy()
    box = (g[0] >= 26) & (g[0] < 34) & (g[1] >= 14) & (g[1] < 22) & (g[2] >= 20) & (g[2] < 28)
    hole[box] = 15.0  # filled with background, as a missing chunk or a metal void
    v = signal_void(z(hole), brain, mean, sd)
    assert 0.5 * box.sum() / brain.sum() < v <= box.sum() / brain.sum()
    assert signal_void(z(x), brain, -1000.0, sd) is None  # no positive median: not a magnitude image


def test_nonuniformity_rises_with_a_bias_field():
    img, brain = _head(noise=0.2)
    ramp = np.linspace(-1.5, 1.5, SHAPE[2])[None, None, :]
    # the same image under a smooth multiplicative field, z-scored again
    biased = (img + 4.0) * np.exp(0.6 * ramp)
    biased = (biased - biased[brain].mean()) / biased[brain].std()
    flat = (img - img[brain].mean()) / img[brain].std()
    assert nonuniformity(biased, brain, voxel_mm=4.0) > 1.5 * nonuniformity(flat, brain, voxel_mm=4.0)
    assert nonuniformity(flat, np.zeros(SHAPE, bool)) is None  # no brain: not measured


def _features(img, brain, *, signal=None, final=None, bg=None, frac=0.1, err=0.2):
    return scan_features(image_head=img, brain_mask=brain, signal_mask=brain if signal is None else signal,
                         final_mask=np.zeros(SHAPE, bool) if final is None else final,
                         anomaly_fraction=frac, recon_error=err,
                         background=bg or {"available": True, "background_artifact_fraction": 0.0})


def test_scan_features_names_and_missing_values():
    img, brain = _head()
    f = _features(img, brain)
    assert set(f) == set(FEATURES)
    assert f["signal_deficit"] == 0.0 and f["anomaly_cluster_fraction"] == 0.0
    # a chunk without signal inside the expected brain
    sig = brain.copy()
    sig[:, :, 30:] = False
    f2 = _features(img, brain, signal=sig)
    raw = np.count_nonzero(brain & ~sig) / brain.sum()
    assert 0.8 * raw < f2["signal_deficit"] <= raw
    # a thin outline mismatch (a real brain vs the registered template) is not missing signal
    rim = _features(img, brain, signal=ndi.binary_erosion(brain, iterations=1))
    assert rim["signal_deficit"] == 0.0
    # unavailable background and no head image: measured as None, never guessed
    f3 = scan_features(image_head=None, brain_mask=brain, signal_mask=None, final_mask=None,
                       anomaly_fraction=float("nan"), recon_error=0.3,
                       background={"available": False, "reason": "skull-stripped"})
    assert f3["background_artifact_fraction"] is None and f3["sharpness"] is None
    assert f3["anomaly_fraction"] is None and f3["recon_error"] == 0.3


def _reference(n=20, seed=0):
    rows = []
    for i in range(n):
        img, brain = _head(seed=seed + i)
        rng = np.random.default_rng(100 + i)
        rows.append(_features(img, brain, frac=0.1 * rng.uniform(0.8, 1.25), err=0.2 * rng.uniform(0.9, 1.1)))
    return fit_reference(rows, source="test heads")


def test_clean_scans_score_low_and_each_artifact_raises_its_own_measurement():
    ref = _reference()
    img, brain = _head(seed=99)
    clean = combine(_features(img, brain, frac=0.1, err=0.2), ref)
    assert clean.qc_score < 3.0

    blurred = combine(_features(ndi.gaussian_filter(img, 1.5), brain), ref)
    assert blurred.driver in ("sharpness", "axis_sharpness", "noise") and blurred.qc_score > 5
    assert blurred.z["sharpness"] > 5  # too smooth is bad (only low sharpness counts)

    noisy = img + np.random.default_rng(5).normal(0, 1.5, SHAPE).astype(np.float32)
    q = combine(_features(noisy, brain), ref)
    assert q.qc_score > 5 and q.driver == "noise"
    assert q.z["sharpness"] < 0  # a noisy image is not "blurred"

    # a sharper image than the reference (e.g. a real scan vs template-based heads) is fine
    sharper = img + 0.5 * (img - ndi.gaussian_filter(img, 1.0))
    assert combine(_features(sharper, brain), ref).z["sharpness"] < 0

    # a lower SNR (noise floor of the background up) counts; a higher one does not
    bg = {"available": True, "background_artifact_fraction": 0.0}
    ref_snr = fit_reference([{**_features(img, brain), "snr": s} for s in np.linspace(14, 16, 10)])
    assert combine({**_features(img, brain, bg=bg), "snr": 4.0}, ref_snr).driver == "snr"
    assert combine({**_features(img, brain, bg=bg), "snr": 40.0}, ref_snr).z["snr"] < 0

    ghost = combine(_features(img, brain, bg={"available": True, "background_artifact_fraction": 0.05}), ref)
    assert ghost.driver == "background_artifact_fraction" and ghost.qc_score > 5

    sig = brain.copy()
    sig[:, :, 28:] = False
    chunk = combine(_features(img, brain, signal=sig), ref)
    assert chunk.driver == "signal_deficit" and chunk.qc_score > 5

    more_anomaly = combine(_features(img, brain, frac=0.4), ref)
    assert more_anomaly.driver == "anomaly_fraction"
    assert more_anomaly.qc_score > clean.qc_score + 3


def test_combine_is_max_of_signed_z_and_skips_missing():
    ref = {"features": {
        "up": {"median": 0.0, "scale": 1.0, "direction": "up", "transform": "identity"},
        "down": {"median": 0.0, "scale": 2.0, "direction": "down", "transform": "identity"},
        "both": {"median": 1.0, "scale": 0.5, "direction": "both", "transform": "identity"},
    }}
    q = combine({"up": -4.0, "down": -6.0, "both": 0.0}, ref)
    assert q.z == {"up": -4.0, "down": 3.0, "both": 2.0}
    assert q.qc_score == 3.0 and q.driver == "down"
    q2 = combine({"up": 1.0, "down": None, "both": None}, ref)
    assert q2.qc_score == 1.0 and q2.z["down"] is None
    assert combine({"up": None}, ref).qc_score is None
    # a log-transformed measurement of 0 (e.g. a constant image's noise) is not measurable
    logref = {"features": {"noise": {"median": 0.0, "scale": 1.0, "direction": "up", "transform": "log"},
                           "up": ref["features"]["up"]}}
    q0 = combine({"noise": 0.0, "up": 2.0}, logref)
    assert q0.z["noise"] is None and q0.qc_score == 2.0
    assert combine({"up": 1.0}, None).qc_score is None  # no reference: no score, no guess
    d = q.to_dict()
    assert d["qc_score"] == 3.0 and d["qc_score_driver"] == "down" and d["quality_z"]["both"] == 2.0
    with pytest.raises(QCScoreError, match="direction"):
        combine({"x": 1.0}, {"features": {"x": {"median": 0, "scale": 1, "direction": "sideways"}}})


def test_contributors_name_every_measurement_out_worst_first():
    """A missing piece of brain is out on the signal void, the deficit and the engine's own
    count at once: the record names all three, the engine's among them, not just the driver."""
    ref = {"features": {name: {"median": 0.0, "scale": 1.0, "direction": "up", "transform": "identity"}
                        for name in ("signal_void", "signal_deficit", "anomaly_fraction", "noise", "snr")}}
    q = combine({"signal_void": 19.9, "signal_deficit": 9.7, "anomaly_fraction": 4.5, "noise": 2.9,
                 "snr": None}, ref)
    assert q.driver == "signal_void"
    assert contributors(q.z) == [("signal_void", 19.9), ("signal_deficit", 9.7), ("anomaly_fraction", 4.5)]
    assert contributors(q.z, level=2.5)[-1] == ("noise", 2.9)
    assert q.to_dict()["qc_score_contributors"] == [
        {"measure": "signal_void", "z": 19.9}, {"measure": "signal_deficit", "z": 9.7},
        {"measure": "anomaly_fraction", "z": 4.5}]
    assert combine({"noise": 1.0}, ref).to_dict()["qc_score_contributors"] == []
    assert "anomaly_fraction" in ENGINE_MEASURES and CONTRIBUTOR_Z == 3.0


def test_fit_reference_is_robust_and_refuses_too_few_scans():
    rows = [{"recon_error": v} for v in [0.2, 0.21, 0.19, 0.2, 0.22, 0.18, 0.2, 0.21, 50.0]]
    ref = fit_reference(rows, features=["recon_error"])
    r = ref["features"]["recon_error"]
    assert r["median"] == pytest.approx(math.log(0.2), abs=1e-9)  # the outlier does not move it
    # nor the scale: the MAD of the nine is tiny, so the measurement's floor applies
    assert r["scale"] == pytest.approx(FEATURES["recon_error"].min_scale) and r["n"] == 9
    with pytest.raises(QCScoreError, match="need >= 8"):
        fit_reference(rows[:5], features=["recon_error"])
    with pytest.raises(QCScoreError, match="unknown measurement"):
        fit_reference(rows, features=["nope"])


# --------------------------------------------------------------------------- group level
def _qc(root, sub, *, fraction, qc_score=None, driver=None, site="A"):
    import json

    d = root / f"sub-{sub}" / "anat"
    d.mkdir(parents=True, exist_ok=True)
    rec = {"status": "ok", "bids_name": f"sub-{sub}_T1w", "site": site,
           "entities": {"subject": sub, "suffix": "T1w"}, "anomaly_voxels": int(fraction * 1e4),
           "anomaly_fraction": fraction, "anomaly_mm3": fraction * 8e4}
    if qc_score is not None:
        rec.update(qc_score=qc_score, qc_score_driver=driver)
    (d / f"sub-{sub}_T1w_qc.json").write_text(json.dumps(rec))


def test_group_ranks_flags_and_measures_by_qc_score(tmp_path):
    import csv

    from qc_pipeline.grouplevel import run_group

    # anomaly_fraction says sub-01 is worst; the QC score (e.g. a ghost in the background)
    # says sub-12: the group level must follow the QC score
    rng = np.random.default_rng(0)
    for k in range(1, 13):
        _qc(tmp_path, f"{k:02d}", fraction=0.30 if k == 1 else 0.1 + 0.01 * rng.random(),
            qc_score=9.0 if k == 12 else float(rng.normal(0, 1)) if k != 1 else 1.5,
            driver="background_artifact_fraction" if k == 12 else "anomaly_fraction")
    labels = {f"sub-{k:02d}_T1w": int(k == 12) for k in range(1, 13)}
    run_group(tmp_path, labels=labels, subject_reports=False)
    rows = list(csv.DictReader(open(tmp_path / "group_T1w.csv", newline="")))
    assert rows[0]["bids_name"] == "sub-12_T1w" and rows[0]["rank"] == "1"
    assert [float(r["qc_score"]) for r in rows] == sorted((float(r["qc_score"]) for r in rows), reverse=True)
    flagged = {r["bids_name"] for r in rows if r["flagged"] == "1"}
    assert flagged == {"sub-12_T1w"}
    assert "qc_score" in rows[0]["flag_reasons"] and "background_artifact_fraction" in rows[0]["flag_reasons"]
    site = next(csv.DictReader(open(tmp_path / "group_T1w_sites.csv", newline="")))
    assert float(site["AUROC"]) == 1.0 and "qc_score" in site["threshold_rule"]


def test_group_falls_back_to_anomaly_fraction_when_a_scan_lacks_qc_score(tmp_path):
    import csv

    from qc_pipeline.grouplevel import run_group

    for k in range(1, 10):
        _qc(tmp_path, f"{k:02d}", fraction=0.05 * k, qc_score=None if k == 3 else 10.0 - k)
    run_group(tmp_path, subject_reports=False)
    rows = list(csv.DictReader(open(tmp_path / "group_T1w.csv", newline="")))
    assert rows[0]["bids_name"] == "sub-09_T1w"  # highest anomaly_fraction, lowest qc_score
    site = next(csv.DictReader(open(tmp_path / "group_T1w_sites.csv", newline="")))
    assert "anomaly_fraction" in site["threshold_rule"]


def test_relative_scores_follow_the_scans_own_distribution():
    from qc_pipeline.qc.score import relative_scores

    ref = {"features": {
        "noise": {"median": 0.0, "scale": 0.05, "direction": "up", "transform": "log", "offset": 0.0},
        "sharpness": {"median": 0.5, "scale": 0.05, "direction": "down", "transform": "log", "offset": 0.0}}}
    rng = np.random.default_rng(0)
    # a site whose clean scans are all noisier and sharper than the reference scans
    feats = [{"noise": float(np.exp(1.0 + 0.03 * rng.normal())), "sharpness": float(np.exp(0.9 + 0.03 * rng.normal()))}
             for _ in range(12)]
    feats[3]["noise"] *= 1.8  # an artifact: much noisier than the site's others
    feats[7]["sharpness"] /= 1.5  # blurred relative to the site
    absolute = [combine(f, ref) for f in feats]
    assert min(q.qc_score for q in absolute) > 10  # the reference flags the whole site
    rel = relative_scores(feats, ref)
    order = np.argsort([-s for s, _ in rel])
    assert set(order[:2]) == {3, 7}
    assert rel[3][1] == "noise" and rel[7][1] == "sharpness"
    clean = [s for i, (s, _) in enumerate(rel) if i not in (3, 7)]
    assert max(clean) < 3.0 < min(rel[3][0], rel[7][0])
    # too few scans with a measurement: it is left out, not guessed
    assert relative_scores(feats[:5], ref, min_scans=8) == [(None, None)] * 5


def _write_noise_site(root, noise, ref, site="A"):
    import json

    for k, v in enumerate(noise, start=1):
        d = root / f"sub-{k:02d}" / "anat"
        d.mkdir(parents=True)
        (d / f"sub-{k:02d}_T1w_qc.json").write_text(json.dumps({
            "status": "ok", "bids_name": f"sub-{k:02d}_T1w", "site": site,
            "entities": {"subject": f"{k:02d}", "suffix": "T1w"}, "anomaly_voxels": 10,
            "anomaly_fraction": 0.1, "anomaly_mm3": 80.0,
            **combine({"noise": v}, ref).to_dict()}))


NOISE_REF = {"features": {
    "noise": {"median": 0.0, "scale": 0.05, "direction": "up", "transform": "log", "offset": 0.0}}}


def test_site_score_when_most_of_a_site_is_bad():
    """10 clean + 14 scans with the same artifact in one site: the location stays on the
    clean scans (they score low, every bad scan ranks above every clean one); the spread is
    the site's own, so the bad scans are not 8 SDs out as against the clean scans alone."""
    from qc_pipeline.qc.score import relative_scores

    rng = np.random.default_rng(3)
    noise = [float(np.exp(0.5 + 0.04 * rng.normal() + (0.8 * rng.uniform(0.7, 1.0) if k >= 10 else 0.0)))
             for k in range(24)]
    rel = [s for s, _ in relative_scores([{"noise": v} for v in noise], NOISE_REF)]
    assert max(rel[:10]) < 1.0 < 2.0 < min(rel[10:])
    assert max(rel[10:]) < 8.0


def test_site_of_different_people_flags_the_artifact_not_the_people(tmp_path):
    """Clean scans of three people whose noise levels differ by 3 and 6 reference scales (a
    site of different people or scanners) plus one artifact per person far beyond its own
    person: the group level flags the three artifacts and no clean scan. Against the good
    side alone (the lowest person's spread, the reference scale) the third person's clean
    scans would be more than 5 SDs out."""
    import csv

    from qc_pipeline.grouplevel import run_group
    from qc_pipeline.qc.score import relative_scores

    rng = np.random.default_rng(5)
    people = (0.3, 0.45, 0.6)  # log noise level of each person's clean scans
    noise, bad = [], []
    for level in people:
        noise += [float(np.exp(level + 0.02 * rng.normal())) for _ in range(8)]
        bad.append(len(noise))
        noise.append(float(np.exp(level + 1.6)))
    rel = [s for s, _ in relative_scores([{"noise": v} for v in noise], NOISE_REF)]
    clean = [s for i, s in enumerate(rel) if i not in bad]
    assert max(clean) < 5.0 < min(rel[i] for i in bad)
    lo = np.log(noise[:8])
    assert (np.log(noise[18]) - np.percentile(lo, 50)) / NOISE_REF["features"]["noise"]["scale"] > 5.0
    _write_noise_site(tmp_path, noise, NOISE_REF)
    run_group(tmp_path, subject_reports=False)
    rows = list(csv.DictReader(open(tmp_path / "group_T1w.csv", newline="")))
    assert {r["bids_name"] for r in rows if r["flagged"] == "1"} == {f"sub-{i + 1:02d}_T1w" for i in bad}
    site = next(csv.DictReader(open(tmp_path / "group_T1w_sites.csv", newline="")))
    assert "qc_score_site > 5" in site["threshold_rule"]


def test_site_score_adds_measurements_that_move_together():
    """Blur lowers sharpness and raises nothing else much; motion moves several measurements
    a little each. A scan with two measurements 4 SDs out scores above the flag cut (5),
    one with a single measurement 4 SDs out does not, and the driver is the larger one."""
    from qc_pipeline.qc.score import relative_scores

    ref = {"features": {
        "noise": {"median": 0.0, "scale": 0.05, "direction": "up", "transform": "log", "offset": 0.0},
        "sharpness": {"median": 0.5, "scale": 0.05, "direction": "down", "transform": "log", "offset": 0.0}}}
    rng = np.random.default_rng(11)
    feats = [{"noise": float(np.exp(0.2 + 0.005 * rng.normal())),
              "sharpness": float(np.exp(0.6 + 0.005 * rng.normal()))} for _ in range(16)]
    feats[4]["noise"] *= np.exp(0.2)          # one measurement 4 scales out
    feats[9]["noise"] *= np.exp(0.2)          # two: 4 and 4.4 scales out
    feats[9]["sharpness"] /= np.exp(0.22)
    rel = relative_scores(feats, ref)
    assert 3.5 < rel[4][0] < 5.0 and rel[4][1] == "noise"
    assert rel[9][0] > 5.0 and rel[9][1] == "sharpness"
    assert rel[9][0] == pytest.approx(np.hypot(4.0, 4.4), abs=0.6)  # the root of the summed squares
    assert max(s for i, (s, _) in enumerate(rel) if i not in (4, 9)) < 1.0


def test_each_scan_against_its_nearest_scans():
    """A site of two groups (two scanners, or a few people scanned many times) whose clean
    scans differ by 20 reference scales in one measurement: against the whole site the
    minority's clean scans are out; against their own group they are not, and the same value
    that is ordinary in one group is an artifact in the other."""
    from qc_pipeline.errors import QCPipelineError
    from qc_pipeline.qc.score import relative_scores, relative_z

    ref = {"features": {"x": {"median": 0.0, "scale": 0.01, "direction": "up", "transform": "identity"}}}
    rng = np.random.default_rng(0)
    a = list(0.01 * rng.normal(size=18)) + [0.2]      # group A, its last scan an artifact at B's level
    b = list(0.2 + 0.01 * rng.normal(size=8)) + [0.5]  # group B, its last scan an artifact
    feats = [{"x": float(v)} for v in a + b]
    ia, ib = range(len(a)), range(len(a), len(a) + len(b))
    whole = [s for s, _ in relative_scores(feats, ref)]
    assert min(whole[i] for i in ib[:-1]) > 5  # the minority's clean scans, against the whole site
    own = [[j for j in (ia if i in ia else ib) if j != i] for i in range(len(feats))]
    near = [s for s, _ in relative_scores(feats, ref, neighbours=own)]
    assert max(near[i] for i in list(ia[:-1]) + list(ib[:-1])) < 4
    assert near[ia[-1]] > 10 and near[ib[-1]] > 10  # both artifacts, the one at B's level too
    # every scan's neighbours being all the others is the whole site
    allothers = [[j for j in range(len(feats)) if j != i] for i in range(len(feats))]
    assert np.allclose(whole, [s for s, _ in relative_scores(feats, ref, neighbours=allothers)])
    # a neighbourhood too small for a measurement takes the whole site's location and scale
    few = [None if i in ib else own[i][:3] for i in range(len(feats))]
    z = relative_z(feats, ref, neighbours=few)
    assert [d["x"] for d in z] == pytest.approx([d["x"] for d in relative_z(feats, ref)])
    with pytest.raises(QCPipelineError, match="neighbours has"):
        relative_scores(feats, ref, neighbours=own[:3])
    with pytest.raises(QCPipelineError, match="index"):
        relative_scores(feats, ref, neighbours=[[len(feats)]] * len(feats))


def test_a_small_neighbourhood_never_makes_a_tighter_spread_than_the_sites_usual():
    """One population, each scan against 8 random others: a neighbourhood whose values happen
    to lie close together would give a small scale and large z's; the scale is at least the
    median of the neighbourhoods' scales, so the clean scans' z's stay about as against the
    whole site."""
    from qc_pipeline.qc.score import relative_z

    ref = {"features": {"x": {"median": 0.0, "scale": 1e-4, "direction": "up", "transform": "identity"}}}
    rng = np.random.default_rng(3)
    feats = [{"x": float(v)} for v in rng.normal(size=60)]
    nbs = [list(rng.choice([j for j in range(60) if j != i], 8, replace=False)) for i in range(60)]
    whole = np.array([d["x"] for d in relative_z(feats, ref)])
    near = np.array([d["x"] for d in relative_z(feats, ref, neighbours=nbs)])
    assert near.max() < 1.5 * whole.max()
    assert np.percentile(near, 90) < 1.5 * np.percentile(whole, 90)


def test_relative_scores_both_directions_and_missing_values():
    from qc_pipeline.qc.score import relative_scores

    ref = {"features": {"x": {"median": 0.0, "scale": 0.1, "direction": "both", "transform": "identity"}}}
    vals = [0.0, 0.05, -0.05, 0.02, -0.02, 0.01, -0.01, 0.03, 1.0, -1.0, None]
    rel = relative_scores([{"x": v} for v in vals], ref)
    assert rel[8][0] > 5 and rel[9][0] > 5  # too high and too low both count
    assert max(s for s, _ in rel[:8]) < 1.0
    assert rel[10] == (None, None)  # not measured: no score, no guess


def test_group_scores_each_site_against_itself(tmp_path):
    import csv
    import json

    from qc_pipeline.grouplevel import run_group

    ref = {"noise": {"median": 0.0, "scale": 0.05, "direction": "up", "transform": "log", "offset": 0.0}}
    rng = np.random.default_rng(1)
    bad = {"A": "03", "B": "14"}
    for k in range(1, 21):
        site = "A" if k <= 10 else "B"
        shift = 0.0 if site == "A" else 1.0  # site B: another scanner, all scans noisier
        noise = float(np.exp(shift + 0.03 * rng.normal() + (0.6 if f"{k:02d}" in bad.values() else 0)))
        q = combine({"noise": noise}, {"features": ref}).to_dict()
        d = tmp_path / f"sub-{k:02d}" / "anat"
        d.mkdir(parents=True)
        (d / f"sub-{k:02d}_T1w_qc.json").write_text(json.dumps({
            "status": "ok", "bids_name": f"sub-{k:02d}_T1w", "site": site,
            "entities": {"subject": f"{k:02d}", "suffix": "T1w"}, "anomaly_voxels": 10,
            "anomaly_fraction": 0.1, "anomaly_mm3": 80.0, **q}))
    run_group(tmp_path, labels={f"sub-{k:02d}_T1w": int(f"{k:02d}" in bad.values()) for k in range(1, 21)})
    rows = list(csv.DictReader(open(tmp_path / "group_T1w.csv", newline="")))
    # against the reference every site-B scan outscores site A's artifact ...
    by = {r["bids_name"]: r for r in rows}
    assert all(float(by[f"sub-{k:02d}_T1w"]["qc_score"]) > float(by["sub-03_T1w"]["qc_score"])
               for k in range(11, 21))
    # ... against its own site each artifact scan tops its site and only they are flagged
    assert {r["bids_name"] for r in rows[:2]} == {"sub-03_T1w", "sub-14_T1w"}
    assert {r["bids_name"] for r in rows if r["flagged"] == "1"} == {"sub-03_T1w", "sub-14_T1w"}
    assert rows[0]["qc_score_site_driver"] == "noise"
    assert rows[0]["qc_score_site_contributors"].startswith("noise (") and rows[0]["qc_score_contributors"]
    assert all(r["qc_score_site_contributors"] == "" for r in rows if r["flagged"] != "1")
    sites = {r["site"]: r for r in csv.DictReader(open(tmp_path / "group_T1w_sites.csv", newline=""))}
    assert float(sites["ALL_SITES"]["AUROC"]) == 1.0 and "qc_score_site" in sites["A"]["threshold_rule"]
    # the subject page leads with the number the group ranks by: the score against its site
    page = (tmp_path / "sub-03.html").read_text()
    shown = re.search(r'class="verdict-score">QC score <b>([-0-9.]+)</b>', page)
    assert shown and float(shown.group(1)) == pytest.approx(float(by["sub-03_T1w"]["qc_score_site"]), rel=5e-3)  # num(3): three figures
    assert "driven by <code>noise</code>" in page and "in site A" in page


def test_itermask_interface_writes_quality_and_survives_a_failing_measurement(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import qc_pipeline.qc.score as qcscore
    from qc_pipeline.calibrate import write_card_reference
    from qc_pipeline.engine import make_random_model_folder
    from qc_pipeline.screening import clear_model_cache
    from qc_pipeline.workflows import interfaces
    from qc_pipeline.workflows.interfaces import IterMaskRun

    model = make_random_model_folder(tmp_path / "m", grid=(32, 32, 32), voxel_size=(2, 2, 2), seed=0)
    img, brain = _head()
    img, brain = img[8:40, 8:40, 8:40], brain[8:40, 8:40, 8:40]
    prep = SimpleNamespace(image=np.where(brain, img, 0).astype(np.float32), brain_mask=brain,
                           signal_brain_mask=brain, head_image=img,
                           info=SimpleNamespace(voxel_size=(2.0, 2.0, 2.0),
                                                background={"available": True, "snr": 12.0,
                                                            "background_artifact_fraction": 0.0}))
    # a stand-in for the preprocessing node's record: only what the engine and the score read
    rec = tmp_path / "preproc.npz"
    rec.write_bytes(b"")
    monkeypatch.setattr(interfaces, "read_node_record", lambda path: prep)
    write_card_reference(model, _reference())

    def run(cwd):
        cwd.mkdir()
        clear_model_cache()
        res = IterMaskRun(in_file=str(rec), model_dir=str(model)).run(cwd=str(cwd))
        return res.outputs

    out = run(tmp_path / "a")
    assert out.error == "" and out.out_file
    q = out.quality
    assert q["qc_score"] is not None and q["qc_score_driver"] in FEATURES
    assert q["quality_features"]["snr"] == 12.0 and set(q["qc_score_reference"]) <= set(FEATURES)

    def boom(*a, **k):
        raise RuntimeError("measurement exploded")

    monkeypatch.setattr(qcscore, "scan_quality", boom)
    out = run(tmp_path / "b")
    assert out.error == "" and out.out_file and out.quality == {}  # the scan still has its score


def test_site_score_finds_blur_when_noisy_scans_look_sharper():
    """Sharpness is a "down" measurement, but noise-like artifacts make a scan look sharper:
    three such scans on the good side must not widen the clean spread so much that a blurred
    scan (12 % less sharp) hides among the clean ones."""
    from qc_pipeline.qc.score import relative_scores

    ref = {"features": {"sharpness": {"median": 0.85, "scale": 0.02, "direction": "down",
                                      "transform": "log", "offset": 0.0}}}
    rng = np.random.default_rng(7)
    sharp = [float(np.exp(0.85 + 0.01 * rng.normal())) for _ in range(12)]
    sharp += [float(np.exp(1.15 + 0.05 * rng.normal())) for _ in range(3)]  # noisy: "too sharp"
    sharp.append(float(np.exp(0.85 - 0.13)))  # blurred
    rel = [s for s, _ in relative_scores([{"sharpness": v} for v in sharp], ref)]
    assert rel[-1] > 5.0
    assert max(rel[:15]) < 3.0


def test_group_reasons_name_every_measurement_out_against_the_site(tmp_path):
    """The group table says which measurements put a flagged scan out, the driver first."""
    import csv
    import json

    from qc_pipeline.grouplevel import run_group

    ref = {"noise": {"median": 0.0, "scale": 0.05, "direction": "up", "transform": "log", "offset": 0.0},
           "anomaly_fraction": {"median": -4.0, "scale": 0.3, "direction": "up", "transform": "log",
                                "offset": 0.01}}
    rng = np.random.default_rng(3)
    for k in range(1, 13):
        bad = k == 5
        feats = {"noise": float(np.exp(0.03 * rng.normal() + (0.8 if bad else 0.0))),
                 "anomaly_fraction": float(np.exp(-4.6 + 0.05 * rng.normal())) + (0.2 if bad else 0.0)}
        q = combine(feats, {"features": ref}).to_dict()
        d = tmp_path / f"sub-{k:02d}" / "anat"
        d.mkdir(parents=True)
        (d / f"sub-{k:02d}_T1w_qc.json").write_text(json.dumps({
            "status": "ok", "bids_name": f"sub-{k:02d}_T1w", "site": "A",
            "entities": {"subject": f"{k:02d}", "suffix": "T1w"}, "anomaly_voxels": 10,
            "anomaly_fraction": feats["anomaly_fraction"], "anomaly_mm3": 80.0, **q}))
    run_group(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "group_T1w.csv", newline="")))
    top = rows[0]
    assert top["bids_name"] == "sub-05_T1w" and top["flagged"] == "1"
    names = [c.split(" (")[0] for c in top["qc_score_site_contributors"].split("; ")]
    assert names[0] == top["qc_score_site_driver"] and set(names) == {"noise", "anomaly_fraction"}
    other = ({"noise", "anomaly_fraction"} - {top["qc_score_site_driver"]}).pop()
    assert f"driven by {top['qc_score_site_driver']}; also out: {other}" in top["flag_reasons"]
    # the group page's "why" column: the driver, how many more are out, all of them on hover
    page = (tmp_path / "group_T1w.html").read_text()
    row = page[page.index('id="row-scan-sub-05_T1w"'):]
    row = row[:row.index("</tr>")]
    assert "+1 more out" in row and f'title="out (robust z): {top["qc_score_site_contributors"]}"' in row
    # the subject page's verdict gives both reasons, the driver first
    from qc_pipeline.reports.pages import describe_measure

    why = re.search(r'class="verdict-why">([^<]*)<', (tmp_path / "sub-05.html").read_text()).group(1)
    words = [describe_measure(top["qc_score_site_driver"]), describe_measure(other)]
    assert all(w in why for w in words) and why.index(words[0]) < why.index(words[1])
