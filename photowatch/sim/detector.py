"""The detector and its light: bias, dark and hot pixels, flat field, sky pattern,
photon noise, cosmic rays, bleeding, readout to ADU, and the raw FITS header.

Conventions (electrons, ADU, data section): see :mod:`photowatch.sim.night`.
"""


from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path

import numpy as np

from photowatch.sim.camera import (
    ADC_MAX,
    BIAS_LEVEL_ADU,
    DARK_RATE_E_S,
    FULL_WELL_E,
    GAIN,
    HOT_FRACTION,
    INSTRUMENT,
    OVERSCAN_COLS,
    PIXEL_SIZE_CM,
    READ_NOISE_E,
    SATURATE_ADU,
    TELESCOPE,
    VIGNETTING,
)
from photowatch.sim.field import (
    format_dec,
    format_ra,
    format_time,
)


def _bias_structure(rng, n: int) -> np.ndarray:
    """Fixed 2-D bias in ADU above the overscan: offset, gradients, column pattern, edge glow."""
    x = np.arange(n, dtype=np.float32) / max(n, 1)
    y = np.arange(n, dtype=np.float32) / max(n, 1)
    cols = rng.normal(0.0, 0.8, n).astype(np.float32)
    cols[rng.choice(n, size=max(1, n // 500), replace=False)] += 4.0  # warm columns
    per_col = 1.2 + 2.5 * x + cols + 3.0 * np.exp(-x / 0.02)
    return (per_col[None, :] - 1.0 * y[:, None]).astype(np.float32)


def _row_pattern(n: int, index: int, phases, rng) -> np.ndarray:
    """Overscan level per row (ADU): ~1000 plus a smooth pattern that drifts frame to frame."""
    y = np.arange(n, dtype=np.float64) / max(n, 1)
    level = BIAS_LEVEL_ADU + 1.5 * math.sin(2 * math.pi * index / 17.0) + rng.normal(0, 0.3)
    pattern = (2.0 * np.sin(2 * np.pi * 1.3 * y + phases[0] + 0.02 * index)
               + 0.6 * np.cos(2 * np.pi * 3.1 * y + phases[1] - 0.015 * index)
               + 1.5 * (y - 0.5) ** 2)
    return (level + pattern).astype(np.float32)


def _dark_map(rng, n: int) -> np.ndarray:
    dark = np.full((n, n), DARK_RATE_E_S, np.float32)
    nhot = max(1, int(round(HOT_FRACTION * n * n)))
    idx = rng.choice(n * n, size=nhot, replace=False)
    dark.ravel()[idx] = np.exp(rng.uniform(math.log(0.5), math.log(50.0), nhot))
    return dark


def _donut(flat: np.ndarray, xc: float, yc: float, radius: float, depth: float) -> None:
    """Multiply a dust donut (dark ring, lighter centre) into ``flat`` in place."""
    n = flat.shape[0]
    r_out = radius + 3
    x0, x1 = max(int(xc - r_out), 0), min(int(xc + r_out) + 1, n)
    y0, y1 = max(int(yc - r_out), 0), min(int(yc + r_out) + 1, n)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    r = np.hypot(xx - xc, yy - yc)
    edge = 1.0
    outer = 1.0 / (1.0 + np.exp((r - radius) / edge))
    inner = 1.0 / (1.0 + np.exp((r - 0.55 * radius) / edge))
    shadow = depth * (outer - 0.6 * inner)
    flat[y0:y1, x0:x1] *= (1.0 - shadow).astype(np.float32)


def _flat_field(n: int, binning: int, band: str, common, filt_rng) -> np.ndarray:
    """True flat (mean 1): vignetting, dust donuts, pixel response, a bad column."""
    x = (np.arange(n, dtype=np.float32) - (n - 1) / 2 - common["vig_dx"] * n)
    y = (np.arange(n, dtype=np.float32) - (n - 1) / 2 - common["vig_dy"] * n)
    rc2 = 2 * (n / 2.0) ** 2
    vig = VIGNETTING.get(band, 0.04) * filt_rng.uniform(0.9, 1.1)
    flat = 1.0 - vig * (x[None, :] ** 2 + y[:, None] ** 2) / rc2
    flat = flat.astype(np.float32)
    flat *= common["p2p"]
    flat *= 1.0 + filt_rng.normal(0, 0.003, (n, n)).astype(np.float32)
    for xc, yc, rad, depth in common["donuts"]:
        _donut(flat, xc, yc, rad, depth)
    for _ in range(2):  # dust on the filter
        rad = filt_rng.uniform(60, 200) / binning
        _donut(flat, filt_rng.uniform(0, n), filt_rng.uniform(0, n), rad,
               filt_rng.uniform(0.01, 0.05))
    flat[:, common["bad_column"]] *= 0.2 / float(np.mean(flat[:, common["bad_column"]]))
    flat /= np.float32(flat.mean(dtype=np.float64))
    return flat


def _sky_pattern(rng, n: int, amp: float) -> np.ndarray:
    """A smooth additive sky pattern (fringes/illumination): zero mean, max |p| = amp."""
    x = np.arange(n, dtype=np.float32) / np.float32(max(n, 1))
    l1, l2, l3, l4 = (np.float32(v) for v in rng.uniform(0.4, 0.8, 4))
    p1, p2, p3 = (np.float32(v) for v in rng.uniform(0, 2 * np.pi, 3))
    two_pi = np.float32(2 * np.pi)
    ax, ay = two_pi * x / l1, two_pi * x / l2 + p1
    # sin(a+b) = sin a cos b + cos a sin b, built from outer products
    wave = np.outer(np.cos(ay), np.sin(ax)) + np.outer(np.sin(ay), np.cos(ax))
    wave *= np.float32(0.7)
    wave += np.outer(np.float32(0.5) * np.cos(two_pi * x / l4 + p3), np.sin(two_pi * x / l3 + p2))
    wave -= np.float32(wave.mean(dtype=np.float64))
    wave *= np.float32(amp / np.abs(wave).max())
    return wave


# ==============================================================================================
# Stars and catalogue
# ==============================================================================================


def _photon_noise(rng, lam: np.ndarray) -> np.ndarray:
    """Poisson electrons (Gaussian approximation where the mean is >= 64)."""
    lam = np.maximum(lam, 0, dtype=np.float32)
    out = rng.standard_normal(lam.shape, dtype=np.float32)
    out *= np.sqrt(lam)
    out += lam
    small = lam < 64
    if small.any():
        out[small] = rng.poisson(lam[small])
    return out


def _cosmics(rng, n: int, binning: int, exptime_s: float, rate: float):
    """Cosmic-ray charge: (flat pixel indices, e- per pixel, number of events)."""
    area_cm2 = (n * binning * PIXEL_SIZE_CM) ** 2
    nev = int(rng.poisson(rate * area_cm2 * exptime_s / 60.0))
    xs, ys, ws = [], [], []
    for _ in range(nev):
        energy = math.exp(rng.uniform(math.log(300.0), math.log(20000.0)))
        kind = rng.random()
        x0, y0 = rng.uniform(0, n - 1), rng.uniform(0, n - 1)
        if kind < 0.4:  # a spot: mostly one pixel, some sharing
            px = np.array([round(x0) + rng.normal(0, 0.12)])
            py = np.array([round(y0) + rng.normal(0, 0.12)])
            w = np.array([1.0])
        elif kind < 0.8:  # a straight track
            length = rng.uniform(2.0, 15.0)
            ang = rng.uniform(0, 2 * np.pi)
            s = np.arange(0.0, length + 1e-9, 0.25)
            px, py = x0 + s * math.cos(ang), y0 + s * math.sin(ang)
            w = rng.gamma(3.0, 1.0, s.size)
        else:  # a worm (low-energy electron): a wandering path
            length = rng.uniform(3.0, 10.0)
            steps = int(length / 0.25)
            ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.35, steps))
            px = x0 + np.cumsum(0.25 * np.cos(ang))
            py = y0 + np.cumsum(0.25 * np.sin(ang))
            w = rng.gamma(4.0, 1.0, steps)
        w = energy * w / w.sum()
        xs.append(px)
        ys.append(py)
        ws.append(w)
    if not nev:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), 0
    uniq, val = deposit((n, n), np.concatenate(xs), np.concatenate(ys), np.concatenate(ws))
    return uniq, val.astype(np.float32), nev


