"""The run-time of ``itermask-qc``: logging handlers, Nipype's configuration, the output and
work folders (and the work dir's lock), file-system messages, SIGINT/SIGTERM.

This module is the only place that configures logging handlers and Nipype.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

from ..config import Settings
from .exits import EXIT_CANT_CREATE, EXIT_IN_USE, CLIError

LOGGER = logging.getLogger(__name__)

#: held in the work dir while a run uses it (:func:`lock_work_dir`)
LOCK_NAME = ".itermask-qc.lock"


# --------------------------------------------------------------------------- logging
class _OneLineFormatter(logging.Formatter):
    def format(self, record):
        text = super().format(record)
        return text if record.exc_info else " ".join(text.splitlines())


def setup_logging(verbose: int) -> list[logging.Handler]:
    """Console handler (stderr) on the ``qc_pipeline`` logger; returns the handlers added."""
    level = logging.DEBUG if verbose >= 1 else logging.INFO
    fmt = _OneLineFormatter("%(asctime)s [%(levelname)s] %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(level)
    handlers.append(console)
    ours = logging.getLogger("qc_pipeline")
    ours.setLevel(logging.DEBUG)
    ours.propagate = False
    for h in handlers:
        ours.addHandler(h)
    return handlers


def teardown_logging(handlers: Sequence[logging.Handler]) -> None:
    ours = logging.getLogger("qc_pipeline")
    for h in handlers:
        ours.removeHandler(h)
        for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
            logging.getLogger(name).removeHandler(h)
        h.close()


def configure_nipype(settings: Settings) -> None:
    from nipype import config as ncfg
    from nipype import logging as nlogging

    crash = Path(settings.work_dir) / "crash"
    ncfg.update_config({
        "execution": {
            "crashdump_dir": str(crash),
            "crashfile_format": "txt",
            "stop_on_first_crash": False,
            "poll_sleep_duration": 0.02,
            "check_version": False,
            "hash_method": "timestamp",
            "remove_unnecessary_outputs": True,
            "create_report": False,
            "write_provenance": False,
        },
        "monitoring": {"enabled": False},
        "logging": {
            "workflow_level": "INFO" if settings.verbose >= 2 else "WARNING",
            "interface_level": "INFO" if settings.verbose >= 2 else "WARNING",
            "utils_level": "WARNING",
            "log_to_file": False,
        },
    })
    nlogging.update_logging(ncfg)


# --------------------------------------------------------------------------- environment
_ERRNO_WORDS = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "exists and is not a folder",
    errno.ENOENT: "a folder on the path does not exist or cannot hold new files",
}


def environment_message(exc: OSError) -> str:
    """One line for a file-system fault: what failed and on which path (the one place that
    words them, for the checks before the run and for faults during it)."""
    words = _ERRNO_WORDS.get(exc.errno) or (exc.strerror or type(exc).__name__).lower()
    path = exc.filename if exc.filename is not None else ""
    return f"{path}: {words}" if path else words


def prepare_dir(path: Path, what: str) -> None:
    """Create ``path`` (and its parents) and prove that a file can be written in it.

    Raises
    ------
    CLIError
        Exit 73 (EX_CANTCREAT), one line naming ``what`` and the reason: a file where the
        folder should be, a path under a file, a read-only or full file system, no
        permission, a pseudo file system such as /proc.
    """
    try:
        if path.exists() and not path.is_dir():
            raise CLIError(f"{what} {path} is a file, not a folder", EXIT_CANT_CREATE)
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".itermask-qc-write-test.")
        try:
            os.write(fd, b"itermask-qc")  # a block must be allocated: a full disk says so here
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        if exc.filename is not None and os.fspath(exc.filename) == str(path):
            exc.filename = None  # the line names the path already
        raise CLIError(f"{what} {path} cannot be written ({environment_message(exc)})",
                       EXIT_CANT_CREATE) from None


def lock_work_dir(work_dir: Path, run_id: str):
    """Hold ``<work_dir>/.itermask-qc.lock`` for this run (released when the returned file is
    closed or the process ends, also by ``kill -9``). A file system without locks gets a
    warning and an unguarded run.

    Two runs on one work dir would share Nipype's cache and the BIDS index database and
    overwrite each other's records, so the second is refused.

    Raises
    ------
    CLIError
        Exit 75 (EX_TEMPFAIL) when another run holds it, naming that run.
    """
    import fcntl
    import socket

    fh = open(Path(work_dir) / LOCK_NAME, "a+", encoding="utf-8")
    try:
        # a POSIX record lock, not flock: it belongs to this process alone, so forked workers
        # still finishing a node never hold it after the main process died (works on NFS)
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            LOGGER.warning("work dir %s cannot be locked (%s); do not start a second run on it",
                           work_dir, environment_message(exc))
            return fh
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise CLIError(f"work dir {work_dir} is in use by another itermask-qc run ({holder}); "
                       f"wait for it to finish or pass another -w/--work-dir", EXIT_IN_USE) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}, run {run_id}\n")
    fh.flush()
    return fh


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job's time limit, ``kill``): stops the run like Ctrl-C, exit 143."""


