"""Figures of how SExtractor and SWarp read photowatch's products, on simulated nights.

    .venv/bin/python tools/interop_figures.py [--seeds 47 48 49] [--work DIR]

For each seed: a 512x512 night (4 science frames) is reduced with its catalogue and
finalized; SExtractor runs on every reduced frame's SCI with the header keywords
alone (GAIN, SATURATE; MAG_ZEROPOINT = MAGZP; aperture = CAT's APRAD), SWarp stacks
two products onto the coadd's grid. Prints per seed: matched stars, median
MAG_APER - CAT aperture mag, median MAGERR_APER / CAT error, median position offset
(px, CAT x/y as written), median MAG_AUTO - CAT mag, and SWarp's median star offset
from photowatch's coadd (px). The same as tests/test_interop.py, over more seeds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[47, 48, 49])
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    import subprocess

    import sep
    from astropy.io import fits
    from astropy.table import Table
    from scipy.spatial import cKDTree
    from test_interop import SWARP, run_sextractor

    from photowatch.core.config import Settings
    from photowatch.run.batch import reduce_directory
    from photowatch.run.finalize import finalize
    from photowatch.sim.night import simulate_night
    from photowatch.state.store import Store

    work = args.work or Path(tempfile.mkdtemp(prefix="interop_"))
    print("seed  nstar  dMAG_APER  err_ratio  dpos_px  dMAG_AUTO  swarp_dx  swarp_dy")
    for seed in args.seeds:
        root = work / f"seed{seed}"
        sim = simulate_night(root / "sim", size=512, binning=4, filters=("SDSS-R",), seed=seed,
                             n_bias=3, n_dark=2, n_flat=4, n_science=4)
        settings = Settings().with_overrides(paths={"output_dir": str(root / "out")})
        reduce_directory(sim.raw_dir, settings, catalog=str(sim.catalog_path), progress=False)
        finalize(settings)
        store = Store(root / "out" / "state.sqlite")
        rows = store.frames(kind="object", state="reduced")
        dmag, ratio, dpos, dauto = [], [], [], []
        for row in rows:
            path = row["product"]
            hdr = fits.getheader(path, "SCI")
            cat = Table.read(path, hdu="CAT")
            aprad = fits.getheader(path, "CAT")["APRAD"]
            sx = run_sextractor(f"{path}[1]", root, hdr["MAGZP"], 2 * aprad)
            d, i = cKDTree(np.c_[sx["XWIN_IMAGE"], sx["YWIN_IMAGE"]]).query(
                np.c_[cat["x"], cat["y"]])
            ok = ((d < 1) & (cat["flags"] == 0) & cat["stellar"] & (cat["snr"] > 30)
                  & (sx["FLAGS"][i] == 0))
            m, c = sx[i[ok]], cat[ok]
            dmag += list(m["MAG_APER"] - (hdr["MAGZP"] - 2.5 * np.log10(c["flux_aper"])))
            ratio += list(m["MAGERR_APER"] / (1.0857 * c["fluxerr_aper"] / c["flux_aper"]))
            dpos += list(np.hypot(m["XWIN_IMAGE"] - c["x"], m["YWIN_IMAGE"] - c["y"]))
            dauto += list(m["MAG_AUTO"] - c["mag"])
        (coadd,) = store.coadds()
        sci = fits.getheader(coadd["path"], "SCI")
        head = fits.Header()
        for key in ("NAXIS", "NAXIS1", "NAXIS2", "CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2",
                    "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "CUNIT1", "CUNIT2"):
            head[key] = sci[key]
        (root / "sw.head").write_text(head.tostring(sep="\n", endcard=True, padding=False))
        conf = root / "default.swarp"
        conf.write_text(subprocess.run([SWARP, "-dd"], capture_output=True, text=True).stdout)
        subprocess.run([SWARP, *(f"{r['product']}[1]" for r in rows[:2]), "-c", str(conf),
                        "-IMAGEOUT_NAME", "sw.fits", "-WEIGHTOUT_NAME", "sw.weight.fits",
                        "-COMBINE_TYPE", "WEIGHTED", "-SUBTRACT_BACK", "N",
                        "-VERBOSE_TYPE", "QUIET", "-WRITE_XML", "N"], check=True, cwd=root)

        def stars(img):
            empty = img == 0
            bkg = sep.Background(img, mask=empty)
            img = img - bkg.back()
            obj = sep.extract(img, 20, err=bkg.globalrms, mask=empty)
            x, y, _ = sep.winpos(img, obj["x"], obj["y"], np.full(len(obj), 1.5))
            return np.c_[x, y]

        a = stars(np.nan_to_num(fits.getdata(coadd["path"], "SCI").astype(float)))
        b = stars(fits.getdata(root / "sw.fits").astype(float))
        d, i = cKDTree(b).query(a)
        ok = d < 1
        print(f"{seed:4d}  {len(dmag):5d}  {np.median(dmag):+9.4f}  {np.median(ratio):9.3f}  "
              f"{np.median(dpos):7.4f}  {np.median(dauto):+9.4f}  "
              f"{np.median(b[i[ok], 0] - a[ok, 0]):+8.4f}  {np.median(b[i[ok], 1] - a[ok, 1]):+8.4f}")


if __name__ == "__main__":
    main()
