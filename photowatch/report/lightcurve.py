"""The night's light curves in the report (issue 21): facts for night.json and one plot.

:func:`lightcurve_facts` reads the store's forced photometry (``forced`` table, one point
per target and frame or coadd); :func:`plot_lightcurves` draws magnitude against time
per target and filter: detections with error bars, non-detections as arrows pointing
fainter from their upper limit, each quick-look coadd's point as a horizontal bar over
the time span of its members.
"""

from __future__ import annotations

import math
from pathlib import Path

#: keys of a point in night.json (the light-curve file's columns, see io/lightcurves.py)
POINT_KEYS = ("key", "kind", "filter", "mjd", "mjd_start", "mjd_end", "exptime", "flux",
              "fluxerr", "snr", "mag", "magerr", "limmag", "uplim", "detected", "flags",
              "product")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def lightcurve_facts(store, night: str) -> dict:
    """{target: {"ra", "dec", "file", "points": [...]}} of a night, in time order."""
    from photowatch.io.lightcurves import lightcurve_path

    out: dict = {}
    for p in store.forced_points(night):
        t = out.setdefault(p["target"], {"ra": p["ra"], "dec": p["dec"], "points": [],
                                         "file": str(lightcurve_path(
                                             store.path.parent, night, p["target"]))})
        t["points"].append({k: _clean(p.get(k)) for k in POINT_KEYS} |
                           {"detected": bool(p.get("detected"))})
    return out


def plot_lightcurves(facts: dict, path: Path, *, colours: dict | None = None,
                     dark: bool = True) -> Path | None:
    """One panel per target (up to 8): mag against minutes since the first point (UTC
    MJD in the title). None when nothing calibrated to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    targets = [(name, t) for name, t in facts.items()
               if any(p["mag"] is not None or p["uplim"] is not None for p in t["points"])][:8]
    if not targets:
        return None
    fg, bg = ("#e4e8ee", "#171b22") if dark else ("black", "white")
    fig = Figure(figsize=(7.5, 2.4 * len(targets)), facecolor=bg)
    FigureCanvasAgg(fig)
    palette = ["#ff7b5c", "#59d98c", "#6aa8ff", "#ffc857", "#f07de8", "#4fd6e8"]
    for k, (name, t) in enumerate(targets):
        ax = fig.add_subplot(len(targets), 1, k + 1, facecolor=bg)
        mjds = [p["mjd"] for p in t["points"] if p["mjd"] is not None]
        t0 = min(mjds) if mjds else 0.0
        filters = sorted({p["filter"] or "?" for p in t["points"]})
        for j, f in enumerate(filters):
            c = (colours or {}).get(f) or palette[j % len(palette)]
            pts = [p for p in t["points"] if (p["filter"] or "?") == f and p["mjd"] is not None]
            det = [p for p in pts if p["kind"] == "frame" and p["mag"] is not None]
            lim = [p for p in pts if p["kind"] == "frame" and p["mag"] is None
                   and p["uplim"] is not None]
            co = [p for p in pts if p["kind"] == "coadd" and p["mag"] is not None]

            def minutes(m, t0=t0):
                return (m - t0) * 1440.0
            if det:
                ax.errorbar([minutes(p["mjd"]) for p in det], [p["mag"] for p in det],
                            yerr=[p["magerr"] or 0 for p in det], fmt="o", ms=4, color=c,
                            label=f"{f}")
            if lim:
                xs, ys = [minutes(p["mjd"]) for p in lim], [p["uplim"] for p in lim]
                ax.plot(xs, ys, "_", ms=9, mew=2, color=c, label=f"{f} upper limit")
                # arrows towards fainter (down: the axis is inverted)
                ax.quiver(xs, ys, [0.0] * len(xs), [0.3] * len(xs), angles="xy",
                          scale_units="xy", scale=1, color=c, width=0.004, alpha=0.8)
            for p in co:
                x0, x1 = minutes(p["mjd_start"]), minutes(p["mjd_end"])
                ax.plot([x0, x1], [p["mag"], p["mag"]], "-", lw=3, color=c, alpha=0.6,
                        solid_capstyle="butt")
                ax.errorbar([(x0 + x1) / 2], [p["mag"]], yerr=[p["magerr"] or 0], fmt="none",
                            color=c, alpha=0.6)
        ax.invert_yaxis()  # brighter up; an upper limit's arrow points fainter (down)
        ax.set_title(f"{name}  (t = 0 at MJD {t0:.5f})", color=fg, fontsize=9)
        ax.set_ylabel("mag", color=fg)
        ax.tick_params(colors=fg, labelsize=8)
        for spine in ax.spines.values():
            spine.set_color(fg)
        if k == len(targets) - 1:
            ax.set_xlabel("minutes", color=fg)
        leg = ax.legend(fontsize=7, loc="best", facecolor=bg, edgecolor=fg)
        for text in leg.get_texts():
            text.set_color(fg)
    fig.tight_layout()
    import io

    from photowatch.io.fits import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, facecolor=bg)
    return write_bytes(Path(path), buf.getvalue(), fsync=False)  # atomic


def lightcurve_plot(lightcurves: dict, img: Path, cache) -> Path | None:
    """``img/lightcurves.png`` for the report, remade only when a point changed
    (``cache``: the report's image cache)."""
    import hashlib
    import json

    if not lightcurves:
        return None
    name = "lightcurves.png"
    stamp = hashlib.sha1(json.dumps(lightcurves, sort_keys=True, default=str).encode()
                         ).hexdigest()
    if cache.fresh(name, stamp):
        return img / name
    path = plot_lightcurves(lightcurves, img / name)
    if path is not None:
        cache.record(name, stamp)
    return path
