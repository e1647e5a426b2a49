"""``photowatch finalize``: the night's final, consistent products (run at dawn).

Steps, each idempotent (a second run only confirms; a run killed at any point
completes when run again; the store arbitrates with a daemon still running):

1. frames of the night still queued are processed;
2. final masters: each master rebuilt from all its accepted frames with a
   sigma-clipped median, in chunks of rows (bias, then dark, then flat); the
   master skies are written as final masters;
3. frames still waiting for masters get a last chance, else are rejected with the reason;
4. every frame reduced with a provisional or superseded master is re-reduced,
   unless the final masters change it by at most ``calibration.final_tolerance``
   of its sky noise (default 0.1): then its product is kept and marked final
   (:func:`keep_unchanged`), unless its astrometry, solved again from its CAT
   against the night's reference (no pixel work), moves its stars by more than
   :data:`ASTROMETRY_KEEP_PX`;
5. frame quality is judged again with the whole night known (the night's best
   zero point may have come late);
6. final coadds with per-pixel outlier rejection, and their catalogues;
7. the night report.

finalize never makes a night quietly worse. Before anything is re-reduced it
notes, per frame, the astrometric and photometric status and, per quick-look
coadd, its members, exposure and depth. A frame that solved in the quick-look
pass and fails in re-reduction starts again from its own quick-look solution
(the product's WCS: same pixels, solved hours earlier) and keeps it when that
solution still fits the stars (``stages.solve.astrometry``, via the night context). A frame still lost
leaves its FINAL coadd with ``FINALSTAT = 'INCOMPLETE'`` and the reason
(``FINALRSN``); the report lists it in Problems and counts it in "Needs
attention", and ``photowatch finalize`` exits with status 3. The comparison
(FINAL against QUICKLOOK per coadd; each frame before and after) is printed,
kept in the coadd row's ``stats_json`` and in the store's meta
``finalize:<night>``, and shown in the report.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from photowatch.calib.drift import block_mean, frame_change, pair_change
from photowatch.coadd.catalogue import catalog_path, coadd_catalog, write_catalog
from photowatch.coadd.final import member_wcs
from photowatch.coadd.stack import CoaddGrid, FinalMember, final_coadd
from photowatch.core.classify import FrameInfo
from photowatch.core.config import Settings
from photowatch.core.logs import get_logger
from photowatch.core.schema import header_wcs
from photowatch.io.catalogs import field_cone
from photowatch.io.fits import atomic_write
from photowatch.io.previews import save_png
from photowatch.report.html import write_report
from photowatch.run.batch import close_waiting
from photowatch.run.defects import mark_night_defects
from photowatch.run.engine import Engine, OutputError
from photowatch.stages.photometry import merge_bands
from photowatch.stages.quality import Peer, assess, night_context
from photowatch.stages.zeropoint import calibrate_zeropoint, match_sky
from photowatch.state.masters import KINDS, read_master
from photowatch.state.store import NOT_NULL

log = get_logger("photowatch.run.finalize")


@dataclass
class FinalizeResult:
    night: str | None
    ok: bool = True
    done: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report: str | None = None
    #: FINAL coadds holding fewer frames than the quick-look ones: name -> reason
    incomplete: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        if self.night is None:
            return "photowatch finalize: nothing to finalize (no frames in the store)"
        verdict = "INCOMPLETE" if not self.ok else (
            "done with problems" if self.problems else "done")
        lines = [f"photowatch finalize {self.night}: {verdict} in {self.seconds:.1f} s"]
        lines += [f"  {d}" for d in self.done]
        lines += [f"  problem: {p}" for p in self.problems]
        if self.report:
            lines.append(f"  report: {self.report}")
        return "\n".join(lines)


def _progress(desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=None, leave=False)


def finalize(settings: Settings, *, night: str | None = None, catalog: str | None = None,
             workers: int | None = None) -> FinalizeResult:
    t0 = time.perf_counter()
    engine = Engine(settings, catalog_path=catalog, command="finalize", workers=workers)
    engine.startup()
    try:
        nights = engine.store.nights()
        night = night or (nights[-1] if nights else None)
        result = FinalizeResult(night)
        if night is None:
            return result
        log.info("finalize_start", night=night, out=str(engine.out))
        try:
            _run(engine, night, result)
        except OutputError as exc:
            result.ok = False
            result.problems.append(f"{exc}; run finalize again when fixed")
        result.seconds = time.perf_counter() - t0
        log.info("finalize_done", night=night, ok=result.ok, seconds=round(result.seconds, 1))
        return result
    finally:
        engine.shutdown()


def _drain(engine: Engine, night: str, *, rereduce: bool) -> None:
    stop = threading.Event()
    engine.run(stop, until_idle=True, rereduce=rereduce, nights=[night])


def _run(engine: Engine, night: str, result: FinalizeResult) -> None:
    store = engine.store
    bar = _progress(f"finalize {night}", total=7)

    # 1. whatever is still queued
    _drain(engine, night, rereduce=False)
    bar.update()
    # what the night has before finalize touches it: frames' status, quick-look coadds
    before = snapshot(engine, night)

    # 2. final masters and skies; meanwhile the products' astrometry checks of
    # keep_unchanged (they need only the products' CAT and the reference, and are mostly
    # Python: the masters' numpy work leaves room for them)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as checker:
        checks = start_astrometry_checks(engine, night, checker)
        made = engine.book.final_masters(night, progress=lambda msg: bar.set_postfix_str(msg))
        made += engine.skies.finalize(night)
        for cand in made:
            engine.book.mark_stale(cand)
        finals = [m for m in store.latest_masters(night) if m["final"]]
        result.done.append(f"masters: {len(made)} rebuilt now, {len(finals)} final")
        # kept products' headers to mark, done while the coadds are computed: first those
        # an interrupted finalize kept in the store but did not get to mark
        marks: list = unmarked_kept(engine, night)
        if marks:
            result.done.append(f"{len(marks)} kept product(s) marked final now (CALFINAL "
                               "missing: an earlier finalize was interrupted)")
        kept, worst = keep_unchanged(engine, night, marks=marks, checks=checks)
        for *_, started in checks.values():
            started.cancel()  # those not needed (their frames were not stale) and not begun
    if kept:
        result.done.append(
            f"kept {kept} frame(s) as final: the final masters change them by at most "
            f"{worst:.3f} x their sky noise (calibration.final_tolerance = "
            f"{engine.settings.calibration.final_tolerance:g})")
    _write_bpms(engine, night)
    bar.update()

    # 3. frames waiting for masters: a last chance, then rejected with the reason
    if store.wake_waiting(night=night):
        _drain(engine, night, rereduce=False)

    n_closed = close_waiting(engine, why="no usable master by the end of the night: ")
    if n_closed:
        result.done.append(f"{n_closed} frame(s) rejected: no usable master by the end of night")
    bar.update()

    # 4. re-reduce what used provisional or superseded masters
    n_stale = store.count_frames(night=night, stale=1)
    _drain(engine, night, rereduce=True)
    left = store.count_frames(night=night, stale=1)
    result.done.append(f"re-reduced {n_stale - left} frame(s) with better masters")
    if left:
        result.ok = False
        result.problems.append(f"{left} stale frame(s) could not be re-reduced")
    bar.update()

    result.done += mark_night_defects(engine, night)  # COSMIC in most frames: defects

    # the kept products' CALFINAL/CALDEV headers, in the background from here: each is a
    # copy of the whole product renamed into place (kernel copying and fsync, ~0.2 s per 4k
    # product), which the coadds' numpy work can overlap. After the defects pass, the
    # last other writer of these products; the coadd reads them by name, and a rename
    # leaves the same pixels
    tol = engine.settings.calibration.final_tolerance
    with ThreadPoolExecutor(max_workers=1) as marker:
        marking = [marker.submit(_mark_product_final, path, dev, tol) for path, dev in marks]

        # 5. quality with the whole night known
        changed = reassess(engine, night)
        if changed:
            result.done.append(
                f"quality re-judged with the whole night: {changed} frame(s) changed")
        bar.update()

        # 6. final coadds and catalogues, compared with what the quick-look pass had
        coadds = final_coadds(engine, night, progress=lambda msg: bar.set_postfix_str(msg),
                              baseline=before["coadds"], incomplete=result.incomplete)
        for f in marking:
            f.result()  # a product that could not be marked fails finalize, as before
    result.done += coadds
    _drop_snapshots(before)
    comparison = compare(engine, night, before)
    result.done += comparison["lines"]
    for name, why in result.incomplete.items():
        result.problems.append(f"{name}: INCOMPLETE: {why}")
    bar.update()

    # 7. the report

    report = write_report(engine.out, store, night, engine.settings, final=True)
    result.report = str(report)
    bar.update()
    bar.close()
    counts = store.counts(night)
    result.done.insert(0, "frames: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    not_terminal = counts.get("received", 0) + counts.get("processing", 0)
    if not_terminal:
        result.ok = False
        result.problems.append(f"{not_terminal} frame(s) not terminal (another process has them?)")


# ---------------------------------------------------------------------------- what changed

def start_astrometry_checks(engine: Engine, night: str, pool) -> dict:
    """Start, in ``pool``, :func:`_astrometry_moved` of every reduced product of the night
    that solved: frame id -> (product, product version, future). keep_unchanged uses a
    check only for the same product version (a frame re-reduced since is checked again).
    None started when no master is left to make final and no frame is stale."""
    out: dict = {}
    store = engine.store
    if (not engine.settings.stages.astrometry.enabled
            or engine.settings.calibration.final_tolerance <= 0
            or not (store.count_frames(night=night, stale=1)
                    or any(not m["final"] for m in store.latest_masters(night)))):
        return out  # nothing will be judged (a second finalize: every master final already)
    for row in store.frames_of_night(night, kind="object", product=NOT_NULL,
                                            state=("reduced", "rejected")):
        qc = json.loads(row["qc_json"] or "{}")
        if qc.get("aststat") not in ("ok", "relative"):
            continue  # failed: keep_unchanged's own check says so at once
        try:
            info = FrameInfo.from_summary(json.loads(row["info_json"]))
            profile = engine.profile(info.instrument)
        except Exception:
            continue
        out[row["id"]] = (row["product"], row["product_version"],
                          pool.submit(_astrometry_moved, engine, row, info, profile))
    return out


def unmarked_kept(engine: Engine, night: str) -> list[tuple[str, float]]:
    """(product, change) of the night's products kept as final in the store whose SCI
    header lacks ``CALFINAL``: the store records a kept frame before its header is
    marked (the marks run in the background while the coadds are made), so a finalize
    killed in between leaves these; the next one marks them."""
    from astropy.io import fits

    out = []
    for row in engine.store.frames_of_night(night, kind="object", product=NOT_NULL, stale=0,
                                            state=("reduced", "rejected")):
        calfinal = json.loads(row["qc_json"] or "{}").get("calfinal") or {}
        if not calfinal.get("kept"):
            continue
        try:
            marked = fits.getheader(row["product"], "SCI").get("CALFINAL") is True
        except Exception as exc:  # unreadable: said here, the product is left as it is
            log.warning("product_unreadable", product=Path(row["product"]).name,
                        problem=str(exc), action="not marked final")
            continue
        if not marked:
            out.append((row["product"], float(calfinal.get("change_sigma", 0.0))))
    return out


def keep_unchanged(engine: Engine, night: str, *, marks: list | None = None,
                   checks: dict | None = None) -> tuple[int, float]:
    """Frames marked stale that the final masters would barely change: kept and marked final.

    A stale frame is re-reduced only when the night's final masters change it by
    more than ``calibration.final_tolerance`` of its sky noise (estimated from the
    masters' difference maps, once per master pair: :mod:`photowatch.calib.drift`).
    Otherwise its product is kept: ``CALFINAL = T`` and ``CALDEV`` (the change, in
    units of the sky noise) in its SCI header, and in the store it is no longer
    stale or provisional, with ``qc_json['calfinal']`` naming the final masters it
    stands for. Returns (frames kept, the largest change among them).

    ``marks``: when given, the headers are not written here; (product, change) pairs
    are appended for the caller to pass to :func:`_mark_product_final`. ``checks``:
    astrometry checks already started (:func:`start_astrometry_checks`).
    """

    tol = engine.settings.calibration.final_tolerance
    if tol <= 0:
        return 0, 0.0
    store = engine.store
    blocks: dict[str, np.ndarray | None] = {}
    pairs: dict[tuple, float] = {}
    skies: dict[str, tuple | None] = {}

    def master_blocks(path: str) -> np.ndarray | None:
        if path not in blocks:
            try:
                blocks[path] = block_mean(read_master(path).data)
            except Exception as exc:  # unreadable: the frame is re-reduced
                log.warning("master_unreadable", master=Path(path).name, problem=str(exc),
                            action="frames that used it are re-reduced")
                blocks[path] = None
        return blocks[path]

    def used_path(entry: dict) -> str | None:
        mid = entry.get("master_id")
        rows = store.masters(id=mid) if mid is not None else []
        return rows[0]["path"] if rows else None

    kept, worst = 0, 0.0
    todo: list[tuple[str, float]] = []
    judged: list[tuple] = []
    for row in store.frames_of_night(night, kind="object", stale=1, product=NOT_NULL,
                                     state=("reduced", "rejected")):
        info = FrameInfo.from_summary(json.loads(row["info_json"]))
        used = json.loads(row["masters_json"] or "{}")
        qc = json.loads(row["qc_json"] or "{}")
        try:
            profile = engine.profile(info.instrument)
        except Exception:
            continue
        changes: dict[str, float] = {}
        finals: dict[str, str] = {}
        for kind in KINDS:
            if not profile.uses(kind):
                continue
            cand = engine.book.select(kind, info)
            entry = used.get(kind)
            if cand is None and entry is None:
                continue
            if cand is None or entry is None:
                changes[kind] = float("inf")
                break
            finals[kind] = Path(cand.path).name
            if cand.master_id is not None and entry.get("master_id") == cand.master_id:
                changes[kind] = 0.0
                continue
            upath = used_path(entry)
            key = (kind, upath, cand.path)
            if key not in pairs:
                ub = master_blocks(upath) if upath else None
                fb = master_blocks(cand.path)
                pairs[key] = float("inf") if ub is None or fb is None else \
                    pair_change(kind, ub, fb)
            changes[kind] = pairs[key]
        if engine.settings.stages.mastersky.enabled and not any(
                np.isinf(c) for c in changes.values()):
            skey = engine.skies.key(info).text
            if skey not in skies:
                skies[skey] = engine.skies.final_sky(info)
            final_sky = skies[skey]
            if final_sky is None or not engine.skies.usable_for(final_sky[0], row["name"]):
                if used.get("sky"):  # re-reduction would go without: a change
                    changes["sky"] = float("inf")
            else:
                ub = engine.skies.used_blocks(row["name"], info) if used.get("sky") else None
                changes["sky"] = float("inf") if used.get("sky") and ub is None else \
                    pair_change("sky", ub, final_sky[1])
                finals["sky"] = engine.skies.key(info).slug()
        level = qc.get("sky_pre_e")
        if level is None:
            level = qc.get("sky_e") if not used.get("sky") else (qc.get("skynoise_e") or 0) ** 2
        dev = frame_change(changes, exptime_s=info.exptime_s, level_e=level,
                           noise_e=qc.get("skynoise_e"))
        judged.append((row, info, profile, qc, changes, finals, dev))

    # a kept product keeps its night-time astrometry: solved again from its CAT with the
    # reference a re-reduction would use (no pixel work), it must land where it is; two
    # frames at a time (the solves are numpy and FITS reads, much of it without the GIL)
    from concurrent.futures import ThreadPoolExecutor

    def check(judgement) -> tuple:
        row, info, profile, *_, dev = judgement
        if dev > tol:
            return None, ""
        product, version, started = (checks or {}).get(row["id"], (None, None, None))
        if started is not None and (product, version) == (row["product"],
                                                          row["product_version"]):
            return started.result()
        return _astrometry_moved(engine, row, info, profile)

    with ThreadPoolExecutor(max_workers=2) as pool:
        checks = list(pool.map(check, judged))
    for (row, _info, _profile, qc, changes, finals, dev), (moved, why) in zip(judged, checks):
        if moved is not None and not moved <= ASTROMETRY_KEEP_PX:
            why = why or (f"its astrometry, solved again from its CAT, moves its stars by "
                          f"{moved:.3f} px (more than {ASTROMETRY_KEEP_PX})")
        else:
            why = ""
        log.info("final_masters_change", file=row["raw_name"], change_sigma=round(dev, 4),
                 per_master={k: round(v, 6) for k, v in changes.items()},
                 **({"astrometry_moved_px": round(moved, 5)} if moved is not None
                    and np.isfinite(moved) else {}),
                 **({"problem": why} if why else {}),
                 action="product kept" if dev <= tol and not why else "re-reduced")
        if not dev <= tol or why:
            continue
        qc["calfinal"] = {"kept": True, "change_sigma": round(dev, 4), "masters": finals,
                          "changes": {k: round(v, 6) for k, v in changes.items()}}
        if moved is not None:
            qc["calfinal"]["astrometry_moved_px"] = round(moved, 5)  # <= ASTROMETRY_KEEP_PX
        message = (f"kept as final: the final masters change it by {dev:.3f} x its sky noise "
                   f"(at most {tol:g})")
        if not store.keep_final(row["id"], row["state"], qc, message):
            continue  # another process took it meanwhile
        todo.append((row["product"], dev))
        kept += 1
        worst = max(worst, dev)
    if marks is not None:
        marks.extend(todo)
        return kept, worst
    # the headers marked two at a time: each is a copy of the whole product renamed into
    # place, mostly the kernel copying (GIL released), ~0.2 s per 4k product
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda m: _mark_product_final(m[0], m[1], tol), todo))
    return kept, worst


#: a kept product's astrometry, solved again from its CAT, may move its stars by at most
#: this (px); more and the frame is re-reduced
ASTROMETRY_KEEP_PX = 0.1


def _astrometry_moved(engine: Engine, row, info: FrameInfo, profile) -> tuple:
    """(moved, why): how far (px) a product's astrometry, solved again from its stored CAT
    against the reference a re-reduction would use, moves its clean stars; None when
    there is nothing to check against (astrometry disabled, the catalogue unavailable
    now). inf, with the reason, when a re-reduction could do better
    than the product: its astrometry failed, it was registered relatively while the
    catalogue now covers it, the product cannot be read or the new solve fails."""
    from astropy.io import fits
    from astropy.table import Table

    from photowatch.stages.solve import image_centre, solve_from_catalogue

    s = engine.settings.stages.astrometry
    if not s.enabled:
        return None, ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(row["product"], memmap=True) as hdul:
                hdr = hdul["SCI"].header.copy()
                cat = Table.read(hdul["CAT"]) if "CAT" in hdul else None
    except Exception as exc:
        return float("inf"), f"product unreadable ({exc})"
    status = str(hdr.get("ASTSTAT", "failed")).strip()
    if status not in ("ok", "relative"):
        return float("inf"), "its astrometry failed: a re-reduction tries again"
    wcs = header_wcs(hdr)
    shape = (int(hdr["NAXIS2"]), int(hdr["NAXIS1"]))
    try:
        reference, _ = engine.reference_stars(info, profile, wcs, shape)
    except Exception as exc:  # catalogue down now: a re-reduction could only do worse
        log.warning("reference_unavailable", file=row["raw_name"], problem=str(exc),
                    action="its astrometry is kept unchecked")
        reference = None
    if status == "ok" and reference is None:
        return None, ""
    if status == "relative":
        if reference is not None and len(reference):
            return float("inf"), "registered relatively, and the catalogue now covers it"
        ra_c, dec_c, half = image_centre(wcs, shape)
        reference = engine.refs.near(info.night, info.target or "", None, "astrom",
                                     ra_c, dec_c, half)
    moved = solve_from_catalogue(cat, shape, wcs, reference, s)[1]
    return moved, "" if np.isfinite(moved) else "solved again from its CAT, it fails"


def _mark_product_final(path: str, dev: float, tol: float) -> None:
    """``CALFINAL``/``CALDEV`` into a product's SCI header: a copy edited, then renamed
    into place (atomic; the pixels are not rewritten)."""
    import os
    import shutil
    import tempfile

    from astropy.io import fits

    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(target, tmp)
        with fits.open(tmp, mode="update") as hdul:
            hdr = hdul["SCI"].header
            hdr["CALFINAL"] = (True, "equivalent to the night's final masters")
            hdr["CALDEV"] = (round(dev, 4), f"[sky sigma] change by final masters (<= {tol:g})")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- before / after

#: aperture radius (px) of the depth figure: 5 sigma of the noise in this aperture
DEPTH_RADIUS_PX = 3.0


def coadd_depth(path, magzp: float | None) -> float | None:
    """5-sigma depth of a coadd (mag) in a 3-px-radius aperture, from its WHT plane.

    SCI is a weighted mean, so a pixel's noise is 1/sqrt(WHT); the median over
    the deep part (WHT at least half its maximum) is the coadd's noise. Without
    a MAGZP the figure is relative (MAGZP taken as 0): still comparable between
    the QUICKLOOK and FINAL coadds of one field.
    """
    from astropy.io import fits

    try:
        wht = np.asarray(fits.getdata(path, "WHT"), float)
    except Exception:
        return None
    good = wht[np.isfinite(wht) & (wht > 0)]
    if not good.size:
        return None
    deep = good[good >= 0.5 * good.max()]
    sigma = float(np.median(1.0 / np.sqrt(deep)))
    flux = 5.0 * sigma * np.sqrt(np.pi * DEPTH_RADIUS_PX ** 2)
    return round((magzp or 0.0) - 2.5 * np.log10(flux), 3)


def _frame_status(row) -> dict:
    qc = json.loads(row["qc_json"] or "{}")
    return {"file": row["raw_name"], "state": row["state"], "accepted": bool(row["accepted"]),
            "aststat": qc.get("aststat"), "astmethod": qc.get("astmethod"),
            "phot_status": qc.get("phot_status"), "zp": qc.get("zp"),
            "version": row["product_version"], "reason": row["reason"]}


def snapshot(engine: Engine, night: str) -> dict:
    """The night before finalize re-reduces anything: frames' status, quick-look coadds.

    Also hands the engine each frame's quick-look solution (its product's WCS)
    for the re-reduction to start from if the new solve fails. A coadd already
    FINAL (a second finalize) keeps the quick-look baseline its first run noted.
    """

    store = engine.store
    frames = {}
    solved = {}
    for row in store.frames_of_night(night, kind="object", product=NOT_NULL):
        status = _frame_status(row)
        frames[row["id"]] = status
        if status["aststat"] in ("ok", "relative"):
            solved[row["id"]] = (row["product"], row["raw_name"], status["aststat"])
    engine.quicklook_solutions = QuicklookSolutions(solved)
    coadds = {}
    for c in store.coadds(night):
        stats = json.loads(c["stats_json"] or "{}")
        if c["stacktype"] == "FINAL":
            if stats.get("quicklook"):
                coadds[(c["target"], c["filter"])] = stats["quicklook"]
            continue
        members = json.loads(c["members_json"] or "[]")
        path = Path(c["path"])
        coadds[(c["target"], c["filter"])] = {
            "ncombine": c["ncombine"], "exptime": c["exptime"],
            "members": sorted(m.split(":v")[0] for m in members),
            "depth_mag": coadd_depth(path, c["magzp"]) if path.exists() else None,
            "snapshot": _snapshot_file(path)}
    return {"frames": frames, "coadds": coadds}


class QuicklookSolutions(Mapping):
    """Frame id -> (WCS, status) of its quick-look solution, read from its product's
    header when the re-reduction of that frame asks for it (before the product is
    replaced), not for every frame up front: most frames are kept or need no fallback,
    and a header parse and WCS build cost ~30 ms each."""

    def __init__(self, solved: dict):
        self._solved = solved  # frame id -> (product path, raw name, aststat)
        self._read: dict = {}

    def __getitem__(self, frame_id):
        if frame_id not in self._read:
            if frame_id not in self._solved:
                raise KeyError(frame_id)
            self._read[frame_id] = self._load(*self._solved[frame_id])
        if self._read[frame_id] is None:
            raise KeyError(frame_id)
        return self._read[frame_id]

    def __iter__(self):
        return iter(self._solved)

    def __len__(self):
        return len(self._solved)

    @staticmethod
    def _load(product: str, raw_name: str, aststat: str):
        from astropy.io import fits
        from astropy.wcs import WCS

        if not Path(product).exists():
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wcs = WCS(fits.getheader(product, "SCI"))
        except Exception as exc:  # unreadable product: no fallback for it
            log.warning("quicklook_solution_unreadable", file=raw_name,
                        problem=str(exc), action="no fallback if re-reduction fails")
            return None
        return (wcs, aststat) if wcs.has_celestial else None


def _snapshot_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.quicklook-snapshot.fits")


def _snapshot_file(path: Path) -> str | None:
    """A hard link to the quick-look coadd as it is now (free: every coadd write is an
    atomic rename, so the link keeps tonight's quick-look pixels while re-reduction
    swaps frames in and out); a copy where links are not supported."""
    import os

    if not path.exists():
        return None
    snap = _snapshot_path(path)
    try:
        snap.unlink(missing_ok=True)
        try:
            os.link(path, snap)
        except OSError:
            _keep_copy(path, snap)
    except OSError as exc:
        log.warning("quicklook_snapshot_failed", coadd=path.name, problem=str(exc),
                    action="no copy kept if the final coadd loses frames")
        return None
    return str(snap)


def _drop_snapshots(before: dict) -> None:
    for quick in before["coadds"].values():
        if quick.get("snapshot"):
            Path(quick["snapshot"]).unlink(missing_ok=True)


def compare(engine: Engine, night: str, before: dict) -> dict:
    """Each frame before and after re-reduction; each FINAL coadd against its quick-look.

    Stored in the meta ``finalize:<night>`` (the report shows it); returns it
    with ``lines`` for the command's output.
    """
    store = engine.store
    frames = []
    worse = []
    for fid, old in before["frames"].items():
        row = store.frame(fid)
        if row is None:
            continue
        new = _frame_status(row)
        entry = {"file": old["file"], "before": old, "after": new}
        frames.append(entry)
        solved = ("ok", "relative")
        if old["accepted"] and old["aststat"] in solved and (
                not new["accepted"] or new["aststat"] not in solved):
            entry["why"] = new["reason"] or "astrometry lost"
            worse.append(entry)
        elif old["phot_status"] == "ok" and new["phot_status"] not in (None, "ok"):
            entry["why"] = f"photometry {old['phot_status']} -> {new['phot_status']}"
            worse.append(entry)
    coadds = []
    for c in store.coadds(night):
        stats = json.loads(c["stats_json"] or "{}")
        if c["stacktype"] != "FINAL":
            continue
        coadds.append({"target": c["target"], "filter": c["filter"],
                       "quicklook": stats.get("quicklook"), "final": stats.get("final"),
                       "finalstat": stats.get("finalstat"), "lost": stats.get("lost", [])})
    ast = {"before": _tally(e["before"]["aststat"] for e in frames),
           "after": _tally(e["after"]["aststat"] for e in frames)}
    phot = {"before": _tally(e["before"]["phot_status"] for e in frames),
            "after": _tally(e["after"]["phot_status"] for e in frames)}
    rescued = sum(1 for e in frames if (e["after"]["astmethod"] or "").startswith("quicklook"))
    lines = [f"astrometry before -> after: {_fmt_tally(ast['before'])} -> "
             f"{_fmt_tally(ast['after'])}"
             + (f" ({rescued} from their quick-look solution)" if rescued else ""),
             f"photometry before -> after: {_fmt_tally(phot['before'])} -> "
             f"{_fmt_tally(phot['after'])}"]
    for c in coadds:
        q, f = c["quicklook"] or {}, c["final"] or {}
        if not q:
            continue
        depth = ""
        if q.get("depth_mag") is not None and f.get("depth_mag") is not None:
            depth = f", depth {q['depth_mag']:.2f} -> {f['depth_mag']:.2f} mag"
        lines.append(f"coadd {c['target']} {c['filter']} QUICKLOOK -> FINAL: "
                     f"{q.get('ncombine')} -> {f.get('ncombine')} frames, "
                     f"{q.get('exptime') or 0:.0f} -> {f.get('exptime') or 0:.0f} s{depth}"
                     + (f" [{c['finalstat']}]" if c["finalstat"] == "INCOMPLETE" else ""))
    for e in worse:
        lines.append(f"worse after re-reduction: {e['file']}: {e['why']}")
    data = {"frames": frames, "coadds": coadds, "astrometry": ast, "photometry": phot,
            "worse": [e["file"] for e in worse],
            "worse_why": {e["file"]: e["why"] for e in worse}, "rescued": rescued}
    store.set_meta(f"finalize:{night}", data)
    data["lines"] = lines
    return data


def _tally(values) -> dict:
    out: dict = {}
    for v in values:
        out[v or "none"] = out.get(v or "none", 0) + 1
    return out


def _fmt_tally(t: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(t.items())) or "none"


def _write_bpms(engine: Engine, night: str) -> None:
    """Write each camera's bad-pixel mask from its final dark and flat (for people and DS9)."""

    seen = set()
    for row in engine.store.frames_of_night(night, kind="object", info_json=NOT_NULL):
        info = FrameInfo.from_summary(json.loads(row["info_json"]))
        key = (info.camera, info.binning, info.readout)
        if key in seen:
            continue
        seen.add(key)
        dark = engine.book.select("dark", info)
        flat = engine.book.select("flat", info)
        if _bpm_current(engine.book.root / night / f"bpm_{info.camera}.fits", dark, flat):
            continue  # written from these masters already (and maybe given defects since)
        engine.book.write_bpm(night, info.camera, info.binning, info.readout,
                              engine.book.load(dark) if dark else None,
                              engine.book.load(flat) if flat else None)


