"""Typed exceptions raised by the IterMask3D engine.

Library code never ``assert``s on user input: every bad input raises one of
these, with a message naming the bad value and what was expected.
"""
from __future__ import annotations

from ..errors import EngineError, ModelCardError, ModelNotFoundError

__all__ = [
    "EngineError",
    "ModelNotFoundError",
    "ModelCardError",
    "ShapeMismatchError",
    "VoxelSizeMismatchError",
    "InvalidInputError",
]


class ShapeMismatchError(EngineError, ValueError):
    """An image or mask is not on the model's grid (or image and mask differ)."""


class VoxelSizeMismatchError(EngineError, ValueError):
    """The voxel size of an input differs from the model card's voxel size."""


class InvalidInputError(EngineError, ValueError):
    """An input volume is unusable (NaN/Inf values, empty brain mask, wrong rank...)."""
