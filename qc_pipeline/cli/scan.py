"""``itermask-qc-scan``: screen NIfTI files outside any BIDS dataset.

For a scan that is not (yet) in a BIDS dataset: a file from the scanner console, a folder of
exported volumes. Each file goes through the participant level's own steps
(:func:`qc_pipeline.screening.screen`), so its record is the one the BIDS-App would write;
one line per file on standard output (tab-separated: file, status, QC score, its driver,
anomaly % of the brain, the error for a file that could not be screened), worst score first.
With ``-o OUT`` each file's derivatives (``_qc.json``, anomaly mask, error map) are written to
``OUT``, mirroring the folder given; a file that cannot be screened gets its error record
there. Flags need a site to compare against: screen a whole folder with the BIDS-App's
``group`` level for those.

Exit codes: 0 every file screened; 1 some could not be (one line each); 64 bad usage or no
usable model; 66 no NIfTI found; 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from .exits import EXIT_INTERRUPTED, EXIT_NO_INPUT, EXIT_OK, EXIT_SCANS_FAILED, EXIT_USAGE
from ..config import SCHEDULES, SKULL_STRIP, SUFFIXES

LOGGER = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(p: Path) -> bool:
    return p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")


def collect_files(paths) -> list[tuple[Path, Path]]:
    """``(file, output subfolder)`` for every NIfTI named or found (recursively, sorted) in a
    folder named; the subfolder mirrors the file's place under the folder given."""
    out: list[tuple[Path, Path]] = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if _is_nifti(p) and not p.is_dir())
            out += [(p, p.parent.relative_to(given)) for p in found]
        else:
            out.append((given, Path(".")))
    return out


def _record_line(name: str, rec: dict) -> list[str]:
    frac = rec.get("anomaly_fraction")
    score = rec.get("qc_score")
    return [name, rec.get("status", "error"), "n/a" if score is None else f"{score:.2f}",
            rec.get("qc_score_driver") or "", "n/a" if frac is None else f"{100 * frac:.2f}",
            rec.get("error") or ""]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itermask-qc-scan", description=__doc__.split("\n\n")[1],
                                epilog=__doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="NIfTI files and/or folders of them")
    p.add_argument("-o", "--output-dir", type=Path, default=None,
                   help="write each file's derivatives here (default: print only)")
    p.add_argument("--contrast", choices=SUFFIXES, default=None,
                   help="contrast of every file (default: the file name's BIDS suffix, else T1w)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="model folder (default: the packaged model of each file's contrast)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--schedule", choices=SCHEDULES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skull-strip", choices=SKULL_STRIP, default="auto",
                   help="as the participant level's option")
    p.add_argument("--json", type=Path, default=None, help="also write every record to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Optional[list] = None) -> int:
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..derivatives import one_line
    from ..engine import IterMask3D
    from ..engine.errors import EngineError
    from ..io import atomic_write_json
    from ..screening import scan_record_for

    files = collect_files(args.paths)
    if not files:
        print("itermask-qc-scan: no NIfTI file (.nii, .nii.gz) in " +
              ", ".join(map(str, args.paths)), file=sys.stderr)
        return EXIT_NO_INPUT
    if args.output_dir is not None:
        seen: dict[tuple, Path] = {}
        for f, sub in files:
            key = (sub, scan_record_for(f).bids_name)
            if key in seen:
                print(f"itermask-qc-scan: {f} and {seen[key]} would write the same outputs in "
                      f"{args.output_dir / sub}; screen them in separate calls", file=sys.stderr)
                return EXIT_USAGE
            seen[key] = f

    models: dict[str, IterMask3D] = {}
    contrast = args.contrast
    try:
        if args.model_dir is not None:  # one model for every file: its own contrast
            model = IterMask3D.from_folder(args.model_dir, device=args.device)
            contrast = contrast or model.card.get("contrast") or "T1w"
            models[contrast] = model
    except (EngineError, RuntimeError, ValueError) as exc:  # the model, not a file
        print(f"itermask-qc-scan: --model-dir {args.model_dir}: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    rows, records, failed = [], [], 0
    try:
        for f, sub in files:
            if _screen_one(f, sub, args, contrast, models, rows, records):
                failed += 1
    except KeyboardInterrupt:
        print(f"itermask-qc-scan: interrupted after {len(rows)} of {len(files)} file(s)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _ModelError as exc:
        print(f"itermask-qc-scan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    order = sorted(range(len(rows)), key=lambda i: (records[i].get("qc_score") is None,
                                                    -(records[i].get("qc_score") or 0.0)))
    print("\t".join(["file", "status", "qc_score", "driver", "anomaly_pct", "error"]))
    for i in order:
        print("\t".join(rows[i]))
    if args.json is not None:
        atomic_write_json([records[i] for i in order], args.json)
    if failed:
        print(f"itermask-qc-scan: {failed} of {len(files)} file(s) could not be screened",
              file=sys.stderr)
    return EXIT_SCANS_FAILED if failed else EXIT_OK


class _ModelError(RuntimeError):
    """The packaged model of a file's contrast cannot be loaded: nothing of it can be screened."""


def _screen_one(f: Path, sub: Path, args, contrast, models: dict, rows: list, records: list) -> bool:
    """Screen one file into ``rows`` / ``records`` (and ``-o``); True when it failed."""
    from ..derivatives import one_line, write_error_qc
    from ..engine import IterMask3D
    from ..engine.errors import EngineError
    from ..errors import InputError
    from ..screening import scan_record_for, screen

    scan = scan_record_for(f, contrast=contrast)
    out = None if args.output_dir is None else args.output_dir / sub
    if scan.suffix not in models:
        try:
            models[scan.suffix] = IterMask3D.from_folder(None, device=args.device, contrast=scan.suffix)
        except (EngineError, RuntimeError, ValueError) as exc:
            raise _ModelError(f"no usable {scan.suffix} model: {one_line(exc)}") from None
    model = models[scan.suffix]
    failed = False
    try:
        rec = screen(f, model=model, schedule=args.schedule, seed=args.seed,
                     skull_strip=args.skull_strip, output_dir=out)
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the others
        failed = True
        msg = str(exc) if isinstance(exc, InputError) else \
            f"{f.name}: unexpected error ({type(exc).__name__}: {one_line(exc)})"
        print(f"{f}: error: {msg}", file=sys.stderr)
        rec = {"status": "error", "error": msg, "bids_name": scan.bids_name}
        if out is not None:
            write_error_qc(out, scan, msg, model_id=model.model_id, model_key=model.model_key,
                           schedule=args.schedule, device=model.device.type)
    rows.append(_record_line(str(f), rec))
    records.append({"file": str(f), **rec})
    return failed


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
