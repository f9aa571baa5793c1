"""Figures of the pages, drawn from the derivatives only, and their cache.

matplotlib (Agg) draws from the anomaly mask and the error map named by ``mask_file`` /
``error_map_file`` in ``<source>_qc.json``; the scan itself is the background only when the
qc.json names one that exists (``background_file`` or ``source_file``); otherwise the error
map is. Figures are cached as ``sub-<label>/figures/<bids_name>_desc-<kind>.png`` and reused
while newer than their inputs, so that the group level can re-render every subject page
cheaply.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from ..derivatives import QCRecord, normalise_bids_name, site_mask_path
from ..io import atomic_write_bytes, atomic_write_text
from ..preproc import largest_component

LOGGER = logging.getLogger(__name__)

#: bumped when the drawing of cached figures changes, so that older cached figures are redrawn
FIGURE_VERSION = 3

#: overlay: saturated red fill plus a yellow outline (visible on a thumbnail on grey)
OVERLAY_RGBA = (1.0, 0.08, 0.08, 0.6)
OUTLINE_COLOR = "#ffe600"


# --------------------------------------------------------------------------- figures
def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor(), pil_kwargs={"compress_level": 4})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        try:
            matplotlib.use("Agg", force=True)
        except Exception:  # pragma: no cover - backend already fixed by the host app
            pass
    import matplotlib.pyplot as plt

    return plt


def _load_canonical(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) > 3:
        img = img.slicer[..., 0]
    img = nib.as_closest_canonical(img)
    # contiguous: the canonical view may be flipped, and slicing a flipped view is slow
    return np.ascontiguousarray(img.dataobj, dtype=np.float32), img


def head_mask(background: np.ndarray, error: np.ndarray | None = None,
              mask: np.ndarray | None = None) -> np.ndarray:
    """Where the head is, so that every mosaic tile cuts through it.

    The error map's non-zero voxels when it covers less than 90 % of the grid (the engine
    writes it inside the brain only); otherwise the background above 15 % of its 99th
    percentile, as its largest connected piece with holes filled (a real scan's noise
    fills the whole field of view, and ``!= 0`` would spread the slices into the air).
    The anomaly mask is always included.
    """
    from scipy import ndimage

    bg = np.nan_to_num(np.asarray(background, dtype=np.float32))
    region = None
    if error is not None:
        e = np.isfinite(error) & (np.asarray(error) != 0)
        if e.any() and e.mean() < 0.9:
            region = e
    if region is None:
        nonzero = bg != 0
        if nonzero.mean() < 0.9:
            region = nonzero
        else:
            vals = np.abs(bg[nonzero])
            cut = 0.15 * float(np.percentile(vals, 99)) if vals.size else 0.0
            region = np.abs(bg) > cut
            if region.any():
                region = ndimage.binary_fill_holes(largest_component(region))
    if mask is not None:
        region = region | np.asarray(mask, dtype=bool)
    return region


def choose_slices(mask: np.ndarray | None, brain: np.ndarray, n: int = 5) -> tuple[list[list[int]], tuple[int, int, int], bool]:
    """Slices per axis: the centre slice goes through the anomaly when there is one.

    Returns ``(slices_per_axis, centre, through_anomaly)``; each axis gets ``n`` slices
    spread over the brain's extent, one of them exactly through ``centre``.
    """
    from scipy import ndimage

    shape = brain.shape
    has_anomaly = mask is not None and bool(mask.any())
    if has_anomaly:
        comp = largest_component(mask)
        centre = tuple(int(round(c)) for c in ndimage.center_of_mass(comp))
        # snap to a voxel of the component so the slice really cuts the anomaly
        idx = np.argwhere(comp)
        centre = tuple(idx[np.argmin(((idx - np.array(centre)) ** 2).sum(1))])
    elif brain.any():
        centre = tuple(int(round(c)) for c in ndimage.center_of_mass(brain))
    else:
        centre = tuple(s // 2 for s in shape)
    out = []
    for ax in range(3):
        nz = np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != ax)))[0]
        lo, hi = (int(nz[0]), int(nz[-1])) if nz.size else (0, shape[ax] - 1)
        c = int(np.clip(centre[ax], 0, shape[ax] - 1))
        half = n // 2
        below = np.linspace(lo + 0.15 * (c - lo), c, half + 1)[:-1] if c > lo else []
        above = np.linspace(c, hi - 0.15 * (hi - c), half + 1)[1:] if hi > c else []
        sl = sorted({int(round(v)) for v in below} | {c} | {int(round(v)) for v in above})
        out.append(sl)
    return out, tuple(int(c) for c in centre), has_anomaly


def display_window(background: np.ndarray, head: np.ndarray) -> tuple[float, float]:
    """Grey-level window of a scan: its 1st to 99.5th percentile inside the head."""
    vals = background[head] if head.any() else background.ravel()
    if not vals.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, [1, 99.5]))
    return lo, hi if hi > lo else lo + 1.0


def _tile_index(n_vox: int, zoom: float, scale: float) -> np.ndarray:
    """Nearest-neighbour index map: ``n_vox`` voxels of ``zoom`` mm at ``scale`` px/mm."""
    n_px = max(1, int(round(n_vox * zoom * scale)))
    return np.minimum((np.arange(n_px) / (zoom * scale)).astype(int), n_vox - 1)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: bundled font, no system fonts
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def _outline(m: np.ndarray, width: int = 1) -> np.ndarray:
    from scipy import ndimage

    grown = ndimage.binary_dilation(m, iterations=width)
    return grown & ~m


def _tile_rgb(background: np.ndarray, mask: np.ndarray | None, ax: int, k: int, zooms, scale: float,
              lut, window: tuple[float, float]) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One slice as an RGB tile (superior/anterior up) with the anomaly overlay, and the
    centre of a ring to draw around an anomaly too small to see (None otherwise)."""
    lo, hi = window
    other = [a for a in range(3) if a != ax]
    ci = _tile_index(background.shape[other[0]], zooms[other[0]], scale)
    ri = _tile_index(background.shape[other[1]], zooms[other[1]], scale)[::-1]
    img = np.take(background, k, axis=ax)[np.ix_(ci, ri)].T  # rows: superior first
    rgb = lut(np.clip((img - lo) / (hi - lo), 0, 1))[..., :3] * 255
    ring = None
    if mask is not None:
        m = np.take(mask, k, axis=ax)[np.ix_(ci, ri)].T
        if m.any():
            fill = np.array(OVERLAY_RGBA[:3]) * 255
            alpha = OVERLAY_RGBA[3]
            rgb[m] = (1 - alpha) * rgb[m] + alpha * fill
            rgb[_outline(m, 2)] = [int(OUTLINE_COLOR[i:i + 2], 16) for i in (1, 3, 5)]
            if m.sum() < 150:  # under ~12x12 px: ring it
                ys, xs = np.nonzero(m)
                ring = (xs.mean(), ys.mean())
    return rgb.astype(np.uint8), ring


