"""Master-sky accumulators of a night: one per filter (and target, PhotoPipe's skyflattarg).

State lives in ``OUT/masters/<night>/.state/``: ``<stem>.json`` (``stem`` =
``sky_<FILTER>[_<TARGET>]_<CAM>``) lists the members and their pointings and names
the generation ``g`` of the sums, ``<stem>.g<g>.{sum,sumvar,count}.npy``. A frame's
add writes the next generation's sums, then replaces the JSON (the commit), then
deletes the old sums: a crash at any point leaves one complete state, a restart
continues and a frame is never added twice. The sums are read memory-mapped, so a
frame's view of its master sky costs page mappings, not a read and two copies of
the state (0.1-0.4 s CPU per 4k frame with the former ``<stem>.npz``, which is
still read when no JSON exists). At finalize the accumulated sky is written as a
final master (``sky_<FILTER>[_<TARGET>]_<CAM>.fits``) and recorded in the store.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import numpy as np

from photowatch.calib.drift import block_mean
from photowatch.core.classify import FrameInfo
from photowatch.core.config import Settings
from photowatch.core.frame import MasterImage
from photowatch.io.fits import atomic_write
from photowatch.stages.mastersky import SkyAccumulator, SkyPattern
from photowatch.state.masters import MasterBook, MasterKey


class SkyBook:
    def __init__(self, book: MasterBook, settings: Settings):
        self.book = book
        self.settings = settings.stages.mastersky
        self._cache: dict[str, SkyAccumulator] = {}  # nothing held (see _load); the
        # engine's memory report still lists it
        self._guard = threading.Lock()

    def key(self, info: FrameInfo) -> MasterKey:
        return MasterKey.for_frame("sky", info, target=(info.target or "") if
                                   self.settings.per_target else "")

    def _path(self, key: MasterKey) -> Path:
        """The state's manifest (members, pointings, generation of the sums)."""
        return self.book.root / key.night / ".state" / f"{key.slug(long=True)}.json"

    def _load(self, key: MasterKey) -> SkyAccumulator:
        """What the state file says now, its sums mapped (nothing is kept between calls:
        two 4k filters' sums held for the night cost 320 MB, issue 23)."""
        return read_state(self._path(key))

    def view(self, member: str, info: FrameInfo, pattern: SkyPattern) -> MasterImage | None:
        """The master sky without ``member`` (whose ``pattern`` is given), if usable; reads
        only (the sums are mapped, so this costs page mappings, not a read)."""
        if not self.settings.enabled:
            return None
        key = self.key(info)
        with self.book.lock(key.slug(long=True), key.night):
            acc = self._load(key)
            usable = acc.n_dithered(self.settings.min_dither_arcsec, exclude=member)
            if usable < self.settings.min_frames:
                return None
            n = len(acc.members) - (1 if member in acc.members else 0)
            return acc.master(exclude=member, pattern=pattern, label=f"{key.slug()} (n={n})")

    def add(self, member: str, info: FrameInfo, pattern: SkyPattern,
            pointing: tuple[float, float]) -> bool:
        """Add a frame's pattern to its accumulator (once); True if it was added now."""
        if not self.settings.enabled:
            return False
        key = self.key(info)
        with self.book.lock(key.slug(long=True), key.night):
            acc = self._load(key)  # as the file says now: another frame may have been added
            added = acc.accepts(member, pattern)
            if added:
                write_state(self._path(key), acc, member, pattern, pointing)
            return added

    def _used_path(self, key: MasterKey, member: str) -> Path:
        return self.book.root / key.night / ".state" / "skyused" / key.slug(long=True) / \
            f"{member}.npy"

    def save_used(self, member: str, info: FrameInfo, sky: MasterImage) -> None:
        """Keep the block means of the sky a frame was reduced with (64 kB at 4k).

        finalize compares them with the final sky to decide whether the frame
        needs re-reducing (:mod:`photowatch.calib.drift`)."""
        path = self._used_path(self.key(info), member)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, block_mean(sky.data))
        tmp.replace(path)

    def used_blocks(self, member: str, info: FrameInfo) -> np.ndarray | None:
        """The block means saved by :meth:`save_used`, or None."""
        path = self._used_path(self.key(info), member)
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None

    def final_sky(self, info: FrameInfo) -> tuple[SkyAccumulator, np.ndarray] | None:
        """The night's sky accumulator of ``info``'s key and the block means of its master
        sky (all members), or None when there is none."""
        acc = read_state(self._path(self.key(info)))
        if acc.sum is None:
            return None
        master = acc.master()
        return None if master is None else (acc, block_mean(master.data))

    def usable_for(self, acc: SkyAccumulator, member: str) -> bool:
        """Whether re-reducing ``member`` would use a master sky (leave-one-out rule)."""
        return acc.n_dithered(self.settings.min_dither_arcsec, exclude=member) >= \
            self.settings.min_frames

    def members(self, info: FrameInfo) -> list[str]:
        key = self.key(info)
        with self.book.lock(key.slug(long=True), key.night):
            return list(self._load(key).members)

    def finalize(self, night: str) -> list:
        """Write each usable accumulated sky of a night as a final master; returns candidates."""
        made = []
        folder = self.book.root / night / ".state"
        if not folder.is_dir():
            return made
        stems = {p.stem for p in folder.glob("sky_*.json")}
        stems |= {p.stem for p in folder.glob("sky_*.npz")}  # written before the .npy state
        for stem in sorted(stems):
            acc = read_state(folder / f"{stem}.json")
            if not acc.members:
                continue
            rows = self.book.store.frames(name=list(acc.members))
            if not rows:
                continue
            info = FrameInfo.from_summary(json.loads(rows[0]["info_json"]))
            key = self.key(info)
            existing = self.book.store.masters(
                kind="sky", camera=key.camera, filter=key.filter, binning=key.binning,
                readout=key.readout, target=key.target, night=key.night, final=1)
            if existing and existing[-1]["ninputs"] == len(acc.members):
                continue
            if acc.n_dithered(self.settings.min_dither_arcsec) < self.settings.min_frames:
                continue
            master = acc.master(label=key.slug())
            if master is None:
                continue
            ids = [r["id"] for r in rows]
            version = self.book._next_version(key)
            cand = self.book._publish(
                key, version, master.data, master.var, acc.count, ids, final=True,
                method="masked mean of dithered object frames, sources masked",
                obs_time=max(r["obs_time"] for r in rows))
            made.append(cand)
        return made


