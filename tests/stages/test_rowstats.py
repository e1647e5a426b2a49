"""nanmedian_rows returns np.nanmedian(axis=1)'s numbers bit for bit."""

import warnings

import numpy as np
import pytest

from photowatch.core.rowstats import nanmedian_rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [1, 2, 5, 25, 121, 599, 600, 601, 1089])
def test_equals_numpy(dtype, width):
    rng = np.random.default_rng(width)
    for nan_fraction in (0.0, 0.1, 0.5, 0.97, 1.0):
        a = rng.normal(100.0, 30.0, size=(57, width)).astype(dtype)
        a[:5] = np.round(a[:5] / 10) * 10  # ties
        a[rng.random(a.shape) < nan_fraction] = np.nan
        a[6, :] = np.nan  # an all-NaN row
        if width > 3:
            a[7, :2] = [np.inf, -np.inf]
            a[8, 0] = np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = np.nanmedian(a, axis=1)
        got = nanmedian_rows(a)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok = ~np.isnan(want)
        assert np.array_equal(got[ok].view(np.uint8), want[ok].view(np.uint8))  # bit-equal


def test_rejects_other_shapes():
    with pytest.raises(ValueError):
        nanmedian_rows(np.zeros(5))
    with pytest.raises(ValueError):
        nanmedian_rows(np.zeros((3, 3), int))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 2, 3, 10, 11, 1000, 100_001, 100_002])
def test_median_and_mad_std_equal_numpy_and_astropy(dtype, size):
    from astropy.stats import mad_std

    from photowatch.core.rowstats import median, median_mad_std

    rng = np.random.default_rng(size)
    for case in ("plain", "ties", "inf", "nan"):
        x = rng.normal(1000.0, 30.0, size=size).astype(dtype)
        if case == "ties":
            x = np.round(x / 10) * 10
        elif case == "inf" and size > 2:
            x[:2] = [np.inf, -np.inf]
        elif case == "nan" and size > 2:
            x[1] = np.nan
        keep = x.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = (float(np.median(x)), float(mad_std(x)))
            got = median_mad_std(x)
        assert np.array_equal(np.array(got), np.array(want), equal_nan=True), (case, got, want)
        assert np.array_equal(x, keep, equal_nan=True)  # the input is left alone
        assert np.array_equal(median(x), want[0], equal_nan=True)
        y = x.copy()
        assert np.array_equal(median(y, overwrite=True), want[0], equal_nan=True)
