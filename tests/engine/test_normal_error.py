"""The model's normal-error map: the engine's mask kept where the error beats every brain's."""
import json

import nibabel as nib
import numpy as np
import pytest

from engine_testlib import SHAPE, Oracle, sphere
from qc_pipeline.engine import IterMask3D, ModelCardError, default_card
from qc_pipeline.engine.modelio import (CARD_NAME, load_normal_error, load_normal_error_spread, model_content_key,
                                       save_normal_error)
from qc_pipeline.sitenorm import SiteNormError, normal_error_mask, template_grid

COMMON = (14, 20, 20)     # where the network errs on every brain (the "ventricles")
ARTIFACT = (26, 20, 20)   # this scan's own artifact
GRID_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
GRID_AFFINE[:3, 3] = [-40.0, -50.0, -30.0]   # the 40^3 grid sits inside the MNI template, in MNI mm
IDENTITY = np.eye(4)                          # template fit: the scan is in MNI space already


def _normal_error_on_template(level: float) -> np.ndarray:
    """``level`` around COMMON's position (in MNI mm), a low floor elsewhere."""
    shape, t_aff = template_grid()
    world = GRID_AFFINE[:3, :3] @ np.asarray(COMMON, float) + GRID_AFFINE[:3, 3]
    centre = np.linalg.solve(t_aff[:3, :3], world - t_aff[:3, 3])
    out = np.full(shape, 0.01, np.float32)
    out[sphere(shape, centre, 5)] = level
    return out


def _scan(brain_volume):
    clean, brain = brain_volume
    common = sphere(SHAPE, COMMON, 4) & brain
    artifact = sphere(SHAPE, ARTIFACT, 4) & brain
    x = clean + 3.0 * common + 3.0 * artifact
    return clean, brain, x, common, artifact


def _model(oracle, normal_error=None, factor=3.0):
    card = {**default_card(SHAPE), "schedule": "normative", "normative": {"threshold": 1.0}}
    m = IterMask3D(oracle, card, device="cpu")
    m.normal_error, m.normal_error_factor = normal_error, factor
    return m


def _against(model, raw):
    """``raw`` against ``model``'s normal error, the scan already in MNI space."""
    return model.against_normal_error(raw, grid_affine=GRID_AFFINE, template_to_world=IDENTITY)


def test_the_map_removes_what_every_brain_shares_and_keeps_the_artifact(brain_volume):
    clean, brain, x, common, artifact = _scan(brain_volume)
    model = _model(Oracle(clean, x), _normal_error_on_template(level=20.0))
    raw = model.run(x, brain, seed=0)
    assert raw.mask[common].mean() > 0.8 and raw.mask[artifact].mean() > 0.8
    res = _against(model, raw)
    assert res.mask[artifact].mean() > 0.8 and not res.mask[common].any()
    assert not (res.mask & ~raw.mask).any()  # it only ever removes voxels
    assert res.anomaly_voxels == int(res.mask.sum()) < raw.anomaly_voxels
    assert res.anomaly_fraction == pytest.approx(res.anomaly_voxels / brain.sum())
    assert res.anomaly_mm3 == pytest.approx(8.0 * res.anomaly_voxels)
    d = res.to_dict()
    assert d["raw_anomaly_voxels"] == raw.anomaly_voxels and d["normal_error"] == {"applied": True, "factor": 3.0}
    # a map that is low everywhere keeps the whole raw mask
    flat = _model(Oracle(clean, x), np.full(template_grid()[0], 1e-3, np.float32))
    low = _against(flat, raw)
    assert low.anomaly_voxels == raw.anomaly_voxels


def test_without_a_map_or_a_template_fit_the_mask_stays_and_says_why(brain_volume):
    clean, brain, x, _, _ = _scan(brain_volume)
    raw = _model(Oracle(clean, x)).run(x, brain, seed=0)
    a = _against(_model(Oracle(clean, x)), raw)
    assert a.anomaly_voxels == raw.anomaly_voxels and a.normal_error["applied"] is False
    assert "no normal-error map" in a.normal_error["reason"] and a.raw_anomaly_voxels is None
    b = _model(Oracle(clean, x), _normal_error_on_template(20.0)).against_normal_error(
        raw, grid_affine=GRID_AFFINE, template_to_world=None)
    assert b.anomaly_voxels == raw.anomaly_voxels and "no template fit" in b.normal_error["reason"]


