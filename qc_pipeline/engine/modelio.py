"""Model folders: ``weights.pt`` (a ``state_dict``) + ``model_card.json``.

Every checkpoint travels with its JSON model card. The card says what the
network is (class and constructor arguments), which grid / voxel size /
normalisation it expects, the high-frequency radius, gamma, schedule
defaults, its size (parameters, multiply-adds per pass), how it was trained,
and an evaluation table.
"""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..config import DEFAULT_GRID, DEFAULT_VOXEL_SIZE
from ..io import atomic_write_file
from ..modelcard import CARD_NAME, WEIGHTS_NAME, load_model_card, write_model_card
from .errors import ModelCardError
from .hf import REFERENCE_FOV_MM, REFERENCE_RADIUS, hf_radius
from .schedules import SCHEDULES
from .taufit import DEFAULT_GAMMA, R2_MIN

__all__ = [
    "WEIGHTS_NAME", "CARD_NAME", "DEFAULT_GRID", "DEFAULT_VOXEL_SIZE", "NORMALISATION",
    "NORMAL_ERROR_NAME", "NORMAL_ERROR_SPREAD_NAME", "load_normal_error", "load_normal_error_spread",
    "load_normal_error_opening",
    "save_normal_error",
    "save_model_folder", "load_model_card", "write_model_card", "make_random_model_folder", "default_model_dir",
    "default_card", "build_network", "code_version", "model_content_key",
]

#: the model's normal error on the template grid (optional; the card's ``normal_error`` section)
NORMAL_ERROR_NAME = "normal_error.nii.gz"
#: how much normal heads differ from that median, voxel by voxel (optional, same section)
NORMAL_ERROR_SPREAD_NAME = "normal_error_spread.nii.gz"
NORMALISATION = ("iterative z-score inside the brain mask (paper 4.1.1: z-score, re-estimate mean/SD "
                 "from voxels within 2 SD, three more passes); background set to 0")


def code_version() -> str:
    """Package version (the lead's git commit is not read at run time)."""
    try:
        from qc_pipeline import __version__
        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def default_model_dir(contrast: str = "T1w") -> Path:
    """Folder of the packaged model for ``contrast`` (may not contain weights yet)."""
    import qc_pipeline.models as _models

    return Path(_models.__file__).parent / str(contrast).lower()


def default_card(grid: Sequence[int] = DEFAULT_GRID, voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
                 *, contrast: str = "T1w", gamma: float = DEFAULT_GAMMA, schedule: str = "fast") -> dict:
    """A model card with the engine's defaults (network/training fields are filled by the caller)."""
    grid = [int(g) for g in grid]
    vs = [float(v) for v in voxel_size]
    return {
        "model_id": f"{contrast.lower()}-untrained",
        "contrast": contrast,
        "grid": grid,
        "voxel_size": vs,
        "orientation": "RAS",
        "normalisation": NORMALISATION,
        "hf": {"reference_radius": REFERENCE_RADIUS, "reference_fov_mm": REFERENCE_FOV_MM,
               "reference_grid": [192, 192, 192], "reference_voxel_size": [1.0, 1.0, 1.0],
               "radius": list(hf_radius(grid, vs)),
               "units": "frequency-index units per axis (ellipsoid); same cycles/mm as r=15 on 192 x 1 mm"},
        "gamma": gamma,
        "r2_min": R2_MIN,
        "schedule": schedule,
        "schedules": {k: {"sweep_t": list(s.sweep_t) if k != "reference" else "1..100 step 1",
                          "early_stop": s.early_stop, "refine_start": s.refine_start,
                          "max_refine": s.max_refine, "tol": s.tol} for k, s in SCHEDULES.items()},
        "network": None,
        "params": None,
        "macs_per_pass": None,
        "training": {},
        "code_version": code_version(),
        "evaluation": [],
    }


