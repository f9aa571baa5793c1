"""HTML reports: per-subject pages and the group page (jinja2, self-contained).

Every page embeds its figures as base64 PNG ``data:`` URIs and its CSS/JS inline, uses no
external font or URL, and opens from a USB stick without network. Templates live in
``qc_pipeline.templates`` (``templates/`` in the repository) and are rendered with
autoescaping on, so labels and metadata such as ``<script>`` show as text.

Figures are drawn with matplotlib (Agg) from the derivatives only: the anomaly mask and the
error map named by ``mask_file`` / ``error_map_file`` in ``<source>_qc.json``; the scan
itself is used as background only when the qc.json names one that exists (``background_file``
or ``source_file``); otherwise the error map is the background. Rendered figures are cached
as ``sub-<label>/figures/<bids_name>_desc-<kind>.png`` and reused while newer than their
inputs, so that the group level can re-render every subject page cheaply.
"""
from __future__ import annotations

import base64
import datetime as _dt
import functools
import io
import json
import logging
import math
import re
from importlib import resources
from pathlib import Path

import numpy as np
from markupsafe import Markup

from . import __version__
from . import metrics as _metrics
from .derivatives import QCRecord, load_qc_records, normalise_bids_name
from .group import POOLED_SITE, GroupTables, read_group_csv
from .derivatives import one_line, read_qc, site_mask_path
from .io import atomic_write_bytes, atomic_write_text
from .morphology import largest_component

__all__ = [
    "write_group_pages",
    "render_overview",
    "study_key",
    "write_subject_report",
    "write_subject_page",
    "fallback_subject_report",
    "render_subject_report",
    "render_group_report",
    "mosaic_png",
    "error_map_png",
    "tau_curve_png",
    "ARTIFACT_CHOICES",
    "MEASURE_WORDS",
    "describe_measure",
    "scan_anchor",
    "head_mask",
    "worst_slice",
    "thumbnail_png",
    "air_window",
    "scan_verdict",
    "ranking_score",
    "strip_plot_svg",
    "group_plots",
]

LOGGER = logging.getLogger(__name__)

#: artifact checklist offered in each scan's rating control
ARTIFACT_CHOICES = ("motion", "ghosting/wrap-around", "metal/susceptibility", "missing or cut-off brain",
                    "noise", "intensity inhomogeneity", "spike/zipper", "other")

#: each QC-score measurement in a rater's words, and the artifact tag it most often points to
MEASURE_WORDS: dict[str, tuple[str, str]] = {
    "anomaly_fraction": ("a region of the brain the model cannot reconstruct (lesion, artifact or missing tissue)",
                         "other"),
    "recon_error": ("the whole brain looks unlike a clean scan to the model", "other"),
    "anomaly_cluster_fraction": ("one large abnormal region inside the brain", "other"),
    "signal_deficit": ("missing or cut-off brain (field of view, signal dropout)", "missing or cut-off brain"),
    "signal_void": ("dark signal voids in the brain (metal / susceptibility)", "metal/susceptibility"),
    "nonuniformity": ("intensity inhomogeneity (bias field, coil shading)", "intensity inhomogeneity"),
    "background_artifact_fraction": ("ghosting / wrap-around in the background", "ghosting/wrap-around"),
    "sharpness": ("blurring (motion or low resolution)", "motion"),
    "axis_sharpness": ("blurring along one axis (thick slices or through-plane motion)", "motion"),
    "noise": ("noise in the brain", "noise"),
    "snr": ("low signal-to-noise ratio", "noise"),
    "spectral_peak": ("spike / zipper stripes (a k-space spike)", "spike/zipper"),
    "line_comb": ("ghosting along the phase-encode direction (motion or pulsation)", "ghosting/wrap-around"),
    "site_anomaly_fraction": ("a region unlike the same place in this site's other scans (the model, "
                              "against the site)", "other"),
}


def describe_measure(name: str | None) -> str:
    """A measurement's name in a rater's words (the name itself when it is not known)."""
    if not name:
        return ""
    return MEASURE_WORDS.get(str(name), (str(name), ""))[0]


def scan_anchor(bids_name: str) -> str:
    """The HTML id of a scan's section (``scan-`` + the name with unsafe characters as ``_``).

    Every page derives a scan's anchor from its name with this one function, so a link
    from the group table or the overview lands on the scan's section.
    """
    return "scan-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(bids_name))


#: bumped when the drawing of cached figures changes, so that older cached figures are redrawn
FIGURE_VERSION = 3

#: the key that toggles each artifact tag in the rating mode (good/questionable/bad: 1/2/3)
ARTIFACT_KEYS = dict(zip(ARTIFACT_CHOICES, ("m", "g", "s", "c", "n", "i", "z", "x")))

