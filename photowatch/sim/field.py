"""Where the simulated night looks: time and airmass, sexagesimal, offsets, the true
TAN-SIP WCS, and the star field with its reference-catalogue errors.

Randomness: :func:`_rng` (``numpy.random.default_rng([seed, *key])``), see
:mod:`photowatch.sim.night`.
"""


from __future__ import annotations

import math
import zlib
from datetime import datetime

import numpy as np

from photowatch.sim.camera import (
    BRIGHT_MAG,
    COUNT_SLOPE,
    SITE_LAT_DEG,
    SITE_LON_DEG,
)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _name_key(text: str) -> int:
    return zlib.crc32(text.encode())


def _jd(t: datetime) -> float:
    return t.timestamp() / 86400.0 + 2440587.5


def local_sidereal_deg(t: datetime, lon_deg: float = SITE_LON_DEG) -> float:
    gmst_h = 18.697374558 + 24.06570982441908 * (_jd(t) - 2451545.0)
    return (gmst_h * 15.0 + lon_deg) % 360.0


def airmass(t: datetime, ra_deg: float, dec_deg: float) -> float:
    """Kasten & Young airmass at the LDT (altitude floored at 5 deg)."""
    ha = math.radians(local_sidereal_deg(t) - ra_deg)
    lat, dec = math.radians(SITE_LAT_DEG), math.radians(dec_deg)
    sin_alt = math.sin(lat) * math.sin(dec) + math.cos(lat) * math.cos(dec) * math.cos(ha)
    alt = max(math.degrees(math.asin(max(-1.0, min(1.0, sin_alt)))), 5.0)
    z = 90.0 - alt
    return 1.0 / (math.cos(math.radians(z)) + 0.50572 * (96.07995 - z) ** -1.6364)


def format_ra(ra_deg: float) -> str:
    cs = round((ra_deg % 360.0) / 15.0 * 3600 * 100) % (24 * 3600 * 100)
    h, rest = divmod(cs, 3600 * 100)
    m, s = divmod(rest, 60 * 100)
    return f"{h:02d}:{m:02d}:{s // 100:02d}.{s % 100:02d}"


def format_dec(dec_deg: float) -> str:
    sign = "-" if dec_deg < 0 else "+"
    ds = round(abs(dec_deg) * 3600 * 10)
    d, rest = divmod(ds, 3600 * 10)
    m, s = divmod(rest, 60 * 10)
    return f"{sign}{d:02d}:{m:02d}:{s // 10:02d}.{s % 10:d}"


def parse_sexagesimal(text: str, hours: bool) -> float:
    sign = -1.0 if text.strip().startswith("-") else 1.0
    a, b, c = (abs(float(p)) for p in text.strip().split(":"))
    value = sign * (a + b / 60 + c / 3600)
    return value * 15.0 if hours else value


def format_time(t: datetime) -> str:
    return f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}"


def _offset_radec(ra: float, dec: float, east_arcsec: float, north_arcsec: float):
    """A position offset by (east, north) arcsec in the tangent plane at (ra, dec)."""
    xi, eta = math.radians(east_arcsec / 3600), math.radians(north_arcsec / 3600)
    ra_out, dec_out = _deproject(np.array([xi]), np.array([eta]), ra, dec)
    return float(ra_out[0]), float(dec_out[0])


def _deproject(xi: np.ndarray, eta: np.ndarray, ra0: float, dec0: float):
    """Gnomonic: tangent-plane (xi east, eta north; radians) → ra, dec (deg)."""
    d0 = math.radians(dec0)
    denom = math.cos(d0) - eta * math.sin(d0)
    ra = np.degrees(np.arctan2(xi, denom)) + ra0
    dec = np.degrees(np.arctan2(math.sin(d0) + eta * math.cos(d0), np.hypot(xi, denom)))
    return ra % 360.0, dec


def _sky_offset_arcsec(ra, dec, ra0, dec0):
    """(east, north) arcsec of (ra, dec) from (ra0, dec0), small-angle."""
    dra = (np.asarray(ra) - ra0 + 180.0) % 360.0 - 180.0
    return dra * math.cos(math.radians(dec0)) * 3600.0, (np.asarray(dec) - dec0) * 3600.0