class WorkDirGone(BaseException):
    """The work dir vanished during the run: every later node would fail on it. A
    BaseException, so that Nipype's per-node ``except Exception`` lets it through."""


def stop_workers() -> None:
    """End the worker processes this process started (MultiProc's pool), so that none
    outlives an interrupted run holding its memory."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=2)
        if child.is_alive():
            child.kill()


_MAIN_PID: Optional[int] = None
#: the signal that stopped the run; Nipype turns a KeyboardInterrupt raised inside a node
#: into a node crash and carries on, so the progress callback raises it again from here
_STOPPED_BY: dict = {"signum": None}


def raise_if_stopped(work_dir: Optional[Path] = None) -> None:
    signum = _STOPPED_BY["signum"]
    if signum is not None:
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    # the lock file, not the folder: Nipype recreates the folders of the nodes it runs next
    if work_dir is not None and not (Path(work_dir) / LOCK_NAME).exists():
        logging.getLogger("nipype.workflow").setLevel(logging.CRITICAL)
        stop_workers()
        raise WorkDirGone(f"work dir {work_dir} was removed during the run; the scans not "
                           f"finished have no result: run again to screen them")


def _on_signal(signum, frame):  # noqa: ARG001
    # the run is over: Nipype's multi-line reports of the nodes cut short would bury the
    # one line that says so
    logging.getLogger("nipype.workflow").setLevel(logging.CRITICAL)
    if os.getpid() != _MAIN_PID:
        # a forked worker: leave quietly (SystemExit unwinds the atomic writers, which
        # remove their temp files); its node is rerun on resume
        raise SystemExit(128 + signum)
    _STOPPED_BY["signum"] = signum
    stop_workers()
    raise_if_stopped()


def install_signal_handlers(stack: contextlib.ExitStack) -> None:
    """SIGINT and SIGTERM stop the run (workers included); a signal the caller set to be
    ignored (a background job of a script) stays ignored."""
    global _MAIN_PID
    _STOPPED_BY["signum"] = None
    if threading.current_thread() is not threading.main_thread():
        return
    _MAIN_PID = os.getpid()
    for sig in (signal.SIGINT, signal.SIGTERM):
        old = signal.getsignal(sig)
        if old == signal.SIG_IGN:
            continue
        signal.signal(sig, _on_signal)
        stack.callback(signal.signal, sig, old)


def setup_logging_file(settings: Settings, handlers: list) -> logging.Handler:
    """Add the per-run log file ``OUTPUT_DIR/logs/itermask-qc-<runid>.log``."""
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(settings.log_file, encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(name)s [%(levelname)s] %(message)s"))
    fh.setLevel(logging.DEBUG)
    logging.getLogger("qc_pipeline").addHandler(fh)
    for name in ("nipype.workflow", "nipype.interface"):
        logging.getLogger(name).addHandler(fh)
    handlers.append(fh)
    return fh
