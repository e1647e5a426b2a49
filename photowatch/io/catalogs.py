"""Reference catalogues: one interface for local files and online services.

Every provider answers :meth:`Provider.query` with an astropy Table holding
``ra``, ``dec`` (degrees, ICRS/J2000) and, for each requested band,
``<band>`` and ``<band>_err`` (magnitudes; NaN where the catalogue has none);
other columns of the source are kept. ``table.meta['provider']`` names the
provider (for the ASTREF keyword), ``table.meta['bands']`` lists the bands.

Providers
---------
:class:`LocalCatalog`
    An ECSV, FITS or CSV file; column names from the ``[catalog]`` settings
    (``ra_column``, ``dec_column``, ``mag_column = "{band}"``,
    ``err_column = "{band}_err"``). The file is read once per provider.
:class:`OnlineCatalog`
    Gaia DR3 (astrometry), Pan-STARRS1, SDSS DR16, SkyMapper DR2 and 2MASS
    (photometry) through astroquery's VizieR client (the ``online`` extra,
    imported only when a query is made). Each answer is cached on disk per
    field (``cache_dir/<provider>/``), keyed by the provider, the centre
    rounded to a grid and the radius rounded up, so the dithered frames of a
    field share one query and a night needs the network once per field. A
    cached cone that covers a request is always used first; when the network
    fails and none does, :class:`CatalogUnavailable` says so.

Catalogue providers are the one place besides the solve-field fallback where
a stage input does I/O; the stages themselves receive tables.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from photowatch.core.config import Catalog
from photowatch.core.errors import ConfigError, StageFailed
from photowatch.stages.matching import (  # noqa: F401  (re-exported)
    angular_distance_deg,
    brightness_order,
)

log = logging.getLogger(__name__)


class CatalogUnavailable(StageFailed):
    """No catalogue answer: the service failed and no cached result covers the field.

    A :class:`~photowatch.core.errors.StageFailed`: the engine may retry later or
    carry on in relative mode.
    """


class Provider(Protocol):
    """What every catalogue provider offers."""

    name: str

    def query(self, ra_deg: float, dec_deg: float, radius_deg: float, *,
              bands: Sequence[str] = ()) -> object:
        """Stars within ``radius_deg`` of (``ra_deg``, ``dec_deg``): an astropy Table."""
        ...


# ---------------------------------------------------------------------------
# geometry helpers


def cone_cut(table, ra_deg: float, dec_deg: float, radius_deg: float, *, box: bool = False):
    """Rows of ``table`` (columns ``ra``, ``dec``) within a cone or a box.

    ``box=True`` keeps a square of half-side ``radius_deg`` aligned with RA and
    Dec (RA half-width ``radius_deg / cos(dec)``).
    """
    ra = np.asarray(table["ra"], dtype=np.float64)
    dec = np.asarray(table["dec"], dtype=np.float64)
    if box:
        dra = (ra - ra_deg + 180.0) % 360.0 - 180.0
        cosd = max(math.cos(math.radians(dec_deg)), 1e-6)
        keep = (np.abs(dec - dec_deg) <= radius_deg) & (np.abs(dra) * cosd <= radius_deg)
    else:
        keep = angular_distance_deg(ra, dec, ra_deg, dec_deg) <= radius_deg
    return table[keep]


def field_cone(wcs, shape: tuple[int, int], *, margin: float = 1.0,
               extra_arcsec: float = 0.0) -> tuple[float, float, float]:
    """The cone (ra, dec, radius, degrees) around an image.

    Centre: the sky position of the image centre; radius: the largest
    distance to a corner times ``margin``, plus ``extra_arcsec`` (e.g. the
    pointing uncertainty).
    """
    ny, nx = shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    xs = np.array([cx, -0.5, nx - 0.5, -0.5, nx - 0.5])
    ys = np.array([cy, -0.5, -0.5, ny - 0.5, ny - 0.5])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    radius = float(angular_distance_deg(ra[1:], dec[1:], ra[0], dec[0]).max())
    return float(ra[0]), float(dec[0]), radius * margin + extra_arcsec / 3600.0


def at_epoch(table, year: float):
    """A copy of a catalogue with positions moved by proper motion to ``year``.

    Uses columns ``pmra`` (mas/yr, includes cos(dec)) and ``pmdec`` (mas/yr)
    and ``table.meta['epoch']`` (Julian year); a table without them is
    returned unchanged. Stars without a proper motion keep their position.
    """
    if "pmra" not in table.colnames or "pmdec" not in table.colnames:
        return table
    epoch = table.meta.get("epoch")
    if epoch is None:
        return table
    dt = float(year) - float(epoch)
    out = table.copy()
    pmra = np.nan_to_num(np.asarray(out["pmra"], dtype=np.float64))
    pmdec = np.nan_to_num(np.asarray(out["pmdec"], dtype=np.float64))
    dec = np.asarray(out["dec"], dtype=np.float64)
    out["dec"] = dec + pmdec * dt / 3.6e6
    out["ra"] = (np.asarray(out["ra"], dtype=np.float64)
                 + pmra * dt / 3.6e6 / np.maximum(np.cos(np.radians(dec)), 1e-6)) % 360.0
    out.meta["epoch"] = float(year)
    return out


def _as_float(column) -> np.ndarray:
    """A column as float64 with masked or missing values as NaN."""
    data = np.ma.asarray(column)
    return np.ma.filled(data.astype(np.float64), np.nan)


# ---------------------------------------------------------------------------
# local files


def _read_table(path: Path):
    from astropy.table import Table

    name = path.name.lower()
    if name.endswith(".ecsv"):
        fmt = "ascii.ecsv"
    elif name.endswith((".csv", ".csv.gz")):
        fmt = "ascii.csv"
    elif name.endswith((".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")):
        fmt = "fits"
    else:
        fmt = None
    return Table.read(path, format=fmt) if fmt else Table.read(path)


def _find_column(colnames: Sequence[str], wanted: str) -> str | None:
    if wanted in colnames:
        return wanted
    lower = {c.lower(): c for c in colnames}
    return lower.get(wanted.lower())


class LocalCatalog:
    """A reference catalogue in a local file (ECSV, FITS or CSV).

    Parameters
    ----------
    path : str or Path
        The file. RA and Dec must be in degrees.
    ra_column, dec_column : str
        Column names of RA and Dec (matched case-insensitively).
    mag_column, err_column : str
        Templates of the magnitude and error column of a band, ``{band}`` is
        replaced by the band name (``"{band}"`` and ``"{band}_err"`` give
        ``r`` and ``r_err``).

    Raises
    ------
    ConfigError
        The file does not exist (raised when the provider is made).
    """

    def __init__(self, path: str | os.PathLike, *, ra_column: str = "ra",
                 dec_column: str = "dec", mag_column: str = "{band}",
                 err_column: str = "{band}_err"):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(f"catalog.path: no such catalogue file: {self.path}")
        self.ra_column = ra_column
        self.dec_column = dec_column
        self.mag_column = mag_column
        self.err_column = err_column
        self.name = f"local:{self.path.name}"
        self._table = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Catalog, path: str | os.PathLike | None = None
                      ) -> LocalCatalog:
        return cls(path or settings.path, ra_column=settings.ra_column,
                   dec_column=settings.dec_column, mag_column=settings.mag_column,
                   err_column=settings.err_column)

    def table(self):
        """The whole catalogue with standard ``ra``/``dec`` columns (read once)."""
        with self._lock:
            if self._table is None:
                try:
                    raw = _read_table(self.path)
                except Exception as exc:
                    raise ConfigError(f"catalog.path: cannot read {self.path}: {exc}") from exc
                names = raw.colnames
                ra = _find_column(names, self.ra_column)
                dec = _find_column(names, self.dec_column)
                if ra is None or dec is None:
                    which = "catalog.ra_column" if ra is None else "catalog.dec_column"
                    wanted = self.ra_column if ra is None else self.dec_column
                    raise ConfigError(f"{which}: no column {wanted!r} in {self.path} "
                                      f"(columns: {', '.join(names[:20])})")
                out = raw.copy(copy_data=False)
                ra_v, dec_v = _as_float(raw[ra]), _as_float(raw[dec])
                for col in {ra, dec}:
                    out.remove_column(col)
                out.add_column(ra_v, name="ra", index=0)
                out.add_column(dec_v, name="dec", index=1)
                out["ra"].unit = "deg"
                out["dec"].unit = "deg"
                good = np.isfinite(ra_v) & np.isfinite(dec_v)
                self._table = out[good]
                log.debug("catalogue %s: %d stars", self.path, len(self._table))
            return self._table

    def query(self, ra_deg: float, dec_deg: float, radius_deg: float, *,
              bands: Sequence[str] = (), box: bool = False):
        """Stars within a cone (or box) with ``<band>``/``<band>_err`` columns.

        Raises
        ------
        ConfigError
            A requested band has no magnitude column in the file.
        """
        out = cone_cut(self.table(), ra_deg, dec_deg, radius_deg, box=box).copy()
        for band in bands:
            mag = _find_column(out.colnames, self.mag_column.format(band=band))
            if mag is None:
                raise ConfigError(f"catalog.mag_column: no column "
                                  f"{self.mag_column.format(band=band)!r} for band {band!r} in "
                                  f"{self.path}")
            err = _find_column(out.colnames, self.err_column.format(band=band))
            mag_v = _as_float(out[mag])
            err_v = _as_float(out[err]) if err else np.full(len(out), np.nan)
            for name, values in ((band, mag_v), (f"{band}_err", err_v)):
                if name in out.colnames:
                    out[name] = values
                else:
                    out.add_column(values, name=name)
        out.meta.update({"provider": self.name, "bands": list(bands)})
        return out


# ---------------------------------------------------------------------------
# online services


@dataclass(frozen=True)
class VizierSpec:
    """How one VizieR catalogue maps to the standard columns."""

    catalog: str
    ra: str
    dec: str
    bands: dict[str, tuple[str, str]]  #: band → (magnitude column, error column)
    epoch: float | None = None  #: epoch of the positions (Julian year) when not J2000
    pm: tuple[str, str] | None = None  #: proper motion columns (mas/yr)
    default_band: str = ""

    @property
    def columns(self) -> list[str]:
        cols = [self.ra, self.dec]
        for mag, err in self.bands.values():
            cols += [mag, err]
        if self.pm:
            cols += list(self.pm)
        return cols


#: provider name → VizieR catalogue and columns
VIZIER = {
    "gaia": VizierSpec("I/355/gaiadr3", "RA_ICRS", "DE_ICRS",
                       {"G": ("Gmag", "e_Gmag"), "BP": ("BPmag", "e_BPmag"),
                        "RP": ("RPmag", "e_RPmag")},
                       epoch=2016.0, pm=("pmRA", "pmDE"), default_band="G"),
    "panstarrs": VizierSpec("II/349/ps1", "RAJ2000", "DEJ2000",
                            {b: (f"{b}mag", f"e_{b}mag") for b in "grizy"}, default_band="r"),
    "sdss": VizierSpec("V/154/sdss16", "RA_ICRS", "DE_ICRS",
                       {b: (f"{b}mag", f"e_{b}mag") for b in "ugriz"}, default_band="r"),
    "skymapper": VizierSpec("II/358/smss", "RAICRS", "DEICRS",
                            {b: (f"{b}PSF", f"e_{b}PSF") for b in "uvgriz"}, default_band="r"),
    "2mass": VizierSpec("II/246/out", "RAJ2000", "DEJ2000",
                        {b: (f"{b}mag", f"e_{b}mag") for b in "JHK"}, default_band="J"),
}


def vizier_query(catalog: str, ra_deg: float, dec_deg: float, radius_deg: float, *,
                 columns: Sequence[str], timeout_s: float, row_limit: int = -1):
    """One cone search on VizieR through astroquery (the only network call here).

    Raises
    ------
    CatalogUnavailable
        astroquery is not installed.
    Exception
        Whatever astroquery or the network raise (the caller handles them).
    """
    try:
        from astroquery.vizier import Vizier
    except ImportError as exc:
        raise CatalogUnavailable(
            "online catalogues need astroquery: pip install 'photowatch[online]'") from exc
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    viz = Vizier(columns=list(columns), row_limit=row_limit, timeout=timeout_s)
    result = viz.query_region(SkyCoord(ra_deg, dec_deg, unit="deg"),
                              radius=radius_deg * u.deg, catalog=catalog)
    if len(result) == 0:
        from astropy.table import Table

        return Table({c: np.zeros(0) for c in columns})
    return result[0]


_CACHE_RE = re.compile(r"^(?P<p>[a-z0-9]+)_(?P<ra>\d+\.\d+)_(?P<dec>[+-]\d+\.\d+)_r(?P<r>\d+\.\d+)\.ecsv$")


@dataclass(frozen=True)
class CachedCone:
    ra_deg: float
    dec_deg: float
    radius_deg: float
    path: Path

    def covers(self, ra_deg: float, dec_deg: float, radius_deg: float) -> bool:
        d = float(angular_distance_deg(self.ra_deg, self.dec_deg, ra_deg, dec_deg))
        return d + radius_deg <= self.radius_deg * (1 + 1e-9)


def quantized_cone(ra_deg: float, dec_deg: float, radius_deg: float
                   ) -> tuple[float, float, float]:
    """The cone actually queried for a request: rounded so neighbours share it.

    The radius is rounded up to a whole arcminute; the centre is snapped to a
    grid of a quarter of that radius; the queried radius adds the largest
    snapping offset, so the answer always covers the requested cone.
    """
    r = max(math.ceil(radius_deg * 60.0 - 1e-9), 1) / 60.0
    step = r / 4.0
    dec_q = round(dec_deg / step) * step
    dec_q = float(np.clip(dec_q, -90.0, 90.0))
    cosd = max(math.cos(math.radians(dec_q)), 1e-3)
    ra_step = step / cosd
    ra_q = (round(ra_deg / ra_step) * ra_step) % 360.0
    snap = float(angular_distance_deg(ra_q, dec_q, ra_deg, dec_deg))
    return round(ra_q, 5), round(dec_q, 5), round(r + max(snap, 0.75 * step) + 1e-5, 5)


class OnlineCatalog:
    """A VizieR catalogue with an on-disk cache per field.

    Parameters
    ----------
    provider : str
        One of :data:`VIZIER` (``gaia``, ``panstarrs``, ``sdss``, ``skymapper``,
        ``2mass``).
    cache_dir : str or Path or None
        Folder of the cache (``<cache_dir>/<provider>/*.ecsv``); None keeps
        answers in memory only.
    timeout_s : float
        Network timeout of one query.
    """

    def __init__(self, provider: str, *, cache_dir: str | os.PathLike | None = None,
                 timeout_s: float = 60.0, row_limit: int = -1, memory_items: int = 8):
        if provider not in VIZIER:
            raise ConfigError(f"catalog.provider: unknown online catalogue {provider!r} "
                              f"(known: {', '.join(VIZIER)})")
        self.provider = provider
        self.spec = VIZIER[provider]
        self.name = f"{provider}:{self.spec.catalog}"
        self.cache_dir = Path(cache_dir).expanduser() / provider if cache_dir else None
        self.timeout_s = timeout_s
        self.row_limit = row_limit
        self._memory: OrderedDict[Path | tuple, object] = OrderedDict()
        self._memory_items = memory_items
        self._lock = threading.Lock()

    # -- cache ---------------------------------------------------------------
    def cache_path(self, ra_q: float, dec_q: float, r_q: float) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self.provider}_{ra_q:09.5f}_{dec_q:+09.5f}_r{r_q:.5f}.ecsv"

    def cached_cones(self) -> list[CachedCone]:
        """The cones cached on disk for this provider."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return []
        cones = []
        for path in self.cache_dir.iterdir():
            m = _CACHE_RE.match(path.name)
            if m and m.group("p") == self.provider:
                cones.append(CachedCone(float(m.group("ra")), float(m.group("dec")),
                                        float(m.group("r")), path))
        return cones

    def _remember(self, key, table) -> None:
        self._memory[key] = table
        self._memory.move_to_end(key)
        while len(self._memory) > self._memory_items:
            self._memory.popitem(last=False)

    def _load(self, path: Path):
        from astropy.table import Table

        if path in self._memory:
            self._memory.move_to_end(path)
            return self._memory[path]
        table = Table.read(path, format="ascii.ecsv")
        self._remember(path, table)
        return table

    def _write(self, path: Path, table) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ecsv", dir=path.parent)
        os.close(fd)
        try:
            table.write(tmp, format="ascii.ecsv", overwrite=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- queries -------------------------------------------------------------
    def _standardize(self, raw, ra_q, dec_q, r_q):
        from astropy.table import Table

        spec = self.spec
        out = Table()
        names = raw.colnames
        for std, col in (("ra", spec.ra), ("dec", spec.dec)):
            found = _find_column(names, col)
            if found is None:
                raise CatalogUnavailable(f"{self.name}: the answer has no column {col!r}")
            out[std] = _as_float(raw[found])
        for band, (mag, err) in spec.bands.items():
            m = _find_column(names, mag)
            e = _find_column(names, err)
            out[band] = _as_float(raw[m]) if m else np.full(len(raw), np.nan)
            out[f"{band}_err"] = _as_float(raw[e]) if e else np.full(len(raw), np.nan)
        if spec.pm:
            for std, col in zip(("pmra", "pmdec"), spec.pm):
                c = _find_column(names, col)
                out[std] = _as_float(raw[c]) if c else np.full(len(raw), np.nan)
        out = out[np.isfinite(out["ra"]) & np.isfinite(out["dec"])]
        out.meta.update({"provider": self.name, "query_ra": ra_q, "query_dec": dec_q,
                         "query_radius": r_q, "bands": list(spec.bands)})
        if spec.epoch is not None:
            out.meta["epoch"] = spec.epoch
        return out

    def _fetch(self, ra_q: float, dec_q: float, r_q: float):
        query = globals()["vizier_query"]  # looked up at call time (tests replace it)
        raw = query(self.spec.catalog, ra_q, dec_q, r_q, columns=self.spec.columns,
                    timeout_s=self.timeout_s, row_limit=self.row_limit)
        return self._standardize(raw, ra_q, dec_q, r_q)

    def query(self, ra_deg: float, dec_deg: float, radius_deg: float, *,
              bands: Sequence[str] = (), box: bool = False):
        """Stars within a cone (or box): from the cache when it covers it, else VizieR.

        Raises
        ------
        CatalogUnavailable
            The query failed (network, service, astroquery missing) and no
            cached cone covers the request.
        ConfigError
            A requested band is not in this catalogue.
        """
        unknown = [b for b in bands if b not in self.spec.bands]
        if unknown:
            raise ConfigError(f"catalog: {self.name} has no band {unknown[0]!r} "
                              f"(bands: {', '.join(self.spec.bands)})")
        with self._lock:
            table = self._covering(ra_deg, dec_deg, radius_deg)
            if table is None:
                ra_q, dec_q, r_q = quantized_cone(ra_deg, dec_deg, radius_deg)
                try:
                    table = self._fetch(ra_q, dec_q, r_q)
                except CatalogUnavailable as exc:
                    raise CatalogUnavailable(f"{exc}; no cached result covers "
                                             f"{ra_deg:.5f} {dec_deg:+.5f} r={radius_deg:.4f} deg"
                                             f"{self._where()}") from exc
                except Exception as exc:
                    raise CatalogUnavailable(
                        f"{self.name}: query of {ra_q:.5f} {dec_q:+.5f} r={r_q:.4f} deg failed "
                        f"({type(exc).__name__}: {exc}); no cached result covers the field"
                        f"{self._where()}") from exc
                path = self.cache_path(ra_q, dec_q, r_q)
                if path is not None:
                    self._write(path, table)
                    self._remember(path, table)
                else:
                    self._remember((ra_q, dec_q, r_q), table)
                log.debug("%s: %d stars queried for %.5f %+.5f r=%.4f", self.name, len(table),
                          ra_q, dec_q, r_q)
        out = cone_cut(table, ra_deg, dec_deg, radius_deg, box=box).copy()
        out.meta["bands"] = list(bands) if bands else list(self.spec.bands)
        return out

    def _where(self) -> str:
        return f" in {self.cache_dir}" if self.cache_dir else " (no cache_dir configured)"

    def _covering(self, ra_deg, dec_deg, radius_deg):
        for key in reversed(self._memory):
            if isinstance(key, tuple):
                cone = CachedCone(*key, path=Path())
                if cone.covers(ra_deg, dec_deg, radius_deg):
                    return self._memory[key]
        cones = [c for c in self.cached_cones() if c.covers(ra_deg, dec_deg, radius_deg)]
        if not cones:
            return None
        best = min(cones, key=lambda c: c.radius_deg)
        try:
            return self._load(best.path)
        except Exception as exc:  # a damaged cache file: ignore it, query again
            log.debug("unreadable cache file %s: %s", best.path, exc)
            return None


# ---------------------------------------------------------------------------


def _open(provider: str, settings: Catalog, path_override, cache_dir) -> Provider | None:
    if path_override:
        return LocalCatalog.from_settings(settings, path_override)
    if provider == "none":
        return None
    if provider == "local":
        return LocalCatalog.from_settings(settings) if settings.path else None
    return OnlineCatalog(provider, cache_dir=settings.cache_dir or cache_dir,
                         timeout_s=settings.timeout_s)


def open_catalog(settings: Catalog, path_override: str | os.PathLike | None = None, *,
                 cache_dir: str | os.PathLike | None = None) -> Provider | None:
    """The astrometric reference catalogue of the settings, or None (relative mode).

    Parameters
    ----------
    settings : Catalog
        The ``[catalog]`` section: ``provider``, ``path``, column names,
        ``cache_dir``, ``timeout_s``.
    path_override : path, optional
        A local file that wins over the settings (the CLI's ``--catalog``).
    cache_dir : path, optional
        Cache folder used when ``settings.cache_dir`` is empty (e.g.
        ``OUT/catalogs``).

    Raises
    ------
    ConfigError
        A local file that does not exist, or an unknown provider.
    """
    return _open(settings.provider, settings, path_override, cache_dir)


def open_photometry_catalog(settings: Catalog, path_override: str | os.PathLike | None = None,
                            *, cache_dir: str | os.PathLike | None = None
                            ) -> Provider | None:
    """The photometric reference catalogue (``settings.photometry_provider``), or None."""
    return _open(settings.photometry_provider, settings, path_override, cache_dir)


__all__ = ["CatalogUnavailable", "LocalCatalog", "OnlineCatalog", "Provider", "VIZIER",
           "angular_distance_deg", "at_epoch", "brightness_order", "cone_cut", "field_cone",
           "open_catalog", "open_photometry_catalog", "quantized_cone", "vizier_query"]

