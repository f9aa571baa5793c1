"""Thin Nipype interfaces over the pure functions of the package.

A scan's failure is *data*: every interface catches the typed input errors
(:class:`qc_pipeline.errors.InputError`, engine input errors) and any unexpected exception,
and passes a one-line ``error`` downstream instead of raising. Later stages see a non-empty
``in_error`` and do nothing; :class:`WriteDerivatives` turns it into a ``_qc.json`` with
``status: "error"``. The workflow therefore never crashes on bad data and the other scans
finish.

Arrays travel between nodes as record files in the node's working directory (``preproc.npz``,
``result.npz``: :func:`qc_pipeline.io.write_record_npz`, arrays readable with NumPy alone, no
pickle) so that Nipype's hash cache can reuse finished stages on a re-run.

:class:`IterMaskRun` loads a model folder once per process
(:func:`qc_pipeline.screening.get_model`, keyed by model folder and device): with the Linear
plugin that is once per run, with MultiProc once per worker process.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

# nipype phones home (etelemetry) on import in interactive sessions and when an interface is
# built, unless NIPYPE_NO_ET is set: the tool never does, also when used as a library.
os.environ.setdefault("NIPYPE_NO_ET", "1")

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from qc_pipeline import screening
from qc_pipeline.derivatives import one_line, write_error_qc, write_scan_outputs
from qc_pipeline.io import read_record_npz, write_record_npz

LOGGER = logging.getLogger(__name__)

# --------------------------------------------------------------------------- helpers
def describe_error(exc: BaseException, stage: str) -> str:
    """One line for the ``_qc.json``: typed input errors as they are, others labelled."""
    from qc_pipeline.engine.errors import InvalidInputError, ShapeMismatchError
    from qc_pipeline.errors import InputError, MissingDependencyError

    if isinstance(exc, (InputError, MissingDependencyError)):
        return one_line(exc)
    if isinstance(exc, (InvalidInputError, ShapeMismatchError)):
        return one_line(f"{stage}: {exc}")
    return one_line(f"unexpected error in {stage}: {type(exc).__name__}: {exc}")


def _record_types() -> tuple:
    from qc_pipeline.engine.inference import Result
    from qc_pipeline.engine.taufit import TauFit
    from qc_pipeline.preproc.chain import PrepInfo, PreprocResult
    from qc_pipeline.preproc.geometry import CropInfo

    return (PreprocResult, PrepInfo, CropInfo, Result, TauFit)


def write_node_record(obj: Any, path: Path) -> str:
    """Write a node's PreprocResult or engine Result as a record file (NPZ); returns its path."""
    return str(write_record_npz(obj, path, types=_record_types()))


def read_node_record(path) -> Any:
    """The PreprocResult or engine Result of :func:`write_node_record`'s file
    (:class:`qc_pipeline.io.RecordError` when it is not one)."""
    return read_record_npz(path, types=_record_types())


_BOUND_TO_PARENT = {"pid": None}


def _bind_to_parent() -> None:
    """In a worker process (MultiProc's pool), ask the kernel for SIGTERM when the process
    that started it dies, so that a main process killed with ``kill -9`` leaves no workers
    holding their scans' memory (Linux; elsewhere nothing). Once per process."""
    if _BOUND_TO_PARENT["pid"] == os.getpid() or not sys.platform.startswith("linux"):
        return
    _BOUND_TO_PARENT["pid"] = os.getpid()
    import multiprocessing
    import signal

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
        return
    if os.getppid() != parent.pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _set_threads(n: int) -> None:
    if n and n > 0:
        try:
            import torch

            if torch.get_num_threads() != n:
                torch.set_num_threads(int(n))
        except Exception:  # pragma: no cover
            pass


