import json

import nibabel as nib
import pytest

from qc_pipeline.synth import LABEL_COLUMNS, OutputExistsError, read_labels, write_cohort
from qc_pipeline.synth.cli import main


def _cohort(out, **kw):
    args = dict(contrasts="T1w,T2w", seed=3, artifacts="chunk_middle,ghosting",
                artifact_fraction=0.5, work_mm=4.0, voxel_size=3.0, max_voxels=3e5)
    args.update(kw)
    return write_cohort(out, 3, **args)


def test_cohort_is_valid_bids_with_labels(tmp_path):
    from bids import BIDSLayout

    root = _cohort(tmp_path / "ds")
    layout = BIDSLayout(str(root), validate=False)
    t1 = layout.get(suffix="T1w", extension=".nii.gz")
    t2 = layout.get(suffix="T2w", extension=".nii.gz")
    assert len(t1) == 3 and len(t2) == 3
    assert layout.get(suffix="T1w", extension=".json")
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["Name"]
    parts = (root / "participants.tsv").read_text().splitlines()
    assert parts[0].split("\t")[:2] == ["participant_id", "site"]
    assert len({p.split("\t")[1] for p in parts[1:]}) >= 2  # several sites
    labels = read_labels(root / "sourcedata" / "qc_labels.tsv")
    header = (root / "sourcedata" / "qc_labels.tsv").read_text().splitlines()[0].split("\t")
    assert tuple(header) == LABEL_COLUMNS
    names = {f.filename.replace(".nii.gz", "") for f in t1 + t2}
    assert {r["bids_name"] for r in labels} == names
    for r in labels:
        assert (r["label"] == 1) == (r["artifact"] != "none")
        img = nib.load(str(root / f"sub-{r['bids_name'].split('_')[0][4:]}" / "anat"
                           / f"{r['bids_name']}.nii.gz"))
        assert img.ndim == 3
    # BIDS indexers ignore sourcedata/: labels are not scans
    assert not layout.get(extension=".tsv", suffix="labels")


def test_cohort_deterministic_and_refuses_overwrite(tmp_path):
    a = _cohort(tmp_path / "a", contrasts="T1w")
    b = _cohort(tmp_path / "b", contrasts="T1w")
    assert (a / "sourcedata/qc_labels.tsv").read_text() == (b / "sourcedata/qc_labels.tsv").read_text()
    fa = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    for rel in fa:
        assert (nib.load(str(a / rel)).get_fdata() == nib.load(str(b / rel)).get_fdata()).all()
    with pytest.raises(OutputExistsError, match="not empty"):
        _cohort(tmp_path / "a", contrasts="T1w")
    _cohort(tmp_path / "a", contrasts="T1w", overwrite=True)
    assert not list(tmp_path.glob(".a.*"))  # temporary folders cleaned up


def test_cli_cohort_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["cohort", str(out), "--n-subjects", "2", "--contrasts", "T1w", "--seed", "1",
               "--artifacts", "all", "--artifact-fraction", "1", "--severity", "0.5:0.6",
               "--work-mm", "4", "--voxel-size", "3"])
    assert rc == 0
    rows = read_labels(out / "sourcedata" / "qc_labels.tsv")
    assert all(r["label"] == 1 and 0.5 <= r["severity"] <= 0.6 for r in rows)
    assert main(["cohort", str(out), "--n-subjects", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["cohort", str(tmp_path / "x"), "--n-subjects", "1", "--artifacts", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["cohort", str(tmp_path / "y"), "--n-subjects", "1", "--severity", "2:3"]) == 2


def test_cli_plain_anatomy_gives_the_template_heads(tmp_path):
    """--plain-anatomy reproduces cohorts made before the cortical detail (same seed, same
    scan as make_subject(cortex_detail=False)); without it the brain differs."""
    import numpy as np

    from qc_pipeline.synth import make_subject

    args = ["--n-subjects", "1", "--contrasts", "T1w", "--seed", "4", "--work-mm", "4", "--voxel-size", "3"]
    assert main(["cohort", str(tmp_path / "plain"), *args, "--plain-anatomy"]) == 0
    assert main(["cohort", str(tmp_path / "detail"), *args]) == 0
    plain = nib.load(str(tmp_path / "plain" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")).get_fdata()
    detail = nib.load(str(tmp_path / "detail" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")).get_fdata()
    assert not np.allclose(plain, detail)
    seed = int(np.random.default_rng([4, 0]).integers(2**31 - 1))  # write_cohort's subject seed
    ref, meta = make_subject(seed, "T1w", site="A", work_mm=4.0, voxel_size=3.0, cortex_detail=False)
    assert meta["cortex_detail"]["sulci"] == 0.0
    assert np.allclose(plain, ref.get_fdata())


def test_bank_command_writes_a_loadable_bank(tmp_path, capsys):
    from qc_pipeline.engine.domainrand import BANK_CHANNELS, load_bank

    out = tmp_path / "bank.npz"
    assert main(["bank", str(out), "--voxel-mm", "4"]) == 0
    bank = load_bank(out)
    assert bank["voxel_mm"] == 4.0
    assert all(bank[c].ndim == 3 and bank[c].shape == bank["gm"].shape for c in BANK_CHANNELS)
    assert bank["wm"].max() > 0.5  # tissue, not an empty canvas
    assert "wrote" in capsys.readouterr().out
