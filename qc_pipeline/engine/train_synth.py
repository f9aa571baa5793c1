"""Training on domain-randomised heads made on the training device (``itermask-qc-train-synth``).

Every step draws a fresh batch from :class:`~qc_pipeline.engine.domainrand.DomainRandomizer`
on the same device as the network, so a GPU is never starved by a CPU data loader (the CPU
generator of :mod:`qc_pipeline.synth` makes one head in 4-5 s). The loss is the one of
:func:`qc_pipeline.engine.training.train_model` (paper eq. 19 plus the masked-voxel term),
with the first term taken over the expected brain rather than the whole grid (the zeros
outside the brain are an identity task that would only dilute it).

A run is bounded by ``steps`` or by a wall-clock budget (``minutes``: the step count is set
from the speed of the first steps, and the learning rate follows a cosine to ``lr_final``
over it). ``checkpoint.pt`` (model, optimiser, step, planned steps, samples seen, elapsed
time, loss log; CPU tensors) is written atomically every ``checkpoint_minutes`` and at the
end, and a run on any device resumes a checkpoint written on any other. On resume the data
generator is re-seeded from (seed, step): the stream differs from an uninterrupted run,
the distribution does not.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .domainrand import DomainRandConfig, DomainRandomizer, load_bank
from .errors import InvalidInputError
from .inference import resolve_device
from ..io import atomic_write_file
from .modelio import default_card, load_model_card, save_model_folder, WEIGHTS_NAME

__all__ = ["train_synthetic", "main", "CHECKPOINT_NAME", "DEFAULT_SYNTH_FEATURES"]

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"
#: channel widths of the shipped domain-randomised models (docs/performance.md: ~0.8 s per
#: forward pass on 2 CPU cores at the 2 mm grid)
DEFAULT_SYNTH_FEATURES = (16, 32, 64, 128, 256)


def _loss(net, batch, gen) -> torch.Tensor:
    x, brain, hf, mask = batch["image"], batch["brain"], batch["hf"], batch["mask"]
    target = batch.get("target", x)  # the noise-free head when the generator makes one
    noise = torch.randn(x.shape, generator=gen, device=x.device)
    x_hat = torch.where(mask, noise, x)  # paper eq. 17: masked voxels become N(0, 1)
    out = net(torch.stack([x_hat, hf], 1))[:, 0].float()
    sq = (out - target) ** 2
    b = brain.float()
    m = mask.float()
    return (sq * b).sum() / b.sum().clamp_min(1.0) + (sq * m).sum() / m.sum().clamp_min(1.0)


def train_synthetic(
    bank: Mapping | str | os.PathLike,
    out_dir,
    *,
    contrast: str = "T1w",
    config: DomainRandConfig | None = None,
    steps: int | None = None,
    minutes: float | None = None,
    batch_size: int = 4,
    lr: float = 1e-3,
    lr_final: float = 2e-5,
    features: Sequence[int] = DEFAULT_SYNTH_FEATURES,
    norm: str = "batch",
    device: str = "auto",
    seed: int = 0,
    resume: bool = True,
    init_from=None,
    checkpoint_minutes: float = 2.0,
    bf16: str = "auto",
    log_every: int = 25,
    half_weights: bool = True,
    card_extra: Mapping[str, Any] | None = None,
) -> dict:
    """Train a UNet3D reconstructor on domain-randomised heads and write a model folder.

    Parameters
    ----------
    bank : anatomy bank dict or path of its ``.npz``
    out_dir : model folder to write (``weights.pt``, ``model_card.json``, ``checkpoint.pt``)
    contrast : the contrast the model card names (the data's contrasts are ``config``'s)
    config : what the generator randomises (default :class:`DomainRandConfig`)
    steps, minutes : total optimiser steps, or a wall-clock budget for this call
    batch_size, lr, lr_final : batch and cosine learning-rate schedule (AdamW)
    features, norm : network (``UNet3D``)
    device : "auto", "cpu", "cuda"
    seed : network initialisation and data stream
    resume : continue from ``out_dir/checkpoint.pt`` (written on any device)
    init_from : model folder whose weights start a fresh run (same network)
    checkpoint_minutes : checkpoint period in wall-clock minutes
    bf16 : "auto" (bf16 autocast on CUDA), "on", "off"
    half_weights : store ``weights.pt`` as float16 (half the size; loaded as float32)

    Returns
    -------
    dict: ``model_dir``, ``steps``, ``start_step``, ``samples``, ``final_loss``,
    ``wall_time_s``, ``device``.
    """
    from qc_pipeline.models.unet import UNet3D

    if steps is None and minutes is None:
        raise InvalidInputError("train_synthetic needs steps or minutes")
    if (steps is not None and steps < 1) or (minutes is not None and minutes <= 0) or batch_size < 1:
        raise InvalidInputError(f"steps/minutes/batch_size must be positive, got {steps}, {minutes}, {batch_size}")
    cfg = config or DomainRandConfig()
    bank_d = load_bank(bank) if not isinstance(bank, Mapping) else bank
    dev = resolve_device(device)
    use_bf16 = (bf16 == "on") or (bf16 == "auto" and dev.type == "cuda")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME

    torch.manual_seed(int(seed))
    net = UNet3D(2, 1, tuple(int(f) for f in features), norm=norm).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    start, planned, samples, elapsed_before, history = 0, steps, 0, 0.0, []
    init_info = None
    if init_from is not None and not (resume and ckpt_path.is_file()):
        card0 = load_model_card(init_from)
        if dict(card0.get("network") or {}) != dict(net.config()):
            raise InvalidInputError(f"init_from {init_from}: network {card0.get('network')} differs from {net.config()}")
        net.load_state_dict(torch.load(Path(init_from) / WEIGHTS_NAME, map_location="cpu", weights_only=True))
        init_info = {"model_id": card0.get("model_id"), "path": str(init_from),
                     "steps": (card0.get("training") or {}).get("steps")}
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if dict(ck.get("network") or {}) != dict(net.config()):
            raise InvalidInputError(f"{ckpt_path} holds network {ck.get('network')}, not {net.config()}")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, samples = int(ck["step"]), int(ck["samples"])
        elapsed_before, history = float(ck["elapsed_s"]), list(ck["history"])
        init_info = ck.get("init_from")
        planned = steps if steps is not None else None
        log.info("resuming %s at step %d (%d samples, %.0f s so far)", ckpt_path, start, samples, elapsed_before)
    gen = DomainRandomizer(bank_d, cfg, device=dev, seed=int(seed) * 1_000_003 + start)
    noise_gen = torch.Generator(device=dev)
    noise_gen.manual_seed(int(seed) * 7919 + start)

    def save_checkpoint(step: int, elapsed: float) -> None:
        state = {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                 "optimizer": _to_cpu(opt.state_dict()), "step": step, "planned_steps": planned,
                 "samples": samples, "elapsed_s": elapsed, "history": history, "seed": seed,
                 "network": net.config(), "config": cfg.to_dict(), "init_from": init_info}
        atomic_write_file(ckpt_path, lambda tmp: torch.save(state, tmp))

    net.train()
    t0 = time.perf_counter()
    last_ckpt = t0
    step = start
    run_loss: list[float] = []
    budget_s = None if minutes is None else float(minutes) * 60.0
    while True:
        if planned is not None and step >= planned:
            break
        if budget_s is not None and planned is None and step - start == 5:
            t_warm = time.perf_counter()  # the first steps pay for kernel selection and caches
        if budget_s is not None and planned is None and step - start == 25:
            per = (time.perf_counter() - t_warm) / 20.0
            planned = step + int(max(0.0, budget_s - (time.perf_counter() - t0)) / per)
            log.info("%.3f s per step on %s: planning %d steps in %.1f min", per, dev, planned, minutes)
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
        horizon = planned if planned is not None else start + 10_000
        frac = min(1.0, step / max(horizon, 1))
        for g in opt.param_groups:
            g["lr"] = lr_final + 0.5 * (lr - lr_final) * (1.0 + math.cos(math.pi * frac))
        batch = gen.sample(batch_size)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = _loss(net, batch, noise_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        samples += batch_size
        run_loss.append(float(loss.detach()))
        if step % max(1, log_every) == 0:
            el = time.perf_counter() - t0
            history.append({"step": step, "loss": float(np.mean(run_loss)), "lr": opt.param_groups[0]["lr"],
                            "elapsed_s": round(elapsed_before + el, 1)})
            log.info("step %d/%s loss %.4f lr %.2e %.2f steps/s", step, planned, history[-1]["loss"],
                     history[-1]["lr"], (step - start) / max(el, 1e-9))
            run_loss = []
        if time.perf_counter() - last_ckpt > checkpoint_minutes * 60.0:
            save_checkpoint(step, elapsed_before + time.perf_counter() - t0)
            last_ckpt = time.perf_counter()
    wall = elapsed_before + time.perf_counter() - t0
    if run_loss:
        history.append({"step": step, "loss": float(np.mean(run_loss)), "lr": opt.param_groups[0]["lr"],
                        "elapsed_s": round(wall, 1)})
    save_checkpoint(step, wall)
    net.eval()
    shape = tuple(int(g) for g in cfg.grid)
    vs = (float(cfg.voxel_mm),) * 3
    card = default_card(shape, vs, contrast=contrast)
    card["model_id"] = f"{contrast.lower()}-dr-unet3d-{'-'.join(str(f) for f in net.features)}-n{samples}"
    card["network"] = net.config()
    card["training"] = {
        "data": "domain-randomised heads drawn on the training device from the ICBM152 tissue "
                "model (qc_pipeline.engine.domainrand; anatomy bank from qc_pipeline.synth.bank)",
        "generator": cfg.to_dict(),
        "steps": step, "samples": samples, "batch_size": batch_size, "lr": lr, "lr_final": lr_final,
        "lr_schedule": "cosine over the planned steps", "optimizer": "AdamW (weight decay 1e-5)",
        "patch": None, "bf16": use_bf16,
        "loss": "mean L2 over the expected brain + mean L2 over masked voxels"
                + (", against the noise-free head" if cfg.clean_target else ""),
        "masks": "Gaussian point cloud (paper 3.5; factors 2/4/8 p=1/4,1/2,1/4), fresh every sample",
        "init_from": init_info, "seed": seed,
        "final_loss": history[-1]["loss"] if history else None,
        "loss_log": history[-20:],
        "wall_time_s": round(wall, 1),
        "machine": f"{platform.platform()}; cpus={os.cpu_count()}; device={dev}"
                   + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "torch": torch.__version__,
    }
    if card_extra:
        card.update(dict(card_extra))
    net_cpu = net.cpu()
    if half_weights:
        # float16 halves the shipped file; inference loads it into float32 parameters
        net_save = _HalfView(net_cpu)
        save_model_folder(out_dir, net_save, card)
    else:
        save_model_folder(out_dir, net_cpu, card)
    return {"model_dir": out_dir, "steps": step, "start_step": start, "samples": samples,
            "final_loss": card["training"]["final_loss"], "wall_time_s": wall, "device": str(dev)}


class _HalfView(torch.nn.Module):
    """Wraps a network so that ``state_dict`` gives float16 floating tensors (for saving)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def config(self):
        return self.net.config()

    def forward(self, x):
        return self.net(x)

    def state_dict(self, *a, **k):  # noqa: D102
        return {n: (t.half() if t.is_floating_point() else t) for n, t in self.net.state_dict().items()}


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="itermask-qc-train-synth",
        description="Train an IterMask3D model on domain-randomised heads made on the training "
                    "device (GPU when there is one); resumable on any device.")
    p.add_argument("bank", type=Path, help="anatomy bank .npz (itermask-qc-synth bank OUT.npz)")
    p.add_argument("model_dir", type=Path, help="output model folder")
    p.add_argument("--contrast", default="T1w", choices=["T1w", "T2w", "FLAIR"], help="contrast the card names")
    p.add_argument("--mix", default=None,
                   help='contrasts of the training data as JSON, e.g. \'{"T1w": 0.5, "T2w": 0.25, '
                        '"FLAIR": 0.25}\' (default: the --contrast alone)')
    p.add_argument("--random-contrast", type=float, default=0.15,
                   help="share of heads with uniformly random tissue intensities (default 0.15)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="total optimiser steps")
    budget.add_argument("--minutes", type=float, help="wall-clock budget of this call")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--features", type=int, nargs="+", default=list(DEFAULT_SYNTH_FEATURES))
    p.add_argument("--grid", type=int, nargs=3, default=[80, 96, 80])
    p.add_argument("--voxel-size", type=float, default=2.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", type=Path, default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--checkpoint-minutes", type=float, default=2.0)
    p.add_argument("--mask-points", type=int, default=100_000)
    p.add_argument("--clean-target", action="store_true",
                   help="reconstruct the head without its scanner noise (see DomainRandConfig.clean_target)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    mix = json.loads(args.mix) if args.mix else {args.contrast: 1.0}
    cfg = DomainRandConfig(grid=tuple(args.grid), voxel_mm=args.voxel_size, contrast_probs=mix,
                           p_random_contrast=args.random_contrast, mask_points=args.mask_points,
                           clean_target=args.clean_target)
    try:
        res = train_synthetic(args.bank, args.model_dir, contrast=args.contrast, config=cfg,
                              steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
                              lr=args.lr, features=args.features, device=args.device, seed=args.seed,
                              resume=not args.no_resume, init_from=args.init_from,
                              checkpoint_minutes=args.checkpoint_minutes)
    except InvalidInputError as exc:
        print(f"itermask-qc-train-synth: error: {exc}", file=sys.stderr)
        return 64
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in res.items()}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
