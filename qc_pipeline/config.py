"""One settings object for a run of ``itermask-qc``.

The command line builds a :class:`Settings` once (``Settings.from_args``), the top-level
workflow reads it, and :meth:`Settings.snapshot` writes it as JSON to
``OUTPUT_DIR/logs/config-<runid>.json`` so that every run can be reproduced from the files
on disk. Nothing here has side effects at import time.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import __version__
from .io import atomic_write_text, to_jsonable

#: contrasts (BIDS suffixes) the app knows how to screen
SUFFIXES = ("T1w", "T2w", "FLAIR")
#: "auto": the model card's own schedule (the shipped T1w card: "normative")
SCHEDULES = ("auto", "normative", "fast", "reference")
SKULL_STRIP = ("auto", "deepbet", "robex", "none")
DEVICES = ("auto", "cpu", "cuda")
#: the model grid (voxels) and voxel size (mm) where a model card names none (every shipped
#: card names its own); the preprocessing's defaults too
DEFAULT_GRID = (80, 96, 80)
DEFAULT_VOXEL_SIZE = (2.0, 2.0, 2.0)


def new_run_id(now: Optional[_dt.datetime] = None) -> str:
    """Return a sortable, unique run id such as ``20240101-120000_1a2b3c4d``."""
    now = now or _dt.datetime.now()
    return f"{now:%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:8]}"


@dataclass
class Settings:
    """Everything a run needs to know; built by the CLI, read by the top-level workflow.

    Paths are absolute. ``suffixes`` is the resolved list of contrasts to screen (after
    defaults and model availability were applied); ``model_specs`` maps each suffix to the
    model used for it: ``{"model_dir": str | None (None = packaged default), "model_id",
    "grid", "voxel_size"}`` (read from the model card by the CLI).
    """

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_label: Optional[list[str]] = None
    session_label: Optional[list[str]] = None
    suffixes: list[str] = field(default_factory=lambda: list(SUFFIXES))
    bids_filters: dict = field(default_factory=dict)
    nprocs: int = 1
    omp_nthreads: int = 1
    plugin: str = "Linear"
    plugin_args: dict = field(default_factory=dict)
    device: str = "auto"
    #: scans of one contrast per IterMask3D node (1: a node per scan)
    engine_batch: int = 1
    model_dir: Optional[Path] = None
    model_specs: dict = field(default_factory=dict)
    schedule: str = "auto"
    skull_strip: str = "auto"
    reports_only: bool = False
    labels: Optional[Path] = None
    site_column: str = "site"
    flag_at_fnr: Optional[float] = None
    #: group level: keep an engine-mask voxel where its error exceeds this multiple of the
    #: site's normal error (qc_pipeline.sitenorm); None skips the site reference
    site_norm_factor: Optional[float] = 3.0
    #: ... and exceeds it by this many of the site's voxel-wise robust SDs; None: factor alone
    site_norm_spread: Optional[float] = 5.0
    #: ... against that many of the site's scans most like the scan's own error map; 0: the
    #: whole site
    site_norm_neighbours: int = 16
    adapt_minutes: float = 20.0
    adapt_steps: int = 400
    adapt_exclude: float = 0.2
    #: adapt level: keep the base model's normal-error map instead of the site's own
    adapt_base_normal_error: bool = False
    seed: int = 0
    max_image_gb: float = 2.0
    verbose: int = 0
    run_id: str = field(default_factory=new_run_id)
    version: str = __version__
    command_line: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ helpers
    @property
    def log_dir(self) -> Path:
        return Path(self.output_dir) / "logs"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"itermask-qc-{self.run_id}.log"

    @property
    def config_file(self) -> Path:
        return self.log_dir / f"config-{self.run_id}.json"

    @property
    def max_image_bytes(self) -> int:
        """Memory budget of one scan's voxels (``--max-image-gb``), checked from its header
        before any voxel is read (:func:`qc_pipeline.io.check_header`)."""
        return int(self.max_image_gb * 1024**3)

    @property
    def bids_db(self) -> Path:
        return Path(self.work_dir) / "bids_db"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view (paths as strings)."""
        out = {}
        for f in dataclasses.fields(self):
            out[f.name] = to_jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        for key in ("bids_dir", "output_dir", "work_dir", "model_dir", "labels"):
            if kw.get(key) is not None:
                kw[key] = Path(kw[key])
        return cls(**kw)

    def snapshot(self) -> Path:
        """Write the settings to ``OUTPUT_DIR/logs/config-<runid>.json`` (atomically)."""
        return atomic_write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", self.config_file)


