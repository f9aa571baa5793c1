"""Fit a model's stopping slope on held-out synthetic normal heads (what the shipped cards do).

``gamma = factor x median tau(50)`` over the normal heads of a ``benchmarks/detection.py``
cache (``normal_NNN_s<seed>.npz``: the app's preprocessing of synthetic normals never used
for training or testing), with :meth:`IterMask3D.typical_error` (4 forward passes a head).
``itermask-qc-calibrate --gamma`` does the same from a participant run's qc.json files on a
site's own clean scans. Prints each head's tau(50) and, with ``--write``, sets the card's
``gamma`` and ``gamma_calibration``.

Usage::

    python benchmarks/detection.py --cache C --n-normal 20 --n-per-artifact 0 --seed 3000 --prepare-only
    python benchmarks/calibrate_gamma.py --model-dir models/t1w --cache C --seed 3000 --n 20 --write
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("NIPYPE_NO_ET", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--seed", type=int, default=3000)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--factor", type=float, default=None, help="default: qc_pipeline.calibrate's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="write gamma into the model card")
    args = p.parse_args(argv)

    import torch

    from qc_pipeline.calibrate import DEFAULT_GAMMA_FACTOR, gamma_from_tau50, write_card_gamma
    from qc_pipeline.engine import IterMask3D

    torch.set_num_threads(max(1, args.threads))
    model = IterMask3D.from_folder(args.model_dir, device="cpu")
    vs = tuple(model.card["voxel_size"])
    tau50 = []
    for i in range(args.n):
        f = args.cache / f"normal_{i:03d}_s{args.seed}.npz"
        if not f.is_file():
            print(f"{f}: missing (prepare it with benchmarks/detection.py --prepare-only)", file=sys.stderr)
            continue
        z = np.load(f)
        tau50.append(model.typical_error(z["image"].astype(np.float32), z["mask"].astype(bool), voxel_size=vs))
        print(f"{f.name}: tau(50) = {tau50[-1]:.4f}", flush=True)
    g = gamma_from_tau50(tau50, factor=args.factor or DEFAULT_GAMMA_FACTOR,
                         source=f"{len(tau50)} held-out synthetic normal heads (benchmarks/detection.py "
                                f"--seed {args.seed}), the app's preprocessing")
    print(f"median tau(50) {g['gamma_calibration']['median_tau50']:.4f} -> gamma {g['gamma']:.4g}")
    if args.write:
        write_card_gamma(args.model_dir, g)
    return 0


if __name__ == "__main__":
    sys.exit(main())
