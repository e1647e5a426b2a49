"""The report's images: thumbnails and previews of FITS/PNG files (Pillow) and the
conditions and latency plots (matplotlib), each remade only when what it shows changed.

``img/cache.json`` records what each image was made from (the source file's path,
mtime and size for thumbnails, a hash of the plotted values for plots), so a
refresh when nothing changed writes no image.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np

from photowatch.io.fits import write_bytes
from photowatch.report.facts import parse_time
from photowatch.report.lightcurve import lightcurve_plot

THUMB_PX = 240  #: longest side of a thumbnail
PREVIEW_PX = 1024  #: longest side of a preview made from a FITS file
ASINH_A = 0.15  #: softening of the asinh stretch (smaller: brighter faint parts)
PLOT_STYLE = 2  #: bump to remake every plot after a change of style

# page and plot colours (dark, readable at night)
BG, PANEL, BORDER = "#0f1216", "#171b22", "#2b313c"
TEXT, MUTED = "#e4e8ee", "#98a2b3"
GOOD, WARN, BAD, LINK = "#5cd18f", "#f3b74f", "#ff6b6b", "#82bdff"
NODATA_RGB = (28, 33, 42)
FILTER_COLOURS = {"u": "#b59cff", "b": "#6aa8ff", "g": "#59d98c", "v": "#9be15d",
                  "r": "#ff7b5c", "i": "#ffc857", "z": "#f07de8", "y": "#e8b4ff",
                  "j": "#4fd6e8", "h": "#3fc8b0", "k": "#c6e35a"}
SPARE_COLOURS = ("#8fb3ff", "#ffa3c4", "#a0e7c8", "#ffd08a", "#c9a6ff", "#7fe0ff")


def make_images(facts: dict, folder: Path) -> dict:
    """Every image of the page (in ``folder/img``): masters, coadds, conditions, latency."""
    img = folder / "img"
    img.mkdir(parents=True, exist_ok=True)
    cache = ImageCache(img)
    images = {
        "masters": [_master_images(m, folder, cache) for m in facts["masters"]],
        "coadds": [_coadd_images(c, folder, cache) for c in facts["coadds"]],
        "conditions": _conditions_plot(facts["frames"], img, cache),
        "latency": _latency_plot(facts["frames"], img, cache),
        "latest": _latest_image(facts.get("latest"), img, cache),
        "lightcurves": lightcurve_plot(facts.get("lightcurves") or {}, img, cache),
    }
    cache.save()
    return images



class ImageCache:
    """``img/cache.json``: what each image was made from, to remake only what changed."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "cache.json"
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.changed = False
        self.made: list[str] = []

    def fresh(self, name: str, stamp) -> bool:
        return self.data.get(name) == stamp and (self.folder / name).is_file()

    def record(self, name: str, stamp) -> None:
        self.data[name] = stamp
        self.changed = True
        self.made.append(name)

    def save(self) -> None:
        if self.changed:
            write_bytes(self.path, json.dumps(self.data, indent=0).encode(), fsync=False)


def _latest_image(latest: dict | None, img: Path, cache) -> Path | None:
    """The latest frame's thumbnail with N/E arrows and a scale bar (remade when it changes)."""
    from photowatch.report.latest import latest_thumbnail

    if not latest or not latest.get("product"):
        return None
    stamp = _file_stamp(Path(latest["product"]))
    if stamp is None:
        return None
    if not cache.fresh("latest.png", stamp):
        try:
            latest_thumbnail(latest["product"], img / "latest.png")
        except Exception as exc:  # a thumbnail must never cost the report
            logging.getLogger(__name__).warning(
                "%s: latest-frame thumbnail failed (%s); skipped", latest["product"], exc)
            return None
        cache.record("latest.png", stamp)
    return img / "latest.png"


def _file_stamp(path: Path) -> list | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [str(path), st.st_mtime_ns, st.st_size]


