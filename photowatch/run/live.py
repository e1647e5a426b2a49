"""What the observer came for, live (issue 21): depth, targets, forced photometry and
light curves, as each frame and each coadd update lands.

- :func:`depth_facts`: a frame's 5-sigma limit (LIMMAG, :mod:`photowatch.stages.depth`).
- Targets (:func:`frame_targets`): the header's target coordinates where the profile
  knows the keywords (``target_ra``/``target_dec``), ``[targets] file``, ``[targets]
  positions`` and ``--target NAME=RA,DEC`` (kept in the store's meta, so finalize and
  a restarted daemon measure the same targets).
- :func:`measure_frame` / :func:`measure_coadd`: forced photometry
  (:mod:`photowatch.stages.forced`) at each target on a reduced frame and on each
  quick-look coadd update; the store's ``forced`` table keeps one point per (night,
  target, frame or coadd), and ``OUT/lightcurves/<night>/<target>.ecsv`` is rewritten
  from it (:mod:`photowatch.io.lightcurves`). Alerts: target_detected, target_faded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from photowatch.core.errors import ConfigError
from photowatch.core.frame import UNUSABLE
from photowatch.core.logs import get_logger

log = get_logger("photowatch.live")


# ---------------------------------------------------------------------------- depth

def depth_facts(frame, src, qc: dict, nsigma: float = 5.0) -> dict:
    """qc entries of a frame's depth: ``limmag`` (None without a zero point),
    ``limflux_e`` (nsigma flux, e-), ``pixnoise_e`` (median per-pixel ERR of usable
    pixels), ``apnoise_factor`` (measured over predicted noise of empty apertures, the
    number used in ``apnoise_n``) and ``aprad_px`` (CAT's aperture radius)."""
    from photowatch.stages.depth import empty_aperture_noise, limiting_flux, pixel_noise

    mask, bits = frame.mask, int(UNUSABLE)  # the MASK bits are read where needed only
    noise = pixel_noise(frame.var, mask, bits=bits)
    r_ap = float(src.aperture_radius_px)
    apcor = float(src.aperture_correction)
    factor, n_empty = 1.0, 0
    if np.isfinite(r_ap) and r_ap > 0:
        tab = src.table
        xy = np.column_stack([np.asarray(tab["x"], float), np.asarray(tab["y"], float)]) \
            if len(tab) else np.zeros((0, 2))
        fwhm = src.fwhm_px if np.isfinite(src.fwhm_px) else r_ap / 2
        factor, n_empty = empty_aperture_noise(frame.sci, frame.var, mask, xy, r_ap, fwhm,
                                               bits=bits)
    flux = limiting_flux(noise, r_ap, apcor, nsigma, factor)
    zp = qc.get("zp") if qc.get("abscal") and qc.get("phot_status") == "ok" else None
    limmag = zp - 2.5 * math.log10(flux) if zp is not None and np.isfinite(flux) else None
    return {"limmag": _fin(limmag), "limflux_e": _fin(flux), "pixnoise_e": _fin(noise),
            "apnoise_factor": _fin(factor), "apnoise_n": int(n_empty), "aprad_px": _fin(r_ap)}


# ---------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class Target:
    name: str
    ra: float  #: deg
    dec: float  #: deg
    source: str  #: header | file | config | cli


def _angle(text: str, is_ra: bool) -> float:
    text = str(text).strip()
    if re.search(r"[:hdms ]", text):
        parts = [float(p) for p in re.split(r"[:hdms\s]+", text.strip("hdms ")) if p]
        sign = -1.0 if text.startswith("-") else 1.0
        parts[0] = abs(parts[0])
        parts += [0.0] * (3 - len(parts))
        value = sign * (parts[0] + parts[1] / 60 + parts[2] / 3600)
        return value * 15 if is_ra else value
    return float(text)


def parse_position(text: str, source: str = "cli") -> Target:
    """``NAME=RA,DEC`` (degrees, or sexagesimal hours/degrees) as a :class:`Target`."""
    try:
        name, coords = text.split("=", 1)
        ra_t, dec_t = coords.split(",")
        ra, dec = _angle(ra_t, True), _angle(dec_t, False)
    except (ValueError, IndexError):
        raise ConfigError(f"target {text!r}: expected NAME=RA,DEC (degrees or "
                          "hh:mm:ss,dd:mm:ss)") from None
    if not name.strip() or not (0 <= ra < 360 and -90 <= dec <= 90):
        raise ConfigError(f"target {text!r}: a name, 0 <= RA < 360 and |Dec| <= 90 needed")
    return Target(name.strip(), ra, dec, source)


def read_targets_file(path: str | Path) -> list[Target]:
    """An ECSV or CSV file with columns name, ra, dec (case-insensitive)."""
    from astropy.table import Table

    path = Path(path)
    try:
        table = Table.read(path, format="ascii.ecsv" if path.suffix == ".ecsv" else "ascii.csv")
    except FileNotFoundError:
        raise ConfigError(f"[targets] file {path}: not found") from None
    except Exception as exc:
        raise ConfigError(f"[targets] file {path}: unreadable ({exc})") from None
    cols = {c.lower(): c for c in table.colnames}
    if not {"name", "ra", "dec"} <= set(cols):
        raise ConfigError(f"[targets] file {path}: columns name, ra, dec needed "
                          f"(has {', '.join(table.colnames)})")
    return [parse_position(f"{r[cols['name']]}={r[cols['ra']]},{r[cols['dec']]}", "file")
            for r in table]


def configured_targets(engine) -> list[Target]:
    """[targets] file + positions + the ``--target`` ones kept in the store (cached)."""
    cached = getattr(engine, "_live_targets", None)
    if cached is not None:
        return cached
    s = engine.settings.targets
    out: list[Target] = []
    if s.file:
        out += read_targets_file(s.file)
    out += [parse_position(p, "config") for p in s.positions]
    out += [parse_position(p, "cli") for p in engine.store.get_meta("targets", [])]
    seen, unique = set(), []
    for t in out:  # the last definition of a name wins
        if t.name in seen:
            unique = [u for u in unique if u.name != t.name]
        seen.add(t.name)
        unique.append(t)
    engine._live_targets = unique
    return unique


def remember_cli_targets(store, positions: list[str]) -> None:
    """``--target`` values: checked now, kept in the store's meta (finalize, restarts)."""
    if not positions:
        return
    for p in positions:
        parse_position(p)
    known = store.get_meta("targets", [])
    names = {parse_position(p).name for p in positions}
    kept = [p for p in known if parse_position(p).name not in names]
    store.set_meta("targets", kept + list(positions))


def header_target(info, header, profile) -> Target | None:
    """The header's target coordinates (profile keys target_ra/target_dec), or None."""
    from photowatch.core.classify import _first, _parse_angle

    keys = profile.keys
    if not keys.target_ra or not keys.target_dec or header is None:
        return None
    _, ra = _first(header, keys.target_ra)
    _, dec = _first(header, keys.target_dec)
    ra_deg = _parse_angle(ra, True, keys.radec_format)
    dec_deg = _parse_angle(dec, False, keys.radec_format)
    if ra_deg is None or dec_deg is None or (ra_deg == 0 and dec_deg == 0):
        return None
    return Target(info.target or "target", float(ra_deg) % 360.0, float(dec_deg), "header")


def frame_targets(engine, info, header, profile) -> list[Target]:
    targets = list(configured_targets(engine))
    if engine.settings.targets.from_header:
        t = header_target(info, header, profile)
        if t is not None and t.name not in {u.name for u in targets}:
            targets.append(t)
    return targets


# ---------------------------------------------------------------------------- frames

def _mjd(t) -> float:
    return t.timestamp() / 86400.0 + 40587.0


def measure_frame(engine, row, info, header, profile, result, *, alerts: bool = True) -> int:
    """Forced photometry at every target on a reduced frame; returns the points recorded."""
    if result.wcs is None:
        return 0
    targets = frame_targets(engine, info, header, profile)
    if not targets:
        return 0
    from photowatch.stages.forced import forced_photometry
    from photowatch.stages.zeropoint import ZeroPointResult

    qc = result.qc
    frame = result.frame
    zp = qc.get("zp") if qc.get("abscal") and qc.get("phot_status") == "ok" else None
    magzp = None
    if zp is not None:
        zpr = ZeroPointResult("ok", magzp=zp, spatial=tuple(qc.get("zp_spatial") or ()))
        shape = frame.sci.shape
        magzp = (lambda x, y: zpr.zp_at(x, y, shape)) if zpr.spatial else zp
    nsigma = engine.settings.targets.nsigma
    table = forced_photometry(frame.sci, frame.var, frame.mask, result.wcs,
                              [(t.name, t.ra, t.dec) for t in targets],
                              r_ap_px=qc.get("aprad_px") or float("nan"),
                              apcor=qc.get("apcor") or 1.0, magzp=magzp,
                              magzp_err=qc.get("zp_err") or 0.0, nsigma=nsigma,
                              noise_factor=qc.get("apnoise_factor") or 1.0)
    t0 = info.obs_time
    t1 = t0 + timedelta(seconds=info.exptime_s or 0.0)
    mid = t0 + (t1 - t0) / 2
    product = qc.get("product") or row["product"]
    n = 0
    for t, r in zip(targets, table):
        if r["flags"] & 1:  # off the frame
            continue
        point = _point(r, kind="frame", frame_id=row["id"], filter=info.filter,
                       mjd=_mjd(mid), mjd_start=_mjd(t0), mjd_end=_mjd(t1),
                       exptime=info.exptime_s, source=t.source, product=product)
        seen = engine.store.upsert_forced(info.night, t.name, row["name"], **point)
        n += 1
        _write(engine, info.night, t.name)
        log.debug("forced_photometry", file=info.raw_name, target=t.name, filter=info.filter,
                 mag=point["mag"], limmag=point["limmag"], snr=point["snr"])
        if alerts:
            _alert_rules(engine, info.night, t.name, point, seen, frame=info.raw_name)
    return n


def _fin(v):
    return float(v) if v is not None and np.isfinite(v) else None


def _point(r, **extra) -> dict:
    return {"ra": _fin(r["ra"]), "dec": _fin(r["dec"]), "x": _fin(r["x"]), "y": _fin(r["y"]),
            "flux": _fin(r["flux"]), "fluxerr": _fin(r["fluxerr"]), "snr": _fin(r["snr"]),
            "mag": _fin(r["mag"]), "magerr": _fin(r["magerr"]), "limmag": _fin(r["limmag"]),
            "uplim": _fin(r["uplim"]),
            "detected": int(bool(r["detected"])), "flags": int(r["flags"]), **extra}


def _write(engine, night: str, target: str) -> None:
    """Rewrite the target's light-curve file from the store, on the engine's background
    thread (FIFO: the last write has the last point; the store is the truth)."""
    from photowatch.io.lightcurves import write_lightcurve

    def write():
        write_lightcurve(engine.out, night, target, engine.store.forced_points(night, target))

    write.__name__ = "write_lightcurve"
    engine.in_background(write)


def _alert_rules(engine, night, target, point, seen, frame) -> None:
    """target_detected: the night's first detection in the filter (frames may finish out
    of order: no other point of the filter detected); target_faded: fainter than the
    previous frame's detection by fade_sigma (combined error), or an upper limit fainter
    than it by fade_sigma of its error."""
    from photowatch.run.alerts import alert

    facts = {"night": night, "target": target, "frame": frame, "filter": point["filter"],
             "mjd": point["mjd"], "mag": point["mag"], "magerr": point["magerr"],
             "limmag": point["limmag"], "uplim": point["uplim"], "snr": point["snr"],
             "ra": point["ra"],
             "dec": point["dec"]}
    prev = seen["previous"]
    if point["detected"] and not seen["others_detected"]:
        alert(engine, "target_detected", facts)
    if prev is None or not prev["detected"] or prev["mag"] is None:
        return
    k = engine.settings.targets.fade_sigma
    if point["detected"] and point["mag"] is not None:
        err = math.hypot(point["magerr"] or 0.0, prev["magerr"] or 0.0)
        if point["mag"] - prev["mag"] > k * err:
            alert(engine, "target_faded", {**facts, "previous_mag": prev["mag"],
                                           "previous_frame": prev["key"]})
    elif point["uplim"] is not None and point["uplim"] > prev["mag"] + k * (prev["magerr"] or 0):
        alert(engine, "target_faded", {**facts, "previous_mag": prev["mag"],
                                       "previous_frame": prev["key"]})


# ---------------------------------------------------------------------------- coadds

def coadd_depth(engine, key: tuple, acc, magzp: float | None) -> dict:
    """The coadd's aperture, aperture correction and depth where every member overlaps.

    Members' FWHM, APCOR, apnoise_factor and zero-point errors (weighted as the coadd
    weighs them) give the aperture ``aperture_fwhm x FWHM`` and the noise; the weighted
    mean's per-pixel noise is ``1/sqrt(sum w)`` (reference electrons), so LIMMAG = MAGZP
    - 2.5 log10(limiting_flux(...)).
    """
    from photowatch.stages.depth import limiting_flux

    members = acc.members
    if not members:
        return {}
    names = {mid.rsplit(":v", 1)[0]: m for mid, m in members.items()}
    qcs = engine.store.frame_qc_by_name(key[0], list(names))
    w, fwhm, apcor, factor, zperr = [], [], [], [], []
    for name, m in names.items():
        q = qcs.get(name, {})
        if q.get("fwhm_arcsec") and q.get("apcor"):
            w.append(m.weight)
            fwhm.append(q["fwhm_arcsec"])
            apcor.append(q["apcor"])
            factor.append(q.get("apnoise_factor") or 1.0)
            zperr.append(q.get("zp_err") or 0.0)
    if not w:
        return {}
    w = np.asarray(w, float)
    fwhm_c = float(np.sum(w * fwhm) / np.sum(w))
    apcor_c = float(np.sum(w * apcor) / np.sum(w))
    # the members' measured noise excess (confusion, sky residues: it does not average
    # down) and their zero points' errors, averaged with the coadd's weights
    factor_c = float(np.sum(w * factor) / np.sum(w))
    zperr_c = float(np.sqrt(np.sum(w ** 2 * np.asarray(zperr) ** 2)) / np.sum(w))
    r_ap = engine.settings.stages.sources.aperture_fwhm * fwhm_c / acc.grid.pixel_scale_arcsec
    sum_w = float(sum(m.weight for m in members.values()))
    noise = 1.0 / math.sqrt(sum_w) if sum_w > 0 else float("nan")
    flux = limiting_flux(noise, r_ap, apcor_c, engine.settings.targets.nsigma, factor_c)
    limmag = magzp - 2.5 * math.log10(flux) if magzp is not None and np.isfinite(flux) \
        else None
    return {"fwhm_arcsec": fwhm_c, "apcor": apcor_c, "aprad_px": r_ap, "limmag": limmag,
            "limflux": flux, "apnoise_factor": factor_c, "zp_err": zperr_c}


def measure_coadd(engine, key: tuple, acc, path: Path, magzp: float | None,
                  depth: dict) -> int:
    """Forced photometry at every target on a quick-look coadd just written; the
    coadd's point of the target (key ``coadd:<filter>``) is replaced each update."""
    night, target_name, filt = key
    targets = list(configured_targets(engine))
    # header targets are known from the frames' points of this night
    known = {t.name for t in targets}
    for name in engine.store.forced_targets(night):
        if name not in known:
            pts = [p for p in engine.store.forced_points(night, name) if p["source"] == "header"]
            if pts and pts[-1]["ra"] is not None:
                targets.append(Target(name, pts[-1]["ra"], pts[-1]["dec"], "header"))
    if not targets or not depth or not members_span(acc):
        return 0
    from photowatch.stages.forced import forced_photometry

    sci, wht = acc.images(byteorder=">")[:2]
    wcs = acc.grid.wcs
    r_ap = depth["aprad_px"]
    ny, nx = sci.shape
    half = int(math.ceil(3 * r_ap)) + 2
    t0, t1, exptime = members_span(acc)
    n = 0
    for t in targets:
        x, y = (float(v[0]) for v in wcs.all_world2pix([t.ra], [t.dec], 0))
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < nx and 0 <= y < ny):
            continue
        x0, x1 = max(int(x) - half, 0), min(int(x) + half + 1, nx)
        y0, y1 = max(int(y) - half, 0), min(int(y) + half + 1, ny)
        s = np.array(sci[y0:y1, x0:x1], dtype=np.float32)
        wt = np.array(wht[y0:y1, x0:x1], dtype=np.float32)
        if not (wt > 0).any():
            continue
        with np.errstate(divide="ignore"):
            var = np.where(wt > 0, 1.0 / np.where(wt > 0, wt, 1), 0).astype(np.float32)
        mask = np.where(wt > 0, 0, 8).astype(np.uint16)  # NODATA where nothing was stacked
        s = np.where(wt > 0, s, 0).astype(np.float32)
        sub = wcs.slice((slice(y0, y1), slice(x0, x1)))
        table = forced_photometry(s, var, mask, sub, [(t.name, t.ra, t.dec)], r_ap_px=r_ap,
                                  apcor=depth["apcor"], magzp=magzp,
                                  magzp_err=depth.get("zp_err") or 0.0,
                                  nsigma=engine.settings.targets.nsigma,
                                  noise_factor=depth.get("apnoise_factor") or 1.0)
        r = table[0]
        if r["flags"] & 1:
            continue
        point = _point(r, kind="coadd", frame_id=None, filter=filt, mjd=(t0 + t1) / 2,
                       mjd_start=t0, mjd_end=t1, exptime=exptime, source=t.source,
                       product=str(path))
        point["x"], point["y"] = x, y  # in the coadd's full grid
        engine.store.upsert_forced(night, t.name, f"coadd:{filt}", **point)
        _write(engine, night, t.name)
        n += 1
    return n


