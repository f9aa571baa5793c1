"""itermask-qc: MRI quality control with IterMask3D.

Importing the package has no side effects: no logging handlers, no network,
no environment changes. The command-line entry points set those up. The one exception is
privacy: the modules that import nipype (``qc_pipeline.workflows`` and its interfaces) set
``NIPYPE_NO_ET=1`` unless it is already set, so nipype's telemetry never runs.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "screen"]


def __getattr__(name: str):
    # ``qc_pipeline.screen``, the one call for library users, imported on first use so that
    # ``import qc_pipeline`` stays light (no torch, no nipype)
    if name == "screen":
        from .screening import screen

        return screen
    raise AttributeError(f"module 'qc_pipeline' has no attribute {name!r}")
