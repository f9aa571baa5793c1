"""Exit codes of the command lines, and the one place that maps exceptions to them.

Exit codes (BIDS execution spec / sysexits): 0 success; 1 some scans failed (the last line
names them); 16 invalid dataset; 17 unknown analysis level; 18 the filters matched no
scans; 64 usage error (bad option value, unknown participant label, output inside the
input; ``itermask-qc-calibrate``: a model card it cannot read); 66 no input (BIDS_DIR missing;
for the group level: no participant-level results; for ``itermask-qc-calibrate``: no model
card or too few clean results to fit on);
69 a tool the command needs is not there (``sbatch`` off a SLURM login node); 73
OUTPUT_DIR or the work dir cannot be made or written; 74 the file system failed during the
run; 75 the work dir (or, for ``itermask-qc-sbatch``, the output folder's previous
submission) is in use; 130 interrupted (SIGINT); 143 terminated (SIGTERM).

The library raises typed exceptions; :func:`exit_code_for` says which code each one ends
a command with.
"""
from __future__ import annotations

from typing import Optional

from ..bids import BIDSInputError, DatasetNotFound, InvalidDataset, InvalidFilter, NoScansFound, UnknownLabel
from ..cluster import SbatchError
from ..errors import QCPipelineError

EXIT_OK = 0
EXIT_SCANS_FAILED = 1
EXIT_INVALID_DATASET = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_SCANS = 18
EXIT_USAGE = 64
EXIT_NO_INPUT = 66
EXIT_UNAVAILABLE = 69   # EX_UNAVAILABLE: a tool the command needs is missing (sbatch)
EXIT_CANT_CREATE = 73   # EX_CANTCREAT: OUTPUT_DIR or the work dir cannot be made or written
EXIT_IO_ERROR = 74      # EX_IOERR: the file system failed during the run (full disk, ...)
EXIT_IN_USE = 75        # EX_TEMPFAIL: another run holds the work dir; try again later
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143   # 128 + SIGTERM (a job's time limit)


class CLIError(QCPipelineError):
    """An error the CLI reports in one line and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_for(exc: BaseException) -> Optional[int]:
    """The exit code a command ends with after ``exc``; ``None`` for an exception that is not
    a reported error (a bug: let it propagate).

    :class:`CLIError` and :class:`~qc_pipeline.cluster.SbatchError` carry their own code;
    the BIDS input errors map by type (most specific first).
    """
    if isinstance(exc, (CLIError, SbatchError)):
        return exc.exit_code
    for kind, code in ((DatasetNotFound, EXIT_NO_INPUT), (InvalidDataset, EXIT_INVALID_DATASET),
                       (UnknownLabel, EXIT_USAGE), (InvalidFilter, EXIT_USAGE),
                       (NoScansFound, EXIT_NO_SCANS), (BIDSInputError, EXIT_SCANS_FAILED)):
        if isinstance(exc, kind):
            return code
    return None
