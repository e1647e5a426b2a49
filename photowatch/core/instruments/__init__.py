"""Instrument profiles: instrument knowledge as data.

One TOML file per instrument in this folder (``lmi.toml``, ``ratir.toml``,
``rimas.toml``, ``generic.toml``), or in ``[instrument] profile_dir``. A profile
says how to recognise the instrument, how to read frame type, filter, time,
target, pointing, camera and binning from a header, and the detector's gain,
read noise, saturation, sections and pixel scale (per camera where they
differ). Adding an instrument is adding a file; no stage knows instrument
names.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from photowatch.core.errors import ConfigError

HERE = Path(__file__).parent


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FrameTypes(_Model):
    """How a frame's type is read and what its values mean (case-insensitive)."""

    keywords: list[str] = ["OBSTYPE", "IMAGETYP", "IMAGETYPE", "OBJTYPE"]
    #: read the type from a PhotoPipe standard name's last letter (b/d/f/o)
    from_filename: bool = False
    bias: list[str] = ["bias", "zero"]
    dark: list[str] = ["dark"]
    flat: list[str] = ["dome flat", "sky flat", "twilight flat", "flat", "domeflat", "skyflat",
                       "flatfield", "twflat", "sky_flat", "dome_flat"]
    object: list[str] = ["object", "science", "standard", "light", "science crowded"]
    ignore: list[str] = ["focus", "test", "acquisition", "acq", "pointing", "guide", "junk"]
    #: kind of a frame with no type keyword ("" = not classifiable: BadInput unless ``infer``)
    default: Literal["", "bias", "dark", "flat", "object"] = ""
    #: a zero-second exposure is a bias whatever its type says
    zero_exposure_bias: bool = False


class Keys(_Model):
    """Header keywords, each a list tried in order."""

    filter: list[str] = ["FILTER"]
    #: values meaning "no filter in this wheel" (skipped when combining wheels)
    filter_open: list[str] = ["OPEN", "CLEAR", "EMPTY", "NONE", "BLANK"]
    #: the filter of flats and objects whose header names none ("" = None, or with
    #: ``infer`` "unknown" and a warning)
    filter_default: str = ""
    exptime: list[str] = ["EXPTIME", "EXPOSURE", "ITIME"]
    date_obs: list[str] = ["DATE-OBS", "DATE"]
    #: time of day, used when the date keyword holds only a date
    time_obs: list[str] = ["TIME-OBS", "UT", "UTC", "UTSTART"]
    target: list[str] = ["OBJECT", "OBJNAME", "TARGNAME"]
    #: a template of header keywords for the target, e.g. "{PRPSLID}-vis{VSTID}"
    target_template: str = ""
    ra: list[str] = ["RA", "OBJRA", "TELRA"]
    dec: list[str] = ["DEC", "OBJDEC", "TELDEC"]
    #: the target's own coordinates (not the pointing), for forced photometry (issue 21);
    #: read with ``radec_format``; [] = the header has none
    target_ra: list[str] = []
    target_dec: list[str] = []
    radec_format: Literal["auto", "degrees", "sexagesimal"] = "auto"
    camera: list[str] = []
    camera_from_filename: bool = False
    binning: list[str] = ["CCDSUM", "BINNING"]
    readout: list[str] = []
    airmass: list[str] = ["AIRMASS"]
    #: keywords of the pixel scale (arcsec per binned pixel) preferred over the detector's
    #: ``pixel_scale``; "XPIXSZ/FOCALLEN" = pixel size (um) over focal length (mm)
    pixel_scale: list[str] = []
    datasec: str = "DATASEC"
    biassec: str = "BIASSEC"
    trimsec: str = "TRIMSEC"
    #: sections are in unbinned detector pixels (converted by the binning and the
    #: sub-frame offset without a warning)
    sections_unbinned: bool = False


class Detector(_Model):
    """Detector numbers of one camera. ADU = analogue-digital units of the raw file."""

    gain: Annotated[float, Field(gt=0)] = 1.0  #: e-/ADU
    gain_keyword: str = ""  #: header keyword preferred over ``gain`` when present
    #: (``infer`` profiles) gain keywords tried in order; "A+B" is the mean of per-amplifier
    #: keywords, a string list such as '[2.01, 1.99]' its mean
    gain_keywords: list[str] = []
    #: keyword whose value divides the gain and saturation (RATIR's SOFTGAIN)
    divisor_keyword: str = ""
    read_noise: Annotated[float, Field(ge=0)] = 5.0  #: electrons
    read_noise_keyword: str = ""
    read_noise_keywords: list[str] = []  #: (``infer`` profiles) as ``gain_keywords``
    saturation: Annotated[float, Field(gt=0)] = 65535.0  #: ADU, before the divisor
    saturation_offset: float = 0.0  #: added after the divisor (RATIR: 65536/SOFTGAIN - 1)
    saturation_keyword: str = ""
    pixel_scale: Annotated[float, Field(gt=0)] = 0.5  #: arcsec per unbinned pixel
    #: sections (FITS style, 1-based, binned raw pixels) when the header has none
    datasec: str = ""
    biassec: str = ""
    trimsec: str = ""
    #: initial WCS when the header has none: sky position angle of the +y axis (deg, E of N)
    rotation_deg: float = 0.0
    #: True when the detector x axis increases to the east (mirror image on the sky)
    flip: bool = False
    #: optical centre (1-based unbinned pixel); empty = image centre
    optical_center: list[float] = []
    #: gain / read noise measured from the night's biases and flats (photon transfer)
    #: instead of taken from the profile or header
    measure_gain: bool = False
    measure_read_noise: bool = False


