"""Part of itermask-qc."""
