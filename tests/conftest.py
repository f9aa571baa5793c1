"""Session-wide test settings: no telemetry, single-threaded torch, headless plots."""
import os

os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
