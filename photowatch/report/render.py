"""The report page: the facts (:mod:`photowatch.report.facts`) and images
(:mod:`photowatch.report.plots`) through Jinja2 templates (``report/templates``).

The templates escape every value (autoescape on); what is markup on purpose
(a folded traceback, a link) is built here with :class:`markupsafe.Markup`.
This module decides what is shown (cards, sorted problems, the table rows'
contents); the templates decide how it looks. ``report.html.j2`` has empty
blocks on the first screen (``latest_frame``, ``light_curves``, ``candidates``)
for the panels of issue 21.
"""

from __future__ import annotations

import functools
import json
import math
import os
from datetime import UTC
from pathlib import Path
from urllib.parse import quote

import jinja2
import numpy as np
from markupsafe import Markup, escape

import photowatch.report.plots as plots
from photowatch.report.facts import arrived_as_a_batch, parse_time
from photowatch.report.plots import filter_colours

#: order of states in tables (the flow of a frame)
STATE_ORDER = ("received", "processing", "waiting", "held", "used", "reduced", "rejected",
               "quarantined", "ignored")
KIND_ORDER = ("bias", "dark", "flat", "object")
#: states listed under "Problems"
PROBLEM_STATES = ("rejected", "quarantined", "held", "ignored", "waiting")
#: the page's sections in order: (anchor, title in the navigation bar)
SECTIONS = (("latest", "Latest"), ("candidates", "Candidates"), ("problems", "Problems"), ("conditions", "Conditions"), ("coadds", "Coadds"),
            ("frames", "Frames"), ("masters", "Masters"), ("latency", "Latency"),
            ("config", "Configuration"))


# ---------------------------------------------------------------------------- filters

