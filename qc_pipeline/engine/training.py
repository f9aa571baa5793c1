"""Training of the IterMask3D reconstructor (paper section 3.5).

Each step draws, for every batch element, a random subject, a *fresh* random
mask (:func:`random_training_mask`; the generator is never re-seeded), fills
the masked voxels with N(0, 1) noise and trains the UNet to reconstruct the
image from (noise-filled image, high-frequency image).

Loss (choice documented in docs/engine.md)
    ``L = mean((x' - x)^2 over the crop) + mean((x' - x)^2 over the masked voxels)``.
    The first term is the paper's L2 on the whole volume (eq. 19); the second
    keeps small masks from being drowned by the (easy) identity task on the
    unmasked voxels.

Checkpoints (``checkpoint.pt`` in ``out_dir``: model, optimiser, step, numpy and
torch RNG states, loss history, elapsed time) are written atomically every
``checkpoint_every`` steps; ``resume=True`` continues from the last one.
The model folder (``weights.pt`` + ``model_card.json``) is written at the end.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import InvalidInputError, ShapeMismatchError
from .hf import high_frequency, hf_radius
from .masks import random_training_mask
from ..io import atomic_write_file
from .modelio import default_card, save_model_folder
from .inference import resolve_device

__all__ = ["train_model", "CHECKPOINT_NAME"]

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"


def _crop_slices(shape, patch, centre, rng):
    sl = []
    for n, p, c in zip(shape, patch, centre):
        p = min(int(p), n)
        lo = int(c) - p // 2 + int(rng.integers(-(p // 4), p // 4 + 1))
        lo = min(max(lo, 0), n - p)
        sl.append(slice(lo, lo + p))
    return tuple(sl)


def _load_init_weights(net: torch.nn.Module, model_dir) -> dict:
    """Copy the weights of model folder ``model_dir`` into ``net`` (same architecture)."""
    from .modelio import WEIGHTS_NAME, load_model_card

    card = load_model_card(model_dir)
    if dict(card.get("network") or {}) != dict(net.config()):
        raise InvalidInputError(
            f"init_from {model_dir}: its network {card.get('network')} differs from this run's "
            f"{net.config()} (same --features and norm needed to fine-tune)")
    state = torch.load(Path(model_dir) / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    tr = card.get("training") or {}
    log.info("starting from the weights of %s (%s)", model_dir, card.get("model_id"))
    return {"model_id": card.get("model_id"), "contrast": card.get("contrast"),
            "steps": tr.get("steps"), "path": str(model_dir)}


def _untrimmed(sq: torch.Tensor, brain: torch.Tensor, trim: float) -> torch.Tensor:
    """Weights (1/0) that leave out, per volume, the ``trim`` share of the brain's voxels with
    the largest squared errors (voxels outside the brain are kept: their error is ~0)."""
    keep = torch.ones_like(sq)
    for b in range(sq.shape[0]):
        vals = sq[b][brain[b]]
        if vals.numel() < 2:
            continue
        k = max(1, int(round(vals.numel() * (1.0 - trim))))
        cut = vals.kthvalue(k).values
        keep[b] = torch.where(brain[b] & (sq[b] > cut), 0.0, 1.0)
    return keep


def _checked_pairs(pairs, voxel_size):
    """``(shape, images, brains, hfs)`` of the training pairs: float32 images, bool masks and
    the high-frequency copies, every pair checked (one grid, finite values, a brain)."""
    shape = np.asarray(pairs[0][0]).shape
    images, brains, hfs = [], [], []
    for i, (img, bm) in enumerate(pairs):
        img = np.asarray(img, dtype=np.float32)
        bm = np.asarray(bm).astype(bool)
        if img.shape != shape or bm.shape != shape:
            raise ShapeMismatchError(f"pair {i}: image {img.shape} / mask {bm.shape} differ from grid {shape}")
        if not np.all(np.isfinite(img)) or not bm.any():
            raise InvalidInputError(f"pair {i}: image has NaN/Inf values or the brain mask is empty")
        images.append(img)
        brains.append(bm)
        hfs.append(high_frequency(img, voxel_size=voxel_size))
    return shape, images, brains, hfs


def _draw_batch(images, brains, hfs, rng, *, batch_size: int, voxel_size, patch):
    """One training batch as arrays ``(inputs (B, 2, ...), targets, masks, brains)`` (each
    (B, 1, ...) after the inputs): a volume drawn at random, a fresh training mask (paper 3.5)
    filled with noise, its high-frequency copy, and a random crop around a masked voxel when
    ``patch`` is given. ``rng`` is drawn from in a fixed order, so a resumed run continues the
    same sequence."""
    shape = images[0].shape
    xs, ts, ms, bs = [], [], [], []
    for _ in range(batch_size):
        k = int(rng.integers(len(images)))
        img, bm, hf = images[k], brains[k], hfs[k]
        mask = random_training_mask(bm, rng, voxel_size=voxel_size)
        noise = rng.standard_normal(shape, dtype=np.float32)
        x_hat = np.where(mask, noise, img)
        if patch is not None:
            where = np.argwhere(mask) if mask.any() else np.argwhere(bm)
            centre = where[int(rng.integers(len(where)))]
            sl = _crop_slices(shape, patch, centre, rng)
            x_hat, hf_c, img_c, m_c, b_c = x_hat[sl], hf[sl], img[sl], mask[sl], bm[sl]
        else:
            hf_c, img_c, m_c, b_c = hf, img, mask, bm
        xs.append(np.stack([x_hat, hf_c]))
        ts.append(img_c[None])
        ms.append(m_c[None])
        bs.append(b_c[None])
    return np.stack(xs), np.stack(ts), np.stack(ms), np.stack(bs)


def _masked_loss(out, target, m, brain, trim: float):
    """The paper's loss: mean L2 over the volume plus mean L2 over the masked voxels; with
    ``trim`` > 0 each volume's worst-reconstructed share of its brain is left out of both."""
    sq = (out - target) ** 2
    if trim > 0:
        keep = _untrimmed(sq.detach(), brain, trim)
        m = m * keep
        return (sq * keep).sum() / keep.sum().clamp_min(1.0) + (sq * m).sum() / m.sum().clamp_min(1.0)
    return sq.mean() + (sq * m).sum() / m.sum().clamp_min(1.0)


