"""Stars on pixels: a Moffat PSF integrated over pixels (:class:`_Psf`), its
rendering (:func:`render_stars`, each stamp sums exactly to the flux) and a PSF that
varies over the field. Tests that need stars use :func:`render_stars`.
"""


from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from photowatch.sim.camera import (
    MOFFAT_BETA,
)


class _Psf:
    """A pixel-integrated Moffat (optionally trailed) tabulated on a fine grid.

    The table ``P`` holds the PSF integrated over a whole pixel, sampled every
    1/K pixel (K sub-samples per pixel for the integration, more than the 3x
    oversampling the stamps need). A star's stamp at any sub-pixel position is
    a bilinear interpolation between four phase-shifted samplings of ``P``, and
    is then scaled to sum exactly to the star's flux. The stamp radius is at
    least 5 FWHM.
    """

    def __init__(self, fwhm_px: float, beta: float = MOFFAT_BETA,
                 trail_px: float = 0.0, trail_angle_deg: float = 0.0):
        core = max(math.ceil(5.0 * fwhm_px), 4)
        radius = core + (math.ceil(trail_px / 2) + 1 if trail_px else 0)
        k = 32 if radius <= 16 else 16 if radius <= 40 else 8 if radius <= 100 else 4
        m0 = (radius + 2) * k
        pts = (np.arange(-m0, m0) + 0.5) / k
        alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        r2 = pts[:, None] ** 2 + pts[None, :] ** 2
        moffat = (1.0 + r2 / alpha ** 2) ** (-beta)
        if trail_px:
            from scipy.signal import fftconvolve

            n = max(int(round(trail_px * k)), 1)
            steps = (np.arange(n + 1) / n - 0.5) * trail_px * k
            ang = math.radians(trail_angle_deg)
            half = int(math.ceil(trail_px * k / 2)) + 2
            kern = np.zeros((2 * half + 1, 2 * half + 1))
            fx, fy = steps * math.cos(ang) + half, steps * math.sin(ang) + half
            ix, iy = np.floor(fx).astype(int), np.floor(fy).astype(int)
            tx, ty = fx - ix, fy - iy
            for dy, dx, w in ((0, 0, (1 - tx) * (1 - ty)), (0, 1, tx * (1 - ty)),
                              (1, 0, (1 - tx) * ty), (1, 1, tx * ty)):
                np.add.at(kern, (iy + dy, ix + dx), w)
            moffat = fftconvolve(moffat, kern / kern.sum(), mode="same")
        cs = np.zeros((2 * m0 + 1, 2 * m0))
        np.cumsum(moffat, axis=0, out=cs[1:])
        box = cs[k:] - cs[:-k]
        cs = np.zeros((box.shape[0], box.shape[1] + 1))
        np.cumsum(box, axis=1, out=cs[:, 1:])
        self.table = (cs[:, k:] - cs[:, :-k]).astype(np.float32)
        self.k = k
        self.radius = radius
        self.centre = m0 - k // 2
        self.span = 2 * radius * k + 1

    def stamp(self, fx: float, fy: float) -> np.ndarray:
        """Unnormalised (2R+1)^2 stamp for a star at offset (fx, fy) in [-0.5, 0.5) px."""
        k, r, c, span, p = self.k, self.radius, self.centre, self.span, self.table
        gx, gy = fx * k, fy * k
        qx, qy = math.floor(gx), math.floor(gy)
        tx, ty = gx - qx, gy - qy
        sx, sy = c - r * k - qx, c - r * k - qy
        a = p[sy:sy + span:k, sx:sx + span:k]
        b = p[sy:sy + span:k, sx - 1:sx - 1 + span:k]
        cc = p[sy - 1:sy - 1 + span:k, sx:sx + span:k]
        d = p[sy - 1:sy - 1 + span:k, sx - 1:sx - 1 + span:k]
        return ((1 - ty) * ((1 - tx) * a + tx * b) + ty * ((1 - tx) * cc + tx * d))


