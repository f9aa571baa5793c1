"""Add one native-image measurement to a model card's QC-score reference.

The QC-score reference (``qc_score.features`` of the model card) is fitted on held-out
synthetic normal heads (``benchmarks/detection.py --seed 3000 --n-normal 20``). A new
measurement of the native image (taken by :func:`qc_pipeline.qc.score.native_measurements`)
needs its own entry; refitting the whole reference would also replace the entries that
were fitted under other protocols (the engine's measurements against the normal-error
map, ``benchmarks/normal_error.py``). This script rebuilds the same normal heads
(``detection.build_scan``: same seeds, sites and contrast), measures the native image,
fits only the named measurements (:func:`qc_pipeline.qc.score.fit_reference`) and writes
them into the card, recording their source under ``qc_score.feature_sources``.
Prints one table row per measurement: clean median and scale in transformed units, and
the raw values' range.

Usage::

    python benchmarks/reference_feature.py --model-dir models/t1w --feature fov_contact --seed 3000 --n 20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/detection.py
from detection import build_scan  # noqa: E402

from qc_pipeline.engine.modelio import CARD_NAME, write_model_card  # noqa: E402
from qc_pipeline.qc.score import fit_reference, native_measurements  # noqa: E402

#: where each native measurement sits in native_measurements()' output
NATIVE = {"fov_contact": ("background", "fov_contact")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--feature", nargs="+", required=True, choices=sorted(NATIVE))
    p.add_argument("--seed", type=int, default=3000, help="the reference's benchmark seed")
    p.add_argument("--n", type=int, default=20, help="normal heads")
    p.add_argument("--dry-run", action="store_true", help="print, do not write the card")
    args = p.parse_args(argv)

    card_path = args.model_dir / CARD_NAME
    card = json.loads(card_path.read_text())
    rows = []
    for i in range(args.n):
        img, seed, _ = build_scan("normal", i, base_seed=args.seed, contrast=card["contrast"], severity=(0.0, 0.0))
        native = native_measurements(img)
        rows.append({f: native[NATIVE[f][0]].get(NATIVE[f][1]) for f in args.feature})
        print(f"normal {i:02d} (seed {seed}): " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()),
              file=sys.stderr, flush=True)
    ref = fit_reference(rows, features=args.feature)
    print("\n| model | measurement | n | median (transformed) | scale | raw min-max |\n|---|---|---|---|---|---|")
    for f, entry in ref["features"].items():
        raw = [r[f] for r in rows if r[f] is not None]
        print(f"| {card.get('model_id')} | {f} | {entry['n']} | {entry['median']:.4g} | {entry['scale']:.4g} | "
              f"{np.min(raw):.4g}-{np.max(raw):.4g} |")
    if ref.get("skipped"):
        print(f"skipped: {ref['skipped']}", file=sys.stderr)
    if args.dry_run or not ref["features"]:
        return 0
    qc = card.setdefault("qc_score", {})
    qc.setdefault("features", {}).update(ref["features"])
    sources = qc.setdefault("feature_sources", {})
    for f in ref["features"]:
        sources[f] = (f"{args.n} held-out synthetic normal {card['contrast']} heads (benchmarks/detection.py "
                      f"--seed {args.seed}), native image; benchmarks/reference_feature.py")
    write_model_card(card_path.parent, card)
    print(f"wrote {', '.join(ref['features'])} into {card_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