def _training_card(net, *, shape, voxel_size, contrast, n_subjects, steps_done, steps, batch_size, lr, patch,
                   trim, init_info, seed, losses, log_every, wall, device, card_extra) -> dict:
    """The model card of a finished run: the default card for the grid, the network, and
    how it was trained (``card_extra`` merged in, dict sections key by key)."""
    card = default_card(shape, voxel_size, contrast=contrast)
    card["model_id"] = f"{contrast.lower()}-unet3d-{'-'.join(str(f) for f in net.features)}-s{steps_done}"
    card["hf"]["radius"] = list(hf_radius(shape, voxel_size))
    card["network"] = net.config()
    card["training"] = {
        "data": "list of (image, brain_mask) volumes on the model grid, z-scored",
        "subjects": n_subjects, "steps": steps_done, "steps_planned": steps, "batch_size": batch_size, "lr": lr,
        "optimizer": "Adam", "patch": list(patch) if patch else None,
        "loss": "mean L2 over crop + mean L2 over masked voxels"
                + (f", each without the worst {100 * trim:g} % of the volume's voxels" if trim > 0 else ""),
        "masks": "random_training_mask (Gaussian point cloud, factors 2/4/8 p=1/4,1/2,1/4), fresh every step",
        "init_from": init_info,
        "seed": seed, "final_loss": float(np.mean(losses[-max(1, log_every):])) if losses else None,
        "wall_time_s": round(wall, 1),
        "machine": f"{platform.platform()}; {platform.processor() or platform.machine()}; "
                   f"cpus={os.cpu_count()}; torch_threads={torch.get_num_threads()}; device={device}",
        "torch": torch.__version__,
    }
    if card_extra:
        for key, val in card_extra.items():
            if isinstance(val, Mapping) and isinstance(card.get(key), dict):
                card[key] = {**card[key], **val}
            else:
                card[key] = val
    return card


