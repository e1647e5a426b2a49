"""Combining calibration frames: an incremental clipped mean, and a chunked clipped median.

:class:`RunningMean` adds one frame at a time in O(pixels), without re-reading
earlier frames: each new frame is compared, pixel by pixel, with the current
estimate using the frame's own variance plus the estimate's, and pixels that
deviate by more than ``clip_sigma`` (cosmic rays in darks, stars and satellite
trails in twilight flats) are left out of the sums. The first frames have no
estimate to compare with, so up to three are held back and started from their
median (or, with two, from the lower value where they disagree: outliers in
calibration frames are nearly always positive).

:func:`clipped_median_stack` is the end-of-night combination: a per-pixel
sigma-clipped median over all inputs, computed in chunks of rows so memory
stays bounded for 4k frames and dozens of inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from astropy.stats import mad_std

from photowatch.core.strips import for_each_strip

#: frames held back before the running sums start
N_START = 3


@dataclass
class AddResult:
    """What adding one frame did."""

    n_clipped: int  #: pixels of this frame left out as outliers
    clipped_fraction: float


@dataclass
class RunningMean:
    """Incremental outlier-rejected mean of frames with variance planes.

    State is a few arrays (sums of values and variances, counts) plus up to
    two held-back frames; it is saved and restored with :meth:`state` /
    :meth:`from_state` so the daemon can be killed between frames.
    """

    clip_sigma: float = 5.0
    sum: np.ndarray | None = None
    sumvar: np.ndarray | None = None
    count: np.ndarray | None = None
    pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    nframes: int = 0

    # ---------------------------------------------------------------- estimate
    def estimate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, variance of the mean, number of frames per pixel); cached until the next add.

        The arrays are shared with the cache: do not modify them.
        """
        cached = getattr(self, "_estimate", None)
        if cached is not None:
            return cached
        self._estimate = self._compute_estimate()
        return self._estimate

    def _compute_estimate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.sum is not None:
            inv = 1.0 / np.maximum(self.count, 1).astype(np.float32)
            mean = self.sum * inv
            var = self.sumvar * (inv * inv)
            return mean, var, self.count
        if not self.pending:
            raise ValueError("no frame added yet")
        if len(self.pending) == 1:
            data, var = self.pending[0]
            return data.copy(), var.copy(), np.ones(data.shape, np.uint16)
        (a, va), (b, vb) = self.pending[:2]
        disagree = (a - b) ** 2 > self.clip_sigma**2 * (va + vb)
        mean = np.where(disagree, np.minimum(a, b), 0.5 * (a + b)).astype(np.float32)
        var = np.where(disagree, np.where(a < b, va, vb), 0.25 * (va + vb)).astype(np.float32)
        count = np.where(disagree, 1, 2).astype(np.uint16)
        return mean, var, count

    # ---------------------------------------------------------------- compare
    def deviation_fraction(self, data: np.ndarray, var: np.ndarray, nsigma: float,
                           stride: int = 1) -> float:
        """Fraction of pixels of ``data`` further than ``nsigma`` from the current estimate.

        ``stride`` > 1 tests every stride-th row (a whole-frame statistic needs no more).
        """
        mean, mvar, _ = self.estimate()
        rows = slice(None, None, stride)
        dev = (data[rows] - mean[rows]) ** 2 > nsigma**2 * (var[rows] + mvar[rows])
        return float(np.count_nonzero(dev)) / dev.size

    # ---------------------------------------------------------------- add
    def add(self, data: np.ndarray, var: np.ndarray) -> AddResult:
        """Add one frame (float32 data and variance, same shape as the others)."""
        data = np.asarray(data, dtype=np.float32)
        var = np.asarray(var, dtype=np.float32)
        cached = getattr(self, "_estimate", None)
        self._estimate = None
        if self.sum is None and len(self.pending) < N_START - 1:
            self.pending.append((data, var))
            self.nframes += 1
            return AddResult(0, 0.0)
        if self.sum is None:
            self._start(data, var)
            self.nframes += 1
            return AddResult(0, 0.0)
        mean, mvar, _ = self._compute_estimate() if cached is None else cached
        diff = data - mean
        np.square(diff, out=diff)
        keep = diff <= np.float32(self.clip_sigma**2) * (var + mvar)
        np.add(self.sum, data, out=self.sum, where=keep)
        np.add(self.sumvar, var, out=self.sumvar, where=keep)
        self.count += keep
        self.nframes += 1
        clipped = int(keep.size - np.count_nonzero(keep))
        return AddResult(clipped, clipped / keep.size)

    def _start(self, data: np.ndarray, var: np.ndarray) -> None:
        frames = [*self.pending, (data, var)]
        values = np.stack([f[0] for f in frames])
        variances = np.stack([f[1] for f in frames])
        med = np.median(values, axis=0)
        medvar = np.median(variances, axis=0)
        keep = (values - med) ** 2 <= self.clip_sigma**2 * (variances + 0.5 * medvar)
        # never leave a pixel without input: keep the median-nearest value
        none = ~keep.any(axis=0)
        if none.any():
            nearest = np.argmin(np.abs(values - med), axis=0)
            idx = np.nonzero(none)
            keep[(nearest[idx], *idx)] = True
        self.sum = np.where(keep, values, 0).sum(axis=0).astype(np.float32)
        self.sumvar = np.where(keep, variances, 0).sum(axis=0).astype(np.float32)
        self.count = keep.sum(axis=0).astype(np.uint16)
        self.pending = []

    # ---------------------------------------------------------------- persistence
    def state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {
            "clip_sigma": np.float64(self.clip_sigma),
            "nframes": np.int64(self.nframes),
            "npending": np.int64(len(self.pending)),
        }
        if self.sum is not None:
            out.update(sum=self.sum, sumvar=self.sumvar, count=self.count)
        for i, (d, v) in enumerate(self.pending):
            out[f"pending{i}"] = d
            out[f"pendingvar{i}"] = v
        return out

    @classmethod
    def from_state(cls, state) -> RunningMean:
        obj = cls(clip_sigma=float(state["clip_sigma"]), nframes=int(state["nframes"]))
        if "sum" in state:
            obj.sum = np.array(state["sum"], dtype=np.float32)
            obj.sumvar = np.array(state["sumvar"], dtype=np.float32)
            obj.count = np.array(state["count"], dtype=np.uint16)
        for i in range(int(state["npending"])):
            obj.pending.append((np.array(state[f"pending{i}"], dtype=np.float32),
                                np.array(state[f"pendingvar{i}"], dtype=np.float32)))
        return obj


