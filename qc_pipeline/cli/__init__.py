"""The command-line room: argument parsing, exit codes and the commands' ``main`` functions.

* :mod:`~qc_pipeline.cli.app` -- ``itermask-qc``: the participant, adapt and group levels;
  with :mod:`~qc_pipeline.cli.parser` (its argparse) and :mod:`~qc_pipeline.cli.runtime`
  (logging, Nipype's configuration, the output and work folders, signals);
* :mod:`~qc_pipeline.cli.scan` -- ``itermask-qc-scan``: NIfTI files outside a BIDS dataset;
* :mod:`~qc_pipeline.cli.sbatch` -- ``itermask-qc-sbatch``: the SLURM job array
  (the planning and scripts are :mod:`qc_pipeline.cluster`);
* :mod:`~qc_pipeline.cli.calibrate` -- ``itermask-qc-calibrate``
  (the fits are :mod:`qc_pipeline.calibrate`);
* :mod:`~qc_pipeline.cli.exits` -- the exit codes, and the one place that maps exceptions
  to them.

Nothing outside this room parses the commands' arguments or picks their exit codes (the
training commands, ``qc_pipeline.engine.train_cli`` and ``train_synth``, and
``qc_pipeline.synth.cli`` still hold their own).
"""
