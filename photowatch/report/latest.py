"""The report's first screen: the latest frame (facts, and a thumbnail with N/E arrows and a
scale bar).

:func:`latest_frame_facts` reads the newest reduced science frame of the night
from the store (what the observer is looking at): its name, filter, target,
FWHM, LIMMAG, zero point, airmass, state, and how long ago it arrived.
:func:`latest_thumbnail` draws its SCI plane (block-averaged, zscale) with the
directions of north and east from its WCS and a scale bar, as a PNG written
atomically. The panel is ``report/templates/latest.html.j2``.
"""

from __future__ import annotations

import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from photowatch.io.fits import write_bytes
from photowatch.report.times import parse_time


def _num(v, nd: int = 3):
    return round(float(v), nd) if v is not None and np.isfinite(float(v)) else None


def latest_frame_facts(store, night: str, now: datetime | None = None) -> dict | None:
    """The night's newest reduced (or not-stacked) science frame with a product, or None."""
    row = store.latest_science_frame(night)
    if row is None:
        return None
    qc = json.loads(row["qc_json"]) if row["qc_json"] else {}
    now = now or datetime.now(UTC)
    arrived = parse_time(row["arrived_at"])
    limmag = qc.get("limmag")
    if limmag is None:
        limmag = (qc.get("candidates") or {}).get("limmag_used")
    return {
        "name": row["name"], "raw_name": row["raw_name"], "filter": row["filter"],
        "target": row["target"], "state": row["state"], "obs_time": row["obs_time"],
        "arrived_at": row["arrived_at"], "product": row["product"],
        "seconds_since_arrival": _num((now - arrived).total_seconds(), 1) if arrived else None,
        "fwhm_arcsec": _num(qc.get("fwhm_arcsec")), "limmag": _num(limmag),
        "limmag_source": "LIMMAG" if qc.get("limmag") is not None else
        ("local estimate (changes)" if limmag is not None else None),
        "zp": _num(qc.get("zp")), "airmass": _num(qc.get("airmass")),
        "exptime": qc.get("exptime"), "aststat": qc.get("aststat"),
        "candidates": qc.get("candidates", {}).get("new", 0) + qc.get("candidates", {}).get(
            "varying", 0) if qc.get("candidates") else None,
    }


def compass(wcs, x: float, y: float, arcsec: float = 10.0):
    """Unit vectors (dx, dy in pixels) towards north and east at pixel (x, y), and the
    pixel scale (arcsec per pixel) there."""
    ra, dec = wcs.all_pix2world([x], [y], 0)
    ra, dec = float(ra[0]), float(dec[0])
    d = arcsec / 3600.0
    nx, ny = wcs.all_world2pix([ra], [dec + d], 0)
    ex, ey = wcs.all_world2pix([ra + d / math.cos(math.radians(dec))], [dec], 0)
    n = np.array([float(nx[0]) - x, float(ny[0]) - y])
    e = np.array([float(ex[0]) - x, float(ey[0]) - y])
    scale = arcsec / float(np.hypot(*n))
    return n / np.hypot(*n), e / np.hypot(*e), scale


def latest_thumbnail(product: str | Path, path: str | Path, max_px: int = 480) -> Path | None:
    """PNG of a product's SCI with N/E arrows (from its WCS) and a scale bar, or None
    without a usable WCS."""
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from photowatch.io.previews import preview

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(product) as hdul:
            sci = np.asarray(hdul["SCI"].data, np.float32)
            mask = np.asarray(hdul["MASK"].data) if "MASK" in hdul else None
            try:
                wcs = WCS(hdul["SCI"].header)
                wcs_ok = wcs.has_celestial
            except Exception:  # a product without a solution: no arrows
                wcs_ok = False
    rgb = preview(sci, mask=mask, max_size=max_px)
    factor = max(1, math.ceil(max(sci.shape) / max_px))
    h, w = rgb.shape[:2]
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb, origin="lower", interpolation="nearest")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(-0.5, h - 0.5)
    ax.set_axis_off()
    if wcs_ok:
        ny, nx = sci.shape
        north, east, scale = compass(wcs, (nx - 1) / 2, (ny - 1) / 2)
        cx, cy, length = 0.87 * w, 0.16 * h, 0.09 * min(w, h)
        for vec, label in ((north, "N"), (east, "E")):
            ax.annotate("", xy=(cx + vec[0] * length, cy + vec[1] * length), xytext=(cx, cy),
                        arrowprops={"arrowstyle": "-|>", "color": "#ffcc33", "lw": 1.5})
            ax.text(cx + vec[0] * length * 1.35, cy + vec[1] * length * 1.35, label,
                    color="#ffcc33", ha="center", va="center", fontsize=10, weight="bold")
        # scale bar: a round length near a fifth of the width
        width_arcsec = nx * scale
        bar = next((b for b in (600, 300, 120, 60, 30, 10, 5) if b <= width_arcsec / 4), 5)
        bar_px = bar / scale / factor
        x0, y0 = 0.06 * w, 0.07 * h
        ax.plot([x0, x0 + bar_px], [y0, y0], color="#ffcc33", lw=2.5)
        ax.text(x0 + bar_px / 2, y0 + 0.03 * h, f"{bar // 60}'" if bar >= 60 else f'{bar}"',
                color="#ffcc33", ha="center", va="bottom", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return write_bytes(path, buf.getvalue(), fsync=False)


__all__ = ["latest_frame_facts", "latest_thumbnail", "compass"]
