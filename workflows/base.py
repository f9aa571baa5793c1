"""Nipype workflow factories of the participant level.

``init_itermask_qc_wf`` (the only factory that reads the settings) builds one
``init_scan_wf`` per scan and one subject-report node per subject::

    itermask_qc_wf
    ├── scan_<bids_name>  (one per scan)
    │     inputnode -> load -> preprocess -> itermask -> write_derivatives -> outputnode
    │                   └──────────┴────────────┴──── errors / warnings / timings ──┘
    └── report_sub_<label>  (one per subject, after all its scans)

With ``--engine-batch N`` (default on a GPU) a scan's IterMask3D node is shared::

    scan_<bids_name>        inputnode -> load -> preprocess -> outputnode ─┐
    itermask_batch_<c>_NNNN  IterMask3D over up to N scans of contrast c  <─┘ (Merge)
    scan_<bids_name>_write  engine_result (its part of the batch) -> write_derivatives -> outputnode

Every stage passes a one-line ``error`` downstream instead of raising (see
:mod:`qc_pipeline.workflows.interfaces`), so a bad scan ends as a ``_qc.json`` with
``status: "error"`` and the other scans finish.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional, Sequence

# nipype phones home (etelemetry) on import in interactive sessions and when an interface is
# built, unless NIPYPE_NO_ET is set: the tool never does, also when used as a library.
os.environ.setdefault("NIPYPE_NO_ET", "1")

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qc_pipeline import __version__
from qc_pipeline.bids import ScanRecord
from qc_pipeline.config import DEFAULT_GRID, DEFAULT_VOXEL_SIZE
from qc_pipeline.workflows.batch import THREADED_NODES, node_mem_mb
from qc_pipeline.workflows.interfaces import (IterMaskBatch, IterMaskRun, LoadValidate, PickEngineResult,
                                    Preprocess, SubjectReport, WriteDerivatives)


#: a file name of the BIDS grammar: sub-<label>[_<key>-<value>]..._<suffix>, letters and digits
_BIDS_NAME = re.compile(r"sub-[A-Za-z0-9]+(?:_[A-Za-z]+-[A-Za-z0-9]+)*_[A-Za-z0-9]+")


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def scan_node_name(scan: ScanRecord) -> str:
    """The node name of a scan's sub-workflow, distinct for every two scans of a run.

    A name of the BIDS grammar in the folders its entities name maps one to one
    (``sub-01_ses-a_T1w`` -> ``scan_sub_01_ses_a_T1w``: the grammar tells where each ``-``
    was). Any other name (``sub-01_x``, ``acq-a b``, a file in another subject's folder)
    also gets a digest of its path, so that two scans never share a node.
    """
    name = scan.bids_name
    ents = dict(tok.split("-", 1) for tok in name.split("_")[:-1] if "-" in tok)
    folders = f"sub-{ents.get('sub')}/" + (f"ses-{ents['ses']}/" if "ses" in ents else "")
    canonical = (_BIDS_NAME.fullmatch(name) is not None
                 and str(Path(scan.relpath).parent) == f"{folders}anat")
    base = "scan_" + re.sub(r"[^A-Za-z0-9]", "_", name)
    return base if canonical else f"{base}_{_digest(scan.relpath)}"


def subject_node_name(prefix: str, subject: str) -> str:
    """``<prefix>_<label>``; a label beyond letters and digits (``01_x``, ``01-x``, ``ü``)
    also gets its digest, so that two subjects never share a node."""
    base = f"{prefix}_" + re.sub(r"[^A-Za-z0-9]", "_", subject)
    return base if re.fullmatch(r"[A-Za-z0-9]+", subject) else f"{base}_{_digest(subject)}"


def init_scan_wf(
    *,
    scan: ScanRecord,
    output_dir: str,
    model_dir: Optional[str] = None,
    model_id: str = "",
    model_key: str = "",
    voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
    grid: Sequence[int] = DEFAULT_GRID,
    skull_strip: str = "auto",
    device: str = "cpu",
    schedule: str = "fast",
    seed: int = 0,
    omp_nthreads: int = 1,
    max_image_bytes: int = 0,
    name: str = "scan_wf",
):
    """Screen one anatomical scan.

    Parameters
    ----------
    scan : ScanRecord
        The scan (path, entities, site, metadata).
    output_dir : str
        Derivatives folder.
    model_dir : str, optional
        Model folder (``None``: the packaged model of the scan's suffix).
    model_id : str
        Model id from the card, recorded when the model cannot be loaded.
    model_key : str
        The model folder's content key (:func:`qc_pipeline.engine.modelio.model_content_key`),
        recorded in the qc.json and, with the package version, part of the engine node's
        cache key.
    voxel_size, grid
        Model geometry (from the model card).
    skull_strip : {"auto", "deepbet", "robex", "none"}
    device : str
        Torch device actually used (``"cpu"``, ``"cuda"``): IterMask3D's, and deepbet's where
        the preprocessing node's process sees a GPU.
    schedule : {"fast", "reference"}
    seed : int
        Seeds the engine's noise fill (same input + seed -> same result).
    omp_nthreads : int
        Torch threads inside the preprocessing and IterMask3D nodes.
    max_image_bytes : int
        Memory budget of the scan's voxels, checked from its header (0: the package default).
    name : str
        Workflow name.

    Inputs
    ------
    in_file
        The scan (set from ``scan.path``).

    Outputs
    -------
    qc_json
        Path of ``<source>_qc.json``.
    status
        ``"ok"`` or ``"error"``.
    """
    wf = pe.Workflow(name=name)
    contrast = scan.suffix

    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    inputnode.inputs.in_file = scan.path
    outputnode = pe.Node(niu.IdentityInterface(fields=["qc_json", "status"]), name="outputnode")

    load, prep = _load_and_preprocess_nodes(scan, voxel_size=voxel_size, grid=grid, skull_strip=skull_strip,
                                            omp_nthreads=omp_nthreads, max_image_bytes=max_image_bytes,
                                            device=device)
    itermask = pe.Node(
        IterMaskRun(model_dir=str(model_dir or ""), model_id=model_id or "", model_key=model_key or "",
                    package_version=__version__, contrast=contrast, device=device,
                    schedule=schedule, seed=int(seed), omp_nthreads=omp_nthreads),
        name="itermask", **_resources("itermask", omp_nthreads),
    )
    timings = pe.Node(niu.Merge(3), name="timings")
    write = _write_node(scan, output_dir=output_dir, model_id=model_id, model_key=model_key,
                        schedule=schedule, device=device)

    wf.connect([
        (inputnode, load, [("in_file", "in_file")]),
        (inputnode, prep, [("in_file", "in_file")]),
        (load, prep, [("error", "in_error")]),
        (prep, itermask, [("out_file", "in_file"), ("error", "in_error")]),
        (inputnode, write, [("in_file", "in_file")]),
        (load, write, [("input_sha256", "input_sha256")]),
        (prep, write, [("out_file", "preproc_file"), ("warnings", "prep_warnings")]),
        (itermask, write, [("out_file", "result_file"), ("quality", "quality"), ("error", "in_error"),
                           ("model_id", "model_id"), ("model_adapted_from", "model_adapted_from")]),
        (load, timings, [("seconds", "in1")]),
        (prep, timings, [("seconds", "in2")]),
        (itermask, timings, [("seconds", "in3")]),
        (timings, write, [("out", "seconds")]),
        (write, outputnode, [("qc_json", "qc_json"), ("status", "status")]),
    ])
    return wf


def _resources(name: str, omp_nthreads: int = 1) -> dict:
    """What a node declares where it is built: ``mem_gb`` from the measured table
    (:data:`qc_pipeline.workflows.batch.NODE_MEM_MB`) and ``n_procs`` (its torch threads).
    MultiProc schedules by them; a batch plugin asks the cluster for the same."""
    out = {"n_procs": max(1, int(omp_nthreads)) if name in THREADED_NODES else 1}
    mb = node_mem_mb(name)
    if mb is not None:
        out["mem_gb"] = mb / 1024
    return out


def _load_and_preprocess_nodes(scan: ScanRecord, *, voxel_size, grid, skull_strip, omp_nthreads,
                               max_image_bytes, device):
    label = scan.relpath
    load = pe.Node(LoadValidate(name=label, max_image_bytes=int(max_image_bytes)), name="load",
                   **_resources("load"))
    prep = pe.Node(
        Preprocess(name=label, voxel_size=[float(v) for v in voxel_size],
                   grid=[int(g) for g in grid], skull_strip=skull_strip, contrast=scan.suffix,
                   omp_nthreads=omp_nthreads, device="cuda" if str(device).startswith("cuda") else "cpu"),
        name="preprocess", **_resources("preprocess", omp_nthreads),
    )
    return load, prep


def _write_node(scan: ScanRecord, *, output_dir, model_id, model_key, schedule, device):
    return pe.Node(
        WriteDerivatives(scan=scan.to_dict(), output_dir=str(output_dir), schedule=schedule,
                         device=device, default_model_id=model_id or "", model_key=model_key or ""),
        name="write_derivatives", **_resources("write_derivatives"),
    )


def init_scan_prep_wf(
    *,
    scan: ScanRecord,
    voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
    grid: Sequence[int] = DEFAULT_GRID,
    skull_strip: str = "auto",
    omp_nthreads: int = 1,
    max_image_bytes: int = 0,
    device: str = "cpu",
    name: str = "scan_wf",
):
    """The first half of :func:`init_scan_wf` for a batched engine (``--engine-batch``):
    load and preprocess one scan (same nodes and names, so its preprocessing is cached where
    the per-scan workflow keeps it); with ``device`` "cuda" deepbet runs on the GPU where the
    node's process sees one.

    Outputs
    -------
    preproc_file, prep_error
        The preprocessed scan (record file) and the error of either stage ('' when none): the
        inputs of :class:`~qc_pipeline.workflows.interfaces.IterMaskBatch`.
    input_sha256, prep_warnings, seconds
        What :func:`init_scan_write_wf` records (seconds: load, preprocess).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    inputnode.inputs.in_file = scan.path
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["preproc_file", "prep_error", "input_sha256", "prep_warnings", "seconds"]),
        name="outputnode")
    load, prep = _load_and_preprocess_nodes(scan, voxel_size=voxel_size, grid=grid, skull_strip=skull_strip,
                                            omp_nthreads=omp_nthreads, max_image_bytes=max_image_bytes,
                                            device=device)
    timings = pe.Node(niu.Merge(2), name="timings")
    wf.connect([
        (inputnode, load, [("in_file", "in_file")]),
        (inputnode, prep, [("in_file", "in_file")]),
        (load, prep, [("error", "in_error")]),
        (load, timings, [("seconds", "in1")]),
        (prep, timings, [("seconds", "in2")]),
        (prep, outputnode, [("out_file", "preproc_file"), ("error", "prep_error"),
                            ("warnings", "prep_warnings")]),
        (load, outputnode, [("input_sha256", "input_sha256")]),
        (timings, outputnode, [("out", "seconds")]),
    ])
    return wf


