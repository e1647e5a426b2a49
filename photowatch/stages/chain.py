"""The science chain of one object frame, as pure functions of (frame, masters, config, catalogue).

The engine calls these in order; the daemon, ``reduce`` and ``finalize`` run
exactly this code, so a product never depends on how it was started::

    raw ──front()──► flattened frame ──(engine: master-sky accumulator)──►
        back() ──► sky-subtracted, cleaned, astrometrically and photometrically
                   calibrated frame + source catalogue + results

Nothing here touches files, the store or the clock; all state (master sky,
field references, previous solutions, the night's zero points) comes in as
arguments. That is also what lets the chain be sent to a distributed executor
later without touching the stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from photowatch.core.classify import FrameInfo
from photowatch.core.config import Settings
from photowatch.core.frame import Frame, MasterImage
from photowatch.core.instruments import Profile
from photowatch.stages.cosmics import CosmicsResult, flag_cosmics
from photowatch.stages.flatten import flatten
from photowatch.stages.mastersky import SkyPattern, apply_master_sky, sky_pattern
from photowatch.stages.prepare import prepare
from photowatch.stages.skysub import SkyResult, subtract_sky


def front(raw: np.ndarray, header, info: FrameInfo, *, masters: dict[str, MasterImage],
          bpm: np.ndarray | None, settings: Settings) -> dict[str, Frame]:
    """prepare → flatten. Returns the frames after each step ({"p": ..., "f": ...})."""
    p = prepare(raw, header, info, bias=masters.get("bias"), dark=masters.get("dark"), bpm=bpm,
                settings=settings.stages.prepare, calibration=settings.calibration)
    f = flatten(p, flat=masters["flat"], settings=settings.stages.flatten) \
        if "flat" in masters else p
    return {"p": p, "f": f}


def pattern_for_sky(frame: Frame, settings: Settings) -> SkyPattern:
    """The frame's contribution to its master sky (sources masked, normalised)."""
    return sky_pattern(frame, settings=settings.stages.mastersky,
                       mesh_px=min(64, settings.stages.skysub.mesh_px))


@dataclass
class BackResult:
    frames: dict[str, Frame]  #: after each step: "s" (sky), "z" (cosmics)
    sky: SkyResult
    cosmics: CosmicsResult
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)  #: wall time of each step (for benchmarks)


def back(frame: Frame | list[Frame], *, settings: Settings, sky: MasterImage | None,
         pattern: SkyPattern | None) -> BackResult:
    """master sky (if usable) → sky subtraction → cosmic rays.

    ``frame`` may be handed over in a one-element list, which is emptied: then no
    earlier step's planes stay alive while cosmic rays are found (memory at 4k)."""
    if isinstance(frame, list):
        frame = frame.pop()
    notes = []
    t0 = time.perf_counter()
    if sky is not None and pattern is not None and np.isfinite(pattern.level):
        frame = apply_master_sky(frame, sky=sky, level=pattern.level)
    elif settings.stages.mastersky.enabled:
        notes.append("no usable master sky yet")
    s, skyres = subtract_sky(frame, settings=settings.stages.skysub,
                             sources=pattern.sources if pattern is not None else None)
    del frame
    t1 = time.perf_counter()
    z, crres = flag_cosmics(s, settings=settings.stages.cosmics)
    t2 = time.perf_counter()
    return BackResult(frames={"s": s, "z": z}, sky=skyres, cosmics=crres, notes=notes,
                      seconds={"skysub": t1 - t0, "cosmics": t2 - t1})


def profile_header_items(info: FrameInfo, profile: Profile) -> dict:
    """Keywords every product carries about the frame's description."""
    return {
        "ORIGFILE": (info.raw_name, "raw file name"),
        "PWNAME": (info.std_name, "standardised name"),
        "CAMERA": (info.camera, "camera"),
        "FILTNAME": (info.filter or "", "filter"),
        "TARGET": (info.target or "", "target"),
        "NIGHT": (info.night, "night label (local date at start of night)"),
        "PIXSCALE": (info.pixel_scale_arcsec, "[arcsec/px] nominal pixel scale"),
        "INSTPROF": (profile.name, "photowatch instrument profile"),
    }