def worst_slice(mask: np.ndarray | None, error: np.ndarray | None, head: np.ndarray, axis: int = 2) -> int:
    """The slice along ``axis`` a rater should see first: through the largest anomaly when
    there is one, else the one with the highest mean error inside the head, else the
    head's centre."""
    from scipy import ndimage

    if mask is not None and mask.any():
        _, centre, _ = choose_slices(mask, head)
        return int(centre[axis])
    other = tuple(a for a in range(3) if a != axis)
    if error is not None and head.any():
        err = np.where(head, np.nan_to_num(np.abs(error)), 0.0)
        n = head.sum(axis=other)
        mean = np.where(n > 0.2 * max(1, n.max()), err.sum(axis=other) / np.maximum(n, 1), -1.0)
        if mean.max() > 0:
            return int(np.argmax(mean))
    if head.any():
        return int(round(ndimage.center_of_mass(head)[axis]))
    return head.shape[axis] // 2


def thumbnail_png(background: np.ndarray, mask: np.ndarray | None, zooms, k: int, *, axis: int = 2,
                  px: int = 160, window=None) -> str:
    """One slice (axial by default) with the anomaly overlay as a small PNG data URI."""
    import matplotlib
    from PIL import Image, ImageDraw

    background = np.nan_to_num(np.asarray(background, dtype=np.float32))
    if window is None:
        window = display_window(background, head_mask(background, mask=mask))
    lo, hi = window
    if hi <= lo:
        hi = lo + 1.0
    zooms = [float(z) if z and np.isfinite(z) and z > 0 else 1.0 for z in zooms[:3]]
    scale = px / max(n * z for n, z in zip(background.shape, zooms))
    k = int(np.clip(k, 0, background.shape[axis] - 1))
    rgb, ring = _tile_rgb(background, mask, axis, k, zooms, scale, matplotlib.colormaps["gray"], (lo, hi))
    canvas = Image.fromarray(rgb)
    if ring is not None:
        draw = ImageDraw.Draw(canvas)
        r = 0.14 * rgb.shape[1]
        draw.ellipse([ring[0] - r, ring[1] - r, ring[0] + r, ring[1] + r], outline=OUTLINE_COLOR, width=2)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def mosaic_png(background: np.ndarray, mask: np.ndarray | None, zooms, *, title: str = "",
               cmap: str = "gray", overlay: bool = True, window=None, colorbar_label: str | None = None,
               slices=None, tile_px: int = 150) -> str:
    """Three-orientation mosaic (rows: sagittal, coronal, axial) as a PNG data URI.

    Drawn with NumPy + Pillow (one image, no matplotlib axes: ~20x faster). The anomaly
    mask is a saturated red fill (60% opacity) with a 2-px yellow outline drawn at display
    resolution; anomalies smaller than 150 px (~12x12) on a tile are also ringed, so a few-voxel
    anomaly stays visible on a thumbnail. The slice through the anomaly is marked ``*``.
    """
    import matplotlib
    from PIL import Image, ImageDraw

    background = np.nan_to_num(np.asarray(background, dtype=np.float32))
    brain = head_mask(background, mask=mask) if slices is None or window is None else None
    if slices is None:
        slices, centre, through = choose_slices(mask, brain)
    else:
        slices, centre, through = slices
    if window is None:
        window = display_window(background, brain)
    lo, hi = window
    if hi <= lo:
        hi = lo + 1.0
    zooms = [float(z) if z and np.isfinite(z) and z > 0 else 1.0 for z in zooms[:3]]
    extent_mm = max(n * z for n, z in zip(background.shape, zooms))
    scale = tile_px / extent_mm
    lut = matplotlib.colormaps[cmap]
    outline_rgb = np.array([int(OUTLINE_COLOR[i:i + 2], 16) for i in (1, 3, 5)], float)
    names = ("sagittal", "coronal", "axial")
    pad, label_h, title_h = 4, 16, 18 if title else 0
    bar_w = 60 if colorbar_label is not None else 0
    ncol = max(len(sl) for sl in slices)
    tiles = []
    for ax in range(3):
        row = []
        for k in slices[ax]:
            rgb, ring = _tile_rgb(background, mask if overlay else None, ax, k, zooms, scale, lut, (lo, hi))
            row.append((rgb, k, ring))
        tiles.append(row)
    tw = max(t[0].shape[1] for row in tiles for t in row)
    th = [max(t[0].shape[0] for t in row) for row in tiles]
    W = pad + ncol * (tw + pad) + bar_w
    H = title_h + sum(h + label_h + pad for h in th) + pad
    canvas = Image.new("RGB", (W, H), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    if title:
        draw.text((pad, 3), title, fill=(235, 235, 235), font=_font(12))
    y = title_h
    for ax, row in enumerate(tiles):
        for j, (rgb, k, ring) in enumerate(row):
            x = pad + j * (tw + pad)
            h, w = rgb.shape[:2]
            ox, oy = x + (tw - w) // 2, y + label_h + (th[ax] - h) // 2
            canvas.paste(Image.fromarray(rgb), (ox, oy))
            here = through and k == centre[ax]
            draw.text((x + 2, y + 1), f"{names[ax][:3]} {k}" + (" *" if here else ""),
                      fill=tuple(int(c) for c in outline_rgb) if here else (190, 190, 190), font=font)
            if ring is not None:
                r = 0.14 * tw
                cx, cy = ox + ring[0], oy + ring[1]
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=tuple(int(c) for c in outline_rgb), width=2)
        y += th[ax] + label_h + pad
    if colorbar_label is not None:
        x0, y0, y1 = W - bar_w + 8, title_h + label_h + 4, H - 30
        grad = lut(np.linspace(1, 0, max(2, y1 - y0)))[:, :3] * 255
        bar = np.repeat(grad[:, None, :], 12, axis=1).astype(np.uint8)
        canvas.paste(Image.fromarray(bar), (x0, y0))
        draw.text((x0, y0 - 13), f"{hi:.3g}", fill=(235, 235, 235), font=font)
        draw.text((x0, y1 + 2), f"{lo:.3g}", fill=(235, 235, 235), font=font)
        draw.text((x0 - 4, y1 + 15), colorbar_label[:12], fill=(190, 190, 190), font=_font(9))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", compress_level=4)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def error_map_png(error: np.ndarray, mask: np.ndarray | None, zooms, slices) -> str:
    """Error map mosaic (inferno colour scale) on the same slices."""
    err = np.nan_to_num(np.asarray(error, dtype=np.float32))
    vals = err[err != 0]
    hi = float(np.percentile(vals, 99.5)) if vals.size else 1.0
    return mosaic_png(err, mask, zooms, cmap="inferno", overlay=False, window=(0.0, hi or 1.0),
                      colorbar_label="error", slices=slices, title="reconstruction error map")


