"""Classification: header + file name + instrument profile → a frame description.

:func:`classify` reads everything later steps need from a raw header once
(type, camera, filter, exposure, UTC time, night label, target, binning,
readout, pointing, detector numbers, sections) into a frozen
:class:`FrameInfo`, and builds PhotoPipe's standardised name
``YYYYMMDDTHHMMSSC<camera><b|d|f|o>.fits``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from photowatch.errors import BadInput, FrameIgnored, FrameRejected
from photowatch.instruments import Profile

KIND_LETTER = {"bias": "b", "dark": "d", "flat": "f", "object": "o"}
LETTER_KIND = {v: k for k, v in KIND_LETTER.items()}
#: a PhotoPipe standard name inside a file name: time, camera, type letter
STD_NAME_RE = re.compile(r"(\d{8}T\d{6})C(\d+)([bdfo])(?:_\d+)?(?:\.|_|$)")

Section = tuple[int, int, int, int]  # y0, y1, x0, x1: 0-based, end exclusive


@dataclass(frozen=True)
class FrameInfo:
    """What a raw frame is. Times are UTC; pixel numbers are binned raw pixels."""

    kind: str  #: bias | dark | flat | object
    instrument: str
    camera: str  #: "C0", "C1", ...
    filter: str | None
    exptime_s: float
    obs_time: datetime  #: UTC start of the exposure
    night: str  #: local calendar date at the start of the night, YYYY-MM-DD
    target: str | None
    binning: str  #: "1x1", "2x2"
    readout: str  #: readout mode ("" when the instrument has one)
    ra_deg: float | None  #: header pointing
    dec_deg: float | None
    airmass: float | None
    gain: float  #: e-/ADU
    read_noise_e: float
    saturation_adu: float
    pixel_scale_arcsec: float  #: per binned pixel
    datasec: Section | None
    biassec: Section | None
    trimsec: Section | None
    raw_name: str
    std_name: str

    @property
    def binxy(self) -> tuple[int, int]:
        x, y = self.binning.split("x")
        return int(x), int(y)

    @property
    def is_calibration(self) -> bool:
        return self.kind in ("bias", "dark", "flat")

    def summary(self) -> dict:
        """A JSON-friendly dict (for the store and logs)."""
        data = asdict(self)
        data["obs_time"] = self.obs_time.isoformat()
        return data

    @classmethod
    def from_summary(cls, data: dict) -> FrameInfo:
        data = dict(data)
        data["obs_time"] = datetime.fromisoformat(data["obs_time"])
        for key in ("datasec", "biassec", "trimsec"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def safe_name(text: str) -> str:
    """A string usable in file names (coadd_<TARGET>_<FILTER>.fits)."""
    cleaned = re.sub(r"[^A-Za-z0-9.+-]+", "_", text.strip()).strip("_")
    return cleaned or "UNKNOWN"


def _first(header, keys: list[str]):
    for key in keys:
        value = header.get(key)
        if value is None:
            continue
        if isinstance(value, str) and not value.strip():
            continue
        return key, value
    return None, None


def parse_section(text: str | None) -> Section | None:
    """A FITS section ``[x1:x2,y1:y2]`` (1-based, inclusive) → 0-based (y0, y1, x0, x1)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*", str(text))
    if not m:
        raise ValueError(f"not a FITS section: {text!r}")
    x1, x2, y1, y2 = (int(g) for g in m.groups())
    if x2 < x1 or y2 < y1:
        raise ValueError(f"reversed FITS section: {text!r}")
    return (y1 - 1, y2, x1 - 1, x2)


def parse_binning(value) -> str:
    if value is None:
        return "1x1"
    nums = re.findall(r"\d+", str(value))
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2:
        return "1x1"
    return f"{int(nums[0])}x{int(nums[1])}"


def parse_time(header, profile: Profile) -> datetime:
    key, value = _first(header, profile.keys.date_obs)
    if value is None:
        raise BadInput(f"no observation time (looked for {', '.join(profile.keys.date_obs)})")
    text = str(value).strip()
    if "T" not in text and " " not in text:
        tkey, tval = _first(header, profile.keys.time_obs)
        if tval is not None:
            text = f"{text}T{str(tval).strip()}"
    text = text.replace(" ", "T").rstrip("Z")
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        try:
            from astropy.time import Time

            stamp = Time(text, format="isot", scale="utc").to_datetime()
        except Exception:
            raise BadInput(f"unparsable date {key}={value!r}") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.astimezone(UTC)


