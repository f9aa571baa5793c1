"""BIDS walk: which anatomical scans to screen, their entities and their site.

The index is built with pybids (``validate=False``, no metadata indexing) and restricted to
``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]`` by regular-expression ignores, so that large
studies with functional, diffusion, derivative or source data beside ``anat/`` index in
seconds (see ``benchmarks/bids_index.py``). The SQLite database lives in the work
directory and is reused while the anatomical folders are unchanged.

Site and other per-scan metadata come from ``participants.tsv``, ``sub-*_sessions.tsv``
and ``*_scans.tsv`` (the most specific table wins) and travel with the scan into its
``_qc.json``, so the group level never needs the raw tree.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .errors import QCPipelineError
from .io import atomic_write_json, to_jsonable

LOGGER = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".nii.gz", ".nii")

# pybids entity name -> BIDS key, in the order the BIDS specification lists them
ENTITY_KEYS = {
    "subject": "sub",
    "session": "ses",
    "task": "task",
    "acquisition": "acq",
    "ceagent": "ce",
    "tracer": "trc",
    "staining": "stain",
    "reconstruction": "rec",
    "direction": "dir",
    "run": "run",
    "modality": "mod",
    "echo": "echo",
    "flip": "flip",
    "inv": "inv",
    "mt": "mt",
    "part": "part",
    "chunk": "chunk",
}


# --------------------------------------------------------------------------- errors
class BIDSInputError(QCPipelineError):
    """A problem with the input dataset or the filters; the exit code each kind ends the command
    with is :func:`qc_pipeline.cli.exits.exit_code_for`'s."""


class DatasetNotFound(BIDSInputError):
    """The BIDS directory does not exist (EX_NOINPUT)."""


class InvalidDataset(BIDSInputError):
    """Not a BIDS dataset: no dataset_description.json or no ``sub-*`` folders."""


class UnknownLabel(BIDSInputError):
    """A participant or session label that the dataset does not have (usage error)."""


class InvalidFilter(BIDSInputError):
    """A malformed ``--bids-filter-file`` (usage error)."""


class NoScansFound(BIDSInputError):
    """The filters matched no scan."""


# --------------------------------------------------------------------------- records
@dataclass
class ScanRecord:
    """One anatomical scan to screen.

    Attributes
    ----------
    path : str
        Absolute path of the image.
    relpath : str
        Path relative to the BIDS root (``sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz``).
    bids_name : str
        File name without extension (``sub-01_ses-a_T1w``): the ``<source>`` of outputs.
    entities : dict
        Every BIDS entity of the file name (pybids names, values as written), plus
        ``suffix``, ``datatype`` and ``extension``.
    site : str or None
        Value of the site column for this scan, ``None`` when the dataset has none.
    metadata : dict
        Merged row of participants.tsv / sessions.tsv / scans.tsv for this scan.
    """

    path: str
    relpath: str
    bids_name: str
    entities: dict
    site: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def suffix(self) -> str:
        return self.entities["suffix"]

    @property
    def acquisition_notes(self) -> list[str]:
        """What the file name says about the acquisition that bears on the engine's mask
        (written among the scan's warnings)."""
        agent = self.entities.get("ceagent")
        if not agent:
            return []
        return [f"contrast-enhanced scan (ce-{agent}): the model learned normal brains from scans "
                f"without contrast agent, so enhancing vessels, dura and marrow at the brain's "
                f"surface can enter the engine's mask (docs/benchmarks.md, real lesions)"]

    @property
    def out_reldir(self) -> str:
        """Folder of the derivatives, relative to OUTPUT_DIR (mirrors the source)."""
        return str(Path(self.relpath).parent)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScanRecord":
        return cls(**data)


# --------------------------------------------------------------------------- helpers
def strip_prefix(label: str, prefix: str) -> str:
    label = str(label).strip()
    return label[len(prefix):] if label.startswith(prefix) else label


