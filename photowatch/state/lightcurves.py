"""The night's light curves (issue 21): targets, forced-photometry points, files.

:class:`LightCurveBook` keeps the targets of an output directory (``[targets] file`` and
``positions``, the ``--target`` ones kept in the store's meta, and per frame the
header's target coordinates), records each forced measurement in the store's ``forced``
table (one row per night, target and frame, or ``coadd:<filter>``: a re-reduction
replaces its point) and rewrites ``OUT/lightcurves/<night>/<target>.ecsv`` from the store
on the background thread. For a quick-look coadd it gives the depth (``LIMMAG`` into its
header, :func:`photowatch.stages.depth.coadd_depth`) and the coadd's point at each
target, measured on a cutout of the accumulator's planes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from photowatch.core.logs import get_logger
from photowatch.core.targets import Target, header_target, parse_position, read_targets_file

log = get_logger("photowatch.lightcurves")

#: flag of a point whose position is off the frame (stages/forced.py FLAG_OFFFRAME)
_OFF = 1


def _fin(v):
    return float(v) if v is not None and np.isfinite(v) else None


def point_from_row(r, **extra) -> dict:
    """A store/file point from a :func:`photowatch.stages.forced.forced_photometry` row."""
    return {"ra": _fin(r["ra"]), "dec": _fin(r["dec"]), "x": _fin(r["x"]), "y": _fin(r["y"]),
            "flux": _fin(r["flux"]), "fluxerr": _fin(r["fluxerr"]), "snr": _fin(r["snr"]),
            "mag": _fin(r["mag"]), "magerr": _fin(r["magerr"]), "limmag": _fin(r["limmag"]),
            "uplim": _fin(r["uplim"]),
            "detected": int(bool(r["detected"])), "flags": int(r["flags"]), **extra}


def remember_cli_targets(store, positions: list[str]) -> None:
    """``--target`` values: checked now, kept in the store's meta (finalize, restarts)."""
    if not positions:
        return
    names = {parse_position(p).name for p in positions}
    kept = [p for p in store.get_meta("targets", []) if parse_position(p).name not in names]
    store.set_meta("targets", kept + list(positions))


