"""A hostile world: special files, lying headers and odd names, through the real CLI.

One participant-level run over a tree holding, beside good scans, a broken symlink, a FIFO,
a link to /dev/zero, a folder named like a scan, a header claiming 1400^3 voxels and a gzip
bomb, plus subjects and acquisitions whose names BIDS does not allow. Each bad entry must
be an error row with one line, the others screened, and nothing may block.
"""
from __future__ import annotations

import time

import pytest

from app_testlib import HOSTILE_KINDS, base_args, make_dataset, qc_of, save_scan, write_hostile

from qc_pipeline.cli.app import main

ODD = [
    "sub-ü/anat/sub-ü_T1w.nii.gz",
    "sub-#1/anat/sub-#1_T1w.nii.gz",
    'sub-">x/anat/sub-">x_T1w.nii.gz',
    "sub-01_x/anat/sub-01_x_T1w.nii.gz",
    "sub-02/anat/sub-02_acq-a b_T1w.nii.gz",
    "sub-02/anat/sub-02_acq-a#b_T1w.nii.gz",
]


def _hostile_rel(kind: str) -> str:
    return f"sub-01/ses-pre/anat/sub-01_ses-pre_acq-{kind}_T1w.nii.gz"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("hostile")
    ds = make_dataset(tmp / "bids")
    root = ds["root"]
    for i, rel in enumerate(ODD):
        save_scan(root, rel, seed=30 + i)
    for kind in HOSTILE_KINDS:
        write_hostile(root / _hostile_rel(kind), kind)
    out, work = tmp / "out", tmp / "work"
    t0 = time.perf_counter()
    rc = main(base_args(root, out, work, model_dir, "--max-image-gb", "0.5",
                        "--participant-label", "01", "02", "ü", "#1", '">x', "01_x"))
    return {"rc": rc, "out": out, "seconds": time.perf_counter() - t0, "root": root}


@pytest.mark.parametrize("kind", sorted(HOSTILE_KINDS))
def test_special_file_or_lying_header_is_an_error_row(hostile, kind):
    qc = qc_of(hostile["out"], _hostile_rel(kind))
    assert qc["status"] == "error"
    assert HOSTILE_KINDS[kind] in qc["error"] and "\n" not in qc["error"]
    assert qc["error"].startswith(_hostile_rel(kind) + ": ")
    assert qc["mask_file"] is None


def test_the_other_scans_finish_and_the_summary_names_the_bad_ones(hostile):
    assert hostile["rc"] == 1
    for rel in ODD + ["sub-01/ses-pre/anat/sub-01_ses-pre_run-1_T1w.nii.gz",
                      "sub-02/anat/sub-02_acq-fast_rec-norm_run-01_T1w.nii.gz"]:
        qc = qc_of(hostile["out"], rel)
        assert qc["status"] == "ok", (rel, qc["error"])
    assert qc_of(hostile["out"], ODD[0])["entities"]["subject"] == "ü"
    log = next((hostile["out"] / "logs").glob("itermask-qc-*.log")).read_text()
    summary = [ln for ln in log.splitlines() if "scans failed:" in ln]
    assert len(summary) == 1 and summary[0].split("scans failed:")[0].endswith(
        f"{len(HOSTILE_KINDS)} of {len(HOSTILE_KINDS) + len(ODD) + 4} ")
    assert "Traceback" not in log
    # nothing blocked on the FIFO or /dev/zero, no bomb inflated: the good scans' time only
    assert hostile["seconds"] < 240
    for subject in ("ü", "#1", '">x', "01_x"):
        assert (hostile["out"] / f"sub-{subject}.html").is_file()