def init_scan_write_wf(
    *,
    scan: ScanRecord,
    output_dir: str,
    index: int,
    model_id: str = "",
    model_key: str = "",
    device: str = "cpu",
    schedule: str = "fast",
    name: str = "scan_write_wf",
):
    """The second half of :func:`init_scan_wf` for a batched engine: take the scan's part
    (``index``) of an :class:`~qc_pipeline.workflows.interfaces.IterMaskBatch` node's ``results`` and
    write its derivatives, as the per-scan workflow does.

    Inputs
    ------
    results
        The batch node's results.
    preproc_file, input_sha256, prep_warnings, seconds
        :func:`init_scan_prep_wf`'s outputs of the same scan.

    Outputs
    -------
    qc_json, status
        As :func:`init_scan_wf`'s.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["results", "preproc_file", "input_sha256", "prep_warnings", "seconds"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["qc_json", "status"]), name="outputnode")
    pick = pe.Node(PickEngineResult(index=int(index)), name="engine_result")
    timings = pe.Node(niu.Merge(2), name="timings")
    write = _write_node(scan, output_dir=output_dir, model_id=model_id, model_key=model_key,
                        schedule=schedule, device=device)
    write.inputs.in_file = scan.path
    wf.connect([
        (inputnode, pick, [("results", "results")]),
        (inputnode, timings, [("seconds", "in1")]),
        (pick, timings, [("seconds", "in2")]),
        (inputnode, write, [("preproc_file", "preproc_file"), ("input_sha256", "input_sha256"),
                            ("prep_warnings", "prep_warnings")]),
        (pick, write, [("out_file", "result_file"), ("quality", "quality"), ("error", "in_error"),
                       ("model_id", "model_id"), ("model_adapted_from", "model_adapted_from")]),
        (timings, write, [("out", "seconds")]),
        (write, outputnode, [("qc_json", "qc_json"), ("status", "status")]),
    ])
    return wf


def _add_batched_scans(wf, scans: Sequence[ScanRecord], settings, specs: dict) -> dict[str, list]:
    """``--engine-batch``: each scan's load and preprocessing, one IterMask3D node per batch
    of scans of one contrast, then each scan's writing. Returns the scans' last
    sub-workflows by subject (their ``outputnode.qc_json`` feeds the subject's report)."""
    by_subject: dict[str, list] = {}
    for batch_name, group in _engine_batches(scans, int(settings.engine_batch)):
        spec = specs.get(group[0].suffix) or {}
        files = pe.Node(niu.Merge(len(group)), name=f"{batch_name}_files")
        errors = pe.Node(niu.Merge(len(group)), name=f"{batch_name}_errors")
        engine = pe.Node(
            IterMaskBatch(model_dir=str(spec.get("model_dir") or ""), model_id=spec.get("model_id") or "",
                          model_key=spec.get("model_key") or "", package_version=__version__,
                          contrast=group[0].suffix, device=settings.device, schedule=settings.schedule,
                          seed=int(settings.seed), omp_nthreads=settings.omp_nthreads),
            name=batch_name, **_resources(batch_name, settings.omp_nthreads),
        )
        wf.connect(files, "out", engine, "in_files")
        wf.connect(errors, "out", engine, "in_errors")
        for k, scan in enumerate(group):
            prep_wf = init_scan_prep_wf(
                scan=scan, voxel_size=spec.get("voxel_size") or DEFAULT_VOXEL_SIZE,
                grid=spec.get("grid") or DEFAULT_GRID, skull_strip=settings.skull_strip,
                omp_nthreads=settings.omp_nthreads, max_image_bytes=settings.max_image_bytes,
                device=settings.device, name=scan_node_name(scan))
            write_wf = init_scan_write_wf(
                scan=scan, output_dir=str(settings.output_dir), index=k, model_id=spec.get("model_id") or "",
                model_key=spec.get("model_key") or "", device=settings.device, schedule=settings.schedule,
                name=scan_node_name(scan) + "_write")
            wf.connect(prep_wf, "outputnode.preproc_file", files, f"in{k + 1}")
            wf.connect(prep_wf, "outputnode.prep_error", errors, f"in{k + 1}")
            wf.connect(engine, "results", write_wf, "inputnode.results")
            for field in ("preproc_file", "input_sha256", "prep_warnings", "seconds"):
                wf.connect(prep_wf, f"outputnode.{field}", write_wf, f"inputnode.{field}")
            by_subject.setdefault(scan.subject, []).append(write_wf)
    return by_subject


def _engine_batches(scans: Sequence[ScanRecord], size: int) -> list[tuple[str, list]]:
    """``(batch node name, scans)``: the scans of each contrast in order, ``size`` at a time
    (the names say contrast and number, so a rerun of the same dataset finds its batches in
    the work folder)."""
    by_suffix: dict[str, list] = {}
    for scan in scans:
        by_suffix.setdefault(scan.suffix, []).append(scan)
    out = []
    for suffix, group in by_suffix.items():
        tag = re.sub(r"[^A-Za-z0-9]+", "", suffix).lower() or "scan"
        out += [(f"itermask_batch_{tag}_{j // size:04d}", group[j:j + size]) for j in range(0, len(group), size)]
    return out


def cached_preprocessing(work_dir, scan: ScanRecord, name: str = "itermask_qc_wf") -> Path:
    """Where the participant workflow (``name``, run with ``work_dir``) keeps the
    :class:`~qc_pipeline.preproc.PreprocResult` record of ``scan`` (it may not exist yet; read
    it with :func:`~qc_pipeline.workflows.interfaces.read_node_record`)."""
    return Path(work_dir) / name / scan_node_name(scan) / "preprocess" / "preproc.npz"


def init_itermask_qc_wf(*, scans: Sequence[ScanRecord], settings, name: str = "itermask_qc_wf"):
    """The participant level: one :func:`init_scan_wf` per scan, one report per subject.

    With ``settings.engine_batch`` > 1 (``--engine-batch``, default on a GPU) each scan is
    :func:`init_scan_prep_wf` and :func:`init_scan_write_wf` around one
    :class:`~qc_pipeline.workflows.interfaces.IterMaskBatch` node per batch of scans of one contrast:
    the preprocessing runs in parallel (``--nprocs``), the engine stacks a batch's forward
    passes on the device, and every scan's record is the one the per-scan shape writes.

    Parameters
    ----------
    scans : list of ScanRecord
        What to screen (from :func:`qc_pipeline.bids.collect_scans`).
    settings : qc_pipeline.config.Settings
        Read here only: output and work folders, model per suffix (``model_specs``),
        skull stripping, device, schedule, seed, threads, site column.
    name : str
        Workflow name.
    """
    wf = pe.Workflow(name=name, base_dir=str(settings.work_dir))
    specs = dict(settings.model_specs or {})
    by_subject: dict[str, list] = {}
    if settings.engine_batch > 1:
        by_subject = _add_batched_scans(wf, scans, settings, specs)
    else:
        for scan in scans:
            spec = specs.get(scan.suffix) or {}
            scan_wf = init_scan_wf(
                scan=scan,
                output_dir=str(settings.output_dir),
                model_dir=spec.get("model_dir"),
                model_id=spec.get("model_id") or "",
                model_key=spec.get("model_key") or "",
                voxel_size=spec.get("voxel_size") or DEFAULT_VOXEL_SIZE,
                grid=spec.get("grid") or DEFAULT_GRID,
                skull_strip=settings.skull_strip,
                device=settings.device,
                schedule=settings.schedule,
                seed=settings.seed,
                omp_nthreads=settings.omp_nthreads,
                max_image_bytes=settings.max_image_bytes,
                name=scan_node_name(scan),
            )
            wf.add_nodes([scan_wf])
            by_subject.setdefault(scan.subject, []).append(scan_wf)

    for subject, scan_wfs in sorted(by_subject.items()):
        merge = pe.Node(niu.Merge(len(scan_wfs)), name=subject_node_name("qc_sub", subject))
        report = pe.Node(
            SubjectReport(output_dir=str(settings.output_dir), subject=subject,
                          site_column=settings.site_column),
            name=subject_node_name("report_sub", subject),
            **_resources(subject_node_name("report_sub", subject)),
        )
        for k, swf in enumerate(scan_wfs, start=1):
            wf.connect(swf, "outputnode.qc_json", merge, f"in{k}")
        wf.connect(merge, "out", report, "qc_jsons")
    return wf
