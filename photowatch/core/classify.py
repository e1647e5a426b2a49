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

from photowatch.core.errors import BadInput, FrameIgnored, FrameRejected
from photowatch.core.instruments import Profile

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
    #: what the profile assumed: (keyword, value, assumption) — one warning per night each
    assumptions: tuple = ()
    #: why the frame has its type (keyword and value, or the rule that decided)
    type_reason: str = ""
    #: where gain and read noise come from: header | profile | measure | measured
    gain_source: str = "profile"
    read_noise_source: str = "profile"

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
        data["assumptions"] = tuple(tuple(a) for a in data.get("assumptions") or ())
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


class _Notes:
    """Assumptions made while reading one header: (keyword, value, assumption)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []

    def add(self, keyword: str, value, assumption: str) -> None:
        text = "" if value is None else str(value).strip()
        if not any(k == keyword for k, _, _ in self.items):
            self.items.append((keyword, text, assumption))


def _norm_type(value) -> str:
    text = re.sub(r"\(.*?\)", " ", str(value)).strip().lower()
    return re.sub(r"[\s_]+", " ", text).strip()


def _kind_of(text: str, profile: Profile) -> str | None:
    """bias|dark|flat|object|ignore for a type value, or None when it is not known."""
    candidates = [text]
    if profile.infer:
        short = re.sub(r"\b(frame|field|image|exposure)\b", " ", text)
        candidates.append(re.sub(r"\s+", " ", short).strip())
    for cand in candidates:
        for kind in ("bias", "dark", "flat", "object"):
            if cand in [v.lower() for v in getattr(profile.types, kind)]:
                return kind
        if cand in [v.lower() for v in profile.types.ignore]:
            return "ignore"
    if profile.infer:
        for kind, pattern in (("flat", r"flat"), ("bias", r"\bbias|\bzero\b"),
                              ("dark", r"\bdark"), ("object", r"\blight|\bobject|\bscience")):
            if re.search(pattern, text):
                return kind
    return None


def _name_hint(text: str | None) -> str | None:
    """The calibration type a name suggests ("sky flat", "bias_03", "Dark-300s"), or None."""
    if not text:
        return None
    t = str(text).lower()
    if re.search(r"flat|twilight|\btwi\b|\bsky\b", t):
        return "flat"
    if re.search(r"\bbias|\bzero\b", t):
        return "bias"
    if re.search(r"\bdark", t):
        return "dark"
    return None


def _exptime(header, profile: Profile) -> tuple[str | None, object, float | None]:
    key, value = _first(header, profile.keys.exptime)
    try:
        out = float(str(value).strip()) if value is not None else None
    except ValueError:
        out = None
    if out is not None and (not math.isfinite(out) or out < 0):
        out = None
    return key, value, out


def _decide_kind(header, filename: str, profile: Profile, exptime_s: float | None,
                 notes: _Notes, level_adu: float | None = None) -> tuple[str, str]:
    """(kind, reason); FrameIgnored for other types, BadInput if none can be decided.

    ``level_adu`` (the frame's median raw level, when the caller read it) weighs a type
    decided from a name: a "flat" whose level is under 5 % of saturation is an object.
    """
    saturation = _number(header, "SATURATE") or 65535.0

    def dim(kind_now: str) -> bool:
        return kind_now == "flat" and level_adu is not None and level_adu < 0.05 * saturation

    key, value = _first(header, profile.types.keywords)
    kind = reason = None
    if value is not None:
        found = _kind_of(_norm_type(value), profile)
        if found == "ignore":
            raise FrameIgnored(f"{key}={value!r} is not reduced")
        if found:
            kind, reason = found, f"{key}={str(value).strip()!r}"
        elif not profile.infer and not profile.types.from_filename:
            raise FrameIgnored(f"unknown frame type {key}={value!r}")
    if kind is None and profile.types.from_filename:
        m = STD_NAME_RE.search(Path(filename).name)
        if m:
            kind, reason = LETTER_KIND[m.group(3)], f"file-name suffix {m.group(3)!r}"
    if kind is None and (profile.infer or profile.types.default):
        _, objname = _first(header, profile.keys.target or ["OBJECT"])
        hint = _name_hint(objname) or _name_hint(Path(filename).stem)
        if exptime_s == 0 and (profile.infer or profile.types.zero_exposure_bias):
            kind, why = "bias", "a zero-second exposure"
        elif hint and profile.infer:
            kind, why = hint, f"named {objname or Path(filename).name!r}"
            if dim(kind):
                kind, why = "object", f"{why}, but its level ({level_adu:.0f} ADU) is too low " \
                                      "for a flat"
        else:
            kind = profile.types.default or "object"
            why = f"an exposure of {exptime_s:g} s" if exptime_s else "the profile's default"
        reason = f"no known type ({key}={value!r}): {why}" if value is not None else \
            f"no type keyword: {why}"
        if not profile.types.default:
            looked = key if value is not None else "/".join(profile.types.keywords[:4])
            notes.add(looked, value, f"{'unknown' if value is not None else 'no'} frame type: "
                      "decided from exposure time and names (zero seconds: bias; named like "
                      "a flat, bias or dark: that; else object)")
    if kind is None:
        looked = ", ".join(profile.types.keywords) or "no keyword"
        extra = " or a b/d/f/o file-name suffix" if profile.types.from_filename else ""
        raise BadInput(f"no frame type ({looked}{extra})")
    # a type contradicted by other keywords
    if exptime_s == 0 and kind != "bias" and (profile.infer or profile.types.zero_exposure_bias):
        reason = f"{reason}, but a zero-second exposure is a bias"
        kind = "bias"
    if profile.infer and kind in ("object", "dark"):
        _, objname = _first(header, profile.keys.target or ["OBJECT"])
        hint = _name_hint(objname)
        if kind == "object" and hint == "flat":
            if dim("flat"):
                reason = f"{reason}; OBJECT={objname!r} names a flat, but its level " \
                         f"({level_adu:.0f} ADU) is too low for a flat: kept as object"
            elif exptime_s is not None and exptime_s <= 120:
                kind, reason = "flat", f"{reason}, but OBJECT={objname!r} names a flat " \
                                       f"(exposure {exptime_s:g} s" + (
                                           f", level {level_adu:.0f} ADU)" if level_adu
                                           is not None else ")")
            else:
                reason = f"{reason}; OBJECT={objname!r} names a flat, but the exposure " \
                         f"({exptime_s} s) is a science exposure: kept as object"
        elif hint in ("bias", "dark") and hint != kind:
            reason = f"{reason}; OBJECT={objname!r} names a {hint} but the exposure is " \
                     f"{exptime_s} s: kept as {kind}"
    return kind, reason


def weighs_level(info: FrameInfo) -> bool:
    """Whether a frame's type came from a name, so its pixel level should be weighed
    (``classify(..., level_adu=...)``)."""
    return "names a flat" in info.type_reason or (
        info.kind == "flat" and ": named " in info.type_reason)


def frame_kind(header, filename: str, profile: Profile) -> str:
    """bias | dark | flat | object; FrameIgnored for other types, BadInput if none."""
    return _decide_kind(header, filename, profile, _exptime(header, profile)[2], _Notes())[0]


def _clock(text: str) -> str:
    """'9:27:27.00' → '09:27:27.00'."""
    parts = text.strip().split(":")
    if len(parts) >= 2:
        parts = [p.zfill(2) if i < 2 else (p if "." not in p or len(p.split(".")[0]) == 2
                                           else "0" + p) for i, p in enumerate(parts)]
    return ":".join(parts)


def parse_time(header, profile: Profile, notes: _Notes | None = None) -> datetime:
    notes = notes if notes is not None else _Notes()
    key, value = _first(header, profile.keys.date_obs)
    tai = str(header.get("TIMESYS", "")).strip().upper() == "TAI"
    if value is None and profile.infer:
        for mkey, offset in (("MJD-OBS", 2400000.5), ("JD", 0.0)):
            mval = _number(header, mkey)
            if mval is not None and mval != int(mval):
                from astropy.time import Time

                stamp = Time(mval + offset, format="jd", scale="tai" if tai else "utc")
                return stamp.utc.to_datetime().replace(tzinfo=UTC)
        lkey, lval = _first(header, ["DATE-LOC", "DATE_LOC"])
        if lval is not None:
            notes.add(lkey, lval, "only a local date: taken as UTC (the night label may be off)")
            key, value = lkey, lval
    if value is None:
        raise BadInput(f"no observation time (looked for {', '.join(profile.keys.date_obs)})")
    text = str(value).strip()
    m = re.fullmatch(r"(\d{1,2})/(\d{1,2})/(\d{2,4})", text)
    if m:  # dd/mm/yy (old IRAF and MaxIm DATE)
        d, mo, y = (int(g) for g in m.groups())
        y = y + (1900 if y >= 50 else 2000) if y < 100 else y
        text = f"{y:04d}-{mo:02d}-{d:02d}"
    if "T" not in text and " " not in text:
        tkey, tval = _first(header, profile.keys.time_obs)
        if tval is not None:
            text = f"{text}T{_clock(str(tval))}"
            tai = tai or tkey == "TAIHMS"
        elif profile.infer:
            mval = _number(header, "MJD-OBS")
            if mval is not None and mval != int(mval):
                from astropy.time import Time

                stamp = Time(mval, format="mjd", scale="tai" if tai else "utc")
                return stamp.utc.to_datetime().replace(tzinfo=UTC)
            notes.add(key, value, "a date without a time: 00:00 UTC assumed")
    elif "T" in text:
        day, _, clock = text.partition("T")
        text = f"{day}T{_clock(clock)}"
    text = text.replace(" ", "T").rstrip("Z")
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        try:
            from astropy.time import Time

            stamp = Time(text, format="isot", scale="utc").to_datetime()
        except Exception:
            raise BadInput(f"unparsable date {key}={value!r}") from None
    if tai:
        from astropy.time import Time

        stamp = Time(stamp.replace(tzinfo=None), scale="tai").utc.to_datetime()
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.astimezone(UTC)


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


def _clean_filter(text: str) -> str:
    """'g DECam SDSS c0001 4720.0 1520.0' → 'g' (a name followed by wavelength numbers)."""
    tokens = text.split()
    if len(tokens) >= 3 and all(re.fullmatch(r"[\d.]+", t) for t in tokens[-2:]):
        return tokens[0]
    return text


def _filter(header, profile: Profile, notes: _Notes | None = None) -> str | None:
    opened = {v.lower() for v in profile.keys.filter_open}
    found = []
    for key in profile.keys.filter:
        value = header.get(key)
        if value is None or not str(value).strip():
            continue
        text = str(value).strip()
        if text.lower() in opened:
            continue
        found.append((key, text))
    if profile.infer and found:
        for key, text in found:
            if key == "FILTER":  # the summary keyword wins over the wheels it summarises
                return _clean_filter(text)
        wheels = [t for k, t in found if re.fullmatch(r"FILTER\d", k)]
        if wheels:
            return "-".join(dict.fromkeys(wheels))
        return _clean_filter(found[0][1])
    if found:
        return "-".join(t for _, t in found)
    if profile.keys.filter_default:
        return profile.keys.filter_default
    if profile.infer and notes is not None:
        notes.add("/".join(profile.keys.filter[:3]) or "FILTER", None,
                  "no filter: one filter 'unknown' for the night")
        return "unknown"
    return None


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


def _numbers(header, spec: str) -> tuple[float | None, str]:
    """A keyword's value as a number: 'A+B' = mean of several keywords; a string list
    '[2.01, 1.99]' = its mean. Returns (value or None, the text read)."""
    keys = spec.split("+")
    vals, texts = [], []
    for key in keys:
        raw = header.get(key)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        texts.append(f"{key}={raw!r}" if len(keys) > 1 else str(raw).strip())
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            vals.append(float(raw))
        else:
            nums = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(raw))
            vals += [float(n) for n in nums]
    vals = [v for v in vals if math.isfinite(v)]
    text = ", ".join(texts)
    if not vals or (len(keys) > 1 and len(texts) < len(keys) and len(texts) < 2):
        return (None, text) if texts else (None, "")
    return sum(vals) / len(vals), text


def _detector_value(header, det, profile: Profile, notes: _Notes, what: str
                    ) -> tuple[float, str]:
    """Gain (e-/ADU) or read noise (e-) and where it came from: header|profile|measure."""
    if what == "gain":
        measure, default, single, many = (det.measure_gain, det.gain, det.gain_keyword,
                                          det.gain_keywords)
        lo, hi = 0.05, 30.0
    else:
        measure, default, single, many = (det.measure_read_noise, det.read_noise,
                                          det.read_noise_keyword, det.read_noise_keywords)
        lo, hi = 0.3, 200.0
    if measure:
        return default, "measure"
    if not profile.infer:
        divisor = _number(header, det.divisor_keyword) or 1.0
        value = _number(header, single)
        if value:
            return value, "header"
        return (default / divisor if what == "gain" else default), "profile"
    bad = None
    for spec in many or ([single] if single else []):
        value, text = _numbers(header, spec)
        if value is not None and lo <= value <= hi:
            return value, "header"
        if text and bad is None:
            bad = (spec.replace("+", "/"), text)
    label = "gain in e-/ADU (a camera setting or a placeholder?)" if what == "gain" else \
        "read noise in electrons"
    if bad is not None:
        notes.add(bad[0], bad[1], f"not a usable {label}: {what} measured from the night's "
                  "biases and flats")
    elif many or single:
        notes.add((many or [single])[0], None, f"no {what.replace('_', ' ')} keyword: "
                  f"{what.replace('_', ' ')} measured from the night's biases and flats")
    else:
        return default, "profile"
    return default, "measure"


def _binning(header, profile: Profile, notes: _Notes) -> str:
    for spec in profile.keys.binning:
        if "/" in spec:
            kx, ky = spec.split("/", 1)
            vx, vy = _number(header, kx), _number(header, ky)
            if vx and vy:
                return f"{int(vx)}x{int(vy)}"
            continue
        value = header.get(spec)
        if value is not None and str(value).strip():
            return parse_binning(value)
    if profile.infer and profile.keys.binning:
        notes.add(profile.keys.binning[0], None, "no binning keyword: 1x1 assumed")
    return "1x1"


def _lenient_section(text) -> Section | None:
    """A section in the FITS/IRAF form and its variants: blanks, no brackets, reversed
    ranges (normalised). None when empty; ValueError for a placeholder or nonsense."""
    if text is None or not str(text).strip():
        return None
    t = str(text).strip()
    if t.upper() in ("UNKNOWN", "NONE", "N/A", "NA", "-"):
        raise ValueError("a placeholder")
    m = re.fullmatch(r"[\[(]?\s*(\d+)\s*[:]\s*(\d+)\s*,\s*(\d+)\s*[:]\s*(\d+)\s*[\])]?", t)
    if not m:
        raise ValueError("not a FITS section")
    x1, x2, y1, y2 = (int(g) for g in m.groups())
    if min(x1, x2, y1, y2) < 1:
        raise ValueError("a placeholder (zero bounds)")
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return (y1 - 1, y2, x1 - 1, x2)


def _shape(header) -> tuple[int, int] | None:
    nx = _number(header, "ZNAXIS1") or _number(header, "NAXIS1")
    ny = _number(header, "ZNAXIS2") or _number(header, "NAXIS2")
    return (int(ny), int(nx)) if nx and ny else None


def _fits(sec: Section, shape: tuple[int, int] | None) -> bool:
    return shape is None or (sec[1] <= shape[0] and sec[3] <= shape[1] and sec[0] < sec[1]
                             and sec[2] < sec[3])


def _subframe_offset(header) -> tuple[int, int]:
    """Sub-frame origin in unbinned detector pixels (x, y), 0 when full frame."""
    ccdsec = header.get("CCDSEC")
    try:
        sec = _lenient_section(ccdsec)
        if sec is not None:
            return sec[2], sec[0]
    except ValueError:
        pass
    ox, oy = _number(header, "XORGSUBF"), _number(header, "YORGSUBF")
    if ox is not None or oy is not None:
        return int(ox or 0), int(oy or 0)
    return 0, 0


def _unbinned_to_binned(sec: Section, binning: str, offset: tuple[int, int]) -> Section:
    bx, by = (int(v) for v in binning.split("x"))
    y0, y1, x0, x1 = sec
    ox, oy = offset
    # ends exclusive, floored: a binned pixel only partly inside the section is left out
    return ((y0 - oy) // by, (y1 - oy) // by, (x0 - ox) // bx, (x1 - ox) // bx)


def _section(header, key: str, fallback: str, what: str, profile: Profile | None = None,
             binning: str = "1x1", notes: _Notes | None = None) -> Section | None:
    text = header.get(key) if key else None
    if profile is None or not profile.infer:
        try:
            return parse_section(text) or parse_section(fallback)
        except ValueError as exc:
            raise BadInput(f"bad {what}: {exc}") from None
    assume = {"data section": "full frame", "trim section": "the data section",
              "overscan section": "no overscan"}[what]
    try:
        sec = _lenient_section(text)
    except ValueError as exc:
        notes.add(key, text, f"{what} is {exc}: ignored ({assume})")
        sec = None
    if sec is None:
        return parse_section(fallback) if fallback else None
    shape = _shape(header)
    if _fits(sec, shape):
        return sec
    offset = _subframe_offset(header)
    for off in ((0, 0), offset) if offset != (0, 0) else ((0, 0),):
        conv = _unbinned_to_binned(sec, binning, off)
        if conv[0] >= 0 and conv[2] >= 0 and _fits(conv, shape) and (binning != "1x1" or off !=
                                                                     (0, 0)):
            if not profile.keys.sections_unbinned:
                notes.add(key, text, f"{what} in unbinned detector pixels: converted by binning "
                          f"{binning} and sub-frame offset {off} to "
                          f"[{conv[2] + 1}:{conv[3]},{conv[0] + 1}:{conv[1]}]")
            return conv
    notes.add(key, text, f"{what} does not fit the {shape[1]}x{shape[0]} image, even in "
              f"unbinned pixels: ignored ({assume})")
    return parse_section(fallback) if fallback else None


def _pixel_scale(header, profile: Profile, det, bx: int, notes: _Notes) -> float:
    """Arcsec per binned pixel: from the header's keywords, else the profile's detector."""
    for spec in profile.keys.pixel_scale:
        if "/" in spec:
            a, b = (_number(header, k) for k in spec.split("/", 1))
            if spec.startswith("XPIXSZ") and a and b:  # um, mm
                value = 206.264806 * a / b
            elif spec.startswith("CD") and a is not None and b is not None and (a or b):
                value = 3600.0 * math.hypot(a, b)
            else:
                continue
        else:
            value = _number(header, spec)
            if value is not None and spec.startswith("CDELT"):
                value = abs(value) * 3600.0
        if value and 0.01 < abs(value) < 100:
            return abs(value)
    if profile.infer and profile.keys.pixel_scale:
        notes.add(profile.keys.pixel_scale[0], None, f"no pixel scale: {det.pixel_scale:g} "
                  "arcsec per unbinned pixel assumed (astrometry may fail)")
    return det.pixel_scale * bx


def _pointing(header, profile: Profile, notes: _Notes) -> tuple[float | None, float | None]:
    rkey, ra = _first(header, profile.keys.ra)
    dkey, dec = _first(header, profile.keys.dec)
    ra_deg = _parse_angle(ra, True, profile.keys.radec_format)
    dec_deg = _parse_angle(dec, False, profile.keys.radec_format)
    if profile.infer and profile.keys.ra:
        if ra_deg is None or dec_deg is None:
            if ra is not None or dec is not None:
                notes.add(rkey or dkey, ra if ra is not None else dec,
                          "unreadable pointing: none assumed")
            else:
                notes.add("/".join(profile.keys.ra[:3]), None,
                          "no pointing: the astrometry starts without one")
            return None, None
        if ra_deg == 0 and dec_deg == 0:
            notes.add(f"{rkey}/{dkey}", f"{ra}/{dec}", "a dummy pointing (0, 0): ignored")
            return None, None
    return ra_deg, dec_deg


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
    file_time: datetime | None = None,
    level_adu: float | None = None,
) -> FrameInfo:
    """Describe a raw frame.

    With an ``infer`` profile (generic) nothing in the header makes a frame
    unusable except an unreadable date: missing or unusable values get an
    assumption, listed in ``FrameInfo.assumptions`` as (keyword, value, assumption);
    a header without a readable date takes ``file_time`` (the file's modification
    time, UTC) when it is given.

    Raises
    ------
    BadInput
        no type keyword, unparsable date, bad section (the frame is quarantined)
    FrameIgnored
        a focus, test or acquisition frame, or an unknown type
    FrameRejected
        a frame that cannot be reduced as it is (no exposure time, a dark of 0 s)
    """
    notes = _Notes()
    ekey, exptime, exptime_s = _exptime(header, profile)
    kind, type_reason = _decide_kind(header, filename, profile, exptime_s, notes, level_adu)
    try:
        obs_time = parse_time(header, profile, notes)
    except BadInput as exc:
        if not (profile.infer and file_time is not None):
            raise
        key, value = _first(header, profile.keys.date_obs)
        notes.add(key or "/".join(profile.keys.date_obs[:2]), value,
                  f"{exc}: the file's modification time assumed")
        obs_time = file_time.astimezone(UTC)
    camera = _camera(header, filename, profile)
    det = profile.detector_for(camera)

    if exptime_s is None:
        if kind != "bias" and profile.infer:
            notes.add(ekey or "/".join(profile.keys.exptime[:3]), exptime,
                      "no valid exposure time: 1 s assumed (rates and zero points per 1 s)")
            exptime_s = 1.0
        elif kind != "bias":
            raise FrameRejected(
                f"no valid exposure time ({', '.join(profile.keys.exptime)}={exptime!r})"
            )
        else:
            exptime_s = 0.0
    if kind == "dark" and exptime_s <= 0:
        raise FrameRejected("dark frame with an exposure time of 0 s")
    if kind in ("object", "flat") and exptime_s <= 0:
        raise FrameRejected(f"{kind} frame with an exposure time of 0 s")

    divisor = _number(header, det.divisor_keyword) or 1.0
    gain, gain_source = _detector_value(header, det, profile, notes, "gain")
    read_noise, rn_source = _detector_value(header, det, profile, notes, "read_noise")
    saturation = _number(header, det.saturation_keyword)
    if saturation is None or saturation <= 0:
        if profile.infer and det.saturation_keyword:
            notes.add(det.saturation_keyword, header.get(det.saturation_keyword),
                      f"no saturation level: {det.saturation:g} ADU assumed")
        saturation = det.saturation / divisor + det.saturation_offset
    binning = _binning(header, profile, notes)
    bx, _ = (int(v) for v in binning.split("x"))
    _, readout = _first(header, profile.keys.readout)

    longitude = longitude_deg
    if longitude is None:
        longitude = profile.site_longitude_deg
    if longitude is None:
        longitude = _number(header, "LONGITUD") or _number(header, "SITELONG") or 0.0

    ra_deg, dec_deg = _pointing(header, profile, notes)
    _, airmass = _first(header, profile.keys.airmass)
    try:
        airmass = float(airmass) if airmass is not None else None
    except (TypeError, ValueError):
        airmass = None

    filt = _filter(header, profile, notes) if kind in ("flat", "object") else None
    target = _target(header, profile) if kind == "object" else None
    if kind == "object" and not target:
        target = "UNKNOWN"

    sections = {what: _section(header, key, fallback, label, profile, binning, notes)
                for what, key, fallback, label in (
                    ("datasec", profile.keys.datasec, det.datasec, "data section"),
                    ("biassec", profile.keys.biassec, det.biassec, "overscan section"),
                    ("trimsec", profile.keys.trimsec, det.trimsec, "trim section"))}
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
        ra_deg=ra_deg,
        dec_deg=dec_deg,
        airmass=airmass,
        gain=gain,
        read_noise_e=read_noise,
        saturation_adu=saturation,
        pixel_scale_arcsec=_pixel_scale(header, profile, det, bx, notes),
        datasec=sections["datasec"],
        biassec=sections["biassec"],
        trimsec=sections["trimsec"],
        raw_name=Path(filename).name,
        std_name=_existing_standard_name(filename, profile) or standard_name(obs_time, camera,
                                                                             kind),
        assumptions=tuple(notes.items),
        type_reason=type_reason,
        gain_source=gain_source,
        read_noise_source=rn_source,
    )



def _existing_standard_name(filename: str, profile: Profile) -> str | None:
    """A raw file already named the PhotoPipe way (RATIR) keeps its name."""
    if not (profile.types.from_filename or profile.keys.camera_from_filename):
        return None
    m = STD_NAME_RE.search(Path(filename).name)
    return f"{m.group(1)}C{m.group(2)}{m.group(3)}.fits" if m else None
