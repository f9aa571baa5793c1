"""The argument parser of ``itermask-qc`` (participant, adapt and group levels)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .. import __version__
from ..config import DEVICES, SCHEDULES, SKULL_STRIP, SUFFIXES
from .exits import EXIT_USAGE

#: scans per IterMask3D node on a GPU (``--engine-batch``): measured on one H200 (shipped T1w
#: model, 64 scans), the engine's scans/s grew 4.9 -> 5.5 from batch 1 to 16 and 5.9 at 64;
#: 16 keeps a failed batch's rerun small
GPU_ENGINE_BATCH = 16

ANALYSIS_LEVELS = ("participant", "adapt", "group")


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 64 (EX_USAGE) for usage errors."""

    def error(self, message):  # noqa: D401
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` only where a default is meaningful."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and not isinstance(action.default, bool)
                and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _number(convert, ok, what: str):
    """An argparse type: ``convert(text)``, refused with "expected <what>" unless ``ok``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _zero_is_none(what: str):
    """An argparse type for a number >= 0 where 0 means "off" (None)."""
    parse = _number(float, lambda v: math.isfinite(v) and v >= 0, what)

    def zero_is_none(text: str):
        return parse(text) or None

    zero_is_none.__name__ = what
    return zero_is_none


_site_norm_spread = _zero_is_none("a number >= 0 (0: the factor alone)")
_site_norm_factor = _zero_is_none("a factor >= 0 (0 skips the site reference)")
_site_norm_neighbours = _number(int, lambda v: v >= 0, "a whole number >= 0 (0: the whole site)")


def _path(text: str) -> Path:
    return Path(text).expanduser()


def get_parser() -> argparse.ArgumentParser:
    """The ``itermask-qc`` argument parser (grouped like MRIQC's)."""
    parser = _Parser(
        prog="itermask-qc",
        description=(
            "itermask-qc: MRI quality control with IterMask3D.\n\n"
            "Screens the anatomical scans (T1w, T2w, FLAIR) of a BIDS dataset for acquisition\n"
            "artifacts with an unsupervised IterMask3D model, writes BIDS-Derivatives (anomaly\n"
            "mask, error map, a _qc.json per scan, a report per subject) and, at the group\n"
            "level, ranks the scans per site (group_<suffix>.csv/.html)."
        ),
        epilog=(
            "Exit codes: 0 ok; 1 some scans failed (named in the last line); 16 invalid BIDS\n"
            "dataset; 17 unknown analysis level; 18 filters matched no scans; 64 usage error;\n"
            "66 BIDS_DIR (or, for 'group', participant-level results) not found; 73 OUTPUT_DIR\n"
            "or -w cannot be written; 74 file-system failure during the run; 75 -w in use by\n"
            "another run; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).\n"
            "Documentation: docs/usage.md and docs/outputs.md."
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("bids_dir", type=_path, metavar="BIDS_DIR",
                        help="the root folder of a BIDS dataset (sub-XXXXX folders at the top)")
    parser.add_argument("output_dir", type=_path, metavar="OUTPUT_DIR",
                        help="the derivatives folder; must not be BIDS_DIR or inside it")
    parser.add_argument("analysis_level", metavar="{participant,adapt,group}",
                        help="'participant' screens scans; 'adapt' screens them, fine-tunes the "
                             "model of each suffix on the scans it judged clean and screens "
                             "again with it (OUTPUT_DIR/models/<suffix>); 'group' ranks them "
                             "and writes the group tables and reports from OUTPUT_DIR alone")
    parser.add_argument("--version", action="version", version=f"itermask-qc v{__version__}")

    g_bids = parser.add_argument_group("Options for filtering BIDS queries")
    g_bids.add_argument("--participant-label", "--participant_label", dest="participant_label",
                        nargs="+", metavar="LABEL",
                        help="one or more participant labels, with or without 'sub-' "
                             "(default: all participants)")
    g_bids.add_argument("--session-label", "--session-id", dest="session_label", nargs="+",
                        metavar="LABEL",
                        help="one or more session labels, with or without 'ses-' "
                             "(default: all sessions)")
    g_bids.add_argument("--suffix", nargs="+", choices=SUFFIXES, metavar="{T1w,T2w,FLAIR}",
                        help="contrasts to screen (default: every suffix that has a model; "
                             "with --model-dir, the model card's contrast)")
    g_bids.add_argument("--bids-filter-file", type=_path, metavar="FILE.json",
                        help='JSON of pybids filters per suffix, e.g. '
                             '{"t1w": {"acquisition": "mprage", "run": 1}}; null = entity '
                             'absent, "*" = entity present')

    g_perf = parser.add_argument_group("Options to handle performance")
    g_perf.add_argument("--nprocs", "--n_procs", "--n-procs", dest="nprocs", type=_positive_int,
                        default=1, help="scans processed in parallel (Nipype MultiProc; "
                                        "1 = Linear plugin, in this process)")
    g_perf.add_argument("--omp-nthreads", type=_positive_int, default=1,
                        help="torch threads per scan (preprocessing and IterMask3D)")
    g_perf.add_argument("--use-plugin", type=_path, metavar="FILE.yml",
                        help="Nipype plugin configuration (YAML with 'plugin' and "
                             "'plugin_args', e.g. workflows/slurm.yml); overrides --nprocs")
    g_perf.add_argument("--device", choices=DEVICES, default="auto",
                        help="torch device for IterMask3D: auto = CUDA when available")
    g_perf.add_argument("--engine-batch", type=_positive_int, default=None, metavar="N",
                        help="scans of one contrast that share one IterMask3D node, their forward "
                             f"passes stacked (a scan's result does not change); default "
                             f"{GPU_ENGINE_BATCH} on a GPU, 1 (a node per scan) on the CPU")
    g_perf.add_argument("--max-image-gb", type=_positive_float, default=2.0, metavar="GB",
                        help="memory budget of one scan's voxels (declared voxels x bytes per "
                             "voxel, at least 4), checked from the header before any voxel is "
                             "read: a larger scan is an error row; loading a scan takes about "
                             "2.5 times its size")

    g_wf = parser.add_argument_group("Workflow configuration")
    g_wf.add_argument("--model-dir", type=_path, metavar="DIR",
                      help="an IterMask3D model folder (weights.pt + model_card.json), e.g. a "
                           "site-trained model (default: the packaged model of each suffix)")
    g_wf.add_argument("--schedule", choices=SCHEDULES, default="auto",
                      help="test-time schedule: 'auto' = the model card's; 'normative' (half a "
                           "sweep, the model's normal error level as threshold), 'fast' (coarse "
                           "sweep, tan fit, early stop) or 'reference' (the paper's 1%% steps)")
    g_wf.add_argument("--skull-strip", choices=SKULL_STRIP, default="auto",
                      help="brain extraction: auto = the measured default per contrast; "
                           "'none' for already skull-stripped data")
    g_wf.add_argument("--seed", type=int, default=0,
                      help="seed of the test-time noise fill (same data + seed = same scores)")
    g_wf.add_argument("--reports-only", action="store_true",
                      help="only (re)write the HTML reports from OUTPUT_DIR")

    g_ad = parser.add_argument_group("Adapt level (learning from the dataset's own scans)")
    g_ad.add_argument("--adapt-minutes", type=_positive_float, default=20.0, metavar="MIN",
                      help="wall-clock budget of the fine-tuning of each suffix (2 CPU cores: "
                           "~6 s per step of the packaged T1w model)")
    g_ad.add_argument("--adapt-steps", type=_positive_int, default=400, metavar="N",
                      help="at most this many optimiser steps (batches of 2 scans)")
    g_ad.add_argument("--adapt-exclude", type=_fraction, default=0.2, metavar="FRACTION",
                      help="share of the dataset, worst first by its own QC score, never "
                           "trained on (set it at least to the expected share of bad scans)")
    g_ad.add_argument("--adapt-base-normal-error", action="store_true",
                      help="keep the base model's normal-error map (default: the adapted model "
                           "gets the site's own, from its error over the training scans)")

    g_grp = parser.add_argument_group("Group level")
    g_grp.add_argument("--labels", type=_path, metavar="FILE.tsv",
                       help="ratings TSV (bids_name + a good/bad or 0/1 column), or a folder "
                            "of them (one per rater, merged), to compute "
                            "AUROC, FPR80/90, FNR80/90 per site; at the adapt level, scans "
                            "rated bad are never trained on")
    g_grp.add_argument("--site-column", default="site", metavar="COLUMN",
                       help="column of participants.tsv / sessions.tsv / scans.tsv naming the site")
    g_grp.add_argument("--flag-at-fnr", type=_fraction, metavar="FNR",
                       help="calibrate the flag threshold on the labelled scans at this "
                            "false-negative rate (needs --labels); default: robust per-site rule")
    g_grp.add_argument("--site-norm-factor", type=_site_norm_factor, default=3.0, metavar="F",
                       help="keep an anomaly-mask voxel where its error exceeds F x the median "
                            "error of the site's scans there (desc-siteanomaly_mask, "
                            "site_anomaly_* and engine_flagged columns); 0 skips it (default: 3)")
    g_grp.add_argument("--site-norm-spread", type=_site_norm_spread, default=5.0, metavar="K",
                       help="... and exceeds that median by K x the site's voxel-wise robust SD "
                            "there (where the site's people differ most); 0: the factor alone "
                            "(default: 5)")
    g_grp.add_argument("--site-norm-neighbours", type=_site_norm_neighbours, default=16, metavar="N",
                       help="compare each scan (its engine mask, site score and background) with the N "
                            "scans of its site whose error maps are most like its own (a site of "
                            "several scanners or of a few people scanned many times is not one "
                            "population; fewer than 8 counts as 8); 0: with the whole site "
                            "(default: 16)")

    g_other = parser.add_argument_group("Other options")
    g_other.add_argument("-w", "--work-dir", type=_path, metavar="DIR",
                         help="Nipype work folder and BIDS index (default: ./work in the "
                              "current directory); reuse it to resume a run")
    g_other.add_argument("-v", "--verbose", action="count", default=0,
                         help="more log output (-v: debug for itermask-qc, -vv: also Nipype)")
    return parser
