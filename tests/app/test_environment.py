"""Faults of the environment, not of a scan: one line, a documented exit code, no traceback.

Unwritable OUTPUT_DIR or work dir (a file, under a file, read-only, full, under /proc),
Ctrl-C with MultiProc workers, and a second run on a work dir in use.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from app_testlib import base_args, make_dataset, qc_of

from qc_pipeline.cli.app import main


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("env") / "bids")


def _one_error_line(capsys) -> str:
    """The console's one ERROR line (the CLI's handlers write to stderr)."""
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "[ERROR]" in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("where", ["output_is_file", "output_under_file", "work_is_file",
                                   "work_under_file", "output_under_proc"])
def test_unwritable_output_or_work_dir_is_one_line_73(ds, tmp_path, model_dir, capsys, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out, work = tmp_path / "out", tmp_path / "work"
    if where == "output_is_file":
        out = blocker
    elif where == "output_under_file":
        out = blocker / "out"
    elif where == "work_is_file":
        work = blocker
    elif where == "work_under_file":
        work = blocker / "work"
    else:
        out = Path("/proc/itermask-qc-out")
    rc = main(base_args(ds["root"], out, work, model_dir))
    assert rc == 73
    line = _one_error_line(capsys)
    target = out if "output" in where else work
    assert f"{'OUTPUT_DIR' if 'output' in where else 'work dir (-w)'} {target}" in line
    assert ("is a file, not a folder" if where.endswith("is_file") else "cannot be written") in line


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"),
                                         (errno.ENOSPC, "no space left on the device")])
@pytest.mark.parametrize("level", ["participant", "group"])
def test_read_only_or_full_output_is_one_line_73(ds, tmp_path, model_dir, capsys, monkeypatch,
                                                 code, words, level):
    def refuse(*args, dir=None, **kwargs):  # noqa: A002
        raise OSError(code, os.strerror(code), str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    args = base_args(ds["root"], tmp_path / "out", tmp_path / "work", model_dir)
    args[2] = level
    if level == "group":
        args = args[:3]
    assert main(args) == 73
    line = _one_error_line(capsys)
    assert f"OUTPUT_DIR {tmp_path / 'out'} cannot be written" in line and words in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line_73(ds, tmp_path, model_dir, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(base_args(ds["root"], ro, tmp_path / "work", model_dir)) == 73
    finally:
        ro.chmod(0o755)
    assert "permission denied" in _one_error_line(capsys)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_with_130_no_workers_left_and_a_second_run_is_refused(ds, tmp_path,
                                                                           model_dir, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    args = base_args(ds["root"], out, work, model_dir, "--nprocs", "2")
    code = "import sys; from qc_pipeline.cli.app import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, NIPYPE_NO_ET="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE,
                            text=True, env=env, cwd=str(Path(__file__).parent),
                            # Ctrl-C as a terminal delivers it, even under a shell's `&`
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        head = []
        while not any("screening" in ln for ln in head):
            line = proc.stderr.readline()
            assert line, "".join(head)
            head.append(line)
        # the work dir is held: a second run on it is refused at once, in one line
        t0 = time.perf_counter()
        assert main(base_args(ds["root"], tmp_path / "out2", work, model_dir)) == 75
        line = _one_error_line(capsys)
        assert f"work dir {work} is in use by another itermask-qc run (pid {proc.pid}" in line
        assert time.perf_counter() - t0 < 30
        deadline = time.time() + 60
        while len(_children(proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1].endswith("interrupted; re-run with the same -w to resume")
    time.sleep(0.5)
    assert [w for w in workers if Path(f"/proc/{w}").exists()
            and "zombie" not in Path(f"/proc/{w}/status").read_text()] == []
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # the lock went with the run: the same command resumes and finishes
    assert main(args) == 0
    assert qc_of(out, ds["t1w"][0])["status"] == "ok"


def test_work_dir_removed_mid_run_stops_with_one_line_74(ds, tmp_path, model_dir, capsys,
                                                         monkeypatch):
    import shutil

    from qc_pipeline.workflows import interfaces

    out, work = tmp_path / "out", tmp_path / "work"
    real = interfaces.LoadValidate._run_interface
    calls = []

    def load_then_lose_the_work_dir(self, runtime):
        calls.append(1)
        shutil.rmtree(work)  # a cleanup script or a scratch purge
        return real(self, runtime)

    monkeypatch.setattr(interfaces.LoadValidate, "_run_interface", load_then_lose_the_work_dir)
    assert main(base_args(ds["root"], out, work, model_dir)) == 74
    # Nipype may report the one node cut short; the tool says one line, and says it last
    ours = [ln for ln in capsys.readouterr().err.splitlines() if "] " in ln and ln[:2].isdigit()]
    assert [ln for ln in ours if "[ERROR]" in ln] == ours[-1:]
    assert f"work dir {work} was removed during the run" in ours[-1]
    assert len(calls) == 1  # stopped at once, not one crash per remaining node
    # no scan was given a record it did not earn
    assert not list(out.rglob("*_qc.json"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl")
def test_kill_9_of_the_main_process_leaves_no_workers(ds, tmp_path, model_dir):
    args = base_args(ds["root"], tmp_path / "out", tmp_path / "work", model_dir, "--nprocs", "2")
    code = "import sys; from qc_pipeline.cli.app import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, NIPYPE_NO_ET="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.DEVNULL,
                            env=env, cwd=str(Path(__file__).parent))
    try:
        deadline = time.time() + 90
        # workers bind to the main process when they start their first node
        while time.time() < deadline and len(list((tmp_path / "work").rglob("result_load.pklz"))) < 2:
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2
    finally:
        proc.kill()
        proc.wait()

    def alive():
        return [w for w in workers if Path(f"/proc/{w}").exists()
                and "zombie" not in Path(f"/proc/{w}/status").read_text()]

    deadline = time.time() + 20
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    left = alive()
    for w in left:  # never leave them to the next test
        os.kill(w, signal.SIGKILL)
    assert left == []
