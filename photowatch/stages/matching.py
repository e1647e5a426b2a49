"""Star-pattern matching and TAN-SIP fitting: pure geometry, no frames, no I/O.

The pieces :mod:`photowatch.stages.astrometry` assembles:

- :func:`project` / :func:`deproject`: the gnomonic (TAN) projection between
  the sky and standard coordinates (xi, eta) about a tangent point.
- :func:`triangles` and :func:`find_similarity`: a geometric hash of
  asterisms. Each star and its ``k`` nearest neighbours give triangles; a
  triangle's invariants are its side ratios ``(L1/L0, L2/L0)``, unchanged by
  translation, rotation, scale and reflection. Image and reference triangles
  with close invariants and a size ratio within the pixel-scale tolerance are
  paired; each pair is a hypothesis (a similarity with or without
  reflection). Every hypothesis is verified by counting the image stars it
  lands within a radius of a reference star; the best few are refitted on
  their pairs and counted again in a tight radius, and must beat chance
  (:func:`chance_needed`: the reference stars in the hypothesis' footprint,
  the radius and the number of hypotheses tried, a Poisson test). (The idea
  of astroalign's triangle invariants, with astrometry.net's habit of
  verifying every hypothesis against the whole star list.)
- :func:`spread_order`: the brightest star of each cell of a grid first, so a
  pattern covers the whole frame.
- :func:`shift_search` and :func:`fit_affine`: the warm start. With the
  previous solution of the same field the reference stars are predicted in
  pixels and a shift is searched (a histogram of all image-reference position
  differences); the pairs at that shift get an affine fit whose matches and
  rms are checked before anything is refined.
- :func:`refine`: iterative nearest-neighbour matching with a shrinking
  radius and weighted least squares with sigma clipping: a linear (TAN) fit
  first, then a polynomial of the SIP degree, returned as a
  :class:`TanSip` (CRPIX fixed, CRVAL, CD and SIP A/B fitted, AP/BP inverse
  fitted on a grid).

Units: pixels are 0-based in code (FITS CRPIX is 1-based); sky angles in
degrees; standard coordinates and radii in arcseconds unless named ``_deg``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

ARCSEC_PER_DEG = 3600.0


# ---------------------------------------------------------------------------
# projection


def project(ra, dec, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection: sky (deg) → standard coordinates (xi, eta) in degrees.

    ``xi`` points east, ``eta`` north; they equal the intermediate world
    coordinates of a FITS TAN WCS whose CRVAL is (``ra0``, ``dec0``). Points
    more than 90 degrees away get NaN.
    """
    a = np.radians(np.asarray(ra, dtype=np.float64) - ra0)
    d = np.radians(np.asarray(dec, dtype=np.float64))
    d0 = math.radians(dec0)
    cosd, sind = np.cos(d), np.sin(d)
    cosa = np.cos(a)
    den = sind * math.sin(d0) + cosd * math.cos(d0) * cosa
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.where(den > 0, cosd * np.sin(a) / den, np.nan)
        eta = np.where(den > 0, (sind * math.cos(d0) - cosd * math.sin(d0) * cosa) / den, np.nan)
    return np.degrees(xi), np.degrees(eta)


def deproject(xi, eta, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`project`: standard coordinates (deg) → sky (deg)."""
    x = np.radians(np.asarray(xi, dtype=np.float64))
    y = np.radians(np.asarray(eta, dtype=np.float64))
    d0 = math.radians(dec0)
    den = math.cos(d0) - y * math.sin(d0)
    ra = ra0 + np.degrees(np.arctan2(x, den))
    dec = np.degrees(np.arctan2(math.sin(d0) + y * math.cos(d0), np.hypot(x, den)))
    return ra % 360.0, dec


# ---------------------------------------------------------------------------
# one-to-one nearest-neighbour matching


def match_nearest(a: np.ndarray, b: np.ndarray, radius: float, *, tree=None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one pairs of points of ``a`` and ``b`` (n x 2) closer than ``radius``.

    Each point of ``a`` takes its nearest point of ``b``; when several take the
    same point of ``b`` only the closest keeps it. Returns indices into ``a``,
    into ``b`` and the distances. ``tree`` may be a ``cKDTree`` of ``b`` (all
    finite) built once for repeated calls.
    """
    from scipy.spatial import cKDTree

    empty = (np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp), np.zeros(0))
    if len(a) == 0 or len(b) == 0:
        return empty
    good_a = np.flatnonzero(np.isfinite(a).all(axis=1))
    if tree is None:
        good_b = np.flatnonzero(np.isfinite(b).all(axis=1))
        if good_b.size == 0:
            return empty
        tree = cKDTree(b[good_b])
    else:
        good_b = np.arange(len(b))
    if good_a.size == 0:
        return empty
    dist, j = tree.query(a[good_a], k=1, distance_upper_bound=radius)
    ok = np.isfinite(dist)
    ia, jb, dist = good_a[ok], good_b[j[ok]], dist[ok]
    order = np.argsort(dist, kind="stable")
    ia, jb, dist = ia[order], jb[order], dist[order]
    _, first = np.unique(jb, return_index=True)
    first = np.sort(first)
    return ia[first], jb[first], dist[first]


# ---------------------------------------------------------------------------
# triangle hash


@dataclass(frozen=True)
class Triangles:
    """Triangles of a point set, vertices ordered by the side they face.

    ``vertices[:, 0]`` faces the longest side, ``[:, 2]`` the shortest, so
    corresponding vertices of two similar triangles line up (also under a
    reflection). ``invariants`` are ``(L1/L0, L2/L0)``; ``size`` is ``L0``;
    ``orientation`` is the sign of the ordered triangle's area.
    """

    vertices: np.ndarray
    invariants: np.ndarray
    size: np.ndarray
    orientation: np.ndarray

    def __len__(self) -> int:
        return len(self.size)


