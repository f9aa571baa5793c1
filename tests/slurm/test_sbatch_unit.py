"""Fast unit tests of itermask-qc-sbatch: units, missing-task computation, scripts.

No SLURM needed (not marked ``slurm``): these run in the default suite.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import pytest

from qc_pipeline import cluster as sb
from qc_pipeline.cli.sbatch import main as sbatch_main
from qc_pipeline.workflows import batch


def _touch(root: Path, rel: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")


@pytest.fixture()
def bids_tree(tmp_path):
    """A BIDS tree of empty files: sessions, acq-/run- variants, non-anat noise."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text("participant_id\tsite\nsub-01\tA\nsub-02\tB\n")
    for rel in [
        "sub-01/ses-a/anat/sub-01_ses-a_run-01_T1w.nii.gz",
        "sub-01/ses-a/anat/sub-01_ses-a_run-02_T1w.nii.gz",
        "sub-01/ses-b/anat/sub-01_ses-b_acq-fast_T1w.nii.gz",
        "sub-01/ses-a/func/sub-01_ses-a_task-rest_bold.nii.gz",
        "sub-02/anat/sub-02_T1w.nii.gz",
        "sub-02/anat/sub-02_T2w.nii.gz",
        "sub-03/anat/sub-03_T1w.nii",
    ]:
        _touch(root, rel)
    (root / "sub-02/anat/sub-02_T1w.json").write_text("{}")
    return root


def _scans(root, suffixes=("T1w",), **kw):
    return sb.list_scans(root, suffixes=suffixes, **kw)


@functools.lru_cache(maxsize=None)
def _packaged_key(suffix: str) -> str:
    from qc_pipeline.engine.modelio import default_model_dir, model_content_key

    return model_content_key(default_model_dir(suffix))


def _write_qc(out: Path, unit_scan: dict, status: str = "ok") -> Path:
    """A record as the participant level writes it with the packaged model."""
    from qc_pipeline import __version__

    p = out / unit_scan["out_reldir"] / f"{unit_scan['bids_name']}_qc.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"status": status, "bids_name": unit_scan["bids_name"],
                             "model_key": _packaged_key(unit_scan["entities"]["suffix"]),
                             "package_version": __version__}))
    return p


# --------------------------------------------------------------------------- units
def test_units_per_subject_and_per_scan(bids_tree):
    scans = _scans(bids_tree)
    by_subject = sb.plan_units(scans, "subject")
    assert [u.key for u in by_subject] == ["sub-01", "sub-02", "sub-03"]
    assert len(by_subject[0].scans) == 3  # two runs + one acq variant, no bold
    by_scan = sb.plan_units(scans, "scan")
    assert len(by_scan) == 5
    assert all(len(u.scans) == 1 for u in by_scan)
    assert by_scan[0].key == "sub-01/ses-a/anat/sub-01_ses-a_run-01_T1w.nii.gz"
    assert by_scan[0].subject == "01"
    with pytest.raises(sb.SbatchError):
        sb.plan_units(scans, "session")


def test_qc_json_paths_mirror_the_source(bids_tree, tmp_path):
    (unit,) = [u for u in sb.plan_units(_scans(bids_tree), "scan")
               if u.key.endswith("acq-fast_T1w.nii.gz")]
    assert unit.qc_json_paths(tmp_path / "out") == [
        tmp_path / "out/sub-01/ses-b/anat/sub-01_ses-b_acq-fast_T1w_qc.json"]


def test_missing_units_resume_logic(bids_tree, tmp_path):
    out = tmp_path / "out"
    units = sb.plan_units(_scans(bids_tree), "subject")
    assert sb.missing_units(units, out) == units  # nothing done yet
    # sub-01: two of three scans finished -> still missing; sub-02 finished; sub-03 crashed
    for s in units[0].scans[:2]:
        _write_qc(out, s)
    _write_qc(out, units[1].scans[0])
    p = _write_qc(out, units[2].scans[0])
    p.write_text('{"status": "ok", "trunc')  # half-written JSON = not finished
    assert [u.key for u in sb.missing_units(units, out)] == ["sub-01", "sub-03"]
    _write_qc(out, units[0].scans[2])
    _write_qc(out, units[2].scans[0], status="error")  # bad input: final by default
    assert sb.missing_units(units, out) == []
    assert [u.key for u in sb.missing_units(units, out, rerun_errors=True)] == ["sub-03"]


