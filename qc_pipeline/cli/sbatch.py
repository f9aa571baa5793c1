"""``itermask-qc-sbatch``: screen a BIDS dataset on SLURM as a job array + a group job.

The argument parser and :func:`main`; the planning, the scripts and the submission are
:mod:`qc_pipeline.cluster` (see its docstring for the pattern and the layout of a submission).
"""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import shutil
import sys
from typing import Optional, Sequence

from .. import __version__
from ..cluster import (DEFAULT_CPUS_PER_TASK, DEFAULT_MAX_ARRAY_SIZE, DEFAULT_MEM_PER_TASK, DEFAULT_TIME,
                       Resources, SbatchError, remove_option, follow_instructions, max_array_size,
                       prepare, still_running, submit)
from .exits import EXIT_IN_USE, EXIT_USAGE, exit_code_for

LOGGER = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="itermask-qc-sbatch",
        description=(
            "Screen a BIDS dataset with itermask-qc on SLURM: one job-array task per "
            "subject (or per scan) with a node-local work directory, then one group-level "
            "job that waits for the array. Resubmitting reruns only the subjects/scans "
            "whose _qc.json is missing."),
        epilog=("Arguments after -- go to every `itermask-qc ... participant` call (and "
                "to the group call), e.g. -- --skull-strip none --model-dir /models/t1w. "
                "See docs/cluster.md."))
    p.add_argument("bids_dir", help="the BIDS dataset (on a filesystem the nodes see)")
    p.add_argument("output_dir", help="the derivatives folder (shared filesystem)")
    p.add_argument("--per", choices=("subject", "scan"), default="subject",
                   help="one array task per subject (default) or per scan")
    p.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="only these subjects (with or without sub-)")
    p.add_argument("--partition", "-p", help="SLURM partition (default: the cluster's)")
    p.add_argument("--time", "-t", default=DEFAULT_TIME,
                   help=f"time limit per array task, HH:MM:SS (default {DEFAULT_TIME})")
    p.add_argument("--mem-per-task", default=DEFAULT_MEM_PER_TASK, metavar="M",
                   help=f"memory per array task, sbatch --mem syntax (default "
                        f"{DEFAULT_MEM_PER_TASK}; see docs/cluster.md for measured needs)")
    p.add_argument("--cpus-per-task", "-c", type=int, default=DEFAULT_CPUS_PER_TASK,
                   metavar="C", help="CPUs per array task, passed on as --nprocs "
                                     f"(default {DEFAULT_CPUS_PER_TASK})")
    p.add_argument("--gpu", action="store_true",
                   help="ask each task for one GPU (--gres=gpu:1) and run the model with "
                        "--device cuda")
    p.add_argument("--units-per-task", type=int, default=1, metavar="K",
                   help="subjects/scans run one after the other in one task (fewer, longer "
                        "jobs for very large studies; default 1)")
    p.add_argument("--max-parallel", type=int, metavar="N",
                   help="at most N tasks at a time (--array=...%%N)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra #SBATCH line for both scripts, e.g. --sbatch-arg=--account=lab "
                        "(repeatable)")
    p.add_argument("--rerun-errors", action="store_true",
                   help="also rerun scans whose _qc.json has status error (bad input is "
                        "otherwise final)")
    p.add_argument("--no-group", action="store_true", help="do not submit the group job")
    p.add_argument("--force", action="store_true",
                   help="submit even if the previous submission's jobs are still queued")
    p.add_argument("--dry-run", action="store_true",
                   help="write the scripts and print the sbatch commands, submit nothing")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    if args.gpu:
        problem = _cuda_problem()
        if problem and not args.dry_run:
            print(f"itermask-qc-sbatch: --gpu: {problem}", file=sys.stderr)
            return EXIT_USAGE
        if problem:
            LOGGER.warning("--gpu: %s", problem)
        extra = remove_option(extra, ["--device"]) + ["--device", "cuda"]
    resources = Resources(cpus_per_task=args.cpus_per_task, mem_per_task=args.mem_per_task,
                          time=args.time, partition=args.partition, gpu=args.gpu,
                          extra_sbatch=args.sbatch_arg)
    if args.cpus_per_task < 1:
        print(f"itermask-qc-sbatch: --cpus-per-task {args.cpus_per_task}: expected >= 1",
              file=sys.stderr)
        return EXIT_USAGE
    if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", args.time):
        print(f"itermask-qc-sbatch: --time {args.time!r}: expected HH:MM:SS or D-HH:MM:SS",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        if not args.dry_run and not args.force:
            running = still_running(args.output_dir)
            if running:
                raise SbatchError(
                    f"jobs {', '.join(running)} of the previous submission into "
                    f"{args.output_dir} are still queued or running; wait for them (squeue "
                    f"-j {','.join(running)}) or pass --force", EXIT_IN_USE)
        sub = prepare(args.bids_dir, args.output_dir, per=args.per, resources=resources,
                      cli_args=extra, participant_label=args.participant_label,
                      units_per_task=args.units_per_task, rerun_errors=args.rerun_errors,
                      max_parallel=args.max_parallel,
                      array_size_limit=None if not args.dry_run else _dry_limit())
        if not sub.todo:
            print(f"all {len(sub.units)} {args.per}(s) already have a finished _qc.json in "
                  f"{args.output_dir}; nothing to submit (run `itermask-qc "
                  f"{args.bids_dir} {args.output_dir} group` to refresh the group tables)")
            return 0
        if args.dry_run:
            print(f"dry run: {len(sub.todo)} of {len(sub.units)} {args.per}(s) to screen")
            print(f"  array script: {sub.array_script}")
            print(f"  group script: {sub.group_script}")
            for cmd in sub.array_commands:
                print("  " + shlex.join(cmd))
            if not args.no_group:
                print("  " + shlex.join(sub.group_command))
            return 0
        submit(sub, group=not args.no_group)
        print(follow_instructions(sub))
        return 0
    except SbatchError as exc:
        print(f"itermask-qc-sbatch: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except Exception as exc:  # typed BIDS errors have their exit code
        code = exit_code_for(exc)
        if code is None:
            raise
        print(f"itermask-qc-sbatch: {exc}", file=sys.stderr)
        return code


def _cuda_problem() -> Optional[str]:
    """Why the jobs of ``--gpu`` (``--device cuda``) would fail with the installed torch, or
    ``None``. A build without CUDA fails on every node; a CUDA build on a submit host without
    a GPU is fine (the jobs' nodes have one), so only the build is judged here."""
    from ..engine.inference import cuda_problem

    problem = cuda_problem(build_only=True)
    return f"{problem}, or leave out --gpu (every job would stop at --device cuda)" if problem else None


def _dry_limit() -> int:
    return max_array_size() if shutil.which("scontrol") else DEFAULT_MAX_ARRAY_SIZE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