def tau_curve_png(data: dict) -> str | None:
    """tau(t) points, the fitted a*tan(b*t) and tau_stop; None when there is no curve."""
    curve = data.get("tau_curve") or []
    try:
        pts = np.array([[float(p[0]), float(p[1])] for p in curve], dtype=float)
    except (TypeError, ValueError, IndexError):
        return None
    if pts.size == 0:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.0), dpi=80, facecolor="white")
    ax.plot(pts[:, 0], pts[:, 1], "o", ms=3.5, color="#6a3d9a", label="tau(t) measured")
    fit = data.get("fit") or {}
    tau_stop = data.get("tau_stop")
    try:
        a, b = float(fit.get("a")), float(fit.get("b"))
    except (TypeError, ValueError):
        a = b = math.nan
    path = str(fit.get("path", ""))
    if math.isfinite(a) and math.isfinite(b) and b != 0:
        t_max = pts[:, 0].max()
        if b > 0:  # stay left of the pole at pi/(2b)
            t_max = min(t_max, 0.98 * math.pi / (2 * b))
        t = np.linspace(max(0.0, pts[:, 0].min()), t_max, 200)
        r2 = fit.get("r2")
        lbl = f"fit a*tan(b*t): a={a:.3g}, b={b:.3g}" + (f", R²={float(r2):.3f}" if r2 is not None else "")
        if path and path != "tan":
            lbl += f" [{path}]"
        ax.plot(t, a * np.tan(b * t), "-", color="#e31a1c", lw=1.5, label=lbl)
    try:
        ts = float(tau_stop)
    except (TypeError, ValueError):
        ts = math.nan
    if math.isfinite(ts):
        ax.axhline(ts, color="#1f78b4", ls="--", lw=1.2, label=f"tau_stop = {ts:.3g}")
        if math.isfinite(a) and math.isfinite(b) and a != 0 and b != 0:
            t_stop = math.atan(ts / a) / b
            if math.isfinite(t_stop) and t_stop >= 0:
                ax.axvline(t_stop, color="#1f78b4", ls=":", lw=1.0)
                ax.plot([t_stop], [ts], "D", color="#1f78b4", ms=6)
    top = np.nanmax(pts[:, 1])
    if math.isfinite(ts):
        top = max(top, ts)
    ax.set_ylim(bottom=min(0.0, np.nanmin(pts[:, 1])), top=top * 1.15 if top > 0 else None)
    ax.set_xlabel("iteration t (mask shrunk 1% of brain per step)", fontsize=8)
    ax.set_ylabel("threshold tau", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6.5, loc="upper left", frameon=False)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.13, right=0.98, bottom=0.15, top=0.97)
    return _png_uri(fig)


