"""train_model: loss goes down, checkpoints resume, model folder loads."""
import logging

import numpy as np
import pytest

from engine_testlib import textured_volume
from qc_pipeline.engine import IterMask3D, load_model_card, train_model

SHAPE = (24, 24, 24)


@pytest.fixture(scope="module")
def pairs():
    return [textured_volume(SHAPE, seed=s)[::1] for s in range(3)]


def test_loss_decreases_and_folder_loads(pairs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qc_pipeline.engine.training")
    out = train_model(pairs, tmp_path / "m", steps=40, batch_size=2, lr=3e-3, seed=0,
                      features=(4, 8), log_every=10, device="cpu")
    losses = out["losses"]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:4])
    assert any("step 40/40" in r.getMessage() for r in caplog.records)
    card = load_model_card(tmp_path / "m")
    assert card["training"]["steps"] == 40 and card["training"]["subjects"] == 3
    assert card["grid"] == list(SHAPE) and card["params"] > 0 and card["macs_per_pass"] > 0
    model = IterMask3D.from_folder(tmp_path / "m", device="cpu")
    img, brain = pairs[0]
    res = model.run(img, brain, schedule="fast")
    assert res.forward_passes > 0


def test_model_files_follow_the_umask(pairs, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        train_model(pairs, tmp_path / "m", steps=2, batch_size=1, seed=0, features=(4, 8), device="cpu",
                    patch=16, checkpoint_every=1)
    finally:
        os.umask(old)
    for name in ("weights.pt", "model_card.json", "checkpoint.pt"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644, name


def test_resume_continues_from_checkpoint(pairs, tmp_path):
    first = train_model(pairs, tmp_path / "r", steps=4, batch_size=1, seed=1, features=(4, 8),
                        checkpoint_every=2, device="cpu", patch=16)
    assert first["start_step"] == 0 and len(first["losses"]) == 4
    second = train_model(pairs, tmp_path / "r", steps=6, batch_size=1, seed=1, features=(4, 8),
                         checkpoint_every=2, device="cpu", patch=16)
    assert second["start_step"] == 4 and len(second["losses"]) == 6
    assert second["losses"][:4] == first["losses"]
    # an uninterrupted 6-step run draws the same masks and gives the same losses
    straight = train_model(pairs, tmp_path / "s", steps=6, batch_size=1, seed=1, features=(4, 8),
                           checkpoint_every=2, device="cpu", patch=16)
    np.testing.assert_allclose(straight["losses"], second["losses"], rtol=1e-4)
    fresh = train_model(pairs, tmp_path / "r", steps=6, batch_size=1, seed=1, features=(4, 8),
                        device="cpu", patch=16, resume=False)
    assert fresh["start_step"] == 0


def test_init_from_starts_at_the_source_weights_and_is_recorded(pairs, tmp_path):
    import torch

    from qc_pipeline.engine.training import InvalidInputError

    src = train_model(pairs, tmp_path / "src", steps=30, batch_size=2, lr=3e-3, seed=0,
                      features=(4, 8), device="cpu", patch=16)
    scratch = train_model(pairs, tmp_path / "scratch", steps=3, batch_size=2, lr=1e-6, seed=5,
                          features=(4, 8), device="cpu", patch=16)
    tuned = train_model(pairs, tmp_path / "tuned", steps=3, batch_size=2, lr=1e-6, seed=5,
                        features=(4, 8), device="cpu", patch=16, init_from=tmp_path / "src")
    # a near-zero learning rate keeps the source weights: the fine-tuned run starts where the
    # source ended, far below a fresh network's loss
    assert np.mean(tuned["losses"]) < 0.8 * np.mean(scratch["losses"])
    w_src = torch.load(tmp_path / "src" / "weights.pt", weights_only=True)
    w_tuned = torch.load(tmp_path / "tuned" / "weights.pt", weights_only=True)
    k = next(k for k in w_src if k.endswith("weight"))
    torch.testing.assert_close(w_tuned[k], w_src[k], atol=1e-3, rtol=0)
    info = load_model_card(tmp_path / "tuned")["training"]["init_from"]
    assert info["model_id"] == load_model_card(src["model_dir"])["model_id"]
    with pytest.raises(InvalidInputError, match="differs"):
        train_model(pairs, tmp_path / "bad", steps=1, features=(4, 8, 16), device="cpu",
                    patch=16, init_from=tmp_path / "src")


def test_trimmed_loss_leaves_out_the_worst_brain_voxels_of_each_volume():
    import torch

    from qc_pipeline.engine.training import _untrimmed

    sq = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 1, 10)
    brain = torch.zeros(2, 1, 10, dtype=torch.bool)
    brain[:, :, :8] = True  # voxels 8 and 9 are outside the brain: never trimmed
    keep = _untrimmed(sq, brain, 0.25)  # 2 of 8 brain voxels per volume
    for b in range(2):
        assert keep[b, 0].tolist() == [1.0] * 6 + [0.0, 0.0] + [1.0, 1.0]


def test_trim_keeps_a_planted_blob_out_of_what_is_learned(pairs, tmp_path):
    # one training volume carries a bright blob; with the trimmed loss the blob is not
    # learned as normal, so its reconstruction error stays higher than without trimming
    blob = [(img.copy(), bm) for img, bm in pairs]
    blob[0][0][8:14, 8:14, 8:14] += 4.0
    errs = {}
    for trim in (0.0, 0.05):
        train_model(blob, tmp_path / f"t{trim}", steps=60, batch_size=1, lr=3e-3, seed=0, features=(4, 8),
                    device="cpu", trim=trim)
        card = load_model_card(tmp_path / f"t{trim}")
        assert ("worst 5 %" in card["training"]["loss"]) == (trim > 0)
        model = IterMask3D.from_folder(tmp_path / f"t{trim}", device="cpu")
        res = model.run(blob[0][0], blob[0][1], schedule="fast")
        errs[trim] = float(np.asarray(res.error_map)[8:14, 8:14, 8:14].mean())
    assert errs[0.05] > 1.3 * errs[0.0]


def test_time_budget_stops_early_and_resumes(pairs, tmp_path):
    from qc_pipeline.engine.training import CHECKPOINT_NAME, InvalidInputError

    out = train_model(pairs, tmp_path / "b", steps=100_000, batch_size=1, seed=0, features=(4, 8),
                      device="cpu", patch=16, time_budget_s=1.0)
    assert 0 < out["steps"] < 100_000 and out["wall_time_s"] < 30
    card = load_model_card(tmp_path / "b")
    assert card["training"]["steps"] == out["steps"] and card["training"]["steps_planned"] == 100_000
    import torch

    ck = torch.load(tmp_path / "b" / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    assert ck["step"] == out["steps"]
    more = train_model(pairs, tmp_path / "b", steps=out["steps"] + 3, batch_size=1, seed=0, features=(4, 8),
                       device="cpu", patch=16, time_budget_s=600.0)
    assert more["start_step"] == out["steps"] and more["steps"] == out["steps"] + 3
    with pytest.raises(InvalidInputError, match="trim"):
        train_model(pairs, tmp_path / "x", steps=1, features=(4, 8), device="cpu", trim=0.7)
