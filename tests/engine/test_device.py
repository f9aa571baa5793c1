"""--device cuda: the refusal says whether the torch build or the machine lacks CUDA."""
from __future__ import annotations

import torch


def test_participant_device_cuda_says_whether_the_build_or_the_machine_lacks_cuda(monkeypatch):
    """The same refusal names the cause: a CPU-only torch on any machine, or a CUDA build that
    sees no GPU here (docs/usage.md, 'On a GPU machine')."""
    from qc_pipeline.cli.app import _resolve_device
    from qc_pipeline.cli.exits import CLIError
    from qc_pipeline.engine.inference import cuda_problem, torch_build

    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in torch_build()
    try:
        _resolve_device("cuda")
        raise AssertionError("a CPU-only torch was accepted for --device cuda")
    except CLIError as exc:
        assert "built without CUDA" in str(exc) and "On a GPU machine" in str(exc)
    assert _resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA 12.8" in torch_build()
    assert "sees no CUDA device on this machine" in cuda_problem()
    assert cuda_problem(build_only=True) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_problem() is None and _resolve_device("auto") == "cuda"