def test_a_map_on_another_grid_is_named():
    with pytest.raises(SiteNormError, match="template grid"):
        normal_error_mask(np.zeros(SHAPE), np.zeros(SHAPE, bool), np.zeros((10, 10, 10)),
                          grid_affine=GRID_AFFINE, template_to_world=IDENTITY, factor=3.0)


def test_the_model_folder_carries_the_map(random_model):
    shape, t_aff = template_grid()
    assert load_normal_error(random_model, json.loads((random_model / CARD_NAME).read_text())) == (None, None)
    vol = _normal_error_on_template(2.0)
    save_normal_error(random_model, vol, t_aff, {"factor": 4.0, "n_scans": 3})
    model = IterMask3D.from_folder(random_model, device="cpu")
    assert model.normal_error_factor == 4.0 and model.normal_error.shape == shape
    assert np.allclose(model.normal_error, vol)
    card = json.loads((random_model / CARD_NAME).read_text())
    assert card["normal_error"] == {"factor": 4.0, "n_scans": 3, "file": "normal_error.nii.gz"}


@pytest.mark.parametrize("damage, message", [
    ("missing", "cannot be read"),
    ("factor", "factor must be a positive number"),
    ("nan", "finite, non-negative"),
])
def test_a_broken_map_is_a_card_error_naming_it(random_model, damage, message):
    shape, t_aff = template_grid()
    save_normal_error(random_model, np.ones(shape, np.float32), t_aff, {"factor": 4.0})
    card = json.loads((random_model / CARD_NAME).read_text())
    if damage == "missing":
        (random_model / "normal_error.nii.gz").unlink()
    elif damage == "factor":
        card["normal_error"]["factor"] = -1
    else:
        bad = np.ones(shape, np.float32)
        bad[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(bad, t_aff), str(random_model / "normal_error.nii.gz"))
    with pytest.raises(ModelCardError, match=message):
        load_normal_error(random_model, card)


def _spread_on_template(level: float) -> np.ndarray:
    """The normal heads' spread: ``level`` where COMMON lies (people differ there), 0 elsewhere."""
    return np.where(_normal_error_on_template(1.0) == 1.0, np.float32(level), np.float32(0.0))


def test_the_spread_keeps_where_people_differ_out_of_the_mask(brain_volume):
    clean, brain, x, common, artifact = _scan(brain_volume)
    # the median normal error is low everywhere: one person's large error at COMMON passes it ...
    low_median = np.full(template_grid()[0], 1e-3, np.float32)
    plain = _model(Oracle(clean, x), low_median)
    raw = plain.run(x, brain, seed=0)
    without = _against(plain, raw)
    assert without.mask[common].mean() > 0.8
    # ... but normal heads differ widely there, so with their spread it is not an anomaly
    model = _model(Oracle(clean, x), low_median)
    model.normal_error_spread, model.normal_error_spread_k = _spread_on_template(5.0), 5.0
    res = _against(model, raw)
    assert not res.mask[common].any() and res.mask[artifact].mean() > 0.8
    assert res.normal_error == {"applied": True, "factor": 3.0, "spread_k": 5.0}
    # the mask before the spread rule travels with it (the group level starts from it)
    assert np.array_equal(res.candidate_mask, without.mask) and without.candidate_mask is None
    assert res.to_dict()["candidate_anomaly_voxels"] == without.anomaly_voxels
    assert without.to_dict()["candidate_anomaly_voxels"] is None
    # k = 0: the spread asks for nothing beyond the median
    model.normal_error_spread_k = 0.0
    zero = _against(model, raw)
    assert zero.anomaly_voxels == without.anomaly_voxels


def test_the_model_folder_carries_the_spread_and_drops_it_when_rebuilt_without(random_model):
    shape, t_aff = template_grid()
    spread = _spread_on_template(2.0)
    save_normal_error(random_model, _normal_error_on_template(2.0), t_aff, {"factor": 4.0, "spread_k": 5.0},
                      spread_t=spread)
    model = IterMask3D.from_folder(random_model, device="cpu")
    assert model.normal_error_spread_k == 5.0 and np.allclose(model.normal_error_spread, spread)
    card = json.loads((random_model / CARD_NAME).read_text())
    assert card["normal_error"]["spread_file"] == "normal_error_spread.nii.gz"
    save_normal_error(random_model, _normal_error_on_template(2.0), t_aff, {"factor": 4.0, "spread_k": 5.0})
    card = json.loads((random_model / CARD_NAME).read_text())
    assert "spread_file" not in card["normal_error"] and "spread_k" not in card["normal_error"]
    assert not (random_model / "normal_error_spread.nii.gz").exists()
    assert load_normal_error_spread(random_model, card) == (None, None)


