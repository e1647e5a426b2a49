"""Row-wise statistics of NaN-padded stamp stacks, without numpy's per-row Python loop.

``np.nanmedian(a, axis=1)`` runs a Python-level median per row for rows of 600
values or more (``apply_along_axis``) and a masked-array sort below that: at a
few hundred stars per frame that is a fixed cost of tens of milliseconds per call.
:func:`nanmedian_rows` sorts every row at once and takes the middle values; it
returns the same numbers bit for bit (the mean of the two middle values of an
even count is their sum halved in the input's precision, as numpy computes it),
checked by ``tests/stages/test_rowstats.py``. :func:`median_mad_std` gives a frame's
median and robust sigma as numpy and astropy do, with half the partitioning.
"""

from __future__ import annotations

import numpy as np


def nanmedian_rows(a: np.ndarray) -> np.ndarray:
    """``np.nanmedian(a, axis=1)`` of a 2-D float array (NaN for an all-NaN row, no warning)."""
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype.kind != "f":
        raise ValueError(f"nanmedian_rows: a 2-D float array, got {a.dtype} {a.shape}")
    n_rows = a.shape[0]
    if a.shape[1] == 0:
        return np.full(n_rows, np.nan, dtype=a.dtype)
    s = np.sort(a, axis=1)  # NaN sort last
    n = np.count_nonzero(~np.isnan(a), axis=1)
    rows = np.arange(n_rows)
    lo = s[rows, np.maximum((n - 1) // 2, 0)]
    hi = s[rows, np.maximum(n // 2, 0)]
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.where(n % 2 == 1, lo, (lo + hi) / a.dtype.type(2))
    out[n == 0] = np.nan
    return out


def _median_inplace(a: np.ndarray):
    """``np.median`` of a 1-D NaN-free float array, partitioning ``a`` in place."""
    n = a.size
    k = n // 2
    a.partition(k)
    if n % 2:
        return a[k]
    # the mean of the two middle values as numpy computes it: their sum halved, in a's
    # precision (the lower one is the largest of the partition's lower part)
    return np.mean(np.array([a[:k].max(), a[k]], dtype=a.dtype))


def median(x: np.ndarray, *, overwrite: bool = False) -> float:
    """``np.median(x)`` of a 1-D float array, the same number, partitioning once (in place
    when ``overwrite``); an array with NaN (or empty) is handed to numpy."""
    x = np.asarray(x)
    if x.ndim != 1 or x.dtype.kind != "f" or x.size == 0 or np.isnan(x).any():
        return float(np.median(x))
    return float(_median_inplace(x if overwrite and x.flags.writeable else x.copy()))


def median_mad_std(x: np.ndarray) -> tuple[float, float]:
    """``(np.median(x), astropy.stats.mad_std(x))`` of a 1-D float array, the same numbers.

    numpy's median partitions a copy around three indices (the two middle ones and the
    last, to find NaNs); this partitions one working copy around the middle twice (the
    values, then their absolute deviations): half the CPU on the ~10^6 sky pixels of a
    frame. An array with NaN (or empty) is handed to numpy and astropy as it is."""
    from astropy.stats import mad_std

    x = np.asarray(x)
    if x.ndim != 1 or x.dtype.kind != "f" or x.size == 0 or np.isnan(x).any():
        return float(np.median(x)), float(mad_std(x))
    a = x.copy()
    med = _median_inplace(a)
    if not np.isfinite(med):  # inf - inf: numpy's NaN
        return float(med), float(mad_std(x))
    a -= med
    np.abs(a, out=a)
    return float(med), float(_median_inplace(a) * 1.482602218505602)