# --------------------------------------------------------------------------- load + validate
# ``exists=False`` on the scan inputs: a file that vanished, a FIFO or a broken link is judged
# by the package's own checks (one line in the scan's record), never by a Nipype TraitError
# that would crash the node.
class _LoadInputSpec(BaseInterfaceInputSpec):
    in_file = traits.File(exists=False, mandatory=True, desc="the anatomical scan")
    name = traits.Str("", usedefault=True, desc="label for messages (BIDS relative path)")
    max_image_bytes = traits.Int(0, usedefault=True,
                                 desc="memory budget of the voxels, from the header (0 = the "
                                      "package default)")


class _LoadOutputSpec(TraitedSpec):
    input_sha256 = traits.Str(desc="SHA-256 of the input file")
    error = traits.Str(desc="one-line reason when the scan is unusable, else ''")
    seconds = traits.Float()


class LoadValidate(SimpleInterface):
    """Check the scan's file and header under the memory budget and checksum it
    (:func:`qc_pipeline.io.check_image_file`, :func:`qc_pipeline.io.sha256_file`). The voxels
    are read once, by :class:`Preprocess`, which validates them with the same typed errors
    and passes on the reader's warnings."""

    input_spec = _LoadInputSpec
    output_spec = _LoadOutputSpec

    def _run_interface(self, runtime):
        from qc_pipeline.io import DEFAULT_MAX_IMAGE_BYTES, check_image_file, sha256_file

        _bind_to_parent()
        t0 = time.perf_counter()
        self._results.update(input_sha256="", error="")
        try:
            check_image_file(self.inputs.in_file, name=self.inputs.name or None,
                             max_bytes=self.inputs.max_image_bytes or DEFAULT_MAX_IMAGE_BYTES)
            self._results["input_sha256"] = sha256_file(self.inputs.in_file)
        except Exception as exc:  # noqa: BLE001 - failure is data
            self._results["error"] = describe_error(exc, "load")
        self._results["seconds"] = time.perf_counter() - t0
        return runtime


# --------------------------------------------------------------------------- preprocess
class _PrepInputSpec(BaseInterfaceInputSpec):
    in_file = traits.File(exists=False, mandatory=True)
    name = traits.Str("", usedefault=True)
    in_error = traits.Str("", usedefault=True, desc="error of an earlier stage")
    voxel_size = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True)
    grid = traits.List(traits.Int, minlen=3, maxlen=3, mandatory=True)
    skull_strip = traits.Enum("auto", "deepbet", "robex", "none", usedefault=True)
    contrast = traits.Str("T1w", usedefault=True)
    omp_nthreads = traits.Int(1, usedefault=True)
    device = traits.Enum("cpu", "cuda", usedefault=True,
                         desc="the run's device: 'cuda' runs deepbet on this process's GPU when it "
                              "has one (a CPU node of a GPU run strips on the CPU)")


class _PrepOutputSpec(TraitedSpec):
    out_file = traits.Str(desc="the PreprocResult record (preproc.npz; '' on error)")
    warnings = traits.List(traits.Str)
    error = traits.Str()
    seconds = traits.Float()


class Preprocess(SimpleInterface):
    """Load, reorient, resample, skull-strip, crop/pad and z-score one scan
    (:func:`qc_pipeline.preproc.preprocess`)."""

    input_spec = _PrepInputSpec
    output_spec = _PrepOutputSpec

    def _run_interface(self, runtime):
        _bind_to_parent()
        t0 = time.perf_counter()
        self._results.update(out_file="", warnings=[], error=self.inputs.in_error)
        if not self.inputs.in_error:
            try:
                from qc_pipeline.io import load_image
                from qc_pipeline.screening import preprocess_scan

                _set_threads(self.inputs.omp_nthreads)
                name = self.inputs.name or None
                # no budget here: it runs only after LoadValidate checked the header under
                # the run's budget (in_error is empty); this is the scan's one voxel read
                img = load_image(self.inputs.in_file, name=name, max_bytes=None)
                self._results["warnings"] = [str(w) for w in img.extra.get("qc_warnings", [])]
                prep = preprocess_scan(img, voxel_size=self.inputs.voxel_size, grid=self.inputs.grid,
                                       skull_strip=self.inputs.skull_strip, contrast=self.inputs.contrast,
                                       name=name, device=self.inputs.device)
                self._results["warnings"] = list(dict.fromkeys(
                    self._results["warnings"] + [str(w) for w in prep.warnings]))
                self._results["out_file"] = write_node_record(prep, Path(runtime.cwd) / "preproc.npz")
            except Exception as exc:  # noqa: BLE001
                self._results["error"] = describe_error(exc, "preprocessing")
        self._results["seconds"] = time.perf_counter() - t0
        return runtime