def _fresh(cache: Path, inputs: list[Path]) -> bool:
    try:
        return cache.is_file() and all(cache.stat().st_mtime >= p.stat().st_mtime for p in inputs)
    except OSError:
        return False


def _cached(cache: Path, inputs: list[Path], make, *, redraw: bool = False) -> str | None:
    """PNG data URI from ``cache`` when newer than every input (and not ``redraw``), else
    ``make()`` (and store)."""
    if not redraw and _fresh(cache, inputs):
        try:
            return "data:image/png;base64," + base64.b64encode(cache.read_bytes()).decode("ascii")
        except OSError:
            pass
    uri = make()
    if uri is None:
        return None
    try:
        atomic_write_bytes(base64.b64decode(uri.split(",", 1)[1]), cache)
    except OSError as exc:  # read-only derivatives: fine, just no cache
        LOGGER.debug("figure cache %s not written: %s", cache, exc)
    return uri


def figure_place(output_dir: Path, rec: QCRecord) -> tuple[Path, str]:
    """The folder of a scan's cached figures and their file-name stem."""
    return (output_dir / f"sub-{rec.subject}" / "figures",
            re.sub(r"[^A-Za-z0-9._-]+", "_", normalise_bids_name(rec.bids_name)))


def air_window(background: np.ndarray, head: np.ndarray) -> tuple[float, float]:
    """A display window that shows the air around the head: white at 15 % of the head's
    99th percentile, so ghosts and wrap-around (typically 5-20 % of the brain's signal)
    stand out of the noise (a few %), which the head's own window renders black."""
    vals = np.abs(background[head]) if head.any() else np.abs(background.ravel())
    top = 0.15 * float(np.percentile(vals, 99)) if vals.size else 1.0
    return 0.0, top if top > 0 else 1.0


