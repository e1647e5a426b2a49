"""Sources injected into a simulated night (issue 21): a fading afterglow at the target,
a periodic variable elsewhere in the field; any object with the three members of
:class:`Injection` (``sim/movers.py`` adds an asteroid through the same hook).

``simulate_night(..., injections=[...])`` asks each injection, per object frame, for
its sources (sky position and the AB magnitude averaged over the exposure, in the
frame's band); they are rendered with the frame's own PSF and zero point, exactly as
the field's stars, before the photon noise. The truth goes to ``truth/injections.json``
(:func:`load_truth`) and to each frame's ``injected`` list in ``truth/night.json``.
Injected sources are never in the reference catalogue.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np

#: sub-steps of the exposure average of a varying source's flux
_STEPS = 16


@dataclass(frozen=True)
class InjectedSource:
    ra: float  #: deg (at mid-exposure for a moving source)
    dec: float
    mag: float  #: AB, exposure-averaged flux, in the frame's band
    name: str | None = None  #: the point's name in the truth (default: the injection's)


class Injection(Protocol):
    """The hook: ``name``, ``sources`` and ``describe``. Optional: ``place(stars, ra0,
    dec0)``, called once with the field's true stars (id, ra, dec, g, r, i, z) before
    any frame (to choose a position), and ``at_target = True``: the raw headers'
    target coordinates (OBJRA/OBJDEC) are this source's position."""

    name: str

    def sources(self, frame, t0: datetime, t1: datetime) -> list[InjectedSource]:
        """Sources in one object frame (exposure from ``t0`` to ``t1``, UTC)."""

    def describe(self) -> dict:
        """JSON-able parameters for the truth file."""


def _offset(ra: float, dec: float, east: float, north: float) -> tuple[float, float]:
    return (ra + east / 3600.0 / math.cos(math.radians(dec)), dec + north / 3600.0)


def quiet_spot(stars, ra: float, dec: float, *, search_arcsec: float = 60.0,
               step_arcsec: float = 2.0, faint_sep: float = 10.0,
               faint_mag: float = math.inf, bright_sep: float = 30.0, bright_mag: float = 15.0,
               avoid=()) -> tuple[float, float] | None:
    """The position nearest (ra, dec) with no star brighter than ``faint_mag`` (r; default:
    no star of the list at all) within ``faint_sep`` arcsec and none brighter than
    ``bright_mag`` within ``bright_sep``, and no ``avoid`` position (other injections)
    within ``bright_sep``: where a forced aperture (and its background annulus, to 3
    apertures: < 10" at the simulator's seeing) measures the injected source, not a
    neighbour. A star below the frame's limit in the aperture is not noise but a constant
    offset of a few to 15 % at r 20 (a r 22.8 star 0.7" from a r 20.2 fake: +8.4 %), which
    the truth would not hold: hence every star of the list, not only the bright ones.
    None if there is none within ``search_arcsec``."""
    cosd = math.cos(math.radians(dec))
    e = (np.asarray(stars["ra"], float) - ra) * cosd * 3600.0
    n = (np.asarray(stars["dec"], float) - dec) * 3600.0
    mag = np.asarray(stars["r"], float)
    near = np.hypot(e, n) < search_arcsec + bright_sep
    e, n, mag = e[near], n[near], mag[near]
    if len(avoid):
        ae = np.array([(a[0] - ra) * cosd * 3600.0 for a in avoid])
        an = np.array([(a[1] - dec) * 3600.0 for a in avoid])
        e, n = np.concatenate([e, ae]), np.concatenate([n, an])
        mag = np.concatenate([mag, np.full(ae.size, -99.0)])  # "bright": kept bright_sep away
    steps = np.arange(-search_arcsec, search_arcsec + step_arcsec / 2, step_arcsec)
    ge, gn = (a.ravel() for a in np.meshgrid(steps, steps))
    order = np.argsort(np.hypot(ge, gn), kind="stable")
    for k in order:
        d = np.hypot(e - ge[k], n - gn[k])
        if not ((d < faint_sep) & (mag < faint_mag)).any() and \
                not ((d < bright_sep) & (mag < bright_mag)).any():
            return _offset(ra, dec, float(ge[k]), float(gn[k]))
    return None


