"""A realistic simulated LMI night, with the truth to check every product against.

One function, :func:`simulate_night`, writes the raw frames of one night of an
LMI-like camera (camera C0) and, next to them, everything that is true about
them: bias structure, dark current, flat field, sky pattern, star list, the
true WCS, zero point, seeing and transparency of each frame, a cosmic-ray mask
and a noiseless star image. The demo, the tests and the benchmarks all use it.

Layout of ``OUT``::

    raw/lmi.0001.fits ...        raw frames in observation order (uint16, BZERO 32768)
    catalog.ecsv                 reference catalogue (ra, dec, <b>, <b>_err for g r i z)
    truth/night.json             parameters and every frame's truth (:class:`SimFrame`)
    truth/bias_e.fits            bias structure left after overscan subtraction (e-)
    truth/dark_e_per_s.fits      dark current incl. hot pixels (e-/s/px)
    truth/flat_<FILTER>.fits     flat field, normalised to mean 1 over the data section
    truth/skypattern_<FILTER>.fits  relative additive sky pattern p (sky = S (1 + p))
    truth/stars.ecsv             every star: id, ra, dec, g, r, i, z (true AB mags)
    truth/crmask_<raw>.fits      per object frame: cosmic-ray truth mask (uint8)
    truth/model_<raw>.fits       per object frame: noiseless stars in e-, flat-fielded

Conventions
-----------
- Pixels: the data section is ``raw[:, :N]`` (FITS columns 1..N); the overscan
  is ``raw[:, N:N+32]``. Every truth image covers the data section only and is
  indexed ``[y, x]``, 0-based; the true WCS uses the same pixels
  (``wcs.all_world2pix(ra, dec, 0)``), i.e. the pixels of the reduced product.
- Electrons: raw ADU = e- / GAIN + overscan level(row) + bias structure(y, x)
  + read noise, rounded and clipped to 0..65535. ``e-`` in the raw image is
  ``flat * (sky * (1 + p) + stars) + dark * t + cosmic rays`` (plus bleeding).
- Flat: the true flat multiplies sky and star electrons, not dark current. It
  is normalised to **mean 1 over the data section** (its median is stored in
  ``params['flat_median'][FILTER]``; a pipeline normalising its master flat to
  median 1 gets images larger by ``1 / median`` and zero points brighter by
  ``2.5 log10(1 / median)``).
- Flat-fielded image: ``(raw - overscan - bias) * GAIN - dark * t`` divided by
  the true flat. In it a star's total electrons are ``10**(-0.4 (m - zp_true))``
  with ``m`` the star's true magnitude in the frame's band; the model image
  holds exactly these stars (each stamp sums exactly to the flux; stars partly
  off the frame are clipped).
- ``zp_true = zp1[band] + 2.5 log10(exptime * transparency) - k[band] (airmass - 1)``.
- Sky rates in ``sky_rates`` are e-/s per 0.24" pixel (2x2 binning) and scale
  with the pixel area; dark current and hot pixels are per (binned) pixel.
- Cosmic rays: ``cr_rate`` events per cm2 per minute of detector (15 um
  unbinned pixels); the truth mask holds pixels whose CR charge exceeds 5 sigma
  of ``sqrt(flat*sky*(1+p) + dark*t + rn**2)`` (e-).

Randomness comes only from ``numpy.random.default_rng``: night-level
structures from ``default_rng([seed, 1_000_000 + k])`` and frame ``i`` (0-based
observation order) from ``default_rng([seed, i])``, so a seed gives the same
files byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path

import numpy as np

# --- the camera -------------------------------------------------------------------------------
INSTRUMENT = "LMI"
TELESCOPE = "LDT"
CAMERA = "C0"
GAIN = 2.89  #: e-/ADU
READ_NOISE_E = 6.0
SATURATE_ADU = 65000.0  #: header SATURATE
ADC_MAX = 65535  #: raw values are clipped here (uint16)
FULL_WELL_E = 200000.0  #: charge above this bleeds along the column
BIAS_LEVEL_ADU = 1000.0
OVERSCAN_COLS = 32
UNBINNED_SCALE_ARCSEC = 0.12
PIXEL_SIZE_CM = 15e-4  #: unbinned pixel
SITE_LAT_DEG = 34.7444
SITE_LON_DEG = -111.4223
MOFFAT_BETA = 3.0

# --- the sky and the stars ---------------------------------------------------------------------
BANDS = ("g", "r", "i", "z")
FILTER_BAND = {"SDSS-G": "g", "SDSS-R": "r", "SDSS-I": "i", "SDSS-Z": "z"}
ZP1 = {"g": 25.6, "r": 25.5, "i": 25.3, "z": 24.6}  #: mag giving 1 e-/s above the atmosphere
EXTINCTION = {"g": 0.18, "r": 0.10, "i": 0.07, "z": 0.06}  #: mag per airmass
SKY_RATES = {"g": 8.0, "r": 15.0, "i": 25.0, "z": 30.0}  #: e-/s per 0.24" pixel
SKY_PATTERN_AMP = {"g": 0.008, "r": 0.012, "i": 0.018, "z": 0.022}  #: max |p|
VIGNETTING = {"g": 0.05, "r": 0.04, "i": 0.035, "z": 0.03}  #: loss in the corners
DARK_RATE_E_S = 0.003
HOT_FRACTION = 0.001
COUNT_SLOPE = 0.3  #: d log10 N(<m) / dm
BRIGHT_MAG, FAINT_MAG_DEFAULT = 12.0, 23.5

FLAT_FAINT_FRACTION = 0.13  #: of SATURATE, median of the too-faint flat
FLAT_SATURATED_FRACTION = 1.3  #: of SATURATE, the saturated flat (clipped at 65535)
FLAT_GOOD_FRACTIONS = (0.30, 0.65)  #: range of the good flats
CR_SIGMA = 5.0


# ==============================================================================================
# Truth records
# ==============================================================================================
@dataclass
class SimFrame:
    """One raw frame, in observation order, and what is true about it.

    Units: electrons (e-), seconds, arcsec; ``obs_time`` is the UTC start.
    ``zp_true`` is the zero point of the flat-fielded image in electrons:
    ``m = zp_true - 2.5 log10(total e- of the star)``.
    """

    path: Path
    kind: str  #: bias | dark | flat | object | ignored
    filter: str | None
    band: str | None
    exptime_s: float
    obs_time: datetime
    target: str | None = None
    wcs_header: str | None = None  #: true WCS (TAN-SIP) as header text (object frames)
    zp_true: float | None = None
    transparency: float | None = None
    fwhm_arcsec: float | None = None
    #: mean sky e- per pixel in flat-fielded units (object frames: before the sky pattern p)
    sky_e_per_px: float | None = None
    pointing_offset_arcsec: tuple[float, float] | None = None  #: header - true, (east, north)
    expect: str | None = None  #: None | cloud | focus | nosolve | saturated | faint | satellite | ignored
    crmask_path: Path | None = None
    model_path: Path | None = None
    # extras -----------------------------------------------------------------------------------
    index: int = 0  #: 0-based position in observation order
    shape: tuple[int, int] | None = None  #: data section (ny, nx)
    airmass: float | None = None
    ra_deg: float | None = None  #: true centre (CRVAL, at the data-section centre)
    dec_deg: float | None = None
    dither_arcsec: tuple[float, float] | None = None  #: true centre - target, (east, north)
    n_cosmics: int | None = None  #: cosmic-ray events deposited
    flat_level_adu: float | None = None  #: intended raw median of a flat (ADU)
    psf_beta: float | None = None  #: Moffat beta when drawn per frame (``psf_beta_range``)
    injected: list | None = None  #: injected sources' truth (sim/inject.py), object frames

    @property
    def raw_name(self) -> str:
        return self.path.name

    def wcs(self):
        """The true WCS (astropy, TAN-SIP, 0-based pixels of the data section)."""
        from astropy.io import fits
        from astropy.wcs import WCS

        if not self.wcs_header:
            raise ValueError(f"{self.raw_name}: no WCS (a {self.kind} frame)")
        wcs = WCS(fits.Header.fromstring(self.wcs_header, sep="\n"))
        if self.shape:
            wcs.pixel_shape = (self.shape[1], self.shape[0])
        return wcs

    def to_json(self, root: Path) -> dict:
        data = asdict(self)
        for key in ("path", "crmask_path", "model_path"):
            if data[key] is not None:
                data[key] = os.path.relpath(data[key], root)
        data["obs_time"] = self.obs_time.isoformat(timespec="milliseconds")
        return data

    @classmethod
    def from_json(cls, data: dict, root: Path) -> SimFrame:
        data = dict(data)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("path", "crmask_path", "model_path"):
            if data.get(key) is not None:
                data[key] = Path(root) / data[key]
        data["obs_time"] = datetime.fromisoformat(data["obs_time"])
        for key in ("pointing_offset_arcsec", "shape", "dither_arcsec"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class SimNight:
    """A simulated night on disk: raw frames, truth and the reference catalogue."""

    root: Path
    raw_dir: Path
    truth_dir: Path
    catalog_path: Path | None
    frames: list[SimFrame]
    params: dict = field(default_factory=dict)

    def objects(self, filter: str | None = None, *, good_only: bool = False) -> list[SimFrame]:
        """Object frames (optionally of one filter; ``good_only``: without an ``expect``)."""
        return [f for f in self.frames
                if f.kind == "object" and (filter is None or f.filter == filter)
                and not (good_only and f.expect)]

    def of_kind(self, kind: str, filter: str | None = None) -> list[SimFrame]:
        return [f for f in self.frames
                if f.kind == kind and (filter is None or f.filter == filter)]

    @classmethod
    def load(cls, root: str | Path) -> SimNight:
        """Read ``root/truth/night.json``."""
        root = Path(root)
        data = json.loads((root / "truth" / "night.json").read_text())
        cat = root / "catalog.ecsv"
        return cls(root=root, raw_dir=root / "raw", truth_dir=root / "truth",
                   catalog_path=cat if cat.exists() else None,
                   frames=[SimFrame.from_json(f, root) for f in data["frames"]],
                   params=data["params"])

    # --- truth readers --------------------------------------------------------------------
    def _image(self, name: str) -> np.ndarray:
        from astropy.io import fits

        return np.asarray(fits.getdata(self.truth_dir / name), dtype=np.float32)

    def true_bias_e(self) -> np.ndarray:
        return self._image("bias_e.fits")

    def true_dark_e_per_s(self) -> np.ndarray:
        return self._image("dark_e_per_s.fits")

    def true_flat(self, filter: str) -> np.ndarray:
        return self._image(f"flat_{filter}.fits")

    def cr_charge(self, frame: SimFrame) -> np.ndarray | None:
        """Cosmic-ray charge of an object frame in background sigmas (``write_crcharge``)."""
        path = self.truth_dir / f"crcharge_{frame.path.stem}.fits"
        return self._image(path.name) if path.exists() else None

    def true_sky_pattern(self, filter: str) -> np.ndarray:
        return self._image(f"skypattern_{filter}.fits")

    @cached_property
    def stars(self):
        """The true star list (astropy Table: id, ra, dec, g, r, i, z)."""
        from astropy.table import Table

        return Table.read(self.truth_dir / "stars.ecsv", format="ascii.ecsv")

    def frame_stars(self, frame: SimFrame, margin_px: float = 0.0):
        """Stars on an object frame: the star list plus x, y (0-based), mag, flux_e.

        ``flux_e`` is the star's total electrons in the flat-fielded image.
        """
        wcs = frame.wcs()
        stars = self.stars
        x, y = wcs.all_world2pix(np.asarray(stars["ra"]), np.asarray(stars["dec"]), 0)
        ny, nx = frame.shape
        keep = ((x > -0.5 - margin_px) & (x < nx - 0.5 + margin_px)
                & (y > -0.5 - margin_px) & (y < ny - 0.5 + margin_px))
        out = stars[keep]
        out["x"] = x[keep]
        out["y"] = y[keep]
        out["mag"] = out[frame.band]
        out["flux_e"] = 10 ** (-0.4 * (np.asarray(out["mag"]) - frame.zp_true))
        return out


# ==============================================================================================
# Small helpers
# ==============================================================================================
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
class _Psf:
    """A pixel-integrated Moffat (optionally trailed) tabulated on a fine grid.

    The table ``P`` holds the PSF integrated over a whole pixel, sampled every
    1/K pixel (K sub-samples per pixel for the integration, more than the 3x
    oversampling the stamps need). A star's stamp at any sub-pixel position is
    a bilinear interpolation between four phase-shifted samplings of ``P``, and
    is then scaled to sum exactly to the star's flux. The stamp radius is at
    least 5 FWHM.
    """

    def __init__(self, fwhm_px: float, beta: float = MOFFAT_BETA,
                 trail_px: float = 0.0, trail_angle_deg: float = 0.0):
        core = max(math.ceil(5.0 * fwhm_px), 4)
        radius = core + (math.ceil(trail_px / 2) + 1 if trail_px else 0)
        k = 32 if radius <= 16 else 16 if radius <= 40 else 8 if radius <= 100 else 4
        m0 = (radius + 2) * k
        pts = (np.arange(-m0, m0) + 0.5) / k
        alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        r2 = pts[:, None] ** 2 + pts[None, :] ** 2
        moffat = (1.0 + r2 / alpha ** 2) ** (-beta)
        if trail_px:
            from scipy.signal import fftconvolve

            n = max(int(round(trail_px * k)), 1)
            steps = (np.arange(n + 1) / n - 0.5) * trail_px * k
            ang = math.radians(trail_angle_deg)
            half = int(math.ceil(trail_px * k / 2)) + 2
            kern = np.zeros((2 * half + 1, 2 * half + 1))
            fx, fy = steps * math.cos(ang) + half, steps * math.sin(ang) + half
            ix, iy = np.floor(fx).astype(int), np.floor(fy).astype(int)
            tx, ty = fx - ix, fy - iy
            for dy, dx, w in ((0, 0, (1 - tx) * (1 - ty)), (0, 1, tx * (1 - ty)),
                              (1, 0, (1 - tx) * ty), (1, 1, tx * ty)):
                np.add.at(kern, (iy + dy, ix + dx), w)
            moffat = fftconvolve(moffat, kern / kern.sum(), mode="same")
        cs = np.zeros((2 * m0 + 1, 2 * m0))
        np.cumsum(moffat, axis=0, out=cs[1:])
        box = cs[k:] - cs[:-k]
        cs = np.zeros((box.shape[0], box.shape[1] + 1))
        np.cumsum(box, axis=1, out=cs[:, 1:])
        self.table = (cs[:, k:] - cs[:, :-k]).astype(np.float32)
        self.k = k
        self.radius = radius
        self.centre = m0 - k // 2
        self.span = 2 * radius * k + 1

    def stamp(self, fx: float, fy: float) -> np.ndarray:
        """Unnormalised (2R+1)^2 stamp for a star at offset (fx, fy) in [-0.5, 0.5) px."""
        k, r, c, span, p = self.k, self.radius, self.centre, self.span, self.table
        gx, gy = fx * k, fy * k
        qx, qy = math.floor(gx), math.floor(gy)
        tx, ty = gx - qx, gy - qy
        sx, sy = c - r * k - qx, c - r * k - qy
        a = p[sy:sy + span:k, sx:sx + span:k]
        b = p[sy:sy + span:k, sx - 1:sx - 1 + span:k]
        cc = p[sy - 1:sy - 1 + span:k, sx:sx + span:k]
        d = p[sy - 1:sy - 1 + span:k, sx - 1:sx - 1 + span:k]
        return ((1 - ty) * ((1 - tx) * a + tx * b) + ty * ((1 - tx) * cc + tx * d))


def render_stars(shape: tuple[int, int], psf: _Psf, x: np.ndarray, y: np.ndarray,
                 flux: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Add stars (0-based pixel positions, total fluxes) to a float32 image."""
    img = np.zeros(shape, np.float32) if out is None else out
    ny, nx = shape
    r = psf.radius
    ix = np.floor(np.asarray(x) + 0.5).astype(int)
    iy = np.floor(np.asarray(y) + 0.5).astype(int)
    fxs, fys = np.asarray(x) - ix, np.asarray(y) - iy
    for cx, cy, fx, fy, f in zip(ix.tolist(), iy.tolist(), fxs.tolist(), fys.tolist(),
                                 np.asarray(flux, float).tolist()):
        x0, y0 = cx - r, cy - r
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(cx + r + 1, nx), min(cy + r + 1, ny)
        if xa >= xb or ya >= yb:
            continue
        st = psf.stamp(fx, fy)
        st *= f / float(st.sum())
        img[ya:yb, xa:xb] += st[ya - y0:yb - y0, xa - x0:xb - x0]
    return img


