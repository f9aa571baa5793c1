"""The preprocessing room: one loaded scan -> the model-grid image and its masks.

* :mod:`~qc_pipeline.preproc.chain` -- :func:`preprocess`, the chain (validate, RAS lattice,
  skull strip, expected brain mask, crop/pad, iterative z-score), and its results
  (:class:`PrepInfo`, :class:`PreprocResult`);
* :mod:`~qc_pipeline.preproc.geometry` -- the world-aligned lattice, resampling, crop/pad
  onto the grid and :func:`to_native`, the way back to the scan's voxels;
* :mod:`~qc_pipeline.preproc.masks` -- binary morphology (the one home of those helpers),
  air in a skull-strip mask, the checks that a mask is a brain;
* :mod:`~qc_pipeline.preproc.prior` -- the MNI152 brain-mask prior and its robust fit;
* :mod:`~qc_pipeline.preproc.skullstrip` -- the skull-strip tools (deepbet, robex, none).

The names below are what callers outside the room use; the rest stays in its module.
"""
from .chain import PrepInfo, PreprocResult, iterative_zscore, preprocess
from .geometry import to_native
from .masks import ball, fill_holes, largest_component, open_mask
from .prior import mni_brain_mask
from .skullstrip import DEFAULT_METHOD_BY_CONTRAST, available_methods

__all__ = [
    "PrepInfo",
    "PreprocResult",
    "preprocess",
    "iterative_zscore",
    "to_native",
    "mni_brain_mask",
    "ball",
    "fill_holes",
    "largest_component",
    "open_mask",
    "available_methods",
    "DEFAULT_METHOD_BY_CONTRAST",
]
