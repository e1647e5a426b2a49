"""The science chain of one object frame, declared as data, and the one runner that executes it.

:data:`SCIENCE_CHAIN` is the list of steps every object frame goes through, in
order; ``reduce``, ``watch`` and ``finalize`` all run it through :func:`run_chain`,
so a product never depends on how it was started::

    raw ─prepare─► p ─flatten─► f ─mastersky─► pattern, sky ─skysub─► s ─cosmics─► z
        ─sources─► src ─astrometry─► frame, cat, wcs ─zeropoint─► calibrated ─quality─► verdict

Each :class:`Stage` says what it needs (from the :class:`NightContext` or from an
earlier stage), what it gives, its version and which settings it depends on.
The runner times each stage, lets a stage's inputs go once no later stage needs
them (memory at 4k), and returns one provenance card per step (``PWSTEP01`` =
``'prepare 0.1.0 3f9a1c2e'``: name, version, digest of its settings) in the manner
of ccdproc's ``log_to_metadata`` and mirar's ``PROC_HISTORY``.

Nothing here touches files, the store or the clock: the night's state (masters,
the master-sky view, field references, earlier solutions, the catalogue, the
night's quality peers) comes in as the immutable :class:`NightContext`, and what
a frame changes in the night (a sky contribution, a new field reference, a new
solution, stale marks, the zero-point reference) is *returned* as updates
(:class:`Update`) for the engine to apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from photowatch import __version__
from photowatch.core.classify import FrameInfo
from photowatch.core.config import Settings
from photowatch.core.frame import Frame, MasterImage
from photowatch.core.instruments import Profile
from photowatch.core.schema import STEP_CARDS
from photowatch.stages.context import NightContext, Update
from photowatch.stages.cosmics import CosmicsResult, flag_cosmics
from photowatch.stages.flatten import flatten
from photowatch.stages.mastersky import SkyPattern, apply_master_sky, sky_pattern
from photowatch.stages.prepare import prepare
from photowatch.stages.quality import apcor_peers, assess, night_context
from photowatch.stages.skysub import SkyResult, subtract_sky
from photowatch.stages.solve import astrometry, photometry
from photowatch.stages.sources import extract_sources, pool_aperture_correction

__all__ = ["NightContext", "SCIENCE_CHAIN", "Stage", "Update", "check_chain", "run_chain"]

#: provenance card family: PWSTEP01, PWSTEP02, ... (core/schema.py registers them)
STEP_KEY = "PWSTEP{:02d}"
MAX_STEPS = STEP_CARDS


# ---------------------------------------------------------------------------- declaration

@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[dict, NightContext], dict]
    needs: tuple[str, ...]  #: names from the context or given by an earlier stage
    gives: tuple[str, ...]
    settings: Callable[[Settings], object]  #: the settings it depends on (digested)
    timer: str = ""  #: the ScienceResult.timings key (default: the name)
    version: str = __version__  #: the code that ran (the package's version)

    def digest(self, settings: Settings) -> str:
        return settings_digest(self.settings(settings))

    def card(self, settings: Settings) -> str:
        """The provenance card's value: ``'prepare 0.1.0 7067ef7e'``."""
        return f"{self.name} {self.version} {self.digest(settings)}"


def settings_digest(section) -> str:
    """A short digest of a settings section (dataclasses, dicts, tuples of them)."""
    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v if isinstance(v, str | int | float | bool | type(None)) else repr(v)

    text = json.dumps(plain(section), sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


CONTEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(NightContext))


def check_chain(chain, inputs=("raw", "header")) -> list[str]:
    """Problems of a declared chain: a need met by neither the context, the inputs nor an
    earlier stage; a name given twice. Empty when the chain is sound."""
    known = set(CONTEXT_FIELDS) | set(inputs)
    problems = []
    for st in chain:
        for need in st.needs:
            if need not in known:
                problems.append(f"{st.name} needs {need!r}, which nothing before it gives")
        for give in st.gives:
            if give in known and give not in CONTEXT_FIELDS:
                problems.append(f"{st.name} gives {give!r} again")
        known |= set(st.gives)
    if len(chain) > MAX_STEPS:
        problems.append(f"{len(chain)} stages: the PWSTEPnn family holds {MAX_STEPS}")
    return problems


# ---------------------------------------------------------------------------- runner

@dataclass
class ChainRun:
    state: dict  #: every value given and still held (all of them when intermediates are kept)
    updates: list  #: the :class:`Update` s, in order (only when no applier was given)
    timings: dict  #: seconds per timer key
    provenance: list  #: (keyword, card value) per step