def render_stars(shape: tuple[int, int], psf: _Psf, x: np.ndarray, y: np.ndarray,
                 flux: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Add stars (0-based pixel positions, total fluxes) to a float32 image."""
    img = np.zeros(shape, np.float32) if out is None else out
    ny, nx = shape
    r = psf.radius
    ix = np.floor(np.asarray(x) + 0.5).astype(int)
    iy = np.floor(np.asarray(y) + 0.5).astype(int)
    fxs, fys = np.asarray(x) - ix, np.asarray(y) - iy
    for cx, cy, fx, fy, f in zip(ix.tolist(), iy.tolist(), fxs.tolist(), fys.tolist(),
                                 np.asarray(flux, float).tolist()):
        x0, y0 = cx - r, cy - r
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(cx + r + 1, nx), min(cy + r + 1, ny)
        if xa >= xb or ya >= yb:
            continue
        st = psf.stamp(fx, fy)
        st *= f / float(st.sum())
        img[ya:yb, xa:xb] += st[ya - y0:yb - y0, xa - x0:xb - x0]
    return img


def _render_varying(shape, fwhm_px: float, beta: float, variation: float, x, y, flux,
                    zones: int = 6) -> np.ndarray:
    """Stars whose FWHM grows as ``1 + variation (r / r_corner)**2`` from the centre,
    rendered in ``zones`` rings of (r / r_corner)**2, each with its own PSF (at its mid)."""
    ny, nx = shape
    rc2 = ((nx - 1) / 2) ** 2 + ((ny - 1) / 2) ** 2
    q = ((np.asarray(x) - (nx - 1) / 2) ** 2 + (np.asarray(y) - (ny - 1) / 2) ** 2) / rc2
    zone = np.clip((q * zones).astype(int), 0, zones - 1)
    img = np.zeros(shape, np.float32)
    for k in np.unique(zone).tolist():
        sel = zone == k
        psf = _Psf(fwhm_px * (1.0 + variation * (k + 0.5) / zones), beta=beta)
        render_stars(shape, psf, np.asarray(x)[sel], np.asarray(y)[sel],
                     np.asarray(flux)[sel], out=img)
    return img


# ==============================================================================================
# Detector structures (fixed for the night)
# ==============================================================================================


def moffat_stars(shape: tuple[int, int], x, y, flux, *, fwhm_px: float,
                 beta: float = MOFFAT_BETA) -> np.ndarray:
    """The simulator's stars (pixel-integrated Moffat, each summing exactly to its flux)
    at 0-based positions, on a new float32 image."""
    return render_stars(shape, _Psf(fwhm_px, beta), np.asarray(x, float),
                        np.asarray(y, float), np.asarray(flux, float))


def gaussian_stars(shape: tuple[int, int], x, y, flux, *, sigma_px: float,
                   radius: int | None = None) -> np.ndarray:
    """Pixel-integrated circular Gaussians at 0-based positions, on a new float64 image.

    Exact: each pixel holds the Gaussian's integral over it (differences of ``erf``),
    so a star's sum is its flux (less what falls off the image or beyond ``radius``,
    default 7 sigma: < 1e-11) and its centroid is its position. For tests that need
    an analytic profile (known FWHM, aperture fractions); stars like the simulator's
    are :func:`moffat_stars`.
    """
    img = np.zeros(shape, np.float64)
    ny, nx = shape
    r = int(math.ceil(7 * sigma_px)) if radius is None else int(radius)
    scale = math.sqrt(2) * sigma_px
    for xc, yc, f in zip(np.atleast_1d(x).tolist(), np.atleast_1d(y).tolist(),
                         np.atleast_1d(flux).tolist()):
        ix, iy = int(math.floor(xc + 0.5)), int(math.floor(yc + 0.5))
        x0, x1 = max(ix - r, 0), min(ix + r + 1, nx)
        y0, y1 = max(iy - r, 0), min(iy + r + 1, ny)
        if x1 <= x0 or y1 <= y0:
            continue
        px = np.diff(0.5 * erf((np.arange(x0, x1 + 1) - 0.5 - xc) / scale))
        py = np.diff(0.5 * erf((np.arange(y0, y1 + 1) - 0.5 - yc) / scale))
        img[y0:y1, x0:x1] += f * np.outer(py, px)
    return img


def _hit_frame(sci, star, hits, sky_sigma: float):
    """The Frame of a synthetic sky-subtracted image: variance of the sky, the stars'
    Poisson and the hits' charge; RDNOISE 6 e-."""
    from astropy.io import fits

    from photowatch.core.frame import Frame

    var = sky_sigma ** 2 + star + np.where(hits, np.maximum(sci - star, 0), 0)
    hdr = fits.Header()
    hdr["RDNOISE"] = 6.0
    return Frame(sci.astype(np.float32), var.astype(np.float32),
                 np.zeros(sci.shape, np.uint16), hdr)


