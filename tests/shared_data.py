"""Where the real RATIR night lives, for the tests that use it (read-only; tests copy it).

``PHOTOWATCH_RATIR_DATA`` names it explicitly; else ``../shared/data/ratir-2013-07-16``
next to this checkout; else the shared folder of the development machine. Tests that
need it skip when none exists, so a clone elsewhere still runs the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

_NAME = "ratir-2013-07-16"


def _find() -> Path:
    env = os.environ.get("PHOTOWATCH_RATIR_DATA")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "data" / _NAME,
                   Path("/work/shared/data") / _NAME]
    for path in candidates:
        if path.is_dir():
            return path
    return candidates[0]


RATIR = _find()


def wcs_grid_rms_px(solved, truth, shape, step: int = 16) -> float:
    """rms (px) of where ``solved`` puts the sky positions ``truth`` gives a grid of pixels:
    the whole frame, not only the matched stars."""
    import numpy as np

    ny, nx = shape
    yy, xx = np.mgrid[0:ny:step, 0:nx:step]
    ra, dec = truth.all_pix2world(xx.ravel(), yy.ravel(), 0)
    x, y = solved.all_world2pix(ra, dec, 0)
    return float(np.sqrt(np.mean((x - xx.ravel()) ** 2 + (y - yy.ravel()) ** 2)))


def copy_output(out, work):
    """A copy of an output folder whose store names the copy's files (products, coadds,
    masters), so a test can finalize or requeue it without touching the original.
    Returns the copy's Store."""
    import shutil

    from photowatch.state.store import Store

    shutil.copytree(out, work)
    store = Store(work / "state.sqlite")
    with store.transaction() as conn:
        for table, cols in (("frames", ("product", "quicklook")),
                            ("coadds", ("path", "catalog", "quicklook")),
                            ("masters", ("path",))):
            for col in cols:
                conn.execute(f"UPDATE {table} SET {col}=REPLACE({col}, ?, ?)",
                             (str(out), str(work)))
    return store