def run_chain(chain, ctx: NightContext, inputs: dict, *, keep: bool = False,
              timings: dict | None = None, apply: Callable[[Update], bool] | None = None,
              ) -> ChainRun:
    """Execute ``chain`` on ``inputs`` with ``ctx``: the one runner of every executor.

    ``keep``: hold every stage's output to the end (intermediates written);
    otherwise a value is let go once no later stage needs it.
    ``inputs`` is emptied (its planes are then held only by the run).

    ``apply``: the caller's applier of updates (the engine's), called as each stage
    returns them, so a 4k sky pattern is not held to the end of the chain; it returns
    False for a claim another frame won meanwhile, and the stage then runs again (its
    context reads now see the winner). Without it the updates are only collected
    (and every claim counts as won)."""
    state = dict(inputs)
    inputs.clear()
    updates: list[Update] = []
    timings = {} if timings is None else timings
    last_use = {}
    for i, st in enumerate(chain):
        for need in st.needs:
            last_use[need] = i
    for i, st in enumerate(chain):
        t0 = time.perf_counter()
        for _attempt in range(_CLAIM_TRIES):
            out = st.run(state, ctx)
            made = list(out.pop("updates", ()))
            if apply is None or all(apply(u) for u in made):  # stops at a lost claim
                break
        else:
            raise RuntimeError(f"{st.name}: a claim lost {_CLAIM_TRIES} times in a row")
        key = st.timer or st.name
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        if apply is None:  # applied ones are not held (a 4k sky pattern)
            updates.extend(made)
        del made
        state.update(out)
        if not keep:
            for name in [n for n in state if last_use.get(n, -1) <= i
                         and n not in _RESULT_KEYS]:
                del state[name]
    provenance = [(STEP_KEY.format(i + 1), st.card(ctx.settings)) for i, st in enumerate(chain)]
    return ChainRun(state=state, updates=updates, timings=timings, provenance=provenance)


#: what the runner's caller reads after the chain (never let go)
_RESULT_KEYS = frozenset({"frame", "cat", "wcs", "qc", "verdict", "src", "sky_used"})
_CLAIM_TRIES = 4


# ---------------------------------------------------------------------------- the stages

def _prepare(st: dict, ctx: NightContext) -> dict:
    s = ctx.settings
    return {"p": prepare(st["raw"], st["header"], ctx.info, bias=ctx.masters.get("bias"),
                         dark=ctx.masters.get("dark"), bpm=ctx.bpm,
                         settings=s.stages.prepare, calibration=s.calibration)}


def _flatten(st: dict, ctx: NightContext) -> dict:
    p = st["p"]
    flat = ctx.masters.get("flat")
    return {"f": flatten(p, flat=flat, settings=ctx.settings.stages.flatten)
            if flat is not None else p}


def pattern_for_sky(frame: Frame, settings: Settings) -> SkyPattern:
    """The frame's contribution to its master sky (sources masked, normalised)."""
    return sky_pattern(frame, settings=settings.stages.mastersky,
                       mesh_px=min(64, settings.stages.skysub.mesh_px))


def _mastersky(st: dict, ctx: NightContext) -> dict:
    """The frame's sky pattern, and the master sky of the night without it (if usable).

    Updates: the pattern goes into the night's accumulator; the sky used is kept
    (finalize's drift check) and frames reduced with an older sky are marked stale."""
    s, info = ctx.settings, ctx.info
    out = {"pattern": None, "sky": None, "sky_used": None, "sky_pre_e": None, "updates": []}
    if not s.stages.mastersky.enabled:
        return out
    pattern = pattern_for_sky(st["f"], s)
    sky = ctx.sky_view(ctx.member, info, pattern) if ctx.sky_view is not None else None
    pointing = (info.ra_deg or math.nan, info.dec_deg or math.nan)
    out["updates"].append(Update("sky", dict(member=ctx.member, info=info, pattern=pattern,
                                             pointing=pointing)))
    if sky is not None:
        out["updates"].append(Update("sky_used", dict(member=ctx.member, info=info, sky=sky)))
        out["sky_used"] = (sky.label, sky.version)
        out["sky_pre_e"] = pattern.level if pattern is not None else None
    if not s.stages.write_intermediates:  # sky subtraction needs only its level and mask
        pattern = dataclasses.replace(pattern, data=None, var=None, valid=None)
    out.update(pattern=pattern, sky=sky)
    return out


