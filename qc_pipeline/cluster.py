"""SLURM: plan the units of a BIDS dataset, render the job-array and group scripts, submit
them (the library behind ``itermask-qc-sbatch``, :mod:`qc_pipeline.cli.sbatch`).

The pattern MRIQC documents for clusters: one array task per subject (or per scan), each
running ``itermask-qc BIDS OUT participant --participant-label ...`` in a node-local work
directory and copying back only the derivatives, then one job for the group level that
depends on the whole array (``--dependency=afterany:<array id>``).

Resume: every submission first looks at ``OUTPUT_DIR`` and keeps only the units (subjects
or scans) that still lack a finished ``<source>_qc.json`` from the model the tasks would
load (its content key); a resubmission after some tasks failed (or were killed) reruns
those and nothing else.

Layout of one submission (everything under ``OUTPUT_DIR/logs/slurm/<submission id>/``)::

    participant.sbatch   the array script (from templates/sbatch_array.tmpl)
    group.sbatch         the group-level script (from templates/sbatch_group.tmpl)
    units.tsv            one line per unit: subject, BIDS filter file or "-", unit key
    filters/NNNNN.json   per-scan --bids-filter-file (``--per scan`` only)
    itermask-qc_<array id>_<task>.out, itermask-qc-group_<job id>.out   SLURM logs
    submission.json      what was submitted (job ids, units, resources)

Library functions (no side effects at import) are used by the command line, the tests and the
benchmark; the console script is :func:`qc_pipeline.cli.sbatch.main`.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from . import __version__
from .errors import QCPipelineError
from .io import atomic_write_file, atomic_write_json

LOGGER = logging.getLogger(__name__)

#: default resources of one participant-level array task (see docs/cluster.md)
DEFAULT_CPUS_PER_TASK = 1
DEFAULT_MEM_PER_TASK = "3G"
DEFAULT_TIME = "01:00:00"
DEFAULT_GROUP_MEM = "2G"
DEFAULT_GROUP_TIME = "00:30:00"
#: Slurm's default MaxArraySize (largest index + 1) when scontrol cannot tell
DEFAULT_MAX_ARRAY_SIZE = 1001

#: itermask-qc options that itermask-qc-sbatch sets itself in the array tasks
_RESERVED = ("-w", "--work-dir", "--participant-label", "--participant_label", "--nprocs",
             "--n_procs", "--n-procs", "--use-plugin")

ARRAY_TEMPLATE = "sbatch_array.tmpl"
GROUP_TEMPLATE = "sbatch_group.tmpl"

class SbatchError(QCPipelineError, RuntimeError):
    """A problem preparing or submitting the SLURM jobs; ``exit_code`` for the CLI."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- units
@dataclass
class Unit:
    """One unit of work: a subject (all its scans) or a single scan.

    Attributes
    ----------
    key : str
        ``sub-<label>`` for a subject, the scan's path relative to the BIDS root for a scan.
    subject : str
        Subject label without ``sub-``.
    scans : list of dict
        ``{"relpath", "bids_name", "out_reldir", "entities"}`` of each scan the unit covers.
    """

    key: str
    subject: str
    scans: list = field(default_factory=list)

    def qc_json_paths(self, output_dir: str | os.PathLike) -> list[Path]:
        out = Path(output_dir)
        return [out / s["out_reldir"] / f"{s['bids_name']}_qc.json" for s in self.scans]


def _scan_dict(rec) -> dict:
    return {"relpath": rec.relpath, "bids_name": rec.bids_name,
            "out_reldir": rec.out_reldir, "entities": dict(rec.entities)}


def plan_units(scans: Iterable, per: str = "subject") -> list[Unit]:
    """Group scan records (:class:`qc_pipeline.bids.ScanRecord`) into units of work.

    Parameters
    ----------
    scans : iterable of ScanRecord
        The scans the participant level would screen.
    per : {"subject", "scan"}
        One unit per subject (all its scans) or one per scan.

    Returns
    -------
    list of Unit
        Sorted by key, so that the same dataset always gives the same order.
    """
    if per not in ("subject", "scan"):
        raise SbatchError(f"--per {per!r}: expected 'subject' or 'scan'", 64)
    units: dict[str, Unit] = {}
    for rec in scans:
        if per == "subject":
            key = f"sub-{rec.subject}"
        else:
            key = rec.relpath
        unit = units.setdefault(key, Unit(key=key, subject=rec.subject))
        unit.scans.append(_scan_dict(rec))
    return [units[k] for k in sorted(units)]