def test_scan_finished_rejects_unknown_status(tmp_path):
    p = tmp_path / "x_qc.json"
    assert not sb.scan_finished(p)
    p.write_text('{"status": "running"}')
    assert not sb.scan_finished(p)
    p.write_text('[1, 2]')
    assert not sb.scan_finished(p)
    p.write_text('{"status": "ok"}')
    assert sb.scan_finished(p)


@pytest.mark.parametrize("idx, spec", [
    ([0], "0"), ([0, 1, 2], "0-2"), ([5, 0, 1, 2, 7, 8], "0-2,5,7-8"), ([3, 3, 4], "3-4")])
def test_compress_indices(idx, spec):
    assert sb.compress_indices(idx) == spec


def test_split_array_respects_max_array_size():
    assert sb.split_array(5, 1001) == [(0, "0-4")]
    assert sb.split_array(1, 1001) == [(0, "0")]
    assert sb.split_array(2500, 1001, max_parallel=50) == [
        (0, "0-1000%50"), (1001, "0-1000%50"), (2002, "0-497%50")]
    with pytest.raises(sb.SbatchError):
        sb.split_array(0)


def test_scan_filter_matches_exactly_one_scan(bids_tree):
    scans = _scans(bids_tree)
    for rec in scans:
        filt = sb.scan_filter(rec.entities)
        assert list(filt) == [rec.suffix.lower()]
        path = bids_tree.parent / f"filter_{rec.bids_name}.json"
        path.write_text(json.dumps(filt))
        got = sb.list_scans(bids_tree, suffixes=["T1w"], participant_label=[rec.subject],
                            bids_filter_file=path)
        assert [g.relpath for g in got] == [rec.relpath]


def test_resolve_suffixes(tmp_path):
    assert sb.resolve_suffixes(["--suffix", "t2w", "FLAIR"]) == ["T2w", "FLAIR"]
    assert sb.resolve_suffixes(["--suffix=T1w"]) == ["T1w"]
    with pytest.raises(sb.SbatchError, match="--suffix PD"):
        sb.resolve_suffixes(["--suffix", "PD"])
    from qc_pipeline.engine import make_random_model_folder

    card = make_random_model_folder(tmp_path / "m", contrast="T2w")
    assert sb.resolve_suffixes(["--model-dir", str(card), "--skull-strip", "none"]) == ["T2w"]


# --------------------------------------------------------------------------- scripts
def _prepare(bids_tree, out, **kw):
    kw.setdefault("cli_args", ["--skull-strip", "none", "--suffix", "T1w"])
    return sb.prepare(bids_tree, out, itermask_qc="/opt/bin/itermask-qc",
                      python="/opt/bin/python", array_size_limit=1001, **kw)


def test_prepare_writes_array_script_with_requested_resources(bids_tree, tmp_path):
    res = sb.Resources(cpus_per_task=2, mem_per_task="2500M", time="00:20:00",
                       partition="short", gpu=True, extra_sbatch=["--account=lab"])
    sub = _prepare(bids_tree, tmp_path / "out", resources=res,
                   cli_args=["--skull-strip", "none", "--suffix", "T1w", "T2w"])
    text = sub.array_script.read_text()
    for line in ["#SBATCH --cpus-per-task=2", "#SBATCH --mem=2500M",
                 "#SBATCH --time=00:20:00", "#SBATCH --partition=short",
                 "#SBATCH --gres=gpu:1", "#SBATCH --account=lab"]:
        assert line + "\n" in text
    assert text.startswith("#!/bin/bash\n# itermask-qc participant level")
    assert "--skull-strip none --suffix T1w T2w" in text
    assert "${TMPDIR:-/tmp}" in text and 'rm -rf "$WORK_ROOT"' in text
    # units: 3 subjects, T2w of sub-02 belongs to the sub-02 unit
    assert [u.key for u in sub.todo] == ["sub-01", "sub-02", "sub-03"]
    assert sub.units[1].scans[-1]["bids_name"] == "sub-02_T2w"
    lines = (sub.job_dir / "units.tsv").read_text().splitlines()
    assert lines == ["01\t-\tsub-01", "02\t-\tsub-02", "03\t-\tsub-03"]
    assert sub.array_commands == [["sbatch", "--parsable", "--array=0-2",
                                   str(sub.array_script)]]
    group = sub.group_script.read_text()
    assert "#SBATCH --mem=2G\n" in group and "#SBATCH --partition=short\n" in group
    assert "/opt/bin/itermask-qc" in group and " group " in group
    assert "--reports-only" not in group  # per-subject tasks write whole subject reports
    # bash accepts both scripts
    for script in (sub.array_script, sub.group_script):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_prepare_per_scan_only_missing(bids_tree, tmp_path):
    out = tmp_path / "out"
    first = _prepare(bids_tree, out, per="scan", submission_id="one")
    assert len(first.todo) == 5
    for u in first.todo[:3]:
        _write_qc(out, u.scans[0])
    second = _prepare(bids_tree, out, per="scan", submission_id="two")
    assert [u.key for u in second.todo] == [u.key for u in first.todo[3:]]
    rows = [line.split("\t") for line in
            (second.job_dir / "units.tsv").read_text().splitlines()]
    assert [r[2] for r in rows] == [u.key for u in second.todo]
    filt = json.loads(Path(rows[0][1]).read_text())
    assert filt == sb.scan_filter(second.todo[0].scans[0]["entities"])
    assert second.array_commands[0][2] == "--array=0-1"
    assert "--reports-only" in second.group_script.read_text()
    for u in second.todo:
        _write_qc(out, u.scans[0])
    third = _prepare(bids_tree, out, per="scan", submission_id="three")
    assert third.todo == [] and third.array_script is None
    assert not (out / "logs/slurm/three").exists()


