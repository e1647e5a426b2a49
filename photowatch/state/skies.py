"""Master-sky accumulators of a night: one per filter (and target, PhotoPipe's skyflattarg).

State lives in ``OUT/masters/<night>/.state/sky_<FILTER>[_<TARGET>]_<CAM>.npz``
and lists its members, so a restart continues and a frame is never added
twice. At finalize the accumulated sky is written as a final master
(``sky_<FILTER>[_<TARGET>]_<CAM>.fits``) and recorded in the store.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from photowatch.calib.drift import block_mean
from photowatch.core.classify import FrameInfo
from photowatch.core.config import Settings
from photowatch.core.frame import MasterImage
from photowatch.io.fits import save_npz
from photowatch.stages.mastersky import SkyAccumulator, SkyPattern
from photowatch.state.masters import MasterBook, MasterKey


class SkyBook:
    def __init__(self, book: MasterBook, settings: Settings):
        self.book = book
        self.settings = settings.stages.mastersky
        self._cache: dict[str, SkyAccumulator] = {}
        self._guard = threading.Lock()

    def key(self, info: FrameInfo) -> MasterKey:
        return MasterKey.for_frame("sky", info, target=(info.target or "") if
                                   self.settings.per_target else "")

    def _path(self, key: MasterKey) -> Path:
        return self.book.root / key.night / ".state" / f"{key.slug(long=True)}.npz"

    def _load(self, key: MasterKey) -> SkyAccumulator:
        cached = self._cache.get(key.text)
        if cached is not None:
            return cached
        path = self._path(key)
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                acc = SkyAccumulator.from_state({k: z[k] for k in z.files})
        else:
            acc = SkyAccumulator()
        self._cache[key.text] = acc
        return acc

    def view(self, member: str, info: FrameInfo, pattern: SkyPattern) -> MasterImage | None:
        """The master sky without ``member`` (whose ``pattern`` is given), if usable; reads
        only. The accumulator stays cached until :meth:`add` (the frame's next step) takes
        its contribution, so the state file is read once per frame."""
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
            acc = self._load(key)
            added = acc.add(member, pattern, pointing)
            if added:
                save_npz(self._path(key), fsync=False, **acc.state())
            # not kept between frames: the state file (written above) is the accumulator,
            # and two 4k filters' sums held for the night cost 320 MB (issue 23)
            self._cache.pop(key.text, None)
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
        path = self._path(self.key(info))
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            acc = SkyAccumulator.from_state({k: z[k] for k in z.files})
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
        for path in sorted(folder.glob("sky_*.npz")):
            with np.load(path, allow_pickle=False) as z:
                acc = SkyAccumulator.from_state({k: z[k] for k in z.files})
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
