#!/usr/bin/env python
"""Engine speed: ``reference`` vs ``fast`` schedule on the same scans, in one run.

Prints forward passes per scan, seconds per pass, seconds per scan and the
ratio (medians over scans). The network is the default-size ``UNet3D``,
randomly initialised (untrained): timing only. The refinement of an
untrained network converges differently from a trained one's, so the pass
counts are indicative (``reference`` is always >= 101 passes, ``fast`` at most
21 by construction); seconds per pass is the hardware figure.

Usage::

    NIPYPE_NO_ET=1 .venv/bin/python benchmarks/engine_speed.py --scans 2 --threads 2
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

from qc_pipeline.engine import IterMask3D, default_card
from qc_pipeline.config import DEFAULT_GRID, DEFAULT_VOXEL_SIZE
from qc_pipeline.models.unet import UNet3D, count_macs, count_parameters


def synthetic_scan(shape, seed):
    rng = np.random.default_rng(seed)
    g = np.indices(shape).astype(float)
    c = (np.asarray(shape) - 1) / 2
    radii = np.asarray(shape) * 0.42
    brain = sum(((g[i] - c[i]) / radii[i]) ** 2 for i in range(3)) <= 1
    tex = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    tex = (tex - tex[brain].mean()) / tex[brain].std()
    return np.where(brain, tex, 0).astype(np.float32), brain


class _Oracle:
    """Copies unmasked voxels; masked ones are the clean scan + 0.3 x the noise fill."""

    def __init__(self, clean, observed):
        self.clean = torch.from_numpy(clean)
        self.observed = torch.from_numpy(observed)

    def __call__(self, inp):
        x_hat = inp[:, 0]
        return torch.where(x_hat != self.observed, self.clean + 0.3 * x_hat, x_hat)[:, None]


def oracle_counts(args):
    card = default_card(DEFAULT_GRID, DEFAULT_VOXEL_SIZE)
    g = np.indices(DEFAULT_GRID).astype(float)
    print("# oracle reconstructor (no network): forward passes per schedule, planted blob of radius r voxels")
    print("| scan | blob % of brain | schedule | passes | refine passes | Dice(mask, blob) |")
    print("|---|---:|---|---:|---:|---:|")
    for i in range(args.scans):
        clean, brain = synthetic_scan(DEFAULT_GRID, i)
        r = (4, 8, 12)[i % 3]
        c = np.asarray(DEFAULT_GRID) // 2 + np.asarray([6, -5, 4])
        blob = (sum((g[k] - c[k]) ** 2 for k in range(3)) <= r * r) & brain
        x = (clean + 3.0 * blob).astype(np.float32)
        for sched in args.schedules:
            res = IterMask3D(_Oracle(clean, x), card, device="cpu").run(x, brain, schedule=sched)
            dice = 2 * (res.mask & blob).sum() / (res.mask.sum() + blob.sum())
            print(f"| {i} | {100 * blob.sum() / brain.sum():.1f} | {sched} | {res.forward_passes} | "
                  f"{res.refine_passes} | {dice:.3f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--schedules", nargs="+", default=["reference", "fast"])
    ap.add_argument("--oracle", action="store_true",
                    help="pass counts only, with a stand-in reconstructor that knows the clean scan "
                         "(a planted blob per scan; no network time)")
    args = ap.parse_args(argv)
    if args.oracle:
        return oracle_counts(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = UNet3D().eval()
    card = default_card(DEFAULT_GRID, DEFAULT_VOXEL_SIZE)
    card["network"] = net.config()
    model = IterMask3D(net, card, device=args.device)
    scans = [synthetic_scan(DEFAULT_GRID, s) for s in range(args.scans)]
    print(f"# grid {DEFAULT_GRID} @ {DEFAULT_VOXEL_SIZE} mm, UNet3D{tuple(net.features)} "
          f"(untrained), params {count_parameters(net):,}, "
          f"{count_macs(net, DEFAULT_GRID) / 1e9:.2f} GMAC/pass")
    print(f"# device {model.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, {args.scans} synthetic scans")
    rows = {}
    for sched in args.schedules:
        passes, secs = [], []
        for i, (img, brain) in enumerate(scans):
            t0 = time.perf_counter()
            res = model.run(img, brain, voxel_size=DEFAULT_VOXEL_SIZE, schedule=sched, seed=0)
            secs.append(time.perf_counter() - t0)
            passes.append(res.forward_passes)
            print(f"  {sched:9s} scan {i}: {res.forward_passes:4d} passes {secs[-1]:7.1f} s "
                  f"(refine {res.refine_passes}, converged {res.converged}, path {res.fit.path})", flush=True)
        rows[sched] = (statistics.median(passes), statistics.median(s / p for s, p in zip(secs, passes)),
                       statistics.median(secs))
    base = rows.get("reference", next(iter(rows.values())))[2]
    print()
    print("| schedule | passes/scan | s/pass | s/scan | speed-up vs reference |")
    print("|---|---:|---:|---:|---:|")
    for sched, (p, spp, sps) in rows.items():
        print(f"| {sched} | {p:.0f} | {spp:.3f} | {sps:.1f} | {base / sps:.1f}x |")


if __name__ == "__main__":
    main()
