"""One object frame through the declared chain, with the night as an explicit context.

:func:`reduce_object` runs :data:`photowatch.stages.chain.SCIENCE_CHAIN` (prepare,
flatten, master sky, sky subtraction, cosmic rays, sources, astrometry, zero point
or flux scale, quality) with :func:`photowatch.stages.chain.run_chain` on a
:class:`~photowatch.stages.context.NightContext` the engine built
(:meth:`photowatch.run.engine.Engine.night_context`), and assembles the product's
header, including one provenance card per step (``PWSTEPnn``). It computes and
writes nothing: what the frame changes in the night comes back as updates, handed
to the engine's applier as each stage returns them. :func:`write_outputs` writes
the product, its quick-look PNG and, if asked, the intermediates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from photowatch import __version__
from photowatch.core.classify import FrameInfo
from photowatch.core.frame import Frame
from photowatch.io.fits import write_hdul
from photowatch.io.previews import save_png
from photowatch.io.products import (
    PHOTOWATCH_KEYS,
    WCS_PREFIXES,
    primary_header,
    sci_header,
    set_key,
    write_product,
    write_regions,
)
from photowatch.run.live import depth_facts
from photowatch.stages.chain import (
    MAX_STEPS,
    SCIENCE_CHAIN,
    STEP_KEY,
    profile_header_items,
    run_chain,
)
from photowatch.stages.context import NightContext


@dataclass
class ScienceResult:
    frame: Frame  #: final frame (WCS and every keyword in its header)
    cat: object  #: astropy Table of sources (CAT)
    wcs: object | None  #: the solution used for stacking (absolute or relative), or None
    qc: dict
    accepted: bool
    reason: str | None
    masters_used: dict
    provisional: bool
    intermediates: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    updates: list = field(default_factory=list)  #: what the frame changed in the night


def _round(v, nd: int) -> float | None:
    return round(float(v), nd) if v is not None and np.isfinite(v) else None


def reduce_object(ctx: NightContext, raw, header, *, apply=None, timings: dict | None = None,
                  chain=SCIENCE_CHAIN) -> ScienceResult:
    """Run the chain on one object frame (see the module docstring); writes nothing.

    ``apply``: the engine's applier of the frame's updates (see
    :func:`photowatch.stages.chain.run_chain`); without it they are only returned."""
    s, info, profile = ctx.settings, ctx.info, ctx.profile
    keep = s.stages.write_intermediates  # else each step's planes are let go once used
    run = run_chain(chain, ctx, {"raw": raw, "header": header}, keep=keep,
                    timings=timings, apply=apply)
    st = run.state
    frame, cat, wcs, qc, verdict, src = (st["frame"], st["cat"], st["wcs"], st["qc"],
                                         st["verdict"], st["src"])
    qc.update(depth_facts(frame, src, qc, s.targets.nsigma))  # issue 21: LIMMAG
    provisional = any(img.provisional for img in ctx.masters.values())
    masters_used = {k: {"master_id": c.master_id, "path": Path(c.path).name, "key": c.key,
                        "night": c.night, "version": c.version, "ninputs": c.ninputs,
                        "final": c.final, "provisional": c.provisional(s.calibration.min_inputs)}
                    for k, c in ctx.master_records.items()}
    if st.get("sky_used") is not None:
        label, version = st["sky_used"]
        key = ctx.sky_key
        masters_used["sky"] = {"path": label, "key": key.text, "night": key.night,
                               "version": version, "ninputs": version, "final": False,
                               "provisional": False, "master_id": None}
    hdr = frame.header.copy()
    for k, v in profile_header_items(info, profile).items():
        set_key(hdr, k, v)
    set_key(hdr, "FWHM", (_round(src.fwhm_arcsec, 4), "[arcsec] median stellar FWHM"))
    set_key(hdr, "ELLIP", (_round(src.ellipticity, 4), "median stellar ellipticity 1-b/a"))
    set_key(hdr, "NSOURCES", (len(cat), "sources in CAT"))
    set_key(hdr, "APCOR", (_round(src.aperture_correction, 5), "aperture correction (flux/aper)"))
    set_key(hdr, "APCORERR", (_round(src.aperture_correction_err, 5),
                              "aperture correction standard error"))
    set_key(hdr, "APCORN", (src.n_apcor, "stars of the aperture correction"))
    set_key(hdr, "LIMMAG", (_round(qc.get("limmag"), 3) if qc.get("limmag") is not None
                            else None, "[mag] 5-sigma point-source limit (CAT aperture)"))
    set_key(hdr, "LIMFLUX", (_round(qc.get("limflux_e"), 2),
                             "[electron] 5-sigma point-source flux (CAT aperture)"))
    set_key(hdr, "PWVERS", (__version__, "photowatch version"))
    set_key(hdr, "PROVISNL", (provisional, "reduced with a provisional master"))
    set_key(hdr, "QCSTATUS", ("accepted" if verdict.accepted else "rejected",
                              "frame quality: coadd use"))
    set_key(hdr, "QCREASON", (verdict.reason or "", "why the frame is not stacked"))
    for i, (key, value) in enumerate(run.provenance, 1):
        set_key(hdr, key, (value, f"chain step {i}: name version settings-digest"))
    frame = frame.replace(header=hdr)
    intermediates = {k: st[k] for k in ("p", "f", "s", "z") if k in st} if keep else {}
    return ScienceResult(
        frame=frame, cat=cat, wcs=wcs, qc=qc, accepted=verdict.accepted,
        reason=verdict.reason, masters_used=masters_used, provisional=provisional,
        intermediates=intermediates, timings=run.timings, updates=run.updates)


# ---------------------------------------------------------------------------- outputs

def product_path(out: Path, info: FrameInfo, name: str) -> Path:
    return out / "reduced" / info.night / name


def write_outputs(engine, row, info: FrameInfo, raw_header, result: ScienceResult) -> dict:
    """Write the product (atomically), its PNG and the intermediates; returns paths."""
    out = engine.out
    name = row["name"]
    path = product_path(out, info, name)
    frame = result.frame
    from astropy.wcs import WCS  # noqa: F401  (the header carries the WCS already)

    wcs_header = _wcs_header(frame.header)
    extra = {k: (frame.header[k], frame.header.comments[k]) for k in frame.header
             if k in _PRODUCT_KEYS}
    prim = primary_header(raw_header, {**extra, **profile_header_items(info, engine.profile(
        info.instrument))})
    shdr = sci_header(frame, wcs_header, extra)
    write_product(path, frame, primary=prim, sci_hdr=shdr, cat=result.cat)
    paths = {"product": str(path), "regions": str(write_regions(
        path.with_suffix(".reg"), result.cat, trusted=frame.header.get("ASTSTAT") == "ok"))}
    s = engine.settings.stages
    if s.quicklook_png:

        png = path.with_suffix(".png")
        engine.in_background(save_png, frame.sci, png, mask=frame.mask, max_size=800)
        paths["quicklook"] = str(png)
    if s.write_intermediates:
        from astropy.io import fits


        folder = path.parent / "intermediate"
        for prefix, key in (("p", "p"), ("fp", "f"), ("sfp", "s"), ("zsfp", "z")):
            inter = result.intermediates.get(key)
            if inter is None:
                continue
            hdus = fits.HDUList([fits.PrimaryHDU(inter.sci.astype(np.float32)),
                                 fits.ImageHDU(inter.err, name="ERR"),
                                 fits.ImageHDU(inter.mask, name="MASK")])
            write_hdul(folder / f"{prefix}{name}", hdus, fsync=False)
    return paths


_PRODUCT_KEYS = set()


def _wcs_header(header):
    from astropy.io import fits


    out = fits.Header()
    for card in header.cards:
        if card.keyword.startswith(WCS_PREFIXES):
            out.append(card)
    return out


def _init_keys():

    _PRODUCT_KEYS.update(PHOTOWATCH_KEYS)
    _PRODUCT_KEYS.update({"OVERSCAN", "SATFRAC", "MAGZPBND", "MAGSYS", "SKYPRE", "QCSTATUS",
                          "QCREASON"})
    _PRODUCT_KEYS.update(STEP_KEY.format(i) for i in range(1, MAX_STEPS + 1))


_init_keys()
