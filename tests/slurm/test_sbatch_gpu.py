"""itermask-qc-sbatch --gpu checks that the installed torch can use CUDA before writing jobs."""
from __future__ import annotations

import torch

from qc_pipeline.cli.sbatch import main


def test_gpu_with_a_torch_built_without_cuda_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(torch.version, "cuda", None)
    out = tmp_path / "out"
    assert main([str(tmp_path / "bids"), str(out), "--gpu"]) == 64
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu: the installed torch" in err[0] and "without CUDA" in err[0]
    assert not out.exists()


def test_gpu_with_a_cuda_build_goes_on_without_a_gpu_here(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a login node
    # past the check, the missing dataset is the next (and only) complaint
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "--gpu"]) == 66
    assert "CUDA" not in capsys.readouterr().err
