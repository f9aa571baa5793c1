"""The group level: the tables (:mod:`qc_pipeline.group`), then the pages that render them
(:mod:`qc_pipeline.reports`). Data flows one way, derivatives -> tables -> pages; this is the
one place that calls both."""
from __future__ import annotations

from pathlib import Path

from .group import write_group_tables
from .reports import write_group_pages

__all__ = ["run_group"]


def run_group(output_dir, *, site_column: str = "site", subject_reports: bool = True, **options) -> list[Path]:
    """Write ``group_<suffix>.csv``, ``group_<suffix>_sites.csv``, ``group_<suffix>.html``, the
    overview ``index.html`` (every scan of these suffixes) and (``subject_reports``) every
    subject's page with its ranks.

    ``options`` are those of :func:`qc_pipeline.group.write_group_tables` (labels,
    flag_at_fnr, mad_k, suffixes, min_site_size, questionable, background_k,
    background_min_fraction, site_z). Raises :class:`~qc_pipeline.group.GroupError` /
    :class:`~qc_pipeline.labels.LabelsError` naming the bad value.

    Returns
    -------
    list of Path
        The files written: per suffix its two tables and its page, then the overview, then
        the subject pages.
    """
    tables = write_group_tables(output_dir, site_column=site_column, **options)
    pages = write_group_pages(tables, site_column=site_column, subject_reports=subject_reports)
    written = []
    for t in tables.tables:
        written += t.files + [p for p in pages if p.name == f"group_{t.suffix}.html"]
    return written + [p for p in pages if p not in written]
