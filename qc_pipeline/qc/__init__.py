"""The image-quality room: measurements of a scan and its QC score.

* :mod:`~qc_pipeline.qc.background` -- the out-of-head background statistic (and the
  robust lower-side location/scale it shares with the site scores);
* :mod:`~qc_pipeline.qc.spectrum` -- the native image's spectral peak and k-space line comb;
* :mod:`~qc_pipeline.qc.score` -- the measurements on the model grid, their robust z
  against the model's reference and the QC score;
* :mod:`~qc_pipeline.qc.regions` -- where the engine's mask lies: its connected regions,
  their size, centre (scanner and MNI) and error;
* :mod:`~qc_pipeline.qc.metrics` -- detection metrics (AUROC, AUPRC, FPR/FNR at a
  sensitivity) of scores against ratings.

Nothing here imports the engine, the workflows or the CLI.
"""
