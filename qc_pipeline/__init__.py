"""itermask-qc: MRI quality control with IterMask3D.

Importing the package has no side effects: no logging handlers, no network,
no environment changes. The command-line entry points set those up. The one exception is
privacy: the modules that import nipype (``qc_pipeline.workflows`` and its interfaces) set
``NIPYPE_NO_ET=1`` unless it is already set, so nipype's telemetry never runs.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