# --------------------------------------------------------------------------- IterMask3D
class _EngineSpec(BaseInterfaceInputSpec):
    """The model and the loop's settings, shared by the per-scan and the batched node."""

    model_dir = traits.Str("", usedefault=True, desc="model folder ('' = packaged default)")
    model_id = traits.Str("", usedefault=True,
                          desc="id the folder's card must carry ('' = any); part of the node's "
                               "cache key, so a new model in the same folder is never served "
                               "an old result")
    model_key = traits.Str("", usedefault=True,
                           desc="the folder's content key (card, weights, maps); part of the "
                                "node's cache key, so a folder rewritten under the same id reruns")
    package_version = traits.Str("", usedefault=True,
                                 desc="the package's version; part of the node's cache key, so "
                                      "an upgraded engine never reuses an old result")
    contrast = traits.Str("T1w", usedefault=True)
    device = traits.Str("cpu", usedefault=True)
    schedule = traits.Enum("auto", "normative", "fast", "reference", usedefault=True,
                           desc="'auto': the model card's schedule")
    seed = traits.Int(0, usedefault=True)
    omp_nthreads = traits.Int(1, usedefault=True)


class _IMInputSpec(_EngineSpec):
    in_file = traits.Str("", usedefault=True, desc="the PreprocResult record (preproc.npz)")
    in_error = traits.Str("", usedefault=True)


class _IMOutputSpec(TraitedSpec):
    out_file = traits.Str(desc="the engine Result record (result.npz; '' on error)")
    quality = traits.Dict(desc="QCScore.to_dict(): qc_score, driver, measurements and their z")
    model_id = traits.Str()
    model_adapted_from = traits.Str(desc="base model id when the model was adapted to a site, else ''")
    error = traits.Str()
    seconds = traits.Float()


class IterMaskRun(SimpleInterface):
    """Run IterMask3D (:meth:`qc_pipeline.engine.IterMask3D.run`) on a preprocessed scan, keep
    its mask where the error beats the model's normal error
    (:meth:`~qc_pipeline.engine.IterMask3D.against_normal_error`, through the preprocessing's
    template fit) and combine the result with the image-quality measurements into the QC
    score (:func:`qc_pipeline.qc.score.scan_quality`, reference from the model card)."""

    input_spec = _IMInputSpec
    output_spec = _IMOutputSpec

    def _run_interface(self, runtime):
        _bind_to_parent()
        t0 = time.perf_counter()
        self._results.update(out_file="", model_id="", model_adapted_from="", error=self.inputs.in_error,
                             quality={})
        if not self.inputs.in_error:
            try:
                _set_threads(self.inputs.omp_nthreads)
                model = screening.get_model(self.inputs.model_dir or None, self.inputs.contrast,
                                  self.inputs.device, expect_id=self.inputs.model_id or None,
                                  expect_key=self.inputs.model_key or None)
                self._results["model_id"] = model.model_id
                self._results["model_adapted_from"] = str(
                    (model.card.get("adaptation") or {}).get("base_model_id") or "")
                from qc_pipeline.screening import engine_step

                res, self._results["quality"] = engine_step(
                    model, read_node_record(self.inputs.in_file), schedule=self.inputs.schedule,
                    seed=self.inputs.seed, name=self.inputs.in_file)
                res.first_pass_error_map = None  # only benchmarks/detection.py saves it: keep the record small
                self._results["out_file"] = write_node_record(res, Path(runtime.cwd) / "result.npz")
            except Exception as exc:  # noqa: BLE001
                self._results["error"] = describe_error(exc, "IterMask3D")
        self._results["seconds"] = time.perf_counter() - t0
        return runtime


