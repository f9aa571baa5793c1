"""HTML reports: per-subject pages, the dataset overview and the group pages (self-contained).

Every page embeds its figures as base64 PNG ``data:`` URIs and its CSS/JS inline, uses no
external font or URL, and opens from a USB stick without network. Templates live in
``qc_pipeline.templates`` (``templates/`` in the repository) and are rendered with
autoescaping on, so labels and metadata such as ``<script>`` show as text.

Two rooms: :mod:`~qc_pipeline.reports.figures` draws from the derivatives (and caches what it
drew); :mod:`~qc_pipeline.reports.pages` renders the pages from the group level's tables, the
scans' records and those figures. The names below are the package's public surface.
"""
from __future__ import annotations

from .figures import (air_window, choose_slices, error_map_png, head_mask, mosaic_png, scan_figures,
                      site_mask_of, tau_curve_png, thumbnail_png, worst_slice)
from .pages import (ARTIFACT_CHOICES, MEASURE_WORDS, describe_measure, fallback_subject_report,
                    group_plots, ranking_score, render_group_report, render_overview,
                    render_subject_report, scan_anchor, scan_verdict, strip_plot_svg, study_key,
                    write_group_pages, write_subject_page, write_subject_report)

__all__ = [
    "write_group_pages", "render_overview", "study_key", "write_subject_report",
    "write_subject_page", "fallback_subject_report", "render_subject_report",
    "render_group_report", "ARTIFACT_CHOICES", "MEASURE_WORDS", "describe_measure",
    "scan_anchor", "scan_verdict", "ranking_score", "strip_plot_svg", "group_plots",
    "mosaic_png", "error_map_png", "tau_curve_png", "head_mask", "worst_slice", "thumbnail_png",
    "air_window", "choose_slices", "scan_figures", "site_mask_of",
]