def scan_finished(qc_json: str | os.PathLike, *, rerun_errors: bool = False,
                  model_key: Optional[str] = None) -> bool:
    """Whether a scan's ``_qc.json`` says it was screened (by this model, if given).

    A missing or unreadable file (a task that crashed, was killed or ran out of memory or
    time) is unfinished. ``status: "error"`` is a finished scan whose *input* is bad (it
    would fail the same way again) unless ``rerun_errors``. With ``model_key`` (the content
    key of the model the task would load, :func:`qc_pipeline.engine.modelio.model_content_key`)
    an ok record counts only when it carries that key and this package version: the
    participant level's own resume rule would screen it again, so it must be submitted.
    """
    from .derivatives import read_qc

    data = read_qc(qc_json)
    if data is None:
        return False
    status = data.get("status")
    if status == "ok":
        return model_key is None or (data.get("model_key") == model_key
                                     and data.get("package_version") == __version__)
    if status == "error":
        return not rerun_errors
    return False


def missing_units(units: Sequence[Unit], output_dir: str | os.PathLike, *,
                  rerun_errors: bool = False,
                  model_keys: Optional[Mapping[str, str]] = None) -> list[Unit]:
    """The units with at least one scan not finished in ``output_dir``, in input order.

    ``model_keys``: suffix -> content key of the model that screens it (see
    :func:`expected_model_keys`); a scan whose suffix has no key is judged by status alone.
    """
    keys = dict(model_keys or {})
    return [u for u in units
            if not all(scan_finished(p, rerun_errors=rerun_errors,
                                     model_key=keys.get(s["entities"].get("suffix")))
                       for s, p in zip(u.scans, u.qc_json_paths(output_dir)))]


def expected_model_keys(cli_args: Sequence[str], suffixes: Sequence[str]) -> dict[str, str]:
    """The content key of the model ``itermask-qc`` would load for each suffix with these
    arguments: with ``--model-dir``, that folder's key for its card's contrast (the only one
    the participant level then screens); else each suffix's packaged folder. A folder that
    cannot be read gives no key (the participant level reports it itself)."""
    from .engine.modelio import default_model_dir, load_model_card, model_content_key

    given = _option_values(cli_args, ["--model-dir"])
    keys: dict[str, str] = {}
    for suffix in suffixes:
        try:
            folder = Path(given[0]) if given else default_model_dir(suffix)
            if given and str(load_model_card(folder).get("contrast", "")).lower() != suffix.lower():
                continue
            keys[suffix] = model_content_key(folder)
        except Exception as exc:  # a bad folder is the participant level's error to report
            LOGGER.warning("no model key for %s (%s): scans are judged by status alone", suffix, exc)
    return keys