class _IMBatchInputSpec(_EngineSpec):
    in_files = traits.List(traits.Str, mandatory=True, desc="the PreprocResult record per scan ('' on error)")
    in_errors = traits.List(traits.Str, mandatory=True, desc="the preprocessing's error per scan")


class _IMBatchOutputSpec(TraitedSpec):
    results = traits.List(traits.Dict, desc="per scan: IterMaskRun's outputs as a dict")


class IterMaskBatch(SimpleInterface):
    """:class:`IterMaskRun` over several preprocessed scans of one contrast, their forward
    passes stacked on the device (:func:`qc_pipeline.screening.engine_batch`). A scan's
    result equals IterMaskRun's for it alone; a scan that failed earlier or fails here keeps
    its own error and the others go on. :class:`PickEngineResult` hands each scan its part."""

    input_spec = _IMBatchInputSpec
    output_spec = _IMBatchOutputSpec

    def _run_interface(self, runtime):
        _bind_to_parent()
        t0 = time.perf_counter()
        i = self.inputs
        if len(i.in_files) != len(i.in_errors):
            raise ValueError(f"{len(i.in_files)} preprocessed files but {len(i.in_errors)} errors")
        out = [dict(out_file="", model_id="", model_adapted_from="", error=err, quality={}, seconds=0.0)
               for err in i.in_errors]
        todo = [k for k, err in enumerate(i.in_errors) if not err]
        if todo:
            try:
                _set_threads(i.omp_nthreads)
                model = screening.get_model(i.model_dir or None, i.contrast, i.device, expect_id=i.model_id or None,
                                  expect_key=i.model_key or None)
                from qc_pipeline.screening import engine_batch

                preps, ok = [], []
                for k in todo:
                    try:
                        preps.append(read_node_record(i.in_files[k]))
                        ok.append(k)
                    except Exception as exc:  # noqa: BLE001
                        out[k]["error"] = describe_error(exc, "IterMask3D")
                done = engine_batch(model, preps, schedule=i.schedule, seed=i.seed,
                                    names=[i.in_files[k] for k in ok])
                adapted = str((model.card.get("adaptation") or {}).get("base_model_id") or "")
                for k, got in zip(ok, done):
                    out[k].update(model_id=model.model_id, model_adapted_from=adapted)
                    if isinstance(got, Exception):
                        out[k]["error"] = describe_error(got, "IterMask3D")
                        continue
                    res, out[k]["quality"] = got
                    res.first_pass_error_map = None
                    out[k]["out_file"] = write_node_record(res, Path(runtime.cwd) / f"result_{k:04d}.npz")
            except Exception as exc:  # noqa: BLE001 - e.g. the model folder: every scan's error
                for k in todo:
                    if not out[k]["out_file"]:
                        out[k]["error"] = out[k]["error"] or describe_error(exc, "IterMask3D")
            share = (time.perf_counter() - t0) / len(todo)
            for k in todo:
                out[k]["seconds"] = share
        self._results["results"] = out
        return runtime


class _PickInputSpec(BaseInterfaceInputSpec):
    results = traits.List(traits.Dict, mandatory=True)
    index = traits.Int(mandatory=True)


class PickEngineResult(SimpleInterface):
    """One scan's part of :class:`IterMaskBatch`'s results, under IterMaskRun's output names."""

    input_spec = _PickInputSpec
    output_spec = _IMOutputSpec

    def _run_interface(self, runtime):
        got = self.inputs.results[self.inputs.index]
        for key in ("out_file", "quality", "model_id", "model_adapted_from", "error", "seconds"):
            self._results[key] = got[key]
        return runtime