def fmt(value, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else ""


def hms(iso: str | None) -> str:
    t = parse_time(iso)
    return t.astimezone(UTC).strftime("%H:%M:%S") if t else ""


def duration(seconds) -> str:
    if seconds is None:
        return "–"
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def message(text: str | None, limit: int = 240) -> Markup:
    """One readable line of a message; a traceback or a long text is folded below it."""
    if not text:
        return Markup("")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    head = lines[-1] if text.lstrip().startswith("Traceback") else lines[0]
    short = head if len(head) <= limit else head[: limit - 1] + "…"
    if short == text.strip():
        return escape(short)
    return Markup("{}<details><summary class='muted' style='font-weight:400'>full text"
                  "</summary><pre>{}</pre></details>").format(short, text.strip())


def dot(colour: str | None) -> Markup:
    return Markup(f"<span style='color:{escape(colour)}'>●</span> ") if colour else Markup("")


def _median(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.median(v)) if v else None


class Links:
    """Relative links from the report folder, only to files that exist."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()

    def href(self, path) -> str | None:
        if not path:
            return None
        p = Path(path)
        if not p.is_absolute():
            p = self.folder / p
        if not p.is_file():
            return None
        return quote(os.path.relpath(p.resolve(), self.folder).replace(os.sep, "/"))

    def a(self, path, text: str, title: str | None = None) -> Markup:
        href = self.href(path)
        if href is None:
            return (Markup(f'<span class="muted" title="file not found">{escape(text)}</span>')
                    if path else Markup(""))
        t = f' title="{escape(title)}"' if title else ""
        return Markup(f'<a href="{escape(href)}"{t}>{escape(text)}</a>')


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The templates of ``photowatch/report/templates`` (autoescape on, strict names)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("photowatch.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True, keep_trailing_newline=True,
        # compiled templates kept in the user's temporary folder (checked against the
        # sources' checksums): compiling them costs a short run such as a finalize with
        # nothing to do ~0.3 s
        bytecode_cache=jinja2.FileSystemBytecodeCache(),
        finalize=lambda value: "" if value is None else value)  # None shows as nothing
    env.filters.update(fmt=fmt, hms=hms, duration=duration, message=message, dot=dot,
                       median=_median, basename=lambda p: Path(p).name if p else None)
    env.globals.update(STATE_ORDER=STATE_ORDER, THUMB_PX=plots.THUMB_PX,
                       **{k: getattr(plots, k) for k in ("BG", "PANEL", "BORDER", "TEXT",
                                                          "MUTED", "GOOD", "WARN", "BAD",
                                                          "LINK")})
    return env


# ---------------------------------------------------------------------------- what is shown

def other_events(facts: dict) -> list[dict]:
    """Warning/error events that are not a frame's state change (those are listed by frame)."""
    return [e for e in facts["errors"] if e["level"] == "error" or not e["state_to"]]


def _cards(facts: dict) -> list[dict]:
    """The summary cards of the first screen: k (title), v (value), s (below), cls."""
    frames, counts = facts["frames"], facts["counts"]
    sci = [f for f in frames if f["type"] == "object"]
    reduced = [f for f in sci if f["state"] == "reduced"]
    not_stacked = [f for f in sci if f["state"] == "rejected"]
    quarantined = [f for f in frames if f["state"] in ("quarantined", "held")]
    incomplete = [c for c in facts["coadds"] if c.get("finalstat") == "INCOMPLETE"]
    cal_used = sum(1 for f in frames if f["type"] in ("bias", "dark", "flat") and
                   f["state"] == "used")
    cal_rej = sum(1 for f in frames if f["type"] in ("bias", "dark", "flat") and
                  f["state"] == "rejected")
    cards = []

    def card(k, v, s="", cls="", **more):
        cards.append({"k": k, "v": v, "s": s, "cls": cls, "unit": None, "href": None, **more})

    card("Science frames", str(len(reduced)),
         f"{len(not_stacked)} not stacked · {len(sci)} taken",
         "warn" if not_stacked else ("good" if reduced else ""), unit="stacked")
    fwhm = [f.get("fwhm_arcsec") for f in reduced]
    med = _median(fwhm)
    last = next((f.get("fwhm_arcsec") for f in reversed(sci) if f.get("fwhm_arcsec")), None)
    card("Seeing (FWHM)", f"{med:.2f}″" if med else "–",
         f"last {last:.2f}″ · best {min(x for x in fwhm if x):.2f}″" if med and last else
         "median of stacked frames")
    by_filter = sorted({f["filter"] for f in sci if f.get("zp") is not None})
    if by_filter:
        zps = " · ".join(f"{b} {_median(f.get('zp') for f in sci if f['filter'] == b):.2f}"
                         for b in by_filter)
        card("Zero point (median)", zps.split(" · ")[0].split(" ", 1)[1],
             zps if len(by_filter) > 1 else by_filter[0] + " MAGZP")
    else:
        card("Zero point", "–", "no absolute calibration" if sci else "no science frames")
    lat = facts["latency_s"]["all"]
    card("Arrival → product", duration(lat["median"]),
         f"median · p95 {duration(lat['p95'])} · max {duration(lat['max'])}")
    pend = counts["pending"] + counts["waiting"]
    card("Queue", str(pend),
         f"{counts['pending']} to do · {counts['waiting']} waiting for masters"
         + (f" · {counts['stale']} stale" if counts["stale"] else ""),
         "warn" if pend else "good")
    card("Calibrations", str(cal_used), f"used in masters · {cal_rej} rejected",
         "warn" if cal_rej else "")
    card("Coadds", str(len(facts["coadds"])),
         f"{sum(c['ncombine'] or 0 for c in facts['coadds'])} frames, "
         f"{sum(c['exptime'] or 0 for c in facts['coadds']) / 60:.0f} min total")
    nerr = sum(1 for e in facts["errors"] if e["level"] == "error")
    nwarn = sum(1 for e in other_events(facts) if e["level"] == "warning")
    nbad = len(quarantined) + nerr + len(incomplete)
    card("Needs attention", str(nbad),
         f"{len(quarantined)} quarantined or held · {nerr} errors · {nwarn} other warnings"
         + (f" · {len(incomplete)} incomplete final coadd(s)" if incomplete else ""),
         "bad" if nbad else ("warn" if nwarn else "good"), href="#problems" if nbad else None)
    return cards


def _problems(facts: dict) -> dict:
    """The lists of the Problems section (empty lists: nothing to show)."""
    order = {s: i for i, s in enumerate(("quarantined", "held", "waiting", "rejected",
                                         "ignored"))}
    bad = [f for f in facts["frames"] if f["state"] in PROBLEM_STATES]
    return {
        "bad": sorted(bad, key=lambda f: (order.get(f["state"], 9), f["obs_time"] or "")),
        "suspect": [f for f in facts["frames"] if f["state"] == "reduced"
                    and f.get("astsuspect")],
        "incomplete": [c for c in facts["coadds"] if c.get("finalstat") == "INCOMPLETE"],
        "worse": (facts.get("finalize") or {}).get("worse_why") or {},
        "any_worse": bool((facts.get("finalize") or {}).get("worse")),
        "duplicates": facts["duplicates"][:20],
        "events": other_events(facts)[:15],
        "any_events": bool(other_events(facts)),
    }


def _state_table(facts: dict) -> dict:
    by_type = facts["counts"]["by_type"]
    return {"states": [s for s in STATE_ORDER if facts["counts"]["by_state"].get(s)],
            "kinds": [k for k in KIND_ORDER if k in by_type]
            + sorted(k for k in by_type if k not in KIND_ORDER)}


def _filter_rows(facts: dict) -> list[dict]:
    """One row per filter of the conditions table: medians of the stacked frames."""
    sci = [f for f in facts["frames"] if f["type"] == "object"]
    colours = filter_colours(f["filter"] for f in sci)
    rows = []
    for filt, colour in colours.items():
        fs = [f for f in sci if f["filter"] == filt]
        ok = [f for f in fs if f["state"] == "reduced"]
        use = ok or fs
        rows.append({"filter": filt, "colour": colour, "n": len(fs), "ok": len(ok),
                     **{k: _median(f.get(k) for f in use) for k in
                        ("fwhm_arcsec", "zp", "zp_per_s", "sky_e_per_s", "ellipticity")},
                     "minutes": sum(f.get("exptime") or 0 for f in ok) / 60})
    return rows


def settings_toml(data: dict, prefix: str = "") -> str:
    """A settings mapping as TOML (scalars first, then one table per section).

    Values that are not set (None) appear as comments, so the text loads with
    :mod:`tomllib` into the settings minus those keys.
    """
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is None:
            lines.append(f"# {key} = (not set)")
        else:
            lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")
    text = (f"[{prefix}]\n" if prefix and lines else "") + "\n".join(lines)
    for key, value in tables:
        sub = settings_toml(value, f"{prefix}.{key}" if prefix else key)
        text += ("\n\n" if text else "") + sub
    return text


def page_context(facts: dict, images: dict, folder: Path, settings) -> dict:
    """What the templates are given: the facts, the images and what is derived for show."""
    final = facts["final"]
    interval = getattr(getattr(settings, "daemon", None), "report_interval_s", 0) or 0
    frames = facts["frames"]
    stages = sorted(facts["stage_seconds"].items(), key=lambda kv: -(kv[1]["median"] or 0))
    # one image entry per master and coadd ({} when it has none)
    images = {**images, **{k: list(images.get(k) or []) + [{}] * (len(facts[k])
                                                                  - len(images.get(k) or []))
                           for k in ("masters", "coadds")}}
    return dict(
        facts=facts, final=final, counts=facts["counts"], images=images, links=Links(folder),
        title=f"{facts['night']} {facts['instrument'] or ''}".strip(),
        refresh=max(30, int(interval)) if not final and interval else None,
        inst=" ".join(x for x in (facts.get("telescope"), facts["instrument"]) if x),
        generated=facts["generated"].replace("T", " ").replace("+00:00", " UTC"),
        sections=SECTIONS, cards=_cards(facts), problems=_problems(facts),
        state_table=_state_table(facts), filter_rows=_filter_rows(facts),
        frame_colours=filter_colours(f["filter"] for f in frames if f["type"] == "object"),
        batch=arrived_as_a_batch(frames), stages=stages,
        settings_text=settings_toml(facts["settings"]))


def render_html(facts: dict, images: dict, folder: Path, settings,
                template: str = "report.html.j2") -> str:
    """The page, as one string (see :func:`photowatch.report.write_report`).

    ``template`` may name a template that extends ``report.html.j2`` and fills
    its first-screen blocks (``latest_frame``, ``light_curves``, ``candidates``).
    """
    return environment().get_template(template).render(
        **page_context(facts, images, folder, settings))