def train_model(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    out_dir,
    *,
    steps: int,
    batch_size: int = 2,
    lr: float = 1e-3,
    patch: Sequence[int] | int | None = None,
    seed: int = 0,
    resume: bool = True,
    card_extra: Mapping[str, Any] | None = None,
    log_every: int = 10,
    checkpoint_every: int | None = None,
    device: str = "auto",
    features: Sequence[int] | None = None,
    voxel_size: Sequence[float] = (2.0, 2.0, 2.0),
    contrast: str = "T1w",
    norm: str = "batch",
    init_from=None,
    time_budget_s: float | None = None,
    trim: float = 0.0,
) -> dict:
    """Train a UNet3D reconstructor and write a model folder.

    Parameters
    ----------
    pairs : list of (image, brain_mask)
        Volumes already on the model grid (all the same shape) and z-scored.
    out_dir : path
        Receives ``checkpoint.pt`` during training and the model folder at the end.
    steps : int
        Total optimiser steps (a resumed run continues up to this number).
    batch_size : int
    lr : float
        Adam learning rate (paper: 1e-3).
    patch : int or 3 ints, optional
        Random crop size (the network is fully convolutional); None = whole volume.
    seed : int
        Seeds the network initialisation and the data generator (once per run).
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` when it exists.
    card_extra : dict, optional
        Merged into the model card (e.g. training data description).
    log_every, checkpoint_every : int
        Logging and checkpoint periods in steps (checkpoint default: steps // 10).
    device : str
    features : channel widths (default ``UNet3D`` default)
    voxel_size, contrast : written to the model card.
    init_from : path, optional
        Model folder whose weights start a fresh run (fine-tuning, e.g. a T2w model from the
        T1w one); its network must equal this run's (``features``, ``norm``). Ignored when
        resuming from a checkpoint. Recorded in the card as ``training.init_from``.
    time_budget_s : float, optional
        Stop after this many seconds of training (counting earlier resumed calls) even if
        ``steps`` is not reached; the card records the steps actually taken.
    trim : float
        Share (0 <= trim < 0.5) of each volume's worst-reconstructed voxels left out of the
        loss: a robust loss for data that may hold artifacts the model must not learn as
        normal (adapting on a site's own, unlabelled scans). 0 = the paper's loss.

    Returns
    -------
    dict
        ``model_dir``, ``start_step``, ``steps``, ``losses`` (per step, this call
        and earlier resumed ones), ``final_loss``, ``wall_time_s``.
    """
    from qc_pipeline.models.unet import DEFAULT_FEATURES, UNet3D

    if not pairs:
        raise InvalidInputError("train_model needs at least one (image, brain_mask) pair")
    if steps < 1 or batch_size < 1:
        raise InvalidInputError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not 0.0 <= float(trim) < 0.5:
        raise InvalidInputError(f"trim must be in [0, 0.5), got {trim}")
    shape, images, brains, hfs = _checked_pairs(pairs, voxel_size)
    if patch is None:
        patch_t = None
    else:
        patch_t = tuple(int(patch) for _ in range(3)) if np.isscalar(patch) else tuple(int(p) for p in patch)
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME
    checkpoint_every = int(checkpoint_every or max(1, steps // 10))

    torch.manual_seed(int(seed))
    net = UNet3D(2, 1, tuple(features or DEFAULT_FEATURES), norm=norm).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(int(seed))
    start_step, losses, elapsed_before = 0, [], 0.0
    init_info = None
    if init_from is not None:
        init_info = _load_init_weights(net, init_from)
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        rng.bit_generator.state = ck["numpy_rng"]
        torch.set_rng_state(ck["torch_rng"])
        start_step, losses = int(ck["step"]), list(ck["losses"])
        elapsed_before = float(ck.get("elapsed_s", 0.0))
        log.info("resuming from %s at step %d", ckpt_path, start_step)

    def save_checkpoint(step: int, elapsed: float) -> None:
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                 "losses": losses, "elapsed_s": elapsed, "seed": seed}
        atomic_write_file(ckpt_path, lambda tmp: torch.save(state, tmp))

    bar = None
    if sys.stderr.isatty() and start_step < steps:
        try:
            from tqdm import tqdm
            bar = tqdm(total=steps, initial=start_step, desc="train", unit="step")
        except ImportError:  # pragma: no cover
            bar = None
    net.train()
    t0 = time.perf_counter()
    last_step = start_step
    for step in range(start_step, steps):
        if time_budget_s is not None and elapsed_before + time.perf_counter() - t0 >= time_budget_s:
            log.info("time budget of %.0f s reached at step %d of %d", time_budget_s, step, steps)
            break
        xs, ts, ms, bs = _draw_batch(images, brains, hfs, rng, batch_size=batch_size, voxel_size=voxel_size,
                                     patch=patch_t)
        loss = _masked_loss(net(torch.from_numpy(xs).to(dev)), torch.from_numpy(ts).to(dev),
                            torch.from_numpy(ms).to(dev).float(), torch.from_numpy(bs).to(dev), trim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        done = last_step = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if done % max(1, log_every) == 0 or done == steps:
            el = time.perf_counter() - t0
            rate = (done - start_step) / max(el, 1e-9)
            recent = losses[-max(1, log_every):]
            log.info("step %d/%d loss %.5f (mean of last %d) %.2f steps/s eta %.0fs", done, steps,
                     float(np.mean(recent)), len(recent), rate, (steps - done) / max(rate, 1e-9))
        if done % checkpoint_every == 0 or done == steps:
            save_checkpoint(done, elapsed_before + time.perf_counter() - t0)
    if last_step != start_step and last_step % checkpoint_every and last_step != steps:
        save_checkpoint(last_step, elapsed_before + time.perf_counter() - t0)  # stopped by the budget
    if bar is not None:
        bar.close()
    wall = elapsed_before + time.perf_counter() - t0
    net.eval()
    card = _training_card(net, shape=shape, voxel_size=voxel_size, contrast=contrast, n_subjects=len(images),
                          steps_done=last_step, steps=steps, batch_size=batch_size, lr=lr, patch=patch_t,
                          trim=trim, init_info=init_info, seed=seed, losses=losses, log_every=log_every,
                          wall=wall, device=dev, card_extra=card_extra)
    save_model_folder(out_dir, net.cpu(), card)
    return {"model_dir": out_dir, "start_step": start_step, "steps": last_step, "losses": losses,
            "final_loss": losses[-1] if losses else None, "wall_time_s": wall}
