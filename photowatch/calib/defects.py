"""Persistent defects: pixels flagged as cosmic rays at the same place in most frames.

A cosmic ray never strikes the same pixel in most frames of a night; a pixel that
has the COSMIC bit (4) in most of them is a defect the bad-pixel mask missed (a warm
pixel below the dark's hot cut, a trap, a residue beside a bad column). Finalize
(:func:`mark_night_defects`) adds such pixels to the night's bad-pixel mask
(``masters/<night>/bpm_<camera>.fits``), turns their COSMIC bit into BAD in the
night's products, and reports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from photowatch.core.logs import get_logger

log = get_logger("photowatch.calib")

COSMIC, BAD = 4, 1


def persistent_defects(masks, *, min_fraction: float = 0.6, min_frames: int = 3
                       ) -> np.ndarray | None:
    """Pixels with the COSMIC bit in at least ``min_fraction`` of the masks (and in at
    least ``min_frames`` of them); None with fewer than ``min_frames`` masks of one shape."""
    masks = list(masks)
    if len(masks) < min_frames or len({m.shape for m in masks}) != 1:
        return None
    count = np.zeros(masks[0].shape, np.int32)
    for m in masks:
        count += (np.asarray(m) & COSMIC) != 0
    need = max(min_frames, int(np.ceil(min_fraction * len(masks))))
    return count >= need


def mark_night_defects(engine, night: str) -> list[str]:
    """Find each camera's persistent defects of the night, add them to its bad-pixel mask
    and to its products' MASK (COSMIC -> BAD); returns lines for the finalize report."""
    from astropy.io import fits

    from photowatch.io.fits import write_hdul

    groups: dict[tuple, list] = {}
    for row in engine.store.products_of_night(night):
        info = json.loads(row["info_json"] or "{}")
        key = (info.get("camera"), info.get("binning"), info.get("readout"))
        if Path(row["product"]).exists():
            groups.setdefault(key, []).append(Path(row["product"]))
    done = []
    for (camera, _, _), paths in groups.items():
        masks = [fits.getdata(p, "MASK") for p in paths]
        found = persistent_defects(masks)
        if found is None or not found.any():
            continue
        n = int(found.sum())
        for p, m in zip(paths, masks):
            hit = found & ((m & COSMIC) != 0)
            if not hit.any():
                continue
            with fits.open(p) as hdul:
                hdul = fits.HDUList([h.copy() for h in hdul])
            new = hdul["MASK"].data.copy()
            new[hit] = (new[hit] & ~np.uint16(COSMIC)) | np.uint16(BAD)
            hdul["MASK"].data = new
            write_hdul(p, hdul)
        bpm_path = engine.book.root / night / f"bpm_{camera}.fits"
        if bpm_path.exists():
            with fits.open(bpm_path) as h:
                bpm, hdr = h[0].data.astype(np.uint8), h[0].header.copy()
        else:
            bpm, hdr = np.zeros(found.shape, np.uint8), fits.Header()
            hdr["CAMERA"] = camera
        if bpm.shape == found.shape:
            bpm[found] = 1
            hdr["NDEFECT"] = (n, "persistent defects added at finalize (COSMIC in most frames)")
            bpm_path.parent.mkdir(parents=True, exist_ok=True)
            write_hdul(bpm_path, fits.HDUList([fits.PrimaryHDU(bpm, hdr)]))
        ys, xs = np.nonzero(found)
        where = ", ".join(f"({x},{y})" for x, y in zip(xs[:5].tolist(), ys[:5].tolist()))
        line = (f"camera {camera}: {n} persistent defect pixel(s) flagged as cosmic rays in "
                f"most of {len(paths)} frames, added to the bad-pixel mask: {where}"
                + (" ..." if n > 5 else ""))
        log.warning("persistent_defects", camera=camera, night=night, npix=n,
                    frames=len(paths), problem="flagged as cosmic rays in most frames",
                    action="added to the bad-pixel mask; MASK bit 4 -> 1")
        done.append(line)
    return done