class Wcs(_Model):
    """How the initial WCS is built when a raw frame carries none."""

    #: keyword naming the aperture the telescope pointed to (RATIR's STRRQAP)
    aperture_keyword: str = ""
    #: aperture → offset (arcmin east, arcmin north) of the aperture from the camera centre
    aperture_offsets_arcmin: dict[str, list[float]] = {}


class Profile(_Model):
    name: str
    description: str = ""
    #: keyword and values that identify the instrument
    detect_keyword: str = "INSTRUME"
    detect_values: list[str] = []
    #: default site longitude (deg, east positive) for the night label
    site_longitude_deg: float | None = None
    types: FrameTypes = FrameTypes()
    keys: Keys = Keys()
    detector: Detector = Detector()
    #: per-camera overrides of ``detector`` (a camera id such as "C1" → keys of Detector)
    cameras: dict[str, dict] = {}
    #: masters an object frame must have (it waits without them) and may use
    calibrations_required: list[Literal["bias", "dark", "flat"]] = ["bias", "flat"]
    calibrations_optional: list[Literal["bias", "dark", "flat"]] = ["dark"]
    #: filters accepted for flats (empty: any)
    flat_filters: list[str] = []
    #: filter → reference catalogue band
    bands: dict[str, str] = {}
    wcs: Wcs = Wcs()
    #: read what the header offers in any common spelling and state every assumption (one
    #: warning per keyword and night) instead of refusing the frame: the generic profile
    infer: bool = False

    def detector_for(self, camera: str) -> Detector:
        """The detector numbers of ``camera`` (the defaults with its overrides)."""
        return _detector_for(self, camera)

    def band_for(self, filt: str | None) -> str | None:
        """The catalogue band of a filter (case-insensitive), or None."""
        if not filt:
            return None
        for key, band in self.bands.items():
            if key.lower() == filt.lower():
                return band
        return None

    def uses(self, kind: str) -> bool:
        return kind in self.calibrations_required or kind in self.calibrations_optional


@functools.lru_cache(maxsize=64)
def _detector_cached(profile_json: str, camera: str) -> Detector:
    profile = Profile.model_validate_json(profile_json)
    override = profile.cameras.get(camera, {})
    try:
        return Detector.model_validate({**profile.detector.model_dump(), **override})
    except ValidationError as err:
        raise ConfigError(f"profile {profile.name}: cameras.{camera}: {err.errors()[0]['msg']}") from None


def _detector_for(profile: Profile, camera: str) -> Detector:
    return _detector_cached(profile.model_dump_json(), camera)


def _profile_dirs(extra: str | Path | None) -> list[Path]:
    dirs = []
    if extra:
        dirs.append(Path(extra))
    dirs.append(HERE)
    return dirs


def load_profile_file(path: Path) -> Profile:
    """Read and validate one profile file; errors name the file and key."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the profile: {exc}") from None
    try:
        profile = Profile.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"{path}: {key}: {msg}") from None
    for camera, override in profile.cameras.items():
        unknown = set(override) - set(Detector.model_fields)
        if unknown:
            raise ConfigError(f"{path}: cameras.{camera}.{sorted(unknown)[0]}: unknown key")
        profile.detector_for(camera)
    return profile


def available_profiles(profile_dir: str | Path | None = None) -> dict[str, Path]:
    """Profile name → file, the configured folder first (it may override built-ins)."""
    found: dict[str, Path] = {}
    for folder in reversed(_profile_dirs(profile_dir)):
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                found[path.stem] = path
    return found


@functools.lru_cache(maxsize=32)
def _load_all(profile_dir: str) -> tuple[Profile, ...]:
    return tuple(load_profile_file(p) for p in available_profiles(profile_dir or None).values())


def load_profile(name: str, profile_dir: str | Path | None = None) -> Profile:
    """The profile called ``name``; ConfigError if there is none."""
    for profile in _load_all(str(profile_dir or "")):
        if profile.name.lower() == name.lower():
            return profile
    names = ", ".join(p.name for p in _load_all(str(profile_dir or "")))
    raise ConfigError(f"instrument.name: unknown instrument {name!r} (profiles: {names})")


def all_profiles(profile_dir: str | Path | None = None) -> tuple[Profile, ...]:
    return _load_all(str(profile_dir or ""))


def detect_profile(header, profile_dir: str | Path | None = None) -> Profile | None:
    """The profile whose detect keyword matches the header, or None."""
    for profile in all_profiles(profile_dir):
        if not profile.detect_values:
            continue
        value = header.get(profile.detect_keyword)
        if value is None:
            continue
        text = str(value).strip().lower()
        if any(text == v.lower() for v in profile.detect_values):
            return profile
    return None