def bids_name_of(path: str | os.PathLike) -> str:
    name = Path(path).name
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def anat_ignore_patterns(
    suffixes: Sequence[str], subjects: Optional[Sequence[str]] = None
) -> list[re.Pattern]:
    """Regular expressions that keep only ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]``.

    pybids matches them against ``/``-prefixed paths relative to the root, for both
    directories (an ignored directory is not walked) and files. With ``subjects`` (labels
    without ``sub-``), the folders of all other subjects are not walked either, so a job
    array task screening one subject does not index the whole study.
    """
    suff = "|".join(re.escape(s) for s in suffixes)
    sub = ("(?:%s)" % "|".join(re.escape(s) for s in subjects)) if subjects else "[^/]+"
    return [
        # top level: anything that is not a (selected) sub-* folder (code/, derivatives/ ...)
        re.compile(r"^/(?!sub-%s$)[^/]+$" % sub),
        # subject level: keep anat/ and ses-*/ only
        re.compile(r"^/sub-[^/]+/(?!anat$|ses-[^/]+$)[^/]+$"),
        # session level: keep anat/ only
        re.compile(r"^/sub-[^/]+/ses-[^/]+/(?!anat$)[^/]+$"),
        # inside anat/: keep images of the requested suffixes only
        re.compile(
            r"^/sub-[^/]+/(?:ses-[^/]+/)?anat/(?![^/]*_(?:%s)\.nii(?:\.gz)?$)[^/]+$" % suff
        ),
    ]


def _subject_dirs(root: Path) -> list[str]:
    return sorted(
        p.name[4:] for p in root.iterdir() if p.name.startswith("sub-") and p.is_dir()
    )


def check_dataset(bids_dir: str | os.PathLike) -> Path:
    """Raise :class:`DatasetNotFound` / :class:`InvalidDataset`; return the resolved root."""
    root = Path(bids_dir).expanduser()
    if not root.exists():
        raise DatasetNotFound(f"BIDS directory {root} does not exist")
    if not root.is_dir():
        raise DatasetNotFound(f"BIDS directory {root} is not a directory")
    root = root.resolve()
    if not (root / "dataset_description.json").is_file():
        raise InvalidDataset(
            f"{root} is not a BIDS dataset: dataset_description.json is missing"
        )
    if not _subject_dirs(root):
        raise InvalidDataset(f"{root} is not a BIDS dataset: no sub-* folders")
    return root


def _anat_fingerprint(
    root: Path, suffixes: Sequence[str], subjects: Optional[Sequence[str]] = None
) -> str:
    """Cheap fingerprint of the anat folders (paths + mtimes) to decide DB reuse."""
    h = hashlib.sha256()
    h.update(("|".join(sorted(suffixes)) + "|v1").encode())
    h.update(("subjects=" + ",".join(sorted(subjects)) if subjects else "all").encode())
    with os.scandir(root) as it:
        subs = sorted(e.path for e in it if e.name.startswith("sub-") and e.is_dir())
    for sub in subs:
        h.update(sub.encode())
        h.update(str(os.stat(sub).st_mtime_ns).encode())
        cands = [os.path.join(sub, "anat")]
        with os.scandir(sub) as it:
            cands += [
                os.path.join(e.path, "anat")
                for e in sorted(it, key=lambda e: e.name)
                if e.name.startswith("ses-") and e.is_dir()
            ]
        for anat in cands:
            try:
                st = os.stat(anat)
            except FileNotFoundError:
                continue
            h.update(anat.encode())
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


def build_layout(
    bids_dir: str | os.PathLike,
    suffixes: Sequence[str],
    database_path: Optional[str | os.PathLike] = None,
    subjects: Optional[Sequence[str]] = None,
):
    """Index ``bids_dir`` with pybids, restricted to anatomical images of ``suffixes``
    (and to the folders of ``subjects``, labels without ``sub-``, when given).

    The database is stored in ``database_path`` and reused while the fingerprint of the
    anatomical folders (paths and modification times) and the subject selection are
    unchanged.
    """
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    root = Path(bids_dir)
    indexer = BIDSLayoutIndexer(
        validate=False, index_metadata=False,
        ignore=anat_ignore_patterns(suffixes, subjects)
    )
    reset = True
    if database_path is not None:
        database_path = Path(database_path)
        database_path.mkdir(parents=True, exist_ok=True)
        fp_file = database_path / "itermask_fingerprint.json"
        fingerprint = _anat_fingerprint(root, suffixes, subjects)
        try:
            old = json.loads(fp_file.read_text())
        except (OSError, ValueError):
            old = {}
        reset = old.get("fingerprint") != fingerprint or old.get("root") != str(root)
    layout = BIDSLayout(
        str(root),
        validate=False,
        indexer=indexer,
        database_path=str(database_path) if database_path is not None else None,
        reset_database=reset,
    )
    if database_path is not None and reset:
        atomic_write_json({"root": str(root), "fingerprint": fingerprint}, fp_file)
    return layout


