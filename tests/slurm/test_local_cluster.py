"""The local SLURM itself: arrays, dependencies, memory/CPU packing (trivial jobs)."""
from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.slurm


def _sbatch(*args) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def test_array_then_dependent_job_and_packing(local_slurm, slurm_helpers, tmp_path):
    """Two 1-CPU/1G tasks run side by side on the 2-CPU node; a dependent job waits for
    both (afterany) even when one fails; a task asking for more than the node is refused."""
    out = tmp_path / "o"
    out.mkdir()
    arr = _sbatch("--array=0-1", f"--chdir={tmp_path}", "-c", "1", "--mem=1G", "-o", f"{out}/a_%A_%a.out",
                  "--wrap", 'date +%s.%N > "$PWD/start_$SLURM_ARRAY_TASK_ID";'
                            ' sleep 2; exit $SLURM_ARRAY_TASK_ID')
    dep = _sbatch(f"--dependency=afterany:{arr}", f"--chdir={tmp_path}", "-o", f"{out}/g_%j.out",
                  "--wrap", 'ls "$PWD" > "$PWD/group_saw"')
    states = slurm_helpers["wait_for_jobs"]([arr, dep], timeout=120)
    assert states[f"{arr}_0"] == "COMPLETED"
    assert states[f"{arr}_1"] == "FAILED"  # exit 1
    assert states[dep] == "COMPLETED"
    starts = [float((tmp_path / f"start_{i}").read_text()) for i in (0, 1)]
    assert abs(starts[0] - starts[1]) < 1.5  # packed: both ran at once on 2 CPUs
    saw = (tmp_path / "group_saw").read_text().split()
    assert "start_0" in saw and "start_1" in saw
    r = subprocess.run(["sbatch", "--parsable", "--mem=30G", "--wrap", "true"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "memory" in r.stderr.lower()