def deposit(shape: tuple[int, int], px, py, w):
    """Charge ``w`` (e-) at sub-pixel positions (``px``, ``py``: column, row), each shared
    bilinearly among its four nearest pixels inside ``shape``: (the flat indices, each
    once, and the e- they receive)."""
    ny, nx = shape
    ix, iy = np.floor(px).astype(int), np.floor(py).astype(int)
    tx, ty = px - ix, py - iy
    idx, val = [], []
    for dx, dy, ww in ((0, 0, (1 - tx) * (1 - ty)), (1, 0, tx * (1 - ty)),
                       (0, 1, (1 - tx) * ty), (1, 1, tx * ty)):
        xx, yy = ix + dx, iy + dy
        ok = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny) & (ww > 0)
        idx.append(yy[ok] * nx + xx[ok])
        val.append(w[ok] * ww[ok])
    idx, val = np.concatenate(idx), np.concatenate(val)
    uniq, inv = np.unique(idx, return_inverse=True)
    return uniq, np.bincount(inv, weights=val)


def _spill(seg: np.ndarray, amount: float, full_well: float) -> None:
    cap = np.maximum(full_well - seg, 0.0)
    cs = np.cumsum(cap, dtype=np.float64)
    k = int(np.searchsorted(cs, amount))
    seg[:k] = np.maximum(seg[:k], full_well)
    if k < seg.size:
        seg[k] += amount - (cs[k - 1] if k else 0.0)


