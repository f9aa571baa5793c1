"""itermask-qc: MRI quality control with IterMask3D.

Importing the package has no side effects: no logging handlers, no network,
no environment changes. The command-line entry points set those up.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