def moffat_stars_of_peak(shape: tuple[int, int], x, y, peak, *, fwhm_px: float,
                         beta: float = MOFFAT_BETA) -> np.ndarray:
    """:func:`moffat_stars` given each star's central value (the Moffat's peak, e- per
    pixel) instead of its flux."""
    alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    peak_fraction = (beta - 1.0) / (math.pi * alpha * alpha)  # of the flux, at the centre
    return moffat_stars(shape, x, y, np.asarray(peak) / peak_fraction, fwhm_px=fwhm_px,
                        beta=beta)


def _observed(rng, star: np.ndarray, sky_sigma: float) -> np.ndarray:
    """The stars on a sky-subtracted frame: sky noise ``sky_sigma`` and their Poisson."""
    return rng.normal(0, sky_sigma, star.shape) + rng.normal(0, np.sqrt(star)) + star


def star_grid(rng, n_side: int, step: int):
    """A square frame of ``n_side`` x ``n_side`` cells of ``step`` px and a star in the
    middle of each, up to half a pixel off: (shape, x, y)."""
    shape = (n_side * step, n_side * step)
    centres = np.arange(n_side) * step + step / 2
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    x = xx.ravel() + rng.uniform(-0.5, 0.5, xx.size)
    y = yy.ravel() + rng.uniform(-0.5, 0.5, xx.size)
    return shape, x, y


def faint_stars_with_hits(seed: int, fwhm_px: float, n_side: int = 16, step: int = 24,
                          snr=(5.0, 20.0), sky_sigma: float = 20.0):
    """A sky-subtracted frame for the cosmic-ray stage's star-core tests (issue 21): a grid
    of ``n_side`` x ``n_side`` Moffat stars (this module's PSF) at optimal S/N ``snr`` on
    sky noise ``sky_sigma`` (e-) with their Poisson noise, and a 1-2 px hit of 15-60 sigma
    4-6 px from every other star. Returns the Frame, the stars' x, y and S/N, and the
    true hit mask."""
    from astropy.io import fits

    from photowatch.core.frame import Frame

    rng = np.random.default_rng(seed)
    shape, x, y = star_grid(rng, n_side, step)
    s2n = rng.uniform(*snr, x.size)
    neff = 4 * np.pi * (fwhm_px / 2.3548) ** 2  # noise-equivalent area of the PSF
    star = moffat_stars(shape, x, y, s2n * sky_sigma * np.sqrt(neff), fwhm_px=fwhm_px)
    sci = _observed(rng, star, sky_sigma)
    hits = np.zeros(shape, bool)
    for k in range(0, x.size, 2):
        a, r = rng.uniform(0, 2 * np.pi), rng.uniform(4, 6)
        hy, hx = int(round(y[k] + r * np.sin(a))), int(round(x[k] + r * np.cos(a)))
        amp = rng.uniform(15, 60) * sky_sigma
        sci[hy, hx] += amp
        hits[hy, hx] = True
        if rng.random() < 0.5:
            sci[hy, hx + 1] += 0.6 * amp
            hits[hy, hx + 1] = True
    var = sky_sigma ** 2 + star + np.where(hits, np.maximum(sci, 0), 0)
    hdr = fits.Header()
    hdr["RDNOISE"] = 6.0
    frame = Frame(sci.astype(np.float32), var.astype(np.float32),
                  np.zeros(shape, np.uint16), hdr)
    return frame, x, y, s2n, hits


