"""``itermask-qc-synth``: synthetic BIDS cohorts and the demo dataset.

Examples::

    itermask-qc-synth cohort out/ --n-subjects 40 --contrasts T1w,T2w --seed 1 \\
        --artifacts all --artifact-fraction 0.5 --severity 0.3:1.0
    itermask-qc-synth demo demo_data --overwrite
    itermask-qc-synth bank bank1mm.npz          # anatomy bank for itermask-qc-train-synth
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .. import __version__
from .errors import SynthError

LOGGER = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    from .artifacts import ARTIFACTS

    p = argparse.ArgumentParser(prog="itermask-qc-synth", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cohort", help="write a synthetic BIDS cohort + labels")
    c.add_argument("out", help="output BIDS folder")
    c.add_argument("--n-subjects", type=int, required=True)
    c.add_argument("--contrasts", default="T1w", help="comma list of T1w,T2w,FLAIR")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--artifacts", default="none",
                   help="'none', 'all', 'paper' or a comma list of: " + ", ".join(ARTIFACTS))
    c.add_argument("--artifact-fraction", type=float, default=0.5)
    c.add_argument("--severity", default="0.3:1.0", help="LO:HI in [0, 1]")
    c.add_argument("--sites", default="A,B,C", help="comma list of sites (A, B, C)")
    c.add_argument("--work-mm", type=float, default=1.5, help="internal resolution, mm")
    c.add_argument("--voxel-size", type=float, default=None,
                   help="force an isotropic stored voxel size, mm")
    c.add_argument("--nprocs", type=int, default=1)
    c.add_argument("--plain-anatomy", action="store_true",
                   help="heads from the plain averaged template, without a single brain's sulci and "
                        "sharp GM/WM boundary")
    c.add_argument("--overwrite", action="store_true")

    d = sub.add_parser("demo", help="write the small demo dataset")
    d.add_argument("out")
    d.add_argument("--nprocs", type=int, default=1)
    d.add_argument("--overwrite", action="store_true")

    b = sub.add_parser("bank", help="write the anatomy bank that domain-randomised training draws from")
    b.add_argument("out", help="output .npz")
    b.add_argument("--voxel-mm", type=float, default=1.0, help="bank voxel (must divide the model voxel)")
    return p


def main(argv=None) -> int:
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    from .bids import LABELS_RELPATH, write_cohort, write_demo

    t0 = time.time()
    try:
        if getattr(args, "nprocs", 1) < 1:  # the bank command has no --nprocs
            raise SynthError(f"--nprocs must be >= 1; got {args.nprocs}")
        if args.command == "bank":
            from .bank import build_anatomy_bank, save_bank

            out = save_bank(build_anatomy_bank(voxel_mm=args.voxel_mm), args.out)
            print(f"wrote {out} in {time.time() - t0:.1f} s")
            return 0
        if args.command == "cohort":
            out = write_cohort(
                args.out, args.n_subjects, contrasts=args.contrasts, seed=args.seed,
                artifacts=args.artifacts, artifact_fraction=args.artifact_fraction,
                severity=args.severity, sites=[s.strip() for s in args.sites.split(",") if s.strip()],
                overwrite=args.overwrite, work_mm=args.work_mm, voxel_size=args.voxel_size,
                nprocs=args.nprocs, cortex_detail=not args.plain_anatomy)
        else:
            out = write_demo(args.out, overwrite=args.overwrite, nprocs=args.nprocs)
    except SynthError as exc:
        print(f"itermask-qc-synth: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - t0:.1f} s; labels: {out / LABELS_RELPATH}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
