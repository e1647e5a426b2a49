"""Settings: ``config.toml`` → validated, frozen settings.

The file is found by ``--config``, else ``$PHOTOWATCH_CONFIG``, else
``./config.toml``, else the built-in defaults below. Every key is validated: an
unknown key, a wrong type or an impossible value gives one :class:`ConfigError`
line naming the file and the key (the CLI exits with status 2).

Each stage receives only its own section (``settings.stages.cosmics`` ...).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from photowatch.core.errors import ConfigError

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    watch_dir: str = "/data/camera"
    output_dir: str = "./photowatch-out"
    calibration_library: str = ""


class Instrument(Section):
    name: str = "auto"
    profile_dir: str = ""


class Site(Section):
    longitude_deg: Annotated[float, Field(ge=-180, le=360)] | None = None
    night_start_hour: Annotated[float, Field(ge=0, lt=24)] = 12.0


class Calibration(Section):
    min_inputs: Annotated[int, Field(ge=1)] = 3
    max_age_days: NonNegFloat = 30.0
    overscan: Literal["median", "poly"] = "median"
    overscan_order: Annotated[int, Field(ge=0, le=5)] = 1
    clip_sigma: PositiveFloat = 5.0
    final_clip_sigma: PositiveFloat = 3.0
    final_chunk_rows: Annotated[int, Field(ge=8)] = 256
    outlier_sigma: PositiveFloat = 6.0
    outlier_fraction: Fraction = 0.05
    bias_level_sigma: PositiveFloat = 8.0
    bias_noise_factor: PositiveFloat = 1.5
    dark_max_rate: PositiveFloat = 50.0
    flat_amin: Fraction = 0.2
    flat_amax: Fraction = 0.8
    flat_max_saturated_fraction: Fraction = 0.001
    flat_min_level: NonNegFloat = 1000.0
    bpm_hot_sigma: PositiveFloat = 8.0
    bpm_low_flat: Fraction = 0.5
    bpm_high_flat: PositiveFloat = 1.5
    stale_when: list[Literal["first_nonprovisional", "inputs_doubled", "final"]] = [
        "first_nonprovisional",
        "inputs_doubled",
        "final",
    ]
    rereduce: Literal["idle", "finalize", "never"] = "idle"
    keep_versions: Annotated[int, Field(ge=0)] = 0
    final_tolerance: NonNegFloat = 0.1


class Prepare(Section):
    saturation_grow_px: Annotated[int, Field(ge=0, le=20)] = 1
    bleed_trail: bool = True


class Flatten(Section):
    low_flat: Fraction = 0.3


class MasterSky(Section):
    enabled: bool = True
    per_target: bool = True
    min_frames: Annotated[int, Field(ge=2)] = 4
    min_dither_arcsec: NonNegFloat = 5.0
    detect_sigma: PositiveFloat = 2.0
    dilate_px: Annotated[int, Field(ge=0, le=50)] = 4
    clip_sigma: PositiveFloat = 3.0


class SkySub(Section):
    method: Literal["sep", "surface"] = "sep"
    mesh_px: Annotated[int, Field(ge=8)] = 128
    filter_size: Annotated[int, Field(ge=1, le=9)] = 3
    surface_order: Annotated[int, Field(ge=0, le=4)] = 2
    detect_sigma: PositiveFloat = 2.0
    dilate_px: Annotated[int, Field(ge=0, le=50)] = 4


class Cosmics(Section):
    """Cosmic-ray cleaning; the defaults are measured in ``photowatch/stages/cosmics.py``."""

    enabled: bool = True
    sigclip: PositiveFloat = 4.0
    sigfrac: PositiveFloat = 0.3
    objlim: PositiveFloat = 4.0
    niter: Annotated[int, Field(ge=1, le=10)] = 1
    sepmed: bool = True
    cleantype: Literal["meanmask", "medmask", "median", "idw"] = "meanmask"
    fsmode: Literal["median", "convolve"] = "median"
    psffwhm: PositiveFloat = 2.5
    psfsize: Annotated[int, Field(ge=3)] = 7
    #: flag neighbours of flagged pixels this many sigma above their 5x5 surroundings (0: off)
    grow_sigma: NonNegFloat = 2.0
    grow_passes: Annotated[int, Field(ge=0, le=5)] = 4
    grow_px: Annotated[int, Field(ge=0, le=3)] = 0
    #: where L.A.Cosmic runs: the whole frame, two row bands in two threads, or only
    #: boxes around the candidates of a cheap Laplacian pre-pass (same flags)
    tiles: Literal["full", "halves", "candidates"] = "candidates"
    #: second pass for faint events: pixels this many sigma above their eight neighbours'
    #: mean, by more than sharp_ratio of their value (0: off)
    sharp_sigma: NonNegFloat = 3.0
    sharp_ratio: Annotated[float, Field(gt=0, le=1)] = 0.6
    #: keep a flagged event only if the quadratic sum of its pixels' sigmas above their 5x5
    #: surroundings (background noise) reaches this; drops single noise peaks (0: off)
    min_peak_sigma: NonNegFloat = 5.3
    #: ... or if its matched sum with the ring pixels above 1 sigma reaches this and the
    #: ring stands above the sky on average (a hit's faint spill; 0: off)
    min_group_sigma: NonNegFloat = 5.5
    #: spare events a star of the frame's PSF explains: the event's pixels must stand this
    #: many sigma (sqrt of delta chi²) beyond a Moffat fitted without them (0: off)
    psf_sigma: NonNegFloat = 4.0


class Sources(Section):
    detect_sigma: PositiveFloat = 5.0
    min_area_px: Annotated[int, Field(ge=1)] = 5
    aperture_fwhm: PositiveFloat = 2.0
    #: radius of the large aperture of the aperture correction, in units of the median FWHM
    apcor_radius_fwhm: PositiveFloat = 5.0
    max_sources: Annotated[int, Field(ge=10)] = 5000
    #: second, PSF-matched detection pass for faint point sources: detects what the CAT
    #: aperture would measure at this S/N (the depth LIMMAG states); 0: off
    psf_detect_snr: NonNegFloat = 5.0


class Astrometry(Section):
    enabled: bool = True
    max_pointing_error_arcsec: PositiveFloat = 300.0
    scale_tolerance: Fraction = 0.05
    max_stars: Annotated[int, Field(ge=8)] = 60
    min_matches: Annotated[int, Field(ge=3)] = 5
    match_radius_arcsec: PositiveFloat = 2.0
    sip_degree: Annotated[int, Field(ge=0, le=5)] = 3
    clip_sigma: PositiveFloat = 3.0
    max_rms_arcsec: PositiveFloat = 0.5
    solve_field: bool = True
    solve_field_timeout_s: PositiveFloat = 30.0
    neighbour_tolerance_arcsec: PositiveFloat = 5.0
    neighbour_pointing_arcsec: PositiveFloat = 90.0


class ZeroPoint(Section):
    enabled: bool = True
    match_radius_arcsec: PositiveFloat = 1.5
    max_mag_err: PositiveFloat = 0.1
    min_stars: Annotated[int, Field(ge=1)] = 3
    clip_sigma: PositiveFloat = 3.0
    err_floor_mag: NonNegFloat = 0.01
    color_term: bool = False
    spatial_order: Annotated[int, Field(ge=0, le=2)] = 0
    #: a calibrator whose detected or catalogued neighbours put more than this fraction of
    #: its own light into its aperture is left out of the fit (0: off)
    max_contamination: NonNegFloat = 0.02
    #: when at least ``min_bright`` calibrators reach this S/N, only they are fitted: the
    #: fainter ones carry the light of the field's undetected stars (0: off)
    bright_snr: NonNegFloat = 100.0
    min_bright: Annotated[int, Field(ge=1)] = 10


class Stages(Section):
    write_intermediates: bool = False
    quicklook_png: bool = True
    prepare: Prepare = Prepare()
    flatten: Flatten = Flatten()
    mastersky: MasterSky = MasterSky()
    skysub: SkySub = SkySub()
    cosmics: Cosmics = Cosmics()
    sources: Sources = Sources()
    astrometry: Astrometry = Astrometry()
    zeropoint: ZeroPoint = ZeroPoint()


class Quality(Section):
    max_zp_drop_mag: PositiveFloat = 1.0
    max_fwhm_arcsec: PositiveFloat = 4.0
    max_fwhm_ratio: PositiveFloat = 1.8
    max_ellipticity: Fraction = 0.3
    max_sky_e_per_s: PositiveFloat = 1.0e5
    min_stars: Annotated[int, Field(ge=1)] = 5
    min_flux_scale: PositiveFloat = 0.1


class Catalog(Section):
    path: str = ""
    provider: Literal["local", "gaia", "panstarrs", "sdss", "skymapper", "2mass", "none"] = "local"
    photometry_provider: Literal["local", "panstarrs", "sdss", "skymapper", "2mass", "none"] = (
        "local"
    )
    cache_dir: str = ""
    ra_column: str = "ra"
    dec_column: str = "dec"
    mag_column: str = "{band}"
    err_column: str = "{band}_err"
    radius_margin: PositiveFloat = 1.2
    timeout_s: PositiveFloat = 60.0


class Coadd(Section):
    enabled: bool = True
    per_filter_grid: bool = True
    pixel_scale_arcsec: NonNegFloat = 0.0
    margin_arcsec: NonNegFloat = 60.0
    mapping_step_px: Annotated[int, Field(ge=4, le=512)] = 64
    interpolation: Literal["bilinear", "cubic"] = "bilinear"
    clip_sigma: PositiveFloat = 3.0
    chunk_rows: Annotated[int, Field(ge=8)] = 256
    quicklook_png: bool = True
    #: quick-look sums memory-mapped from unlinked files in coadds/<night>/.acc, each strip
    #: dropped from the resident set once updated (the page cache keeps it): a 4k coadd
    #: costs ~0 resident instead of ~900 MB
    mmap: bool = True
    #: ... for sums of at least this many MB (28 B per grid pixel: a 4k coadd's ~600 MB);
    #: smaller ones stay in memory, where an add costs a third (no pages faulted back in)
    mmap_min_mb: NonNegFloat = 256.0
    #: MB of members' resamplings kept for the swap-out of a re-reduced frame (each at most
    #: a quarter of it: 1k frames are kept, 4k ones are not); 0 = always resample again
    swap_cache_mb: NonNegFloat = 64.0
    detect_sigma: PositiveFloat = 3.0
    #: coadd catalogue: at most this many sources (the brightest); a deep stack of a rich
    #: field holds far more than a single frame's cap (stages.sources.max_sources)
    max_sources: Annotated[int, Field(ge=10)] = 200_000
    #: final coadd: tolerance for seeing differences, a fraction of the pixel level added
    #: in quadrature to the noise before clipping (SWarp's CLIP_AMPFRAC)
    clip_amp_frac: Annotated[float, Field(ge=0, le=5)] = 2.0
    #: final coadd: also reject neighbours (within N px) of a rejected value above clip/2
    clip_grow_px: Annotated[int, Field(ge=0, le=5)] = 1
    #: catalogues of several filters of a target are merged within this radius
    merge_radius_arcsec: PositiveFloat = 1.0


class Daemon(Section):
    workers: Annotated[int, Field(ge=0, le=64)] = 0
    threads_per_worker: Annotated[int, Field(ge=0, le=64)] = 0
    polling: bool = False
    poll_interval_s: PositiveFloat = 1.0
    settle_s: NonNegFloat = 2.0
    incomplete_timeout_s: PositiveFloat = 300.0
    rescan_interval_s: PositiveFloat = 60.0
    max_tries: Annotated[int, Field(ge=1)] = 3
    retry_backoff_s: PositiveFloat = 5.0
    retry_backoff_max_s: PositiveFloat = 120.0
    report_interval_s: NonNegFloat = 60.0
    stop_timeout_s: PositiveFloat = 60.0
    patterns: list[str] = ["*.fits", "*.fit", "*.fts", "*.fits.fz", "*.fits.gz", "*.fit.gz",
                           "*.fts.gz", "*.fz"]


class Changes(Section):
    """New, varying and moving sources against the field's reference (issue 21, lane changes;
    :mod:`photowatch.stages.changes`)."""

    enabled: bool = True
    match_radius_arcsec: PositiveFloat = 1.0  #: also at least match_radius_fwhm x FWHM
    match_radius_fwhm: PositiveFloat = 1.0
    min_snr: PositiveFloat = 5.0  #: a new source is above the frame's 5 sigma limit
    new_margin_mag: NonNegFloat = 0.3  #: brighter than the reference limit by this ...
    new_sigma: NonNegFloat = 3.0  #: ... plus this many of its own magnitude errors
    vary_sigma: PositiveFloat = 5.0  #: a varying source changed by this many sigma
    vary_floor_mag: NonNegFloat = 0.03  #: systematic error added in quadrature
    blend_radius_fwhm: PositiveFloat = 2.0  #: reference stars this close to a source are its own
    max_blend_fraction: NonNegFloat = 0.1  #: its other own stars add at most this flux
    #: varying: another star this close (x 10**(0.067 dm)) is in the aperture (radius
    #: stages.sources.aperture_fwhm = 2 FWHM): crowded, not judged ...
    crowd_radius_fwhm: NonNegFloat = 3.0
    crowd_dmag: NonNegFloat = 1.0  #: ... unless fainter than the source by this
    #: new: a brighter star this close (x 10**(0.067 dm)): maybe a piece of it, not judged
    new_crowd_radius_fwhm: NonNegFloat = 1.5
    max_fwhm_ratio: PositiveFloat = 2.0  #: star-like: FWHM at most this x the frame's ...
    min_fwhm_ratio: NonNegFloat = 0.6  #: ... and at least this (else a hot pixel or a cosmic)
    max_ellipticity: Fraction = 0.5
    #: varying: at most this much more elongated than the frame's median star
    vary_max_extra_ellipticity: Fraction = 0.15
    edge_fwhm: NonNegFloat = 3.0  #: closer than this to the edge or no data: an artefact
    saturation_radius_fwhm: NonNegFloat = 4.0  #: saturated pixel or bleed this close: artefact
    link_tolerance_arcsec: PositiveFloat = 0.6  #: largest residual of a detection from its track
    max_rate_arcsec_min: PositiveFloat = 10.0  #: fastest mover linked
    min_motion_arcsec: PositiveFloat = 1.5  #: a track moving less over its span is static
    min_track_points: Annotated[int, Field(ge=2)] = 3
    #: without a reference catalogue: the night's coadd of the target and filter becomes the
    #: reference (frozen) once it holds this many frames
    reference_frames: Annotated[int, Field(ge=1)] = 3
    cutout_px: Annotated[int, Field(ge=8, le=512)] = 48  #: side of the PNG cutouts
    max_per_frame: Annotated[int, Field(ge=1)] = 50  #: the most significant kept per frame


class Logging(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    file: str = ""


class Targets(Section):
    """Positions of interest for forced photometry and light curves (issue 21)."""

    #: ECSV or CSV with columns name, ra, dec (degrees or sexagesimal); relative to the cwd
    file: str = ""
    #: "NAME=RA,DEC" entries (``--target`` on reduce and watch adds to these)
    positions: list[str] = []
    #: measure at the header's target coordinates (profile keys target_ra/target_dec)
    from_header: bool = True
    #: significance of a detection, and of the upper limit given otherwise
    nsigma: PositiveFloat = 5.0
    #: target_faded alert: fainter than the previous detection by this many sigma
    fade_sigma: PositiveFloat = 3.0


class Alerts(Section):
    """A command run on events (issue 21), one JSON document on its stdin."""

    command: str = ""
    timeout_s: PositiveFloat = 30.0
    #: events waiting beyond this are dropped (oldest first, with a warning)
    max_queue: Annotated[int, Field(ge=1)] = 100
    #: events that run the command (all by default)
    events: list[str] = ["target_detected", "target_faded", "new_candidate", "frame_rejected",
                         "daemon_problem"]


class Settings(Section):
    paths: Paths = Paths()
    instrument: Instrument = Instrument()
    site: Site = Site()
    calibration: Calibration = Calibration()
    stages: Stages = Stages()
    quality: Quality = Quality()
    catalog: Catalog = Catalog()
    coadd: Coadd = Coadd()
    daemon: Daemon = Daemon()
    logging: Logging = Logging()
    changes: Changes = Changes()
    targets: Targets = Targets()
    alerts: Alerts = Alerts()

    #: where the settings came from (a path, or "built-in defaults")
    source: str = Field(default="built-in defaults", exclude=True)

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.calibration.flat_amin >= self.calibration.flat_amax:
            raise ValueError("calibration.flat_amin must be below calibration.flat_amax")
        return self

    def with_overrides(self, **sections) -> Settings:
        """Return settings with some values replaced, e.g. ``paths={'output_dir': 'x'}``."""
        data = self.model_dump()
        for name, values in sections.items():
            if isinstance(values, dict):
                data[name] = {**data[name], **values}
            else:
                data[name] = values
        data["source"] = self.source
        return Settings.model_validate(data)


def _format_error(path: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{path}: {key}: {msg}{extra}"


def parse_settings(data: dict, source: str) -> Settings:
    """Validate a parsed TOML mapping; errors name ``source`` and the key."""
    try:
        return Settings.model_validate({**data, "source": source})
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def find_config(explicit: str | os.PathLike | None = None) -> Path | None:
    """The config file to use: ``--config``, ``$PHOTOWATCH_CONFIG``, ``./config.toml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("PHOTOWATCH_CONFIG")
    if env:
        return Path(env)
    local = Path("config.toml")
    return local if local.is_file() else None


def load_settings(explicit: str | os.PathLike | None = None) -> Settings:
    """Find, read and validate the settings (see the module docstring)."""
    path = find_config(explicit)
    if path is None:
        return Settings()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_settings(data, str(path))


def default_workers(settings: Settings) -> int:
    """Worker threads of the engine: ``daemon.workers``, else one per core."""
    return settings.daemon.workers or (os.cpu_count() or 1)


def threads_per_worker(settings: Settings) -> int:
    """Threads each worker's numeric libraries (and resampling) may use."""
    if settings.daemon.threads_per_worker:
        return settings.daemon.threads_per_worker
    return max(1, (os.cpu_count() or 1) // default_workers(settings))
