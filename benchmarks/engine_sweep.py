#!/usr/bin/env python
"""Where in the IterMask3D sweep do artifacts stand out? A diagnostic of the engine alone.

``run``: for every cached copy of ``benchmarks/engine_real.py prepare`` (``--cache``), the sweep
is run densely (t = 5 .. 99 % of the brain unmasked, no early stop, no refinement, seed 0) and
the error map of every pass (brain voxels, float16) and the tau curve are kept in
``OUT/HEAD__COPY.npz``; finished copies are skipped (resumable; ``--part I --parts N`` splits
the copies between processes).

``table``: per head and pooled, AUROC (all types / the local ones) and the clean copies'
median share of the brain for the voxel count ``err > T`` in the pass after ``t`` % was
unmasked, for each ``--t`` and ``--T``; and for the first-pass mean error.

``refine``: the ``normative`` schedule's path (t = 25, 50, seed 0) on every cached copy, then,
for each ``--T``, ``--passes`` shrinking passes at that level (a voxel stays masked while its
error is above ``T``), the mask's share of the brain after each pass in ``OUT/HEAD__COPY.json``
(resumable). ``refine-table``: AUROC all / local and the clean copies' median share per level
and pass, per head and pooled.

Usage::

    .venv/bin/python benchmarks/engine_sweep.py run --cache RG --model-dir models/t1w --out SW
    .venv/bin/python benchmarks/engine_sweep.py table --out SW --t 0 50 75 --T 1 2 4
    .venv/bin/python benchmarks/engine_sweep.py refine --cache RG --model-dir models/t1w --out RF \
        --T 0.5 1 1.5 --passes 6
    .venv/bin/python benchmarks/engine_sweep.py refine-table --out RF
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qc_pipeline.engine.hf import high_frequency
from qc_pipeline.engine.inference import IterMask3D, threshold_at

SWEEP = (5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 88, 90, 92, 94, 95, 96, 97, 98, 99)
LOCAL = ("chunk_top", "susceptibility", "spike", "ghosting")


def run(args) -> int:
    torch.set_num_threads(max(args.threads, 1))
    eng = IterMask3D.from_folder(args.model_dir, device="cpu")
    radius = tuple(eng.card["hf"]["radius"])
    args.out.mkdir(parents=True, exist_ok=True)
    files = sorted(f for d in sorted(args.cache.iterdir()) if d.is_dir() for f in d.glob("*.npz"))
    for i, f in enumerate(files):
        o = args.out / f"{f.parent.name}__{f.stem}.npz"
        if i % args.parts != args.part or o.exists():
            continue
        with np.load(f) as z:
            x, b, meta = z["image"].astype(np.float32), z["brain_mask"].astype(bool), str(z["meta"])
        hf = high_frequency(x, radius, voxel_size=tuple(eng.voxel_size or (2.0, 2.0, 2.0)))
        gen = torch.Generator().manual_seed(0)
        mask, errs, taus, t0 = b.copy(), [], [], time.time()
        for k in range(len(SWEEP) + 1):
            noise = torch.randn(x.shape, generator=gen).numpy()
            inp = torch.from_numpy(np.stack([np.where(mask, noise, x), hf]).astype(np.float32))
            err = ((eng._forward([inp])[0].numpy() - x) ** 2) * b
            errs.append(err[b].astype(np.float16))
            if k < len(SWEEP):
                taus.append(threshold_at(np.sort(err[b]), SWEEP[k]))
                mask = (err > taus[-1]) & b
        np.savez_compressed(o, errs=np.stack(errs), taus=np.array(taus), ts=np.array(SWEEP, float), meta=meta)
        print(f"{o.name}: {time.time() - t0:.0f} s", flush=True)
    return 0


def refine(args) -> int:
    from qc_pipeline.engine.schedules import get_schedule

    torch.set_num_threads(max(args.threads, 1))
    eng = IterMask3D.from_folder(args.model_dir, device="cpu")
    radius = tuple(eng.card["hf"]["radius"])
    vs = tuple(eng.voxel_size or (2.0, 2.0, 2.0))
    args.out.mkdir(parents=True, exist_ok=True)
    files = sorted(f for d in sorted(args.cache.iterdir()) if d.is_dir() for f in d.glob("*.npz"))
    for i, f in enumerate(files):
        o = args.out / f"{f.parent.name}__{f.stem}.json"
        if i % args.parts != args.part or o.exists():
            continue
        with np.load(f) as z:
            x, b, meta = z["image"].astype(np.float32), z["brain_mask"].astype(bool), str(z["meta"])
        hf = high_frequency(x, radius, voxel_size=vs)
        gen = torch.Generator().manual_seed(0)

        def err_of(mask):
            noise = torch.randn(x.shape, generator=gen).numpy()
            inp = torch.from_numpy(np.stack([np.where(mask, noise, x), hf]).astype(np.float32))
            return ((eng._forward([inp])[0].numpy() - x) ** 2) * b

        mask, t0 = b.copy(), time.time()
        for t in get_schedule("normative").sweep_t:
            err = err_of(mask)
            mask = (err > threshold_at(np.sort(err[b]), t)) & b
        state, half = gen.get_state(), mask
        shares = {}
        for level in args.T:
            gen.set_state(state)
            m, shares[str(level)] = half.copy(), []
            for _ in range(args.passes):
                m = m & (err_of(m) > level)
                shares[str(level)].append(float(m.sum() / b.sum()))
        o.write_text(json.dumps({"meta": json.loads(meta), "share": shares}))
        print(f"{o.name}: {time.time() - t0:.0f} s", flush=True)
    return 0


def refine_table(args) -> int:
    from sklearn.metrics import roc_auc_score

    rows = [json.loads(f.read_text()) for f in sorted(args.out.glob("*.json"))]
    heads = sorted({r["meta"]["head"] for r in rows}) + ["pooled"]
    print("| level T (z^2), pass | " + " | ".join(f"{h}: AUROC all / local / clean %" for h in heads) + " |")
    print("|---|" + "---|" * len(heads))
    for level in rows[0]["share"]:
        for k in range(len(rows[0]["share"][level])):
            cells = []
            for h in heads:
                rs = [r for r in rows if h == "pooled" or r["meta"]["head"] == h]
                c = [r["share"][level][k] for r in rs if r["meta"]["kind"] == "clean"]
                a = [r["share"][level][k] for r in rs if r["meta"]["kind"] != "clean"]
                lo = [r["share"][level][k] for r in rs if r["meta"]["kind"] in LOCAL]
                auc = lambda p: 100 * roc_auc_score([0] * len(c) + [1] * len(p), c + p)
                cells.append(f"{auc(a):.1f} / {auc(lo):.1f} / {100 * np.median(c):.1f}")
            print(f"| {level}, {k + 1} | " + " | ".join(cells) + " |")
    return 0


def table(args) -> int:
    from sklearn.metrics import roc_auc_score

    rows = []
    for f in sorted(args.out.glob("*.npz")):
        with np.load(f) as z:
            m = json.loads(str(z["meta"]))
            rows.append((m["head"], m["kind"], z["errs"].astype(np.float32)))
    heads = sorted({r[0] for r in rows}) + ["pooled"]
    steps = (0,) + SWEEP

    def line(score):
        out = []
        for h in heads:
            rs = [r for r in rows if h == "pooled" or r[0] == h]
            c = [score(r) for r in rs if r[1] == "clean"]
            a = [score(r) for r in rs if r[1] != "clean"]
            lo = [score(r) for r in rs if r[1] in LOCAL]
            if not c or not a:
                continue
            auc = lambda p: 100 * roc_auc_score([0] * len(c) + [1] * len(p), c + p) if p else float("nan")
            out.append(f"{auc(a):.1f} / {auc(lo):.1f} / {100 * np.median(c):.1f}")
        return " | ".join(out)

    print("| score | " + " | ".join(f"{h}: AUROC all / local / clean %" for h in heads) + " |")
    print("|---|" + "---|" * len(heads))
    for t in args.t:
        k = steps.index(t)
        for thr in args.T:
            print(f"| err > {thr} after t = {t} | " + line(lambda r: float((r[2][k] > thr).mean())) + " |")
    print("| first-pass mean error | " + line(lambda r: float(r[2][0].mean())).replace("/ ", "/ ") + " |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("run")
    pr.add_argument("--cache", type=Path, required=True)
    pr.add_argument("--model-dir", type=Path, required=True)
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--threads", type=int, default=1)
    pr.add_argument("--part", type=int, default=0)
    pr.add_argument("--parts", type=int, default=1)
    pt = sub.add_parser("table")
    pt.add_argument("--out", type=Path, required=True)
    pt.add_argument("--t", type=int, nargs="+", default=[0, 50, 75])
    pt.add_argument("--T", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    pf = sub.add_parser("refine")
    pf.add_argument("--cache", type=Path, required=True)
    pf.add_argument("--model-dir", type=Path, required=True)
    pf.add_argument("--out", type=Path, required=True)
    pf.add_argument("--T", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    pf.add_argument("--passes", type=int, default=6)
    pf.add_argument("--threads", type=int, default=1)
    pf.add_argument("--part", type=int, default=0)
    pf.add_argument("--parts", type=int, default=1)
    prt = sub.add_parser("refine-table")
    prt.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    return {"run": run, "table": table, "refine": refine, "refine-table": refine_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
