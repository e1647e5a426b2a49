"""master sky: the night's residual illumination from dithered object frames (PhotoPipe's makesky).

Twilight flats leave a residual large-scale illumination (and fringing) in
science frames. The master sky is built from the night's dithered object
frames of a filter (and target, PhotoPipe's ``skyflattarg``), each with its
sources masked and divided by its own sky level, combined as a masked mean;
it is applied as PhotoPipe does: ``sci − level × S``, where ``level`` is the
frame's sky level and ``S`` the master sky (mean 1).

Incremental: :class:`SkyAccumulator` keeps masked sums; adding a frame costs
O(pixels). A frame is corrected with the master sky *without its own
contribution* (leave one out), so its own noise and sources are never
subtracted from it. The master sky is used only with at least ``min_frames``
frames at pointings ``min_dither_arcsec`` apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from photowatch.core.config import MasterSky
from photowatch.core.errors import StageFailed
from photowatch.core.frame import Frame, Mask, MasterImage
from photowatch.core.rowstats import median
from photowatch.core.schema import set_key
from photowatch.stages.skysub import source_mask

_UNUSABLE = int(Mask.BAD | Mask.SATURATED | Mask.NODATA | Mask.LOWFLAT | Mask.COSMIC)


@dataclass(frozen=True)
class SkyPattern:
    """One frame's contribution: its normalised sky with sources masked."""

    data: np.ndarray  #: float32, sky / level (0 where not valid)
    var: np.ndarray  #: float32, variance of ``data``
    valid: np.ndarray  #: bool
    level: float  #: the frame's median sky level (e-)
    sources: np.ndarray  #: bool source mask (reused by sky subtraction)


