"""Measure what each heavy node of one scan really needs: peak memory, CPU, wall time.

Each stage of the per-scan workflow runs as its own process under ``/usr/bin/time -v``,
exactly as a SLURM job of Nipype's SLURM plugin would run it (a fresh Python that imports
the package and runs one Nipype interface), so the peak RSS includes the interpreter,
torch and the model. The numbers set the per-node requests in ``workflows/slurm.yml`` /
``docs/cluster.md`` and the ``--mem-per-task`` default of ``itermask-qc-sbatch``.

    .venv/bin/python benchmarks/node_resources.py                  # 1 mm T1w head, 1 thread
    .venv/bin/python benchmarks/node_resources.py --threads 2 --skull-strip none
    .venv/bin/python benchmarks/node_resources.py --model-dir models/t1w

Without ``--model-dir`` a randomly initialised network of the default size
(``UNet3D`` default features, default 80x96x80 grid at 2 mm) is used: memory and time do
not depend on the weights' values, but the forward-pass count of the ``fast`` schedule
depends on when the tau curve stops, so report the ``forward_passes`` column with it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

STAGE_CODE = {
    "load": """
from qc_pipeline.workflows.interfaces import LoadValidate
r = LoadValidate(in_file=A['scan'], name='scan').run(cwd=A['cwd'])
out = {'error': r.outputs.error}
""",
    "preprocess": """
from qc_pipeline.workflows.interfaces import Preprocess
r = Preprocess(in_file=A['scan'], name='scan', voxel_size=A['voxel_size'], grid=A['grid'],
               skull_strip=A['skull_strip'], contrast='T1w',
               omp_nthreads=A['threads']).run(cwd=A['cwd'])
out = {'error': r.outputs.error, 'out_file': r.outputs.out_file}
""",
    "itermask": """
from qc_pipeline.workflows.interfaces import IterMaskRun, read_node_record
r = IterMaskRun(in_file=A['prep'], model_dir=A['model_dir'], contrast='T1w', device=A['device'],
                schedule=A['schedule'], omp_nthreads=A['threads']).run(cwd=A['cwd'])
out = {'error': r.outputs.error, 'out_file': r.outputs.out_file}
if r.outputs.out_file:
    res = read_node_record(r.outputs.out_file)
    out['forward_passes'] = int(res.forward_passes)
""",
    "write": """
from qc_pipeline.workflows.interfaces import WriteDerivatives
r = WriteDerivatives(scan=A['record'], output_dir=A['out'], in_file=A['scan'],
                     preproc_file=A['prep'], result_file=A['result']).run(cwd=A['cwd'])
out = {'error': '' if r.outputs.status == 'ok' else r.outputs.qc_json}
""",
}


def run_stage(stage: str, args: dict) -> dict:
    """Run one stage in a fresh interpreter under /usr/bin/time -v; return its figures."""
    code = ("import json, sys, os\nos.environ.setdefault('NIPYPE_NO_ET', '1')\n"
            "A = json.loads(sys.argv[1])\n" + STAGE_CODE[stage]
            + "\nprint('RESULT ' + json.dumps(out))\n")
    env = dict(os.environ, NIPYPE_NO_ET="1", OMP_NUM_THREADS=str(args["threads"]),
               MKL_NUM_THREADS=str(args["threads"]))
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, json.dumps(args)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{r.stdout}\n{r.stderr}")
    res = json.loads(re.search(r"^RESULT (.*)$", r.stdout, re.M).group(1))
    if res.get("error"):
        raise RuntimeError(f"stage {stage}: {res['error']}")
    t = r.stderr

    def grab(label):
        return re.search(rf"{re.escape(label)}: (.*)", t).group(1).strip()

    wall = grab("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(p) for p in wall.split(":")]
    wall_s = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    user, sys_ = float(grab("User time (seconds)")), float(grab("System time (seconds)"))
    res.update(stage=stage, maxrss_mb=int(grab("Maximum resident set size (kbytes)")) / 1024,
               wall_s=wall_s, cpu_s=user + sys_,
               cpu_util=(user + sys_) / wall_s if wall_s else 0.0)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scan", help="a NIfTI head (default: a synthetic 1 mm T1w head)")
    p.add_argument("--model-dir", help="model folder (default: random default-size UNet)")
    p.add_argument("--skull-strip", default="deepbet",
                   choices=("auto", "deepbet", "robex", "none"))
    p.add_argument("--schedule", default="fast", choices=("fast", "reference"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="noderes-"))
    scan = a.scan
    if scan is None:
        import nibabel as nib

        from qc_pipeline.synth.subject import make_subject

        img = make_subject(3, "T1w", voxel_size=1.0)
        img = img[0] if isinstance(img, tuple) else img
        scan = str(tmp / "sub-01_T1w.nii.gz")
        nib.save(img, scan)
    model_dir = a.model_dir
    if model_dir is None:
        from qc_pipeline.engine import make_random_model_folder
        from qc_pipeline.models.unet import DEFAULT_FEATURES

        model_dir = str(make_random_model_folder(tmp / "model", grid=(80, 96, 80),
                                                 voxel_size=(2, 2, 2),
                                                 features=DEFAULT_FEATURES))
    from qc_pipeline.engine import load_model_card

    card = load_model_card(Path(model_dir))
    import nibabel as nib

    shape = nib.load(scan).shape
    base = dict(scan=scan, model_dir=model_dir, skull_strip=a.skull_strip,
                schedule=a.schedule, threads=a.threads, device=a.device,
                voxel_size=[float(v) for v in card["voxel_size"]],
                grid=[int(g) for g in card["grid"]])
    rows = []
    from qc_pipeline.bids import ScanRecord

    record = ScanRecord(path=scan, relpath="sub-01/anat/sub-01_T1w.nii.gz",
                        bids_name="sub-01_T1w",
                        entities={"subject": "01", "suffix": "T1w", "datatype": "anat",
                                  "extension": ".nii.gz"}).to_dict()
    for stage in ("load", "preprocess", "itermask", "write"):
        cwd = tmp / stage
        cwd.mkdir()
        args = dict(base, cwd=str(cwd))
        if stage in ("itermask", "write"):
            args["prep"] = rows[1]["out_file"]
        if stage == "write":
            args.update(result=rows[2]["out_file"], record=record, out=str(tmp / "out"))
        rows.append(run_stage(stage, args))
    print(f"scan {scan} shape {shape}; model grid {card['grid']} @ {card['voxel_size']} mm, "
          f"network {card.get('network', {}).get('features')}; skull strip "
          f"{a.skull_strip}; schedule {a.schedule}; {a.threads} thread(s); device {a.device}")
    print(f"{'stage':<12}{'peak RSS MB':>12}{'wall s':>9}{'CPU s':>9}{'CPU/wall':>10}"
          f"{'passes':>8}")
    for r in rows:
        print(f"{r['stage']:<12}{r['maxrss_mb']:>12.0f}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}"
              f"{r['cpu_util']:>10.2f}{r.get('forward_passes', ''):>8}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
