"""Finalize's persistent-defect step: reads the night's product masks, asks
:func:`photowatch.calib.defects.persistent_defects` which pixels are defects, and
writes them into the products' MASK and the night's bad-pixel mask.

The pure rule stays in ``calib/``; the reading and writing live here, with the
other finalize steps that touch the store and the product folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from astropy.io import fits

from photowatch.calib.defects import BAD, COSMIC, persistent_defects
from photowatch.core.logs import get_logger
from photowatch.io.fits import write_hdul

log = get_logger("photowatch.calib")


def mark_night_defects(engine, night: str) -> list[str]:
    """Find each camera's persistent defects of the night, add them to its bad-pixel mask
    and to its products' MASK (COSMIC -> BAD); returns lines for the finalize report."""
    # the same products as when this last ran to the end (a second finalize): their masks
    # were read then and their defects marked; reading every MASK again costs ~1 s at 4k
    seen_key = f"defects:{night}"
    if engine.store.get_meta(seen_key) == _fingerprint(engine, night):
        return []
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
    engine.store.set_meta(seen_key, _fingerprint(engine, night))
    return done


def _fingerprint(engine, night: str) -> list:
    """The night's products (name, version, and whether the file is there): a product's
    MASK changes only when it is reduced again (a new version) or by this pass. No file
    times: a reprocessed night's store must equal the one reduce and finalize leave."""
    return sorted([row["name"], row["product_version"], Path(row["product"]).exists()]
                  for row in engine.store.products_of_night(night))