def hits_on_bright_stars(seed: int, fwhm_px: float, *, beta: float = MOFFAT_BETA,
                         n_side: int = 8, step: int = 32, peak_snr=(30.0, 300.0),
                         radius=(1.5, 3.0), sky_sigma: float = 20.0):
    """A sky-subtracted frame of bright stars with hits on them (issue 17, seventh round):
    a grid of ``n_side`` x ``n_side`` Moffat stars (``fwhm_px``, ``beta``) whose peak
    pixel stands ``peak_snr`` sky sigmas, with their Poisson noise; on every other star a
    hit ``radius`` px from its centre of 10-25 % of the star's peak (at least 10 sigma of
    the noise there), half of them 2 px long. Returns the Frame, the stars' x, y and the
    true hit mask (the stars of odd index carry no hit)."""
    rng = np.random.default_rng(seed)
    shape, x, y = star_grid(rng, n_side, step)
    peak = rng.uniform(*peak_snr, x.size) * sky_sigma
    star = moffat_stars_of_peak(shape, x, y, peak, fwhm_px=fwhm_px, beta=beta)
    sci = _observed(rng, star, sky_sigma)
    hits = np.zeros(shape, bool)
    for k in range(0, x.size, 2):
        a, r = rng.uniform(0, 2 * np.pi), rng.uniform(*radius)
        hy, hx = int(round(y[k] + r * np.sin(a))), int(round(x[k] + r * np.cos(a)))
        amp = max(rng.uniform(0.10, 0.25) * peak[k],
                  10.0 * math.sqrt(sky_sigma ** 2 + float(star[hy, hx])))
        sci[hy, hx] += amp
        hits[hy, hx] = True
        if rng.random() < 0.5:
            sci[hy, hx + 1] += 0.7 * amp
            hits[hy, hx + 1] = True
    frame = _hit_frame(sci, star, hits, sky_sigma)
    return frame, x, y, hits


def bright_stars_with_companions(seed: int, fwhm_px: float, *, n_side: int = 8,
                                 step: int = 32, peak_snr=(30.0, 300.0),
                                 companion_snr=(5.0, 45.0), radius=(4.5, 7.0),
                                 sky_sigma: float = 20.0):
    """A sky-subtracted frame of bright stars, each with a faint companion (issue 17,
    eleventh round): a grid of ``n_side`` x ``n_side`` Moffat stars whose peak pixel
    stands ``peak_snr`` sky sigmas, and beside each, ``radius`` px from its centre, a
    star of ``companion_snr`` sigmas, with their Poisson noise and no hit. Returns the
    Frame."""
    rng = np.random.default_rng(seed)
    *_, star, sci = _with_companions(rng, fwhm_px, n_side, step, peak_snr, companion_snr,
                                     radius, sky_sigma)
    return _hit_frame(sci, star, np.zeros(star.shape, bool), sky_sigma)


def _with_companions(rng, fwhm_px, n_side, step, peak_snr, companion_snr, radius,
                     sky_sigma):
    """Bright stars on :func:`star_grid` with a faint companion each, observed:
    (the companions' x, y and angle from their bright star, the stars' model, the
    observed image)."""
    shape, x, y = star_grid(rng, n_side, step)
    peak = rng.uniform(*peak_snr, x.size) * sky_sigma
    a, r = rng.uniform(0, 2 * np.pi, x.size), rng.uniform(*radius, x.size)
    cx, cy = x + r * np.cos(a), y + r * np.sin(a)
    cpeak = rng.uniform(*companion_snr, x.size) * sky_sigma
    star = moffat_stars_of_peak(shape, np.r_[x, cx], np.r_[y, cy], np.r_[peak, cpeak],
                                fwhm_px=fwhm_px)
    return cx, cy, a, star, _observed(rng, star, sky_sigma)