def test_prepare_refuses_reserved_args_and_output_inside_bids(bids_tree, tmp_path):
    with pytest.raises(sb.SbatchError, match="-w"):
        _prepare(bids_tree, tmp_path / "out", cli_args=["-w", "/scratch"])
    with pytest.raises(sb.SbatchError, match="--participant-label"):
        _prepare(bids_tree, tmp_path / "out", cli_args=["--participant-label", "01"])
    with pytest.raises(sb.SbatchError, match="inside the BIDS dir"):
        _prepare(bids_tree, bids_tree / "derivatives" / "qc")


def test_units_per_task_and_unknown_label(bids_tree, tmp_path):
    sub = _prepare(bids_tree, tmp_path / "out", per="scan", units_per_task=2)
    assert sub.array_commands[0][2] == "--array=0-2"  # 5 scans, 2 per task
    from qc_pipeline.bids import UnknownLabel

    with pytest.raises(UnknownLabel, match="09"):
        _prepare(bids_tree, tmp_path / "out2", participant_label=["sub-09"])


def test_array_script_runs_the_right_units(bids_tree, tmp_path):
    """Execute the rendered script with bash and a recording stand-in for itermask-qc
    (no SLURM): task k must run exactly the k-th unit(s) and copy back its outputs."""
    out = tmp_path / "out"
    rec = tmp_path / "calls.txt"
    fake = tmp_path / "itermask-qc"
    fake.write_text(
        "#!/bin/bash\n"
        f"echo \"$@\" >> {rec}\n"
        "mkdir -p \"$2/sub-x/anat\" && echo '{\"status\": \"ok\"}' > \"$2/sub-x/anat/x_qc.json\"\n")
    fake.chmod(0o755)
    import sys

    sub = sb.prepare(bids_tree, out, per="scan", units_per_task=2, itermask_qc=str(fake),
                     python=sys.executable, array_size_limit=1001,
                     cli_args=["--skull-strip", "none", "--suffix", "T1w"])
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="77",
               SLURM_CPUS_PER_TASK="3", TMPDIR=str(tmp_path / "node"))
    (tmp_path / "node").mkdir()
    r = subprocess.run(["bash", str(sub.array_script)], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = rec.read_text().splitlines()
    assert len(calls) == 2  # units 3 and 4 of 5
    keys = [u.key for u in sub.todo]
    for call, key in zip(calls, keys[2:4]):
        assert "--nprocs 3" in call and "--skull-strip none" in call
        assert f"--participant-label {sub.todo[keys.index(key)].subject}" in call
        filt = call.split("--bids-filter-file ")[1].split()[0]
        assert json.loads(Path(filt).read_text()) == sb.scan_filter(
            sub.todo[keys.index(key)].scans[0]["entities"])
        assert str(tmp_path / "node" / "itermask-qc_77_1") in call
    assert (out / "sub-x/anat/x_qc.json").is_file()
    assert not (tmp_path / "node" / "itermask-qc_77_1").exists()  # work dir removed


def test_collect_derivatives_keeps_existing_description(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub-01/anat").mkdir(parents=True)
    (src / "sub-01/anat/a_qc.json").write_text("{}")
    (src / "sub-01/anat/a_desc-anomaly_mask.nii.gz").write_bytes(b"x")
    (src / "dataset_description.json").write_text('{"new": 1}')
    dst.mkdir()
    (dst / "dataset_description.json").write_text('{"old": 1}')
    assert sb.collect_derivatives(src, dst) == 2
    assert json.loads((dst / "dataset_description.json").read_text()) == {"old": 1}
    assert (dst / "sub-01/anat/a_qc.json").read_text() == "{}"
    assert not list(dst.rglob(".*.tmp"))


def test_main_dry_run_and_errors(bids_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert sbatch_main([str(bids_tree), str(out), "--dry-run", "--per", "scan",
                    "--", "--skull-strip", "none", "--suffix", "T1w"]) == 0
    text = capsys.readouterr().out
    assert "dry run: 5 of 5 scan(s)" in text and "--array=0-4" in text
    assert sbatch_main([str(bids_tree), str(out), "--time", "soon", "--dry-run"]) == 64
    assert "--time 'soon'" in capsys.readouterr().err
    assert sbatch_main([str(bids_tree), str(out), "--dry-run", "--", "-w", "x"]) == 64
    assert sbatch_main([str(tmp_path / "nope"), str(out), "--dry-run"]) == 66
    assert sbatch_main([str(bids_tree), str(out), "--participant-label", "42",
                    "--dry-run"]) == 64
    assert "42" in capsys.readouterr().err


# --------------------------------------------------------------------------- pattern A
def test_prepare_batch_workflow_sets_node_requests(bids_tree, tmp_path, monkeypatch):
    """Heavy nodes of the real workflow get the documented --mem/--cpus-per-task; merge
    nodes run in the submitting process; the poll interval is raised; LOGNAME is set."""
    from qc_pipeline.config import Settings
    from qc_pipeline.workflows import init_itermask_qc_wf

    scans = _scans(bids_tree)
    settings = Settings(bids_dir=bids_tree, output_dir=tmp_path / "out",
                        analysis_level="participant", work_dir=tmp_path / "work",
                        omp_nthreads=2)
    settings.model_specs = {}
    wf = init_itermask_qc_wf(scans=scans, settings=settings)
    monkeypatch.delenv("LOGNAME", raising=False)
    left = batch.prepare_batch_workflow(wf, "SLURM", {"sbatch_args": "--mem=3G",
                                                   "poll_sleep_duration": 1.5},
                                     omp_nthreads=2)
    assert left == {"sbatch_args": "--mem=3G"}
    assert float(wf.config["execution"]["poll_sleep_duration"]) == 1.5
    assert os.environ["LOGNAME"]
    seen = {}
    for node in wf._get_all_nodes():
        args = (node.plugin_args or {}).get("sbatch_args")
        seen.setdefault(node.name.split("_sub_")[0] if node.name.startswith("report")
                        else node.name, set()).add((args, node.run_without_submitting))
    assert seen["preprocess"] == {("--mem=3072M --cpus-per-task=2", False)}
    assert seen["itermask"] == {("--mem=1536M --cpus-per-task=2", False)}
    assert seen["load"] == {("--mem=1024M --cpus-per-task=1", False)}
    assert seen["write_derivatives"] == {("--mem=1024M --cpus-per-task=1", False)}
    assert seen["report"] == {("--mem=1024M --cpus-per-task=1", False)}
    assert seen["timings"] == {(None, True)}  # Merge: no job of its own
    # a GPU partition for the IterMask3D nodes only
    wf_gpu = init_itermask_qc_wf(scans=scans, settings=settings)
    left = batch.prepare_batch_workflow(
        wf_gpu, "SLURM", {"itermask_sbatch_args": "--partition=gpu --gres=gpu:1"})
    assert left == {}
    for node in wf_gpu._get_all_nodes():
        args = (node.plugin_args or {}).get("sbatch_args") or ""
        assert ("--gres=gpu:1" in args) == (node.name == "itermask"), node.fullname
    # --engine-batch: the batch nodes get the GPU and their memory; a scan's pick of the
    # batch's results runs in the submitting process
    settings.engine_batch = 2
    wf_b = init_itermask_qc_wf(scans=scans, settings=settings)
    batch.prepare_batch_workflow(wf_b, "SLURM", {"itermask_sbatch_args": "--partition=gpu --gres=gpu:1"})
    names = {n.name: n for n in wf_b._get_all_nodes()}
    engines = [n for name, n in names.items() if name.startswith("itermask_batch_t1w_")
               and not name.endswith(("_files", "_errors"))]
    assert len(engines) == (len(scans) + 1) // 2 and "itermask" not in names
    for node in wf_b._get_all_nodes():
        args = (node.plugin_args or {}).get("sbatch_args") or ""
        assert ("--gres=gpu:1" in args) == (node in engines), node.fullname
        if node.name == "engine_result":
            assert node.run_without_submitting
    assert "--mem=3072M" in engines[0].plugin_args["sbatch_args"]
    settings.engine_batch = 1
    # MultiProc/Linear runs are left alone
    wf2 = init_itermask_qc_wf(scans=scans, settings=settings)
    assert batch.prepare_batch_workflow(wf2, "MultiProc", {"n_procs": 2}) == {"n_procs": 2}
    assert not any(n.run_without_submitting for n in wf2._get_all_nodes())


def test_node_sbatch_args_table():
    assert batch.node_sbatch_args("preprocess") == "--mem=3072M --cpus-per-task=1"
    assert batch.node_sbatch_args("report_sub_0042") == "--mem=1024M --cpus-per-task=1"
    assert batch.node_sbatch_args("load", omp_nthreads=4) == "--mem=1024M --cpus-per-task=1"
    assert batch.node_sbatch_args("timings") is None


# --------------------------------------------------------------------------- docs
def _doc_table(header_first_cell: str) -> dict[str, list[str]]:
    """Rows of the markdown table of docs/cluster.md whose first header cell is given."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cluster.md").read_text()
    rows, inside = {}, False
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == header_first_cell:
            inside = True
            continue
        if inside:
            if not line.startswith("|"):
                break
            if set(cells[0]) <= {"-"}:
                continue
            rows[cells[0]] = cells[1:]
    assert rows, f"no table starting with {header_first_cell!r} in docs/cluster.md"
    return rows


def test_docs_match_pattern_a_requests():
    import yaml

    rows = _doc_table("node (pattern A)")
    for node, mb in batch.NODE_MEM_MB.items():
        cpus, mem = rows[node][0], rows[node][1]
        assert mem == f"{mb}M", node
        assert cpus == ("omp-nthreads" if node in batch.THREADED_NODES else "1"), node
        assert batch.node_sbatch_args(node) == f"--mem={mem} --cpus-per-task=1"
    yml = yaml.safe_load((Path(sb.__file__).parent.parent / "workflows" / "slurm.yml")
                         .read_text())
    args = dict(a[2:].split("=", 1) for a in yml["plugin_args"]["sbatch_args"].split())
    cpus, mem = rows["slurm.yml default (any other node)"][:2]
    assert args["cpus-per-task"] == cpus and args["mem"] == mem
    assert args["time"] == "00:30:00"


def test_docs_match_pattern_b_requests(bids_tree, tmp_path):
    rows = _doc_table("job (pattern B)")
    cpus, mem, time_ = rows["participant array task"]
    assert (int(cpus), mem, time_) == (sb.DEFAULT_CPUS_PER_TASK, sb.DEFAULT_MEM_PER_TASK,
                                      sb.DEFAULT_TIME)
    gcpus, gmem, gtime = rows["group job"]
    assert (gcpus, gmem, gtime) == ("1", sb.DEFAULT_GROUP_MEM, sb.DEFAULT_GROUP_TIME)
    # the scripts written with the CLI defaults carry exactly these requests
    out = tmp_path / "out"
    assert sbatch_main([str(bids_tree), str(out), "--dry-run", "--", "--suffix", "T1w"]) == 0
    (job_dir,) = [p for p in (out / "logs" / "slurm").iterdir() if p.name != "bids_db"]
    arr = (job_dir / "participant.sbatch").read_text()
    grp = (job_dir / "group.sbatch").read_text()
    for script, (c, m, t) in ((arr, (cpus, mem, time_)), (grp, (gcpus, gmem, gtime))):
        assert f"#SBATCH --cpus-per-task={c}\n" in script
        assert f"#SBATCH --mem={m}\n" in script
        assert f"#SBATCH --time={t}\n" in script
        assert "--gres" not in script and "--partition" not in script


def test_a_scan_screened_by_another_model_is_submitted_again(bids_tree, tmp_path):
    from qc_pipeline import __version__

    out = tmp_path / "out"
    units = sb.plan_units(_scans(bids_tree), "subject")
    for u in units:
        for s in u.scans:
            p = _write_qc(out, s)
            rec = json.loads(p.read_text())
            rec.update(model_key="a" * 16, package_version=__version__)
            p.write_text(json.dumps(rec))
    assert sb.missing_units(units, out, model_keys={"T1w": "a" * 16}) == []
    # the same model content under a new package version, or a model rewritten in place:
    # the participant level would screen again, so the units are submitted again
    assert sb.missing_units(units, out, model_keys={"T1w": "b" * 16}) == units
    p = units[1].qc_json_paths(out)[0]
    rec = json.loads(p.read_text())
    rec["package_version"] = "0.0.0"
    p.write_text(json.dumps(rec))
    assert [u.key for u in sb.missing_units(units, out, model_keys={"T1w": "a" * 16})] == ["sub-02"]
    # a suffix without a key is judged by status alone
    assert sb.missing_units(units, out, model_keys={"T2w": "b" * 16}) == []


def test_expected_model_keys_follow_the_model_folder(tmp_path):
    from qc_pipeline.engine.modelio import default_model_dir, model_content_key

    keys = sb.expected_model_keys([], ["T1w"])
    assert keys == {"T1w": model_content_key(default_model_dir("T1w"))}
    # --model-dir screens its own contrast only; a folder that is not a model gives no key
    assert sb.expected_model_keys(["--model-dir", str(default_model_dir("T1w"))], ["T1w", "T2w"]) == keys
    assert sb.expected_model_keys(["--model-dir", str(tmp_path)], ["T1w"]) == {}


@pytest.mark.parametrize("device,expected", [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda")])
@pytest.mark.parametrize("engine_batch", [1, 2])
def test_preprocessing_nodes_get_the_runs_device(bids_tree, tmp_path, device, expected, engine_batch):
    """deepbet follows --device (where the node's process sees a GPU), in both workflow shapes."""
    from qc_pipeline.config import Settings
    from qc_pipeline.workflows import init_itermask_qc_wf

    settings = Settings(bids_dir=bids_tree, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", device=device, engine_batch=engine_batch)
    settings.model_specs = {}
    wf = init_itermask_qc_wf(scans=_scans(bids_tree), settings=settings)
    preps = [n for n in wf._get_all_nodes() if n.name == "preprocess"]
    assert preps and {n.inputs.device for n in preps} == {expected}


@pytest.mark.parametrize("engine_batch", [1, 2])
def test_nodes_declare_their_resources_where_they_are_built(bids_tree, tmp_path, engine_batch):
    """MultiProc schedules by what each node declares: the measured memory table, and the
    torch threads of the preprocessing and IterMask3D nodes."""
    from qc_pipeline.config import Settings
    from qc_pipeline.workflows import init_itermask_qc_wf

    settings = Settings(bids_dir=bids_tree, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", omp_nthreads=3, engine_batch=engine_batch)
    settings.model_specs = {}
    wf = init_itermask_qc_wf(scans=_scans(bids_tree), settings=settings)
    from nipype.interfaces import utility as niu

    seen = {}
    for node in wf._get_all_nodes():
        mb = batch.node_mem_mb(node.name)
        if mb is None or isinstance(node.interface, niu.Merge):  # bookkeeping: no job of its own
            continue
        assert node.mem_gb == pytest.approx(mb / 1024), node.fullname
        seen[node.name.split("_sub_")[0].split("_t1w")[0]] = node.n_procs
    want = {"load": 1, "preprocess": 3, "write_derivatives": 1, "report": 1}
    want.update({"itermask": 3} if engine_batch == 1 else {"itermask_batch": 1})
    assert seen == want


def test_cli_multiproc_lets_a_node_larger_than_the_machine_run_alone(tmp_path):
    """raise_insufficient false (Nipype then caps the node's request at the machine's), unless
    the plugin file says otherwise."""
    from qc_pipeline.cli.app import _load_plugin

    assert _load_plugin(None, 1) == ("Linear", {})
    assert _load_plugin(None, 3) == ("MultiProc", {"n_procs": 3, "raise_insufficient": False})
    y = tmp_path / "p.yml"
    y.write_text("plugin: MultiProc\nplugin_args: {n_procs: 4, raise_insufficient: true}\n")
    assert _load_plugin(y, 2) == ("MultiProc", {"n_procs": 4, "raise_insufficient": True})
