"""Incremental clipped mean and chunked clipped median against known truth."""

import numpy as np
import pytest

from photowatch.calib.combine import RunningMean, clipped_median_stack, stack_sources


def frames(n, shape=(64, 64), sigma=5.0, seed=0, truth=None):
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.float32) + 100 if truth is None else truth
    out = []
    for _ in range(n):
        d = (truth + rng.normal(0, sigma, shape)).astype(np.float32)
        out.append((d, np.full(shape, sigma**2, np.float32)))
    return truth, out


def test_running_mean_matches_mean_without_outliers():
    truth, fs = frames(10)
    acc = RunningMean(clip_sigma=5)
    for d, v in fs:
        acc.add(d, v)
    mean, var, count = acc.estimate()
    np.testing.assert_allclose(mean, np.mean([d for d, _ in fs], axis=0), atol=1e-3)
    assert np.all(count == 10)
    np.testing.assert_allclose(var, 25 / 10, rtol=1e-5)


@pytest.mark.parametrize("where", [0, 1, 2, 5])
def test_running_mean_rejects_cosmic_rays(where):
    truth, fs = frames(8, seed=where)
    d, v = fs[where]
    d = d.copy()
    d[10, 10] += 5000  # a cosmic ray in one input (also in the first three held back)
    d[20:22, 5:40] += 300  # a satellite trail
    fs[where] = (d, v)
    acc = RunningMean(clip_sigma=5)
    for d, v in fs:
        acc.add(d, v)
    mean, var, count = acc.estimate()
    assert abs(mean[10, 10] - 100) < 5 and count[10, 10] == 7
    assert np.all(np.abs(mean[20:22, 5:40] - 100) < 6)
    resid = (mean - truth) / np.sqrt(var)
    assert 0.9 < np.std(resid) < 1.1


def test_two_frames_disagreeing_take_the_lower():
    truth, fs = frames(2)
    d = fs[1][0].copy()
    d[3, 3] += 1000
    acc = RunningMean(clip_sigma=5)
    acc.add(*fs[0])
    acc.add(d, fs[1][1])
    mean, _, count = acc.estimate()
    assert abs(mean[3, 3] - fs[0][0][3, 3]) < 1e-3 and count[3, 3] == 1


def test_state_round_trip():
    truth, fs = frames(5)
    a = RunningMean(clip_sigma=4)
    for d, v in fs[:2]:
        a.add(d, v)
    b = RunningMean.from_state(a.state())
    for d, v in fs[2:]:
        a.add(d, v)
        b.add(d, v)
    np.testing.assert_array_equal(a.estimate()[0], b.estimate()[0])


def test_cost_does_not_grow_with_k():
    """Adding frame k touches only the sums: state size is independent of k."""
    truth, fs = frames(12)
    acc = RunningMean()
    sizes = []
    for d, v in fs:
        acc.add(d, v)
        sizes.append(sum(a.nbytes for a in acc.state().values() if hasattr(a, "nbytes")))
    assert sizes[3] == sizes[-1]


def test_clipped_median_stack_chunks():
    truth, fs = frames(9, shape=(50, 40))
    fs[4][0][7, 7] += 1e4
    full = clipped_median_stack(9, (50, 40), stack_sources(fs), chunk_rows=50)
    chunked = clipped_median_stack(9, (50, 40), stack_sources(fs), chunk_rows=7)
    for a, b in zip(full, chunked):
        np.testing.assert_array_equal(a, b)
    out, var, count = full
    assert abs(out[7, 7] - 100) < 10 and count[7, 7] == 8
    resid = (out - truth) / np.sqrt(var)
    assert 0.85 < np.std(resid) < 1.15
