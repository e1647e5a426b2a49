"""How much a frame would change if re-reduced with the night's final masters.

finalize re-reduces a frame only when this is more than
``calibration.final_tolerance`` of the frame's sky noise. The estimate is
cheap: the masters' difference maps are reduced once per (used, final) pair
to a robust maximum — the 99th percentile over 32x32-pixel blocks of the
block means of ``|final - used|`` — and each frame scales those numbers by
its own exposure time, sky level and sky noise:

* bias: ``P99|ΔB|`` (e-);
* dark: ``t × P99|ΔD|`` (e-/s × s);
* flat: ``L × P99|F_used / F_final − 1|`` (a flattened pixel at sky level L);
* master sky: ``L × P99|S_final − S_used|`` (``S_used = 1`` when the frame had
  none), from the binned copy of the sky each frame used
  (:meth:`photowatch.state.skies.SkyBook.save_used`).

A constant difference is removed first: sky subtraction takes out any additive
constant (bias, dark, sky) and the frame's zero point any uniform flat scale.
The effects are added (an upper bound) and divided by the frame's sky noise.
Block means measure what re-reduction would change *systematically*; the
pixel noise of a master is already in the frame's ERR plane (propagated when
it was reduced), so a product kept is honest about its noise. A master that
cannot be read, or a used sky not saved, counts as a change (re-reduce).
"""

from __future__ import annotations

import numpy as np

#: block size (px) of the block means
BLOCK_PX = 32
#: percentile of |difference| over blocks taken as the robust maximum
PERCENTILE = 99.0


def block_mean(data: np.ndarray, block: int = BLOCK_PX) -> np.ndarray:
    """Mean of each ``block`` x ``block`` tile (the frame cropped to whole tiles), float32.

    Linear, so the difference of two masters' block means is the block mean of
    their difference (0.02 s at 4k); a tile holding a non-finite pixel is NaN
    (left out of the percentile). Means, not medians: a median of quantised
    (integer-ADU) inputs jumps by whole steps between a running mean and a
    final median although the masters agree.
    """
    a = np.asarray(data, dtype=np.float32)
    ny, nx = a.shape[0] // block, a.shape[1] // block
    if ny == 0 or nx == 0:
        return np.array([[np.mean(a)]], np.float32)
    tiles = a[: ny * block, : nx * block].reshape(ny, block, nx, block)
    return tiles.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def robust_max(diff: np.ndarray) -> float:
    """``PERCENTILE`` of |diff| over finite entries (inf when there is none)."""
    d = np.abs(diff[np.isfinite(diff)])
    return float(np.percentile(d, PERCENTILE)) if d.size else float("inf")


def pair_change(kind: str, used: np.ndarray | None, final: np.ndarray) -> float:
    """The robust max of a (used, final) master pair's difference, from their block means.

    bias and dark: ``|final - used|`` in their units; flat: ``|used / final - 1|``;
    sky: ``|final - used|`` (``used`` None: no sky was used, i.e. 1).
    """
    bu = np.ones_like(final) if used is None else used
    if bu.shape != final.shape:
        return float("inf")
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = bu / final - 1.0 if kind == "flat" else final - bu
    finite = diff[np.isfinite(diff)]
    if finite.size:  # a constant is removed by sky subtraction (or, flat, the zero point)
        diff = diff - np.float32(np.median(finite))
    return robust_max(diff)


def frame_change(changes: dict[str, float], *, exptime_s: float, level_e: float,
                 noise_e: float) -> float:
    """A frame's expected change (in units of its sky noise) from the pairs' robust maxima."""
    if not noise_e or not np.isfinite(noise_e) or noise_e <= 0:
        return float("inf")
    level = max(float(level_e or 0.0), 0.0)
    total = 0.0
    for kind, c in changes.items():
        scale = {"bias": 1.0, "dark": float(exptime_s or 0.0)}.get(kind, level)
        total += c * scale
    return total / noise_e
