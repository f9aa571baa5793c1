"""Both cluster patterns against the real local SLURM, compared with a local run.

Pattern A: ``itermask-qc ... participant --use-plugin slurm.yml`` (Nipype's SLURM plugin).
Pattern B: ``itermask-qc-sbatch`` (job array + dependent group job), with a task killed
mid-run and a resubmission that reruns only it.

Data: 4 skull-stripped synthetic T1w scans (two subjects, sessions, runs, acq-), a tiny
random model (40x48x40 at 4 mm), ``--skull-strip none``. The whole module takes ~3-5 min
on 2 shared cores.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

HERE = Path(__file__).parent
REPO = HERE.parent.parent
BIN = Path(sys.executable).parent


def _data():
    spec = importlib.util.spec_from_file_location("_itermask_slurm_data", HERE / "slurm_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


D = _data()


def _env(**extra) -> dict:
    env = dict(os.environ, NIPYPE_NO_ET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env(),
                       **kw)
    return r


@pytest.fixture(scope="module")
def screening(tmp_path_factory):
    """BIDS tree, model, and the reference local run (Linear plugin, one process)."""
    root = tmp_path_factory.mktemp("slurm_screen")
    rels = D.make_bids(root / "bids", 4)
    model = D.make_model(root / "model")
    common = ["--model-dir", model, "--skull-strip", "none"]
    r = _run([BIN / "itermask-qc", root / "bids", root / "out_local", "participant",
              "-w", root / "work_local", "--nprocs", "1", *common])
    assert r.returncode == 0, r.stdout + r.stderr
    local = D.qc_records(root / "out_local")
    assert len(local) == 4 and all(v["status"] == "ok" for v in local.values())
    return {"root": root, "rels": rels, "model": model, "common": common, "local": local}


def _same_scores(got: dict, ref: dict, names) -> None:
    for name in names:
        a, b = got[name], ref[name]
        assert a["status"] == b["status"] == "ok", (name, a.get("error"))
        assert a["anomaly_voxels"] == b["anomaly_voxels"], name
        assert a["anomaly_fraction"] == pytest.approx(b["anomaly_fraction"], rel=1e-9), name
        assert a["mean_error"] == pytest.approx(b["mean_error"], rel=1e-6), name
        assert a["tau_stop"] == pytest.approx(b["tau_stop"], rel=1e-6), name
        assert a["input_sha256"] == b["input_sha256"]
        assert a["entities"] == b["entities"] and a["site"] == b["site"]


def _jobs_named(fragment: str) -> list[dict]:
    out = _run(["scontrol", "-o", "show", "job"]).stdout
    jobs = []
    for line in out.splitlines():
        f = dict(x.split("=", 1) for x in line.split() if "=" in x)
        if fragment in f.get("JobName", ""):
            jobs.append(f)
    return jobs


def _mem_mb(text: str) -> float:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    return float(text[:-1]) * units[text[-1]]


# --------------------------------------------------------------------------- pattern A
def test_pattern_a_nipype_slurm_plugin(local_slurm, screening, tmp_path):
    """One subject through Nipype's SLURM plugin with workflows/slurm.yml: same scores
    as the local run, every node a SLURM job with the requests slurm.yml/docs give."""
    from qc_pipeline.workflows import batch

    shipped = yaml.safe_load((REPO / "workflows" / "slurm.yml").read_text())
    assert shipped["plugin"] == "SLURM"
    cfg = json.loads(json.dumps(shipped))
    cfg["plugin_args"]["poll_sleep_duration"] = 1  # the test is short: poll faster
    yml = tmp_path / "slurm.yml"
    yml.write_text(yaml.safe_dump(cfg))
    root = screening["root"]
    env = _env()
    env.pop("LOGNAME", None)  # the CLI's batch hook sets it; Nipype's plugin needs it
    r = subprocess.run([str(BIN / "itermask-qc"), str(root / "bids"), str(tmp_path / "out"),
                        "participant", "--participant-label", "02", "-w",
                        str(tmp_path / "work"), "--use-plugin", str(yml),
                        *map(str, screening["common"])],
                       capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    got = D.qc_records(tmp_path / "out")
    assert list(got) == ["sub-02_acq-fast_T1w"]
    _same_scores(got, screening["local"], got)
    assert (tmp_path / "out" / "sub-02.html").is_file()

    jobs = _jobs_named("scan_sub_02_acq_fast_T1w")
    by_node = {j["JobName"].split(".")[0]: j for j in jobs}
    assert {"load", "preprocess", "itermask", "write_derivatives"} <= set(by_node)
    assert all(j["JobState"] == "COMPLETED" for j in jobs)
    base_mem = next(a for a in shipped["plugin_args"]["sbatch_args"].split()
                    if a.startswith("--mem="))[len("--mem="):]
    for node, job in by_node.items():
        want = batch.NODE_MEM_MB.get(node)
        want = want if want is not None else _mem_mb(base_mem)
        assert _mem_mb(job["MinMemoryNode"]) == want, (node, job["MinMemoryNode"])
        assert job["NumCPUs"] == "1" and job["TimeLimit"] == "00:30:00"
    assert "timings" not in by_node  # bookkeeping ran in the submitting process


# --------------------------------------------------------------------------- pattern B
def _submit(screening, out, *args) -> tuple[subprocess.CompletedProcess, dict]:
    root = screening["root"]
    r = _run([BIN / "itermask-qc-sbatch", root / "bids", out, *args, "--",
              *screening["common"]])
    assert r.returncode == 0, r.stdout + r.stderr
    last = out / "logs" / "slurm" / "last_submission.json"
    return r, json.loads(last.read_text()) if last.is_file() else {}


def _wait_running(job: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _run(["squeue", "-h", "-o", "%T", "-j", job]).stdout.strip()
        if st == "RUNNING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"{job} did not start")


def test_pattern_b_array_kill_and_resume(local_slurm, slurm_helpers, screening, tmp_path):
    out = tmp_path / "out"
    local = screening["local"]
    r, sub1 = _submit(screening, out, "--per", "subject", "--time", "00:20:00",
                      "--mem-per-task", "3G")
    (arr,), grp = sub1["array_ids"], sub1["group_id"]
    assert f"participant array job(s): {arr}" in r.stdout and f"squeue -j {arr},{grp}" in r.stdout
    assert sub1["todo"] == ["sub-01", "sub-02"]
    # the array tasks ask for what the script and docs say
    _wait_running(f"{arr}_1")
    task = _run(["scontrol", "-o", "show", "job", f"{arr}_1"]).stdout
    assert "MinMemoryNode=3G" in task and "NumCPUs=1" in task and "TimeLimit=00:20:00" in task
    # kill sub-02's task mid-run: its outputs must not appear, the rest must finish
    assert _run(["scancel", f"{arr}_1"]).returncode == 0
    states = slurm_helpers["wait_for_jobs"]([arr, grp], timeout=400)
    assert states[f"{arr}_0"] == "COMPLETED" and states[f"{arr}_1"] == "CANCELLED"
    assert states[grp] == "COMPLETED"  # afterany: the group ran with what was there
    got = D.qc_records(out)
    assert sorted(got) == sorted(k for k in local if k.startswith("sub-01"))
    _same_scores(got, local, got)
    assert not Path(f"/tmp/itermask-qc_{arr}_1").exists()  # node-local work dir removed
    rows = list(csv.DictReader(open(out / "group_T1w.csv")))
    assert len(rows) == 3
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("sub-01/**/*_qc.json")}

    # resubmit (per scan this time): only sub-02's scan is missing, only it reruns
    r, sub2 = _submit(screening, out, "--per", "scan")
    assert "submitted 1 of 4 scan(s) (3 already finished)" in r.stdout
    assert sub2["todo"] == ["sub-02/anat/sub-02_acq-fast_T1w.nii.gz"]
    units = Path(sub2["job_dir"], "units.tsv").read_text().splitlines()
    assert len(units) == 1 and units[0].startswith("02\t")
    states = slurm_helpers["wait_for_jobs"](sub2["array_ids"] + [sub2["group_id"]], 400)
    assert set(states.values()) == {"COMPLETED"}, states
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # sub-01 not rerun
    got = D.qc_records(out)
    assert sorted(got) == sorted(local)
    _same_scores(got, local, got)
    rows = list(csv.DictReader(open(out / "group_T1w.csv")))
    assert sorted(r_["bids_name"] for r_ in rows) == sorted(local)
    assert (out / "sub-02.html").is_file() and (out / "sub-01.html").is_file()

    # nothing left: a third call submits nothing
    r, _ = _submit(screening, out)
    assert "nothing to submit" in r.stdout