def site_mask_of(rec: QCRecord, site_anomaly_fraction) -> Path | None:
    """The scan's mask against its site's scans when the group table has its
    ``site_anomaly_fraction`` (a file left from an earlier group run is not used)."""
    try:
        ok = math.isfinite(float(site_anomaly_fraction))
    except (TypeError, ValueError):
        return None
    p = site_mask_path(rec.path, rec.bids_name)
    return p if ok and p.is_file() else None


def scan_figures(rec: QCRecord, output_dir: Path, *, site_mask: Path | None = None) -> dict:
    """Figures of one scan as PNG data URIs, plus notes.

    ``mosaic`` (the anomaly overlaid), ``plain`` (the same slices without overlay), ``air``
    (the scan with the window raised to show the background; only when the scan itself is
    the background), ``error`` (error map), ``tau`` (the curve) and ``thumb`` (one axial
    slice through the worst place, for the overview).

    The overlay is the participant level's mask, or ``site_mask`` (:func:`site_mask_of`)
    after the group level: the engine against the site's own scans, which leaves a clean
    brain empty and outlines a lesion (``docs/benchmarks.md``) where the participant mask
    also keeps what the network gets wrong on every brain of the site.
    """
    kinds = ("mosaic", "plain", "air", "error", "thumb")
    out = {"tau": None, "notes": [], "background": None, **{k: None for k in kinds}}
    err_p = rec.resolve("error_map_file")
    overlay = "site" if site_mask is not None else "scan"
    mask_p = site_mask if site_mask is not None else rec.resolve("mask_file")
    bg_p = rec.resolve("background_file") or rec.resolve("source_file") or rec.resolve("source_path")
    figdir, name = figure_place(output_dir, rec)
    out["tau"] = _cached(figdir / f"{name}_desc-tau.png", [rec.path], lambda: tau_curve_png(rec.data)) \
        if rec.data.get("tau_curve") else None
    if err_p is None and mask_p is None:
        if rec.ok:
            out["notes"].append("no anomaly mask or error map file found: no slice figures")
        return out
    inputs = [rec.path] + [p for p in (mask_p, err_p, bg_p) if p is not None]
    cache = {k: figdir / f"{name}_desc-{'errormap' if k == 'error' else k}.png" for k in kinds}
    meta_p = figdir / f"{name}_desc-figures.json"
    if _fresh(meta_p, inputs):
        try:
            meta = json.loads(meta_p.read_text(encoding="utf-8"))
            if meta.get("figure_version") != FIGURE_VERSION or meta.get("overlay", "scan") != overlay:
                raise KeyError("figure_version")
            out.update({k: meta[k] for k in ("notes", "background", "through_anomaly")})
            for k in meta["drawn"]:
                out[k] = _cached(cache[k], inputs, lambda: None)
            if all(out[k] for k in meta["drawn"]):
                return out
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        mask = err = bg = None
        zooms = (1.0, 1.0, 1.0)
        shape = None
        if mask_p is not None:
            m, img = _load_canonical(mask_p)
            mask, zooms, shape = m > 0.5, img.header.get_zooms()[:3], m.shape
        if err_p is not None:
            e, img = _load_canonical(err_p)
            if shape is None or e.shape == shape:
                err, zooms, shape = e, img.header.get_zooms()[:3], e.shape
            else:
                out["notes"].append(f"error map shape {e.shape} differs from mask {shape}: not shown")
        if bg_p is not None:
            try:
                b, _ = _load_canonical(bg_p)
                if shape is None or b.shape == shape:
                    bg = b
                    out["background"] = "scan"
                else:
                    out["notes"].append("scan grid differs from the derivatives: error map used as background")
            except Exception as exc:  # noqa: BLE001 - a bad source must not sink the page
                out["notes"].append(f"scan not readable ({exc.__class__.__name__}): error map used as background")
        if bg is None:
            if err is None:
                bg = mask.astype(np.float32)
                out["background"] = "mask"
            else:
                bg = err
                out["background"] = "error map"
                out["notes"].append("source scan not available: the error map is the background")
        head = head_mask(bg, err, mask)
        sl = choose_slices(mask, head)
        # one window for the scan's figures (the head in the scan's own grey levels)
        win = display_window(bg, head_mask(bg, mask=mask)) if out["background"] == "scan" else None
        title = {"scan": "scan with anomaly mask", "error map": "error map (grey) with anomaly mask",
                 "mask": "anomaly mask"}[out["background"]]
        if overlay == "site":
            title += " against this site's scans"
            out["notes"].append("overlay: the engine's mask against this site's other scans (group level); "
                                "the participant level's own mask is the mask_file below")
        plain = {"scan": "scan", "error map": "error map (grey)", "mask": "anomaly mask"}[out["background"]]
        make = {
            "mosaic": lambda: mosaic_png(bg, mask, zooms, title=title, slices=sl, window=win),
            "plain": lambda: mosaic_png(bg, None, zooms, title=f"{plain}, no overlay", slices=sl, window=win),
            "error": (lambda: error_map_png(err, mask, zooms, sl)) if err is not None else None,
            "air": ((lambda: mosaic_png(bg, None, zooms, slices=sl, window=air_window(bg, head),
                                        title="scan, window raised to show the background"))
                    if out["background"] == "scan" else None),
            "thumb": lambda: thumbnail_png(bg, mask, zooms, worst_slice(mask, err, head), window=win),
        }
        drawn = [k for k in kinds if make[k] is not None]
        for k in drawn:
            out[k] = _cached(cache[k], inputs, make[k], redraw=True)
        out["through_anomaly"] = sl[2]
        if all(out[k] for k in drawn):
            try:
                atomic_write_text(json.dumps({"figure_version": FIGURE_VERSION, "drawn": drawn, "overlay": overlay,
                                              **{k: out[k] for k in ("notes", "background", "through_anomaly")}}),
                                  meta_p)
            except OSError:
                pass
    except Exception as exc:  # noqa: BLE001 - report what failed, keep the page
        LOGGER.warning("figures for %s failed: %s", rec.bids_name, exc)
        out["notes"].append(f"figures could not be drawn: {exc.__class__.__name__}: {exc}")
    return out
