"""Train the domain-randomised models in one short GPU window, then print a table of the engine
on fresh heads it has not seen.

Phase 1 trains one network on heads of every contrast (T1w/T2w/FLAIR priors and a share of
uniformly random contrasts); phase 2 continues it on T1w-prior heads only; with four
``--minutes``, phases 3 and 4 continue the phase-1 network on T2w-prior and FLAIR-prior heads
(the T2w and FLAIR models). Each model folder is written (``<out>/mixed``, ``<out>/t1w``,
``<out>/t2w``, ``<out>/flair``). A phase with a budget of 0 is skipped. Each phase has a wall-clock budget; a phase that
finds its checkpoint continues it (any device), so a CPU session can carry a run on.

The table: for each model and each contrast, the engine (IterMask3D, fast schedule) on
``--n-eval`` clean heads drawn with another seed and no random contrasts: median masked
fraction of the brain, first-pass and final mean error in the brain (z-units^2), the tau fit's
stopping point, passes; and, with ``--real-cache``, the same on preprocessed real copies
(``benchmarks/engine_real.py prepare``).

Usage (the GPU window of 2026-12-04; ``PYTHONPATH=.`` on a machine without the package)::

    python benchmarks/train_dr_window.py --bank bank1mm.npz --out OUT --minutes 5.5 2.0

T2w and FLAIR continuing the shipped T1w network, whose first phase was mixed (a later window; on this
project's 2-core CPU one step of batch 2 takes about 9 s, so these need a GPU)::

    python benchmarks/train_dr_window.py --bank bank1mm.npz --out OUT --minutes 0 0 4 4 \\
        --continue-from models/t1w

CPU smoke run (tiny)::

    python benchmarks/train_dr_window.py --bank bank2mm.npz --out /tmp/w --minutes 0.1 0.1 \\
        --grid 40 48 40 --voxel-size 4 --features 4 8 16 --batch-size 2 --n-eval 2
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qc_pipeline.engine.domainrand import DomainRandConfig, DomainRandomizer, load_bank
from qc_pipeline.engine.inference import IterMask3D
from qc_pipeline.engine.train_synth import train_synthetic

MIX = {"T1w": 0.5, "T2w": 0.25, "FLAIR": 0.25}
SEEDS = {"mixed": 1, "t1w": 2, "t2w": 3, "flair": 4}


def _summary(rows):
    def med(k):
        v = [r[k] for r in rows if r.get(k) is not None and np.isfinite(r[k])]
        return float(np.median(v)) if v else float("nan")
    return {k: med(k) for k in ("fraction", "first_error", "mean_error", "t_stop", "passes", "seconds")}


def run_engine(model, image, brain, vs):
    r = model.run(image, brain, voxel_size=vs, seed=0)
    t_stop = r.fit.t_stop
    return {"fraction": float(r.anomaly_fraction), "first_error": float(r.first_pass_mean_error),
            "mean_error": float(r.mean_error), "t_stop": float("nan") if t_stop is None else float(t_stop),
            "passes": float(r.forward_passes), "seconds": float(r.seconds)}


def evaluate(model_dir, bank, args, device):
    model = IterMask3D.from_folder(model_dir, device=device)
    vs = (args.voxel_size,) * 3
    out = {}
    for contrast in ("T1w", "T2w", "FLAIR"):
        cfg = DomainRandConfig(grid=tuple(args.grid), voxel_mm=args.voxel_size,
                               contrast_probs={contrast: 1.0}, p_random_contrast=0.0)
        gen = DomainRandomizer(bank, cfg, device=device, seed=424242)
        rows = []
        for _ in range(args.n_eval):
            s = gen.sample(1)
            rows.append(run_engine(model, s["image"][0].cpu().numpy(), s["brain"][0].cpu().numpy(), vs))
        out[f"synthetic {contrast}"] = _summary(rows)
    if args.real_cache and Path(args.real_cache).is_dir():
        by_head: dict[str, list] = {}
        for f in sorted(Path(args.real_cache).glob("*.npz")):
            z = np.load(f)
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            if meta.get("kind", "clean") != "clean":
                continue
            by_head.setdefault(meta.get("head", f.stem), []).append(
                run_engine(model, z["image"].astype(np.float32), z["brain_mask"].astype(bool), vs))
        for head, rows in by_head.items():
            out[f"real {head} clean (n={len(rows)})"] = _summary(rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, nargs="+", default=[5.5, 2.0],
                   help="budgets of the phases mixed, t1w[, t2w, flair] (0 skips a phase)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, nargs=2, default=[1e-3, 3e-4],
                   help="learning rate of phase 1 and of the phases that continue it")
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--grid", type=int, nargs=3, default=[80, 96, 80])
    p.add_argument("--voxel-size", type=float, default=2.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--continue-from", type=Path, default=None,
                   help="model folder the t1w/t2w/flair phases start from (default OUT/mixed; e.g. "
                        "models/t1w, whose first phase was mixed)")
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--real-cache", type=Path, default=None)
    p.add_argument("--thick-slice-p", type=float, default=None,
                   help="share of heads drawn as 2D stacks of thick slices (default: DomainRandConfig's)")
    p.add_argument("--thick-slice-mm", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="their slice thickness range in mm (default: DomainRandConfig's)")
    args = p.parse_args(argv)
    if len(args.minutes) not in (2, 4):
        p.error(f"--minutes takes 2 or 4 budgets, got {len(args.minutes)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    print(f"torch {torch.__version__} device {device}"
          + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""), flush=True)
    t0 = time.time()
    bank = load_bank(args.bank)
    common = dict(features=args.features, device=device, batch_size=args.batch_size, checkpoint_minutes=3.0)
    start = args.continue_from or args.out / "mixed"
    scanner = {k: v for k, v in (("thick_slice_p", args.thick_slice_p),
                                 ("thick_slice_mm", None if args.thick_slice_mm is None else tuple(args.thick_slice_mm)))
               if v is not None}
    phases = [
        ("mixed", DomainRandConfig(grid=tuple(args.grid), voxel_mm=args.voxel_size, contrast_probs=MIX,
                                   p_random_contrast=0.15, **scanner), args.minutes[0], args.lr[0], None),
        ("t1w", DomainRandConfig(grid=tuple(args.grid), voxel_mm=args.voxel_size,
                                 contrast_probs={"T1w": 1.0}, p_random_contrast=0.1, **scanner),
         args.minutes[1], args.lr[1], start),
    ]
    for name, contrast, minutes in zip(("t2w", "flair"), ("T2w", "FLAIR"), args.minutes[2:]):
        phases.append((name, DomainRandConfig(grid=tuple(args.grid), voxel_mm=args.voxel_size,
                                              contrast_probs={contrast: 1.0}, p_random_contrast=0.1, **scanner),
                       minutes, args.lr[1], start))
    results = {}
    for name, cfg, minutes, lr, init in phases:
        if minutes <= 0:
            continue
        contrast = next(iter(cfg.contrast_probs)) if len(cfg.contrast_probs) == 1 else "T1w"
        res = train_synthetic(bank, args.out / name, contrast=contrast, config=cfg, minutes=minutes, lr=lr,
                              lr_final=lr / 50, init_from=init, seed=SEEDS[name], **common)
        results[name] = res
        print(f"phase {name}: {res['steps']} steps, {res['samples']} heads, loss {res['final_loss']:.4f}, "
              f"{res['wall_time_s']:.0f} s", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"training done at {time.time() - t0:.0f} s", flush=True)
    table = {}
    for name in results:
        try:
            table[name] = evaluate(args.out / name, bank, args, device)
        except Exception as exc:  # noqa: BLE001 - the weights are already written; report and go on
            print(f"evaluation of {name} failed: {exc!r}", flush=True)
    print("| model | set | masked % | first-pass err | final err | t_stop | passes | s/scan |")
    print("|---|---|---|---|---|---|---|---|")
    for name, sets in table.items():
        for s, v in sets.items():
            print(f"| {name} | {s} | {100 * v['fraction']:.1f} | {v['first_error']:.3f} | {v['mean_error']:.3f} "
                  f"| {v['t_stop']:.1f} | {v['passes']:.0f} | {v['seconds']:.2f} |")
    (args.out / "window.json").write_text(json.dumps({"results": {k: {kk: str(vv) for kk, vv in v.items()}
                                                                  for k, v in results.items()},
                                                      "table": table, "total_s": time.time() - t0}, indent=1))
    print(f"total {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