#: overlay: saturated red fill plus a yellow outline (visible on a thumbnail on grey)
OVERLAY_RGBA = (1.0, 0.08, 0.08, 0.6)
OUTLINE_COLOR = "#ffe600"


# --------------------------------------------------------------------------- jinja
@functools.lru_cache(maxsize=1)
def _env():
    import jinja2

    folder = resources.files("qc_pipeline.templates")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)),
                             autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    env.filters["anchor"] = scan_anchor
    env.filters["words"] = describe_measure
    return env


def _asset(name: str) -> Markup:
    text = resources.files("qc_pipeline.templates").joinpath(name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():
        raise RuntimeError(f"template asset {name} must not contain a closing script/style tag")
    return Markup(text)


def _num(v, digits: int = 4):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a" if v in (None, "", "n/a") else str(v)
    if math.isnan(f):
        return "n/a"
    if f == int(f) and abs(f) < 1e12:
        return f"{int(f)}"
    return f"{f:.{digits}g}"


def _pct(v, digits: int = 3):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    if math.isnan(f):
        return "n/a"
    return f"{100.0 * f:.{digits}g}%"


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


def _figure_place(output_dir: Path, rec: QCRecord) -> tuple[Path, str]:
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
    figdir, name = _figure_place(output_dir, rec)
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


# --------------------------------------------------------------------------- provenance
def _provenance(output_dir: Path, records: list[QCRecord]) -> dict:
    prov: dict = {"report_version": __version__,
                  "generated": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    dd = output_dir / "dataset_description.json"
    try:
        desc = json.loads(dd.read_text(encoding="utf-8"))
        gen = desc.get("GeneratedBy") or []
        if isinstance(gen, list) and gen:
            g = gen[0]
            prov["generated_by"] = f"{g.get('Name', '')} {g.get('Version', '')}".strip()
            for key in ("CommandLine", "command_line"):
                if g.get(key):
                    prov["command_line"] = g[key]
            if g.get("ModelIds") or g.get("models"):
                prov["model_ids"] = g.get("ModelIds") or g.get("models")
    except (OSError, ValueError, AttributeError):
        pass
    logs = output_dir / "logs"
    if logs.is_dir():
        for p in sorted(logs.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                cfg = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(cfg, dict):
                continue
            for key in ("command_line", "argv", "cmdline"):
                v = cfg.get(key)
                if v:
                    prov.setdefault("command_line", " ".join(v) if isinstance(v, list) else str(v))
            for key in ("started", "start_time", "run_started", "timestamp"):
                if cfg.get(key):
                    prov.setdefault("run_time", str(cfg[key]))
            if "command_line" in prov:
                prov.setdefault("config_file", f"logs/{p.name}")
                break
    for r in records:
        for key in ("command_line", "started", "created"):
            if r.data.get(key) and key == "command_line":
                prov.setdefault("command_line", str(r.data[key]))
            elif r.data.get(key):
                prov.setdefault("run_time", str(r.data[key]))
    # model cards: qc.json "model_card" (dict) or a packaged card with the same id
    cards = {}
    for r in records:
        mid = r.data.get("model_id")
        if not mid or mid in cards:
            continue
        card = (r.data.get("model_card") if isinstance(r.data.get("model_card"), dict)
                else _packaged_card(mid) or _adapted_card(output_dir, mid))
        cards[mid] = _card_summary(card) if card else {"note": "model card not found with the derivatives"}
    prov["models"] = cards
    return prov


def _packaged_card(model_id: str) -> dict | None:
    try:
        root = resources.files("qc_pipeline.models")
        for sub in root.iterdir():
            card = sub / "model_card.json" if sub.is_dir() else None
            if card is not None and card.is_file():
                d = json.loads(card.read_text(encoding="utf-8"))
                if str(d.get("model_id") or d.get("id")) == str(model_id):
                    return d
    except Exception:  # noqa: BLE001 - provenance is best effort
        return None
    return None


def _adapted_card(output_dir: Path, model_id: str) -> dict | None:
    """The card of a model the adapt level wrote beside the derivatives (``models/<suffix>``)."""
    for path in sorted((output_dir / "models").glob("*/model_card.json")):
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and str(d.get("model_id")) == str(model_id):
            return d
    return None


def _card_summary(card: dict) -> dict:
    keys = ("model_id", "id", "contrast", "voxel_size", "grid", "training_data", "n_training",
            "steps", "wall_time", "code_version", "r", "gamma", "schedule", "params")
    out = {}
    for k in keys:
        if k in card and card[k] not in (None, ""):
            v = card[k]
            out[k] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    ad = card.get("adaptation")
    if isinstance(ad, dict):
        out["adapted_from"] = str(ad.get("base_model_id"))
        out["adapted_on"] = (f"{len(ad.get('training_scans') or [])} scans of {ad.get('dataset')} "
                             f"({len(ad.get('excluded_scans') or {})} left out), {ad.get('steps')} steps "
                             f"on {ad.get('device')}")
    return out


# --------------------------------------------------------------------------- subject page
def ranking_score(rows) -> str:
    """The score a group table is ranked by, from its rows: ``qc_score_site`` when every
    successful scan has one, else ``qc_score``, else ``anomaly_fraction`` (the group
    level's own rule, :func:`qc_pipeline.group.compute_suffix_tables`)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    for key in ("qc_score_site", "qc_score"):
        if ok and all(r.get(key) not in (None, "", "n/a") for r in ok):
            return key
    return "anomaly_fraction"


@functools.lru_cache(maxsize=8)
def _group_rows_cached(path: str, stamp: tuple) -> dict:
    return read_group_csv(path)


def _group_rows(path: Path) -> dict:
    """``read_group_csv`` read once per version of the file: every scan's section of every
    subject page looks up the same table."""
    st = path.stat()
    return _group_rows_cached(str(path), (st.st_mtime_ns, st.st_size))


def _group_info(output_dir: Path, rec: QCRecord) -> dict | None:
    """The scan's verdict from ``group_<suffix>.csv`` (score, driver, rank, flags) and its
    neighbours in the ranking; None when the table is absent, ``{"stale": True}`` when it
    no longer matches the qc.json."""
    p = output_dir / f"group_{rec.suffix}.csv"
    if not p.is_file() or not rec.ok:
        return None
    try:
        rows = _group_rows(p)
    except (OSError, KeyError, ValueError):
        return None
    row = rows.get(rec.bids_name)
    if row is None:
        return None
    try:
        frac = float(row.get("anomaly_fraction", "nan"))
    except ValueError:
        return None
    if not math.isclose(frac, rec.fraction, rel_tol=1e-5, abs_tol=1e-12):
        return {"stale": True}
    site = row.get("site", "")
    key = ranking_score(rows.values())
    site_ok = [r for r in rows.values() if r.get("site") == site and r.get("status") == "ok"]
    mine = float(row.get(key) or "nan")
    rank_site = 1 + sum(1 for r in site_ok if float(r[key]) > mine)
    n_all = sum(1 for r in rows.values() if r.get("status") == "ok")
    driver = {"qc_score_site": row.get("qc_score_site_driver"),
              "qc_score": row.get("qc_score_driver")}.get(key) or ""
    rule = bg_rule = ""
    sp = output_dir / f"group_{rec.suffix}_sites.csv"
    if sp.is_file():
        import csv

        with open(sp, encoding="utf-8", newline="") as fh:
            for srow in csv.DictReader(fh):
                if srow.get("site") == site:
                    rule = srow.get("threshold_rule", "")
                    bg_rule = srow.get("background_rule", "") or ""
    return {"stale": False, "site": site, "rank_in_site": rank_site, "n_site": len(site_ok),
            "rank": row.get("rank"), "n_all": n_all,
            "percentile": row.get("percentile_in_site"), "flagged": row.get("flagged") == "1",
            "threshold": row.get("threshold"), "rule": rule, "csv": p.name,
            "page": f"group_{rec.suffix}.html", "score": key, "score_value": row.get(key),
            "driver": driver, "driver_words": describe_measure(driver),
            "background_flagged": row.get("background_flagged") == "1",
            "engine_flagged": row.get("engine_flagged") == "1",
            "score_flagged": row.get("score_flagged") == "1",
            "site_mask": site_mask_of(rec, row.get("site_anomaly_fraction")),
            "background_threshold": row.get("background_threshold"), "background_rule": bg_rule,
            "flag_reasons": row.get("flag_reasons", "") or ""}


def _scan_nav(output_dir: Path, rec: QCRecord) -> dict | None:
    """Links of a scan's section: its row of the group table and its neighbours in the
    ranking (worst first, failed scans last); None before the group level."""
    p = output_dir / f"group_{rec.suffix}.csv"
    try:
        rows = _group_rows(p) if p.is_file() else {}
    except (OSError, KeyError, ValueError):
        rows = {}
    if rec.bids_name not in rows:
        return None
    order = list(rows)  # the CSV is written worst first
    i = order.index(rec.bids_name)

    def link(j: int) -> dict | None:
        if not 0 <= j < len(order):
            return None
        return {"bids_name": order[j], "href": f"{rows[order[j]].get('report', '')}#{scan_anchor(order[j])}"}

    return {"page": f"group_{rec.suffix}.html", "previous": link(i - 1), "next": link(i + 1),
            "position": i + 1, "n": len(order)}


_SCORE_BASIS = {
    "qc_score_site": "robust z against this site's clean scans",
    "qc_score": "robust z against the model's clean reference scans",
    "anomaly_fraction": "share of the brain the model could not reconstruct",
}


def scan_verdict(data: dict, group: dict | None) -> dict:
    """The one verdict a subject page leads with: the number the group table ranks the scan
    by, the measurement that drove it in a rater's words, and the flags.

    Before the group level (or with a stale table) it is the qc.json's own QC score against
    the model's reference, and ``ranked`` is False.
    """
    ranked = bool(group) and not group.get("stale")
    if ranked:
        score, value, driver = group["score"], group["score_value"], group["driver"]
        flagged, bg_flagged = group["flagged"], group["background_flagged"]
        en_flagged = bool(group.get("engine_flagged"))
        # a table without the column (older group level): the score's flag is what is left
        score_flagged = bool(group.get("score_flagged", flagged and not (bg_flagged or en_flagged)))
    else:
        score, value, driver = "qc_score", data.get("qc_score"), data.get("qc_score_driver") or ""
        flagged = bg_flagged = en_flagged = score_flagged = False
        if value is None:
            score, value, driver = "anomaly_fraction", data.get("anomaly_fraction"), ""
    # the flags that fired lead; the score's driver then says why the scan ranks where it does
    fired = ([driver] if score_flagged and driver else []) + \
        (["background_artifact_fraction"] if bg_flagged else []) + (["site_anomaly_fraction"] if en_flagged else [])
    reasons = [describe_measure(d) for d in dict.fromkeys(fired + ([driver] if driver else []))]
    pointers = ([driver] if driver else []) + (["background_artifact_fraction"] if bg_flagged else [])
    tags = [MEASURE_WORDS[d][1] for d in pointers
            if d in MEASURE_WORDS]
    return {"ranked": ranked, "score": score, "value": value, "driver": driver, "reasons": reasons,
            "basis": _SCORE_BASIS[score], "flagged": flagged, "background_flagged": bg_flagged,
            "engine_flagged": en_flagged,
            "tags": sorted(set(tags))}


def _measurements(data: dict, driver: str) -> list[dict]:
    """The QC-score measurements of a qc.json, worst first, each in a rater's words."""
    z = data.get("quality_z") if isinstance(data.get("quality_z"), dict) else {}
    feats = data.get("quality_features") if isinstance(data.get("quality_features"), dict) else {}
    out = []
    for name in sorted(set(z) | set(feats)):
        zv = z.get(name)
        zf = float(zv) if isinstance(zv, (int, float)) and math.isfinite(zv) else -math.inf
        out.append({"name": name, "words": describe_measure(name), "value": feats.get(name), "z": zv,
                    "driver": name == driver, "sort": zf})
    return sorted(out, key=lambda m: (-m["sort"], m["name"]))


def _site_plots(rows: list[dict] | None, verdict: dict, bids_name: str, site: str) -> list[Markup]:
    """The scan against its site: the ranking score and the driving measurement of every
    scan of the site as strip plots, this scan drawn large (none without the group rows)."""
    if not rows or not verdict["ranked"]:
        return []
    mine = [r for r in rows if r["status"] == "ok" and r["site"] == site]

    def pts(get):
        return [{"name": r["bids_name"], "site": site, "value": get(r), "flagged": r["flagged"] or
                 r.get("background_flagged"), "label": r.get("label"),
                 "href": f"{r['report']}#{scan_anchor(r['bids_name'])}"} for r in mine]

    key, driver = verdict["score"], verdict["driver"]
    thr = {float(r["threshold"]) for r in mine if r.get("threshold") is not None}
    out = [strip_plot_svg(pts(lambda r: r.get(key)), [site], title="QC score in its site",
                          percent=key == "anomaly_fraction", threshold=thr.pop() if len(thr) == 1 else None,
                          highlight=bids_name, width=220)]
    if driver:
        def z(r):
            v = (r.get("quality_z") or {}).get(driver)
            return float(v) if isinstance(v, (int, float)) else None
        out.append(strip_plot_svg(pts(z), [site], title=f"{driver} (z)",
                                  caption=f"{describe_measure(driver)}: robust z against the reference",
                                  highlight=bids_name, width=220))
    return [p for p in out if p is not None]


def render_subject_report(output_dir, subject: str, *, site_column: str = "site",
                          tables: GroupTables | None = None) -> str:
    """HTML text of ``sub-<subject>.html`` (see :func:`write_subject_report`); with the
    group level's ``tables``, each scan's verdict is drawn against its site's scans."""
    output_dir = Path(output_dir)
    subject = str(subject).removeprefix("sub-")
    records = load_qc_records(output_dir, subject=subject, site_column=site_column)
    if not records:
        raise FileNotFoundError(f"no *_qc.json for sub-{subject} under {output_dir}")
    order = lambda r: (str(r.entities.get("session", "")), r.suffix, str(r.entities.get("acquisition", "")),
                       str(r.entities.get("run", "")), r.bids_name)
    scans = []
    for i, rec in enumerate(sorted(records, key=order)):
        ent = {k: v for k, v in rec.entities.items() if k not in ("subject",) and v not in (None, "")}
        d = rec.data
        group = _group_info(output_dir, rec)
        verdict = scan_verdict(d, group)
        suffix_rows = next((t.rows for t in (tables.tables if tables else []) if t.suffix == rec.suffix), None)
        scans.append({
            "idx": i, "anchor": scan_anchor(rec.bids_name), "rec": rec, "bids_name": rec.bids_name,
            "entities": ent, "site": rec.site, "ok": rec.ok, "status": rec.status,
            "error": rec.error, "warnings": rec.warnings,
            "voxels": d.get("anomaly_voxels"), "fraction": d.get("anomaly_fraction"),
            "qc_score": d.get("qc_score"), "driver": d.get("qc_score_driver"),
            "quality_z": d.get("quality_z") or {}, "quality_features": d.get("quality_features") or {},
            "mm3": d.get("anomaly_mm3"),
            "background": rec.background, "bg_fraction": d.get("background_artifact_fraction"),
            "group": group, "verdict": verdict, "nav": _scan_nav(output_dir, rec),
            "measurements": _measurements(d, verdict["driver"]),
            "site_plots": _site_plots(suffix_rows, verdict, rec.bids_name, rec.site) if rec.ok else [],
            "fig": scan_figures(rec, output_dir, site_mask=(group or {}).get("site_mask")),
            "details": [(k, d.get(k)) for k in ("model_id", "model_adapted_from", "schedule", "device", "forward_passes",
                                                 "tau_stop", "mean_error", "raw_anomaly_fraction", "runtime_s",
                                                 "package_version", "input_sha256", "source_file",
                                                 "mask_file", "error_map_file") if d.get(k) not in (None, "")],
            "fit": d.get("fit") or {},
        })
    sites = sorted({r.site for r in records})
    return _env().get_template("subject.html").render(
        subject=subject, scans=scans, sites=sites, prov=_provenance(output_dir, records),
        css=_asset("report.css"), js=_asset("report.js"), artifacts=ARTIFACT_CHOICES,
        ratings_key=study_key(output_dir), n_failed=sum(not s["ok"] for s in scans), version=__version__)


def write_subject_report(output_dir, subject: str, *, site_column: str = "site",
                         tables: GroupTables | None = None) -> Path:
    """Write ``OUTPUT_DIR/sub-<subject>.html`` for every scan of the subject (atomic).

    Uses the group tables (``group_<suffix>.csv``) for ranks and percentiles when they
    exist and still match the scan's qc.json; otherwise the page says to run the group
    level. Needs only the derivatives folder.
    """
    output_dir = Path(output_dir)
    subject = str(subject).removeprefix("sub-")
    html = render_subject_report(output_dir, subject, site_column=site_column, tables=tables)
    path = output_dir / f"sub-{subject}.html"
    atomic_write_text(html, path)
    return path


# --------------------------------------------------------------------------- group page
def study_key(output_dir) -> str:
    """The browser-storage key of one study's ratings.

    Every local page shares one storage in a browser (Chromium gives all ``file://``
    pages one origin), so ratings are kept per study: a hash of the dataset's name (from
    ``dataset_description.json``) and the derivatives folder's name, which stays the same
    when the folder is copied to another disk.
    """
    import hashlib

    output_dir = Path(output_dir)
    try:
        name = str(json.loads((output_dir / "dataset_description.json").read_text(encoding="utf-8")).get("Name", ""))
    except (OSError, ValueError, AttributeError):
        name = ""
    digest = hashlib.sha256(json.dumps([name, output_dir.resolve().name]).encode("utf-8")).hexdigest()[:12]
    return f"itermask-qc-ratings:v2:{digest}"


def _overview_cards(output_dir: Path, table, records: dict) -> list[dict]:
    """One card per row of a suffix table, in the table's order (worst first, failed last)."""
    from urllib.parse import quote

    key = table.summary.get("score", "anomaly_fraction")
    cards = []
    for r in table.rows:
        rec = records.get((table.suffix, r["bids_name"]))
        fig = scan_figures(rec, output_dir, site_mask=site_mask_of(rec, r.get("site_anomaly_fraction"))) \
            if rec is not None and r["status"] == "ok" else {}
        mosaic = None
        if rec is not None:
            figdir, stem = _figure_place(output_dir, rec)
            cached = figdir / f"{stem}_desc-mosaic.png"
            if cached.is_file():
                mosaic = quote(cached.relative_to(output_dir).as_posix())
        driver = (r.get("qc_score_site_driver") if key == "qc_score_site"
                  else r.get("qc_score_driver") if key == "qc_score" else "") or ""
        cards.append({
            "bids_name": r["bids_name"], "anchor": scan_anchor(r["bids_name"]), "suffix": table.suffix,
            "href": f"{r['report']}#{scan_anchor(r['bids_name'])}", "site": r["site"], "status": r["status"],
            "error": r.get("error") or "", "rank": r.get("rank"), "score": r.get(key), "score_name": key,
            "driver": driver, "words": describe_measure(driver), "flagged": bool(r.get("flagged")),
            "background_flagged": bool(r.get("background_flagged")),
            "engine_flagged": bool(r.get("engine_flagged")), "label": r.get("label"),
            "thumb": fig.get("thumb"), "mosaic": mosaic,
            "tags": sorted({MEASURE_WORDS[d][1] for d in (driver, "background_artifact_fraction"
                                                            if r.get("background_flagged") else "")
                            if d in MEASURE_WORDS}),
        })
    return cards


def render_overview(tables: GroupTables, *, site_column: str = "site") -> str:
    """HTML text of ``OUTPUT_DIR/index.html``: every scan of every suffix as a thumbnail
    through its worst slice, worst first, with filters, links to the reports, and the
    keyboard rating mode."""
    out = Path(tables.output_dir)
    records = {(r.suffix, r.bids_name): r for r in load_qc_records(out, site_column=site_column)}
    suffixes = [{"suffix": t.suffix, "cards": _overview_cards(out, t, records), "score": t.summary.get("score"),
                 "rule": t.summary.get("rule", ""), "page": f"group_{t.suffix}.html"} for t in tables.tables]
    sites = sorted({c["site"] for s in suffixes for c in s["cards"]})
    n = sum(len(s["cards"]) for s in suffixes)
    return _env().get_template("overview.html").render(
        suffixes=suffixes, sites=sites, n_scans=n, labels_source=tables.labels_source,
        artifacts=ARTIFACT_CHOICES, artifact_keys=ARTIFACT_KEYS, ratings_key=study_key(out),
        css=_asset("report.css"), js=_asset("report.js"), version=__version__,
        generated=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))


_TICKS = (-1000, -100, -20, -10, -5, -2, 0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000)
_PCT_TICKS = (0, 0.01, 0.1, 1, 10, 100)


def strip_plot_svg(points: list[dict], sites: list[str], *, title: str, percent: bool = False,
                   threshold: float | None = None, caption: str | None = None, highlight: str | None = None,
                   width: int = 330, height: int = 210) -> Markup | None:
    """One measurement per site as a static SVG strip plot with a box (quartiles, median).

    ``points``: ``{"name", "site", "value", "flagged", "label", "href"}``; every dot links
    to its scan's report section, names it on hover (``<title>``) and carries
    ``data-scan`` so that the page's script can highlight one scan in every plot. The axis
    is symmetric-log (``sign(v) log10(1 + |v| / c)``, ``c`` = 1 for z, 0.01 for percent) and
    spans every value: outliers are never clipped. Every text is escaped. ``caption`` is
    the plot's tooltip (default: ``title``); the scan named ``highlight`` is drawn large,
    on top. None when no point has a finite value.
    """
    from markupsafe import escape

    pts = [p for p in points if p.get("value") is not None and math.isfinite(float(p["value"]))]
    if not pts:
        return None
    scale = 100.0 if percent else 1.0
    unit = "%" if percent else ""
    c = 0.01 if percent else 1.0
    f = lambda v: math.copysign(math.log10(1.0 + abs(v) / c), v)
    vals = [float(p["value"]) * scale for p in pts]
    ys = [f(v) for v in vals] + ([f(threshold * scale)] if threshold is not None and math.isfinite(threshold) else [])
    lo, hi = min(ys + [0.0]), max(ys + [f(2.0 * c) if not percent else f(0.1)])
    pad = 0.06 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    left, right, top, bottom = 44, 8, 20, 30
    pw, ph = width - left - right, height - top - bottom
    Y = lambda y: top + ph * (1.0 - (y - lo) / (hi - lo))
    band = pw / max(1, len(sites))
    X = lambda i: left + band * (i + 0.5)
    # inline in HTML: the parser puts it in the SVG namespace, no xmlns (and no URL) needed
    out = [f'<svg class="strip" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{escape(title)}"><title>{escape(caption or title)}</title>',
           f'<text x="{left}" y="13" font-weight="600">{escape(title)}</text>',
           f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>']
    for t in (_PCT_TICKS if percent else _TICKS):
        y = f(t)
        if lo <= y <= hi:
            out.append(f'<line class="axis" x1="{left - 3}" y1="{Y(y):.1f}" x2="{left}" y2="{Y(y):.1f}"/>'
                       f'<text x="{left - 5}" y="{Y(y) + 3:.1f}" text-anchor="end">{t:g}{unit}</text>')
    for i, site in enumerate(sites):
        ys_site = sorted(f(float(p["value"]) * scale) for p in pts if p["site"] == site)
        label = str(site) if len(str(site)) <= 14 else str(site)[:13] + "…"
        out.append(f'<text x="{X(i):.1f}" y="{height - 10}" text-anchor="middle">{escape(label)}</text>')
        if len(ys_site) >= 3:
            q1, med, q3 = (float(np.percentile(ys_site, q)) for q in (25, 50, 75))
            out.append(f'<rect class="box" x="{X(i) - band * 0.3:.1f}" y="{Y(q3):.1f}" width="{band * 0.6:.1f}" '
                       f'height="{max(1.0, Y(q1) - Y(q3)):.1f}"/><line class="axis" x1="{X(i) - band * 0.3:.1f}" '
                       f'y1="{Y(med):.1f}" x2="{X(i) + band * 0.3:.1f}" y2="{Y(med):.1f}"/>')
    if threshold is not None and math.isfinite(threshold):
        y = Y(f(threshold * scale))
        out.append(f'<line class="thr" x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}"><title>flag threshold '
                   f'{threshold * scale:.3g}</title></line>')
    order = sorted(range(len(pts)), key=lambda j: pts[j]["name"] == highlight)  # highlight last: on top
    for p, v in ((pts[j], vals[j]) for j in order):
        i = sites.index(p["site"]) if p["site"] in sites else 0
        # jitter from the name, so a scan sits at the same x in every plot
        jit = (int.from_bytes(p["name"].encode("utf-8")[-4:].rjust(4, b"\0"), "big") % 1000 / 1000.0 - 0.5) * band * 0.5
        cls = "flag" if p.get("flagged") else "ok"
        if p.get("label") == 1:
            cls += " art"
        if p["name"] == highlight:
            cls += " me"
        tip = f'{p["name"]} (site {p["site"]}): {v:.3g}{"%" if percent else ""}'
        out.append(f'<a href="{escape(p["href"])}"><circle class="{cls}" cx="{X(i) + jit:.1f}" '
                   f'cy="{Y(f(v)):.1f}" r="3.5" '
                   f'data-scan="{escape(p["name"])}" tabindex="0"><title>{escape(tip)}</title></circle></a>')
    out.append("</svg>")
    return Markup("".join(out))


def group_plots(rows: list[dict], summary: dict) -> list[Markup]:
    """The group page's linked plots: the ranking score (with the flag threshold when every
    site shares it), the anomaly and background fractions, then each QC-score measurement
    (robust z against the reference), worst-reaching first."""
    ok = [r for r in rows if r["status"] == "ok"]
    sites = list(summary["sites"])

    def pts(get):
        return [{"name": r["bids_name"], "site": r["site"], "value": get(r), "flagged": r["flagged"] or
                 r.get("background_flagged"), "label": r.get("label"),
                 "href": f"{r['report']}#{scan_anchor(r['bids_name'])}"} for r in ok]

    key = summary.get("score", "anomaly_fraction")
    thr = {t for t, _ in summary.get("site_thresholds", {}).values()}
    shared = thr.pop() if len(thr) == 1 else None
    out = [strip_plot_svg(pts(lambda r: r.get(key)), sites, title=f"{key} (ranks and flags)",
                          percent=key == "anomaly_fraction", threshold=shared)]
    if key != "anomaly_fraction":
        out.append(strip_plot_svg(pts(lambda r: r.get("anomaly_fraction")), sites, title="anomaly fraction",
                                  percent=True))
    out.append(strip_plot_svg(pts(lambda r: r.get("background_artifact_fraction")), sites,
                              title="background artifact fraction", percent=True))
    names = sorted({k for r in ok for k in r.get("quality_z", {})},
                   key=lambda k: -max((float(r["quality_z"][k]) for r in ok
                                       if isinstance(r.get("quality_z", {}).get(k), (int, float))), default=0.0))
    for name in names:
        def z(r, name=name):
            v = r.get("quality_z", {}).get(name)
            return float(v) if isinstance(v, (int, float)) else None
        out.append(strip_plot_svg(pts(z), sites, title=f"{describe_measure(name)} (z)",
                                  caption=f"{name}: robust z against the reference"))
    return [p for p in out if p is not None]


def write_group_pages(tables: GroupTables, *, site_column: str = "site",
                      subject_reports: bool = True) -> list[Path]:
    """Write ``group_<suffix>.html`` for each table and (``subject_reports``) re-render every
    subject's ``sub-<label>.html`` with its ranks; returns the pages written (group pages
    first). A subject page that fails is logged, never raised: a report must not sink the
    group level."""
    out = Path(tables.output_dir)
    subject_pages = []
    if subject_reports:  # subject pages read the CSVs just written; the group pages link to them
        for subject in tables.subjects:
            try:
                subject_pages.append(write_subject_report(out, subject, site_column=site_column, tables=tables))
            except Exception as exc:  # noqa: BLE001
                LOGGER.error("subject report for sub-%s failed: %s", subject, exc)
    group_pages = []
    for t in tables.tables:
        html = render_group_report(out, suffix=t.suffix, rows=t.rows, site_rows=t.site_rows,
                                   summary=t.summary, labels_source=tables.labels_source,
                                   mad_k=tables.mad_k, flag_at_fnr=tables.flag_at_fnr,
                                   site_columns=t.site_columns)
        group_pages.append(atomic_write_text(html, out / f"group_{t.suffix}.html"))
    group_pages.append(atomic_write_text(render_overview(tables, site_column=site_column), out / "index.html"))
    return group_pages + subject_pages


def render_group_report(output_dir, *, suffix: str, rows: list[dict], site_rows: list[dict],
                        summary: dict, labels_source: str | None, mad_k: float,
                        flag_at_fnr: float | None, site_columns: list[str]) -> str:
    """HTML text of ``group_<suffix>.html``."""
    output_dir = Path(output_dir)
    failed = [r for r in rows if r["status"] != "ok"]
    reasons: dict[str, int] = {}
    for r in failed:
        reasons[r["error"] or "unknown"] = reasons.get(r["error"] or "unknown", 0) + 1
    for r in rows:
        r["report_exists"] = (output_dir / r["report"]).is_file()
    metric_cols = [c for c in _metrics.METRIC_NAMES if c in site_columns]
    return _env().get_template("group.html").render(
        suffix=suffix, rows=rows, site_rows=site_rows, summary=summary, failed=failed,
        reasons=sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])),
        plots=group_plots(rows, summary), labels_source=labels_source,
        mad_k=mad_k, flag_at_fnr=flag_at_fnr, metric_cols=metric_cols,
        definitions=_metrics.METRIC_DEFINITIONS, pooled=POOLED_SITE,
        sites=summary["sites"], css=_asset("report.css"), js=_asset("report.js"),
        version=__version__,
        generated=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        n_flagged=sum(1 for r in rows if r["flagged"]))