def build_network(card: Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate the network described by ``card["network"]``."""
    from qc_pipeline.models.unet import UNet3D

    cfg = dict(card.get("network") or {})
    cls = cfg.pop("class", "UNet3D")
    if cls != "UNet3D":
        raise ModelCardError(f"model card names network class {cls!r}; only 'UNet3D' is known")
    try:
        return UNet3D(**cfg)
    except TypeError as exc:
        raise ModelCardError(f"model card network arguments {cfg!r} do not fit UNet3D: {exc}") from exc


def save_model_folder(path, net: torch.nn.Module, card: Mapping[str, Any]) -> Path:
    """Write ``weights.pt`` (state_dict, CPU tensors) and ``model_card.json`` atomically.

    ``network``, ``params`` and ``macs_per_pass`` are filled from ``net`` when the
    card lacks them.
    """
    from qc_pipeline.models.unet import count_macs, count_parameters

    path = Path(path)
    card = dict(card)
    if not card.get("network") and hasattr(net, "config"):
        card["network"] = net.config()
    if card.get("params") is None:
        card["params"] = count_parameters(net)
    if card.get("macs_per_pass") is None and card.get("grid"):
        card["macs_per_pass"] = count_macs(net, tuple(card["grid"]))
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_write_file(path / WEIGHTS_NAME, lambda tmp: torch.save(state, tmp))
    write_model_card(path, card)
    return path


def make_random_model_folder(path, *, grid=(32, 32, 32), voxel_size=(2, 2, 2), features=(4, 8, 16),
                             contrast: str = "T1w", seed: int = 0) -> Path:
    """Write a tiny randomly initialised model folder (for wiring tests; scores are meaningless).

    Returns the folder path.
    """
    from qc_pipeline.models.unet import UNet3D

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        net = UNet3D(2, 1, tuple(int(f) for f in features))
    finally:
        torch.random.set_rng_state(gen_state)
    net.eval()
    card = default_card(grid, voxel_size, contrast=contrast)
    card["model_id"] = f"{contrast.lower()}-random-seed{seed}"
    card["training"] = {"data": "none: randomly initialised (wiring tests only)", "subjects": 0,
                        "steps": 0, "wall_time_s": 0.0, "machine": platform.platform()}
    card["network"] = net.config()
    return save_model_folder(path, net, card)


def model_content_key(folder) -> str:
    """One short hash of everything a model folder's results depend on: its card, its weights
    and the maps the card names (sha256 of names and bytes, 16 hex digits).

    Results are keyed by it (resume, the engine node's cache), so a folder rewritten in place
    under the same ``model_id`` (a hand-edited card, replaced weights or maps) is never served
    an old result.

    Raises
    ------
    ModelNotFoundError, ModelCardError
        As :func:`load_model_card`.
    """
    folder = Path(folder)
    card = load_model_card(folder)
    sec = card.get("normal_error") or {}
    names = [CARD_NAME, WEIGHTS_NAME]
    if sec:
        names.append(str(sec.get("file", NORMAL_ERROR_NAME)))
        if sec.get("spread_file"):
            names.append(str(sec["spread_file"]))
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        f = folder / name
        if f.is_file():
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def load_normal_error(folder, card: Mapping[str, Any]):
    """The model's normal-error map (float32, template grid) named by the card's
    ``normal_error`` section, with its ``factor``; ``(None, None)`` when the card has none.

    Raises
    ------
    ModelCardError
        The section names a file that is missing or unreadable, or a factor that is not
        a positive number.
    """
    import math

    sec = card.get("normal_error")
    if not sec:
        return None, None
    f = Path(folder) / str(sec.get("file", NORMAL_ERROR_NAME))
    try:
        factor = float(sec["factor"])
    except (KeyError, TypeError, ValueError):
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise ModelCardError(f"model card in {folder}: normal_error.factor must be a positive number, "
                             f"got {sec.get('factor')!r}")
    return _read_template_volume(folder, f, "normal-error map"), factor


def load_normal_error_spread(folder, card: Mapping[str, Any]):
    """The normal heads' voxel-wise spread around the normal-error map (float32, template
    grid; the card's ``normal_error.spread_file``) and its multiple ``spread_k``; ``(None,
    None)`` when the card names none.

    Raises
    ------
    ModelCardError
        The file is missing or unreadable, or ``spread_k`` is not a number >= 0.
    """
    import math

    sec = card.get("normal_error") or {}
    if not sec.get("spread_file"):
        return None, None
    try:
        k = float(sec["spread_k"])
    except (KeyError, TypeError, ValueError):
        k = math.nan
    if not (math.isfinite(k) and k >= 0):
        raise ModelCardError(f"model card in {folder}: normal_error.spread_k must be a number >= 0, "
                             f"got {sec.get('spread_k')!r}")
    return _read_template_volume(folder, Path(folder) / str(sec["spread_file"]), "normal-error spread map"), k


def load_normal_error_opening(folder, card: Mapping[str, Any]) -> int:
    """The radius (model-grid voxels) of the opening applied to the mask after the
    normal-error rule (the card's ``normal_error.open_vox``); 0 when the card names none.

    Raises
    ------
    ModelCardError
        ``open_vox`` is not a whole number >= 0.
    """
    sec = card.get("normal_error") or {}
    v = sec.get("open_vox", 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ModelCardError(f"model card in {folder}: normal_error.open_vox must be a whole number >= 0, "
                             f"got {v!r}")
    return v


def _read_template_volume(folder, f: Path, what: str):
    """A finite, non-negative 3D float32 volume from a model folder, or a card error naming it."""
    import nibabel as nib
    import numpy as np

    try:
        data = np.asarray(nib.load(str(f)).dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same card error
        raise ModelCardError(f"model card in {folder} names the {what} {f.name}, which cannot "
                             f"be read: {exc}") from exc
    if data.ndim != 3 or not np.all(np.isfinite(data)) or (data < 0).any():
        raise ModelCardError(f"{what} {f} must be a finite, non-negative 3D volume, "
                             f"got shape {data.shape}")
    return data


def save_normal_error(folder, volume_t, affine, section: Mapping[str, Any], *,
                      spread_t=None) -> Path:
    """Write the normal-error map (template grid, ``affine``) into a model folder and the
    card's ``normal_error`` section (``section`` plus the file name), both atomically.
    With ``spread_t`` (the normal heads' voxel-wise spread; ``section`` then carries
    ``spread_k``) that map is written too and named as ``spread_file``; without it the
    section names none and an older spread file is removed."""
    import nibabel as nib
    import numpy as np

    from ..io import atomic_write_nifti

    folder = Path(folder)
    card = load_model_card(folder)
    sec = {**dict(section), "file": NORMAL_ERROR_NAME}
    for name, vol in ((NORMAL_ERROR_NAME, volume_t), (NORMAL_ERROR_SPREAD_NAME, spread_t)):
        if vol is None:
            continue
        img = nib.Nifti1Image(np.asarray(vol, dtype=np.float32), np.asarray(affine, dtype=float))
        img.header.set_data_dtype(np.float32)
        atomic_write_nifti(img, folder / name)
    if spread_t is not None:
        sec["spread_file"] = NORMAL_ERROR_SPREAD_NAME
    else:
        sec.pop("spread_file", None)
        sec.pop("spread_k", None)
        (folder / NORMAL_ERROR_SPREAD_NAME).unlink(missing_ok=True)
    card["normal_error"] = sec
    write_model_card(folder, card)
    return folder / NORMAL_ERROR_NAME