@pytest.mark.parametrize("damage, message", [
    ("missing", "spread map normal_error_spread.nii.gz, which cannot be read"),
    ("k", "spread_k must be a number >= 0"),
])
def test_a_broken_spread_is_a_card_error_naming_it(random_model, damage, message):
    shape, t_aff = template_grid()
    save_normal_error(random_model, np.ones(shape, np.float32), t_aff, {"factor": 4.0, "spread_k": 5.0},
                      spread_t=np.ones(shape, np.float32))
    card = json.loads((random_model / CARD_NAME).read_text())
    if damage == "missing":
        (random_model / "normal_error_spread.nii.gz").unlink()
    else:
        card["normal_error"]["spread_k"] = "lots"
    with pytest.raises(ModelCardError, match=message):
        load_normal_error_spread(random_model, card)


def test_the_content_key_follows_the_card_the_weights_and_the_maps(random_model):
    import torch

    shape, t_aff = template_grid()
    key0 = model_content_key(random_model)
    assert model_content_key(random_model) == key0 and len(key0) == 16
    # a map, its spread, then another map under the same id: a new key each time
    save_normal_error(random_model, _normal_error_on_template(2.0), t_aff, {"factor": 4.0})
    key1 = model_content_key(random_model)
    save_normal_error(random_model, _normal_error_on_template(2.0), t_aff, {"factor": 4.0, "spread_k": 5.0},
                      spread_t=_spread_on_template(2.0))
    key2 = model_content_key(random_model)
    save_normal_error(random_model, _normal_error_on_template(3.0), t_aff, {"factor": 4.0, "spread_k": 5.0},
                      spread_t=_spread_on_template(2.0))
    key3 = model_content_key(random_model)
    # weights replaced in place, card untouched
    sd = torch.load(random_model / "weights.pt", weights_only=True)
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = sd[name] + 0.01
    torch.save(sd, random_model / "weights.pt")
    key4 = model_content_key(random_model)
    assert json.loads((random_model / CARD_NAME).read_text())["model_id"]
    assert len({key0, key1, key2, key3, key4}) == 5
    # a file the card does not name is not part of the model
    (random_model / "notes.txt").write_text("scratch")
    assert model_content_key(random_model) == key4


def test_the_opening_drops_the_specks_a_normal_brain_leaves_and_keeps_the_artifact(brain_volume):
    clean, brain, _, _, artifact = _scan(brain_volume)
    # one-voxel specks of high error scattered over the brain (a normal brain's residue),
    # and the artifact: a body the opening's ball fits in
    rng = np.random.default_rng(0)
    specks = np.zeros(SHAPE, bool)
    idx = np.argwhere(brain & ~sphere(SHAPE, ARTIFACT, 7))
    for i, j, k in idx[rng.choice(len(idx), 40, replace=False)]:
        specks[i, j, k] = True
    x = clean + 3.0 * artifact + 3.0 * specks
    low = np.full(template_grid()[0], 1e-3, np.float32)
    plain = _model(Oracle(clean, x), low)
    raw = plain.run(x, brain, seed=0)
    without = _against(plain, raw)
    assert without.mask[specks].mean() > 0.8
    opened = _model(Oracle(clean, x), low)
    opened.normal_error_open = 1
    res = _against(opened, raw)
    assert not res.mask[specks].any()
    assert res.mask[artifact].mean() > 0.8
    assert not (res.mask & ~without.mask).any()   # the opening only ever removes voxels
    assert res.anomaly_voxels == int(res.mask.sum()) < without.anomaly_voxels
    assert res.normal_error == {"applied": True, "factor": 3.0, "open_vox": 1}


def test_the_card_names_the_opening_and_a_bad_one_is_a_card_error(random_model):
    from qc_pipeline.engine.modelio import load_normal_error_opening

    shape, t_aff = template_grid()
    save_normal_error(random_model, np.ones(shape, np.float32), t_aff, {"factor": 4.0, "open_vox": 1})
    assert IterMask3D.from_folder(random_model, device="cpu").normal_error_open == 1
    card = json.loads((random_model / CARD_NAME).read_text())
    del card["normal_error"]["open_vox"]
    assert load_normal_error_opening(random_model, card) == 0   # older folders: no opening
    for bad in (-1, 1.5, "one", True):
        card["normal_error"]["open_vox"] = bad
        with pytest.raises(ModelCardError, match=r"normal_error.open_vox must be a whole number >= 0, got"):
            load_normal_error_opening(random_model, card)
