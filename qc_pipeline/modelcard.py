"""Model cards: the one reader and the one writer of a model folder's ``model_card.json``.

A model folder holds ``weights.pt`` (the network's ``state_dict``) and its JSON card (what
the network is, the grid, voxel size and normalisation it expects, the high-frequency
radius, gamma, schedules, how it was trained, its evaluation, the QC-score reference and
the normal-error maps). Everything that reads a card reads it here, so a missing or broken
card is the same typed error everywhere. No torch: the group level and the pages read cards
too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .errors import ModelCardError, ModelNotFoundError
from .io import atomic_write_text

__all__ = ["WEIGHTS_NAME", "CARD_NAME", "REQUIRED_FIELDS", "load_model_card", "write_model_card"]

WEIGHTS_NAME = "weights.pt"
CARD_NAME = "model_card.json"
#: what every card must say: the network cannot be built or fed without them
REQUIRED_FIELDS = ("grid", "voxel_size", "network")


def write_model_card(folder, card: Mapping[str, Any]) -> Path:
    """Write ``model_card.json`` into ``folder`` (atomic; the one card writer)."""
    path = Path(folder) / CARD_NAME
    atomic_write_text(json.dumps(card, indent=1, default=str) + "\n", path)
    return path


def load_model_card(path) -> dict:
    """Read ``model_card.json`` of a model folder (typed errors when missing/broken)."""
    path = Path(path)
    card_file = path / CARD_NAME if path.is_dir() or not path.suffix else path
    if not card_file.is_file():
        raise ModelNotFoundError(f"no model card at {card_file} (a model folder holds {WEIGHTS_NAME} and {CARD_NAME})")
    try:
        card = json.loads(card_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelCardError(f"cannot read model card {card_file}: {exc}") from exc
    for key in REQUIRED_FIELDS:
        if not card.get(key):
            raise ModelCardError(f"model card {card_file} lacks the field {key!r}")
    return card