def _render_varying(shape, fwhm_px: float, beta: float, variation: float, x, y, flux,
                    zones: int = 6) -> np.ndarray:
    """Stars whose FWHM grows as ``1 + variation (r / r_corner)**2`` from the centre,
    rendered in ``zones`` rings of (r / r_corner)**2, each with its own PSF (at its mid)."""
    ny, nx = shape
    rc2 = ((nx - 1) / 2) ** 2 + ((ny - 1) / 2) ** 2
    q = ((np.asarray(x) - (nx - 1) / 2) ** 2 + (np.asarray(y) - (ny - 1) / 2) ** 2) / rc2
    zone = np.clip((q * zones).astype(int), 0, zones - 1)
    img = np.zeros(shape, np.float32)
    for k in np.unique(zone).tolist():
        sel = zone == k
        psf = _Psf(fwhm_px * (1.0 + variation * (k + 0.5) / zones), beta=beta)
        render_stars(shape, psf, np.asarray(x)[sel], np.asarray(y)[sel],
                     np.asarray(flux)[sel], out=img)
    return img


# ==============================================================================================
# Detector structures (fixed for the night)
# ==============================================================================================
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
    px, py, w = np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
    ix, iy = np.floor(px).astype(int), np.floor(py).astype(int)
    tx, ty = px - ix, py - iy
    idx, val = [], []
    for dx, dy, ww in ((0, 0, (1 - tx) * (1 - ty)), (1, 0, tx * (1 - ty)),
                       (0, 1, (1 - tx) * ty), (1, 1, tx * ty)):
        xx, yy = ix + dx, iy + dy
        ok = (xx >= 0) & (xx < n) & (yy >= 0) & (yy < n) & (ww > 0)
        idx.append(yy[ok] * n + xx[ok])
        val.append(w[ok] * ww[ok])
    idx, val = np.concatenate(idx), np.concatenate(val)
    uniq, inv = np.unique(idx, return_inverse=True)
    return uniq, np.bincount(inv, weights=val).astype(np.float32), nev


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
def simulate_night(
    out: str | Path,
    *,
    size: int = 1024,
    binning: int = 2,
    filters: tuple[str, ...] | list[str] = ("SDSS-R",),
    seed: int = 1,
    n_bias: int = 5,
    n_dark: int = 3,
    dark_exptime_s: float = 300.0,
    n_flat: int = 6,
    n_science: int = 6,
    exptime_s: float | tuple[float, ...] = 60.0,
    target: str = "NGC0001",
    ra_deg: float = 60.0,
    dec_deg: float = 25.0,
    dither_arcsec: float = 30.0,
    pointing_error_arcsec: float = 60.0,
    rotation_deg: float = 0.5,
    flip: bool = False,
    fwhm_arcsec: tuple[float, float] = (0.9, 1.5),
    star_density: float = 65000.0,
    catalog: bool = True,
    write_models: bool = True,
    write_crmasks: bool = True,
    write_crcharge: bool = False,
    cloud_frame: bool = False,
    defocus_frame: bool = False,
    nosolve_frame: bool = False,
    ignored_frame: bool = False,
    satellite_flat: bool = False,
    night_date: str = "2020-01-29",
    start_time: str = "02:00:00",
    readout_s: float = 15.0,
    science_order: str = "alternate",
    bad_flats: bool = True,
    transparency_range: tuple[float, float] = (0.85, 1.0),
    sky_variation: float = 0.10,
    sip_distortion: float = 1e-3,
    cr_rate: float = 1.5,
    n_bright: int = 3,
    faint_mag: float = FAINT_MAG_DEFAULT,
    catalog_mag_limit: float = 21.0,
    trail_px: float = 40.0,
    psf_variation: float = 0.0,
    psf_beta_range: tuple[float, float] | None = None,
    cloud_variation_mag: float = 0.0,
    cloud_period_s: tuple[float, float] = (120.0, 600.0),
    overwrite: bool = False,
    callback: Callable[[SimFrame], None] | None = None,
    injections: tuple | list = (),
) -> SimNight:
    """Simulate one night of an LMI-like camera into ``out`` and return its truth.

    Parameters
    ----------
    out
        Output folder: ``raw/``, ``truth/`` and ``catalog.ecsv`` are written in it.
    size
        Data section is ``size`` x ``size`` binned pixels (raw files have 32 more columns).
    binning
        On-chip binning b (CCDSUM 'b b'); pixel scale 0.12 * b arcsec.
    filters
        LMI filter names (SDSS-G, SDSS-R, SDSS-I, SDSS-Z).
    n_flat
        Twilight flats per filter, including (``bad_flats``, n_flat >= 3) one too faint
        (median 0.13 * SATURATE) first and one saturated (1.3 * SATURATE, clipped) last.
    exptime_s
        Science exposure time (s), or a sequence cycled through the science frames (a night
        of 30 s to 300 s exposures).
    n_science
        Good science frames per filter; the optional ``cloud_frame``, ``defocus_frame``,
        ``nosolve_frame`` (first filter) and ``ignored_frame`` (OBSTYPE FOCUS) come on top.
    science_order
        'alternate' (filter after filter at each dither) or 'block' (all of one filter first).
    star_density
        Stars per deg2 brighter than r = 22 (power law, slope 0.3 dex/mag, r from 12 to
        ``faint_mag``), plus ``n_bright`` stars of r 11.5-13.5 near the target that saturate.
    sip_distortion
        Relative radial distortion at the frame corner (k r^2 of dx = k u r^2).
    cr_rate
        Cosmic rays per cm2 of detector per minute (15 um unbinned pixels).
    write_models, write_crmasks
        Write ``truth/model_<raw>.fits`` / ``truth/crmask_<raw>.fits`` per object frame
        (turn off for 4k benchmarks; the SimFrame paths are then None).
    psf_variation
        The PSF varies over the field: a star's FWHM is the frame's times
        ``1 + psf_variation * (r / r_corner)**2`` (r from the frame centre), as the
        off-axis blur of real optics. 0 (default): one PSF per frame.
    psf_beta_range
        Draw each object frame's Moffat ``beta`` uniformly from this range (real frames'
        wings change from frame to frame, and with them the aperture correction); None
        (default): beta 3 on every frame.
    cloud_variation_mag
        Thin clouds that vary within minutes: each object frame's transparency is further
        dimmed by ``cloud_variation_mag * (0.5 + 0.5 sin(2 pi t / P + phi))`` mag, P drawn
        from ``cloud_period_s`` for the night (t: the frame's mid time). 0 (default): none.
        Few-star fields and short exposures come from ``star_density``, ``faint_mag``
        and ``exptime_s``.
    write_crcharge
        Also write ``truth/crcharge_<raw>.fits`` per object frame: every cosmic-ray pixel's
        charge in units of the background sigma of the truth mask (float32, 0 elsewhere),
        for scores that need the faint pixels of the hits too.
    overwrite
        Replace ``lmi.*.fits`` files already in ``out/raw`` (else FileExistsError).
    callback
        Called with each :class:`SimFrame` right after its raw file is in place.
    injections
        Sources added to the object frames (:mod:`photowatch.sim.inject`: an afterglow,
        a periodic variable, fake stars; ``sim/movers.py``: an asteroid), rendered like
        the stars, never in the catalogue; truth in ``truth/injections.json`` and each
        frame's ``injected``.

    Returns
    -------
    SimNight
        The frames in observation order with their truth; also saved as
        ``truth/night.json`` (:meth:`SimNight.load`).
    """
    from astropy.table import Table
    from astropy.wcs import WCS

    out = Path(out)
    raw_dir, truth_dir = out / "raw", out / "truth"
    filters = tuple(filters)
    for f in filters:
        if f not in FILTER_BAND:
            raise ValueError(f"filter {f!r} cannot be simulated (known: {sorted(FILTER_BAND)})")
    if science_order not in ("alternate", "block"):
        raise ValueError(f"science_order must be 'alternate' or 'block', not {science_order!r}")
    if size < 32 or binning < 1:
        raise ValueError(f"size must be >= 32 and binning >= 1 (got {size}, {binning})")
    existing = sorted(raw_dir.glob("lmi.*.fits")) if raw_dir.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{raw_dir} already holds {len(existing)} lmi.*.fits files "
                              "(pass overwrite=True to replace them)")
    for path in existing:
        path.unlink()
    if existing and truth_dir.is_dir():  # the old night's truth goes with its frames
        for pattern in ("crmask_lmi.*.fits", "crcharge_lmi.*.fits", "model_lmi.*.fits", "flat_*.fits",
                        "skypattern_*.fits"):
            for path in truth_dir.glob(pattern):
                path.unlink()
    raw_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)

    params = {k: v for k, v in locals().items()
              if k in _PARAM_NAMES}
    params = json.loads(json.dumps(params, default=str))
    n = int(size)
    scale = UNBINNED_SCALE_ARCSEC * binning
    pix_area_ratio = (scale / 0.24) ** 2
    sky_rates = {b: SKY_RATES[b] * pix_area_ratio for b in BANDS}

    # --- night-level structures ------------------------------------------------------------
    rng_det = _rng(seed, 1_000_000)
    bias_adu = _bias_structure(rng_det, n)
    row_phases = rng_det.uniform(0, 2 * np.pi, 2)
    dark = _dark_map(_rng(seed, 1_000_001), n)
    rng_flat = _rng(seed, 1_000_002)
    common = {
        "vig_dx": rng_flat.uniform(-0.05, 0.05),
        "vig_dy": rng_flat.uniform(-0.05, 0.05),
        "p2p": (1.0 + rng_flat.normal(0, 0.01, (n, n))).astype(np.float32),
        "bad_column": int(rng_flat.integers(n // 4, 3 * n // 4)),
        "donuts": [(rng_flat.uniform(0, n), rng_flat.uniform(0, n),
                    rng_flat.uniform(60, 200) / binning, rng_flat.uniform(0.01, 0.05))
                   for _ in range(4)],
    }
    flats, patterns, flat_median = {}, {}, {}
    for f in filters:
        band = FILTER_BAND[f]
        flats[f] = _flat_field(n, binning, band, common, _rng(seed, 1_000_003, _name_key(f)))
        flat_median[f] = float(np.median(flats[f]))
        patterns[f] = _sky_pattern(_rng(seed, 1_000_004, _name_key(f)), n,
                                   SKY_PATTERN_AMP[band])
    del common["p2p"]
    sip = _sip_coefficients(n, sip_distortion)

    field_half = n * scale / 2.0
    star_half = (field_half * math.sqrt(2) + (dither_arcsec + pointing_error_arcsec)
                 * math.sqrt(2) + 20.0) / 3600.0
    stars = _make_stars(_rng(seed, 1_000_005), ra_deg, dec_deg, star_half, star_density,
                        faint_mag, n_bright, 0.3 * field_half / 3600.0)

    # --- truth files of the night ------------------------------------------------------------
    _write_fits(truth_dir / "bias_e.fits", (bias_adu * GAIN).astype(np.float32))
    _write_fits(truth_dir / "dark_e_per_s.fits", dark)
    for f in filters:
        _write_fits(truth_dir / f"flat_{f}.fits", flats[f])
        _write_fits(truth_dir / f"skypattern_{f}.fits", patterns[f])
    star_table = Table({k: v for k, v in stars.items()})
    for b in BANDS:
        star_table[b].info.format = ".4f"
    star_table.write(truth_dir / "stars.ecsv", format="ascii.ecsv", overwrite=True)
    catalog_path = None
    if catalog:
        rng_cat = _rng(seed, 1_000_006)
        keep = stars["r"] < catalog_mag_limit
        cat = Table({"ra": stars["ra"][keep], "dec": stars["dec"][keep]})
        for b in BANDS:
            err = catalog_error(stars[b][keep])
            cat[b] = stars[b][keep] + rng_cat.normal(0, 1, keep.sum()) * err
            cat[f"{b}_err"] = err
            cat[b].info.format = ".4f"
            cat[f"{b}_err"].info.format = ".4f"
        cat.meta["comment"] = ["photowatch simulated reference catalogue (AB mags)"]
        catalog_path = out / "catalog.ecsv"
        cat.write(catalog_path, format="ascii.ecsv", overwrite=True)

    target_radec = (ra_deg, dec_deg)
    if injections:  # sim/inject.py: injections choose their places among the true stars
        from photowatch.sim.inject import place

        target_radec = place(injections, stars, ra_deg, dec_deg)

    # --- the plan: every frame in observation order -------------------------------------------
    plan: list[dict] = []
    plan += [{"kind": "bias", "exptime": 0.0} for _ in range(n_bias)]
    plan += [{"kind": "dark", "exptime": float(dark_exptime_s)} for _ in range(n_dark)]
    for f in filters:
        with_bad = bad_flats and n_flat >= 3
        n_good = n_flat - 2 if with_bad else n_flat
        levels = list(np.linspace(*FLAT_GOOD_FRACTIONS, n_good)) if n_good > 1 else \
            [float(np.mean(FLAT_GOOD_FRACTIONS))] * n_good
        expects: list[str | None] = [None] * n_good
        if satellite_flat and n_good:
            expects[min(1, n_good - 1)] = "satellite"
        if with_bad:
            levels = [FLAT_FAINT_FRACTION, *levels, FLAT_SATURATED_FRACTION]
            expects = ["faint", *expects, "saturated"]
        for j, (level, exp) in enumerate(zip(levels, expects)):
            plan.append({"kind": "flat", "filter": f, "exptime": round(2.0 * 1.4 ** j, 1),
                         "level": level * SATURATE_ADU, "expect": exp})
    if ignored_frame:
        plan.append({"kind": "ignored", "filter": filters[0], "exptime": 10.0,
                     "expect": "ignored"})
    science: list[dict] = []
    if science_order == "alternate":
        pairs = [(j, f) for j in range(n_science) for f in filters]
    else:
        pairs = [(j, f) for f in filters for j in range(n_science)]
    exptimes = tuple(exptime_s) if isinstance(exptime_s, tuple | list) else (exptime_s,)
    science = [{"kind": "object", "filter": f, "exptime": float(exptimes[k % len(exptimes)]),
                "expect": None} for k, (_, f) in enumerate(pairs)]
    extras = [name for name, on in (("cloud", cloud_frame), ("focus", defocus_frame),
                                    ("nosolve", nosolve_frame)) if on]
    firsts = [i for i, s in enumerate(science) if s["filter"] == filters[0]]
    at = firsts[1] + 1 if len(firsts) > 1 else len(science)
    science[at:at] = [{"kind": "object", "filter": filters[0], "exptime": float(exptimes[0]),
                       "expect": e} for e in extras]
    plan += science

    hh, mm, ss = (float(v) for v in start_time.split(":"))
    t = datetime.fromisoformat(night_date).replace(tzinfo=UTC) + timedelta(
        hours=hh, minutes=mm, seconds=ss)
    rng_time = _rng(seed, 1_000_007)
    for entry in plan:
        t += timedelta(milliseconds=int(rng_time.integers(0, 1000)))
        t += timedelta(microseconds=-t.microsecond % 1000)  # whole milliseconds
        entry["obs_time"] = t
        t += timedelta(seconds=entry["exptime"] + readout_s + float(rng_time.uniform(0, 2)))

    clouds = None
    if cloud_variation_mag > 0:
        rng_cloud = _rng(seed, 1_000_008)
        clouds = (float(cloud_variation_mag), float(rng_cloud.uniform(*cloud_period_s)),
                  float(rng_cloud.uniform(0, 2 * np.pi)), plan[0]["obs_time"])

    # --- frames --------------------------------------------------------------------------------
    frames: list[SimFrame] = []
    for index, entry in enumerate(plan):
        rng = _rng(seed, index)
        kind, filt = entry["kind"], entry.get("filter")
        band = FILTER_BAND.get(filt) if filt else None
        obs_time, exptime = entry["obs_time"], entry["exptime"]
        path = raw_dir / f"lmi.{index + 1:04d}.fits"
        mid = obs_time + timedelta(seconds=exptime / 2)
        row_adu = _row_pattern(n, index, row_phases, rng)
        frame = SimFrame(path=path, kind=kind, filter=filt, band=band, exptime_s=exptime,
                         obs_time=obs_time, expect=entry.get("expect"), index=index,
                         shape=(n, n))
        zen_ra, zen_dec = local_sidereal_deg(mid), SITE_LAT_DEG
        if kind == "bias":
            raw = _readout(rng, None, n, row_adu, bias_adu)
            hdr = _raw_header(obstype="BIAS", filt=None, exptime_s=0.0, obs_time=obs_time,
                              objname="bias", ra_deg=zen_ra, dec_deg=zen_dec,
                              binning=binning, n=n, airmass_value=1.0)
        elif kind == "dark":
            q = _photon_noise(rng, dark * np.float32(exptime))
            idx, val, ncr = _cosmics(rng, n, binning, exptime, cr_rate)
            q.ravel()[idx] += val
            frame.n_cosmics = ncr
            raw = _readout(rng, q, n, row_adu, bias_adu)
            hdr = _raw_header(obstype="DARK", filt=None, exptime_s=exptime, obs_time=obs_time,
                              objname="dark", ra_deg=zen_ra, dec_deg=zen_dec,
                              binning=binning, n=n, airmass_value=1.0)
        elif kind == "flat":
            raw, sky_e = _flat_frame(rng, n, scale, entry, flats[filt], dark, row_adu,
                                     bias_adu)
            frame.sky_e_per_px = sky_e
            frame.flat_level_adu = float(entry["level"])
            hdr = _raw_header(obstype="SKY FLAT", filt=filt, exptime_s=exptime,
                              obs_time=obs_time, objname="flat", ra_deg=zen_ra,
                              dec_deg=zen_dec, binning=binning, n=n,
                              airmass_value=1.0)
        else:
            raw, hdr = _object_frame(
                rng, frame, n=n, scale=scale, binning=binning, mid=mid, target=target,
                ra0=ra_deg, dec0=dec_deg, dither_arcsec=dither_arcsec,
                pointing_error_arcsec=pointing_error_arcsec, rotation_deg=rotation_deg,
                flip=flip, sip=sip, fwhm_range=fwhm_arcsec, stars=stars,
                transparency_range=transparency_range, sky_rate=sky_rates[band],
                sky_variation=sky_variation, flat=flats[filt], pattern=patterns[filt],
                dark=dark, row_adu=row_adu, bias_adu=bias_adu, cr_rate=cr_rate,
                trail_px=trail_px, truth_dir=truth_dir, psf_variation=psf_variation,
                psf_beta_range=psf_beta_range, clouds=clouds, seed=seed,
                write_crmasks=kind == "object" and write_crmasks,
                write_crcharge=kind == "object" and write_crcharge,
                write_models=kind == "object" and write_models, wcs_cls=WCS,
                injections=injections, target_radec=target_radec)
        _write_fits(path, raw, hdr)
        frames.append(frame)
        if callback is not None:
            callback(frame)

    params.update({
        "instrument": "lmi", "camera": CAMERA, "version": 1,
        "pixel_scale_arcsec": scale, "gain": GAIN, "read_noise_e": READ_NOISE_E,
        "saturate_adu": SATURATE_ADU, "adc_max": ADC_MAX, "full_well_e": FULL_WELL_E,
        "bias_level_adu": BIAS_LEVEL_ADU, "overscan_cols": OVERSCAN_COLS,
        "zp1": ZP1, "extinction": EXTINCTION, "sky_rates_e_per_s_px": sky_rates,
        "sky_pattern_amp": SKY_PATTERN_AMP, "dark_rate_e_per_s": DARK_RATE_E_S,
        "moffat_beta": MOFFAT_BETA, "flat_median": flat_median, "flat_normalisation": "mean",
        "bad_column": common["bad_column"], "bad_column_response": 0.2,
        "dust_donuts": [list(d) for d in common["donuts"]],
        "sip_k": float(sip[0][3, 0]), "n_stars": int(stars["r"].size),
        "n_catalog": int((stars["r"] < catalog_mag_limit).sum()) if catalog else 0,
        "site_lat_deg": SITE_LAT_DEG, "site_lon_deg": SITE_LON_DEG,
    })
    night = SimNight(root=out, raw_dir=raw_dir, truth_dir=truth_dir, catalog_path=catalog_path,
                     frames=frames, params=params)
    if injections:  # sim/inject.py: truth/injections.json
        from photowatch.sim.inject import write_truth

        write_truth(truth_dir, injections, frames)
    doc = {"params": params, "frames": [f.to_json(out) for f in frames]}
    tmp = truth_dir / ".night.json.part"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, truth_dir / "night.json")
    return night


_PARAM_NAMES = (
    "size", "binning", "filters", "seed", "n_bias", "n_dark", "dark_exptime_s", "n_flat",
    "n_science", "exptime_s", "target", "ra_deg", "dec_deg", "dither_arcsec",
    "pointing_error_arcsec", "rotation_deg", "flip", "fwhm_arcsec", "star_density", "catalog",
    "write_models", "write_crmasks", "write_crcharge", "cloud_frame", "defocus_frame", "nosolve_frame", "ignored_frame",
    "satellite_flat", "night_date", "start_time", "readout_s", "science_order", "bad_flats",
    "transparency_range", "sky_variation", "sip_distortion", "cr_rate", "n_bright",
    "faint_mag", "catalog_mag_limit", "trail_px", "psf_variation", "psf_beta_range",
    "cloud_variation_mag", "cloud_period_s",
)


def _flat_frame(rng, n: int, scale: float, entry: dict, flat: np.ndarray, dark: np.ndarray,
                row_adu: np.ndarray, bias_adu: np.ndarray):
    """A twilight flat at the planned raw median level; a few faint stars; maybe a satellite."""
    exptime = entry["exptime"]
    level = entry["level"]
    sky_e = (level - BIAS_LEVEL_ADU) * GAIN / float(np.median(flat))
    stars = np.zeros((n, n), np.float32)
    nst = int(rng.integers(4, 10))
    fwhm_px = rng.uniform(1.5, 2.5) / scale
    psf = _Psf(fwhm_px)
    peak = 1.0 / (np.pi * (fwhm_px / 1.0196) ** 2 / (MOFFAT_BETA - 1))
    render_stars((n, n), psf, rng.uniform(0, n - 1, nst), rng.uniform(0, n - 1, nst),
                 rng.uniform(0.01, 0.05, nst) * sky_e / peak, out=stars)
    if entry.get("expect") == "satellite":
        ang = rng.uniform(0, np.pi)
        xc, yc = rng.uniform(0.3 * n, 0.7 * n, 2)
        yy = np.arange(n, dtype=np.float32)[:, None] - np.float32(yc)
        xx = np.arange(n, dtype=np.float32)[None, :] - np.float32(xc)
        d = xx * np.float32(math.sin(ang)) - yy * np.float32(math.cos(ang))
        stars += np.float32(0.15 * sky_e) * np.exp(-0.5 * (d / np.float32(0.9)) ** 2)
    stars += np.float32(sky_e)
    stars *= flat
    stars += dark * np.float32(exptime)
    q = _photon_noise(rng, stars)
    _bleed(q)
    return _readout(rng, q, n, row_adu, bias_adu), float(sky_e)


def _object_frame(rng, frame: SimFrame, *, n, scale, binning, mid, target, ra0, dec0,
                  dither_arcsec, pointing_error_arcsec, rotation_deg, flip, sip, fwhm_range,
                  stars, transparency_range, sky_rate, sky_variation, flat, pattern, dark,
                  row_adu, bias_adu, cr_rate, trail_px, truth_dir, write_crmasks, write_models,
                  wcs_cls, write_crcharge=False, psf_variation=0.0, psf_beta_range=None,
                  clouds=None, seed=0, injections=(), target_radec=None):
    """A science (or focus) frame: stars through the true WCS, sky, dark, CRs, bleeding."""
    from astropy.io import fits

    exptime = frame.exptime_s
    band = frame.band
    expect = frame.expect
    # pointing: true centre (dither) and the header's (pointing error)
    de, dn = rng.uniform(-dither_arcsec, dither_arcsec, 2)
    ra_c, dec_c = _offset_radec(ra0, dec0, de, dn)
    ang = rng.uniform(0, 2 * np.pi)
    err = rng.uniform(0, pointing_error_arcsec)
    ra_h, dec_h = _offset_radec(ra_c, dec_c, err * math.sin(ang), err * math.cos(ang))
    ra_txt, dec_txt = format_ra(ra_h), format_dec(dec_h)
    pe, pn = _sky_offset_arcsec(parse_sexagesimal(ra_txt, True),
                                parse_sexagesimal(dec_txt, False), ra_c, dec_c)
    fwhm = float(rng.uniform(*fwhm_range))
    transparency = float(rng.uniform(*transparency_range))
    sky_factor = 1.0 + float(rng.uniform(-sky_variation, sky_variation))
    if expect == "cloud":
        transparency = 0.25
    if expect == "focus":
        fwhm *= 3.0
    extra = _rng(seed, int(frame.index), 7_000_000) if psf_beta_range else None
    beta = float(extra.uniform(*psf_beta_range)) if psf_beta_range else MOFFAT_BETA
    if clouds is not None:
        amp, period, phase, t0 = clouds
        t = (mid - t0).total_seconds()
        transparency *= 10 ** (-0.4 * amp * (0.5 + 0.5 * math.sin(2 * math.pi * t / period
                                                                   + phase)))
    x_am = airmass(mid, ra_c, dec_c)
    k_ext = EXTINCTION[band]
    zp = ZP1[band] + 2.5 * math.log10(exptime * transparency) - k_ext * (x_am - 1.0)
    sky_e = sky_rate * sky_factor * exptime

    whdr = wcs_header(n, scale, rotation_deg, flip, ra_c, dec_c, sip)
    wcs = wcs_cls(whdr)
    trail = trail_px if expect == "nosolve" else 0.0
    psf = _Psf(fwhm / scale, beta=beta, trail_px=trail,
               trail_angle_deg=float(rng.uniform(-20, 20)))
    half = (n * scale / 2 * math.sqrt(2) + psf.radius * scale + 5) / 3600.0
    e, nn = _sky_offset_arcsec(stars["ra"], stars["dec"], ra_c, dec_c)
    sel = np.flatnonzero((np.abs(e) < half * 3600) & (np.abs(nn) < half * 3600))
    x, y = wcs.all_world2pix(stars["ra"][sel], stars["dec"][sel], 0)
    r = psf.radius
    ok = (x > -r - 1) & (x < n + r) & (y > -r - 1) & (y < n + r)
    mags = stars[band][sel][ok]
    flux = 10 ** (-0.4 * (mags - zp))
    if psf_variation:
        model = _render_varying((n, n), fwhm / scale, beta, psf_variation, x[ok], y[ok], flux)
    else:
        model = render_stars((n, n), psf, x[ok], y[ok], flux)
    if injections and frame.kind == "object":  # sim/inject.py, rendered as the stars are
        from photowatch.sim.inject import render

        frame.injected = render(injections, frame, frame.obs_time,
                                frame.obs_time + timedelta(seconds=exptime), wcs, psf, zp,
                                model, render_stars)

    background = pattern + np.float32(1.0)
    background *= np.float32(sky_e)
    background *= flat  # raw sky electrons
    lam = model * flat
    lam += background
    lam += dark * np.float32(exptime)
    q = _photon_noise(rng, lam)
    del lam
    idx, val, ncr = _cosmics(rng, n, binning, exptime, cr_rate)
    q.ravel()[idx] += val
    _bleed(q)
    raw = _readout(rng, q, n, row_adu, bias_adu)
    del q

    frame.target = target
    frame.wcs_header = whdr.tostring(sep="\n")
    frame.zp_true = zp
    frame.transparency = transparency
    frame.fwhm_arcsec = fwhm
    if psf_beta_range:
        frame.psf_beta = beta
    frame.sky_e_per_px = sky_e
    frame.pointing_offset_arcsec = (float(pe), float(pn))
    frame.airmass = x_am
    frame.ra_deg, frame.dec_deg = ra_c, dec_c
    frame.dither_arcsec = (float(de), float(dn))
    frame.n_cosmics = ncr
    obstype = "OBJECT" if frame.kind == "object" else "FOCUS"
    objname = target if frame.kind == "object" else "focus"
    hdr = _raw_header(obstype=obstype, filt=frame.filter, exptime_s=exptime,
                      obs_time=frame.obs_time, objname=objname,
                      ra_deg=parse_sexagesimal(ra_txt, True),
                      dec_deg=parse_sexagesimal(dec_txt, False),
                      binning=binning, n=n, airmass_value=x_am)
    if frame.kind == "object":  # the target's own coordinates (profile keys target_ra/_dec)
        t_ra, t_dec = target_radec or (ra0, dec0)
        hdr["OBJRA"] = (format_ra(t_ra), "target RA (hours)")
        hdr["OBJDEC"] = (format_dec(t_dec), "target Dec (deg)")
    thdr = fits.Header(whdr)
    thdr["ORIGFILE"] = frame.raw_name
    sigma = np.sqrt(background.ravel()[idx] + dark.ravel()[idx] * exptime
                    + READ_NOISE_E ** 2)
    if write_crcharge:
        charge = np.zeros((n, n), np.float32)
        charge.ravel()[idx] = val / sigma
        _write_fits(truth_dir / f"crcharge_{frame.path.stem}.fits", charge, thdr)
    if write_crmasks:
        crmask = np.zeros((n, n), np.uint8)
        crmask.ravel()[idx[val > CR_SIGMA * sigma]] = 1
        frame.crmask_path = truth_dir / f"crmask_{frame.path.stem}.fits"
        _write_fits(frame.crmask_path, crmask, thdr)
    if write_models:
        thdr["BUNIT"] = "electron"
        thdr["ZPTRUE"] = (zp, "m = ZPTRUE - 2.5 log10(e-)")
        frame.model_path = truth_dir / f"model_{frame.path.stem}.fits"
        _write_fits(frame.model_path, model, thdr)
    return raw, hdr
