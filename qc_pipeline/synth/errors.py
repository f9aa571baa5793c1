"""Typed exceptions of the synthetic-data package."""
from ..errors import QCPipelineError


class SynthError(QCPipelineError, ValueError):
    """Base class: a bad argument to a synthetic-data function."""


class UnknownArtifactError(SynthError, KeyError):
    """An artifact name that is not registered in :data:`ARTIFACTS`."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class OutputExistsError(SynthError, FileExistsError):
    """The output folder exists, is not empty, and ``overwrite`` was not given."""