def _bleed(q: np.ndarray, full_well: float = FULL_WELL_E) -> None:
    """Charge above full well spills up and down its column (in place)."""
    ny = q.shape[0]
    cols = np.flatnonzero((q > full_well).any(axis=0))
    for c in cols.tolist():
        col = q[:, c]
        over = np.flatnonzero(col > full_well)
        if over.size > ny // 2:
            np.minimum(col, full_well, out=col)
            continue
        breaks = np.flatnonzero(np.diff(over) > 1)
        starts = np.r_[over[0], over[breaks + 1]]
        ends = np.r_[over[breaks], over[-1]] + 1
        for a, b in zip(starts.tolist(), ends.tolist()):
            excess = float((col[a:b] - full_well).clip(0).sum())
            col[a:b] = np.minimum(col[a:b], full_well)
            if a > 0:
                _spill(col[a - 1::-1], excess / 2, full_well)
            if b < ny:
                _spill(col[b:], excess / 2, full_well)


def _readout(rng, electrons: np.ndarray | None, n: int, row_adu: np.ndarray,
             bias_adu: np.ndarray) -> np.ndarray:
    """Raw uint16 frame (n, n + 32): data + overscan, read noise, rounding, clipping."""
    raw = np.empty((n, n + OVERSCAN_COLS), np.float32)
    if electrons is None:
        raw[:, :n] = bias_adu
    else:
        np.multiply(electrons, np.float32(1.0 / GAIN), out=raw[:, :n])
        raw[:, :n] += bias_adu
    raw[:, n:] = 0.0
    raw += row_adu[:, None]
    noise = rng.standard_normal(raw.shape, dtype=np.float32)
    noise *= np.float32(READ_NOISE_E / GAIN)
    raw += noise
    np.rint(raw, out=raw)
    np.clip(raw, 0, ADC_MAX, out=raw)
    return raw.astype(np.uint16)


# ==============================================================================================
# Files
# ==============================================================================================
def _write_fits(path: Path, data: np.ndarray, header=None) -> None:
    """Write atomically (a hidden temporary name, then rename)."""
    from astropy.io import fits

    tmp = path.with_name(f".{path.name}.part")
    fits.PrimaryHDU(data=data, header=header).writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _raw_header(*, obstype: str, filt: str | None, exptime_s: float, obs_time: datetime,
                objname: str, ra_deg: float, dec_deg: float, binning: int, n: int,
                airmass_value: float):
    from astropy.io import fits

    hdr = fits.Header()
    hdr["INSTRUME"] = (INSTRUMENT, "instrument")
    hdr["TELESCOP"] = (TELESCOPE, "telescope")
    hdr["OBSERVAT"] = ("LDT", "observatory")
    hdr["ORIGIN"] = ("photowatch.sim.night", "simulated frame")
    hdr["OBSTYPE"] = (obstype, "observation type")
    hdr["FILTER1"] = (filt or "OPEN", "filter wheel 1")
    hdr["FILTER2"] = ("OPEN", "filter wheel 2")
    hdr["EXPTIME"] = (float(exptime_s), "[s] exposure time")
    hdr["DATE-OBS"] = (format_time(obs_time), "UTC start of exposure")
    hdr["OBJNAME"] = (objname, "target name")
    hdr["OBJECT"] = (objname, "target name")
    hdr["RA"] = (format_ra(ra_deg), "telescope RA (hours)")
    hdr["DEC"] = (format_dec(dec_deg), "telescope Dec (deg)")
    hdr["EQUINOX"] = 2000.0
    hdr["AIRMASS"] = (round(airmass_value, 4), "airmass at mid-exposure")
    hdr["CCDSUM"] = (f"{binning} {binning}", "on-chip binning")
    hdr["DATASEC"] = (f"[1:{n},1:{n}]", "data section")
    hdr["BIASSEC"] = (f"[{n + 1}:{n + OVERSCAN_COLS},1:{n}]", "overscan section")
    hdr["GAIN"] = (GAIN, "[e-/ADU]")
    hdr["RDNOISE"] = (READ_NOISE_E, "[e-] read noise")
    hdr["SATURATE"] = (SATURATE_ADU, "[ADU] saturation")
    return hdr


# ==============================================================================================
# The night
# ==============================================================================================