def night_label(obs_time: datetime, longitude_deg: float, night_start_hour: float = 12.0) -> str:
    """Local (mean solar) calendar date at the start of the night.

    A frame at local time t belongs to the night that started at the previous
    ``night_start_hour`` (noon by default), so frames after midnight keep the
    date of the evening.
    """
    lon = longitude_deg - 360.0 if longitude_deg > 180 else longitude_deg
    local = obs_time + timedelta(hours=lon / 15.0)
    return (local - timedelta(hours=night_start_hour)).date().isoformat()


def _parse_angle(value, is_ra: bool, fmt: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and fmt != "sexagesimal":
        return float(value)
    text = str(value).strip()
    sexa = fmt == "sexagesimal" or (fmt == "auto" and re.search(r"[:hdms ]", text))
    try:
        if not sexa:
            return float(text)
        parts = [float(p) for p in re.split(r"[:hdms\s]+", text.strip("hdms ")) if p]
        if not parts:
            return None
        sign = -1.0 if text.lstrip().startswith("-") else 1.0
        parts[0] = abs(parts[0])
        while len(parts) < 3:
            parts.append(0.0)
        val = sign * (parts[0] + parts[1] / 60.0 + parts[2] / 3600.0)
        return val * 15.0 if is_ra else val
    except ValueError:
        return None


def frame_kind(header, filename: str, profile: Profile) -> str:
    """bias | dark | flat | object; FrameIgnored for other types, BadInput if none."""
    key, value = _first(header, profile.types.keywords)
    if value is not None:
        text = re.sub(r"\s+", " ", str(value).strip().lower())
        for kind in ("bias", "dark", "flat", "object"):
            if text in [v.lower() for v in getattr(profile.types, kind)]:
                return kind
        if text in [v.lower() for v in profile.types.ignore]:
            raise FrameIgnored(f"{key}={value!r} is not reduced")
        if not profile.types.from_filename:
            raise FrameIgnored(f"unknown frame type {key}={value!r}")
    if profile.types.from_filename:
        m = STD_NAME_RE.search(Path(filename).name)
        if m:
            return LETTER_KIND[m.group(3)]
    looked = ", ".join(profile.types.keywords) or "no keyword"
    extra = " or a b/d/f/o file-name suffix" if profile.types.from_filename else ""
    raise BadInput(f"no frame type ({looked}{extra})")


def _camera(header, filename: str, profile: Profile) -> str:
    _, value = _first(header, profile.keys.camera)
    if value is not None:
        text = str(value).strip()
        return f"C{int(float(text))}" if re.fullmatch(r"\d+(\.0*)?", text) else text
    if profile.keys.camera_from_filename:
        m = STD_NAME_RE.search(Path(filename).name)
        if m:
            return f"C{int(m.group(2))}"
    return "C0"


def _filter(header, profile: Profile) -> str | None:
    opened = {v.lower() for v in profile.keys.filter_open}
    values = []
    for key in profile.keys.filter:
        value = header.get(key)
        if value is None or not str(value).strip():
            continue
        text = str(value).strip()
        if text.lower() in opened:
            continue
        values.append(text)
    return "-".join(values) if values else None


def _target(header, profile: Profile) -> str | None:
    if profile.keys.target_template:
        try:
            names = re.findall(r"{([^}]+)}", profile.keys.target_template)
            values = {n: str(header[n]).strip() for n in names}
            text = profile.keys.target_template
            for n, v in values.items():
                text = text.replace("{" + n + "}", v)
            return text
        except KeyError:
            pass
    _, value = _first(header, profile.keys.target)
    return str(value).strip() if value is not None else None


def _number(header, key: str) -> float | None:
    if not key:
        return None
    value = header.get(key)
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _section(header, key: str, fallback: str, what: str) -> Section | None:
    text = header.get(key) if key else None
    try:
        return parse_section(text) or parse_section(fallback)
    except ValueError as exc:
        raise BadInput(f"bad {what}: {exc}") from None


def standard_name(obs_time: datetime, camera: str, kind: str) -> str:
    """PhotoPipe's name: ``YYYYMMDDTHHMMSSC<camera><b|d|f|o>.fits``."""
    cam = camera[1:] if camera.upper().startswith("C") else camera
    return f"{obs_time:%Y%m%dT%H%M%S}C{cam}{KIND_LETTER[kind]}.fits"


def classify(
    header,
    filename: str,
    profile: Profile,
    longitude_deg: float | None = None,
    night_start_hour: float = 12.0,
) -> FrameInfo:
    """Describe a raw frame.

    Raises
    ------
    BadInput
        no type keyword, unparsable date, bad section (the frame is quarantined)
    FrameIgnored
        a focus, test or acquisition frame, or an unknown type
    FrameRejected
        a frame that cannot be reduced as it is (no exposure time, a dark of 0 s)
    """
    kind = frame_kind(header, filename, profile)
    obs_time = parse_time(header, profile)
    camera = _camera(header, filename, profile)
    det = profile.detector_for(camera)

    _, exptime = _first(header, profile.keys.exptime)
    try:
        exptime_s = float(exptime) if exptime is not None else None
    except (TypeError, ValueError):
        exptime_s = None
    if exptime_s is None or not math.isfinite(exptime_s) or exptime_s < 0:
        if kind != "bias":
            raise FrameRejected(
                f"no valid exposure time ({', '.join(profile.keys.exptime)}={exptime!r})"
            )
        exptime_s = 0.0
    if kind == "dark" and exptime_s <= 0:
        raise FrameRejected("dark frame with an exposure time of 0 s")
    if kind in ("object", "flat") and exptime_s <= 0:
        raise FrameRejected(f"{kind} frame with an exposure time of 0 s")

    divisor = _number(header, det.divisor_keyword) or 1.0
    gain = _number(header, det.gain_keyword) or det.gain / divisor
    read_noise = _number(header, det.read_noise_keyword) or det.read_noise
    saturation = _number(header, det.saturation_keyword) or (
        det.saturation / divisor + det.saturation_offset
    )
    binning = parse_binning(_first(header, profile.keys.binning)[1])
    bx, _ = (int(v) for v in binning.split("x"))
    _, readout = _first(header, profile.keys.readout)

    longitude = longitude_deg
    if longitude is None:
        longitude = profile.site_longitude_deg
    if longitude is None:
        longitude = _number(header, "LONGITUD") or _number(header, "SITELONG") or 0.0

    _, ra = _first(header, profile.keys.ra)
    _, dec = _first(header, profile.keys.dec)
    _, airmass = _first(header, profile.keys.airmass)
    try:
        airmass = float(airmass) if airmass is not None else None
    except (TypeError, ValueError):
        airmass = None

    filt = _filter(header, profile) if kind in ("flat", "object") else None
    target = _target(header, profile) if kind == "object" else None
    if kind == "object" and not target:
        target = "UNKNOWN"

    return FrameInfo(
        kind=kind,
        instrument=profile.name,
        camera=camera,
        filter=filt,
        exptime_s=exptime_s,
        obs_time=obs_time,
        night=night_label(obs_time, longitude, night_start_hour),
        target=target,
        binning=binning,
        readout=str(readout).strip() if readout is not None else "",
        ra_deg=_parse_angle(ra, True, profile.keys.radec_format),
        dec_deg=_parse_angle(dec, False, profile.keys.radec_format),
        airmass=airmass,
        gain=gain,
        read_noise_e=read_noise,
        saturation_adu=saturation,
        pixel_scale_arcsec=det.pixel_scale * bx,
        datasec=_section(header, profile.keys.datasec, det.datasec, "data section"),
        biassec=_section(header, profile.keys.biassec, det.biassec, "overscan section"),
        trimsec=_section(header, profile.keys.trimsec, det.trimsec, "trim section"),
        raw_name=Path(filename).name,
        std_name=_existing_standard_name(filename, profile) or standard_name(obs_time, camera,
                                                                             kind),
    )


def _existing_standard_name(filename: str, profile: Profile) -> str | None:
    """A raw file already named the PhotoPipe way (RATIR) keeps its name."""
    if not (profile.types.from_filename or profile.keys.camera_from_filename):
        return None
    m = STD_NAME_RE.search(Path(filename).name)
    return f"{m.group(1)}C{m.group(2)}{m.group(3)}.fits" if m else None
