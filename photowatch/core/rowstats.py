"""Row-wise statistics of NaN-padded stamp stacks, without numpy's per-row Python loop.

``np.nanmedian(a, axis=1)`` runs a Python-level median per row for rows of 600
values or more (``apply_along_axis``) and a masked-array sort below that: at a
few hundred stars per frame that is a fixed cost of tens of milliseconds per call.
:func:`nanmedian_rows` sorts every row at once and takes the middle values; it
returns the same numbers bit for bit (the mean of the two middle values of an
even count is their sum halved in the input's precision, as numpy computes it),
checked by ``tests/stages/test_rowstats.py``.
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
