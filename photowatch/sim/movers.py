"""Sources injected into a simulated night: a slow-moving asteroid and a new point source.

An injected source answers two questions for each object frame, at the frame's
mid-exposure time ``mid`` (UTC datetime) and band ``band``:

- :meth:`radec` where it is (degrees, ICRS);
- :meth:`mag` its AB magnitude (None: not in this frame).

(and, for lane live's hook in ``photowatch.sim.inject``, ``sources(frame, t0, t1)`` and
``describe()`` give the same.)

:func:`photowatch.sim.night.simulate_night` (``injections=[...]``) renders it
with the frame's PSF like any star and records, per frame, where it put it
and how bright (``SimFrame.injected``), so every product can be checked
against the truth. An asteroid slow enough not to trail (rate times exposure
below the seeing) looks like a star in each frame; only its position changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime


def _minutes(t: datetime, t0: datetime) -> float:
    return (t - t0).total_seconds() / 60.0


@dataclass(frozen=True)
class Point:
    """One injected point in one frame (the fields of lane live's ``InjectedSource``)."""

    ra: float
    dec: float
    mag: float
    name: str | None = None


def _point(ra, dec, mag, name):
    try:  # lane live's hook (photowatch.sim.inject), when it is there
        from photowatch.sim.inject import InjectedSource

        return InjectedSource(ra, dec, mag, name=name)
    except ImportError:
        return Point(ra, dec, mag, name)


class _Injected:
    """The injection protocol of both hooks: ``radec(mid)`` / ``mag(mid, band)`` /
    ``truth()``, and lane live's ``sources(frame, t0, t1)`` / ``describe()``."""

    def sources(self, frame, t0: datetime, t1: datetime) -> list:
        mid = t0 + (t1 - t0) / 2
        mag = self.mag(mid, frame.band)
        if mag is None:
            return []
        return [_point(*self.radec(mid), mag, self.name)]

    def describe(self) -> dict:
        return self.truth()


@dataclass(frozen=True)
class Asteroid(_Injected):
    """A constant-rate mover on the tangent plane: at ``t0`` at (ra0, dec0), moving
    ``rate_ra`` (east, arcsec per minute on the sky) and ``rate_dec`` (north)."""

    ra0: float
    dec0: float
    t0: datetime
    rate_ra: float = 0.4  #: arcsec/min east (RA * cos dec)
    rate_dec: float = 0.2  #: arcsec/min north
    mags: dict = field(default_factory=lambda: {"g": 19.6, "r": 19.2, "i": 19.1, "z": 19.1})
    name: str = "asteroid"
    kind: str = "asteroid"

    def radec(self, mid: datetime) -> tuple[float, float]:
        dt = _minutes(mid, self.t0)
        dec = self.dec0 + self.rate_dec * dt / 3600.0
        ra = self.ra0 + self.rate_ra * dt / 3600.0 / math.cos(math.radians(self.dec0))
        return ra % 360.0, dec

    def mag(self, mid: datetime, band: str) -> float | None:
        return self.mags.get(band)

    def truth(self) -> dict:
        return {"name": self.name, "kind": self.kind, "ra0": self.ra0, "dec0": self.dec0,
                "t0": self.t0.isoformat(), "rate_ra_arcsec_min": self.rate_ra,
                "rate_dec_arcsec_min": self.rate_dec, "mags": dict(self.mags)}


@dataclass(frozen=True)
class NewSource(_Injected):
    """A point source that is not in the reference catalogue, fading as a power law:
    ``mag = mag0 + 2.5 alpha log10(t / t_ref)`` (t from ``t_burst``; alpha 0: steady)."""

    ra: float
    dec: float
    t_burst: datetime
    mags: dict = field(default_factory=lambda: {"g": 19.5, "r": 19.3, "i": 19.2, "z": 19.2})
    t_ref_min: float = 10.0  #: the mags are at this time after the burst
    alpha: float = 1.2
    name: str = "transient"
    kind: str = "new"

    def radec(self, mid: datetime) -> tuple[float, float]:
        return self.ra, self.dec

    def mag(self, mid: datetime, band: str) -> float | None:
        m0 = self.mags.get(band)
        dt = _minutes(mid, self.t_burst)
        if m0 is None or dt <= 0:
            return None
        return m0 + 2.5 * self.alpha * math.log10(dt / self.t_ref_min)

    def truth(self) -> dict:
        return {"name": self.name, "kind": self.kind, "ra": self.ra, "dec": self.dec,
                "t_burst": self.t_burst.isoformat(), "mags": dict(self.mags),
                "t_ref_min": self.t_ref_min, "alpha": self.alpha}


__all__ = ["Asteroid", "NewSource", "Point"]