def triangles(xy: np.ndarray, *, k: int = 5, min_size: float = 0.0,
              ambiguity: float = 0.01) -> Triangles:
    """Triangles of each point and pairs of its ``k`` nearest neighbours.

    Parameters
    ----------
    xy : (n, 2) array
        Positions (any units).
    k : int
        Neighbours per point; ``C(k+1, 3)`` triangles per point before
        duplicates are removed.
    min_size : float
        Smallest longest side kept (same units as ``xy``).
    ambiguity : float
        Triangles whose sorted sides differ by less than this fraction of the
        longest side are dropped: their vertex order is not reproducible.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    empty = Triangles(np.zeros((0, 3), dtype=np.intp), np.zeros((0, 2)), np.zeros(0),
                      np.zeros(0))
    if n < 3:
        return empty
    k = min(k, n - 1)
    _, nb = cKDTree(xy).query(xy, k + 1)
    nb = np.asarray(nb).reshape(n, k + 1)
    combos = np.array(list(itertools.combinations(range(k + 1), 3)))
    tri = np.sort(nb[:, combos].reshape(-1, 3), axis=1)
    tri = np.unique(tri, axis=0)
    p = xy[tri]
    sides = np.stack([np.hypot(*(p[:, 1] - p[:, 2]).T), np.hypot(*(p[:, 0] - p[:, 2]).T),
                      np.hypot(*(p[:, 0] - p[:, 1]).T)], axis=1)
    order = np.argsort(-sides, axis=1)
    sides = np.take_along_axis(sides, order, axis=1)
    verts = np.take_along_axis(tri, order, axis=1)
    longest = sides[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = sides[:, 1:] / longest[:, None]
        keep = ((longest > max(min_size, 0.0)) & (sides[:, 0] - sides[:, 1] > ambiguity * longest)
                & (sides[:, 1] - sides[:, 2] > ambiguity * longest) & (inv[:, 1] > 0.05))
    verts, inv, longest = verts[keep], inv[keep], longest[keep]
    q = xy[verts]
    cross = ((q[:, 1, 0] - q[:, 0, 0]) * (q[:, 2, 1] - q[:, 0, 1])
             - (q[:, 1, 1] - q[:, 0, 1]) * (q[:, 2, 0] - q[:, 0, 0]))
    return Triangles(verts, inv, longest, np.sign(cross))


@dataclass(frozen=True)
class Similarity:
    """``w = a z + b`` (or ``a conj(z) + b`` when ``flip``) with ``z = x + iy``.

    ``abs(a)`` is the scale (output units per input unit), ``angle(a)`` the
    rotation.
    """

    a: complex
    b: complex
    flip: bool

    def apply(self, xy: np.ndarray) -> np.ndarray:
        z = xy[:, 0] + 1j * xy[:, 1]
        if self.flip:
            z = np.conj(z)
        w = self.a * z + self.b
        return np.column_stack([w.real, w.imag])

    @property
    def scale(self) -> float:
        return abs(self.a)

    @property
    def rotation_deg(self) -> float:
        return math.degrees(np.angle(self.a))


@dataclass(frozen=True)
class PatternMatch:
    """The best verified hypothesis of :func:`find_similarity`."""

    transform: Similarity
    nmatch: int  #: image stars within the (tight) verification radius of a reference star
    expected: float  #: chance matches expected per hypothesis
    needed: int  #: matches needed to beat chance over all hypotheses
    nhypotheses: int
    radius: float = float("nan")  #: the radius ``nmatch`` was counted in (reference units)
    rms: float = float("nan")  #: rms of the matched pairs about the refitted transform
    noverlap: int = 0  #: verification stars inside the image footprint


def _fit_similarities(z: np.ndarray, w: np.ndarray, flip: np.ndarray):
    """Least-squares similarities mapping each row of ``z`` onto ``w`` (complex, (h, m))."""
    z = np.where(flip[:, None], np.conj(z), z)
    zm = z.mean(axis=1, keepdims=True)
    wm = w.mean(axis=1, keepdims=True)
    zc, wc = z - zm, w - wm
    a = (np.conj(zc) * wc).sum(axis=1) / (np.abs(zc) ** 2).sum(axis=1)
    b = wm[:, 0] - a * zm[:, 0]
    return a, b


def poisson_needed(expected: float, ntrials: int, false_alarm: float = 1e-3) -> int:
    """Smallest count whose chance probability, over ``ntrials``, is below ``false_alarm``.

    Chance counts are Poisson with mean ``expected``; ``ntrials`` independent
    tries multiply the false-alarm probability (a union bound).
    """
    lam = max(float(expected), 1e-12)
    target = false_alarm / max(int(ntrials), 1)
    term = math.exp(-lam)  # P(X = 0)
    cdf = term
    k = 1  # P(X >= k) = 1 - P(X <= k - 1)
    while 1.0 - cdf > target and k < 100000:
        term *= lam / k
        cdf += term
        k += 1
    return k


def binomial_needed(n: int, p: float, ntrials: int, false_alarm: float = 1e-3) -> int:
    """Smallest count whose chance probability, over ``ntrials``, is below ``false_alarm``,
    for ``n`` stars each matching by chance with probability ``p`` (Binomial(n, p)); n + 1
    when not even all ``n`` are that unlikely.

    Exact where :func:`poisson_needed` is not: a Poisson count has no ceiling, and on a
    small field (a 61" frame at 0.12"/px, 2" radius, 7-8 stars) its tail asked 8 matches
    of 7 stars, so a complete match could never pass.
    """
    from scipy.stats import binom

    n = max(int(n), 0)
    target = false_alarm / max(int(ntrials), 1)
    ks = np.arange(n + 1)
    tail = binom.sf(ks - 1, n, min(max(float(p), 0.0), 1.0))  # P(X >= k)
    ok = np.flatnonzero(tail <= target)
    return int(ok[0]) if ok.size else n + 1


def chance_needed(nstars: int, noverlap: int, area: float, radius: float, ntrials: int, *,
                  fixed: int = 3, false_alarm: float = 1e-3) -> tuple[float, int]:
    """Matches a hypothesis needs to beat chance, from the actual numbers.

    ``nstars`` image stars are checked against ``noverlap`` reference stars
    that lie in the overlap (area ``area``) of the image footprint with the
    reference; a star matches by chance when it lands within ``radius`` of
    one of them (probability ``noverlap * pi radius**2 / area``). ``fixed``
    stars match by construction (a triangle's vertices), and ``ntrials``
    hypotheses were tried (:func:`binomial_needed`). Returns the expected
    chance count and the matches needed (``fixed`` plus the binomial count):
    a complete match passes whenever it is unlikely by chance; random lists
    do not.
    """
    p = min(1.0, max(noverlap, 0) * math.pi * radius**2 / max(area, 1e-12))
    free = max(nstars - fixed, 0)
    return free * p, fixed + binomial_needed(free, p, ntrials, false_alarm)


def spread_order(xy: np.ndarray, ncells: int, lo=None, hi=None) -> np.ndarray:
    """Order points (given bright first) so that they spread over the field.

    The box ``lo``..``hi`` (default: the points' bounding box) is cut into
    about ``ncells`` square-ish cells; the brightest point of every cell comes
    first (in brightness order), then the second of every cell, and so on.
    The first ``ncells`` of the result are a grid selection: the brightest
    star per cell, so a frame whose bright stars crowd one corner still gives
    a pattern over the whole frame.
    """
    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    if n == 0:
        return np.zeros(0, dtype=np.intp)
    lo = xy.min(axis=0) if lo is None else np.asarray(lo, dtype=np.float64)
    hi = xy.max(axis=0) if hi is None else np.asarray(hi, dtype=np.float64)
    span = np.maximum(hi - lo, 1e-9)
    g = max(int(math.ceil(math.sqrt(max(ncells, 1)))), 1)
    aspect = span[0] / span[1]
    gx = max(int(round(g * math.sqrt(aspect))), 1)
    gy = max(int(round(g / math.sqrt(aspect))), 1)
    ix = np.clip(((xy[:, 0] - lo[0]) / span[0] * gx).astype(np.intp), 0, gx - 1)
    iy = np.clip(((xy[:, 1] - lo[1]) / span[1] * gy).astype(np.intp), 0, gy - 1)
    cell = iy * gx + ix
    # rank of each point within its cell, in the given (brightness) order
    order = np.argsort(cell, kind="stable")
    sorted_cells = cell[order]
    start = np.r_[0, np.flatnonzero(np.diff(sorted_cells)) + 1]
    counts = np.diff(np.r_[start, n])
    rank = np.empty(n, dtype=np.intp)
    rank[order] = np.arange(n) - np.repeat(start, counts)
    return np.lexsort((np.arange(n), rank))


def _refit_similarity(zimg: np.ndarray, wref: np.ndarray, flip: bool) -> tuple[complex, complex]:
    a, b = _fit_similarities(zimg[None, :], wref[None, :], np.array([flip]))
    return complex(a[0]), complex(b[0])


def find_similarity(img_xy: np.ndarray, ref_xy: np.ndarray, *, verify_xy: np.ndarray,
                    scale: float, scale_tolerance: float, max_offset: float,
                    radius: float, search_area: float, min_matches: int, k: int = 5,
                    tolerance: float = 0.012, max_hypotheses: int = 20000,
                    extent: tuple[float, float] | None = None,
                    tight_radius: float | None = None, candidates: int = 25,
                    false_alarm: float = 1e-3) -> tuple[PatternMatch | None, str]:
    """Find the similarity (any rotation, either parity) mapping image stars on reference stars.

    Parameters
    ----------
    img_xy : (n, 2) array
        Brightest image stars, pixels relative to the image centre.
    ref_xy : (m, 2) array
        Brightest reference stars, standard coordinates (arcsec) about the
        guessed image centre; about as dense as the image list.
    verify_xy : (p, 2) array
        Reference stars used to count matches (``ref_xy`` or a deeper list).
    scale : float
        Expected pixel scale (arcsec per pixel).
    scale_tolerance : float
        Fractional uncertainty of ``scale``.
    max_offset : float
        Largest distance (arcsec) of the image centre from the guessed centre.
    radius : float
        Verification radius (arcsec).
    search_area : float
        Area (arcsec²) over which ``verify_xy`` was selected (kept for callers;
        the chance rate now comes from the verification stars that fall in the
        image footprint under each hypothesis).
    min_matches : int
        Fewest matches accepted.
    extent : (float, float), optional
        Half-width and half-height of the image (pixels, about its centre);
        default the extent of ``img_xy``.
    tight_radius : float, optional
        Radius (arcsec) of the final count, after the best ``candidates``
        hypotheses are refitted on the stars they matched within ``radius``
        (default ``radius / 2``).
    false_alarm : float
        Chance of accepting a random list (split it over repeated calls).

    Every hypothesis is counted within ``radius``; the best ``candidates`` are
    refitted (a least-squares similarity on their matched pairs) and counted
    again within ``tight_radius``, and within the radius the refit allows (four times
    its pairs' median distance, at least ``tight_radius / 8``). The chance threshold
    (:func:`chance_needed`) uses the image stars, the verification stars in
    the hypothesis' footprint, the radius and the number of hypotheses; the better
    of the two counts is kept.

    Returns
    -------
    PatternMatch or None, and a reason when None.
    """
    from scipy.spatial import cKDTree

    if len(img_xy) < 3 or len(ref_xy) < 3:
        return None, f"too few stars for a pattern ({len(img_xy)} image, {len(ref_xy)} reference)"
    ti = triangles(img_xy, k=k, min_size=5.0)
    tr = triangles(ref_xy, k=k, min_size=5.0 * scale)
    if len(ti) == 0 or len(tr) == 0:
        return None, "no usable triangles"
    pairs = cKDTree(ti.invariants).query_ball_tree(cKDTree(tr.invariants), tolerance)
    lens = np.fromiter((len(p) for p in pairs), dtype=np.intp, count=len(pairs))
    if lens.sum() == 0:
        return None, f"no matching triangles ({len(ti)} image, {len(tr)} reference)"
    ii = np.repeat(np.arange(len(pairs)), lens)
    jj = np.fromiter(itertools.chain.from_iterable(pairs), dtype=np.intp, count=int(lens.sum()))
    ratio = tr.size[jj] / (ti.size[ii] * scale)
    slack = scale_tolerance + 0.01
    ok = (ratio > 1 - slack) & (ratio < 1 + slack)
    ii, jj = ii[ok], jj[ok]
    if ii.size == 0:
        return None, "no matching triangles of the expected size"
    if ii.size > max_hypotheses:
        dist = np.abs(ti.invariants[ii] - tr.invariants[jj]).sum(axis=1)
        best = np.argsort(dist)[:max_hypotheses]
        ii, jj = ii[best], jj[best]
    zi = img_xy[ti.vertices[ii]]
    wr = ref_xy[tr.vertices[jj]]
    z = zi[..., 0] + 1j * zi[..., 1]
    w = wr[..., 0] + 1j * wr[..., 1]
    flip = ti.orientation[ii] != tr.orientation[jj]
    a, b = _fit_similarities(z, w, flip)
    s = np.abs(a) / scale
    ok = (np.abs(s - 1) <= slack) & (np.abs(b) <= max_offset)
    a, b, flip = a[ok], b[ok], flip[ok]
    nh = len(a)
    if nh == 0:
        return None, "no triangle pair within the scale and pointing tolerances"

    # verify every hypothesis on all image stars at once
    zall = img_xy[:, 0] + 1j * img_xy[:, 1]
    pred = a[:, None] * np.where(flip[:, None], np.conj(zall)[None, :], zall[None, :]) + b[:, None]
    tree = cKDTree(verify_xy)
    flat = np.column_stack([pred.real.ravel(), pred.imag.ravel()])
    dist, _ = tree.query(flat, k=1, distance_upper_bound=radius)
    counts = np.isfinite(dist).reshape(nh, len(zall)).sum(axis=1)

    # the best few: refit on their pairs, count again in the tight radius, and judge each
    # against the chance of its own overlap
    rt = radius / 2.0 if tight_radius is None else float(tight_radius)
    if extent is None:
        hx, hy = (float(v) for v in np.abs(img_xy).max(axis=0))
    else:
        hx, hy = (float(v) for v in extent)
    vz = verify_xy[:, 0] + 1j * verify_xy[:, 1]
    best = None
    for h in np.argsort(-counts, kind="stable")[:max(int(candidates), 1)]:
        if counts[h] < 3:
            break
        ah, bh, fh = complex(a[h]), complex(b[h]), bool(flip[h])
        ii = np.zeros(0, dtype=np.intp)
        r_use = radius
        for r_use in (radius, rt, rt):
            pz = ah * (np.conj(zall) if fh else zall) + bh
            ii, jj, _ = match_nearest(np.column_stack([pz.real, pz.imag]), verify_xy, r_use,
                                      tree=tree)
            if len(ii) < 3:
                break
            ah, bh = _refit_similarity(zall[ii], vz[jj], fh)
        if len(ii) < 3:
            continue
        pz = ah * (np.conj(zall) if fh else zall) + bh
        ii, jj, d = match_nearest(np.column_stack([pz.real, pz.imag]), verify_xy, rt, tree=tree)
        if abs(abs(ah) / scale - 1) > slack:
            continue
        # verification stars in the footprint under this hypothesis
        back = (vz - bh) / ah
        if fh:
            back = np.conj(back)
        inside = (np.abs(back.real) <= hx) & (np.abs(back.imag) <= hy)
        area = 4 * hx * hy * abs(ah) ** 2
        on_img = int(((np.abs(zall.real) <= hx) & (np.abs(zall.imag) <= hy)).sum())
        noverlap = int(inside.sum())
        expected, needed = chance_needed(on_img, noverlap, area, rt, nh,
                                         false_alarm=false_alarm)
        nmatch, r_count = int(len(ii)), rt
        # ... and in the radius the fit allows: the true pairs of a small field sit far
        # inside rt (2" is 17 px at 0.12"/px, where a deep catalogue has a star near most
        # image stars by chance: "matched 9 of 9 stars, need 10"). Four times the pairs'
        # median distance (a true pair lies beyond it once in 1e5), at least rt / 8, judged
        # against chance in that radius (its own share of the false-alarm budget)
        if len(d):
            r_fit = min(rt, max(4.0 * float(np.median(d)), rt / 8.0))
            if r_fit < rt:
                e_fit, n_need = chance_needed(on_img, noverlap, area, r_fit, nh,
                                              false_alarm=false_alarm / 4)
                n_fit = int((d <= r_fit).sum())
                if n_fit - n_need > nmatch - needed:
                    nmatch, r_count, expected, needed = n_fit, r_fit, e_fit, n_need
        needed = max(min_matches, needed)
        rms = float(np.sqrt(np.mean(d**2))) if len(d) else float("nan")
        cand = PatternMatch(Similarity(ah, bh, fh), nmatch, float(expected), int(needed),
                            nh, r_count, rms, noverlap)
        if best is None or (cand.nmatch - cand.needed, cand.nmatch) > (
                best.nmatch - best.needed, best.nmatch):
            best = cand
    if best is None:
        return None, (f"no pattern match: best hypothesis matched {counts.max()} of "
                      f"{len(img_xy)} stars within {radius:.1f} ({nh} hypotheses)")
    log.debug("pattern: %d hypotheses, best %d of %d within %.2f (chance %.2f, need %d)", nh,
              best.nmatch, len(zall), rt, best.expected, best.needed)
    if best.nmatch < best.needed:
        return None, (f"no pattern match: best hypothesis matched {best.nmatch} of "
                      f"{len(img_xy)} stars, need {best.needed} ({best.noverlap} reference stars "
                      f"in its footprint, radius {rt:.2f}, {nh} hypotheses)")
    return best, ""


# ---------------------------------------------------------------------------
# shift search (warm start)


def shift_search(img_xy: np.ndarray, ref_xy: np.ndarray, *, max_shift: float,
                 bin_size: float) -> tuple[np.ndarray, int]:
    """The shift ``ref - img`` that lines up most pairs, by a histogram of differences.

    Returns the shift (2,) and the number of pairs within one bin of it
    (0 and a zero shift when there are no pairs).
    """
    if len(img_xy) == 0 or len(ref_xy) == 0:
        return np.zeros(2), 0
    d = (ref_xy[None, :, :] - img_xy[:, None, :]).reshape(-1, 2)
    d = d[(np.abs(d) <= max_shift).all(axis=1)]
    if len(d) == 0:
        return np.zeros(2), 0
    nb = int(math.ceil(2 * max_shift / bin_size)) + 2
    ij = np.floor((d + max_shift) / bin_size).astype(np.intp) + 1
    hist = np.bincount(ij[:, 1] * nb + ij[:, 0], minlength=nb * nb).reshape(nb, nb)
    # sum 2x2 cells so a peak split between bins is not lost
    h2 = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
    py, px = np.unravel_index(int(np.argmax(h2)), h2.shape)
    centre = np.array([px, py]) * bin_size - max_shift
    near = (np.abs(d - centre) <= bin_size * 1.5).all(axis=1)
    if not near.any():
        return np.zeros(2), 0
    shift = np.median(d[near], axis=0)
    votes = int((np.abs(d - shift) <= bin_size).all(axis=1).sum())
    return shift, votes


def fit_affine(src: np.ndarray, dst: np.ndarray, *, clip_sigma: float = 3.0,
               iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares affine map ``dst ~ M @ src + t`` with sigma clipping.

    Returns the (2, 3) matrix ``[M | t]`` and a bool array of the pairs kept.
    Fewer than three pairs give the pure shift of their mean offset.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    keep = np.ones(len(src), dtype=bool)
    if len(src) < 3:
        t = (dst - src).mean(axis=0) if len(src) else np.zeros(2)
        return np.array([[1.0, 0.0, t[0]], [0.0, 1.0, t[1]]]), keep
    centre = src.mean(axis=0)
    design = np.column_stack([src - centre, np.ones(len(src))])
    coef = None
    for _ in range(iterations + 1):
        coef = np.linalg.lstsq(design[keep], dst[keep], rcond=None)[0]  # (3, 2)
        r = np.hypot(*(dst - design @ coef).T)
        sigma = max(float(np.median(r[keep])) / 1.1774, 1e-6)
        new_keep = r <= clip_sigma * sigma
        if new_keep.sum() < 3 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    m = coef[:2].T
    t = coef[2] - m @ centre
    return np.column_stack([m, t]), keep


# ---------------------------------------------------------------------------
# TAN-SIP


def _terms(degree: int, min_order: int = 0) -> list[tuple[int, int]]:
    return [(p, n - p) for n in range(min_order, degree + 1) for p in range(n, -1, -1)]


def _design(u: np.ndarray, v: np.ndarray, terms) -> np.ndarray:
    return np.column_stack([u**p * v**q for p, q in terms]) if terms else np.zeros((len(u), 0))


def _lstsq(design: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Least squares by the normal equations, columns scaled to unit norm.

    The systems here are tall and thin (stars x at most 21 terms, pixel
    offsets normalised to about 1), so the normal equations are well
    conditioned; LAPACK's factorisations of the tall matrix (gelsd, gelsy, QR)
    were 100 times slower with some OpenBLAS builds on a busy machine. An
    ill-conditioned system falls back to SVD.
    """
    norm = np.sqrt((design**2).sum(axis=0))
    norm[norm == 0] = 1.0
    a = design / norm
    ata = a.T @ a
    if np.linalg.cond(ata) > 1e12:
        return np.linalg.lstsq(design, rhs, rcond=None)[0]
    return np.linalg.solve(ata, a.T @ rhs) / norm[:, None]


def nterms(degree: int) -> int:
    return (degree + 1) * (degree + 2) // 2


@dataclass(frozen=True)
class TanSip:
    """A TAN-SIP solution.

    ``crpix`` is 1-based (FITS); ``cd`` in degrees per pixel; ``a``/``b`` map
    pixel offsets ``(u, v) = (x - crpix1 + 1, y - crpix2 + 1)`` (0-based x, y)
    to SIP corrections; ``ap``/``bp`` are the inverse. Arrays are
    ``(order+1, order+1)`` with ``[p, q]`` the coefficient of ``u^p v^q``.
    """

    crpix: tuple[float, float]
    crval: tuple[float, float]
    cd: np.ndarray
    a: np.ndarray
    b: np.ndarray
    ap: np.ndarray
    bp: np.ndarray
    degree: int

    def to_wcs(self):
        """An astropy WCS (CTYPE ``RA---TAN-SIP``/``DEC--TAN-SIP``)."""
        from astropy.wcs import WCS, Sip

        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.wcs.crpix = list(self.crpix)
        w.wcs.crval = list(self.crval)
        w.wcs.cd = self.cd
        w.wcs.cunit = ["deg", "deg"]
        w.wcs.radesys = "ICRS"
        w.sip = Sip(self.a, self.b, self.ap, self.bp, list(self.crpix))
        w.wcs.set()
        return w

    def pix2world(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Sky (deg) of 0-based pixels, without astropy (fast, for fitting)."""
        u = np.asarray(x, dtype=np.float64) - (self.crpix[0] - 1)
        v = np.asarray(y, dtype=np.float64) - (self.crpix[1] - 1)
        uu = u + _poly_eval(self.a, u, v)
        vv = v + _poly_eval(self.b, u, v)
        xi = self.cd[0, 0] * uu + self.cd[0, 1] * vv
        eta = self.cd[1, 0] * uu + self.cd[1, 1] * vv
        return deproject(xi, eta, *self.crval)


def _poly_eval(coef: np.ndarray, u, v):
    out = np.zeros_like(u)
    order = coef.shape[0] - 1
    for p in range(order + 1):
        for q in range(order + 1 - p):
            c = coef[p, q]
            if c:
                out = out + c * u**p * v**q
    return out


@dataclass(frozen=True)
class PolyFit:
    """A weighted polynomial fit of standard coordinates on pixel offsets."""

    solution: TanSip
    residuals: np.ndarray  #: (n, 2) arcsec (observed - fitted) for the fitted pairs
    keep: np.ndarray  #: bool (n,), pairs kept after clipping


def fit_tan_sip(x, y, ra, dec, *, crpix: tuple[float, float], crval: tuple[float, float],
                degree: int, scale_px: float, weights: np.ndarray | None = None,
                clip_sigma: float = 3.0, max_clip_iter: int = 5,
                shape: tuple[int, int] | None = None, inverse: bool = True,
                radial: bool = False) -> PolyFit:
    """Fit CRVAL, CD and SIP (of ``degree``) to matched pixel and sky positions.

    The tangent point (CRVAL) is moved until the fit's constant term
    vanishes, so CRPIX stays where it was given (the optical centre). Pairs
    whose weighted residual exceeds ``clip_sigma`` times its robust scale are
    rejected, iteratively.

    Parameters
    ----------
    x, y : arrays
        0-based pixel positions.
    ra, dec : arrays
        Matched sky positions (deg).
    crpix : (float, float)
        1-based reference pixel.
    crval : (float, float)
        First guess of the tangent point (deg).
    degree : int
        Total polynomial degree (1 = TAN only; SIP terms are degrees 2..degree).
    scale_px : float
        Normalisation of pixel offsets (e.g. half the image size), for conditioning.
    weights : array, optional
        Inverse variances (any scale).
    shape : (ny, nx), optional
        Image shape: the inverse SIP (AP, BP) is fitted on a grid over it.
    inverse : bool
        Fit the inverse SIP (False leaves AP/BP zero: for intermediate fits).
    radial : bool
        Fit one more term, the optics' radial distortion about CRPIX (``u (1 + k r²)``,
        ``v (1 + k r²)``: SIP A_3_0 = A_1_2 = B_2_1 = B_0_3 = k): one parameter where a
        full cubic SIP takes 14, for fields of too few stars for that (a linear fit
        left 0.1-0.4 px at the corners of sparse simulated fields).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    u = (x - (crpix[0] - 1)) / scale_px
    v = (y - (crpix[1] - 1)) / scale_px
    terms = _terms(max(degree, 1))
    lin = {t: i for i, t in enumerate(terms)}
    design = _design(u, v, terms)
    r2 = u * u + v * v
    if shape is not None:  # the farthest corner from CRPIX, in normalised offsets
        hx = max(crpix[0] - 0.5, shape[1] - crpix[0] + 0.5) / scale_px
        hy = max(crpix[1] - 0.5, shape[0] - crpix[1] + 0.5) / scale_px
        corner2 = hx * hx + hy * hy
    else:
        corner2 = float(r2.max()) if n else 2.0
    keep = np.ones(n, dtype=bool)
    crval = (float(crval[0]), float(crval[1]))
    coef = None
    k = 0.0  # the radial term, in normalised offsets
    for _ in range(max_clip_iter + 1):
        for _ in range(4):  # move the tangent point until the constant term vanishes
            xi, eta = project(ra, dec, *crval)
            sw = np.sqrt(w[keep])
            std = np.column_stack([xi, eta])
            coef = _lstsq(design[keep] * sw[:, None], std[keep] * sw[:, None])
            if radial:
                coef_r, k, k_err, red = _fit_radial(design[keep], std[keep], sw,
                                                    r2[keep], u[keep], v[keep], coef, lin)
                # only a term the pairs measure (on few noisy centroids a free one adds
                # more noise at the corners than the distortion it removes), one optics
                # can have (a few blended pairs of a dense 61" field measured 4 %, 15 px,
                # at the corners "significantly"), and one that leaves the pairs within
                # their errors: pairs 20 times their errors off (rms 0.21" of 13) are not
                # distortion, and a term there bent a frame 0.9 px off at its corners
                if (abs(k) >= RADIAL_SIGNIFICANCE * k_err and abs(k) * corner2 <= RADIAL_MAX
                        and red <= RADIAL_MAX_CHI2):
                    coef = coef_r
                else:
                    k = 0.0
            c0 = coef[0]
            if np.hypot(*c0) * ARCSEC_PER_DEG < 1e-6:
                break
            ra0, dec0 = deproject(c0[0], c0[1], *crval)
            crval = (float(ra0), float(dec0))
        xi, eta = project(ra, dec, *crval)
        model = design @ coef + (k * _radial_part(u, v, r2, coef, lin) if k else 0.0)
        resid = (np.column_stack([xi, eta]) - model) * ARCSEC_PER_DEG
        r = np.hypot(resid[:, 0], resid[:, 1])
        chi = r * np.sqrt(w / np.median(w[keep]))
        sigma = max(np.median(chi[keep]) / 1.1774, 1e-4)
        if weights is not None:
            # a few pairs fitted by nearly as many terms leave residuals far below their
            # errors: clip against the stated errors then, not the overfitted scatter
            sigma = max(sigma, float(np.sqrt(1.0 / np.median(w[keep]))))
        new_keep = chi <= clip_sigma * sigma
        if new_keep.sum() < len(terms) + 2 + radial or np.array_equal(new_keep, keep):
            break
        keep = new_keep

    # coefficients → CD and SIP
    cd = np.array([[coef[lin[(1, 0)], 0], coef[lin[(0, 1)], 0]],
                   [coef[lin[(1, 0)], 1], coef[lin[(0, 1)], 1]]]) / scale_px
    cdinv = np.linalg.inv(cd)
    if k:  # a kept radial term is a cubic SIP
        degree = max(degree, 3)
    order = max(degree, 2)
    a = np.zeros((order + 1, order + 1))
    b = np.zeros((order + 1, order + 1))
    for (p, q), i in lin.items():
        if p + q >= 2:
            corr = cdinv @ coef[i] / scale_px ** (p + q)
            a[p, q], b[p, q] = corr
    if k:
        kp = k / scale_px**2
        a[3, 0] += kp
        a[1, 2] += kp
        b[2, 1] += kp
        b[0, 3] += kp
    if inverse:
        ap, bp = _inverse_sip(a, b, crpix, scale_px, shape, degree)
    else:
        ap = bp = np.zeros((order + 1, order + 1))
    sol = TanSip((float(crpix[0]), float(crpix[1])), crval, cd, a, b, ap, bp, degree)
    return PolyFit(sol, resid, keep)


def _radial_part(u, v, r2, coef, lin) -> np.ndarray:
    """(n, 2): what a unit radial term adds to the standard coordinates (through the
    linear terms of ``coef``)."""
    return (u * r2)[:, None] * coef[lin[(1, 0)]] + (v * r2)[:, None] * coef[lin[(0, 1)]]


def _fit_radial(design, std, sw, r2, u, v, coef, lin, iterations: int = 3):
    """The polynomial ``coef`` and a radial term ``k`` fitted together (both axes share
    ``k``; its columns go through the linear terms, so the fit is repeated with them).
    Returns (coef, k, its standard error, the fit's chi² per degree of freedom)."""
    nt = design.shape[1]
    n = len(u)
    k = 0.0
    for _ in range(iterations):
        rad = _radial_part(u, v, r2, coef, lin)
        big = np.zeros((2 * n, 2 * nt + 1))
        big[:n, :nt] = design
        big[n:, nt:2 * nt] = design
        big[:n, -1] = rad[:, 0]
        big[n:, -1] = rad[:, 1]
        ww = np.r_[sw, sw]
        rhs = np.r_[std[:, 0], std[:, 1]]
        sol = _lstsq(big * ww[:, None], (rhs * ww)[:, None])[:, 0]
        coef = np.column_stack([sol[:nt], sol[nt:2 * nt]])
        k = float(sol[-1])
    # its standard error: the weights are 1/arcsec², the residual scatter scales them
    # when it is the larger (dof permitting)
    a = big * ww[:, None] * ARCSEC_PER_DEG
    dof = 2 * n - big.shape[1]
    chi2 = float((((big @ sol - rhs) * ww * ARCSEC_PER_DEG) ** 2).sum())
    red = chi2 / dof if dof > 0 else float("inf")
    try:
        var_k = float(np.linalg.inv(a.T @ a)[-1, -1]) * max(1.0, red)
    except np.linalg.LinAlgError:
        var_k = float("inf")
    return coef, k, math.sqrt(var_k) if var_k >= 0 else float("inf"), red


def _inverse_sip(a, b, crpix, scale_px, shape, degree):
    order = max(degree, 2)
    if degree < 2 or not (a.any() or b.any()):
        return np.zeros((order + 1, order + 1)), np.zeros((order + 1, order + 1))
    if shape is None:
        half = scale_px
        lo_x, hi_x = -half, half
        lo_y, hi_y = -half, half
    else:
        ny, nx = shape
        lo_x, hi_x = -(crpix[0] - 1) - 0.5, nx - crpix[0] + 0.5
        lo_y, hi_y = -(crpix[1] - 1) - 0.5, ny - crpix[1] + 0.5
    g = np.linspace(0, 1, 40)
    uu, vv = np.meshgrid(lo_x + g * (hi_x - lo_x), lo_y + g * (hi_y - lo_y))
    u, v = uu.ravel(), vv.ravel()
    fu = u + _poly_eval(a, u, v)
    fv = v + _poly_eval(b, u, v)
    inv_order = order + 1
    terms = _terms(inv_order, 1)
    design = _design(fu / scale_px, fv / scale_px, terms)
    coef = _lstsq(design, np.column_stack([u - fu, v - fv]))
    ap = np.zeros((inv_order + 1, inv_order + 1))
    bp = np.zeros((inv_order + 1, inv_order + 1))
    for (p, q), c in zip(terms, coef):
        ap[p, q] = c[0] / scale_px ** (p + q - 1)
        bp[p, q] = c[1] / scale_px ** (p + q - 1)
    return ap, bp


# ---------------------------------------------------------------------------
# iterative refinement


@dataclass(frozen=True)
class Refined:
    """The outcome of :func:`refine`."""

    solution: TanSip | None
    img_index: np.ndarray  #: indices of the matched image stars (kept pairs)
    ref_index: np.ndarray  #: indices of their reference stars
    residuals: np.ndarray  #: (n, 2) arcsec, kept pairs
    rms_arcsec: float  #: rms of the radial residual of the kept pairs
    degree: int
    reason: str = ""
    history: list = field(default_factory=list)


#: matched stars required per polynomial term (per axis) before a degree is fitted
PAIRS_PER_TERM = 5
#: matched stars required for the radial distortion term below the cubic SIP's 50
RADIAL_MIN_PAIRS = 8
#: ... and kept only when it is this many standard errors from zero
RADIAL_SIGNIFICANCE = 3.0
#: ... and at most this relative distortion at the farthest corner (1 %: more than the
#: imagers photowatch knows; a 4k frame's corner 15 px)
RADIAL_MAX = 0.01
#: ... and when the fit with it leaves the pairs within twice their errors (chi²/dof)
RADIAL_MAX_CHI2 = 4.0


def choose_degree(nmatch: int, degree: int) -> int:
    """The highest degree up to ``degree`` that ``nmatch`` pairs constrain.

    Degree ``d`` needs :data:`PAIRS_PER_TERM` pairs per term: 15 for a linear
    fit, 30 for degree 2, 50 for degree 3.
    """
    d = max(degree, 1)
    while d > 1 and nmatch < PAIRS_PER_TERM * nterms(d):
        d -= 1
    return d


def refine(x, y, ra_ref, dec_ref, *, predict: Callable, crpix: tuple[float, float],
           crval: tuple[float, float], degree: int, start_radius: float,
           match_radius: float, clip_sigma: float, scale_px: float,
           pair_sigma: tuple[np.ndarray, np.ndarray] | None = None,
           shape: tuple[int, int] | None = None, iterations: int = 8,
           min_pairs: int = 3) -> Refined:
    """Match by nearest neighbours and fit, shrinking the radius until stable.

    Parameters
    ----------
    x, y : arrays
        0-based pixel positions of the image stars.
    ra_ref, dec_ref : arrays
        Reference positions (deg).
    predict : callable
        ``predict(x, y) -> (ra, dec)``: the first mapping (a pattern match or
        the previous solution shifted).
    crpix, crval : (float, float)
        Reference pixel (1-based, kept) and first tangent point (deg).
    degree : int
        Target polynomial degree; the first fit is linear.
    start_radius, match_radius : float
        First and final matching radii (arcsec).
    clip_sigma : float
        Outlier clipping threshold.
    pair_sigma : (array, array), optional
        Positional uncertainty (arcsec) of each image star and each reference
        star; a pair is weighted by the inverse of their summed variances.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ra_ref = np.asarray(ra_ref, dtype=np.float64)
    dec_ref = np.asarray(dec_ref, dtype=np.float64)
    if pair_sigma is None:
        sig_img, sig_ref = np.full(len(x), 0.1), np.zeros(len(ra_ref))
    else:
        sig_img, sig_ref = (np.asarray(s_, dtype=np.float64) for s_ in pair_sigma)
    ra_p, dec_p = predict(x, y)
    radius = start_radius
    deg = 1
    prev_pairs = None
    fit = None
    history = []
    ii = jj = np.zeros(0, dtype=np.intp)
    for it in range(iterations):
        xi_r, eta_r = project(ra_ref, dec_ref, *crval)
        xi_p, eta_p = project(ra_p, dec_p, *crval)
        ref_std = np.column_stack([xi_r, eta_r]) * ARCSEC_PER_DEG
        pred_std = np.column_stack([xi_p, eta_p]) * ARCSEC_PER_DEG
        ii, jj, _ = match_nearest(pred_std, ref_std, radius)
        history.append((it, radius, deg, len(ii)))
        if len(ii) < max(min_pairs, 3):
            return Refined(None, ii, jj, np.zeros((0, 2)), float("nan"), deg,
                           f"only {len(ii)} stars matched within {radius:.2f} arcsec", history)
        pairs = (tuple(ii), tuple(jj))
        if it > 0:
            deg = choose_degree(len(ii), degree)
        weights = 1.0 / (sig_img[ii] ** 2 + sig_ref[jj] ** 2)
        while True:
            # too few pairs for the cubic SIP: the optics' radial term alone
            radial = it > 0 and deg < 3 <= degree and len(ii) >= RADIAL_MIN_PAIRS
            fit_pairs = functools.partial(
                fit_tan_sip, x[ii], y[ii], ra_ref[jj], dec_ref[jj], crpix=crpix, crval=crval,
                degree=deg, scale_px=scale_px, weights=weights, clip_sigma=clip_sigma,
                shape=shape, inverse=False)
            fit = fit_pairs(radial=radial)
            if radial and int(fit.keep.sum()) < RADIAL_MIN_PAIRS:
                fit = fit_pairs()  # the radial term clipped too many pairs: without it
            # the degree the pairs KEPT constrain: a fit that clipped itself below it has
            # bent its terms around the pairs it rejected (a real night: degree 2 from 31
            # pairs kept 24 and was 0.7 px off at the 3 it dropped; linear kept 28)
            if deg <= 1 or int(fit.keep.sum()) >= PAIRS_PER_TERM * nterms(deg):
                break
            deg -= 1
        crval = fit.solution.crval
        ra_p, dec_p = fit.solution.pix2world(x, y)
        r = np.hypot(*fit.residuals[fit.keep].T)
        sigma = float(np.median(r) / 1.1774) if r.size else radius
        new_radius = max(match_radius, min(radius, 5.0 * sigma + 0.5 * match_radius))
        if pairs == prev_pairs and it > 0 and new_radius >= radius * 0.999:
            break
        prev_pairs = pairs
        radius = new_radius
    keep = fit.keep
    res = fit.residuals[keep]
    rms = float(np.sqrt(np.mean((res**2).sum(axis=1)))) if len(res) else float("nan")
    sol = fit.solution
    ap, bp = _inverse_sip(sol.a, sol.b, sol.crpix, scale_px, shape, sol.degree)
    sol = dataclasses.replace(sol, ap=ap, bp=bp)
    return Refined(sol, ii[keep], jj[keep], res, rms, deg, "", history)


def _float_column(column) -> np.ndarray:
    """A column as float64 with masked or missing values as NaN."""
    return np.ma.filled(np.ma.asarray(column).astype(np.float64), np.nan)


def brightness_order(table, column: str | None = None) -> np.ndarray:
    """Row indices of a catalogue from bright to faint.

    Uses ``column``, else ``mag``, else the first of ``meta['bands']``, else
    ``flux`` (descending); a table without any keeps its order.
    """
    names = table.colnames
    for col in [c for c in (column, "mag", *(table.meta.get("bands") or [])) if c]:
        if col in names:
            mag = _float_column(table[col])
            return np.argsort(np.where(np.isfinite(mag), mag, np.inf), kind="stable")
    if "flux" in names:
        flux = _float_column(table["flux"])
        return np.argsort(-np.where(np.isfinite(flux), flux, -np.inf), kind="stable")
    return np.arange(len(table))


def angular_distance_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance (degrees) between points given in degrees (haversine)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, dtype=np.float64))
                            for v in (ra1, dec1, ra2, dec2))
    s = (np.sin((dec2 - dec1) / 2) ** 2
         + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2)
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1))))