# --------------------------------------------------------------------------- metadata
def _read_tsv(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a", "N/A", ""],
                         keep_default_na=False)
    except Exception as exc:  # a malformed table must not stop the run
        LOGGER.warning("could not read %s: %s", path, exc)
        return []
    rows = []
    for rec in df.to_dict(orient="records"):
        rows.append({str(k): (None if (isinstance(v, float) and math.isnan(v)) else v)
                     for k, v in rec.items()})
    return rows


class _MetadataTables:
    """Lazily read participants/sessions/scans tables, each file once."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[Path, dict[str, dict]] = {}

    def _table(self, path: Path, key: str, normalise=lambda v: v) -> dict[str, dict]:
        if path not in self._cache:
            table = {}
            if path.is_file():
                for row in _read_tsv(path):
                    if row.get(key) is not None:
                        table[normalise(str(row[key]))] = row
            self._cache[path] = table
        return self._cache[path]

    def lookup(self, relpath: str, entities: dict) -> dict[str, Any]:
        sub = entities["subject"]
        ses = entities.get("session")
        meta: dict[str, Any] = {}
        part = self._table(self.root / "participants.tsv", "participant_id",
                           lambda v: strip_prefix(v, "sub-"))
        meta.update(part.get(sub, {}))
        if ses is not None:
            sess = self._table(self.root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv",
                               "session_id", lambda v: strip_prefix(v, "ses-"))
            meta.update(sess.get(ses, {}))
            scans_path = self.root / f"sub-{sub}" / f"ses-{ses}" / f"sub-{sub}_ses-{ses}_scans.tsv"
            base = self.root / f"sub-{sub}" / f"ses-{ses}"
        else:
            scans_path = self.root / f"sub-{sub}" / f"sub-{sub}_scans.tsv"
            base = self.root / f"sub-{sub}"
        scans = self._table(scans_path, "filename", lambda v: v.strip().lstrip("./"))
        rel_to_base = str(Path(self.root / relpath).relative_to(base))
        meta.update(scans.get(rel_to_base, {}))
        return meta


# --------------------------------------------------------------------------- filters
def load_filter_file(path: str | os.PathLike) -> dict[str, dict]:
    """Read a ``--bids-filter-file``: ``{"t1w": {"acquisition": "mprage"}, ...}``.

    Keys are suffixes (case-insensitive: ``t1w``, ``T2w``, ``flair``); values are pybids
    entity filters. ``null`` means "entity absent" and ``"*"`` "entity present".
    """
    from .config import SUFFIXES

    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InvalidFilter(f"--bids-filter-file {p}: no such file") from None
    except ValueError as exc:  # includes UnicodeDecodeError
        raise InvalidFilter(f"--bids-filter-file {p}: not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidFilter(f"--bids-filter-file {p}: nested too deeply; expected "
                            f"{{\"t1w\": {{\"entity\": value, ...}}, ...}}") from None
    except OSError as exc:
        raise InvalidFilter(f"--bids-filter-file {p}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise InvalidFilter(f"--bids-filter-file {p}: expected a JSON object keyed by suffix")
    lookup = {s.lower(): s for s in SUFFIXES}
    out = {}
    for key, value in data.items():
        if key.lower() not in lookup:
            raise InvalidFilter(
                f"--bids-filter-file {p}: unknown key {key!r}; expected one of "
                + ", ".join(s.lower() for s in SUFFIXES)
            )
        if not isinstance(value, dict):
            raise InvalidFilter(f"--bids-filter-file {p}: {key!r} must map to an object")
        bad = [k for k in value if k in ("suffix", "datatype", "extension")]
        if bad:
            raise InvalidFilter(f"--bids-filter-file {p}: {key!r} may not set {bad[0]!r}")
        out[lookup[key.lower()]] = value
    return out


def _to_query(value):
    from bids.layout import Query

    if value is None:
        return Query.NONE
    if value == "*":
        return Query.ANY
    if isinstance(value, list):
        return [_to_query(v) for v in value]
    return value


# --------------------------------------------------------------------------- collect
def collect_scans(
    bids_dir: str | os.PathLike,
    *,
    suffixes: Sequence[str],
    participant_label: Optional[Iterable[str]] = None,
    session_label: Optional[Iterable[str]] = None,
    bids_filters: Optional[dict] = None,
    database_path: Optional[str | os.PathLike] = None,
    site_column: str = "site",
    layout=None,
) -> list[ScanRecord]:
    """Find the anatomical scans to screen.

    Raises
    ------
    DatasetNotFound, InvalidDataset
        Bad ``bids_dir``.
    UnknownLabel
        A ``participant_label`` / ``session_label`` the dataset does not have; the message
        names the labels that exist.
    InvalidFilter
        A filter names an entity pybids does not know.
    NoScansFound
        Nothing matched.
    """
    root = check_dataset(bids_dir)
    subjects = None
    if participant_label:
        subjects = sorted({strip_prefix(s, "sub-") for s in participant_label})
        existing = _subject_dirs(root)
        missing = [s for s in subjects if s not in existing]
        if missing:
            raise UnknownLabel(
                f"--participant-label {' '.join(missing)}: no such subject in {root}; "
                f"found {', '.join(existing)}"
            )
    sessions = None
    if session_label:
        sessions = sorted({strip_prefix(s, "ses-") for s in session_label})
        existing_ses = sorted({p.name[4:] for p in root.glob("sub-*/ses-*") if p.is_dir()})
        missing = [s for s in sessions if s not in existing_ses]
        if missing:
            raise UnknownLabel(
                f"--session-label {' '.join(missing)}: no such session in {root}; "
                f"found {', '.join(existing_ses) if existing_ses else 'no sessions'}"
            )

    if layout is None:
        layout = build_layout(root, suffixes, database_path, subjects)
    bids_filters = bids_filters or {}
    tables = _MetadataTables(root)
    scans: list[ScanRecord] = []
    for suffix in suffixes:
        query: dict[str, Any] = {
            "datatype": "anat",
            "suffix": suffix,
            "extension": [".nii", ".nii.gz"],
            "return_type": "filename",
        }
        if subjects:
            query["subject"] = subjects
        if sessions:
            query["session"] = sessions
        for key, value in bids_filters.get(suffix, {}).items():
            query[key] = _to_query(value)
        try:
            files = layout.get(invalid_filters="error", **query)
        except ValueError as exc:
            raise InvalidFilter(f"--bids-filter-file: {exc}") from None
        entities = _entities_bulk(layout, files)
        scans.extend(_record(root, f, entities[f], tables, site_column) for f in files)
        # pybids indexes files only: a folder named like a scan becomes a record too, so that
        # it ends as an error row ("is a directory") instead of being skipped without a word
        for path in _unindexed_entries(root, suffix, set(files), subjects, sessions):
            ents = _name_entities(path, root, suffix)
            if _matches(ents, bids_filters.get(suffix, {})):
                scans.append(_record(root, str(path), ents, tables, site_column))
    scans = _drop_same_stem(scans)
    scans.sort(key=lambda s: s.relpath)
    if not scans:
        what = [f"suffix {'/'.join(suffixes)}"]
        if subjects:
            what.append("participant " + ",".join(subjects))
        if sessions:
            what.append("session " + ",".join(sessions))
        if bids_filters:
            what.append("the --bids-filter-file filters")
        raise NoScansFound(f"no anatomical scans in {root} match " + " and ".join(what))
    return scans


def _unindexed_entries(root: Path, suffix: str, indexed: set, subjects, sessions) -> list[Path]:
    """``anat/`` entries named like a scan of ``suffix`` that pybids did not index (folders,
    and whatever else it leaves out), within the selected subjects and sessions."""
    out = []
    for pattern in ("sub-*/anat/*", "sub-*/ses-*/anat/*"):
        for p in root.glob(pattern):
            if not any(p.name.endswith(f"_{suffix}{ext}") for ext in IMAGE_EXTENSIONS):
                continue
            if str(p) in indexed:
                continue
            parts = p.relative_to(root).parts
            if subjects and parts[0][4:] not in subjects:
                continue
            if len(parts) == 4 and sessions and parts[1][4:] not in sessions:
                continue
            if len(parts) == 3 and sessions:
                continue
            out.append(p)
    return sorted(out)


def _name_entities(path: Path, root: Path, suffix: str) -> dict[str, str]:
    """Entities of a path read from its name and folders (for entries pybids did not index)."""
    names = {key: name for name, key in ENTITY_KEYS.items()}
    ents: dict[str, str] = {}
    for tok in bids_name_of(path).split("_")[:-1]:
        if "-" in tok:
            key, value = tok.split("-", 1)
            ents[names.get(key, key)] = value
    ext = next((e for e in IMAGE_EXTENSIONS if path.name.endswith(e)), "")
    ents.update(suffix=suffix, datatype="anat", extension=ext)
    return ents


def _matches(ents: dict, filters: dict) -> bool:
    """Whether entities pass ``--bids-filter-file`` filters (``null`` absent, ``"*"`` present)."""
    def same(have, want):
        if isinstance(want, list):
            return any(same(have, w) for w in want)
        if isinstance(want, bool) or not isinstance(want, int):
            return have == str(want)
        return have is not None and have.isdigit() and int(have) == want

    for key, want in filters.items():
        have = ents.get(key)
        if want is None:
            if have is not None:
                return False
        elif want == "*":
            if have is None:
                return False
        elif not same(have, want):
            return False
    return True


def _drop_same_stem(scans: list[ScanRecord]) -> list[ScanRecord]:
    """One scan per output name: ``x_T1w.nii`` beside ``x_T1w.nii.gz`` would share every
    output file, so the ``.nii.gz`` is screened and the other named in a warning."""
    by_out: dict[tuple, ScanRecord] = {}
    for scan in scans:
        key = (scan.out_reldir, scan.bids_name)
        other = by_out.get(key)
        if other is None:
            by_out[key] = scan
            continue
        keep, drop = (scan, other) if scan.relpath.endswith(".nii.gz") else (other, scan)
        LOGGER.warning("%s: not screened; %s has the same name and is screened (their outputs "
                       "would share one file)", drop.relpath, keep.relpath)
        by_out[key] = keep
    return list(by_out.values())


def _entities_bulk(layout, files: Sequence[str]) -> dict[str, dict[str, str]]:
    """Entities of many files in one query of the pybids database.

    Values are taken as written in the file name (``run-01`` stays ``"01"``).
    """
    from bids.layout.models import Tag

    out: dict[str, dict[str, str]] = {f: {} for f in files}
    session = layout.connection_manager.session
    chunk = 500  # stay below SQLite's host-parameter limit
    for i in range(0, len(files), chunk):
        part = list(files[i:i + chunk])
        rows = (
            session.query(Tag.file_path, Tag.entity_name, Tag._value)
            .filter(Tag.file_path.in_(part))
            .all()
        )
        for path, name, value in rows:
            out[path][name] = str(value)
    for f, ents in out.items():
        raw = dict(
            tok.split("-", 1) for tok in bids_name_of(f).split("_")[:-1] if "-" in tok
        )
        for name, key in ENTITY_KEYS.items():
            if name in ents and key in raw:
                ents[name] = raw[key]
    return out


def _record(root: Path, filename: str, ents: dict, tables: _MetadataTables,
            site_column: str) -> ScanRecord:
    path = Path(filename)
    relpath = str(path.relative_to(root))
    # Subject and session are those of the folders, as written: pybids drops a label with
    # characters beyond BIDS's (sub-ü, sub-#1) and cuts sub-01_x to 01, which would lose
    # the scan or file its metadata and outputs under another subject.
    parts = Path(relpath).parts
    ents = dict(ents)
    ents["subject"] = parts[0][len("sub-"):]
    if len(parts) > 3 and parts[1].startswith("ses-"):
        ents["session"] = parts[1][len("ses-"):]
    if not re.fullmatch(r"[A-Za-z0-9]+", ents["subject"]):
        LOGGER.warning("%s: subject label %r is not a BIDS label (letters and digits only); "
                       "screened under it as written", relpath, ents["subject"])
    try:
        meta = {k: to_jsonable(v) for k, v in tables.lookup(relpath, ents).items()}
    except (ValueError, OSError) as exc:  # a table the scan's folders do not lead to
        LOGGER.warning("%s: no participants/sessions/scans metadata (%s)", relpath, exc)
        meta = {}
    site = meta.get(site_column)
    return ScanRecord(
        path=str(path),
        relpath=relpath,
        bids_name=bids_name_of(path),
        entities=dict(sorted(ents.items())),
        site=None if site is None else str(site),
        metadata=meta,
    )
