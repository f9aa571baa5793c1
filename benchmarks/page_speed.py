#!/usr/bin/env python
"""Seconds to draw one subject page from scratch (figures not cached), per scan.

Copies the subjects named (or the first ``--n``) of a finished output folder into a scratch
folder, clears their figure caches and times :func:`qc_pipeline.reports.write_subject_report`
for each, as the group level does after it writes a site-anomaly mask. Prints a table.

    python benchmarks/page_speed.py --out OUT [--n 6] [--site-column site]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="an itermask-qc output folder (group level run)")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--subjects", nargs="*", default=None)
    p.add_argument("--site-column", default="site")
    a = p.parse_args(argv)
    from qc_pipeline.reports import write_subject_report

    subjects = a.subjects or sorted(d.name[4:] for d in a.out.glob("sub-*") if d.is_dir())[: a.n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for f in a.out.iterdir():
            if f.is_file() and not f.name.startswith("sub-"):
                shutil.copy2(f, tmp / f.name)
        if (a.out / "logs").is_dir():
            shutil.copytree(a.out / "logs", tmp / "logs")
        for s in subjects:
            shutil.copytree(a.out / f"sub-{s}", tmp / f"sub-{s}", ignore=shutil.ignore_patterns("figures"))
        write_subject_report(tmp, subjects[0], site_column=a.site_column)  # imports and templates once
        shutil.rmtree(tmp / f"sub-{subjects[0]}" / "figures", ignore_errors=True)
        for s in subjects:
            t0 = time.perf_counter()
            write_subject_report(tmp, s, site_column=a.site_column)
            rows.append((s, time.perf_counter() - t0))
    print("| subject | page with figures, s |\n|---|---|")
    for s, t in rows:
        print(f"| {s} | {t:.2f} |")
    print(f"| median | {statistics.median(t for _, t in rows):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
