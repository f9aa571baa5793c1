"""``itermask-qc-train``: bad options are one line and exit 64 before any scan is read."""
import time

import pytest

from qc_pipeline.engine.train_cli import main


@pytest.mark.parametrize("argv,expected", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "0"], "--lr must be positive"),
    (["--patch", "64", "64"], "--patch takes one size or three"),
    (["--grid", "80", "4", "80"], "--grid at least 8 per axis"),
    (["--features", "8"], "--features needs two or more positive widths"),
    (["--init-from", "/nonexistent/model"], "--init-from /nonexistent/model: no model card"),
])
def test_bad_options_fail_fast_with_one_line(argv, expected, tmp_path, capsys):
    # the BIDS folder does not even exist: the options are checked first
    t0 = time.perf_counter()
    rc = main([str(tmp_path / "no_bids"), str(tmp_path / "model"), *argv])
    assert rc == 64 and time.perf_counter() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_init_from_a_folder_without_weights(tmp_path, capsys):
    from qc_pipeline.engine import make_random_model_folder

    folder = make_random_model_folder(tmp_path / "m", grid=(16, 16, 16), voxel_size=(2, 2, 2), seed=0)
    (folder / "weights.pt").unlink()
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "--init-from", str(folder)]) == 64
    assert "no weights.pt" in capsys.readouterr().err