def bright_pairs_with_hits(seed: int, fwhm_px: float, *, n_side: int = 5, step: int = 64,
                           peak_snr=(500.0, 5000.0), sep=(6.0, 10.0),
                           sky_sigma: float = 33.0):
    """A sky-subtracted frame of bright, blended star pairs (issue 17, ninth round): in
    each of ``n_side`` x ``n_side`` cells two Moffat stars ``sep`` px apart, the brighter
    one's peak ``peak_snr`` sky sigmas, the other 0.4-1 of it, with their Poisson noise;
    and a 1-2 px hit of 20-200 sigma on the sky in each cell's corner. Returns the Frame,
    the stars' model and the true hit mask."""
    rng = np.random.default_rng(seed)
    shape, cx, cy = star_grid(rng, n_side, step)
    a = rng.uniform(0, np.pi, cx.size)
    half = rng.uniform(*sep, cx.size) / 2
    x = np.concatenate([cx + half * np.cos(a), cx - half * np.cos(a)])
    y = np.concatenate([cy + half * np.sin(a), cy - half * np.sin(a)])
    peak = rng.uniform(*peak_snr, cx.size) * sky_sigma
    peak = np.concatenate([peak, peak * rng.uniform(0.4, 1.0, cx.size)])
    star = moffat_stars_of_peak(shape, x, y, peak, fwhm_px=fwhm_px)
    sci = _observed(rng, star, sky_sigma)
    hits = np.zeros(shape, bool)
    for k in range(cx.size):
        hy, hx = int(cy[k] - step / 2 + 6), int(cx[k] - step / 2 + 6)
        amp = rng.uniform(20, 200) * sky_sigma
        sci[hy, hx] += amp
        hits[hy, hx] = True
        if rng.random() < 0.5:
            sci[hy + 1, hx] += 0.5 * amp
            hits[hy + 1, hx] = True
    frame = _hit_frame(sci, star, hits, sky_sigma)
    return frame, star, hits


def tracks_across_bright_stars(seed: int, fwhm_px: float, *, beta: float = MOFFAT_BETA,
                               trail_px: float = 0.0, n_side: int = 4, step: int = 64,
                               peak_snr=(80.0, 300.0), radius=(5.0, 11.0),
                               charge=(10.0, 30.0), sky_sigma: float = 20.0):
    """A sky-subtracted frame of bright stars with tracks across their wings (issue 17,
    fourteenth round): a grid of ``n_side`` x ``n_side`` stars (this module's Moffat,
    ``trail_px`` long at one angle for the frame: a point-symmetric, elongated PSF) whose
    peak stands ``peak_snr`` sky sigmas, with their Poisson noise; across every star a
    straight track 16 px long that passes ``radius`` px from its centre, of ``charge``
    sky sigmas per pixel of length, deposited bilinearly every 0.1 px (so it spills
    into its neighbours as a real track does). Returns the Frame, the stars' model, the
    CR charge image and the true hit mask (charge above 5 sky sigmas)."""
    rng = np.random.default_rng(seed)
    shape, x, y = star_grid(rng, n_side, step)
    peak = rng.uniform(*peak_snr, x.size) * sky_sigma
    psf = _Psf(fwhm_px, beta, trail_px=trail_px, trail_angle_deg=rng.uniform(0, 180))
    one = render_stars((65, 65), psf, np.array([32.0]), np.array([32.0]), np.array([1.0]))
    star = render_stars(shape, psf, x, y, peak / float(one.max()))
    from photowatch.sim.detector import deposit

    t = np.arange(-8.0, 8.0, 0.1)  # along a track, from its closest approach
    tx, ty, tw = [], [], []
    for k in range(x.size):
        a, r = rng.uniform(0, 2 * np.pi), rng.uniform(*radius)
        amp = rng.uniform(*charge) * sky_sigma
        ty.append(y[k] + r * np.sin(a) + t * np.cos(a))
        tx.append(x[k] + r * np.cos(a) - t * np.sin(a))
        tw.append(np.full(t.size, 0.1 * amp))
    cr = np.zeros(shape)
    idx, val = deposit(shape, np.concatenate(tx), np.concatenate(ty), np.concatenate(tw))
    cr.ravel()[idx] = val
    sci = _observed(rng, star, sky_sigma) + cr
    hits = cr > 5.0 * sky_sigma
    frame = _hit_frame(sci, star, cr > 0, sky_sigma)
    return frame, star, cr, hits


