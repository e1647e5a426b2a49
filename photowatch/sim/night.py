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

Where the code is: this module holds the truth records (:class:`SimFrame`,
:class:`SimNight`) and the night's orchestration (:func:`simulate_night`);
the pieces it assembles live beside it::

    sim/camera.py     constants of the camera, site, sky and star counts
    sim/field.py      time, airmass, coordinates, the true WCS, the star field
    sim/psf.py        the Moffat PSF and the star renderer (render_stars)
    sim/detector.py   bias, dark, flat, sky pattern, noise, cosmic rays, readout, header

Their public names stay importable from here.
"""


from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path

import numpy as np

from photowatch.sim.camera import (
    ADC_MAX,
    BANDS,
    BIAS_LEVEL_ADU,
    CAMERA,
    CR_SIGMA,
    DARK_RATE_E_S,
    EXTINCTION,
    FAINT_MAG_DEFAULT,
    FILTER_BAND,
    FLAT_FAINT_FRACTION,
    FLAT_GOOD_FRACTIONS,
    FLAT_SATURATED_FRACTION,
    FULL_WELL_E,
    GAIN,
    MOFFAT_BETA,
    OVERSCAN_COLS,
    READ_NOISE_E,
    SATURATE_ADU,
    SITE_LAT_DEG,
    SITE_LON_DEG,
    SKY_PATTERN_AMP,
    SKY_RATES,
    UNBINNED_SCALE_ARCSEC,
    ZP1,
)
from photowatch.sim.detector import (
    _bias_structure,
    _bleed,
    _cosmics,
    _dark_map,
    _flat_field,
    _photon_noise,
    _raw_header,
    _readout,
    _row_pattern,
    _sky_pattern,
    _write_fits,
)
from photowatch.sim.field import (
    _make_stars,
    _name_key,
    _offset_radec,
    _rng,
    _sip_coefficients,
    _sky_offset_arcsec,
    airmass,
    catalog_error,
    format_dec,
    format_ra,
    local_sidereal_deg,
    parse_sexagesimal,
    wcs_header,
)
from photowatch.sim.psf import (
    _Psf,
    _render_varying,
    render_stars,
)


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
