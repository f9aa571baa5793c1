#!/usr/bin/env python
"""How long does the BIDS walk take on a large study?

Builds a tree of empty files that looks like a real multi-session study (anat/ with T1w,
T2w, FLAIR + JSON sidecars, func/, dwi/, fmap/ beside it, derivatives/, sourcedata/) with
``--scans`` anatomical images in all, then times:

* ``restricted``   pybids ``BIDSLayout`` with the app's anat-only ignore regexes and
                   ``index_metadata=False`` (what ``itermask-qc`` uses), fresh database;
* ``reused``       the same, second run reusing the database in the work directory;
* ``collect``      ``qc_pipeline.bids.collect_scans`` end to end (index + query +
                   entities + site lookup), fresh database;
* ``unrestricted`` pybids with its default ignores (everything but code/, sourcedata/ ...
                   indexed, metadata off) -- only with ``--unrestricted`` (slow);
* ``glob``         a plain glob + ``bids.layout.parse_file_entities`` for reference.

Usage: ``python benchmarks/bids_index.py [--scans 10000] [--tmp DIR] [--unrestricted]``.
Prints a table. Target: 10,000 scans index in under a minute.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")


def build_tree(root: Path, n_scans: int, *, seed: int = 0) -> dict:
    """Empty-file BIDS tree with ``n_scans`` anatomical images (T1w/T2w/FLAIR)."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "bench", "BIDSVersion": "1.9.0"}')
    (root / "README").write_text("benchmark tree\n")
    for d in ("code", "sourcedata", "derivatives/fmriprep"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rows = ["participant_id\tsite"]
    n = 0
    n_other = 0
    sub = 0
    while n < n_scans:
        sub += 1
        label = f"{sub:05d}"
        rows.append(f"sub-{label}\tsite{sub % 7}")
        for ses in ("1", "2"):
            base = root / f"sub-{label}" / f"ses-{ses}"
            anat = base / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            stem = f"sub-{label}_ses-{ses}"
            names = [f"{stem}_run-1_T1w", f"{stem}_T2w"]
            if rng.random() < 0.5:
                names.append(f"{stem}_acq-3d_FLAIR")
            for name in names:
                if n >= n_scans:
                    break
                (anat / f"{name}.nii.gz").touch()
                (anat / f"{name}.json").write_text("{}")
                n += 1
            # unrelated modalities, as in real studies
            for mod, files in (
                ("func", [f"{stem}_task-rest_run-{r}_bold" for r in (1, 2)]),
                ("dwi", [f"{stem}_dwi"]),
                ("fmap", [f"{stem}_phasediff", f"{stem}_magnitude1"]),
            ):
                (base / mod).mkdir(exist_ok=True)
                for f in files:
                    (base / mod / f"{f}.nii.gz").touch()
                    (base / mod / f"{f}.json").write_text("{}")
                    n_other += 2
            (base / "func" / f"{stem}_task-rest_run-1_events.tsv").touch()
            if n >= n_scans:
                break
        (root / "derivatives" / "fmriprep" / f"sub-{label}").mkdir(exist_ok=True)
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return {"subjects": sub, "anat_images": n, "other_files": n_other}


def _time(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=10000)
    ap.add_argument("--tmp", type=Path, default=None, help="where to build the tree")
    ap.add_argument("--unrestricted", action="store_true",
                    help="also time pybids without the anat-only ignores (slow)")
    args = ap.parse_args(argv)

    from bids.layout import BIDSLayout, BIDSLayoutIndexer, parse_file_entities

    from qc_pipeline.bids import build_layout, collect_scans

    tmp = Path(tempfile.mkdtemp(dir=args.tmp, prefix="bids_index_bench_"))
    suffixes = ("T1w", "T2w", "FLAIR")
    try:
        t_build, info = _time(lambda: build_tree(tmp / "ds", args.scans))
        root = tmp / "ds"
        rows = []

        def restricted(db):
            lay = build_layout(root, suffixes, db)
            return len(lay.get(datatype="anat", extension=[".nii", ".nii.gz"],
                               return_type="filename"))

        t, n = _time(lambda: restricted(tmp / "db1"))
        rows.append(("pybids restricted (fresh db)", t, n))
        t, n = _time(lambda: restricted(tmp / "db1"))
        rows.append(("pybids restricted (reused db)", t, n))
        t, scans = _time(lambda: collect_scans(root, suffixes=suffixes,
                                               database_path=tmp / "db2"))
        rows.append(("collect_scans (fresh db, + sites)", t, len(scans)))

        def globbed():
            files = sorted(root.glob("sub-*/anat/*.nii*")) + sorted(root.glob("sub-*/ses-*/anat/*.nii*"))
            out = [parse_file_entities(str(f)) for f in files]
            return sum(1 for e in out if e.get("suffix") in suffixes)

        t, n = _time(globbed)
        rows.append(("glob + parse_file_entities", t, n))

        if args.unrestricted:
            def unrestricted():
                lay = BIDSLayout(str(root), validate=False,
                                 indexer=BIDSLayoutIndexer(validate=False, index_metadata=False))
                return len(lay.get(datatype="anat", extension=[".nii", ".nii.gz"],
                                   suffix=list(suffixes), return_type="filename"))

            t, n = _time(unrestricted)
            rows.append(("pybids default ignores", t, n))

        print(f"tree: {info['subjects']} subjects, {info['anat_images']} anat images, "
              f"{info['other_files']} other files (built in {t_build:.1f} s)")
        print(f"python {sys.version.split()[0]}, cpus {os.cpu_count()}")
        print()
        print(f"| {'method':<36} | {'seconds':>8} | {'scans found':>11} |")
        print(f"|{'-' * 38}|{'-' * 10}|{'-' * 13}|")
        for name, t, n in rows:
            print(f"| {name:<36} | {t:8.2f} | {n:11d} |")
        ok = rows[2][1] < 60
        print()
        print(f"target (collect_scans < 60 s for {args.scans} scans): {'met' if ok else 'MISSED'}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