def hits_beyond_companions(seed: int, fwhm_px: float, *, n_side: int = 4, step: int = 64,
                           peak_snr=(80.0, 300.0), companion_snr=(15.0, 45.0),
                           radius=(4.5, 7.0), hit_snr=(30.0, 60.0),
                           sky_sigma: float = 20.0):
    """A sky-subtracted frame of bright stars with a companion on their shoulder and a hit
    beyond it (issue 17, fourteenth round): a grid of ``n_side`` x ``n_side`` Moffat stars
    of peak ``peak_snr`` sky sigmas, beside each ``radius`` px out a star of
    ``companion_snr``, and 2 px beyond the companion's centre (away from the bright star)
    a 1 px hit of ``hit_snr`` sigmas of the noise there. The companion is not
    point-symmetric about the bright star, and the hit's growth reaches it. Returns the
    Frame and the true hit mask."""
    rng = np.random.default_rng(seed)
    cx, cy, a, star, sci = _with_companions(rng, fwhm_px, n_side, step, peak_snr,
                                            companion_snr, radius, sky_sigma)
    hits = np.zeros(star.shape, bool)
    for k in range(cx.size):
        hy = int(round(cy[k] + 2 * np.sin(a[k])))
        hx = int(round(cx[k] + 2 * np.cos(a[k])))
        sci[hy, hx] += rng.uniform(*hit_snr) * math.sqrt(sky_sigma ** 2 + float(star[hy, hx]))
        hits[hy, hx] = True
    return _hit_frame(sci, star, hits, sky_sigma), hits


def edge_stars_with_hits(seed: int, fwhm_px: float = 2.0, *, size: int = 128,
                         peak_snr=(200.0, 2000.0), beyond=(0.8, 1.3),
                         sky_sigma: float = 20.0):
    """A sky-subtracted ``size``² frame of bright stars cut by its edges (issue 17, ninth
    round): every 16 px along the four sides in turn, a Moffat star whose centre lies
    ``beyond`` px outside the last pixel's centre, with its Poisson noise; and three 3 px
    hits of 20-60 sigma along the top row between them. Returns the Frame, the stars'
    model and the true hit mask."""
    rng = np.random.default_rng(seed)
    n = size
    xs, ys, flux = [], [], []
    for k, pos in enumerate(np.arange(12, n - 12, 16)):
        d = rng.uniform(*beyond)
        x, y = [(pos, -d), (pos, n - 1 + d), (-d, pos), (n - 1 + d, pos)][k % 4]
        xs.append(x)
        ys.append(y)
        flux.append(rng.uniform(*peak_snr) * sky_sigma * 2 * np.pi * (fwhm_px / 2.3548) ** 2)
    star = moffat_stars((n, n), xs, ys, flux, fwhm_px=fwhm_px)
    sci = _observed(rng, star, sky_sigma)
    hits = np.zeros((n, n), bool)
    for x0 in (20, 60, 100):
        sci[0, x0:x0 + 3] += rng.uniform(20, 60) * sky_sigma
        hits[0, x0:x0 + 3] = True
    frame = _hit_frame(sci, star, hits, sky_sigma)
    return frame, star, hits
