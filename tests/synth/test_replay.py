"""Artifacts as a random draw plus a deterministic apply: replayable from the params alone,
from an image's extra and from a cohort's labels TSV."""
import json

import nibabel as nib
import numpy as np
import pytest

from qc_pipeline.synth import (ARTIFACTS, SynthError, apply_artifact, draw_artifact_params,
                               finalize_dtype, make_subject, read_labels, replay_artifact,
                               write_cohort)


def _meta_kw(name, meta):
    return {"meta": meta} if ARTIFACTS[name].needs_meta else {}


def _same_image(a, b):
    assert a.shape == b.shape
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert np.array_equal(a.affine, b.affine)


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_draw_then_replay_is_apply_artifact(small_subject, name):
    img, meta = small_subject
    kw = _meta_kw(name, meta)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    direct = apply_artifact(img, name, 0.7, rng_a, **kw)
    params = draw_artifact_params(img, name, 0.7, rng_b, **kw)
    # the draw consumes the generator as the whole simulation does (callers reuse it)
    assert rng_a.bit_generator.state == rng_b.bit_generator.state
    # plain JSON, every key the apply step reads, and the severity
    assert json.loads(json.dumps(params)) == params
    assert {"severity", *ARTIFACTS[name].param_keys} <= set(params)
    assert params["severity"] == 0.7
    replayed = replay_artifact(img, name, params, **kw)
    _same_image(direct, replayed)
    assert direct.extra["artifact"] == params == replayed.extra["artifact"]
    # the output's extra is enough to replay it
    _same_image(direct, replay_artifact(img, name, direct.extra["artifact"], **kw))


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_replay_uses_no_randomness(small_subject, name):
    import torch

    img, meta = small_subject
    kw = _meta_kw(name, meta)
    params = draw_artifact_params(img, name, 0.6, 3, **kw)
    np.random.seed(1)
    torch.manual_seed(1)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first = replay_artifact(img, name, params, **kw)
    # no global generator was read (advanced) by the replay
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.random.seed(2)
    torch.manual_seed(2)
    np.random.random(10)
    torch.rand(10)
    _same_image(first, replay_artifact(img, name, params, **kw))
    # the keys declared for the apply step are all it reads
    needed = {k: params[k] for k in ("severity", *ARTIFACTS[name].param_keys)}
    _same_image(first, replay_artifact(img, name, needed, **kw))


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_params_missing_a_key_name_it(small_subject, name):
    img, meta = small_subject
    kw = _meta_kw(name, meta)
    params = draw_artifact_params(img, name, 0.5, 0, **kw)
    for key in ("severity", *ARTIFACTS[name].param_keys):
        bad = {k: v for k, v in params.items() if k != key}
        with pytest.raises(SynthError, match=f"lack '{key}'"):
            replay_artifact(img, name, bad, **kw)


def test_bad_params_values(small_subject):
    img, _ = small_subject
    with pytest.raises(SynthError, match="must be a dict"):
        replay_artifact(img, "blur", [0.5])
    params = draw_artifact_params(img, "chunk_middle", 0.5, 0)
    with pytest.raises(SynthError, match="box_world_lo.*3 numbers"):
        replay_artifact(img, "chunk_middle", {**params, "box_world_lo": [0.0, 1.0]})
    with pytest.raises(SynthError, match="severity"):
        replay_artifact(img, "chunk_middle", {**params, "severity": 2.0})
    params = draw_artifact_params(img, "ghosting", 0.5, 0)
    with pytest.raises(SynthError, match="phase_axis.*0, 1 or 2"):
        replay_artifact(img, "ghosting", {**params, "phase_axis": 3})
    params = draw_artifact_params(img, "kspace_noise", 0.5, 0)
    with pytest.raises(SynthError, match="noise_state"):
        replay_artifact(img, "kspace_noise", {**params, "noise_state": {"bit_generator": "nope"}})
    params = draw_artifact_params(img, "wrap_around", 0.5, 0)
    with pytest.raises(SynthError, match="drawn for"):
        replay_artifact(img, "wrap_around", {**params, "old_n": params["old_n"] + 1})


def test_cohort_scans_replay_from_the_labels_tsv(tmp_path):
    """Re-make each artifact scan from its TSV row: the clean subject from the seed, the
    artifact from ``artifact_params``; the voxels are those of the written NIfTI. The other
    readers of the file (the labels module, training's exclusion list) still read it."""
    from qc_pipeline.engine.train_cli import _excluded
    from qc_pipeline.io import atomic_write_nifti
    from qc_pipeline.labels import load_labels

    work = dict(work_mm=4.0, voxel_size=3.0, max_voxels=3e5)
    root = write_cohort(tmp_path / "ds", 1, contrasts="T1w,T2w", seed=3,
                        artifacts="kspace_noise,different_sequence", artifact_fraction=1.0, **work)
    tsv = root / "sourcedata" / "qc_labels.tsv"
    rows = read_labels(tsv)
    assert {r["artifact"] for r in rows} == {"kspace_noise", "different_sequence"}
    site = (root / "participants.tsv").read_text().splitlines()[1].split("\t")[1]
    for r in rows:
        suffix = r["bids_name"].rsplit("_", 1)[1]
        params = r["artifact_params"]
        assert isinstance(params, dict) and params["severity"] == pytest.approx(r["severity"], abs=5e-4)
        clean, meta = make_subject(r["seed"], suffix, site=site, finalize=False, **work)
        again = finalize_dtype(replay_artifact(clean, r["artifact"], params, meta=meta), meta["dtype"])
        # saved as the writer saves (nibabel picks the int16 scaling when it writes)
        atomic_write_nifti(again, tmp_path / f"{r['bids_name']}.nii.gz")
        written = nib.load(str(root / "sub-01" / "anat" / f"{r['bids_name']}.nii.gz"))
        _same_image(written, nib.load(str(tmp_path / f"{r['bids_name']}.nii.gz")))
    assert load_labels(tsv) == {r["bids_name"]: 1 for r in rows}
    assert _excluded(root, None) == {r["bids_name"] for r in rows}


def test_read_labels_without_params_column_and_bad_params(tmp_path):
    old = tmp_path / "old.tsv"
    old.write_text("bids_name\tlabel\tartifact\tseverity\tseed\nsub-01_T1w\t1\tblur\t0.500\t7\n")
    assert read_labels(old)[0]["artifact_params"] == {}
    bad = tmp_path / "bad.tsv"
    bad.write_text("bids_name\tlabel\tartifact\tseverity\tseed\tartifact_params\n"
                   "sub-01_T1w\t0\tnone\t0\t7\t\nsub-02_T1w\t1\tblur\t0.500\t7\t[1, 2]\n")
    with pytest.raises(SynthError, match="row 3: artifact_params must be a JSON object"):
        read_labels(bad)