def _bpm_current(path: Path, dark, flat) -> bool:
    """True when the bad-pixel mask at ``path`` was written from these dark and flat
    masters (its MDARK and MFLAT): a second finalize need not load them to write it again."""
    from astropy.io import fits

    if not path.exists():
        return False
    try:
        hdr = fits.getheader(path)
    except Exception:  # unreadable: write it again
        return False
    return (hdr.get("MDARK") == (Path(dark.path).name if dark else "")
            and hdr.get("MFLAT") == (Path(flat.path).name if flat else ""))


def reassess(engine: Engine, night: str) -> int:
    """Judge every reduced object frame again against the whole night; returns changes."""

    store = engine.store
    changed = 0
    rows = store.frames_of_night(night, kind="object", product=NOT_NULL,
                                 state=("reduced", "rejected"))
    # the one night-quality context the engine judges each frame with, here of the whole night
    judged = {r["id"] for r in rows}
    peers = tuple(Peer.from_qc(r["id"], r["filter"], r["target"], r["camera"], r)
                  for r in store.night_quality(night) if r["id"] in judged)
    for row in rows:
        qc = json.loads(row["qc_json"] or "{}")
        night_q = night_context(peers, frame_id=row["id"], filt=row["filter"],
                                target=row["target"], qc=qc)
        verdict = assess(qc, best_transparency_mag=night_q.best_transparency,
                         settings=engine.settings.quality, night_fwhm_arcsec=night_q.fwhm)
        accepted = int(verdict.accepted)
        if accepted == (row["accepted"] or 0) and (verdict.reason or None) == row["reason"]:
            continue
        new_state = "reduced" if verdict.accepted else "rejected"
        qc["accepted"] = verdict.accepted
        coadd = row["coadd"] if verdict.accepted else "excluded"
        if verdict.accepted and row["coadd"] in (None, "excluded"):
            coadd = "pending"
        store.transition(row["id"], [row["state"]], new_state, accepted=accepted,
                         reason=verdict.reason, qc_json=qc, coadd=coadd,
                         message=f"re-judged with the whole night: {verdict.reason or 'accepted'}",
                         level="info" if verdict.accepted else "warning",
                         action="stacked" if verdict.accepted else "kept out of the coadd")
        changed += 1
    return changed


