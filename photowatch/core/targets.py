"""Positions of interest (issue 21): ``NAME=RA,DEC`` texts, target files and the header's
target coordinates. Parsing only; :mod:`photowatch.state.lightcurves` keeps the list."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from photowatch.core.errors import ConfigError


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
