#!/usr/bin/env python
"""Screen NIfTI files one by one with the library call (``qc_pipeline.screening.screen``, the
participant level's steps) and print what the preprocessing's template fit and the engine give.

Per file: the share of the brain in the engine's mask (``anomaly_fraction``), in the mask
before the model's spread rule (``candidate_anomaly_fraction``), the template fit's surface
agreement, the QC score and its driver. Run it at two commits to see what a change of the
preprocessing does to the same files (the model is loaded once; nothing is written but
``--json-out``):

    NIPYPE_NO_ET=1 .venv/bin/python benchmarks/screen_files.py --json-out after.jsonl FILE [FILE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--contrast", default="T1w")
    ap.add_argument("--json-out", type=Path, help="one JSON line per file")
    args = ap.parse_args(argv)

    from qc_pipeline.engine import IterMask3D
    from qc_pipeline.errors import QCPipelineError
    from qc_pipeline.screening import screen

    model = IterMask3D.from_folder(None, device="cpu", contrast=args.contrast)
    out = open(args.json_out, "w") if args.json_out else None
    print("| file | brain masked % | candidate % | template agreement | QC score (driver) |")
    print("|---|---|---|---|---|")
    for f in args.files:
        try:
            r = screen(f, contrast=args.contrast, model=model)
        except QCPipelineError as exc:
            print(f"| {f.name} | failed: {exc} | | | |")
            continue
        row = {"file": str(f), "anomaly_fraction": r.get("anomaly_fraction"),
               "candidate_anomaly_fraction": r.get("candidate_anomaly_fraction"),
               "surface_agreement": (r.get("template_fit") or {}).get("surface_agreement"),
               "qc_score": r.get("qc_score"), "qc_score_driver": r.get("qc_score_driver")}
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

        def pct(v):
            return "n/a" if v is None else f"{100 * v:.2f}"

        agree = row["surface_agreement"]
        print(f"| {f.name} | {pct(row['anomaly_fraction'])} | {pct(row['candidate_anomaly_fraction'])} "
              f"| {'n/a' if agree is None else f'{agree:.3f}'} "
              f"| {row['qc_score'] if row['qc_score'] is None else round(row['qc_score'], 2)} ({row['qc_score_driver']}) |")
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