def compress_indices(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (SLURM ``--array`` syntax)."""
    idx = sorted(set(int(i) for i in indices))
    if not idx:
        raise SbatchError("no array indices to submit")
    parts, start, prev = [], idx[0], idx[0]
    for i in idx[1:]:
        if i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        start = prev = i
    parts.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ",".join(parts)


def split_array(n_tasks: int, max_array_size: int = DEFAULT_MAX_ARRAY_SIZE,
                max_parallel: Optional[int] = None) -> list[tuple[int, str]]:
    """Split ``n_tasks`` array tasks into arrays SLURM accepts.

    SLURM refuses indices >= ``MaxArraySize``; larger runs become several arrays, each
    with a task offset. Returns ``[(offset, "--array value"), ...]``.
    """
    if n_tasks < 1:
        raise SbatchError("no array tasks to submit")
    if max_array_size < 2:
        raise SbatchError(f"MaxArraySize {max_array_size} is too small for job arrays")
    out = []
    for offset in range(0, n_tasks, max_array_size):
        n = min(max_array_size, n_tasks - offset)
        spec = f"0-{n - 1}" if n > 1 else "0"
        if max_parallel:
            spec += f"%{int(max_parallel)}"
        out.append((offset, spec))
    return out


def scan_filter(entities: dict) -> dict:
    """A ``--bids-filter-file`` body that matches exactly the scan with ``entities``.

    Every entity the scan lacks is set to ``null`` ("absent"), so that
    ``sub-01_T1w`` does not also match ``sub-01_run-2_T1w``.
    """
    from .bids import ENTITY_KEYS

    body = {k: None for k in ENTITY_KEYS if k != "subject"}
    for k, v in entities.items():
        if k in ENTITY_KEYS and k != "subject":
            body[k] = v
    return {entities["suffix"].lower(): body}


# --------------------------------------------------------------------------- rendering
def _q(value) -> str:
    return shlex.quote(str(value))


def _template_env():
    import jinja2

    from importlib import resources

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("qc_pipeline.templates"))),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = _q
    return env


@dataclass
class Resources:
    """What one participant-level array task asks SLURM for."""

    cpus_per_task: int = DEFAULT_CPUS_PER_TASK
    mem_per_task: str = DEFAULT_MEM_PER_TASK
    time: str = DEFAULT_TIME
    partition: Optional[str] = None
    gpu: bool = False
    extra_sbatch: list = field(default_factory=list)
    group_mem: str = DEFAULT_GROUP_MEM
    group_time: str = DEFAULT_GROUP_TIME


def render_array_script(*, bids_dir, output_dir, units_file, log_dir, per: str,
                        n_units: int, units_per_task: int, resources: Resources,
                        cli_args: Sequence[str], itermask_qc: str, python: str,
                        script_path, job_name: str = "itermask-qc") -> str:
    """Render ``templates/sbatch_array.tmpl``."""
    tmpl = _template_env().get_template(ARRAY_TEMPLATE)
    return tmpl.render(
        bids_dir=bids_dir, output_dir=output_dir, units_file=units_file, log_dir=log_dir,
        per=per, n_units=n_units, units_per_task=units_per_task, cli_args=list(cli_args),
        itermask_qc=itermask_qc, python=python, script_path=script_path,
        job_name=job_name, version=__version__, created=_now(),
        cpus_per_task=resources.cpus_per_task, mem_per_task=resources.mem_per_task,
        time=resources.time, partition=resources.partition, gpu=resources.gpu,
        extra_sbatch=resources.extra_sbatch)


def render_group_script(*, bids_dir, output_dir, log_dir, array_ids: Sequence[str],
                        resources: Resources, group_args: Sequence[str], itermask_qc: str,
                        rebuild_reports: bool = False,
                        job_name: str = "itermask-qc-group") -> str:
    """Render ``templates/sbatch_group.tmpl``."""
    group_cmd = " ".join(_q(a) for a in [itermask_qc, bids_dir, output_dir, "group",
                                         "-w", "$WORK_ROOT/work", *group_args])
    group_cmd = group_cmd.replace(_q("$WORK_ROOT/work"), '"$WORK_ROOT/work"')
    reports_cmd = None
    if rebuild_reports:
        reports_cmd = " ".join(_q(a) for a in [itermask_qc, bids_dir, output_dir,
                                               "participant", "--reports-only", "-w",
                                               "$WORK_ROOT/reports", *group_args])
        reports_cmd = reports_cmd.replace(_q("$WORK_ROOT/reports"), '"$WORK_ROOT/reports"')
    tmpl = _template_env().get_template(GROUP_TEMPLATE)
    return tmpl.render(
        array_ids=list(array_ids), log_dir=log_dir, job_name=job_name,
        version=__version__, created=_now(), partition=resources.partition,
        extra_sbatch=resources.extra_sbatch, group_mem=resources.group_mem,
        group_time=resources.group_time, group_cmd=group_cmd, reports_cmd=reports_cmd)


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- copying back
def collect_derivatives(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Copy a task's node-local derivatives folder into the shared ``OUTPUT_DIR``.

    Every file is written to a temporary name and renamed (atomic). Images and reports go
    first and each ``*_qc.json`` last, so a task killed while copying leaves no
    ``_qc.json`` without its images (and is rerun by the next submission).
    ``dataset_description.json`` is only written when ``dst`` has none. Returns the
    number of files copied.
    """
    src, dst = Path(src), Path(dst)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    files.sort(key=lambda p: p.name.endswith("_qc.json"))  # stable: qc.json last
    n = 0
    for f in files:
        rel = f.relative_to(src)
        target = dst / rel
        if rel.as_posix() == "dataset_description.json" and target.exists():
            continue
        atomic_write_file(target, lambda tmp, f=f: shutil.copyfile(f, tmp))
        n += 1
    return n


# --------------------------------------------------------------------------- SLURM calls
def _slurm(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise SbatchError(f"{cmd[0]} not found on PATH: is this a SLURM login node?", 69)
    res = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise SbatchError(f"{' '.join(cmd)} failed ({res.returncode}): "
                          f"{(res.stderr or res.stdout).strip()}", 1)
    return res


def max_array_size() -> int:
    """``MaxArraySize`` from ``scontrol show config`` (SLURM's default 1001 if unknown)."""
    try:
        out = _slurm(["scontrol", "show", "config"], check=False).stdout
    except SbatchError:
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


def sbatch(args: Sequence[str]) -> str:
    """Run ``sbatch --parsable ARGS`` and return the job id."""
    res = _slurm(["sbatch", "--parsable", *args])
    return res.stdout.strip().splitlines()[-1].split(";")[0]


def active_jobs(job_ids: Sequence[str]) -> list[str]:
    """The ids among ``job_ids`` that SLURM still lists as pending or running."""
    if not job_ids:
        return []
    res = _slurm(["squeue", "-h", "-o", "%F", "-j", ",".join(job_ids)], check=False)
    if res.returncode != 0:  # "Invalid job id specified": every id is long gone
        return []
    alive = set(res.stdout.split())
    return [j for j in job_ids if j in alive]


# --------------------------------------------------------------------------- resolving
def _option_values(args: Sequence[str], names: Sequence[str]) -> Optional[list[str]]:
    """Values of an option given as ``--opt a b`` or ``--opt=a`` in an argument list."""
    values, found, i = [], False, 0
    while i < len(args):
        a = args[i]
        name, eq, val = a.partition("=")
        if name in names:
            found = True
            if eq:
                values.append(val)
            else:
                j = i + 1
                while j < len(args) and not args[j].startswith("-"):
                    values.append(args[j])
                    j += 1
                i = j
                continue
        i += 1
    return values if found else None


def remove_option(args: Sequence[str], names: Sequence[str]) -> list[str]:
    out, i = [], 0
    while i < len(args):
        name = args[i].partition("=")[0]
        if name in names:
            i += 1
            if "=" not in args[i - 1]:
                while i < len(args) and not args[i].startswith("-"):
                    i += 1
            continue
        out.append(args[i])
        i += 1
    return out


def resolve_suffixes(cli_args: Sequence[str]) -> list[str]:
    """The contrasts ``itermask-qc`` would screen with these arguments.

    ``--suffix`` if given; else the contrast of ``--model-dir``'s model card; else every
    contrast whose packaged model folder holds weights (the CLI's own default).
    """
    from .config import SUFFIXES

    lookup = {s.lower(): s for s in SUFFIXES}
    given = _option_values(cli_args, ["--suffix"])
    if given:
        bad = [s for s in given if s.lower() not in lookup]
        if bad:
            raise SbatchError(f"--suffix {bad[0]}: expected one of {', '.join(SUFFIXES)}", 64)
        return [lookup[s.lower()] for s in given]
    model_dir = _option_values(cli_args, ["--model-dir"])
    if model_dir:
        try:
            from .engine.modelio import load_model_card

            contrast = load_model_card(Path(model_dir[0])).get("contrast")
            if contrast and contrast.lower() in lookup:
                return [lookup[contrast.lower()]]
        except Exception as exc:  # the CLI will report a bad model folder itself
            LOGGER.warning("could not read the model card in %s: %s", model_dir[0], exc)
        return list(SUFFIXES)
    try:
        from .engine.modelio import default_model_dir

        have = [s for s in SUFFIXES if (default_model_dir(s) / "weights.pt").is_file()]
    except Exception:
        have = []
    return have or list(SUFFIXES)


def list_scans(bids_dir, *, suffixes: Sequence[str], participant_label=None,
               session_label=None, bids_filter_file=None, database_path=None) -> list:
    """The scans ``itermask-qc ... participant`` would screen (its own BIDS walk)."""
    from .bids import collect_scans, load_filter_file

    filters = load_filter_file(bids_filter_file) if bids_filter_file else None
    return collect_scans(bids_dir, suffixes=list(suffixes),
                         participant_label=participant_label, session_label=session_label,
                         bids_filters=filters, database_path=database_path)


def _find_itermask_qc() -> str:
    here = Path(sys.executable).parent / "itermask-qc"
    if here.is_file():
        return str(here)
    found = shutil.which("itermask-qc")
    if found is None:
        raise SbatchError("itermask-qc not found next to this Python or on PATH", 69)
    return found


# --------------------------------------------------------------------------- prepare
@dataclass
class Submission:
    """Everything one ``itermask-qc-sbatch`` call prepared (and, unless dry, submitted)."""

    job_dir: Path
    per: str
    units: list
    todo: list
    array_script: Optional[Path] = None
    group_script: Optional[Path] = None
    arrays: list = field(default_factory=list)        # [(offset, --array spec)]
    array_commands: list = field(default_factory=list)
    group_command: Optional[list] = None
    array_ids: list = field(default_factory=list)
    group_id: Optional[str] = None

    def to_dict(self) -> dict:
        return {
            "job_dir": str(self.job_dir), "per": self.per,
            "units": [u.key for u in self.units], "todo": [u.key for u in self.todo],
            "array_script": str(self.array_script) if self.array_script else None,
            "group_script": str(self.group_script) if self.group_script else None,
            "arrays": self.arrays, "array_commands": self.array_commands,
            "group_command": self.group_command, "array_ids": self.array_ids,
            "group_id": self.group_id,
        }


def prepare(bids_dir, output_dir, *, per: str = "subject", resources: Resources = None,
            cli_args: Sequence[str] = (), participant_label=None, units_per_task: int = 1,
            rerun_errors: bool = False, max_parallel: Optional[int] = None,
            array_size_limit: Optional[int] = None, itermask_qc: Optional[str] = None,
            python: Optional[str] = None, submission_id: Optional[str] = None,
            scans: Optional[list] = None) -> Submission:
    """Work out what is missing and write the scripts for one submission (no SLURM call
    except ``scontrol show config`` when ``array_size_limit`` is None)."""
    resources = resources or Resources()
    bids_dir = Path(bids_dir).resolve()
    output_dir = Path(output_dir).resolve()
    if units_per_task < 1:
        raise SbatchError(f"--units-per-task {units_per_task}: expected 1 or more", 64)
    cli_args = list(cli_args)
    bad = [a for a in cli_args if a.partition("=")[0] in _RESERVED]
    if bad:
        raise SbatchError(f"{bad[0]}: itermask-qc-sbatch sets this itself; give "
                          "--participant-label to itermask-qc-sbatch, not after --", 64)
    if output_dir == bids_dir or bids_dir in output_dir.parents:
        raise SbatchError(f"output dir {output_dir} is inside the BIDS dir {bids_dir}", 64)

    slurm_root = output_dir / "logs" / "slurm"
    if scans is None:
        scans = list_scans(
            bids_dir, suffixes=resolve_suffixes(cli_args),
            participant_label=participant_label,
            session_label=_option_values(cli_args, ["--session-label"]),
            bids_filter_file=(_option_values(cli_args, ["--bids-filter-file"]) or [None])[0],
            database_path=slurm_root / "bids_db")
    units = plan_units(scans, per)
    suffixes = sorted({s["entities"].get("suffix") for u in units for s in u.scans} - {None})
    todo = missing_units(units, output_dir, rerun_errors=rerun_errors,
                         model_keys=expected_model_keys(cli_args, suffixes))

    sid = submission_id or _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    job_dir = slurm_root / sid
    sub = Submission(job_dir=job_dir, per=per, units=units, todo=todo)
    if not todo:
        return sub
    job_dir.mkdir(parents=True, exist_ok=False)

    task_args = list(cli_args)
    if per == "scan":  # the per-scan filter file replaces any user filter
        task_args = remove_option(task_args, ["--bids-filter-file"])
        (job_dir / "filters").mkdir()
    lines = []
    for i, unit in enumerate(todo):
        filt = "-"
        if per == "scan":
            path = job_dir / "filters" / f"{i:05d}.json"
            path.write_text(json.dumps(scan_filter(unit.scans[0]["entities"]), indent=1))
            filt = str(path)
        lines.append(f"{unit.subject}\t{filt}\t{unit.key}\n")
    units_file = job_dir / "units.tsv"
    units_file.write_text("".join(lines))

    itermask_qc = itermask_qc or _find_itermask_qc()
    python = python or sys.executable
    sub.array_script = job_dir / "participant.sbatch"
    sub.array_script.write_text(render_array_script(
        bids_dir=bids_dir, output_dir=output_dir, units_file=units_file, log_dir=job_dir,
        per=per, n_units=len(todo), units_per_task=units_per_task, resources=resources,
        cli_args=task_args, itermask_qc=itermask_qc, python=python,
        script_path=sub.array_script))
    n_tasks = -(-len(todo) // units_per_task)
    limit = array_size_limit or max_array_size()
    sub.arrays = split_array(n_tasks, limit, max_parallel)
    for offset, spec in sub.arrays:
        cmd = ["sbatch", "--parsable", f"--array={spec}"]
        if offset:
            cmd.append(f"--export=ALL,ITERMASK_QC_TASK_OFFSET={offset}")
        cmd.append(str(sub.array_script))
        sub.array_commands.append(cmd)
    group_args = remove_option(cli_args, ["--bids-filter-file", "--session-label"])
    sub.group_script = job_dir / "group.sbatch"
    sub.group_script.write_text(render_group_script(
        bids_dir=bids_dir, output_dir=output_dir, log_dir=job_dir,
        array_ids=["<array>"] * len(sub.arrays), resources=resources,
        group_args=group_args, itermask_qc=itermask_qc,
        rebuild_reports=(per == "scan")))
    sub.group_command = ["sbatch", "--parsable", "--dependency=afterany:<array ids>",
                         str(sub.group_script)]
    return sub


def submit(sub: Submission, *, group: bool = True) -> Submission:
    """Submit the prepared array(s) and the dependent group job; record submission.json."""
    if not sub.todo:
        return sub
    for cmd in sub.array_commands:
        sub.array_ids.append(sbatch(cmd[2:]))
    if group:
        # rewrite the header comment with the real ids, then submit with the dependency
        text = sub.group_script.read_text().replace(
            ", ".join(["<array>"] * len(sub.arrays)), ", ".join(sub.array_ids), 1)
        sub.group_script.write_text(text)
        dep = "afterany:" + ":".join(sub.array_ids)
        sub.group_command = ["sbatch", "--parsable", f"--dependency={dep}",
                             str(sub.group_script)]
        sub.group_id = sbatch(sub.group_command[2:])
    _write_json(sub.job_dir / "submission.json", sub.to_dict())
    _write_json(sub.job_dir.parent / "last_submission.json", sub.to_dict())
    return sub


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(data, path)


def still_running(output_dir) -> list[str]:
    """Job ids of the previous submission into ``output_dir`` that SLURM still lists."""
    last = Path(output_dir).resolve() / "logs" / "slurm" / "last_submission.json"
    try:
        data = json.loads(last.read_text())
    except (OSError, ValueError):
        return []
    ids = list(data.get("array_ids") or []) + ([data["group_id"]] if data.get("group_id") else [])
    return active_jobs(ids)


def follow_instructions(sub: Submission) -> str:
    """The lines printed after a submission: job ids and how to follow them."""
    ids = sub.array_ids + ([sub.group_id] if sub.group_id else [])
    first = sub.array_ids[0] if sub.array_ids else "<array>"
    lines = [
        f"submitted {len(sub.todo)} of {len(sub.units)} {sub.per}(s) "
        f"({len(sub.units) - len(sub.todo)} already finished)",
        f"  participant array job(s): {', '.join(sub.array_ids)}  "
        f"(--array={'; '.join(s for _, s in sub.arrays)})",
    ]
    if sub.group_id:
        lines.append(f"  group job: {sub.group_id}  (starts when the array has ended: "
                     f"--dependency=afterany:{':'.join(sub.array_ids)})")
    lines += [
        "follow them with:",
        f"  squeue -j {','.join(ids)}",
        f"  scontrol show job {first}          # state and exit code of each task",
        f"  sacct -j {','.join(ids)} --format=JobID,State,ExitCode,Elapsed,MaxRSS"
        "   # where accounting is enabled",
        f"  logs: {sub.job_dir}/itermask-qc_{first}_<task>.out",
    ]
    if sub.group_id:
        lines.append(f"        {sub.job_dir}/itermask-qc-group_{sub.group_id}.out")
    lines += [f"  units per task index: {sub.job_dir / 'units.tsv'}",
              "rerun this same command to resubmit only what failed or is missing."]
    return "\n".join(lines)