def clipped_median_stack(
    n_inputs: int,
    shape: tuple[int, int],
    read_rows: Callable[[int, int, int], tuple[np.ndarray, np.ndarray]],
    *,
    clip_sigma: float = 3.0,
    chunk_rows: int = 256,
    iterations: int = 3,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel sigma-clipped median of ``n_inputs`` frames, in chunks of rows.

    Parameters
    ----------
    read_rows
        ``read_rows(i, y0, y1)`` returns (data, variance) rows ``y0:y1`` of input ``i``
    clip_sigma
        rejection threshold in units of each pixel's expected noise (from the
        input variances), iterated around the median of the survivors
    workers
        chunks combined at a time in threads (numpy's sorts release the GIL; each
        chunk writes its own rows of the outputs, and ``read_rows`` must allow it)

    Returns
    -------
    (combined, variance, count): float32, float32, uint16
        the variance is that of the mean of the surviving values, inflated by
        pi/2 for the median's efficiency
    """
    ny, nx = shape
    out = np.empty(shape, np.float32)
    outvar = np.empty(shape, np.float32)
    count = np.empty(shape, np.uint16)

    def chunk(y0: int) -> None:
        y1 = min(ny, y0 + chunk_rows)
        values = np.empty((n_inputs, y1 - y0, nx), np.float32)
        variances = np.empty_like(values)
        for i in range(n_inputs):
            values[i], variances[i] = read_rows(i, y0, y1)
        finite = np.isfinite(values)
        keep = finite
        med = _masked_median(values, keep)
        for _ in range(iterations):
            newkeep = finite & ((values - med) ** 2 <= clip_sigma**2 * variances
                                * (1 + np.pi / 2 / n_inputs))
            newkeep |= finite & ~newkeep.any(axis=0)  # all rejected: fall back to every value
            if np.array_equal(newkeep, keep):
                break
            keep = newkeep
            med = _masked_median(values, keep)
        n = keep.sum(axis=0)
        out[y0:y1] = med
        nsafe = np.maximum(n, 1)
        eff = np.where(n > 2, np.pi / 2, 1.0)
        outvar[y0:y1] = eff * np.where(keep, variances, 0).sum(axis=0) / (nsafe * nsafe)
        count[y0:y1] = n

    for_each_strip(chunk, range(0, ny, chunk_rows), workers)
    return out, outvar, count


def _masked_median(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per-pixel median over axis 0 of the kept values (NaN where none is kept).

    Up to :data:`_NETWORK_MAX` inputs the values are ordered by a sorting network
    of whole-plane minimum/maximum operations (the left-out values as +inf, last);
    a full ``np.sort`` along a short first axis costs several times more. Same
    order, so the same medians as a sort.
    """
    n = keep.sum(axis=0)
    if values.shape[0] > _NETWORK_MAX:
        srt = np.sort(np.where(keep, values, np.nan), axis=0)
        lo = np.maximum((n - 1) // 2, 0)[None]
        hi = np.maximum(n // 2, 0)[None]
        med = 0.5 * (np.take_along_axis(srt, lo, 0)[0] + np.take_along_axis(srt, hi, 0)[0])
        return np.where(n > 0, med, np.nan).astype(np.float32)
    inf = np.float32(np.inf)
    srt = _network_sorted([np.where(k, v, inf) for v, k in zip(values, keep)])
    med = np.full(n.shape, np.nan, np.float32)
    for m in np.flatnonzero(np.bincount(n.ravel(), minlength=1)):
        if m == 0:
            continue
        lo, hi = srt[(m - 1) // 2], srt[m // 2]
        at = n == m
        mid = lo + hi
        mid *= np.float32(0.5)
        if at.all():
            return mid
        np.copyto(med, mid, where=at)
    return med


#: inputs up to which :func:`_masked_median` orders with a sorting network
_NETWORK_MAX = 16


@functools.cache
def _network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sorting network for ``n`` values: (i, j) pairs, i < j,
    after each of which position i holds the smaller value. Built for the next power
    of two; comparators touching positions >= n are dropped (those would hold +inf,
    which such a comparator leaves in place)."""
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


def _network_sorted(planes: list[np.ndarray]) -> list[np.ndarray]:
    """Planes (no NaN) sorted pixel by pixel by :func:`_network` (the list reordered,
    the planes overwritten)."""
    tmp = np.empty_like(planes[0])
    for a, b in _network(len(planes)):
        np.minimum(planes[a], planes[b], out=tmp)
        np.maximum(planes[a], planes[b], out=planes[b])
        planes[a], tmp = tmp, planes[a]
    return planes


def robust_level(data: np.ndarray, mask: np.ndarray | None = None,
                 central: float = 0.5) -> tuple[float, float]:
    """Robust (median, sigma) of the central ``central`` fraction of an image."""
    ny, nx = data.shape
    my, mx = int(ny * (1 - central) / 2), int(nx * (1 - central) / 2)
    sub = data[my:ny - my, mx:nx - mx]
    if mask is not None:
        sub = sub[mask[my:ny - my, mx:nx - mx] == 0]
    sub = sub[np.isfinite(sub)].ravel()
    if sub.size > 250_000:
        sub = sub[:: sub.size // 250_000]
    if sub.size == 0:
        return float("nan"), float("nan")
    med = float(np.median(sub))
    return med, float(mad_std(sub))


def stack_sources(frames: Sequence[tuple[np.ndarray, np.ndarray]]):
    """``read_rows`` for in-memory frames (tests, small inputs)."""

    def read_rows(i: int, y0: int, y1: int):
        d, v = frames[i]
        return d[y0:y1], v[y0:y1]

    return read_rows