def sky_pattern(frame: Frame, *, settings: MasterSky, mesh_px: int = 64) -> SkyPattern:
    """Mask sources, normalise by the sky level: the frame's contribution to the master sky."""
    sources = source_mask(frame, detect_sigma=settings.detect_sigma,
                          dilate_px=settings.dilate_px, mesh_px=mesh_px)
    valid = ~sources & ((frame.mask & _UNUSABLE) == 0)
    sample = frame.sci[valid]
    if sample.size > 500_000:
        sample = sample[:: sample.size // 500_000]
    # np.median(sample), the same number (one partition of the copy made above)
    level = median(sample, overwrite=sample.base is None) if sample.size else float("nan")
    if not np.isfinite(level) or level <= 0:
        return SkyPattern(np.zeros_like(frame.sci), np.zeros_like(frame.var),
                          np.zeros(frame.sci.shape, bool), level, sources)
    inv = np.float32(1.0 / level)
    data = np.where(valid, frame.sci * inv, 0).astype(np.float32, copy=False)
    var = np.where(valid, frame.var * (inv * inv), 0).astype(np.float32, copy=False)
    return SkyPattern(data, var, valid, level, sources)


@dataclass
class SkyAccumulator:
    """Masked sums of sky patterns; persisted with :meth:`state` / :meth:`from_state`."""

    sum: np.ndarray | None = None
    sumvar: np.ndarray | None = None
    count: np.ndarray | None = None
    members: list[str] = field(default_factory=list)
    pointings: list[tuple[float, float]] = field(default_factory=list)

    def accepts(self, member: str, pattern: SkyPattern) -> bool:
        """Whether :meth:`add` would take this frame: not in yet, and some valid pixels."""
        return member not in self.members and bool(pattern.valid.any())

    def add(self, member: str, pattern: SkyPattern, pointing: tuple[float, float]) -> bool:
        """Add a frame's pattern once; returns False if it was already in."""
        if not self.accepts(member, pattern):
            return False
        if self.sum is None:
            self.sum = np.zeros(pattern.data.shape, np.float32)
            self.sumvar = np.zeros(pattern.data.shape, np.float32)
            self.count = np.zeros(pattern.data.shape, np.uint16)
        self.sum += pattern.data
        self.sumvar += pattern.var
        self.count += pattern.valid
        self.members.append(member)
        self.pointings.append(pointing)
        return True

    def n_dithered(self, min_sep_arcsec: float, exclude: str | None = None) -> int:
        """Number of member pointings at least ``min_sep_arcsec`` from each other (greedy)."""
        chosen: list[tuple[float, float]] = []
        for member, (ra, dec) in zip(self.members, self.pointings):
            if member == exclude or not (np.isfinite(ra) and np.isfinite(dec)):
                continue
            ok = True
            for ra2, dec2 in chosen:
                dra = (ra - ra2) * np.cos(np.radians(dec))
                if np.hypot(dra, dec - dec2) * 3600 < min_sep_arcsec:
                    ok = False
                    break
            if ok:
                chosen.append((ra, dec))
        return len(chosen)

    def master(self, *, exclude: str | None = None, pattern: SkyPattern | None = None,
               label: str = "") -> MasterImage | None:
        """The master sky (mean 1), leaving out ``exclude`` whose ``pattern`` is given."""
        if self.sum is None:
            return None
        # in place on four planes (the same numbers as the plain expressions, a third of
        # their memory: this runs for every frame, beside a cosmic-ray pass at 4k)
        leave_out = exclude is not None and exclude in self.members and pattern is not None
        nn = self.count.astype(np.float32)
        if leave_out:
            np.subtract(nn, pattern.valid, out=nn)
        good = nn > 0
        np.maximum(nn, 1, out=nn)
        data = np.subtract(self.sum, pattern.data) if leave_out else self.sum.copy()
        data /= nn
        data[~good] = np.nan
        var = np.subtract(self.sumvar, pattern.var) if leave_out else self.sumvar.copy()
        np.maximum(var, 0, out=var)
        nn *= nn
        var /= nn
        del nn
        var[~good] = 0
        norm = np.nanmedian(data[:: max(1, data.shape[0] // 256), :: max(1, data.shape[1] // 256)])
        if not np.isfinite(norm) or norm <= 0:
            return None
        data /= np.float32(norm)
        var /= np.float32(norm * norm)
        # pixels never seen as sky (a bright star at the same place in every frame): no correction
        data[~good] = 1.0
        nframes = len(self.members) - (1 if exclude in self.members else 0)
        return MasterImage(kind="sky", data=data, var=var, label=label, version=nframes)

    def state(self) -> dict:
        out = {"members": np.array(self.members, dtype=str),
               "pointings": np.array(self.pointings, dtype=float).reshape(-1, 2)}
        if self.sum is not None:
            out.update(sum=self.sum, sumvar=self.sumvar, count=self.count)
        return out

    @classmethod
    def from_state(cls, state) -> SkyAccumulator:
        obj = cls(members=[str(m) for m in state["members"]],
                  pointings=[tuple(p) for p in np.asarray(state["pointings"]).reshape(-1, 2)])
        if "sum" in state:
            obj.sum = np.array(state["sum"], np.float32)
            obj.sumvar = np.array(state["sumvar"], np.float32)
            obj.count = np.array(state["count"], np.uint16)
        return obj


def apply_master_sky(frame: Frame, *, sky: MasterImage, level: float) -> Frame:
    """``sci − level × S``; the variance gains ``level² var_S``."""
    if sky.data.shape != frame.sci.shape:
        raise StageFailed(f"master sky {sky.label} has shape {sky.data.shape}, "
                          f"the frame {frame.sci.shape}")
    lev = np.float32(level)
    sci = frame.sci - lev * sky.data
    var = frame.var + (lev * lev) * sky.var
    hdr = frame.header.copy()
    set_key(hdr, "MSKY", sky.label, "master sky used")
    hdr["MSKYV"] = (sky.version, "frames in the master sky")
    hdr["SKYPRE"] = (round(level, 3), "[electron] sky level removed with the master sky")
    return frame.replace(sci=sci.astype(np.float32), var=var.astype(np.float32), header=hdr)
