"""Coadds of the output directory: quick-look accumulation during the night, finals at dawn.

The quick-look coadd file ``OUT/coadds/<night>/coadd_<TARGET>_<FILTER>.fits``
is itself the accumulator's persistent state (SCI, WHT, EXP, NCOV and the
MEMBERS table, see :mod:`photowatch.coadd.stack`); an in-memory accumulator per
coadd avoids re-reading it. A member is named ``<product name>:v<version>``,
so after a crash the file says exactly which frame versions are in: a frame is
never added twice, and a re-reduced frame's old version is swapped out before
the new one goes in.

Frame column ``coadd``: NULL (not stacked), ``pending`` (to add), ``adding``
(a worker is on it), ``added``, ``excluded`` (quality: the reason is the
frame's reason).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from photowatch.coadd.stack import (
    Accumulator,
    CoaddGrid,
    coadd_filename,
    grown_grid,
    make_grid,
    resample,
)
from photowatch.core.classify import FrameInfo
from photowatch.core.errors import StageDegraded
from photowatch.core.frame import Frame
from photowatch.core.logs import get_logger
from photowatch.core.schema import header_wcs
from photowatch.io.previews import save_png
from photowatch.io.products import read_planes_for_stacking, read_product
from photowatch.state.locking import NamedLocks

log = get_logger("photowatch.coadd.stack")


def member_id(name: str, version: int) -> str:
    return f"{name}:v{version}"


class CoaddBook:
    """The coadds of one output directory.

    Parameters
    ----------
    store, refs
        the state store and the night's field references (a coadd's MAGZP is ``zpref``'s)
    settings
        the ``[coadd]`` settings
    out
        the output directory (coadds go to ``out/coadds``)
    in_background
        ``fn(callable, *args, **kwargs)``: runs a best-effort side task (a PNG preview)
    threads
        threads each resampling may use (:func:`photowatch.core.config.threads_per_worker`)
    """

    def __init__(self, *, store, refs, settings, out: Path, in_background, threads: int = 1,
                 lightcurves=None):
        #: issue 21: the light-curve book (coadd LIMMAG, forced points), or None
        self.lightcurves = lightcurves
        self.store = store
        self.refs = refs
        self.settings = settings
        self.in_background = in_background
        self.threads = threads
        self.root = Path(out) / "coadds"
        self._accs: dict[tuple, object] = {}
        self._dirty: set[tuple] = set()
        self._locks = NamedLocks()
        #: (coadd key, member id) -> what was added (bbox, data, packed good, grid), oldest
        #: first, at most ``coadd.swap_cache_mb``: a re-reduced frame's swap-out subtracts
        #: it instead of reading and resampling the old product again (issue 23)
        self._added: OrderedDict[tuple, tuple] = OrderedDict()
        self._added_bytes = 0
        self._added_guard = threading.Lock()

    # ------------------------------------------------------------------ paths and locks
    def path(self, night: str, target: str, filt: str) -> Path:

        return self.root / night / coadd_filename(target, filt)

    def lock(self, key: tuple):
        """A lock per coadd, across threads and processes (finalize beside the daemon)."""
        return self._locks.hold(key, self.root / key[0] / f".{self.path(*key).stem}.lock")

    # ------------------------------------------------------------------ grid
    def grid(self, night: str, target: str, filt: str, wcs, shape):
        """The night's grid of a coadd: stored, shared by the target's filters, or made now."""

        row = self.store.coadd(night, target, filt)
        if row is not None and row["grid_json"]:
            return CoaddGrid.from_json(row["grid_json"])
        if not self.settings.per_filter_grid:
            for other in self.store.coadds(night):
                if other["target"] == target and other["grid_json"]:
                    return CoaddGrid.from_json(other["grid_json"])
        ny, nx = shape
        ra, dec = wcs.all_pix2world([(nx - 1) / 2], [(ny - 1) / 2], 0)
        return make_grid(float(ra[0]), float(dec[0]), self.settings.pixel_scale_arcsec or None,
                         shape, wcs, self.settings.margin_arcsec)

    def _accumulator(self, key: tuple, grid):

        acc = self._accs.get(key)
        if acc is not None:
            return acc
        path = self.path(*key)
        if path.exists():
            try:
                from astropy.io import fits

                if fits.getheader(path).get("STACKTYP", "QUICKLOOK") == "QUICKLOOK":
                    acc = Accumulator.load(path, backing=self._backing(path),
                                           map_min_mb=self.settings.mmap_min_mb)
            except Exception as exc:  # unreadable quick-look: start again from the products
                log.warning("coadd_unreadable", file=path.name, problem=str(exc),
                            action="rebuilt from the reduced frames")
                acc = None
        if acc is None:
            acc = Accumulator(grid, backing=self._backing(path),
                              map_min_mb=self.settings.mmap_min_mb)
            # a fresh accumulator: every frame of this coadd must be added again
            self.store.readd_to_coadd(*key)
        self._accs[key] = acc
        return acc

    def _backing(self, path: Path) -> Path | None:
        """Where the accumulator's planes are memory-mapped (``coadd.mmap``), or None."""
        return path.parent / ".acc" if self.settings.mmap else None

    def _resample(self, sci, var, mask, wcs, grid):
        """The frame on the grid (data only: the quick-look sums need no variance)."""

        return resample(sci, None, mask, wcs, grid, step_px=self.settings.mapping_step_px,
                        interpolation=self.settings.interpolation, workers=self.threads)

    # ------------------------------------------------------------------ updates
    def remove_old(self, row) -> None:
        """Before a re-reduced product replaces the old one: take the old version out."""
        if not self.settings.enabled or row["product"] is None:
            return
        key = (row["night"], row["target"], row["filter"])
        old = member_id(row["name"], row["product_version"])
        path = self.path(*key)
        with self.lock(key):
            if key not in self._accs and not path.exists():
                return
            grid = self.grid(*key, None, None) if self.store.coadd(*key) else None
            if grid is None:
                return
            acc = self._accumulator(key, grid)
            if old not in acc:
                return
            res = self._take_added(key, old, acc.grid)
            if res is None:  # not kept (a restart, a 4k frame): resample the old product
                sci, mask, header = read_planes_for_stacking(row["product"])
                res = self._resample(sci, None, mask, header_wcs(header), acc.grid)
            acc.remove(old, res)
            # written with the new version's addition (or by flush, if it is not stacked)
            self._dirty.add(key)
            self.store.update_frame(row["id"], coadd="pending")
            log.info("coadd_swap_out", file=row["raw_name"], coadd=path.name,
                     action="old version removed; the new one follows")

    def flush(self) -> None:
        """Write the coadds changed but not yet written (a version swapped out, not back)."""
        for key in list(self._dirty):
            with self.lock(key):
                acc = self._accs.get(key)
                if acc is not None and key in self._dirty:
                    self._write(key, acc)

    def add(self, row, info: FrameInfo, frame, wcs, qc: dict, version: int) -> bool:
        """Add a reduced frame (in memory) to its coadd; returns True if it was added now."""
        if not self.settings.enabled:
            return False
        key = (info.night, info.target or "UNKNOWN", info.filter or "none")
        mid = member_id(row["name"], version)
        with self.lock(key):
            grid = self.grid(*key, wcs, frame.sci.shape)
            acc = self._accumulator(key, grid)
            if mid in acc:
                self._mark_added(key, acc, row["id"])
                return False
            grid = self._cover(key, acc, wcs, frame.sci.shape, row)
            skynoise = qc.get("skynoise_e")
            flx = qc.get("flxscale")
            if not (skynoise and skynoise > 0 and flx and flx > 0):
                self.store.update_frame(row["id"], coadd="excluded")
                return False

            try:
                res = self._resample(frame.sci, frame.var, frame.mask, wcs, grid)
            except StageDegraded as exc:  # the frame misses the night's grid of its target
                self.store.update_frame(row["id"], coadd="excluded")
                self.store.event("coadd_skipped", frame_id=row["id"],
                                        file=row["raw_name"], level="warning",
                                        message=str(exc), action="left out of the coadd")
                log.warning("coadd_skipped", file=row["raw_name"], problem=str(exc),
                            action="left out of the coadd")
                return False
            # a frame already in under an older version (crash between swap steps): replace it
            for other in [m for m in acc.members if m.startswith(row["name"] + ":v")]:
                log.warning("coadd_stale_member", file=row["raw_name"], member=other,
                            action="left in the quick-look; the final coadd is rebuilt")
            acc.add(mid, res, flxscale=flx, skynoise=skynoise, exptime_s=info.exptime_s,
                    header=frame.header)
            self._keep_added(key, mid, res, acc.grid)
            self._write(key, acc, grid=grid, frame_updates={row["id"]: {"coadd": "added"}})
        return True

    def covering(self, grid, wcs, shape, raw_name: str):
        """:func:`photowatch.coadd.stack.grown_grid` with the coadd settings: (grid, dy, dx), or
        None when ``grid`` covers the frame or the frame is too far off (said in the log)."""

        try:
            return grown_grid(grid, wcs, shape, self.settings.margin_arcsec, 4 * max(shape))
        except ValueError as exc:
            log.warning("coadd_not_grown", file=raw_name, problem=str(exc),
                        action="only the overlapping part is stacked")
            return None

    def _cover(self, key: tuple, acc, wcs, shape, row):
        """Grow the night's grid of a coadd when a frame reaches beyond it (a second
        pointing of the target, a large dither); existing pixels keep their places."""
        grown = self.covering(acc.grid, wcs, shape, row["raw_name"])
        if grown is None:
            return acc.grid
        grid, dy, dx = grown
        acc.grow(grid, dy, dx)
        self._shift_added(key, grid, dy, dx)
        log.info("coadd_grown", file=row["raw_name"], coadd=self.path(*key).name,
                 shape=list(grid.shape), action="grid enlarged to cover the frame")
        return grid

    # ------------------------------------------------------------------ swap-out cache
    def _keep_added(self, key: tuple, mid: str, res, grid) -> None:
        """Keep a member's resampling for its swap-out, within ``coadd.swap_cache_mb``.

        Kept as added (data, and ``good`` packed to bits), so the swap-out subtracts
        exactly what went in. A resampling over a quarter of the budget is not kept (a 4k
        frame's is ~70 MB: the daemon's memory at 4k does not grow); the oldest go first.
        """
        budget = int(self.settings.swap_cache_mb * 2**20)
        nbytes = res.data.nbytes + res.good.size // 8 + 1
        if budget <= 0 or nbytes > budget // 4:
            return
        entry = (tuple(res.bbox), res.data, np.packbits(res.good, axis=None),
                 res.good.shape, _grid_id(grid), nbytes)
        with self._added_guard:
            old = self._added.pop((key, mid), None)
            if old is not None:
                self._added_bytes -= old[-1]
            self._added[(key, mid)] = entry
            self._added_bytes += nbytes
            while self._added_bytes > budget:
                _, dropped = self._added.popitem(last=False)
                self._added_bytes -= dropped[-1]

    def _take_added(self, key: tuple, mid: str, grid):
        """The kept resampling of a member on ``grid`` (removed from the cache), or None."""
        from photowatch.coadd.resample import Resampled

        with self._added_guard:
            entry = self._added.pop((key, mid), None)
            if entry is None:
                return None
            self._added_bytes -= entry[-1]
        bbox, data, packed, shape, grid_id, _ = entry
        if grid_id != _grid_id(grid):
            return None
        good = np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).view(bool)
        return Resampled(bbox=bbox, data=data, var=None, good=good)

    def _shift_added(self, key: tuple, grid, dy: int, dx: int) -> None:
        """The grid of a coadd grew: its kept members' pixels moved by (dy, dx)."""
        new_id = _grid_id(grid)
        with self._added_guard:
            for k, (bbox, data, packed, shape, _, nbytes) in list(self._added.items()):
                if k[0] == key:
                    y0, y1, x0, x1 = bbox
                    self._added[k] = ((y0 + dy, y1 + dy, x0 + dx, x1 + dx), data, packed,
                                      shape, new_id, nbytes)

    def _mark_added(self, key, acc, frame_id) -> None:
        self.store.update_frame(frame_id, coadd="added")

    def _write(self, key: tuple, acc, *, grid=None, frame_updates=None) -> None:
        self._dirty.discard(key)
        night, target, filt = key
        path = self.path(*key)
        magzp = self._magzp(key)
        header = {"TARGET": target, "FILTNAME": filt, "NIGHT": night,
                  "ABSCAL": (magzp is not None, "MAGZP from a reference catalogue")}
        # the quick-look coadd is not fsynced: the rename keeps it whole, and if a power
        # cut loses it the engine rebuilds it from the reduced frames (its members are
        # queued again when the file is unreadable)
        # issue 21: LIMMAG into the header, forced photometry at the targets (after the row)
        book = self.lightcurves
        depth = book.coadd_hook(key, acc, header, magzp) if book is not None else {}
        acc.write(path, magzp=magzp, header_extra=header, fsync=False)
        png = None
        if self.settings.quicklook_png:

            png = path.with_suffix(".png")
            sci = acc.images(byteorder=">")[0].copy()  # later adds change the cache
            self.in_background(save_png, sci, png, max_size=1024)
        members = sorted(acc.members)
        self.store.upsert_coadd(
            night=night, target=target, filter=filt, path=str(path), stacktype="QUICKLOOK",
            ncombine=len(acc), exptime=acc.exptime_s, magzp=magzp,
            grid=(grid or acc.grid).to_dict(), members=members,
            quicklook=str(png) if png else None, frame_updates=frame_updates)
        if book is not None:
            book.after_coadd(key, acc, path, magzp, depth)

    def _magzp(self, key: tuple) -> float | None:
        ref = self.refs.get(key[0], key[1], key[2], "zpref")
        if ref is not None and "zp" in ref.meta:
            return float(ref.meta["zp"])
        return None

    # ------------------------------------------------------------------ pending
    def process_pending(self, nights=None) -> bool:
        """Add one frame whose coadd update was interrupted (crash, restart); False if none."""
        store = self.store
        row = store.claim_coadd_pending(nights)
        if row is None:
            return False
        try:

            info = FrameInfo.from_summary(json.loads(row["info_json"]))
            prod = read_product(row["product"])

            frame = Frame(prod.sci, prod.var, prod.mask, prod.header, info)
            qc = json.loads(row["qc_json"] or "{}")
            self.add(row, info, frame, header_wcs(prod.header), qc, row["product_version"])
        except Exception as exc:
            store.update_frame(row["id"], coadd="excluded")
            log.error("coadd_add_failed", file=row["raw_name"], problem=str(exc),
                      action="left out of the quick-look coadd")
        return True


def _grid_id(grid) -> str:
    return json.dumps(grid.to_dict(), sort_keys=True)


