#!/usr/bin/env python
"""Engine throughput: scans per second of IterMask3D over a batch of heads, per batch size.

The shipped model (or ``--model-dir``) screens ``--scans`` domain-randomised heads of the
card's contrast (drawn on the device from the anatomy bank, :mod:`qc_pipeline.engine.domainrand`:
real-looking anatomy, contrast, resolution, bias and noise, z-scored on the model grid like the
app's preprocessing) with :meth:`IterMask3D.run_batch` at each ``--batch`` size, in one run.
Prints, per batch size: scans/s, seconds per scan, the share of the time spent inside the
network (timed around each forward pass, synchronised on CUDA), forward passes per scan, and
how many scans' voxel counts equal batch 1's (the engine promises the same result whatever
the batch). A last row times the network alone on full micro-batches (volumes/s) for the
forward limit. Preprocessing is not included (see ``docs/performance.md`` for the app end to
end).

Usage::

    NIPYPE_NO_ET=1 .venv/bin/python benchmarks/engine_throughput.py --scans 4 --batch 1 2 --threads 2
    NIPYPE_NO_ET=1 .venv/bin/python benchmarks/engine_throughput.py --device cuda --scans 64 --batch 1 16 64
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from qc_pipeline.engine import IterMask3D
from qc_pipeline.engine.domainrand import DomainRandConfig, DomainRandomizer
from qc_pipeline.synth.bank import build_anatomy_bank


class TimedNet(torch.nn.Module):
    """The model's network, with the wall time of every forward pass added up."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        super().__init__()
        self.net, self.cuda = net, device.type == "cuda"
        self.seconds, self.calls = 0.0, 0

    def forward(self, x):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = self.net(x)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return y


def draw_heads(model: IterMask3D, n: int, seed: int, device) -> tuple[list, list]:
    """``n`` domain-randomised heads of the model's contrast on its grid (CPU arrays)."""
    voxel = float(model.card["voxel_size"][0])
    bank = build_anatomy_bank(voxel_mm=voxel)
    contrast = str(model.card.get("contrast", "T1w"))
    cfg = DomainRandConfig(grid=tuple(int(g) for g in model.card["grid"]), voxel_mm=voxel,
                           contrast_probs={contrast: 1.0}, p_random_contrast=0.0)
    gen = DomainRandomizer(bank, cfg, device=device, seed=seed)
    images, brains = [], []
    while len(images) < n:
        out = gen.sample(min(8, n - len(images)))
        images += list(out["image"].float().cpu().numpy())
        brains += list(out["brain"].cpu().numpy().astype(bool))
    return images, brains


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None, help="model folder (default: the packaged T1w model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--micro-batch", type=int, default=None, help="volumes per forward pass (default: the engine's)")
    ap.add_argument("--schedule", default=None, help="default: the card's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = IterMask3D.from_folder(args.model_dir, device=args.device, micro_batch=args.micro_batch)
    timed = TimedNet(model.net, model.device)
    model.net = timed
    t0 = time.perf_counter()
    images, brains = draw_heads(model, args.scans, args.seed, model.device)
    draw_s = time.perf_counter() - t0
    vs = tuple(float(v) for v in model.card["voxel_size"])
    name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {model.model_id} on {model.device} ({name}), torch {torch.__version__}, {args.threads} CPU threads, "
          f"micro-batch {model.micro_batch}, {args.scans} heads drawn in {draw_s:.1f} s, "
          f"schedule {args.schedule or model.default_schedule}")
    print("| batch | scans/s | s/scan | forward share | passes/scan | voxel counts equal to batch 1 |")
    print("|---:|---:|---:|---:|---:|---|")
    model.batch_size = 1
    model.run_batch(images[:1], brains[:1], voxel_size=vs, schedule=args.schedule, seed=args.seed)  # warm-up
    first = None
    for b in args.batch:
        model.batch_size = int(b)
        timed.seconds = 0.0
        t0 = time.perf_counter()
        res = model.run_batch(images, brains, voxel_size=vs, schedule=args.schedule, seed=args.seed)
        wall = time.perf_counter() - t0
        counts = [r.anomaly_voxels for r in res]
        first = counts if first is None else first
        same = sum(int(a == c) for a, c in zip(first, counts))
        print(f"| {b} | {len(res) / wall:.2f} | {wall / len(res):.2f} | {100 * timed.seconds / wall:.0f} % | "
              f"{statistics.median(r.forward_passes for r in res):.0f} | "
              f"{same}/{len(res)}{'' if args.batch[0] == 1 else ' (first row as reference)'} |", flush=True)
    # the network alone: full micro-batches of two-channel volumes
    x = torch.randn((model.micro_batch, 2, *images[0].shape), device=model.device)
    n_rep = 20 if model.device.type == "cuda" else 3
    with torch.inference_mode():
        timed(x)
        timed.seconds = 0.0
        for _ in range(n_rep):
            timed(x)
    print(f"| network alone | {n_rep * model.micro_batch / timed.seconds:.1f} volumes/s | | 100 % | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