def final_coadds(engine: Engine, night: str, progress=None, baseline: dict | None = None,
                 incomplete: dict | None = None) -> list[str]:
    """Final outlier-rejected coadd and catalogue of every (target, filter) of the night.

    ``baseline``: (target, filter) -> the quick-look coadd (members, ncombine,
    exptime, depth) from :func:`snapshot`. A FINAL coadd missing a frame the
    quick-look one held gets ``FINALSTAT='INCOMPLETE'`` and ``FINALRSN`` (which
    frames, why), is listed in ``incomplete``, and a copy of the quick-look coadd
    is kept next to it (``*.quicklook.fits``): the better product is not lost.
    """
    baseline = baseline or {}
    incomplete = incomplete if incomplete is not None else {}

    store = engine.store
    settings = engine.settings.coadd
    done = []
    if not settings.enabled:
        return done
    rows = store.frames_of_night(night, kind="object", state="reduced", accepted=1,
                                 product=NOT_NULL)
    groups: dict[tuple, list] = {}
    for row in rows:
        qc = json.loads(row["qc_json"] or "{}")
        if qc.get("aststat") == "failed" or not qc.get("flxscale") or not qc.get("skynoise_e"):
            continue
        groups.setdefault((row["target"], row["filter"]), []).append((row, qc))
    catalogs: dict[str, dict] = {}
    from concurrent.futures import ThreadPoolExecutor

    measurer = ThreadPoolExecutor(max_workers=1)
    measuring: dict = {}
    try:
        done += _coadds_of(engine, night, groups, baseline, incomplete, progress, catalogs,
                           measurer, measuring)
        done += _catalogues(engine, night, catalogs, measuring)
    finally:
        measurer.shutdown(wait=True, cancel_futures=True)
    return done


