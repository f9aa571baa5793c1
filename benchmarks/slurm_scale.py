"""Screening throughput on a local single-node SLURM vs MultiProc on the same machine.

    sudo .venv/bin/python benchmarks/slurm_scale.py            # 200 scans (long!)
    sudo .venv/bin/python benchmarks/slurm_scale.py --n 6      # a smoke run

What it does, for a synthetic BIDS dataset of ``--n`` skull-stripped T1w scans (the SLURM
tests' generator, ~3.6 mm heads, a tiny random 40x48x40 model at 4 mm, ``--skull-strip
none``):

1. MultiProc: ``itermask-qc BIDS OUT participant --nprocs <cpus>`` under ``/usr/bin/time``.
2. SLURM (pattern B): starts a throw-away munged + slurmctld + slurmd (tests/slurm/
   local_slurm.py; needs root and the Debian slurm-wlm + munge packages), submits
   ``itermask-qc-sbatch --per scan`` (one array task per scan, 1 CPU each) and waits for
   the array and the group job. Each task's ``itermask-qc`` runs under ``/usr/bin/time``
   (a wrapper passed as the executable), so every job reports its own peak RSS and
   start/end time: sacct is unavailable without SLURM accounting.

Printed: wall time of both; per job: CLI runtime, peak RSS, scan compute (``runtime_s``
of the ``_qc.json``); scheduler overhead per job = (array-phase wall x slots - sum of
task runtimes) / jobs, i.e. the slot time lost to submission (incl. the BIDS walk of
itermask-qc-sbatch), scheduling, job launch and the array script; the array phase runs
from submission to the end of the last array task (the group job comes after it); and an estimate, with its arithmetic, for 10,000 scans on a 20-node cluster.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

#: CPU seconds of load + preprocess + itermask + write_derivatives for a 1 mm T1w head
#: (225x229x213, deepbet, 80x96x80 grid, 1 thread): load, preprocess and write measured by
#: benchmarks/node_resources.py; itermask = median engine time of the packaged T1w model's
#: fast schedule (14.5 passes) in benchmarks/detection.py (docs/benchmarks.md)
REAL_SCAN_CPU_S = 1.3 + 18.4 + 13.9 + 7.1
REAL_PEAK_MB = 1174


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}",
                                                  REPO / "tests" / "slurm" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _time_v(text: str) -> dict:
    def grab(label, cast=float):
        m = re.search(rf"{re.escape(label)}: (.*)", text)
        return cast(m.group(1).strip()) if m else None

    wall = grab("Elapsed (wall clock) time (h:mm:ss or m:ss)", str)
    wall_s = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":")))) if wall else None
    return {"maxrss_mb": (grab("Maximum resident set size (kbytes)") or 0) / 1024,
            "wall_s": wall_s,
            "cpu_s": (grab("User time (seconds)") or 0) + (grab("System time (seconds)") or 0)}


WRAPPER = """#!/bin/bash
# itermask-qc under /usr/bin/time: one usage file per SLURM job (benchmarks/slurm_scale.py)
mkdir -p {usage}
f={usage}/${{SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}_${{SLURM_ARRAY_TASK_ID:-0}}_$$
date +%s.%N > "$f.start"
/usr/bin/time -v -o "$f.time" {exe} "$@"
rc=$?
date +%s.%N > "$f.end"
exit $rc
"""


def run_multiproc(bids, out, work, model, nprocs) -> dict:
    cmd = ["/usr/bin/time", "-v", str(BIN / "itermask-qc"), str(bids), str(out), "participant",
           "-w", str(work), "--nprocs", str(nprocs), "--model-dir", str(model),
           "--skull-strip", "none"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env=dict(os.environ, NIPYPE_NO_ET="1", OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"MultiProc run failed:\n{r.stderr[-3000:]}")
    return {"wall_s": wall, **{k: v for k, v in _time_v(r.stderr).items() if k != "wall_s"}}


def run_slurm(bids, out, model, tmp, slots, mem) -> dict:
    ls = _load("local_slurm")
    from qc_pipeline import cluster as sb

    usage = tmp / "usage"
    wrapper = tmp / "itermask-qc-timed"
    wrapper.write_text(WRAPPER.format(usage=usage, exe=BIN / "itermask-qc"))
    wrapper.chmod(0o755)
    cluster = ls.LocalSlurm(cpus=slots, mem_mb=mem).start()
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        t0 = time.perf_counter()
        t_submit = time.time()
        sub = sb.prepare(bids, out, per="scan",
                         resources=sb.Resources(cpus_per_task=1, mem_per_task="3G",
                                                time="00:30:00"),
                         cli_args=["--model-dir", str(model), "--skull-strip", "none"],
                         itermask_qc=str(wrapper))
        sb.submit(sub)
        ids = sub.array_ids + [sub.group_id]
        while sb.active_jobs(ids):
            time.sleep(0.5)
        wall = time.perf_counter() - t0
    finally:
        cluster.cleanup()
        os.environ.pop("SLURM_CONF", None)
    jobs = []
    for tf in sorted(usage.glob("*.time")):
        stem = str(tf)[: -len(".time")]
        if Path(tf).name.startswith(f"{sub.group_id}_"):
            continue
        start, end = (float(Path(stem + s).read_text()) for s in (".start", ".end"))
        jobs.append({"start": start, "end": end, "runtime_s": end - start,
                     **_time_v(tf.read_text())})
    array_wall = max(j["end"] for j in jobs) - t_submit if jobs else float("nan")
    return {"wall_s": wall, "array_wall_s": array_wall, "jobs": jobs, "n_tasks": len(sub.todo),
            "submission": sub}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="scans (default 200)")
    p.add_argument("--slots", type=int, default=os.cpu_count() or 2,
                   help="CPUs of the local SLURM node and MultiProc --nprocs")
    p.add_argument("--mem-mb", type=int, default=20000, help="RealMemory of the local node")
    p.add_argument("--keep", help="keep the data and outputs in this folder")
    p.add_argument("--nodes", type=int, default=20, help="cluster size for the estimate")
    p.add_argument("--cores-per-node", type=int, default=32)
    p.add_argument("--mem-per-node-gb", type=float, default=128)
    p.add_argument("--scans", type=int, default=10_000, help="study size for the estimate")
    a = p.parse_args(argv)

    data = _load("slurm_data")
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="slurm-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data.make_bids(tmp / "bids", a.n)
    model = data.make_model(tmp / "model")
    print(f"dataset: {a.n} scans in {tmp / 'bids'} ({time.perf_counter() - t0:.0f} s to build)")

    mp = run_multiproc(tmp / "bids", tmp / "out_multiproc", tmp / "work_mp", model, a.slots)
    sl = run_slurm(tmp / "bids", tmp / "out_slurm", model, tmp, a.slots, a.mem_mb)

    recs = data.qc_records(tmp / "out_slurm")
    ref = data.qc_records(tmp / "out_multiproc")
    same = sum(1 for k in ref if k in recs and recs[k]["anomaly_voxels"] == ref[k]["anomaly_voxels"])
    scan_s = statistics.mean(r["runtime_s"] for r in recs.values() if r.get("runtime_s"))
    jobs = sl["jobs"]
    n = len(jobs)
    busy = sum(j["runtime_s"] for j in jobs)
    # slot time lost per job during the array phase (submission -> last task's end)
    overhead = (sl["array_wall_s"] * a.slots - busy) / n if n else float("nan")
    run_mean = statistics.mean(j["runtime_s"] for j in jobs)
    startup = run_mean - scan_s
    peak = max(j["maxrss_mb"] for j in jobs)

    print(f"\n{'':<34}{'MultiProc':>12}{'local SLURM':>14}")
    print(f"{'scans':<34}{a.n:>12}{a.n:>14}")
    print(f"{'CPUs (slots)':<34}{a.slots:>12}{a.slots:>14}")
    print(f"{'wall time, s':<34}{mp['wall_s']:>12.1f}{sl['wall_s']:>14.1f}")
    print(f"{'  of which the array phase, s':<34}{'':>12}{sl['array_wall_s']:>14.1f}")
    print(f"{'wall per scan, s':<34}{mp['wall_s'] / a.n:>12.2f}{sl['wall_s'] / a.n:>14.2f}")
    print(f"{'peak RSS, MB (largest process)':<34}{mp['maxrss_mb']:>12.0f}{peak:>14.0f}")
    print(f"\nSLURM, per job ({n} array tasks, one scan each):")
    print(f"  itermask-qc runtime in the job   mean {run_mean:.1f} s, max "
          f"{max(j['runtime_s'] for j in jobs):.1f} s")
    print(f"  of which the scan itself         mean {scan_s:.1f} s (runtime_s of _qc.json)")
    print(f"  CLI start-up per job             {startup:.1f} s (Python, imports, BIDS index, "
          f"model load)")
    print(f"  scheduler overhead per job       {overhead:.1f} s  = ({sl['array_wall_s']:.1f} s x "
          f"{a.slots} slots - {busy:.1f} s busy) / {n} jobs")
    print(f"  peak RSS per job                 mean "
          f"{statistics.mean(j['maxrss_mb'] for j in jobs):.0f} MB, max {peak:.0f} MB")
    print(f"  scores equal to MultiProc        {same}/{len(ref)} scans")

    # ----------------------------------------------------------------- estimate
    per_job = REAL_SCAN_CPU_S + startup + overhead
    mem_slots = int(a.mem_per_node_gb // 3)
    slots = a.nodes * min(a.cores_per_node, mem_slots)
    waves = -(-a.scans // slots)
    est = waves * per_job
    print(f"\nestimate: {a.scans} scans on {a.nodes} nodes x {a.cores_per_node} cores, "
          f"{a.mem_per_node_gb:.0f} GB (pattern B, --per scan, 1 CPU + 3 GB per task):")
    print(f"  per-scan CPU time (1 mm head, deepbet, default model; node_resources.py) "
          f"= {REAL_SCAN_CPU_S:.1f} s")
    print(f"  + CLI start-up {startup:.1f} s + scheduler overhead {overhead:.1f} s "
          f"(measured here) = {per_job:.1f} s per job")
    print(f"  slots = {a.nodes} x min({a.cores_per_node} cores, {a.mem_per_node_gb:.0f} GB / "
          f"3 GB = {mem_slots}) = {slots}")
    print(f"  waves = ceil({a.scans} / {slots}) = {waves}; wall = {waves} x {per_job:.1f} s "
          f"= {est:.0f} s = {est / 3600:.2f} h (+ the group job)")
    print(f"  core-hours = {a.scans} x {per_job:.1f} s / 3600 = "
          f"{a.scans * per_job / 3600:.0f}")
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