def _skysub(st: dict, ctx: NightContext) -> dict:
    """The master sky (if usable) divided out, then the sky level subtracted."""
    s = ctx.settings
    # unless intermediates are written, no reference to the flattened frame stays behind
    # this step (memory at 4k: it is let go before cosmic rays are found)
    frame = st["f"] if s.stages.write_intermediates else st.pop("f")
    sky, pattern = st.get("sky"), st.get("pattern")
    if sky is not None and pattern is not None and np.isfinite(pattern.level):
        frame = apply_master_sky(frame, sky=sky, level=pattern.level)
    sub, skyres = subtract_sky(frame, settings=s.stages.skysub,
                               sources=pattern.sources if pattern is not None else None)
    return {"s": sub, "sky_result": skyres}


def _cosmics(st: dict, ctx: NightContext) -> dict:
    z, crres = flag_cosmics(st["s"], settings=ctx.settings.stages.cosmics)
    return {"z": z, "cosmics": crres}


def _sources(st: dict, ctx: NightContext) -> dict:
    """Sources and the frame's PSF; a frame whose own aperture correction is not settled
    (a precise growth curve, or a Moffat model its own stars pin down) borrows from the
    night's other frames at similar seeing."""

    info = ctx.info
    src = extract_sources(st["z"], settings=ctx.settings.stages.sources,
                          pixel_scale_arcsec=info.pixel_scale_arcsec)
    own = (src.aperture_correction, src.aperture_correction_err, src.n_apcor)
    if not src.aperture_correction_settled and np.isfinite(src.fwhm_arcsec):
        pooled = pool_aperture_correction(
            (src.aperture_correction, src.aperture_correction_err, src.fwhm_arcsec),
            apcor_peers(ctx.peers, frame_id=ctx.frame_id, filt=info.filter,
                        camera=info.camera))
        if pooled is not None:
            apcor, err, nframes = pooled
            src = src.with_aperture_correction(apcor, err, src.n_apcor, f"night:{nframes}")
    return {"src": src, "own_apcor": own}


def _astrometry(st: dict, ctx: NightContext) -> dict:

    frame, cat, wcs, qc, reference, wcs0, updates = astrometry(ctx, st["z"], st["header"],
                                                               st["src"])
    return {"solved": frame, "cat0": cat, "wcs": wcs, "ast_qc": qc, "reference": reference,
            "wcs0": wcs0, "updates": updates}


def _zeropoint(st: dict, ctx: NightContext) -> dict:

    frame, cat, qc, updates = photometry(ctx, st["solved"], st["cat0"], st["ast_qc"],
                                         st["reference"], st["wcs"], st["wcs0"])
    return {"frame": frame, "cat": cat, "phot_qc": qc, "updates": updates}