# ==============================================================================================
# World coordinates
# ==============================================================================================
def _sip_coefficients(n: int, distortion: float):
    """Radial SIP (A, B) of order 3 and a fitted inverse (AP, BP).

    dx = k u r^2, dy = k v r^2 (u, v from CRPIX), with k such that the
    relative distortion k r^2 equals ``distortion`` at the frame corner.
    """
    k = distortion / (2 * (n / 2.0) ** 2) if n > 0 else 0.0
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[3, 0] = a[1, 2] = k
    b[2, 1] = b[0, 3] = k
    # inverse: fit u - f as a cubic polynomial of the distorted f
    g = np.linspace(-0.72 * n, 0.72 * n, 41)
    u, v = (m.ravel() for m in np.meshgrid(g, g))
    r2 = u * u + v * v
    fu, fv = u + k * u * r2, v + k * v * r2
    terms = [(p, q) for p in range(4) for q in range(4) if 1 <= p + q <= 3]
    design = np.stack([fu ** p * fv ** q for p, q in terms], axis=1)
    scale = np.abs(design).max(axis=0)
    cu = np.linalg.lstsq(design / scale, u - fu, rcond=None)[0] / scale
    cv = np.linalg.lstsq(design / scale, v - fv, rcond=None)[0] / scale
    ap = np.zeros((4, 4))
    bp = np.zeros((4, 4))
    for (p, q), x, y in zip(terms, cu, cv):
        ap[p, q], bp[p, q] = x, y
    return a, b, ap, bp


def wcs_header(n: int, scale_arcsec: float, rotation_deg: float, flip: bool,
               ra_deg: float, dec_deg: float, sip=None):
    """A TAN-SIP FITS header: CRPIX at the centre of an n x n data section.

    ``rotation_deg`` is the sky position angle of the +y axis (east of north);
    normal parity has east to the left (x increases westwards) when north is
    up; ``flip`` mirrors it (x increases eastwards).
    """
    from astropy.io import fits

    s = scale_arcsec / 3600.0
    th = math.radians(rotation_deg)
    sx = 1.0 if flip else -1.0
    cd = [[sx * s * math.cos(th), s * math.sin(th)],
          [-sx * s * math.sin(th), s * math.cos(th)]]
    hdr = fits.Header()
    hdr["WCSAXES"] = 2
    hdr["CTYPE1"] = "RA---TAN-SIP" if sip else "RA---TAN"
    hdr["CTYPE2"] = "DEC--TAN-SIP" if sip else "DEC--TAN"
    hdr["CUNIT1"] = "deg"
    hdr["CUNIT2"] = "deg"
    hdr["CRPIX1"] = (n + 1) / 2.0
    hdr["CRPIX2"] = (n + 1) / 2.0
    hdr["CRVAL1"] = ra_deg
    hdr["CRVAL2"] = dec_deg
    hdr["CD1_1"], hdr["CD1_2"] = cd[0]
    hdr["CD2_1"], hdr["CD2_2"] = cd[1]
    hdr["RADESYS"] = "ICRS"
    hdr["EQUINOX"] = 2000.0
    if sip:
        for name, coef, low in (("A", sip[0], 2), ("B", sip[1], 2), ("AP", sip[2], 1),
                                ("BP", sip[3], 1)):
            hdr[f"{name}_ORDER"] = 3
            for p in range(4):
                for q in range(4):
                    # skip terms below 1e-8 px at the frame edge (fit noise)
                    if low <= p + q <= 3 and abs(coef[p, q]) * (n / 2) ** (p + q) > 1e-8:
                        hdr[f"{name}_{p}_{q}"] = float(coef[p, q])
    return hdr


# ==============================================================================================
# Point-spread function
# ==============================================================================================


def _make_stars(rng, ra0: float, dec0: float, half_deg: float, density: float,
                faint_mag: float, n_bright: int, bright_half_deg: float):
    """Uniform positions in a square (tangent plane) and power-law r magnitudes."""
    area = (2 * half_deg) ** 2
    lo, hi = 10 ** (COUNT_SLOPE * (BRIGHT_MAG - 22)), 10 ** (COUNT_SLOPE * (faint_mag - 22))
    n = int(rng.poisson(density * area * (hi - lo)))
    r = np.log10(lo + rng.random(n) * (hi - lo)) / COUNT_SLOPE + 22
    xi = rng.uniform(-half_deg, half_deg, n)
    eta = rng.uniform(-half_deg, half_deg, n)
    if n_bright:
        r = np.concatenate([rng.uniform(11.5, 13.5, n_bright), r])
        xi = np.concatenate([rng.uniform(-bright_half_deg, bright_half_deg, n_bright), xi])
        eta = np.concatenate([rng.uniform(-bright_half_deg, bright_half_deg, n_bright), eta])
    ra, dec = _deproject(np.radians(xi), np.radians(eta), ra0, dec0)
    gr = rng.uniform(0.2, 1.2, r.size)
    ri = 0.45 * gr - 0.05 + rng.normal(0, 0.03, r.size)
    iz = 0.25 * gr - 0.02 + rng.normal(0, 0.03, r.size)
    return {"id": np.arange(1, r.size + 1), "ra": ra, "dec": dec,
            "g": r + gr, "r": r, "i": r - ri, "z": r - ri - iz}


def catalog_error(mag: np.ndarray) -> np.ndarray:
    """Reference-catalogue 1-sigma error: 0.005 + 0.045 * 10**(0.2 (m - 21))."""
    return 0.005 + 0.045 * 10 ** (0.2 * (np.asarray(mag) - 21.0))


# ==============================================================================================
# Charge: noise, cosmic rays, bleeding, readout
# ==============================================================================================