# --------------------------------------------------------------------------- derivatives
class _WriteInputSpec(BaseInterfaceInputSpec):
    scan = traits.Dict(mandatory=True, desc="ScanRecord.to_dict()")
    output_dir = traits.Str(mandatory=True)
    in_file = traits.File(exists=False, mandatory=True, desc="the native scan (reference grid)")
    preproc_file = traits.Str("", usedefault=True)
    result_file = traits.Str("", usedefault=True)
    quality = traits.Dict(value={}, usedefault=True, desc="QCScore.to_dict()")
    in_error = traits.Str("", usedefault=True)
    input_sha256 = traits.Str("", usedefault=True)
    prep_warnings = traits.List(traits.Str, value=[], usedefault=True,
                                desc="the reader's and the preprocessing's warnings")
    model_id = traits.Str("", usedefault=True)
    model_adapted_from = traits.Str("", usedefault=True)
    default_model_id = traits.Str("", usedefault=True)
    model_key = traits.Str("", usedefault=True, desc="the model folder's content key")
    schedule = traits.Str("auto", usedefault=True)
    device = traits.Str("cpu", usedefault=True)
    seconds = traits.List(traits.Float, value=[], usedefault=True)


class _WriteOutputSpec(TraitedSpec):
    qc_json = traits.Str()
    status = traits.Str()


class WriteDerivatives(SimpleInterface):
    """Write the mask and error map in native space and ``<source>_qc.json`` (atomic).

    Errors of earlier stages (``in_error``) and failures while writing become an error
    record; nothing is raised.
    """

    input_spec = _WriteInputSpec
    output_spec = _WriteOutputSpec
    # the outputs live outside the work directory: always (re)write them
    _always_run = True

    def _run_interface(self, runtime):
        _bind_to_parent()
        t0 = time.perf_counter()
        i = self.inputs
        warnings = list(i.prep_warnings)
        common = dict(
            model_id=i.model_id or i.default_model_id or None,
            model_key=i.model_key or None,
            model_adapted_from=i.model_adapted_from or None,
            schedule=i.schedule,
            device=i.device,
            input_sha256=i.input_sha256 or None,
        )
        error = i.in_error
        if not error:
            try:
                self._results["qc_json"] = str(self._write_ok(i, warnings, common, t0))
                self._results["status"] = "ok"
                return runtime
            except Exception as exc:  # noqa: BLE001
                error = describe_error(exc, "writing derivatives")
        runtime_s = sum(i.seconds) + (time.perf_counter() - t0)
        self._results["qc_json"] = str(write_error_qc(i.output_dir, i.scan, error, warnings=warnings,
                                                      runtime_s=runtime_s, **common))
        self._results["status"] = "error"
        return runtime

    @staticmethod
    def _write_ok(i, warnings, common, t0):
        import nibabel as nib

        return write_scan_outputs(i.output_dir, i.scan, read_node_record(i.preproc_file), read_node_record(i.result_file),
                                  nib.load(i.in_file), quality=dict(i.quality) or None, warnings=warnings,
                                  runtime_s=sum(i.seconds) + (time.perf_counter() - t0), **common)


# --------------------------------------------------------------------------- reports
class _ReportInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    subject = traits.Str(mandatory=True)
    qc_jsons = traits.List(traits.Str, desc="the subject's records (dependency only)")
    site_column = traits.Str("site", usedefault=True)


class _ReportOutputSpec(TraitedSpec):
    out_report = traits.Str()


class SubjectReport(SimpleInterface):
    """Write ``sub-<label>.html`` (:func:`qc_pipeline.reports.write_subject_page`: the full page or a
    minimal fallback page); a report problem is logged, never raised."""

    input_spec = _ReportInputSpec
    output_spec = _ReportOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from qc_pipeline.reports import write_subject_page  # the pages' stack loads only where pages are drawn

        try:
            out = write_subject_page(self.inputs.output_dir, self.inputs.subject,
                                     site_column=self.inputs.site_column)
            self._results["out_report"] = str(out)
        except Exception as exc:  # noqa: BLE001
            LOGGER.warning("sub-%s: no report written (%s)", self.inputs.subject, one_line(exc))
            self._results["out_report"] = ""
        return runtime