def _finite(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _quality(st: dict, ctx: NightContext) -> dict:
    """The frame's quality numbers, judged against the night's (the one night-quality
    context, :func:`photowatch.stages.quality.night_context`)."""

    info, src, cat = ctx.info, st["src"], st["cat"]
    own, sky, cr = st["own_apcor"], st["sky_result"], st["cosmics"]
    sky_e, sky_pre_e = sky.level_e, st.get("sky_pre_e")
    qc = {
        "time": info.obs_time.isoformat(),
        "filter": info.filter,
        "target": info.target,
        "exptime": info.exptime_s,
        "fwhm_arcsec": _finite(src.fwhm_arcsec),
        "apcor_own": _finite(own[0]), "apcor_own_err": _finite(own[1]),
        "apcor_own_n": own[2], "apcor": _finite(src.aperture_correction),
        "apcor_err": _finite(src.aperture_correction_err), "apcor_n": src.n_apcor,
        "apcor_src": src.meta.get("APCORSRC"),
        "ellipticity": _finite(src.ellipticity),
        "nsources": len(cat),
        "sky_e": _finite(sky_e),
        "sky_e_per_s": _finite(sky_e / info.exptime_s) if info.exptime_s else None,
        "skynoise_e": _finite(sky.noise_e),
        "sky_pre_e": _finite(sky_pre_e) if sky_pre_e is not None else None,
        "ncr": cr.npix,
        "airmass": info.airmass,
        **st["ast_qc"],
        **st["phot_qc"],
    }
    night = night_context(ctx.peers, frame_id=ctx.frame_id, filt=info.filter,
                          target=info.target, qc=qc, own_in_peers=False)
    verdict = assess(qc, best_transparency_mag=night.best_transparency, settings=ctx.settings.quality,
                     night_fwhm_arcsec=night.fwhm)
    qc["accepted"] = verdict.accepted
    qc["checks"] = [list(c) for c in verdict.checks]
    return {"qc": qc, "verdict": verdict}


def _sections(*names):
    def pick(settings: Settings):
        out = []
        for name in names:
            obj = settings
            for part in name.split("."):
                obj = getattr(obj, part)
            out.append(obj)
        return out
    return pick


#: the science chain of every object frame, in order (see the module docstring)
SCIENCE_CHAIN: tuple[Stage, ...] = (
    Stage("prepare", _prepare, needs=("raw", "header", "info", "masters", "bpm"), gives=("p",),
          settings=_sections("stages.prepare", "calibration"), timer="prepare+flatten"),
    Stage("flatten", _flatten, needs=("p", "masters"), gives=("f",),
          settings=_sections("stages.flatten"), timer="prepare+flatten"),
    Stage("mastersky", _mastersky, needs=("f", "info", "member", "sky_view"),
          gives=("pattern", "sky", "sky_used", "sky_pre_e"),
          settings=_sections("stages.mastersky", "stages.skysub.mesh_px")),
    Stage("skysub", _skysub, needs=("f", "pattern", "sky"), gives=("s", "sky_result"),
          settings=_sections("stages.skysub")),
    Stage("cosmics", _cosmics, needs=("s",), gives=("z", "cosmics"),
          settings=_sections("stages.cosmics")),
    Stage("sources", _sources, needs=("z", "info", "peers"), gives=("src", "own_apcor"),
          settings=_sections("stages.sources")),
    Stage("astrometry", _astrometry,
          needs=("z", "header", "src", "info", "profile", "reference_stars", "refs",
                 "solutions", "quicklook"),
          gives=("solved", "cat0", "wcs", "ast_qc", "reference", "wcs0"),
          settings=_sections("stages.astrometry", "catalog")),
    Stage("zeropoint", _zeropoint,
          needs=("solved", "cat0", "ast_qc", "reference", "wcs", "wcs0", "refs", "profile"),
          gives=("frame", "cat", "phot_qc"), settings=_sections("stages.zeropoint")),
    Stage("quality", _quality,
          needs=("src", "own_apcor", "cat", "sky_result", "sky_pre_e", "cosmics", "ast_qc",
                 "phot_qc", "peers"),
          gives=("qc", "verdict"), settings=_sections("quality")),
)

# ---------------------------------------------------------------------------- parts of it

def front(raw: np.ndarray, header, info: FrameInfo, *, masters: dict[str, MasterImage],
          bpm: np.ndarray | None, settings: Settings) -> dict[str, Frame]:
    """prepare → flatten (the chain's first two stages). Returns {"p": ..., "f": ...}."""
    ctx = NightContext(settings=settings, info=info, profile=None, frame_id=0, member="",
                       masters=masters, bpm=bpm)
    run = run_chain(SCIENCE_CHAIN[:2], ctx, {"raw": raw, "header": header}, keep=True)
    return {"p": run.state["p"], "f": run.state["f"]}


@dataclass
class BackResult:
    frames: dict[str, Frame]  #: after each step: "s" (sky), "z" (cosmics)
    sky: SkyResult
    cosmics: CosmicsResult
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)  #: wall time of each step (for benchmarks)


def back(frame: Frame | list[Frame], *, settings: Settings, sky: MasterImage | None,
         pattern: SkyPattern | None) -> BackResult:
    """master sky (if usable) → sky subtraction → cosmic rays (the chain's skysub and
    cosmics stages, with the master sky given). ``frame`` may be handed over in a
    one-element list, which is emptied."""
    if isinstance(frame, list):
        frame = frame.pop()
    notes = []
    if not (sky is not None and pattern is not None and np.isfinite(pattern.level)) \
            and settings.stages.mastersky.enabled:
        notes.append("no usable master sky yet")
    ctx = NightContext(settings=settings, info=getattr(frame, "info", None), profile=None,
                       frame_id=0, member="")
    seconds: dict = {}
    run = run_chain(SCIENCE_CHAIN[3:5], ctx, {"f": frame, "sky": sky, "pattern": pattern},
                    keep=True, timings=seconds)
    return BackResult(frames={"s": run.state["s"], "z": run.state["z"]},
                      sky=run.state["sky_result"], cosmics=run.state["cosmics"], notes=notes,
                      seconds=seconds)


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
