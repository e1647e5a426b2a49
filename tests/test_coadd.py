"""Coadds: grid, resampling, incremental accumulation, final outlier-rejected stack.

A seeded star field (isolated Gaussian stars, pixel-integrated so each star's
flux and centroid are exact) is rendered into five dithered, slightly rotated
frames with different TAN-SIP distortions, photometric scales and sky noise,
with cosmic-ray pixels flagged (MASK bit 4), a flagged bad column full of
garbage and a NaN flagged as no data.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip

from photowatch.coadd.stack import (
    Accumulator,
    CoaddGrid,
    FinalMember,
    final_coadd,
    frame_bbox,
    make_grid,
    resample,
)
from photowatch.core.errors import StageDegraded
from photowatch.core.frame import Frame, Mask
from photowatch.io.products import write_product
from photowatch.sim.psf import gaussian_stars

RA0, DEC0 = 150.0, 30.0
SCALE = 0.4  # arcsec / px
SHAPE = (240, 256)  # ny, nx (not square: catches swapped axes)
SIGMA = 1.3  # px, Gaussian PSF (FWHM 3.1 px)
#: (dx px, dy px, rotation deg, SIP sign, flxscale, skynoise e-, exptime s)
FRAMES = [
    (0.0, 0.0, 0.6, +1, 1.00, 10.0, 60.0),
    (12.3, -8.1, -0.8, -1, 0.90, 12.0, 60.0),
    (-9.7, 11.4, 1.3, +1, 1.10, 9.0, 90.0),
    (7.6, 9.2, -1.6, -1, 1.05, 11.0, 60.0),
    (-11.1, -6.6, 0.9, +1, 0.95, 10.0, 30.0),
]
MARGIN_ARCSEC = 10.0


# --------------------------------------------------------------------------- synthesis
def frame_wcs(dx, dy, rot_deg, sip_sign, sip_px=0.6):
    """TAN-SIP WCS: CRVAL at the target, CRPIX shifted by the dither, ``sip_px`` at the edge."""
    ny, nx = SHAPE
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [RA0, DEC0]
    w.wcs.crpix = [(nx + 1) / 2 + dx, (ny + 1) / 2 + dy]
    s, t = SCALE / 3600.0, math.radians(rot_deg)
    w.wcs.cd = [[-s * math.cos(t), s * math.sin(t)], [s * math.sin(t), s * math.cos(t)]]
    n = max(SHAPE) / 2.0
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    amp = sip_sign * sip_px
    a[2, 0], a[0, 2], a[1, 1] = 0.5 * amp / n**2, -0.3 * amp / n**2, 0.2 * amp / n**2
    b[0, 2], b[2, 0], b[1, 1] = 0.4 * amp / n**2, 0.25 * amp / n**2, -0.2 * amp / n**2
    a[3, 0], b[0, 3] = 0.3 * amp / n**3, -0.3 * amp / n**3
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def star_list(rng):
    """Isolated stars on a jittered 6x6 lattice (13" apart) around the target."""
    g = (np.arange(6) - 2.5) * 13.0
    east, north = (m.ravel() for m in np.meshgrid(g, g))
    east = east + rng.uniform(-2, 2, east.size)
    north = north + rng.uniform(-2, 2, north.size)
    ra = RA0 - east / 3600.0 / math.cos(math.radians(DEC0))
    dec = DEC0 + north / 3600.0
    flux = rng.uniform(5e3, 1e5, ra.size)
    return ra, dec, flux


class Field:
    """Five frames: clean (noise-free) and noisy versions, masks, WCSs and scalars."""

    def __init__(self, seed=7):
        rng = np.random.default_rng(seed)
        self.ra, self.dec, self.flux = star_list(rng)
        self.frames = []
        for k, (dx, dy, rot, sgn, flx, sky, exp) in enumerate(FRAMES):
            w = frame_wcs(dx, dy, rot, sgn)
            xs, ys = w.all_world2pix(self.ra, self.dec, 0, tolerance=1e-10)
            model = gaussian_stars(SHAPE, xs, ys, self.flux / flx, sigma_px=SIGMA).astype(np.float32)
            mask = np.zeros(SHAPE, np.uint16)
            frng = np.random.default_rng([seed, k])
            cy, cx = frng.integers(0, SHAPE[0], 25), frng.integers(0, SHAPE[1], 25)
            mask[cy, cx] |= int(Mask.COSMIC)
            column = 40 + 37 * k
            mask[:, column] |= int(Mask.BAD)
            mask[5 + k, 7] |= int(Mask.NODATA)
            clean = model.copy()
            clean[cy, cx] += 5000.0  # flagged cosmic rays: must never show
            clean[:, column] = 1e6  # flagged bad column full of garbage
            clean[5 + k, 7] = np.nan
            noise = frng.normal(0.0, sky, SHAPE).astype(np.float32)
            var = (sky**2 + np.maximum(model, 0)).astype(np.float32)
            self.frames.append(dict(wcs=w, model=model, clean=clean, noise=noise, var=var,
                                    mask=mask, flxscale=flx, skynoise=sky, exptime_s=exp,
                                    id=f"frame{k}", column=column))
        self.grid = make_grid(RA0, DEC0, SCALE, SHAPE, self.frames[0]["wcs"], MARGIN_ARCSEC)
        self.gx, self.gy = self.grid.wcs.all_world2pix(self.ra, self.dec, 0)

    def resampled(self, k, *, noisy=False, **kwargs):
        f = self.frames[k]
        sci = f["clean"] + f["noise"] if noisy else f["clean"]
        return resample(sci, f["var"], f["mask"], f["wcs"], self.grid, **kwargs)

    def add(self, acc, k, *, noisy=False):
        f = self.frames[k]
        acc.add(f["id"], self.resampled(k, noisy=noisy), flxscale=f["flxscale"],
                skynoise=f["skynoise"], exptime_s=f["exptime_s"])


@pytest.fixture(scope="module")
def field():
    return Field()


def aperture(img, x, y, radius=8):
    """Sum and first-moment centroid in a box of half-size ``radius`` (NaN if incomplete)."""
    ix, iy = int(round(x)), int(round(y))
    sub = img[iy - radius: iy + radius + 1, ix - radius: ix + radius + 1]
    if sub.shape != (2 * radius + 1,) * 2 or not np.all(np.isfinite(sub)):
        return np.nan, np.nan, np.nan
    yy, xx = np.mgrid[iy - radius: iy + radius + 1, ix - radius: ix + radius + 1]
    total = sub.sum(dtype=float)
    return total, (sub * xx).sum() / total, (sub * yy).sum() / total


# --------------------------------------------------------------------------- grid
def test_grid_is_north_up_east_left_centred_and_covers_the_dithers(field):
    grid = field.grid
    ny, nx = grid.shape
    assert ny % 2 == 1 and nx % 2 == 1
    x, y = grid.wcs.all_world2pix(RA0, DEC0, 0)
    assert abs(x - (nx - 1) / 2) < 1e-9 and abs(y - (ny - 1) / 2) < 1e-9
    ra0, dec0 = grid.wcs.all_pix2world(nx // 2, ny // 2, 0)
    ra1, dec1 = grid.wcs.all_pix2world(nx // 2 + 1, ny // 2 + 1, 0)
    assert ra1 < ra0 and dec1 > dec0  # east left, north up
    assert grid.pixel_scale_arcsec == pytest.approx(SCALE)
    margin_px = MARGIN_ARCSEC / SCALE
    for f in field.frames:  # all dithers (up to 16 px = 6.4") fit in the 10" margin
        y0, y1, x0, x1 = frame_bbox(f["wcs"], SHAPE, grid)
        assert y0 > 0 and x0 > 0 and y1 < ny and x1 < nx
    # footprint + margin on each side, no more than a pixel or two of slack
    assert nx <= SHAPE[1] * 1.05 + 2 * margin_px + 3


def test_grid_round_trips_through_header_and_json(field):
    grid = field.grid
    for other in (CoaddGrid.from_header(grid.to_header()), CoaddGrid.from_json(grid.to_json())):
        assert other.same_as(grid)
        assert other.shape == grid.shape
        pts = np.array([[0.0, 0.0], [17.3, 99.1], [grid.shape[1] - 1, grid.shape[0] - 1]])
        assert np.allclose(other.wcs.all_pix2world(pts, 0), grid.wcs.all_pix2world(pts, 0),
                           rtol=0, atol=1e-12)


def test_grid_takes_the_frame_scale_when_none_is_given(field):
    grid = make_grid(RA0, DEC0, None, SHAPE, field.frames[0]["wcs"], 0.0)
    assert grid.pixel_scale_arcsec == pytest.approx(SCALE, rel=1e-3)


# --------------------------------------------------------------------------- resampling
def test_resample_conserves_flux_and_positions(field):
    res = field.resampled(1, workers=1)
    img = np.full(field.grid.shape, np.nan)
    img[res.slices] = np.where(res.good, res.data, np.nan)
    measured = 0
    for x, y, f in zip(field.gx, field.gy, field.flux):
        total, cx, cy = aperture(img, x, y)
        if np.isfinite(total):
            measured += 1
            # frame 1 holds flux / flxscale in its own units
            assert total * FRAMES[1][4] == pytest.approx(f, rel=1e-3)
            assert abs(cx - x) < 0.02 and abs(cy - y) < 0.02
    assert measured >= 20


def test_resample_threads_give_the_same_result(field):
    a = field.resampled(2, workers=1)
    b = field.resampled(2, workers=3)
    assert a.bbox == b.bbox
    assert np.array_equal(a.good, b.good)
    assert np.array_equal(a.data, b.data) and np.array_equal(a.var, b.var)


def test_resample_agrees_with_reproject_interp(field):
    reproject = pytest.importorskip("reproject")
    f = field.frames[3]
    clean = np.zeros(SHAPE, np.uint16)
    ours = resample(f["model"], None, clean, f["wcs"], field.grid)
    # reproject interpolates surface brightness; ours multiplies by the pixel-area ratio
    area = resample(np.ones(SHAPE, np.float32), None, clean, f["wcs"], field.grid)
    ref, footprint = reproject.reproject_interp((f["model"], f["wcs"]), field.grid.wcs,
                                                shape_out=field.grid.shape, order="bilinear")
    both = ours.good & area.good & (footprint[ours.slices] > 0)
    assert both.sum() > 0.8 * ours.good.size
    sb = ours.data[both] / area.data[both]
    assert np.max(np.abs(sb - ref[ours.slices][both])) < 1e-4 * f["model"].max()
    # the pixel-area ratio of a TAN-SIP frame onto its own scale is close to, not exactly, 1
    assert 0.98 < area.data[area.good].min() < area.data[area.good].max() < 1.02


def test_resample_never_uses_masked_pixels(field):
    for k in range(len(FRAMES)):
        res = field.resampled(k)
        # the clean frames hold 1e6 in the bad column, 5000 in cosmic rays and a NaN:
        # any leak would show far above the brightest star peak
        assert np.all(np.isfinite(res.data))
        assert res.data.max() < field.frames[k]["model"].max() * 1.2
        assert (~res.good).sum() > 2 * SHAPE[0]  # the bad column's window is excluded


def test_cubic_interpolation_conserves_flux(field):
    f = field.frames[0]
    res = resample(f["model"], f["var"], np.zeros(SHAPE, np.uint16), f["wcs"], field.grid,
                   interpolation="cubic")
    img = np.full(field.grid.shape, np.nan)
    img[res.slices] = np.where(res.good, res.data, np.nan)
    sums = [aperture(img, x, y)[0] / fl for x, y, fl in zip(field.gx, field.gy, field.flux)]
    sums = np.array([s for s in sums if np.isfinite(s)])
    assert len(sums) >= 20 and np.all(np.abs(sums - 1) < 1e-3)


def test_resample_outside_the_grid_is_degraded(field):
    f = field.frames[0]
    far = frame_wcs(0, 0, 0, 1)
    far.wcs.crval = [RA0 + 1.0, DEC0]
    far.wcs.set()
    with pytest.raises(StageDegraded, match="does not overlap"):
        resample(f["clean"], f["var"], f["mask"], far, field.grid)


# --------------------------------------------------------------------------- quick-look stack
@pytest.fixture(scope="module")
def quicklook(field):
    acc = Accumulator(field.grid)
    for k in range(len(FRAMES)):
        field.add(acc, k)
    return acc


def test_quicklook_star_fluxes_and_positions(field, quicklook):
    """0.1 % and 0.02 px for stars every frame covers fully; stars with a masked pixel in
    some frame are a weighted mean of differently smoothed PSFs there: within 1 %."""
    sci, wht, exp, ncov = quicklook.images()
    full = partial = 0
    for x, y, f in zip(field.gx, field.gy, field.flux):
        total, cx, cy = aperture(sci, x, y)
        if not np.isfinite(total):
            continue
        ix, iy = int(round(x)), int(round(y))
        if np.all(ncov[iy - 8: iy + 9, ix - 8: ix + 9] == len(FRAMES)):
            full += 1
            assert total == pytest.approx(f, rel=1e-3)
        else:
            partial += 1
            assert total == pytest.approx(f, rel=1e-2)
        assert abs(cx - x) < 0.02 and abs(cy - y) < 0.02
    assert full >= 10 and partial >= 5
    # the masks were exercised: some pixels lost frames to the bad columns and cosmic rays
    covered = ncov > 0
    assert ncov[covered].min() < len(FRAMES) and ncov.max() == len(FRAMES)


def test_quicklook_never_uses_masked_pixels(field, quicklook):
    sci, wht, exp, ncov = quicklook.images()
    truth = gaussian_stars(field.grid.shape, field.gx, field.gy, field.flux, sigma_px=SIGMA)
    far = (truth < 1e-6) & (ncov > 0)  # away from every star
    assert far.sum() > 1000
    assert np.max(np.abs(sci[far])) < 1e-3
    assert np.all(np.isnan(sci[ncov == 0])) and np.all(wht[ncov == 0] == 0)
    assert np.array_equal(quicklook.sci(), sci, equal_nan=True)


def test_quicklook_sums_and_maps(field, quicklook):
    sci, wht, exp, ncov = quicklook.images()
    full = ncov == len(FRAMES)
    weights = [1 / (f["flxscale"] * f["skynoise"]) ** 2 for f in field.frames]
    assert np.allclose(wht[full], sum(weights), rtol=1e-6)
    assert np.allclose(exp[full], sum(f["exptime_s"] for f in field.frames))
    assert quicklook.exptime_s == sum(f["exptime_s"] for f in field.frames)
    assert set(quicklook.members) == {f["id"] for f in field.frames}
    assert quicklook.members["frame2"].weight == pytest.approx(weights[2])


def test_add_then_remove_restores_the_sums(field):
    acc = Accumulator(field.grid)
    for k in range(3):
        field.add(acc, k, noisy=True)
    before = (acc.sum_wd.copy(), acc.sum_w.copy(), acc.exp.copy(), acc.ncov.copy())
    extra = field.resampled(3, noisy=True)
    f = field.frames[3]
    acc.add(f["id"], extra, flxscale=f["flxscale"], skynoise=f["skynoise"],
            exptime_s=f["exptime_s"])
    with pytest.raises(ValueError, match="already in the coadd"):
        acc.add(f["id"], extra, flxscale=1.0, skynoise=1.0, exptime_s=1.0)
    acc.remove(f["id"], extra)
    scale = np.abs(before[0]).max()
    assert np.allclose(acc.sum_wd, before[0], rtol=0, atol=1e-12 * scale)
    assert np.allclose(acc.sum_w, before[1], rtol=1e-12, atol=0)
    assert np.array_equal(acc.exp, before[2]) and np.array_equal(acc.ncov, before[3])
    # where frame 3 was alone, everything is exactly zero again
    assert np.all(acc.sum_wd[before[3] == 0] == 0) and np.all(acc.sum_w[before[3] == 0] == 0)
    assert set(acc.members) == {"frame0", "frame1", "frame2"}
    with pytest.raises(ValueError, match="not in the coadd"):
        acc.remove(f["id"], extra)


def test_sums_do_not_depend_on_the_order(field):
    forward, backward = Accumulator(field.grid), Accumulator(field.grid)
    for k in range(len(FRAMES)):
        field.add(forward, k, noisy=True)
    for k in reversed(range(len(FRAMES))):
        field.add(backward, k, noisy=True)
    scale = np.abs(forward.sum_wd).max()
    assert np.allclose(forward.sum_wd, backward.sum_wd, rtol=0, atol=1e-12 * scale)
    assert np.allclose(forward.sum_w, backward.sum_w, rtol=1e-12, atol=0)
    assert np.array_equal(forward.ncov, backward.ncov)
    assert forward.members == backward.members


def test_memory_mapped_sums_equal_the_in_memory_ones(field, tmp_path):
    """coadd.mmap (issue 23): the planes live in unlinked files, dropped from the resident
    set strip by strip; adds, removes, growth, writes and loads give the same numbers."""
    plain, mapped = Accumulator(field.grid), Accumulator(field.grid, backing=tmp_path / "acc")
    for acc in (plain, mapped):
        for k in range(len(FRAMES)):
            field.add(acc, k, noisy=True)
        acc.images(byteorder=">")  # the written planes, then kept current
        f = field.frames[1]
        acc.remove(f["id"], field.resampled(1, noisy=True))
    assert isinstance(mapped.sum_wd, np.memmap) and not list((tmp_path / "acc").iterdir())
    for name in ("sum_wd", "sum_w", "exp", "ncov"):
        assert np.array_equal(getattr(plain, name), getattr(mapped, name)), name
    for a, b in zip(plain.images(byteorder=">"), mapped.images(byteorder=">")):
        assert np.array_equal(a, b, equal_nan=True)
    plain.write(tmp_path / "plain.fits", magzp=None, fsync=False)
    mapped.write(tmp_path / "mapped.fits", magzp=None, fsync=False)
    loaded = Accumulator.load(tmp_path / "mapped.fits", backing=tmp_path / "acc")
    assert isinstance(loaded.sum_w, np.memmap)
    assert np.array_equal(loaded.sum_w, Accumulator.load(tmp_path / "plain.fits").sum_w)
    with fits.open(tmp_path / "plain.fits") as a, fits.open(tmp_path / "mapped.fits") as b:
        for name in ("SCI", "WHT", "EXP", "NCOV"):
            assert np.array_equal(a[name].data, b[name].data, equal_nan=True), name


def test_noise_falls_as_one_over_sqrt_n(field):
    """Equal weights: 4x4 block sums (insensitive to resampling correlations) of pure
    noise coadds; the depth of 4 frames is twice that of one, within 10 %."""
    grid = field.grid
    zero = np.zeros(SHAPE, np.uint16)
    singles, acc = [], Accumulator(grid)
    for k in range(4):
        f = field.frames[k]
        noise = np.random.default_rng([99, k]).normal(0, 10.0, SHAPE).astype(np.float32)
        res = resample(noise, None, zero, f["wcs"], grid)
        one = Accumulator(grid)
        one.add("n", res, flxscale=1.0, skynoise=10.0, exptime_s=60.0)
        singles.append(one.images()[0])
        acc.add(f"n{k}", res, flxscale=1.0, skynoise=10.0, exptime_s=60.0)
    sci, wht, exp, ncov = acc.images()
    common = ncov == 4

    def block_std(img):
        ny, nx = (s // 4 * 4 for s in img.shape)
        a = np.where(common, img, np.nan)[:ny, :nx].reshape(ny // 4, 4, nx // 4, 4)
        sums = a.sum(axis=(1, 3))
        return np.nanstd(sums[np.isfinite(sums)])

    ratio = np.mean([block_std(s) for s in singles]) / block_std(sci)
    assert ratio == pytest.approx(2.0, rel=0.1)
    assert np.all(exp[common] == 240.0)


def test_write_load_round_trip_and_continue(field, quicklook, tmp_path):
    path = tmp_path / "coadd_T1_R.fits"
    quicklook.write(path, magzp=27.5, header_extra={"TARGET": "T1", "FILTER": "R"})
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "SCI", "WHT", "EXP", "NCOV", "MEMBERS"]
        assert hdul[0].header["STACKTYP"] == "QUICKLOOK"
        assert hdul["SCI"].header["NCOMBINE"] == len(FRAMES)
        assert hdul["SCI"].header["MAGZP"] == 27.5
        assert hdul[0].header["EXPTIME"] == pytest.approx(300.0)
        assert hdul["SCI"].data.dtype.name.endswith("float32")
        assert len(hdul["MEMBERS"].data) == len(FRAMES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert CoaddGrid.from_header(hdul["WHT"].header).same_as(field.grid)
    loaded = Accumulator.load(path)
    assert loaded.grid.same_as(field.grid)
    assert loaded.members == quicklook.members
    assert np.allclose(loaded.sum_w, quicklook.sum_w, rtol=1e-6)
    assert np.allclose(loaded.sum_wd, quicklook.sum_wd, rtol=1e-6,
                       atol=1e-6 * np.abs(quicklook.sum_wd).max())
    assert np.array_equal(loaded.ncov, quicklook.ncov)
    # after a restart, removing and re-adding a member continues where the file left off
    res = field.resampled(4)
    f = field.frames[4]
    loaded.remove(f["id"], res)
    loaded.add(f["id"], res, flxscale=f["flxscale"], skynoise=f["skynoise"],
               exptime_s=f["exptime_s"])
    a, b = loaded.images()[0], quicklook.images()[0]
    assert np.allclose(a, b, rtol=1e-5, atol=1e-4, equal_nan=True)


# --------------------------------------------------------------------------- final stack
def write_products(field, folder, *, noisy=True, trail_frame=None, unflagged_cr_frames=()):
    """Reduced products of the five frames; optionally an unflagged trail and cosmic rays.

    Returns the members and the grid positions of the injected defects."""
    members, defects = [], []
    for k, f in enumerate(field.frames):
        sci = (f["clean"] + (f["noise"] if noisy else 0)).astype(np.float32)
        if k == trail_frame:  # a satellite trail: a line of Gaussian profile, 30 sigma peak
            yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
            dist = (0.35 * xx - yy + 60) / math.hypot(0.35, 1)
            sci += (30 * f["skynoise"] * np.exp(-0.5 * (dist / SIGMA) ** 2)).astype(np.float32)
            on = np.abs(dist) < 1.0
            ra, dec = f["wcs"].all_pix2world(xx[on], yy[on], 0)
            defects.append(("trail", *field.grid.wcs.all_world2pix(ra, dec, 0)))
        if k in unflagged_cr_frames:
            rng = np.random.default_rng([5, k])
            cy, cx = rng.integers(10, SHAPE[0] - 10, 30), rng.integers(10, SHAPE[1] - 10, 30)
            sci[cy, cx] += 3000.0
            ra, dec = f["wcs"].all_pix2world(cx, cy, 0)
            defects.append(("cr", *field.grid.wcs.all_world2pix(ra, dec, 0)))
        hdr = f["wcs"].to_header(relax=True)
        frame = Frame(sci=sci, var=f["var"], mask=f["mask"], header=hdr)
        path = folder / f"{f['id']}.fits"
        write_product(path, frame, primary=fits.Header(), sci_hdr=hdr, fsync=False)
        members.append(FinalMember(f["id"], path, f["flxscale"], f["skynoise"],
                                   f["exptime_s"]))
    return members, defects


def final_kwargs(**kw):
    return dict(clip_sigma=3.0, chunk_rows=64, magzp=27.0, header_extra=None, fsync=False) | kw


def read_coadd(path):
    with fits.open(path) as hdul:
        return {h.name: (h.data.copy() if h.name != "MEMBERS" else h.data)
                for h in hdul[1:]}, hdul[0].header.copy()


def test_final_rejects_trail_and_unflagged_cosmic_rays(field, tmp_path):
    dirty_dir, clean_dir = tmp_path / "dirty", tmp_path / "clean"
    dirty_dir.mkdir()
    clean_dir.mkdir()
    dirty, defects = write_products(field, dirty_dir, trail_frame=2,
                                    unflagged_cr_frames=(0, 3))
    clean, _ = write_products(field, clean_dir)
    final_coadd(dirty, field.grid, tmp_path / "dirty.fits", **final_kwargs())
    final_coadd(clean, field.grid, tmp_path / "clean.fits", **final_kwargs())
    d, header = read_coadd(tmp_path / "dirty.fits")
    c, _ = read_coadd(tmp_path / "clean.fits")
    assert header["STACKTYP"] == "FINAL" and header["NCOMBINE"] == len(FRAMES)
    # the quick-look (no rejection) shows the trail; the final one does not
    ql = Accumulator(field.grid)
    for k, m in enumerate(dirty):
        with fits.open(m.path) as hdul:
            res = resample(hdul["SCI"].data, None, hdul["MASK"].data, field.frames[k]["wcs"],
                           field.grid)
        ql.add(m.member_id, res, flxscale=m.flxscale, skynoise=m.skynoise,
               exptime_s=m.exptime_s)
    qsci = ql.images()[0]
    pixel_noise = np.nanmedian(1 / np.sqrt(c["WHT"][c["WHT"] > 0]))
    for kind, gx, gy in defects:
        iy, ix = np.round(gy).astype(int), np.round(gx).astype(int)
        ok = (iy >= 0) & (iy < field.grid.shape[0]) & (ix >= 0) & (ix < field.grid.shape[1])
        iy, ix = iy[ok], ix[ok]
        excess_final = d["SCI"][iy, ix] - c["SCI"][iy, ix]
        excess_ql = qsci[iy, ix] - c["SCI"][iy, ix]
        if kind == "trail":
            assert np.nanmean(excess_ql) > 8 * pixel_noise  # there is a trail to reject
            assert abs(np.nanmean(excess_final)) < 0.5 * pixel_noise
        else:
            assert np.nanmin(excess_ql) > 20 * pixel_noise
            assert np.nanmax(np.abs(excess_final)) < 4 * pixel_noise


def test_final_without_outliers_matches_the_quicklook(field, quicklook, tmp_path):
    """Noise-free frames (garbage only in masked pixels): nothing is rejected, the
    final coadd equals the quick-look one and star fluxes are conserved."""
    members, _ = write_products(field, tmp_path, noisy=False)
    out = final_coadd(members, field.grid, tmp_path / "final.fits", **final_kwargs())
    f, _ = read_coadd(out)
    sci, wht, exp, ncov = quicklook.images()
    assert np.array_equal(f["NCOV"], ncov)
    assert np.allclose(f["SCI"], sci, rtol=1e-5, atol=1e-3, equal_nan=True)
    assert np.allclose(f["WHT"], wht, rtol=1e-5)
    loaded = Accumulator.load(out)  # the same layout: a final coadd loads too
    assert loaded.members == quicklook.members


@pytest.mark.parametrize("interpolation", ["bilinear", "cubic"])
def test_final_chunked_equals_unchunked(field, tmp_path, interpolation):
    members, _ = write_products(field, tmp_path, trail_frame=1, unflagged_cr_frames=(4,))
    a = final_coadd(members, field.grid, tmp_path / "a.fits",
                    **final_kwargs(chunk_rows=8, interpolation=interpolation))
    b = final_coadd(members, field.grid, tmp_path / "b.fits",
                    **final_kwargs(chunk_rows=10_000, workers=1, interpolation=interpolation))
    # a memory cap of 50 kB for the stacked planes forces chunks of a few rows
    c = final_coadd(members, field.grid, tmp_path / "c.fits",
                    **final_kwargs(max_stack_mb=0.05, interpolation=interpolation))
    fb, _ = read_coadd(b)
    for other in (a, c):
        fa, _ = read_coadd(other)
        for name in ("SCI", "WHT", "EXP"):
            assert np.allclose(fa[name], fb[name], rtol=1e-5, atol=1e-4, equal_nan=True), name
        assert np.mean(fa["NCOV"] != fb["NCOV"]) < 1e-4


def test_final_with_two_frames_rejects_the_high_one(field, tmp_path):
    (tmp_path / "clean").mkdir()
    members, defects = write_products(field, tmp_path, unflagged_cr_frames=(1,))
    clean, _ = write_products(field, tmp_path / "clean")
    out = final_coadd(members[:2], field.grid, tmp_path / "pair.fits", **final_kwargs())
    ref = final_coadd(clean[:2], field.grid, tmp_path / "ref.fits", **final_kwargs())
    f, _ = read_coadd(out)
    r, _ = read_coadd(ref)
    _, gx, gy = defects[0]
    iy, ix = np.round(gy).astype(int), np.round(gx).astype(int)
    # where only the hit frame covers nothing can be done; on star cores the seeing
    # tolerance (amp_frac) lets hits below ~0.9 of the level through
    stars = gaussian_stars(field.grid.shape, field.gx, field.gy, field.flux, sigma_px=SIGMA)
    both = (r["NCOV"][iy, ix] == 2) & (stars[iy, ix] < 100)
    assert both.sum() > 20
    noise = 1 / np.sqrt(np.median(r["WHT"][r["NCOV"] == 2]))
    excess = f["SCI"][iy, ix][both] - r["SCI"][iy, ix][both]
    # unrejected, a 3000 e- hit would leave ~1000 e- (its weight share, bilinear-spread)
    assert np.max(np.abs(excess)) < 5 * noise
    assert np.all(f["NCOV"][iy, ix][both] == 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_short_exposure_flag_equals_the_whole_image_filters(seed):
    """coadd_catalog's PARTIAL test, evaluated at the sources only, decides as ndimage's
    3x3 mean and 9x9 maximum over the whole exposure map do (edges included)."""
    from scipy import ndimage

    from photowatch.coadd.catalogue import _short_exposure

    rng = np.random.default_rng(seed)
    ny, nx = rng.integers(9, 80, size=2)
    t = float(rng.choice([30.0, 120.0, 97.5]))
    exp = (t * rng.integers(0, 12, size=(ny, nx))).astype(np.float32)
    exp[rng.random((ny, nx)) < 0.7] = np.float32(11 * t)  # mostly full depth
    iy, ix = np.nonzero(np.ones((ny, nx), bool))  # every pixel, edges and corners too
    want = ndimage.uniform_filter(exp, size=3)[iy, ix] < 0.9 * ndimage.maximum_filter(
        exp, size=9)[iy, ix]
    got = _short_exposure(exp, iy, ix)
    assert want.any() and not want.all()
    assert np.array_equal(got, want)
