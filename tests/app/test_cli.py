"""CLI contract without running the workflow: exit codes, refusals, labels, filters, help."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app_testlib import base_args, make_dataset

from qc_pipeline.cli.app import main
from qc_pipeline.cli.parser import get_parser


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli") / "bids")


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for group in ("Options for filtering BIDS queries", "Options to handle performance",
                  "Workflow configuration", "Group level"):
        assert group in text
    for opt in ("--participant-label", "--session-label", "--suffix", "--bids-filter-file",
                "--work-dir", "--nprocs", "--omp-nthreads", "--use-plugin", "--device",
                "--model-dir", "--schedule", "--skull-strip", "--reports-only", "--labels",
                "--site-column", "--flag-at-fnr", "--site-norm-factor", "--site-norm-spread", "--site-norm-neighbours",
                "--seed",
                "--verbose"):
        assert opt in text
    assert main(["--version"]) == 0
    assert "itermask-qc v" in capsys.readouterr().out


def test_usage_errors_exit_64(ds, tmp_path, model_dir):
    root = str(ds["root"])
    assert main([]) == 64
    assert main([root, str(tmp_path / "o"), "participant", "--nprocs", "0"]) == 64
    assert main([root, str(tmp_path / "o"), "participant", "--suffix", "DWI"]) == 64
    assert main([root, str(tmp_path / "o"), "participant", "--no-such-option"]) == 64
    # a T1w model cannot screen FLAIR
    assert main(base_args(ds["root"], tmp_path / "o", tmp_path / "w", model_dir,
                          "--suffix", "FLAIR")) == 64


def test_unknown_analysis_level_17(ds, tmp_path):
    assert main([str(ds["root"]), str(tmp_path / "o"), "subject"]) == 17


def test_missing_bids_dir_66_and_invalid_dataset_16(tmp_path, model_dir):
    assert main(base_args(tmp_path / "nope", tmp_path / "o", tmp_path / "w", model_dir)) == 66
    bad = tmp_path / "notbids"
    (bad / "sub-01").mkdir(parents=True)
    assert main(base_args(bad, tmp_path / "o", tmp_path / "w", model_dir)) == 16
    (bad / "dataset_description.json").write_text("{}")
    (bad / "sub-01").rmdir()
    assert main(base_args(bad, tmp_path / "o", tmp_path / "w", model_dir)) == 16


def test_filters_matching_nothing_18(ds, tmp_path, model_dir):
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"t1w": {"acquisition": "doesnotexist"}}))
    args = base_args(ds["root"], tmp_path / "o", tmp_path / "w", model_dir,
                     "--bids-filter-file", str(filt))
    assert main(args) == 18
    filt.write_text("{not json")
    assert main(args) == 64
    filt.write_text(json.dumps({"bold": {}}))
    assert main(args) == 64


def test_unknown_participant_label_names_existing(ds, tmp_path, model_dir, caplog):
    args = base_args(ds["root"], tmp_path / "o", tmp_path / "w", model_dir,
                     "--participant-label", "sub-07")
    caplog.set_level("ERROR", logger="qc_pipeline")
    assert main(args) == 64
    out = tmp_path / "o" / "logs"
    text = "".join(p.read_text() for p in out.glob("*.log"))
    assert "--participant-label 07: no such subject" in text
    assert "found 01, 02" in text
    args = base_args(ds["root"], tmp_path / "o", tmp_path / "w", model_dir,
                     "--session-label", "ses-nope")
    assert main(args) == 64


def test_output_or_work_inside_bids_refused(ds, tmp_path, model_dir):
    root = ds["root"]
    assert main(base_args(root, root, tmp_path / "w", model_dir)) == 64
    assert main(base_args(root, root / "derivatives" / "itermask", tmp_path / "w", model_dir)) == 64
    assert main(base_args(root, tmp_path / "o", root / "work", model_dir)) == 64
    assert not (root / "derivatives" / "itermask").exists()
    assert not (root / "work").exists()


def test_missing_packaged_model_is_a_clear_error(ds, tmp_path, caplog, monkeypatch):
    import qc_pipeline.engine as engine

    # an installation whose FLAIR model folder is missing (e.g. a slimmed-down build)
    real = engine.default_model_dir
    monkeypatch.setattr(engine, "default_model_dir",
                        lambda c="T1w": tmp_path / "no-such-model" if c == "FLAIR" else real(c))
    caplog.set_level("ERROR", logger="qc_pipeline")
    rc = main([str(ds["root"]), str(tmp_path / "o"), "participant", "-w", str(tmp_path / "w"),
               "--suffix", "FLAIR", "--skull-strip", "none"])
    assert rc == 64
    text = "".join(p.read_text() for p in (tmp_path / "o" / "logs").glob("*.log"))
    assert "--model-dir" in text


def test_bad_plugin_file_and_cuda(ds, tmp_path, model_dir):
    plug = tmp_path / "plugin.yml"
    plug.write_text("plugin_args: {n_procs: 2}\n")  # no plugin name
    assert main(base_args(ds["root"], tmp_path / "o", tmp_path / "w", model_dir,
                          "--use-plugin", str(plug))) == 64
    import torch

    if not torch.cuda.is_available():
        args = base_args(ds["root"], tmp_path / "o", tmp_path / "w", model_dir)
        args[args.index("--device") + 1] = "cuda"
        assert main(args) == 64


def test_flag_at_fnr_needs_labels_and_group_needs_results(ds, tmp_path):
    assert main([str(ds["root"]), str(tmp_path / "o"), "group", "--flag-at-fnr", "0.2"]) == 64
    assert main([str(ds["root"]), str(tmp_path / "empty-out"), "group"]) == 66


def test_parser_accepts_bids_app_spellings():
    args = get_parser().parse_args(["b", "o", "participant", "--participant_label", "01", "02",
                                    "--n_procs", "3", "-w", "/tmp/w", "-vv"])
    assert args.participant_label == ["01", "02"] and args.nprocs == 3 and args.verbose == 2
    assert args.work_dir == Path("/tmp/w")


def test_site_norm_factor_parses_and_zero_skips_the_site_reference(ds, tmp_path):
    from qc_pipeline.cli.app import build_settings

    base = [str(ds["root"]), str(tmp_path / "o"), "group"]
    assert build_settings(get_parser().parse_args(base), base).site_norm_factor == 3.0
    for text, want in (("2.5", 2.5), ("0", None)):
        argv = base + ["--site-norm-factor", text]
        assert build_settings(get_parser().parse_args(argv), argv).site_norm_factor == want
    for bad in ("-1", "nan", "three"):
        assert main(base + ["--site-norm-factor", bad]) == 64
    assert build_settings(get_parser().parse_args(base), base).site_norm_spread == 5.0
    for text, want in (("3", 3.0), ("0", None)):
        argv = base + ["--site-norm-spread", text]
        assert build_settings(get_parser().parse_args(argv), argv).site_norm_spread == want
    for bad in ("-1", "inf", "five"):
        assert main(base + ["--site-norm-spread", bad]) == 64
    assert build_settings(get_parser().parse_args(base), base).site_norm_neighbours == 16
    for text, want in (("24", 24), ("0", 0)):
        argv = base + ["--site-norm-neighbours", text]
        assert build_settings(get_parser().parse_args(argv), argv).site_norm_neighbours == want
    for bad in ("-1", "2.5", "many"):
        assert main(base + ["--site-norm-neighbours", bad]) == 64