# ---------------------------------------------------------------------------- state files

_PLANES = (("sum", np.float32), ("sumvar", np.float32), ("count", np.uint16))
#: rows per strip of a state write (bounded temporaries: 16 MB a plane at 4k)
_STRIP_ROWS = 1024


def _plane_path(manifest: Path, generation: int, plane: str) -> Path:
    return manifest.with_name(f"{manifest.stem}.g{generation}.{plane}.npy")


def read_state(manifest: Path) -> SkyAccumulator:
    """The accumulator of a state manifest, its sums memory-mapped read-only (an empty
    one when there is no state; the former single ``.npz`` when only it exists).

    A reader without the book's lock (finalize) may find the generation it read
    replaced by the next one before it maps it: it reads the manifest again."""
    for attempt in range(4):
        try:
            meta = json.loads(manifest.read_text())
        except FileNotFoundError:
            legacy = manifest.with_suffix(".npz")
            if not legacy.exists():
                return SkyAccumulator()
            with np.load(legacy, allow_pickle=False) as z:
                return SkyAccumulator.from_state({k: z[k] for k in z.files})
        acc = SkyAccumulator(members=[str(m) for m in meta["members"]],
                             pointings=[(float(ra), float(dec)) for ra, dec in meta["pointings"]])
        if meta.get("generation") is None:
            return acc
        try:
            # plain read-only arrays over the mappings (what is computed from them is no
            # memmap)
            acc.sum, acc.sumvar, acc.count = (
                np.load(_plane_path(manifest, meta["generation"], plane), mmap_mode="r",
                        allow_pickle=False).view(np.ndarray) for plane, _ in _PLANES)
        except FileNotFoundError:
            if attempt == 3:
                raise
            continue
        return acc
    raise AssertionError("unreachable")


def write_state(manifest: Path, acc: SkyAccumulator, member: str, pattern: SkyPattern,
                pointing: tuple[float, float]) -> None:
    """Write ``acc`` + ``pattern`` as the next generation of the state (``acc`` is not
    changed): the sums strip by strip into new files, then the manifest atomically (the
    commit), then the old generation's files go (a mapping of them stays valid)."""
    folder = manifest.parent
    folder.mkdir(parents=True, exist_ok=True)
    generation = len(acc.members) + 1
    old = dict(zip(("sum", "sumvar", "count"), (acc.sum, acc.sumvar, acc.count)))
    new = dict(zip(("sum", "sumvar", "count"), (pattern.data, pattern.var, pattern.valid)))
    shape = pattern.data.shape
    for plane, dtype in _PLANES:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                  "fortran_order": False, "shape": shape}
        with open(_plane_path(manifest, generation, plane), "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            for r0 in range(0, shape[0], _STRIP_ROWS):
                rows = slice(r0, r0 + _STRIP_ROWS)
                strip = new[plane][rows].astype(dtype)
                if old[plane] is not None:
                    strip += old[plane][rows]
                fh.write(memoryview(np.ascontiguousarray(strip)).cast("B"))
    meta = {"generation": generation, "members": [*acc.members, member],
            "pointings": [[float(v) for v in p] for p in [*acc.pointings, pointing]]}
    atomic_write(manifest, lambda fh: fh.write(json.dumps(meta).encode()), fsync=False)
    for path in folder.glob(f"{manifest.stem}.g*.npy"):  # older (or orphaned) generations
        if not path.name.startswith(f"{manifest.stem}.g{generation}."):
            with contextlib.suppress(OSError):
                path.unlink()
    with contextlib.suppress(OSError):
        manifest.with_suffix(".npz").unlink()
