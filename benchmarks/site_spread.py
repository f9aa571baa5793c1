#!/usr/bin/env python
"""The group level's engine mask against the site, with and without the voxel-wise spread rule.

Reads a ``benchmarks/screen_real.py`` run (its ``out`` folder: the app's qc.json files, error
maps and masks; its ``bids/truth.json``: which copy carries an artifact) and, for each site of
``--site-column`` (``site``: each head; ``pool``: the heads of a group as one site of different
people), recomputes the site reference (``qc_pipeline.sitenorm.site_normative``, masks written
to a temporary folder, the run's own files untouched) with each ``--spread`` (0: the factor
alone). Prints per site: AUROC (percent) of ``site_anomaly_fraction`` against all artifact types
and the local ones, the clean copies' median ``site_anomaly_fraction`` (% of the brain), and
the engine flag's rates (``site_anomaly_fraction > max(median + 3 x scaled MAD, 0.005)`` of
the site, as the group level flags it).

    python benchmarks/site_spread.py --run RUN --site-column site pool --spread 0 5 --neighbours 0 16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import median_abs_deviation

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/screen_real.py

from screen_real import LOCAL, _auc  # noqa: E402

from qc_pipeline.derivatives import load_qc_records  # noqa: E402
from qc_pipeline.group import DEFAULT_ENGINE_MIN_FRACTION, DEFAULT_MAD_K, scan_maps  # noqa: E402
from qc_pipeline.sitenorm import DEFAULT_SITE_NORM_FACTOR, site_normative  # noqa: E402


def measure(run: Path, column: str, spread_k: float | None, tmp: Path, *, neighbours: int | None = None,
            results: Path | None = None) -> list[dict]:
    truth = json.loads((run / "bids" / "truth.json").read_text())
    recs = [r for r in load_qc_records(results or run / "out", site_column=column)
            if r.ok and r.bids_name in truth]
    out = []
    for site in sorted({r.site for r in recs}):
        maps = [dataclasses.replace(sm, out_mask=tmp / f"{sm.key}.nii.gz")
                for r in recs if r.site == site for sm in [scan_maps(r)] if sm is not None]
        found = site_normative(maps, factor=DEFAULT_SITE_NORM_FACTOR, spread_k=spread_k, neighbours=neighbours)
        x = np.array([found[m.key].fraction if m.key in found else np.nan for m in maps])
        y = np.array([truth[m.key][0] for m in maps])
        local = np.array([truth[m.key][1] == "clean" or truth[m.key][1] in LOCAL for m in maps])
        ok = np.isfinite(x)
        thr = max(float(np.median(x[ok]) + DEFAULT_MAD_K * median_abs_deviation(x[ok], scale="normal")),
                  DEFAULT_ENGINE_MIN_FRACTION)
        flag = ok & (x > thr)
        out.append({"site": site, "spread_k": spread_k, "neighbours": neighbours, "auroc": _auc(y, x), "auroc_local": _auc(y[local], x[local]),
                    "clean_pct": 100 * float(np.nanmedian(x[y == 0])),
                    "clean_flagged_pct": 100 * float(flag[y == 0].mean()),
                    "artifact_flagged_pct": 100 * float(flag[y == 1].mean())})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a screen_real.py --out folder")
    p.add_argument("--site-column", nargs="+", default=["site", "pool"])
    p.add_argument("--spread", nargs="+", type=float, default=[0.0, 5.0], help="k values; 0 = off")
    p.add_argument("--neighbours", nargs="+", type=int, default=[16],
                   help="scans each scan is compared with; 0 = the whole site (default: 16)")
    p.add_argument("--results", type=Path, default=None,
                   help="the participant level's output folder (default: RUN/out)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    print("| site column | site | spread k | neighbours | AUROC all / local | clean masked % (median) "
          "| engine flag: clean % / artifacts % |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for column in a.site_column:
            for k in a.spread:
                for n in a.neighbours:
                    for m in measure(a.run, column, k or None, Path(tmp), neighbours=n or None, results=a.results):
                        print(f"| {column} | {m['site']} | {k:g} | {n or 'whole site'} | {m['auroc']:.1f} / "
                              f"{m['auroc_local']:.1f} | {m['clean_pct']:.2f} | {m['clean_flagged_pct']:.0f} / "
                              f"{m['artifact_flagged_pct']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
