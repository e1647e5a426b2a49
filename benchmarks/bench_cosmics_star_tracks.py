"""Tracks across bright stars (issue 17, fourteenth round): the fraction of a track's
pixels on a bright star's wing that the stage flags, with and without ``grow_on_stars``
(the growth by the star's point symmetry), and the flags it adds more than a pixel from
a true hit pixel; over the Moffat's beta, the FWHM and a trailed (elongated) PSF.

Frames: ``photowatch.sim.psf.tracks_across_bright_stars`` (16 stars of peak 80-300 sigma,
a 16 px track of 10-30 sigma per pixel across each, 5-11 px from its centre), counted on
the track's pixels where the star stands 10 sky sigmas; and
``photowatch.sim.psf.hits_beyond_companions`` (a hit just beyond a faint companion on a
bright star's shoulder: an asymmetric source the growth must not enter). The stage is
given the PSF's FWHM (``fwhm_px``): it finds none on trailed frames itself.

Usage::

    .venv/bin/python benchmarks/bench_cosmics_star_tracks.py
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

import photowatch.stages.cosmics as cosmics
from photowatch.core.config import Cosmics
from photowatch.core.frame import Mask
from photowatch.sim.psf import hits_beyond_companions, tracks_across_bright_stars

SKY_SIGMA = 20.0  # the frames' sky noise (e-)


def flags(frame, fwhm_px, mirror: bool) -> np.ndarray:
    """The stage's bit-4 mask, with or without grow_on_stars."""
    on = cosmics._MIRROR_SIGMA
    cosmics._MIRROR_SIGMA = on if mirror else 0.0
    try:
        z, _ = cosmics.flag_cosmics(frame, settings=Cosmics(), fwhm_px=fwhm_px)
    finally:
        cosmics._MIRROR_SIGMA = on
    return (z.mask & Mask.COSMIC) != 0


def main() -> None:
    s8 = np.ones((3, 3), bool)
    print(f"{'beta':>5s} {'FWHM':>5s} {'trail':>5s} {'seed':>4s} {'on-star px':>10s} "
          f"{'with':>6s} {'without':>8s} {'far added':>9s}")
    gains, added = [], 0
    for beta in (2.5, 3.0, 4.5):
        for fwhm in (4.5, 6.0):
            for trail in (0.0, 4.0):
                for seed in (1, 2, 3):
                    frame, star, _, hits = tracks_across_bright_stars(seed, fwhm, beta=beta,
                                                                      trail_px=trail)
                    on = hits & (star > 10 * SKY_SIGMA)
                    near = ndimage.binary_dilation(hits, structure=s8)
                    w, wo = flags(frame, fwhm, True), flags(frame, fwhm, False)
                    far = int((w & ~near & ~wo).sum())
                    added += far
                    if on.any():
                        gains.append(w[on].mean() - wo[on].mean())
                    print(f"{beta:5.1f} {fwhm:5.1f} {trail:5.1f} {seed:4d} {int(on.sum()):10d} "
                          f"{w[on].mean() if on.any() else np.nan:6.0%} "
                          f"{wo[on].mean() if on.any() else np.nan:8.0%} {far:9d}")
    print(f"tracks: on-star pixels flagged +{np.median(gains):.0%} median "
          f"({min(gains):+.0%} to {max(gains):+.0%}); flags added more than 1 px from a hit: {added}")
    comp = []
    for fwhm in (3.5, 4.5, 6.0):
        for seed in (1, 2, 3, 4):
            frame, hits = hits_beyond_companions(seed, fwhm)
            near = ndimage.binary_dilation(hits, structure=s8)
            w, wo = flags(frame, fwhm, True), flags(frame, fwhm, False)
            comp.append((int((w & ~near).sum()), int((wo & ~near).sum()), w[hits].mean()))
    print(f"companions (12 frames of 16): far flags {sum(c[0] for c in comp)} with, "
          f"{sum(c[1] for c in comp)} without; hits flagged {np.mean([c[2] for c in comp]):.0%}")


if __name__ == "__main__":
    main()