def members_span(acc):
    """(mjd of the first start, mjd of the last end, total exposure) of a coadd's members."""
    ms = list(acc.members.values())
    beg = [m.mjd_obs for m in ms if m.mjd_obs is not None]
    if not beg:
        return None
    end = [m.mjd_obs + m.exptime_s / 86400.0 for m in ms if m.mjd_obs is not None]
    return min(beg), max(end), float(sum(m.exptime_s for m in ms))


def coadd_hook(engine, key: tuple, acc, header: dict, magzp: float | None) -> dict:
    """Called by CoaddBook._write before the file is written: LIMMAG into its header;
    returns the depth facts for :func:`after_coadd`."""
    try:
        depth = coadd_depth(engine, key, acc, magzp)
    except Exception as exc:  # depth is a side fact: never cost a coadd
        log.warning("coadd_depth_failed", coadd="/".join(key), problem=str(exc),
                    action="no LIMMAG in the coadd header")
        return {}
    if depth.get("limmag") is not None:
        header["LIMMAG"] = (round(depth["limmag"], 3),
                            "[mag] 5-sigma point-source limit where all members overlap")
    return depth


def after_coadd(engine, key: tuple, acc, path: Path, magzp: float | None, depth: dict) -> None:
    """Called by CoaddBook._write after the file and the store row are written."""
    try:
        engine.store.set_coadd_limmag(*key, depth.get("limmag"))
        measure_coadd(engine, key, acc, path, magzp, depth)
    except Exception as exc:
        log.warning("coadd_forced_failed", coadd="/".join(key), problem=str(exc),
                    action="no light-curve point for this coadd update")
