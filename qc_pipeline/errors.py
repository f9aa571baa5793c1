"""Typed exceptions for problems with an input scan.

Every error carries the offending file (or a label for an in-memory image) and a one-line
reason; ``str(err)`` is the line that goes into the scan's ``*_qc.json`` ``error`` field and
into the group table, e.g. ``"sub-01_T1w.nii.gz: truncated or corrupt gzip stream (...)"``.

The hierarchy lets callers catch everything that is the *input's* fault with one clause::

    try:
        img = load_image(path)
        prep = preprocess(img, voxel_size=2.0, grid=(80, 96, 80))
    except InputError as err:          # bad scan: record and carry on with the others
        record_error(path, str(err))

Bugs in the pipeline itself are not ``InputError`` and should propagate.
"""
from __future__ import annotations

import os

__all__ = [
    "QCPipelineError",
    "InputError",
    "EmptyImageError",
    "CorruptImageError",
    "NotThreeDError",
    "NonFiniteError",
    "BlankImageError",
    "VoxelSizeError",
    "NoBrainError",
    "ImageBudgetError",
    "SkullStripError",
    "MissingDependencyError",
    "EngineError",
    "ModelNotFoundError",
    "ModelCardError",
]


class QCPipelineError(Exception):
    """The root of every error itermask-qc raises on purpose (a bad input, model, dataset,
    setting or cluster reply); each module's typed errors derive from it, so a library
    user can tell the package's refusals from its bugs with one clause. The command-line
    tools map them to exit codes in :mod:`qc_pipeline.cli.exits`."""


class InputError(QCPipelineError, ValueError):
    """Base class: the input scan cannot be processed.

    Parameters
    ----------
    source : str or os.PathLike or None
        The file (or a label such as ``"<in-memory image>"``) the problem is about.
    problem : str
        One line saying what is wrong, without the file name (it is prepended).
    """

    #: short machine-readable code, also used in the qc JSON ``error_type`` if wanted
    code = "input_error"

    def __init__(self, source, problem: str):
        self.source = os.fspath(source) if source is not None else "<in-memory image>"
        self.problem = " ".join(str(problem).split())  # always a single line
        super().__init__(f"{self.source}: {self.problem}")

    def __reduce__(self):  # picklable across Nipype/multiprocessing workers
        return (self.__class__, (self.source, self.problem))


class EmptyImageError(InputError):
    """The file is 0 bytes (or has no voxels)."""

    code = "empty"


class CorruptImageError(InputError):
    """Truncated gzip, unreadable header, or data that cannot be read completely."""

    code = "corrupt"


class NotThreeDError(InputError):
    """The image is not a single 3D volume (2D, or 4D with more than one volume)."""

    code = "not_3d"


class NonFiniteError(InputError):
    """Too many NaN/inf voxels to trust the scan."""

    code = "non_finite"


class BlankImageError(InputError):
    """All voxels are zero, or the image is constant."""

    code = "blank"


class VoxelSizeError(InputError):
    """Absurd voxel sizes (< 0.2 mm or > 8 mm) or a degenerate affine."""

    code = "voxel_size"


class NoBrainError(InputError):
    """No plausible brain was found in the image (phantom, noise, another body part)."""

    code = "no_brain"


class ImageBudgetError(InputError):
    """The header declares more voxel data than the memory budget allows, or a compressed
    file that would inflate far beyond any real scan (a decompression bomb); found from the
    header, before any voxel is read."""

    code = "budget"


class SkullStripError(InputError):
    """The skull-stripping tool failed on this image."""

    code = "skull_strip"


class MissingDependencyError(QCPipelineError, ImportError):
    """An optional tool is not installed; the message names the pip package to install.

    Not an :class:`InputError`: it is a configuration problem that affects every scan.
    """

    def __init__(self, tool: str, pip_name: str, extra: str | None = None):
        self.tool = tool
        self.pip_name = pip_name
        self.extra = extra
        hint = f"pip install {pip_name}"
        if extra:
            hint += f"  (or: pip install 'itermask-qc[{extra}]')"
        super().__init__(f"skull-strip method {tool!r} needs the package {pip_name!r}: {hint}")

    def __reduce__(self):
        return (self.__class__, (self.tool, self.pip_name, self.extra))


class EngineError(QCPipelineError, RuntimeError):
    """Base class of every error the IterMask3D engine raises on purpose
    (the rest are in :mod:`qc_pipeline.engine.errors`)."""


class ModelNotFoundError(EngineError, FileNotFoundError):
    """A model folder (``weights.pt`` + ``model_card.json``) is missing."""


class ModelCardError(EngineError, ValueError):
    """A model card is unreadable or lacks a required field."""
