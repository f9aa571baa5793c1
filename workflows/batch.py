"""Running the participant workflow under a batch plugin (Nipype's SLURM, SGE, PBS ...).

Pattern A of ``docs/cluster.md``: each node of the per-scan workflow runs as its own job.
:func:`prepare_batch_workflow` gives the heavy nodes their measured memory and CPU requests,
keeps bookkeeping nodes in the submitting process and sets a sane queue-polling interval.
The job-array pattern (B) lives in :mod:`qc_pipeline.cluster`.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

LOGGER = logging.getLogger(__name__)

__all__ = ["NODE_MEM_MB", "THREADED_NODES", "BATCH_POLL_S", "BATCH_PLUGINS", "node_mem_mb",
           "node_sbatch_args", "prepare_batch_workflow"]

#: memory each node of the per-scan workflow asks SLURM for, in MB, when it runs as its
#: own job (pattern A, Nipype's SLURM plugin). Measured peak RSS on a 1 mm T1w head
#: (225x229x213 voxels, deepbet, default 80x96x80 grid and UNet, 1 thread, CPU) with
#: benchmarks/node_resources.py, rounded up with room for 0.8 mm heads (docs/cluster.md):
#: load 234 MB, preprocess 1174 MB, itermask 621 MB, write_derivatives 402 MB.
NODE_MEM_MB = {
    "load": 1024,
    "preprocess": 3072,
    "itermask": 1536,
    "itermask_batch_*": 3072,
    "write_derivatives": 1024,
    "report_sub_*": 1024,
}
#: nodes that need more than one CPU when --omp-nthreads > 1 (torch/numpy threads)
THREADED_NODES = ("preprocess", "itermask")
#: default seconds between two polls of the queue for batch plugins (each poll runs one
#: squeue per pending job; the CLI's 0.02 s is for MultiProc)
BATCH_POLL_S = 5.0
BATCH_PLUGINS = ("SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "PBSGraph", "LSF",
                 "OAR", "Condor", "HTCondor")


def node_mem_mb(name: str) -> Optional[int]:
    """The memory request of a workflow node by its name (``NODE_MEM_MB``), or None."""
    import fnmatch

    for pattern, mb in NODE_MEM_MB.items():
        if fnmatch.fnmatchcase(name, pattern):
            return mb
    return None


def node_sbatch_args(name: str, omp_nthreads: int = 1) -> Optional[str]:
    """``--mem=...M --cpus-per-task=N`` for a node of the per-scan workflow, or None."""
    mb = node_mem_mb(name)
    if mb is None:
        return None
    cpus = max(1, int(omp_nthreads)) if name in THREADED_NODES else 1
    return f"--mem={mb}M --cpus-per-task={cpus}"


def prepare_batch_workflow(wf, plugin: str, plugin_args: Optional[dict] = None, *,
                           omp_nthreads: int = 1) -> dict:
    """Make a built itermask-qc workflow run well under a batch plugin (SLURM, SGE ...).

    Call it between ``init_itermask_qc_wf`` and ``wf.run`` (the CLI does, for the plugins
    in ``BATCH_PLUGINS``). It

    - gives every heavy node its own ``sbatch_args`` (``--mem``/``--cpus-per-task`` from
      the measured ``NODE_MEM_MB``), so node jobs pack onto compute nodes; a node that
      already has ``plugin_args['sbatch_args']`` keeps them;
    - runs bookkeeping nodes (``Merge``, ``IdentityInterface``, ``Select``, a scan's pick of
      an engine batch's results) in the
      submitting process (``run_without_submitting``) instead of one job each;
    - sets the workflow's ``poll_sleep_duration`` to ``plugin_args['poll_sleep_duration']``
      (default ``BATCH_POLL_S``): the plugin runs one ``squeue`` per pending job per poll;
    - sets ``LOGNAME`` when the environment lacks it (Nipype's SLURM plugin needs it);
    - appends ``plugin_args['itermask_sbatch_args']`` (e.g. ``--partition=gpu
      --gres=gpu:1``) to the IterMask3D nodes' requests (per scan or per batch), for a GPU
      partition.

    Returns the plugin arguments to pass to ``wf.run`` (without the keys used here).
    """
    from nipype.interfaces import utility as niu

    from qc_pipeline.workflows.interfaces import IterMaskBatch, IterMaskRun, PickEngineResult

    plugin_args = dict(plugin_args or {})
    if plugin not in BATCH_PLUGINS:
        return plugin_args
    if plugin.endswith("Graph"):
        LOGGER.warning("the %s plugin submits the whole graph and returns before the jobs "
                       "finish; itermask-qc's summary and reports need the SLURM plugin",
                       plugin)
    poll = float(plugin_args.pop("poll_sleep_duration", BATCH_POLL_S))
    gpu_args = str(plugin_args.pop("itermask_sbatch_args", "") or "").strip()
    wf.config.setdefault("execution", {})["poll_sleep_duration"] = poll
    os.environ.setdefault("LOGNAME", _user_name())
    light = (niu.Merge, niu.IdentityInterface, niu.Select, PickEngineResult)
    for node in wf._get_all_nodes():
        if isinstance(node.interface, light):
            node.run_without_submitting = True
            continue
        args = node_sbatch_args(node.name, omp_nthreads)
        if isinstance(node.interface, (IterMaskRun, IterMaskBatch)) and gpu_args:
            args = f"{args} {gpu_args}" if args else gpu_args
        if args and "sbatch_args" not in (node.plugin_args or {}):
            node.plugin_args = dict(node.plugin_args or {}, sbatch_args=args)
    return plugin_args


def _user_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())
