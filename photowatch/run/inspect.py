"""``photowatch inspect RAWDIR``: how each frame would be classified, and a profile to keep.

Every header is read once (FITS, .fz, MEF, or ``.hdr`` header text with one card a
line). For each frame: type (and why), camera, filter, exposure, binning, night,
target, and each assumption the profile made. ``--write-profile FILE.toml`` writes a
profile that states those choices (the type of untyped frames, a missing filter,
measured gain, sections to ignore or convert), so that with it in ``profile_dir`` the
same frames classify without warnings. Edit it: the assumptions are its comments.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from photowatch.core.classify import _first, classify, safe_name
from photowatch.core.errors import BadInput, ConfigError, FrameIgnored, FrameRejected
from photowatch.core.instruments import Profile, load_profile, load_profile_file
from photowatch.io.fits import read_header
from photowatch.run.ingest import choose_profile

HEADER_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fit.fz", ".fz", ".fits.gz",
                   ".fit.gz", ".hdr")


@dataclass
class Row:
    file: str
    profile: str = ""
    state: str = "ok"  #: ok | ignored | rejected | quarantined
    reason: str = ""
    info: dict = field(default_factory=dict)
    assumptions: list = field(default_factory=list)
    type_keyword: str | None = None
    type_value: str | None = None
    instrument: str | None = None


def header_files(rawdir: Path) -> list[Path]:
    return [p for p in sorted(Path(rawdir).rglob("*")) if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(rawdir).parts)
            and p.name.lower().endswith(HEADER_SUFFIXES)]


def read_any_header(path: Path):
    from astropy.io import fits

    if path.name.lower().endswith(".hdr"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fits.Header.fromtextfile(str(path))
    return read_header(path)


def inspect_dir(rawdir: str | Path, settings, instrument: str | None = None,
                profile: Profile | None = None) -> list[Row]:
    """Classify every header of ``rawdir`` (nothing is written, no pixels read)."""
    rows = []
    for path in header_files(Path(rawdir)):
        row = Row(file=str(path.relative_to(rawdir)))
        try:
            header = read_any_header(path)
            prof = profile or choose_profile(header, settings, instrument)
            row.profile = prof.name
            row.instrument = str(header.get("INSTRUME", "")).strip() or None
            row.type_keyword, value = _first(header, prof.types.keywords)
            row.type_value = None if value is None else str(value).strip()
            info = classify(header, path.name, prof, settings.site.longitude_deg,
                            settings.site.night_start_hour,
                            file_time=datetime.fromtimestamp(path.stat().st_mtime, UTC))
            row.info = info.summary()
            row.assumptions = [list(a) for a in info.assumptions]
        except FrameIgnored as exc:
            row.state, row.reason = "ignored", str(exc)
        except FrameRejected as exc:
            row.state, row.reason = "rejected", str(exc)
        except (BadInput, ConfigError) as exc:
            row.state, row.reason = "quarantined", str(exc)
        rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'file':36} {'type':6} {'cam':4} {'filter':12} {'exp s':>8} {'bin':4} "
             f"{'night':10} target / why"]
    for r in rows:
        if r.state != "ok":
            lines.append(f"{r.file[:36]:36} {r.state}: {r.reason}")
            continue
        i = r.info
        lines.append(f"{r.file[:36]:36} {i['kind']:6} {i['camera']:4} {str(i['filter'])[:12]:12} "
                     f"{i['exptime_s']:8g} {i['binning']:4} {i['night']:10} "
                     f"{i.get('target') or ''}  [{i.get('type_reason')}]")
        for keyword, value, assumption in r.assumptions:
            lines.append(f"{'':38}assumed: {keyword}={value!r}: {assumption}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ profile TOML
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def to_toml(data: dict, comments: list[str] | None = None) -> str:
    out = [f"# {c}" for c in comments or []]
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items() if v is not None]

    def emit(prefix: str, table: dict):
        flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        out.append("")
        out.append(f"[{prefix}]")
        out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in flat.items() if v is not None)
        for k, v in nested.items():
            emit(f"{prefix}.{_toml_key(k)}", v)

    for k, v in tables.items():
        emit(_toml_key(k), v)
    return "\n".join(out) + "\n"


def profile_from(rows: list[Row], base: Profile, name: str | None = None
                 ) -> tuple[dict, list[str]]:
    """A profile (as a dict) stating what ``base`` assumed for these frames, and comments."""
    data = base.model_dump()
    instruments = sorted({r.instrument for r in rows if r.instrument})
    data["name"] = name or (safe_name(instruments[0]).lower() if instruments else "mycamera")
    data["description"] = f"written by photowatch inspect from {len(rows)} frames"
    data["detect_values"] = instruments
    data["infer"] = True
    comments = [f"photowatch profile for {', '.join(instruments) or 'an imager'}: written by "
                "`photowatch inspect --write-profile`.",
                "Each choice below replaces an assumption the generic profile made:"]
    types, keys, det = data["types"], data["keys"], data["detector"]
    seen_type_keys = []
    for r in rows:
        if r.type_keyword and r.type_keyword not in seen_type_keys:
            seen_type_keys.append(r.type_keyword)
    if seen_type_keys:
        types["keywords"] = seen_type_keys + [k for k in types["keywords"]
                                              if k not in seen_type_keys]
    for r in rows:
        for keyword, value, assumption in r.assumptions:
            comments.append(f"  {r.file}: {keyword}={value!r}: {assumption}")
            if "frame type" in assumption:
                kind = r.info.get("kind", "object")
                if r.type_value is not None:
                    norm = re.sub(r"\s+", " ", r.type_value.lower())
                    target = kind if kind != "bias" or r.info.get("exptime_s") else "object"
                    if norm not in types[target]:
                        types[target] = [*types[target], norm]
                else:
                    types["default"] = "object"
            elif "no filter" in assumption:
                keys["filter_default"] = "unknown"
            elif keyword.split("/")[0] in det["gain_keywords"] and "gain" in assumption:
                det["measure_gain"] = True
            elif "read noise" in assumption:
                det["measure_read_noise"] = True
            elif "saturation" in assumption:
                det["saturation_keyword"] = ""
            elif "binning" in assumption:
                keys["binning"] = []
            elif "pointing" in assumption:
                keys["ra"], keys["dec"] = [], []
            elif "pixel scale" in assumption:
                keys["pixel_scale"] = []
            elif "section" in assumption:
                if "converted" in assumption:
                    keys["sections_unbinned"] = True
                else:
                    for what in ("datasec", "biassec", "trimsec"):
                        if keys[what] == keyword:
                            keys[what] = ""
    if det["measure_gain"]:
        det["gain_keywords"] = []
        det["gain_keyword"] = ""
    if det["measure_read_noise"]:
        det["read_noise_keywords"] = []
        det["read_noise_keyword"] = ""
    comments = list(dict.fromkeys(comments))
    return data, comments


def write_profile(rows: list[Row], path: str | Path, base: Profile | None = None,
                  name: str | None = None) -> Path:
    base = base or load_profile("generic")
    data, comments = profile_from(rows, base, name)
    path = Path(path)
    path.write_text(to_toml(data, comments))
    load_profile_file(path)  # it must load
    return path
