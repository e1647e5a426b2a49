"""The real RATIR night (issue 17): per frame FWHM, APCOR (APCORERR, APCORN), FLXSCALE
and the dimming plain fixed-aperture photometry of the same bright stars gives.

Usage::

    .venv/bin/python benchmarks/ratir_photometry.py OUT   # OUT: after `photowatch reduce`
                                                          # (and finalize) of a copy of
                                                          # ../shared/data/ratir-2013-07-16
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from astropy.wcs import WCS

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]

from shared_data import RATIR  # noqa: E402
from test_ratir_night import _plain_photometry  # noqa: E402

from photowatch.core.instruments import load_profile  # noqa: E402
from photowatch.io.products import read_product  # noqa: E402
from photowatch.stages.zeropoint import match_sky  # noqa: E402
from photowatch.state.store import Store  # noqa: E402


def main(out: Path) -> None:
    trim = load_profile("ratir").cameras["C1"]["trimsec"].strip("[]").split(",")
    x0, y0 = (int(t.split(":")[0]) - 1 for t in trim)
    plain = _plain_photometry(RATIR)
    rows = Store(out / "state.sqlite").frames(kind="object", state="reduced")
    sky = {}
    for r in rows:
        h = read_product(r["product"]).header
        xyf = plain[r["raw_name"]]
        ra, dec = WCS(h).all_pix2world(xyf[:, 0] - x0, xyf[:, 1] - y0, 0)
        sky[r["raw_name"]] = (ra, dec, xyf[:, 2], h, json.loads(r["qc_json"]))
    print(f"{'frame':28s} {'FWHM':>6s} {'APCOR':>7s} {'err':>6s} {'N':>3s} {'own':>7s} "
          f"{'FLXSCALE mag':>12s} {'plain mag':>9s} {'diff':>6s} {'stars':>5s}")
    for name, (ra, dec, flux, h, qc) in sky.items():
        ref = next(k for k in sky if Path(k).name.split(".")[0] in str(h.get("FLXREF", "")))
        ia, ib = match_sky(ra, dec, sky[ref][0], sky[ref][1], 1.5)
        plain_mag = float(np.median(-2.5 * np.log10(sky[ref][2][ib] / flux[ia])))
        pw = -2.5 * np.log10(h["FLXSCALE"])
        print(f"{name:28s} {h['FWHM']:6.3f} {h['APCOR']:7.4f} {h['APCORERR']:6.4f} "
              f"{h['APCORN']:3d} {qc.get('apcor_own') or float('nan'):7.4f} {pw:12.3f} "
              f"{plain_mag:9.3f} {pw - plain_mag:6.3f} {ia.size:5d}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
