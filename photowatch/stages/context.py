"""The night as the science chain sees it: one immutable value in, updates out.

:class:`NightContext` carries what a frame's stages may read of the night
(masters, the master-sky view, field references, earlier solutions, the
catalogue, the night's quality peers, settings); :class:`Update` is what a frame
changes in the night, returned by the stages and applied by the engine
(:meth:`photowatch.run.engine.Engine.apply_update`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from photowatch.core.classify import FrameInfo
from photowatch.core.config import Settings
from photowatch.core.frame import MasterImage
from photowatch.core.instruments import Profile


@dataclass(frozen=True)
class Update:
    """A change a frame makes to the night, applied by the engine after the chain ran.

    ``kind``: ``sky`` (add the frame's pattern to its master-sky accumulator),
    ``sky_used`` (keep the block means of the sky it was reduced with), ``stale``
    (mark frames reduced with an older master stale), ``solution`` (remember the
    field's solution), ``field`` (claim a new field reference: ``claim`` True), ``zpref``
    (set the zero-point reference unless one exists: ``claim`` True). A claim that
    another frame won meanwhile makes the engine run the frame again against the winner.
    """

    kind: str
    args: dict
    claim: bool = False


@dataclass(frozen=True)
class NightContext:
    """What the chain may know of the night, as one immutable value.

    Callables here only read (the catalogue provider memoises its queries).
    """

    settings: Settings
    info: FrameInfo
    profile: Profile
    frame_id: int
    member: str  #: the product name (member of the master sky and of the coadd)
    masters: Mapping[str, MasterImage] = field(default_factory=dict)
    bpm: np.ndarray | None = None
    #: (member, info, pattern) -> the master sky without ``member``, or None
    sky_view: Callable | None = None
    #: the night's field references (read: ``get``/``near``)
    refs: object | None = None
    #: the field's earlier solutions near any pointing: tuple of (ra, dec, AstrometryResult)
    solutions: tuple = ()
    #: (info, profile, wcs0, shape) -> (reference Table or None, catalogue name or None)
    reference_stars: Callable | None = None
    #: this frame's quick-look solution (WCS, status) when finalize re-reduces it, or None
    quicklook: tuple | None = None
    #: the night's other object frames' quality numbers (:class:`photowatch.stages.quality.Peer`)
    peers: tuple = ()
    #: kind -> the master's record (Candidate) of ``masters``: what the store says was used
    master_records: Mapping = field(default_factory=dict)
    #: the key (``text``, ``night``) of this frame's master sky
    sky_key: object | None = None
