"""Ratings and labels: the one reader of the rating files (group level, calibration, adapt).

``labels`` is a TSV (or CSV) with a ``bids_name`` column (file names, paths and
extensions are tolerated) and one rating column, the first found of ``label, rating, qc,
artifact, bad, quality, exclude, manual_qc``. Values: ``1/0``, ``true/false``,
``bad/good``, ``fail/pass``, ``exclude/include``, ``artifact/clean``,
``reject/accept``; ``questionable`` (also ``doubtful``, ``maybe``, ``?``) is *excluded*
from the metrics by default (``questionable="exclude"``; ``"bad"`` or ``"good"`` map it to
a class). Empty values are unlabelled. ``labels`` may also be a folder of such files or a
list of them (one per rater; :func:`load_ratings`): per scan and rater the row with the
latest ``timestamp`` (or the last row) wins, across raters the majority of the good/bad
votes (a tie leaves the scan unlabelled), and the raters' artifact tags are kept
(``rated_artifacts``). The ratings TSV exported from the pages (``bids_name, rating,
artifacts, comment, rater, timestamp``) is accepted as is.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from .derivatives import normalise_bids_name
from .errors import QCPipelineError

LOGGER = logging.getLogger(__name__)

__all__ = ["LabelsError", "Ratings", "load_labels", "load_ratings"]


class LabelsError(QCPipelineError, ValueError):
    """A labels file that cannot be used; the message names the file and the problem."""


_LABEL_COLUMNS = ("label", "rating", "qc", "artifact", "bad", "quality", "exclude", "manual_qc")
_BAD = {"1", "1.0", "true", "bad", "fail", "failed", "exclude", "excluded", "artifact",
        "artefact", "reject", "rejected", "poor", "yes"}
_GOOD = {"0", "0.0", "false", "good", "pass", "passed", "include", "included", "clean",
         "accept", "accepted", "ok", "excellent", "acceptable", "no"}
_QUESTIONABLE = {"questionable", "doubtful", "maybe", "?", "unsure", "borderline"}


@dataclass
class Ratings:
    """Ratings read from one or more files (one per rater), merged per scan.

    ``labels``: ``{bids_name: 1 (artifact) | 0 (clean)}`` (unrated, excluded-questionable
    and tied scans left out); ``artifacts``: the artifact tags the raters gave each scan
    (their union); ``raters``: who rated each scan; ``sources``: the files read.
    """

    labels: dict
    artifacts: dict
    raters: dict
    sources: list


def _label_files(paths) -> list[Path]:
    """The files behind ``paths``: a file, a folder (its ``*.tsv`` and ``*.csv`` files: one
    per rater), or a list of either."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise LabelsError("no labels file given")
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in (".tsv", ".csv") and q.is_file())
            if not found:
                raise LabelsError(f"labels folder {p} holds no .tsv or .csv file")
            out += found
        else:
            out.append(p)
    return out