def place(injections, stars, ra0: float, dec0: float) -> tuple[float, float]:
    """Let the injections choose their positions; returns the target's (RA, Dec)."""
    target = (ra0, dec0)
    taken: list[tuple[float, float]] = []
    for inj in injections or ():
        if hasattr(inj, "place"):
            inj.avoid = list(taken)  # the earlier injections' positions
            inj.place(stars, ra0, dec0)
        if getattr(inj, "at_target", False):
            target = (inj.ra, inj.dec)
        if getattr(inj, "ra", None) is not None:
            taken.append((inj.ra, inj.dec))
        taken += [(p[1], p[2]) for p in getattr(inj, "positions", None) or ()]
    return target


def _mean_mag(mag_at, t0: datetime, t1: datetime) -> float:
    """AB magnitude of the flux averaged over [t0, t1] (midpoint rule, 16 steps)."""
    span = (t1 - t0).total_seconds()
    if span <= 0:
        return float(mag_at(t0))
    ts = [t0.timestamp() + span * (k + 0.5) / _STEPS for k in range(_STEPS)]
    flux = np.mean([10 ** (-0.4 * mag_at(datetime.fromtimestamp(t, t0.tzinfo))) for t in ts])
    return float(-2.5 * math.log10(flux))


@dataclass
class Afterglow:
    """A power-law fading point source: ``m(t) = mag0 + 2.5 alpha log10((t - t_burst) / t_ref)``
    (flux ~ t^-alpha), ``t_ref`` = ``ref_s`` seconds after the burst; ``colours`` adds a
    per-band offset (e.g. {"g": 0.3}); bands absent have offset 0. ``ra``/``dec`` None:
    the quiet spot nearest the pointing's target (:func:`quiet_spot`). It is the target:
    the raw headers' OBJRA/OBJDEC give its position (a trigger's coordinates)."""

    t_burst: datetime
    ra: float | None = None
    dec: float | None = None
    mag0: float = 19.0  #: magnitude at t_burst + ref_s
    alpha: float = 1.2
    ref_s: float = 600.0
    colours: dict | None = None
    name: str = "afterglow"
    at_target = True

    def place(self, stars, ra0, dec0):
        if self.ra is None or self.dec is None:
            self.ra, self.dec = quiet_spot(stars, ra0, dec0,
                                           avoid=getattr(self, "avoid", ())) or (ra0, dec0)

    def mag_at(self, t: datetime, band: str | None = None) -> float:
        dt = max((t - self.t_burst).total_seconds(), 1.0)
        off = (self.colours or {}).get(band or "", 0.0)
        return self.mag0 + off + 2.5 * self.alpha * math.log10(dt / self.ref_s)

    def sources(self, frame, t0, t1):
        return [InjectedSource(self.ra, self.dec,
                               _mean_mag(lambda t: self.mag_at(t, frame.band), t0, t1))]

    def describe(self) -> dict:
        d = asdict(self)
        d["t_burst"] = self.t_burst.isoformat()
        d["kind"] = "afterglow"
        return d


@dataclass
class PeriodicVariable:
    """A sinusoidal variable: ``m(t) = mean_mag + amplitude sin(2 pi t / period + phase)``;
    ``ra``/``dec`` None: the quiet spot nearest ``offset_arcsec`` (east, north) from the
    pointing's target."""

    ra: float | None = None
    dec: float | None = None
    mean_mag: float = 18.0
    amplitude: float = 0.5
    period_s: float = 1800.0
    phase: float = 0.0
    name: str = "variable"
    offset_arcsec: tuple = (40.0, -30.0)

    def place(self, stars, ra0, dec0):
        if self.ra is None or self.dec is None:
            at = _offset(ra0, dec0, *self.offset_arcsec)
            self.ra, self.dec = quiet_spot(stars, *at, avoid=getattr(self, "avoid", ())) or at

    def mag_at(self, t: datetime) -> float:
        return self.mean_mag + self.amplitude * math.sin(
            2 * math.pi * t.timestamp() / self.period_s + self.phase)

    def sources(self, frame, t0, t1):
        return [InjectedSource(self.ra, self.dec, _mean_mag(self.mag_at, t0, t1))]

    def describe(self) -> dict:
        return {**asdict(self), "kind": "periodic"}