class LightCurveBook:
    def __init__(self, *, store, out: Path, settings, in_background=None):
        self.store = store
        self.out = Path(out)
        self.settings = settings  #: the whole Settings (targets, sources.aperture_fwhm)
        self.in_background = in_background or (lambda fn, *a, **k: fn(*a, **k))
        self._targets: list[Target] | None = None

    # ------------------------------------------------------------------ targets
    def configured(self) -> list[Target]:
        """[targets] file + positions + the ``--target`` ones kept in the store (cached;
        the last definition of a name wins)."""
        if self._targets is not None:
            return self._targets
        s = self.settings.targets
        found: list[Target] = []
        if s.file:
            found += read_targets_file(s.file)
        found += [parse_position(p, "config") for p in s.positions]
        found += [parse_position(p, "cli") for p in self.store.get_meta("targets", [])]
        unique: dict[str, Target] = {}
        for t in found:
            unique.pop(t.name, None)
            unique[t.name] = t
        self._targets = list(unique.values())
        return self._targets

    def for_frame(self, info, header, profile) -> list[Target]:
        targets = list(self.configured())
        if self.settings.targets.from_header:
            t = header_target(info, header, profile)
            if t is not None and t.name not in {u.name for u in targets}:
                targets.append(t)
        return targets

    def for_coadd(self, night: str) -> list[Target]:
        """The configured targets and the header targets the night's frames measured."""
        targets = list(self.configured())
        known = {t.name for t in targets}
        for name in self.store.forced_targets(night):
            if name not in known:
                pts = [p for p in self.store.forced_points(night, name)
                       if p["source"] == "header" and p["ra"] is not None]
                if pts:
                    targets.append(Target(name, pts[-1]["ra"], pts[-1]["dec"], "header"))
        return targets

    # ------------------------------------------------------------------ points
    def record(self, night: str, target: str, key: str, point: dict) -> dict:
        """Store a point (replacing the same key's) and queue the file's rewrite; returns
        what the alert rules need (:meth:`Store.upsert_forced`)."""
        seen = self.store.upsert_forced(night, target, key, **point)
        self.write_later(night, target)
        return seen

    def write_later(self, night: str, target: str) -> None:
        """Rewrite the target's file from the store on the background thread (FIFO: the
        last write has the last point)."""
        from photowatch.io.lightcurves import write_lightcurve

        def write_lightcurve_file():
            write_lightcurve(self.out, night, target, self.store.forced_points(night, target))

        self.in_background(write_lightcurve_file)

    # ------------------------------------------------------------------ coadds
    def coadd_depth(self, key: tuple, acc, magzp: float | None) -> dict:
        from photowatch.stages.depth import coadd_depth

        members = acc.members
        if not members:
            return {}
        names = {mid.rsplit(":v", 1)[0]: m for mid, m in members.items()}
        qcs = self.store.frame_qc_by_name(key[0], list(names))
        rows = [(m.weight, qcs.get(n, {})) for n, m in names.items()]
        return coadd_depth(
            weights=[w for w, q in rows], qcs=[q for w, q in rows],
            sum_w=float(sum(m.weight for m in members.values())),
            aperture_fwhm=self.settings.stages.sources.aperture_fwhm,
            pixel_scale_arcsec=acc.grid.pixel_scale_arcsec, magzp=magzp,
            nsigma=self.settings.targets.nsigma)

    def coadd_hook(self, key: tuple, acc, header: dict, magzp: float | None) -> dict:
        """Before a quick-look coadd is written: its LIMMAG into ``header``; returns the
        depth facts for :meth:`after_coadd`. Never raises (a side fact)."""
        try:
            depth = self.coadd_depth(key, acc, magzp)
        except Exception as exc:
            log.warning("coadd_depth_failed", coadd="/".join(key), problem=str(exc),
                        action="no LIMMAG in the coadd header")
            return {}
        if depth.get("limmag") is not None:
            header["LIMMAG"] = (round(depth["limmag"], 3),
                                "[mag] 5-sigma point-source limit where all members overlap")
        return depth

    def after_coadd(self, key: tuple, acc, path: Path, magzp: float | None,
                    depth: dict) -> None:
        """After the coadd file and its store row: its LIMMAG in the store and its points."""
        try:
            self.store.set_coadd_limmag(*key, depth.get("limmag"))
            self.measure_coadd(key, acc, path, magzp, depth)
        except Exception as exc:
            log.warning("coadd_forced_failed", coadd="/".join(key), problem=str(exc),
                        action="no light-curve point for this coadd update")

    def measure_coadd(self, key: tuple, acc, path: Path, magzp: float | None,
                      depth: dict) -> int:
        """Forced photometry at every target on a quick-look coadd just written; the
        coadd's point of a target (key ``coadd:<filter>``) is replaced at each update."""
        night, _, filt = key
        targets = self.for_coadd(night)
        span = members_span(acc)
        if not targets or not depth or span is None:
            return 0
        from photowatch.stages.forced import forced_photometry

        sci, wht = acc.images(byteorder=">")[:2]
        wcs = acc.grid.wcs
        r_ap = depth["aprad_px"]
        ny, nx = sci.shape
        half = int(math.ceil(3 * r_ap)) + 3
        t0, t1, exptime = span
        n = 0
        for t in targets:
            x, y = (float(v[0]) for v in wcs.all_world2pix([t.ra], [t.dec], 0))
            if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < nx and 0 <= y < ny):
                continue
            x0, x1 = max(int(x) - half, 0), min(int(x) + half + 1, nx)
            y0, y1 = max(int(y) - half, 0), min(int(y) + half + 1, ny)
            wt = np.array(wht[y0:y1, x0:x1], dtype=np.float32)
            if not (wt > 0).any():
                continue
            s = np.where(wt > 0, np.array(sci[y0:y1, x0:x1], dtype=np.float32), 0)
            with np.errstate(divide="ignore"):
                var = np.where(wt > 0, 1.0 / np.where(wt > 0, wt, 1), 0).astype(np.float32)
            mask = np.where(wt > 0, 0, 8).astype(np.uint16)  # NODATA: nothing stacked there
            table = forced_photometry(
                s.astype(np.float32), var, mask, wcs.slice((slice(y0, y1), slice(x0, x1))),
                [(t.name, t.ra, t.dec)], r_ap_px=r_ap, apcor=depth["apcor"], magzp=magzp,
                magzp_err=depth.get("zp_err") or 0.0, nsigma=self.settings.targets.nsigma,
                noise_factor=depth.get("apnoise_factor") or 1.0)
            r = table[0]
            if r["flags"] & _OFF:
                continue
            point = point_from_row(r, kind="coadd", frame_id=None, filter=filt,
                                   mjd=(t0 + t1) / 2, mjd_start=t0, mjd_end=t1,
                                   exptime=exptime, source=t.source, product=str(path))
            point["x"], point["y"] = x, y  # in the coadd's full grid
            self.record(night, t.name, f"coadd:{filt}", point)
            n += 1
        return n


def members_span(acc):
    """(MJD of the first start, MJD of the last end, total exposure) of a coadd's members."""
    ms = list(acc.members.values())
    beg = [m.mjd_obs for m in ms if m.mjd_obs is not None]
    if not beg:
        return None
    end = [m.mjd_obs + m.exptime_s / 86400.0 for m in ms if m.mjd_obs is not None]
    return min(beg), max(end), float(sum(m.exptime_s for m in ms))