# --------------------------------------------------------------------------- the page that never fails
_FALLBACK_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>itermask-qc: sub-{{ subject }}</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #999;padding:2px 6px}.error{color:#a00}</style></head>
<body><h1>itermask-qc report: sub-{{ subject }}</h1>
<p>itermask-qc {{ version }} &mdash; minimal report (the full report could not be drawn).</p>
<table><tr><th>scan</th><th>site</th><th>status</th><th>anomaly voxels</th>
<th>anomaly fraction</th><th>anomaly mm&sup3;</th><th>error / warnings</th></tr>
{% for r in records %}<tr><td>{{ r.bids_name }}</td><td>{{ r.site }}</td><td>{{ r.status }}</td>
<td>{{ r.anomaly_voxels }}</td><td>{{ r.anomaly_fraction }}</td><td>{{ r.anomaly_mm3 }}</td>
<td class="{{ 'error' if r.status != 'ok' else '' }}">{{ r.error or '' }}
{{ (r.warnings or [])|join('; ') }}</td></tr>
{% endfor %}</table></body></html>
"""


def fallback_subject_report(output_dir, subject: str) -> Path:
    """A minimal, escaped jinja2 page listing the subject's ``_qc.json`` records."""
    import jinja2

    output_dir = Path(output_dir)
    subject = str(subject)
    subject = subject[4:] if subject.startswith("sub-") else subject
    files = sorted((output_dir / f"sub-{subject}").glob("**/anat/*_qc.json"))
    records = [r for r in (read_qc(f) for f in files) if r]
    env = jinja2.Environment(autoescape=True)
    page = env.from_string(_FALLBACK_TEMPLATE).render(subject=subject, records=records,
                                                      version=__version__)
    path = output_dir / f"sub-{subject}.html"
    atomic_write_text(page, path)
    return path


def write_subject_page(output_dir, subject: str, *, site_column: str = "site") -> Path:
    """Write ``sub-<label>.html`` with :func:`write_subject_report`; fall back to
    :func:`fallback_subject_report` if it fails (a report problem never fails the run; it
    is logged)."""
    try:
        return write_subject_report(output_dir, subject, site_column=site_column)
    except Exception as exc:  # noqa: BLE001 - reports must not fail the run
        LOGGER.warning("sub-%s: report failed (%s: %s); writing a minimal report",
                       subject, type(exc).__name__, one_line(exc))
        return fallback_subject_report(output_dir, subject)