def _slug(*parts) -> str:
    text = "_".join(str(p) for p in parts if p)
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def _block_mean(data: np.ndarray, max_px: int) -> np.ndarray:
    """Average ``f x f`` blocks so the longest side is at most ``max_px`` (NaN ignored)."""
    f = max(1, math.ceil(max(data.shape) / max_px))
    if f == 1:
        return data
    ny, nx = (data.shape[0] // f) * f, (data.shape[1] // f) * f
    blocks = data[:ny, :nx].reshape(ny // f, f, nx // f, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        return np.nanmean(blocks, axis=(1, 3))


def _read_sci(path: Path) -> np.ndarray:
    """The SCI image of a FITS file (else its first image), NaN where WHT is zero."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False) as hdul:
            names = [h.name for h in hdul]
            if "SCI" in names:
                data = hdul["SCI"].data
            else:
                data = next((h.data for h in hdul if getattr(h, "is_image", False)
                             and h.data is not None and h.data.ndim == 2), None)
            if data is None:
                raise ValueError(f"{path.name}: no 2-d image (SCI) to show")
            data = np.array(data, dtype=np.float32)
            if "WHT" in names and hdul["WHT"].data is not None:
                wht = hdul["WHT"].data
                if wht.shape == data.shape:
                    data[~(wht > 0)] = np.nan
    return data


def _stretch(data: np.ndarray, limits: tuple[float, float]):
    """Display limits then asinh, as an 8-bit palette image (FITS row 0 at the bottom).

    Indices 0-254 are a grey ramp, 255 is the no-data colour (NaN pixels); a
    palette PNG encodes about three times faster than RGB.
    """
    from PIL import Image

    lo, hi = limits
    with np.errstate(invalid="ignore"):
        v = np.clip((data - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    v = np.arcsinh(v / ASINH_A) / np.arcsinh(1.0 / ASINH_A)
    index = np.nan_to_num(v * 254.0, nan=0.0).astype(np.uint8)
    index[~np.isfinite(data)] = 255
    im = Image.fromarray(np.ascontiguousarray(index[::-1]), mode="P")
    ramp = np.linspace(0, 255, 255).astype(np.uint8)
    im.putpalette([*np.repeat(ramp, 3).tolist(), *NODATA_RGB])
    return im


def display_limits(data: np.ndarray) -> tuple[float, float]:
    """Display range: zscale, with the floor raised to sky - 2 sigma and the top to sky + 10 sigma.

    The sky then shows dark grey rather than mid grey, and faint stars stay visible
    after the asinh stretch; sigma is the MAD of the finite pixels.
    """
    from astropy.visualization import ZScaleInterval

    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = ZScaleInterval().get_limits(finite)
    med = float(np.median(finite))
    sigma = 1.4826 * float(np.median(np.abs(finite - med)))
    lo, hi = max(float(lo), med - 2 * sigma), max(float(hi), med + 10 * sigma)
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    return lo, (hi if hi > lo else lo + 1.0)


def fits_previews(path: Path, sizes: tuple[int, ...]) -> list[bytes]:
    """PNG bytes of a FITS image's SCI at each longest side in ``sizes`` (see display_limits).

    The image is block-averaged to at most ``max(sizes)``; smaller sizes are
    resampled from that (Lanczos), so a thumbnail fills its box.
    """
    from PIL import Image

    data = _block_mean(_read_sci(path), max(sizes))
    full = _stretch(data, display_limits(data))
    pngs = []
    for px in sizes:
        im = full
        if max(full.size) > px:  # resample in RGB (a palette image would be resized nearest)
            im = full.convert("RGB")
            im.thumbnail((px, px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=3)
        pngs.append(buf.getvalue())
    return pngs


def png_thumbnail(path: Path, max_px: int = THUMB_PX) -> bytes:
    """A smaller copy of a PNG image."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _master_images(m: dict, folder: Path, cache: ImageCache) -> dict:
    """Thumbnail and preview of one master (remade when its FITS file changed)."""
    if not m["this_night"]:
        return {}
    base = "master_" + _slug(m["kind"], m["camera"], m["filter"], m["target"], m["binning"],
                              m["readout"])
    return _fits_images(Path(m["path"]), base, folder, cache)


def _fits_images(src: Path, base: str, folder: Path, cache: ImageCache) -> dict:
    """Thumbnail and preview PNGs of a FITS file's image, remade only when the file changed."""
    stamp = _file_stamp(src)
    if stamp is None:
        return {}
    names = (f"{base}_thumb.png", f"{base}.png")
    if not all(cache.fresh(n, stamp) for n in names):
        try:
            thumb, preview = fits_previews(src, (THUMB_PX, PREVIEW_PX))
        except Exception as exc:  # a thumbnail must never cost the report
            return {"error": f"{src.name}: {exc}"}
        write_bytes(folder / "img" / names[0], thumb, fsync=False)
        write_bytes(folder / "img" / names[1], preview, fsync=False)
        for n in names:
            cache.record(n, stamp)
    return {"thumb": folder / "img" / names[0], "full": folder / "img" / names[1]}


def _coadd_images(c: dict, folder: Path, cache: ImageCache) -> dict:
    """Thumbnail of a coadd: from its quick-look PNG if it exists, else from the FITS SCI."""
    base = "coadd_" + _slug(c["target"], c["filter"])
    ql = Path(c["quicklook"]) if c["quicklook"] else None
    if ql is not None and ql.is_file():
        stamp = _file_stamp(ql)
        name = f"{base}_thumb.png"
        if not cache.fresh(name, stamp):
            try:
                write_bytes(folder / "img" / name, png_thumbnail(ql), fsync=False)
            except Exception as exc:  # a thumbnail must never cost the report
                return {"error": f"{ql.name}: {exc}"}
            cache.record(name, stamp)
        return {"thumb": folder / "img" / name, "full": ql}
    return _fits_images(Path(c["path"]), base, folder, cache)


# ---------------------------------------------------------------------------- plots

def filter_colours(filters) -> dict[str, str]:
    """One colour per filter, by band letter when it is a known one (stable across nights)."""
    colours, spare = {}, 0
    for f in sorted({f for f in filters if f}):
        band = f.split("-")[-1].split("_")[-1].strip().lower()[:1] or "?"
        if f.lower().endswith("prime") or f.endswith("'"):
            band = f.strip("'").split("-")[-1][:1].lower()
        colour = FILTER_COLOURS.get(band)
        if colour is None or colour in colours.values():
            colour = SPARE_COLOURS[spare % len(SPARE_COLOURS)]
            spare += 1
        colours[f] = colour
    return colours


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100, facecolor=BG)
    FigureCanvasAgg(fig)
    return fig


def _style_axes(ax, ylabel: str, span_s: float) -> None:
    import matplotlib.dates as mdates

    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_color(BORDER)
    ax.tick_params(colors=MUTED, labelsize=9)
    ax.set_ylabel(ylabel, color=TEXT, fontsize=10)
    ax.grid(True, color=BORDER, linewidth=0.7)
    ax.set_axisbelow(True)
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if span_s < 600 else "%H:%M"))