@dataclass
class FakeStars:
    """Constant point sources at quiet spots on a ring of grid positions around the target,
    magnitudes spread evenly over ``mags`` (for pulls and injection-recovery: many
    measurements per night). Names ``fake001``...; positions from :meth:`place`: within
    20" of each grid point, no star of the list (any magnitude) within 8" (the aperture
    and the inner background annulus), none brighter than 16 within 20"."""

    n: int = 24
    mags: tuple = (18.0, 22.5)
    spread_arcsec: float = 50.0
    name: str = "fake"
    seed: int = 0
    positions: list | None = None  #: [(name, ra, dec, mag)] after place

    def place(self, stars, ra0, dec0):
        if self.positions is not None:
            return
        rng = np.random.default_rng(self.seed)
        mags = np.linspace(self.mags[0], self.mags[1], self.n)
        rng.shuffle(mags)
        side = int(math.ceil(math.sqrt(self.n)))
        offs = np.linspace(-self.spread_arcsec, self.spread_arcsec, side)
        pos, taken = [], []
        for k in range(self.n):
            e, nn = offs[k % side], offs[k // side]
            spot = quiet_spot(stars, *_offset(ra0, dec0, e, nn), search_arcsec=20.0,
                              faint_sep=8.0, bright_sep=20.0, bright_mag=16.0,
                              avoid=[*getattr(self, "avoid", ()), *taken])
            if spot is None:
                continue  # no quiet spot near this grid point
            ra, dec = spot
            taken.append((ra, dec))
            pos.append((f"{self.name}{k + 1:03d}", ra, dec, float(mags[k])))
        self.positions = pos

    def sources(self, frame, t0, t1):
        return [InjectedSource(ra, dec, mag, name) for name, ra, dec, mag in self.positions]

    def describe(self) -> dict:
        return {"kind": "fake", "n": self.n, "mags": list(self.mags),
                "positions": [list(p) for p in self.positions or []]}


def render(injections, frame, t0: datetime, t1: datetime, wcs, psf, zp: float,
           model: np.ndarray, render_stars) -> list[dict]:
    """Add every injection's sources to ``model`` (e-, in place) with the simulator's
    ``render_stars`` (passed in: no import cycle); return their truth rows."""
    rows = []
    mid = t0 + (t1 - t0) / 2
    for inj in injections or ():
        for src in inj.sources(frame, t0, t1):
            x, y = (float(v[0]) for v in wcs.all_world2pix([src.ra], [src.dec], 0))
            flux = 10 ** (-0.4 * (src.mag - zp))
            render_stars(model.shape, psf, np.array([x]), np.array([y]), np.array([flux]),
                         out=model)
            rows.append({"name": src.name or inj.name, "frame": frame.raw_name, "index": frame.index,
                         "ra": src.ra, "dec": src.dec, "x": x, "y": y, "mag": src.mag,
                         "flux_e": flux, "mjd_mid": _mjd(mid), "filter": frame.filter,
                         "band": frame.band})
    return rows


def _mjd(t: datetime) -> float:
    return t.timestamp() / 86400.0 + 40587.0


def write_truth(truth_dir: Path, injections, frames) -> None:
    """``truth/injections.json``: each injection's parameters and every injected point."""
    if not injections:
        return
    doc = {"injections": {inj.name: inj.describe() for inj in injections},
           "points": [row for f in frames for row in (getattr(f, "injected", None) or [])]}
    tmp = Path(truth_dir) / ".injections.json.part"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, Path(truth_dir) / "injections.json")


def load_truth(root: str | Path):
    """The injected points of a simulated night (astropy Table; empty without injections)."""
    from astropy.table import Table

    path = Path(root) / "truth" / "injections.json"
    if not path.exists():
        return Table(names=["name", "frame", "mag"], dtype=[str, str, float])
    doc = json.loads(path.read_text())
    table = Table(rows=doc["points"]) if doc["points"] else Table()
    table.meta["injections"] = doc["injections"]
    return table
