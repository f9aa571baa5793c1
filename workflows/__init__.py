"""Nipype workflow factories of itermask-qc (installed as ``qc_pipeline.workflows``)."""
from .base import init_itermask_qc_wf, init_scan_wf

__all__ = ["init_itermask_qc_wf", "init_scan_wf"]