def _span_s(times) -> float:
    ts = [t for t in (parse_time(x) for x in times) if t is not None]
    return (max(ts) - min(ts)).total_seconds() if ts else 0.0


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    write_bytes(path, buf.getvalue(), fsync=False)


def _plot_key(data) -> str:
    text = json.dumps([PLOT_STYLE, data], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def _conditions_series(frames: list[dict]) -> tuple[list[dict], str, str]:
    """Per-frame points of the conditions plot, and which photometric quantity is shown."""
    science = [f for f in frames if f["type"] == "object" and f["obs_time"] and any(
        f.get(k) is not None for k in ("fwhm_arcsec", "sky_e_per_s", "zp_per_s",
                                       "transparency_mag", "ellipticity"))]
    has_zp = any(f.get("zp_per_s") is not None for f in science)
    phot_key = "zp_per_s" if has_zp else "transparency_mag"
    phot_label = "ZP for 1 s (mag)" if has_zp else "transparency (mag)"
    points = [{"t": f["obs_time"], "filter": f["filter"] or "?",
               "ok": f["state"] == "reduced", "phot": f.get(phot_key),
               "fwhm": f.get("fwhm_arcsec"), "sky": f.get("sky_e_per_s"),
               "ell": f.get("ellipticity")} for f in science]
    return points, phot_key, phot_label


def _conditions_plot(frames: list[dict], img: Path, cache: ImageCache) -> Path | None:
    """ZP (or transparency), FWHM, sky and ellipticity through the night, one colour per filter."""
    points, _, phot_label = _conditions_series(frames)
    if not points:
        return None
    name = "conditions.png"
    key = _plot_key([points, phot_label])
    if cache.fresh(name, key):
        return img / name
    from matplotlib.lines import Line2D

    colours = filter_colours(p["filter"] for p in points)
    fig = _figure(12.0, 6.4)
    axes = fig.subplots(2, 2, sharex=True)
    panels = (("phot", phot_label), ("fwhm", "FWHM (arcsec)"), ("sky", "sky (e⁻/s)"),
              ("ell", "ellipticity"))
    span = _span_s(p["t"] for p in points)
    for ax, (field, label) in zip(axes.flat, panels):
        _style_axes(ax, label, span)
        for filt, colour in colours.items():
            sel = [p for p in points if p["filter"] == filt and p[field] is not None]
            if not sel:
                continue
            t = [parse_time(p["t"]) for p in sel]
            v = [p[field] for p in sel]
            ax.plot(t, v, "-", color=colour, alpha=0.35, linewidth=1.0)
            ok = [(ti, vi) for ti, vi, p in zip(t, v, sel) if p["ok"]]
            bad = [(ti, vi) for ti, vi, p in zip(t, v, sel) if not p["ok"]]
            if ok:
                ax.plot(*zip(*ok), "o", color=colour, markersize=5)
            if bad:
                ax.plot(*zip(*bad), "o", markerfacecolor="none", markeredgecolor=colour,
                        markersize=6, markeredgewidth=1.4)
    for ax in axes[1]:
        ax.set_xlabel("UTC", color=MUTED, fontsize=9)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=f)
               for f, c in colours.items()]
    handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none",
                          markeredgecolor=MUTED, label="not stacked"))
    legend = fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False,
                        fontsize=10)
    for text in legend.get_texts():
        text.set_color(TEXT)
    fig.subplots_adjust(left=0.07, right=0.985, top=0.92, bottom=0.08, hspace=0.12, wspace=0.18)
    _save_figure(fig, img / name)
    cache.record(name, key)
    return img / name