def _coadds_of(engine: Engine, night: str, groups: dict, baseline: dict, incomplete: dict,
               progress, catalogs: dict, measurer, measuring: dict) -> list[str]:
    """The FINAL coadds of :func:`final_coadds` (see there), each catalogue started in
    ``measurer`` (path -> future in ``measuring``)."""
    store = engine.store
    settings = engine.settings.coadd
    done = []
    for (target, filt), members in sorted(groups.items()):
        specs = [FinalMember(member_id=f"{r['name']}:v{r['product_version']}", path=r["product"],
                             flxscale=float(qc["flxscale"]), skynoise=float(qc["skynoise_e"]),
                             exptime_s=float(r["exptime"] or 0)) for r, qc in members]
        ids = sorted(m.member_id for m in specs)
        path = engine.coadds.path(night, target, filt)
        row = store.coadd(night, target, filt)
        magzp = engine.coadds._magzp((night, target, filt))
        up_to_date = (row is not None and row["stacktype"] == "FINAL" and not row["outdated"]
                      and json.loads(row["members_json"] or "[]") == ids and path.exists())
        quick = baseline.get((target, filt)) or {}
        lost = _lost_frames(store, night, quick, {r["name"] for r, _ in members})
        finalstat = "INCOMPLETE" if lost else "COMPLETE"
        why = ""
        if lost:
            why = (f"{len(lost)} of {quick.get('ncombine')} quick-look frames lost: "
                   + "; ".join(f"{f}: {r}" for f, r in lost.items()))
            incomplete[path.name] = why
            log.warning("final_coadd_incomplete", coadd=path.name, problem=why,
                        action="FINALSTAT='INCOMPLETE'; quick-look coadd kept as "
                        + path.with_suffix(".quicklook.fits").name)
        if up_to_date and row is not None:
            old = json.loads(row["stats_json"] or "{}").get("finalstat")
            up_to_date = old == finalstat
        if not up_to_date:
            snap = quick.get("snapshot")
            if lost and snap and Path(snap).exists():
                import os

                os.replace(snap, path.with_suffix(".quicklook.fits"))
            grid = _covering_grid(engine, night, target, filt, row, members)
            if progress:
                progress(f"coadd {target} {filt} ({len(specs)} frames)")
            limmag = _final_limmag(engine, members, grid, magzp, path)
            with engine.coadds.lock((night, target, filt)):
                final_coadd(specs, grid, path, clip_sigma=settings.clip_sigma,
                            chunk_rows=settings.chunk_rows, magzp=magzp,
                            header_extra={"TARGET": target, "FILTNAME": filt, "NIGHT": night,
                                          "LIMMAG": (limmag, "[mag] 5-sigma point-source "
                                                     "limit where all members overlap"),
                                          "ABSCAL": magzp is not None,
                                          "FINALSTAT": (finalstat, "COMPLETE, or INCOMPLETE: "
                                                        "quick-look frames lost"),
                                          "FINALRSN": (why or None, "frames lost, and why")},
                            step_px=settings.mapping_step_px,
                            interpolation=settings.interpolation,
                            amp_frac=settings.clip_amp_frac, grow_px=settings.clip_grow_px)
                engine.coadds._accs.pop((night, target, filt), None)
            # its catalogue measured in the background (one core: source extraction) while
            # this thread makes the PNG and the depth and records the coadd
            measuring[str(path)] = measurer.submit(_measure_coadd, engine, path, magzp)
            png = None
            if settings.quicklook_png:
                from astropy.io import fits


                png = path.with_suffix(".png")
                save_png(fits.getdata(path, "SCI"), png, max_size=1024)
            exptime = sum(m.exptime_s for m in specs)
            baseline_stats = {k: v for k, v in quick.items() if k != "snapshot"}
            stats = {"quicklook": baseline_stats or None, "finalstat": finalstat, "finalreason": why or None,
                     "lost": sorted(lost),
                     "final": {"ncombine": len(specs), "exptime": exptime,
                               "members": sorted(r["name"] for r, _ in members),
                               "depth_mag": coadd_depth(path, magzp)}}
            store.upsert_coadd(night=night, target=target, filter=filt, path=str(path),
                               stacktype="FINAL", ncombine=len(specs),
                               exptime=exptime, magzp=magzp,
                               grid=grid.to_dict(), members=ids,
                               quicklook=str(png) if png else None, stats=stats)
            store.set_coadd_limmag(night, target, filt, limmag)
            done.append(f"final coadd {path.name}: {len(specs)} frames"
                        + (" (INCOMPLETE)" if lost else ""))
        catalogs.setdefault(target, {})[filt] = (path, magzp, not up_to_date)
    return done


