"""``itermask-qc-calibrate``: the argument parser and :func:`main` of the calibration command
(the fits are :mod:`qc_pipeline.calibrate`)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .. import calibrate as _calibrate
from ..calibrate import (DEFAULT_GAMMA_FACTOR, CalibrationError, gamma_from_outputs, reference_from_outputs,
                         rename_calibrated, uncalibrated_id, write_card_gamma, write_card_reference)
from ..errors import ModelCardError, ModelNotFoundError
from ..modelcard import CARD_NAME, load_model_card
from .exits import EXIT_CANT_CREATE, EXIT_NO_INPUT, EXIT_USAGE

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="itermask-qc-calibrate", description=_calibrate.__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", type=Path, help="derivatives folder of a participant run on clean scans")
    p.add_argument("model_dir", type=Path, help="the model folder those scans were screened with")
    p.add_argument("--suffix", default="T1w", choices=["T1w", "T2w", "FLAIR"])
    p.add_argument("--labels", type=Path, default=None, help="ratings TSV; scans rated 1/bad are left out")
    p.add_argument("--min-scans", type=int, default=8, help="fewest clean scans to fit on (default 8)")
    p.add_argument("--gamma", action="store_true",
                   help="also fit the engine's stopping slope on these scans (gamma = factor x median tau(50))")
    p.add_argument("--gamma-factor", type=float, default=DEFAULT_GAMMA_FACTOR,
                   help=f"the factor of --gamma (default {DEFAULT_GAMMA_FACTOR})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    card_path = args.model_dir / CARD_NAME
    try:
        model_id = load_model_card(args.model_dir).get("model_id")
    except ModelNotFoundError:
        print(f"itermask-qc-calibrate: {args.model_dir}: no {CARD_NAME} (expected a model folder)",
              file=sys.stderr)
        return EXIT_NO_INPUT
    except ModelCardError as exc:
        print(f"itermask-qc-calibrate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # the scans may have been screened before an earlier calibration of this folder
    screened_with = sorted({model_id, uncalibrated_id(model_id)}) if model_id else None
    try:
        ref = reference_from_outputs(args.output_dir, model_id=screened_with, suffix=args.suffix,
                                     labels=args.labels, min_scans=args.min_scans)
        write_card_reference(args.model_dir, ref)
        if args.gamma:
            g = gamma_from_outputs(args.output_dir, model_id=screened_with, suffix=args.suffix, labels=args.labels,
                                   factor=args.gamma_factor, min_scans=args.min_scans)
            write_card_gamma(args.model_dir, g)
            log.info("gamma of %s set to %.4g (median tau(50) %.4g over %d scans)", card_path, g["gamma"],
                     g["gamma_calibration"]["median_tau50"], g["gamma_calibration"]["n"])
    except CalibrationError as exc:  # no usable participant results (too few clean scans)
        print(f"itermask-qc-calibrate: {exc}", file=sys.stderr)
        return EXIT_NO_INPUT
    except OSError as exc:  # the card could not be written
        print(f"itermask-qc-calibrate: {exc}", file=sys.stderr)
        return EXIT_CANT_CREATE
    except ValueError as exc:
        print(f"itermask-qc-calibrate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    new_id = rename_calibrated(args.model_dir)
    log.info("QC-score reference of %s written from %d scans; model id %s", card_path, ref["n_scans"], new_id)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
