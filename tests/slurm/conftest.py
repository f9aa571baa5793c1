"""Fixtures for the SLURM tests: a real single-node SLURM cluster for the session.

``local_slurm`` installs nothing. When ``munged``, ``slurmctld`` and ``slurmd`` (Debian
``slurm-wlm`` + ``munge``; ``.ci/run`` installs them) are on PATH and we are root, it starts
the three daemons from a temp dir, waits for the node to be idle, exports ``SLURM_CONF``
(and ``LOGNAME``, which Nipype's SLURM plugin needs) for the tests, and stops the daemons by
PID at the end of the session. Otherwise every test that uses it is skipped with the reason.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _load(name: str):
    """Import a helper module of this folder (tests use --import-mode=importlib)."""
    mod_name = f"_itermask_slurm_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


local_slurm_mod = _load("local_slurm")


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    """A running one-node SLURM (2 CPUs, 20000 MB, partition ``debug``); yields it."""
    missing = local_slurm_mod.missing_binaries()
    if missing:
        pytest.skip(f"SLURM binaries not installed ({', '.join(missing)}); "
                    "apt-get install slurm-wlm munge (see .ci/run)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM recipe runs slurmctld/slurmd/munged as root")
    cluster = local_slurm_mod.LocalSlurm()
    try:
        cluster.start()
    except local_slurm_mod.LocalSlurmError as exc:
        cluster.cleanup()
        pytest.fail(f"could not start the local SLURM: {exc}")
    old = {k: os.environ.get(k) for k in ("SLURM_CONF", "LOGNAME")}
    os.environ["SLURM_CONF"] = str(cluster.conf)
    os.environ.setdefault("LOGNAME", os.environ.get("USER", "root"))
    try:
        yield cluster
    finally:
        cluster.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cluster.cleanup()


def slurm_env() -> dict:
    env = dict(os.environ)
    env["NIPYPE_NO_ET"] = "1"
    return env


def job_states(job_ids) -> dict[str, str]:
    """``{job or array-task id: state}`` from ``scontrol show job`` (no accounting here).

    Array tasks are reported as ``<array id>_<index>``.
    """
    states: dict[str, str] = {}
    for jid in job_ids:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(jid)],
                             capture_output=True, text=True, env=slurm_env()).stdout
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            key = fields.get("JobId")
            if fields.get("ArrayTaskId"):
                key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            if key:
                states[key] = fields.get("JobState", "?")
    return states


def wait_for_jobs(job_ids, timeout: float = 300.0, poll: float = 0.5) -> dict[str, str]:
    """Block until none of ``job_ids`` is pending/running; return their final states."""
    ids = [str(j) for j in job_ids]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        res = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)],
                             capture_output=True, text=True, env=slurm_env())
        if res.returncode == 0 and not res.stdout.strip():
            return job_states(ids)
        time.sleep(poll)
    subprocess.run(["scancel", *ids], env=slurm_env())
    raise TimeoutError(f"SLURM jobs {ids} still queued after {timeout:.0f} s")


@pytest.fixture(scope="session")
def slurm_helpers():
    """``wait_for_jobs`` and ``job_states`` for the tests."""
    return {"wait_for_jobs": wait_for_jobs, "job_states": job_states}