def _lost_frames(store, night: str, quick: dict, final_names: set) -> dict[str, str]:
    """Quick-look members missing from the FINAL coadd: raw file name -> why."""
    lost = {}
    for name in quick.get("members") or []:
        if name in final_names:
            continue
        row = store.frame_named(name, night)
        if row is None:
            lost[name] = "no longer in the store"
            continue
        qc = json.loads(row["qc_json"] or "{}")
        if (row["state"] == "rejected" and qc.get("aststat") in ("ok", "relative")
                and qc.get("flxscale")):
            continue  # left out by the whole night's quality verdict: a choice, not a loss
        why = row["reason"] or (qc.get("astreason") if qc.get("aststat") == "failed" else None)
        lost[row["raw_name"]] = why or f"{row['state']}, not usable for the final coadd"
    return lost


def _keep_copy(src: Path, dst: Path) -> None:
    """Copy a file atomically (the quick-look coadd a worse FINAL one replaces)."""
    import shutil


    def write(fh):
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, fh, 1 << 22)

    atomic_write(dst, write)


def _covering_grid(engine: Engine, night: str, target: str, filt: str, row, members):
    """The night's grid of a coadd, grown if needed to cover every member frame."""


    grid = None
    if row is not None and row["grid_json"]:
        grid = CoaddGrid.from_json(row["grid_json"])
    for member, _ in members:
        wcs, shape = member_wcs(member["product"])
        if grid is None:
            grid = engine.coadds.grid(night, target, filt, wcs, shape)
            continue
        grown = engine.coadds.covering(grid, wcs, shape, member["raw_name"])
        if grown is not None:
            grid = grown[0]
    return grid


