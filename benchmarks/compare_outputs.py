"""Same outputs from two installs: the demo and a small synthetic cohort, participant + group.

Runs ``itermask-qc`` (participant level, then group level with the cohort's ratings) from two
folders of console scripts (two checkouts' virtualenvs: "before" and "after") on the same
synthetic datasets, then compares what the runs wrote:

* every ``*_qc.json`` (status, error, warnings, the engine's numbers, measurements, their z,
  QC score and driver, preprocessing record, model id/key ...), field by field;
* the group tables (``group_<suffix>.csv``, ``group_<suffix>_sites.csv``), byte for byte;
* the voxels and affine of every derivative NIfTI (anomaly mask, error map, candidate mask).

Excluded by name (they differ from run to run): :data:`EXCLUDED_FIELDS`. Absolute paths of
the data and output folders are replaced by placeholders before comparing, so two output
folders compare equal when only their location differs.

Usage::

    # both sides (data made once with the "before" synth command, then shared)
    python benchmarks/compare_outputs.py both --before-bin /tmp/before/.venv/bin \\
        --after-bin .venv/bin --root /tmp/cmp
    # or one side into a folder, then compare two folders made earlier
    python benchmarks/compare_outputs.py run --bin .venv/bin --data /tmp/cmp/data --out /tmp/cmp/after
    python benchmarks/compare_outputs.py compare /tmp/cmp/before /tmp/cmp/after

Exit code 0 when everything compared is identical, 1 otherwise (each difference printed).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

#: fields of a qc.json that legitimately differ between two runs of the same code
EXCLUDED_FIELDS = frozenset({"runtime_s", "seconds", "run_id", "timestamp", "created", "elapsed_s"})

#: the datasets: name -> the itermask-qc-synth arguments that write it (small: a few scans)
DATASETS = {
    "demo": ["demo"],
    "cohort": ["cohort", "--n-subjects", "4", "--sites", "A,B", "--seed", "11",
               "--artifacts", "motion,ghosting,kspace_noise", "--artifact-fraction", "0.5"],
}
LABELS = Path("sourcedata") / "qc_labels.tsv"


def _run(cmd: list[str], ok=(0,)) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    rc = subprocess.run(list(map(str, cmd)), env={**os.environ, "NIPYPE_NO_ET": "1"}).returncode
    if rc not in ok:
        raise SystemExit(f"{cmd[0]} exited {rc}")


def make_data(bin_dir: Path, data_root: Path) -> None:
    """Write every dataset of :data:`DATASETS` under ``data_root`` (kept when already there)."""
    for name, args in DATASETS.items():
        target = data_root / name
        if (target / "dataset_description.json").exists():
            continue
        _run([bin_dir / "itermask-qc-synth", *args[:1], target, *args[1:], "--overwrite"])


def run_side(bin_dir: Path, data_root: Path, out_root: Path, nprocs: int = 2) -> None:
    """Participant + group level of every dataset, with the console scripts in ``bin_dir``."""
    for name in DATASETS:
        bids, out, work = data_root / name, out_root / name, out_root / f"{name}_work"
        _run([bin_dir / "itermask-qc", bids, out, "participant", "-w", work, "--nprocs", nprocs],
             ok=(0, 1))  # 1 = some scans failed (reported): their records are compared too
        _run([bin_dir / "itermask-qc", bids, out, "group", "--labels", bids / LABELS])


def _normalise(value, roots: dict):
    if isinstance(value, dict):
        return {k: _normalise(v, roots) for k, v in value.items() if k not in EXCLUDED_FIELDS}
    if isinstance(value, list):
        return [_normalise(v, roots) for v in value]
    if isinstance(value, str):
        for path, label in roots.items():
            value = value.replace(path, label)
    return value


def _diff(a, b, where: str, out: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b or type(a) is not type(b):
        out.append(f"{where}: {a!r} != {b!r}")


def _leaves(value) -> int:
    if isinstance(value, dict):
        return sum(_leaves(v) for v in value.values())
    if isinstance(value, list):
        return sum(_leaves(v) for v in value) if value else 1
    return 1


def _nifti_digest(path: Path) -> str:
    import nibabel as nib
    import numpy as np

    img = nib.load(str(path))
    h = hashlib.sha256(np.ascontiguousarray(np.asanyarray(img.dataobj)).tobytes())
    h.update(str(img.get_data_dtype()).encode())
    h.update(np.asarray(img.affine, dtype=float).round(6).tobytes())
    return h.hexdigest()


def compare(before: Path, after: Path) -> tuple[dict, list[str]]:
    """Counts of what was compared and the differences (empty: identical)."""
    diffs: list[str] = []
    counts = {"qc_json": 0, "qc_fields": 0, "group_csv": 0, "csv_rows": 0, "nifti": 0}
    for name in DATASETS:
        b_out, a_out = before / name, after / name
        roots_b = {str(b_out.resolve()): "<OUT>"}
        roots_a = {str(a_out.resolve()): "<OUT>"}

        def files(root: Path, pattern: str) -> set:
            return {p.relative_to(root) for p in root.rglob(pattern) if "logs" not in p.parts}

        for pattern in ("*_qc.json", "group_*.csv", "*.nii.gz"):
            fb, fa = files(b_out, pattern), files(a_out, pattern)
            for rel in sorted(fb ^ fa):
                diffs.append(f"{name}/{rel}: only in {'before' if rel in fb else 'after'}")
            for rel in sorted(fb & fa):
                pb, pa = b_out / rel, a_out / rel
                if pattern == "*_qc.json":
                    jb = _normalise(json.loads(pb.read_text()), roots_b)
                    ja = _normalise(json.loads(pa.read_text()), roots_a)
                    _diff(jb, ja, f"{name}/{rel}", diffs)
                    counts["qc_json"] += 1
                    counts["qc_fields"] += _leaves(jb)
                elif pattern == "group_*.csv":
                    tb = _normalise(pb.read_text(), roots_b)
                    ta = _normalise(pa.read_text(), roots_a)
                    if tb != ta:
                        diffs.append(f"{name}/{rel}: differs")
                    counts["group_csv"] += 1
                    counts["csv_rows"] += len(list(csv.reader(tb.splitlines()))) - 1
                else:
                    if _nifti_digest(pb) != _nifti_digest(pa):
                        diffs.append(f"{name}/{rel}: voxels or affine differ")
                    counts["nifti"] += 1
        if not files(b_out, "*_qc.json"):
            diffs.append(f"{name}: no *_qc.json under {b_out}")
    return counts, diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("both", help="make the data, run both sides, compare")
    b.add_argument("--before-bin", type=Path, required=True)
    b.add_argument("--after-bin", type=Path, required=True)
    b.add_argument("--root", type=Path, required=True, help="data/, before/, after/ go here")
    b.add_argument("--nprocs", type=int, default=2)
    r = sub.add_parser("run", help="make the data (if missing) and run one side")
    r.add_argument("--bin", type=Path, required=True)
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--nprocs", type=int, default=2)
    c = sub.add_parser("compare", help="compare two output roots made by run")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = p.parse_args(argv)

    if args.command == "both":
        make_data(args.before_bin, args.root / "data")
        run_side(args.before_bin, args.root / "data", args.root / "before", args.nprocs)
        run_side(args.after_bin, args.root / "data", args.root / "after", args.nprocs)
        before, after = args.root / "before", args.root / "after"
    elif args.command == "run":
        make_data(args.bin, args.data)
        run_side(args.bin, args.data, args.out, args.nprocs)
        return 0
    else:
        before, after = args.before, args.after
    counts, diffs = compare(before, after)
    for d in diffs:
        print("DIFF", d)
    print(f"compared {counts['qc_json']} qc.json ({counts['qc_fields']} values), "
          f"{counts['group_csv']} group tables ({counts['csv_rows']} rows), "
          f"{counts['nifti']} derivative NIfTIs; excluded fields: {', '.join(sorted(EXCLUDED_FIELDS))}")
    print("IDENTICAL" if not diffs else f"{len(diffs)} difference(s)")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
