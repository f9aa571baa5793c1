"""Spectral peak (``qc_pipeline.qc.spectrum``): time per scan and values, clean vs k-space spike.

For native image sizes a user meets (a 1.5 mm, a 1.2 mm and a 1 mm sagittal MPRAGE field
of view, a 0.8 mm one that is cropped to 256 per axis), a synthetic head
(``itermask-qc-synth``, T1w, made at 2 mm) resampled to that grid, with Rician noise
at 2 % of its bright tissue, is measured clean and with torchio's
k-space spike (severity 0.75); prints the median wall time of ``--repeats`` calls of
:func:`qc_pipeline.qc.spectrum.spectral_peak_for_image` (one thread) and the values.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/spectral_peak.py --repeats 5
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("NIPYPE_NO_ET", "1")

SIZES = {  # name: (shape, voxel size in mm)
    "1.5 mm, 120x160x160": ((120, 160, 160), 1.5),
    "1.2 mm, 150x200x200": ((150, 200, 200), 1.2),
    "1 mm, 176x256x256": ((176, 256, 256), 1.0),
    "0.8 mm, 220x320x320": ((220, 320, 320), 0.8),
}


def _head_on(shape, vox, seed):
    import nibabel as nib
    from scipy import ndimage as ndi

    from qc_pipeline.synth import make_subject

    img, _ = make_subject(seed, "T1w", work_mm=2.0, voxel_size=2.0)
    data = np.asarray(img.dataobj, dtype=np.float32)
    zoom = [s / d for s, d in zip(shape, data.shape)]
    out = ndi.zoom(data, zoom, order=1)
    # a scanner's noise is white at the native grid (the upsampled head's is not)
    rng = np.random.default_rng(seed)
    sigma = 0.02 * float(np.percentile(out, 99))
    out = np.sqrt((out + sigma * rng.standard_normal(out.shape, dtype=np.float32)) ** 2
                  + (sigma * rng.standard_normal(out.shape, dtype=np.float32)) ** 2)
    aff = np.diag([vox, vox, vox, 1.0])
    return nib.Nifti1Image(out.astype(np.float32), aff)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args(argv)

    from qc_pipeline.qc.spectrum import spectral_peak_for_image
    from qc_pipeline.synth import apply_artifact

    print("| native grid | used array | median s (one thread) | clean | spike |")
    print("|---|---|---|---|---|")
    for name, (shape, vox) in SIZES.items():
        img = _head_on(shape, vox, args.seed)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            clean = spectral_peak_for_image(img)
            times.append(time.perf_counter() - t0)
        spiked = spectral_peak_for_image(apply_artifact(img, "spike", 0.75, rng=args.seed))
        print(f"| {name} | {'x'.join(map(str, clean.shape))} | {np.median(times):.2f} | "
              f"{clean.spectral_peak:.2f} | {spiked.spectral_peak:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