def _final_limmag(engine: Engine, members: list, grid, magzp: float | None,
                  path: Path) -> float | None:
    """LIMMAG of a FINAL coadd: the quick-look coadd's figure (stages.depth.coadd_depth)
    from the members' qc and their coadd weights; None when it cannot be had (a side fact,
    never a reason to fail the coadd)."""
    from photowatch.coadd.accumulate import member_weight
    from photowatch.stages.depth import coadd_depth as depth_of

    try:
        ws = [member_weight(float(qc["flxscale"]), float(qc["skynoise_e"])) for _, qc in members]
        depth = depth_of(weights=ws, qcs=[qc for _, qc in members], sum_w=float(sum(ws)),
                         aperture_fwhm=engine.settings.stages.sources.aperture_fwhm,
                         pixel_scale_arcsec=grid.pixel_scale_arcsec, magzp=magzp,
                         nsigma=engine.settings.targets.nsigma)
    except Exception as exc:
        log.warning("coadd_depth_failed", file=path.name, problem=str(exc),
                    action="final coadd written without LIMMAG")
        return None
    lim = depth.get("limmag")
    return round(float(lim), 3) if lim is not None and np.isfinite(lim) else None


def _measure_coadd(engine: Engine, path, magzp):
    return coadd_catalog(path, magzp=magzp, detect_sigma=engine.settings.coadd.detect_sigma,
                         max_sources=engine.settings.coadd.max_sources,
                         settings=engine.settings.stages.sources)