def _read_label_rows(path: Path) -> tuple[list[dict], str, str | None]:
    """Rows of one labels file with its rating column and timestamp column (None if absent)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise LabelsError(f"labels file {path} is not UTF-8 text (byte {exc.start}); expected a "
                          f"TSV or CSV with bids_name and a rating column") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise LabelsError(f"labels file {path} is empty")
    delim = "\t" if "\t" in lines[0] else ","
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=delim)
    cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
    if "bids_name" not in cols:
        raise LabelsError(f"labels file {path} has no 'bids_name' column "
                          f"(columns: {', '.join(reader.fieldnames or [])})")
    label_col = next((cols[c] for c in _LABEL_COLUMNS if c in cols), None)
    if label_col is None:
        raise LabelsError(f"labels file {path} has no rating column; expected one of "
                          f"{', '.join(_LABEL_COLUMNS)} (columns: {', '.join(reader.fieldnames or [])})")
    rows = [{"bids_name": row.get(cols["bids_name"]) or "", "value": row.get(label_col),
             "timestamp": row.get(cols["timestamp"]) if "timestamp" in cols else None,
             "rater": row.get(cols["rater"]) if "rater" in cols else None,
             "artifacts": row.get(cols["artifacts"]) if "artifacts" in cols else None}
            for row in reader]
    return rows, label_col, cols.get("timestamp")


def load_ratings(paths, *, questionable: str = "exclude") -> Ratings:
    """Read ratings from one file, a folder of files or a list of files and merge them.

    Each file is a TSV/CSV as described in the module docstring. A rater is the file's
    ``rater`` column, else the file's name. Per scan and rater, the row with the latest
    ``timestamp`` (else the last row) counts; across raters, the majority of their
    good/bad votes decides, and a tie leaves the scan out of the metrics (logged), as a
    questionable rating does by default. Artifact tags (``artifacts``, ``;``-separated)
    are kept per scan as the union over its raters.

    Raises
    ------
    LabelsError
        A file or folder that cannot be used, or a value that is not a rating; the
        message names the file, row and value.
    """
    if questionable not in ("exclude", "bad", "good"):
        raise LabelsError(f"questionable must be 'exclude', 'bad' or 'good', got {questionable!r}")
    files = _label_files(paths)
    latest: dict[tuple[str, str], tuple[tuple, int | None, list[str]]] = {}
    conflicts: set[str] = set()
    any_ts = False
    for f_idx, path in enumerate(files):
        rows, label_col, ts_col = _read_label_rows(path)
        any_ts = any_ts or ts_col is not None
        for i, row in enumerate(rows):
            name = normalise_bids_name(row["bids_name"])
            raw = str(row["value"] or "").strip().lower()
            if not name or raw in ("", "n/a", "na", "nan", "none"):
                continue
            if raw in _BAD:
                value: int | None = 1
            elif raw in _GOOD:
                value = 0
            elif raw in _QUESTIONABLE:
                value = {"exclude": None, "bad": 1, "good": 0}[questionable]
            else:
                raise LabelsError(f"labels file {path}, row {i + 2}: value {raw!r} in column "
                                  f"{label_col!r} is not a rating (use 0/1, good/bad, questionable)")
            rater = str(row["rater"] or "").strip() or path.stem
            tags = [t.strip() for t in str(row["artifacts"] or "").split(";") if t.strip()]
            key = (str(row["timestamp"] or "") if ts_col else "", f_idx, i)
            old = latest.get((name, rater))
            if old is not None and old[1] != value:
                conflicts.add(name)
            if old is None or key >= old[0]:
                latest[(name, rater)] = (key, value, tags)
    if conflicts:
        LOGGER.warning("labels file %s rates %d scans more than once with different ratings (e.g. %s); "
                       "the %s rating of each rater is used", ", ".join(map(str, files)), len(conflicts),
                       sorted(conflicts)[0], "latest (timestamp)" if any_ts else "last")
    votes: dict[str, list[int]] = {}
    artifacts: dict[str, set] = {}
    raters: dict[str, list[str]] = {}
    for (name, rater), (_, value, tags) in sorted(latest.items()):
        raters.setdefault(name, []).append(rater)
        artifacts.setdefault(name, set()).update(tags)
        if value is not None:
            votes.setdefault(name, []).append(value)
    labels: dict[str, int] = {}
    ties = []
    for name, v in votes.items():
        mean = sum(v) / len(v)
        if mean == 0.5:
            ties.append(name)
        else:
            labels[name] = int(mean > 0.5)
    if ties:
        LOGGER.warning("raters disagree evenly on %d scans (e.g. %s): left out of the metrics",
                       len(ties), sorted(ties)[0])
    return Ratings(labels=labels, artifacts={k: sorted(v) for k, v in artifacts.items() if v},
                   raters=raters, sources=files)


def load_labels(path, *, questionable: str = "exclude") -> dict[str, int]:
    """Read a labels/ratings TSV (or a folder or list of them) -> ``{bids_name: 1 (artifact)
    | 0 (clean)}``; see :func:`load_ratings` for the merging and the module docstring for
    the accepted columns and values. Raises :class:`LabelsError` naming the file and the
    problem.
    """
    return load_ratings(path, questionable=questionable).labels