def _latency_plot(frames: list[dict], img: Path, cache: ImageCache) -> Path | None:
    """Seconds from each frame's arrival to its product, against observation time.

    At the telescope a frame arrives one exposure time after its start, so this
    reads as "through the night"; in a batch run every frame arrives at once and
    the observation time is the only useful axis.
    """
    points = [{"t": f["obs_time"], "s": f["latency_s"], "sci": f["type"] == "object"}
              for f in frames if f["latency_s"] is not None and f["obs_time"]
              and f["state"] in ("used", "reduced", "rejected")]
    if not points:
        return None
    name = "latency.png"
    key = _plot_key(points)
    if cache.fresh(name, key):
        return img / name
    fig = _figure(6.4, 2.6)
    ax = fig.subplots()
    _style_axes(ax, "seconds", _span_s(p["t"] for p in points))
    for sci, colour, label in ((False, MUTED, "calibration"), (True, LINK, "science")):
        sel = [p for p in points if p["sci"] == sci]
        if sel:
            ax.plot([parse_time(p["t"]) for p in sel], [p["s"] for p in sel], "o",
                    color=colour, markersize=4, label=label)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("observed (UTC)", color=MUTED, fontsize=9)
    legend = ax.legend(frameon=False, fontsize=9, loc="upper left")
    for text in legend.get_texts():
        text.set_color(TEXT)
    fig.subplots_adjust(left=0.11, right=0.98, top=0.95, bottom=0.2)
    _save_figure(fig, img / name)
    cache.record(name, key)
    return img / name