def _catalogues(engine: Engine, night: str, catalogs: dict,
                measuring: dict | None = None) -> list[str]:
    done = []
    for target, per_filter in catalogs.items():
        fresh = any(changed or not catalog_path(path).exists()
                    for path, _, changed in per_filter.values())
        if not fresh:
            continue
        tables = {}
        for filt, (path, magzp, _) in per_filter.items():
            cat_path = catalog_path(path)
            started = (measuring or {}).pop(str(path), None)
            table = started.result() if started is not None else \
                _measure_coadd(engine, path, magzp)
            if magzp is not None:
                _calibrate_catalogue(engine, night, target, filt, path, table)
            tables[filt] = (table, cat_path)
        merged = merge_bands({f: t for f, (t, _) in tables.items()},
                             radius_arcsec=engine.settings.coadd.merge_radius_arcsec) \
            if len(tables) > 1 else None
        for filt, (table, cat_path) in tables.items():
            if merged is not None:
                table = _with_bands(table, merged, engine.settings.coadd.merge_radius_arcsec)
            write_catalog(table, cat_path)
            row = engine.store.coadd(night, target, filt)
            engine.store.set_coadd_catalog(row["id"], str(cat_path))
            done.append(f"catalogue {cat_path.name}: {len(table)} sources")
    return done


def _calibrate_catalogue(engine: Engine, night: str, target: str, filt: str, path, table):
    """Calibrate a coadd catalogue against the reference catalogue, as PhotoPipe does.

    The coadd's pixels are on its photometric reference (MAGZP of the file); its
    catalogue's aperture-corrected fluxes carry the coadd's own aperture correction, whose
    PSF is a blend of the night's seeings. Fitting the catalogue's magnitudes to the
    reference catalogue (the frames' method) removes that dependence. The file's MAGZP
    is kept as MAGZPREF in the catalogue header.
    """
    from astropy.io import fits


    provider = engine.catalog
    rows = engine.store.frames_of_night(night, target=target, filter=filt, kind="object")
    if provider is None or not rows:
        return
    info = FrameInfo.from_summary(json.loads(rows[0]["info_json"]))
    band = engine.profile(info.instrument).band_for(filt)
    if band is None:
        return
    header = fits.getheader(path, "SCI")
    shape = (header["NAXIS2"], header["NAXIS1"])
    try:
        ra, dec, radius = field_cone(header_wcs(header), shape)
        reference = provider.query(ra, dec, radius, bands=[band])
    except Exception as exc:  # the catalogue is down: keep the reference zero point
        log.warning("coadd_catalogue_not_calibrated", coadd=Path(path).name, problem=str(exc),
                    action="magnitudes from the coadd's reference zero point")
        return
    zp = calibrate_zeropoint(table, reference, band=band, shape=shape,
                             settings=engine.settings.stages.zeropoint)
    if zp.status != "ok":
        log.warning("coadd_catalogue_not_calibrated", coadd=Path(path).name, problem=zp.reason,
                    action="magnitudes from the coadd's reference zero point")
        return
    flux = np.asarray(table["flux"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["mag"] = np.where(flux > 0, zp.magzp - 2.5 * np.log10(flux), np.nan)
    table["magerr"] = np.hypot(np.asarray(table["magerr"], float), zp.magzp_err)
    table.meta.update({"MAGZPREF": table.meta.get("MAGZP"), "MAGZP": zp.magzp,
                       "MAGZPERR": zp.magzp_err, "MAGZPN": zp.n, "ZPMETHOD": "catalogue"})


def _with_bands(table, merged, radius: float = 1.0):
    """Add the per-band columns of the merged catalogue to one filter's catalogue (by position)."""
    import numpy as np


    a, b = match_sky(table["ra"], table["dec"], merged["ra"], merged["dec"], radius)
    out = table.copy()
    for col in merged.colnames:
        if col.startswith(("mag_", "magerr_")):
            values = np.full(len(out), np.nan)
            values[a] = np.asarray(merged[col], float)[b]
            out[col] = values
    return out


def rebuild_masters(settings: Settings, night: str | None = None) -> str:
    """``photowatch masters rebuild``: the final masters of a night, now."""
    engine = Engine(settings, command="masters-rebuild")
    engine.startup()
    try:
        night = night or (engine.store.nights() or [None])[-1]
        if night is None:
            return "no frames in the store"
        made = engine.book.final_masters(night)
        for cand in made:
            engine.book.mark_stale(cand)
        return "\n".join(f"final {Path(c.path).name} ({c.ninputs} inputs)" for c in made) or \
            f"masters of {night} are already final"
    finally:
        engine.shutdown()
