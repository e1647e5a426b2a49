"""prepare and flatten on synthetic raw frames with known bias, dark, flat and sky."""

import numpy as np
import pytest
from astropy.io import fits

from photowatch.core.config import Calibration, Flatten, Prepare
from photowatch.core.frame import Mask, MasterImage
from photowatch.stages.flatten import flatten
from photowatch.stages.prepare import overscan_rows, prepare, saturation_mask, trim_slices

GAIN, RN = 2.0, 6.0


def raw_frame(rng, info, sky_e, bias_e, dark_e_s, flat, overscan_adu=1000.0, row_ramp=3.0):
    ny, nx = 64, 80
    rows = overscan_adu + row_ramp * np.linspace(-1, 1, ny)[:, None]
    electrons = np.zeros((ny, nx))
    signal = (sky_e * flat + dark_e_s * info.exptime_s)
    electrons[:, :64] = rng.poisson(signal) + bias_e
    electrons += rng.normal(0, RN, electrons.shape)
    return (rows + electrons / GAIN).astype(np.float32), signal


def test_overscan_and_trim(info_factory):
    info = info_factory(gain=GAIN, read_noise_e=RN)
    raw = np.full((64, 80), 500.0, np.float32)
    raw += np.arange(64)[:, None]
    levels, var = overscan_rows(raw, info, method="median")
    np.testing.assert_allclose(levels, 500 + np.arange(64))
    poly, _ = overscan_rows(raw, info, method="poly", order=1)
    np.testing.assert_allclose(poly, 500 + np.arange(64), atol=1e-3)
    assert trim_slices(info, raw.shape) == (slice(0, 64), slice(0, 64))
    no_sections = info_factory(datasec=None, trimsec=None)
    assert trim_slices(no_sections, raw.shape) == (slice(0, 64), slice(0, 64))
    ratir = info_factory(datasec=None, biassec=None, trimsec=(75, 1000, 15, 1000))
    assert trim_slices(ratir, (1024, 1024)) == (slice(75, 1000), slice(15, 1000))


def test_saturation_and_bleed():
    raw = np.full((40, 40), 1000.0, np.float32)
    raw[18:22, 18:22] = 65535
    raw[5:18, 19:21] = 40000  # bleed trail above half saturation, connected
    raw[30, 30] = 40000  # bright but not connected to a saturated pixel
    m = saturation_mask(raw, 60000, grow_px=1, bleed=True)
    assert m[20, 20] and m[6, 19] and m[17, 20] and m[17, 17]  # core, trail, grown border
    assert not m[30, 30] and not m[0, 0]


@pytest.mark.parametrize("seed", [1, 2])
def test_prepare_flatten_pulls(info_factory, seed):
    """(data − truth)/ERR has unit width: variance propagated through bias, dark and flat."""
    rng = np.random.default_rng(seed)
    info = info_factory(gain=GAIN, read_noise_e=RN, exptime_s=100.0)
    shape = (64, 64)
    yy, xx = np.mgrid[0:64, 0:64]
    flat = (1 + 0.1 * np.sin(xx / 9.0) * np.cos(yy / 7.0)).astype(np.float32)
    bias_e = (20 + 3 * np.cos(xx / 5.0)).astype(np.float32)
    dark = np.full(shape, 0.05, np.float32)
    sky = 400.0
    # masters with their own (small) noise, as a real master of N inputs has
    nb = 10
    mbias = MasterImage("bias", bias_e + rng.normal(0, RN / np.sqrt(nb), shape).astype(
        np.float32), np.full(shape, RN**2 / nb, np.float32))
    mdark = MasterImage("dark", dark + rng.normal(0, 0.02, shape).astype(np.float32),
                        np.full(shape, 0.02**2, np.float32))
    mflat = MasterImage("flat", flat + rng.normal(0, 0.005, shape).astype(np.float32),
                        np.full(shape, 0.005**2, np.float32))
    pulls = []
    for _ in range(20):
        raw, _ = raw_frame(rng, info, sky, bias_e, dark, flat)
        p = prepare(raw, fits.Header(), info, bias=mbias, dark=mdark, bpm=None,
                    settings=Prepare(), calibration=Calibration())
        f = flatten(p, flat=mflat, settings=Flatten())
        pulls.append((f.sci - sky) / f.err)
    pulls = np.array(pulls)
    assert abs(np.mean(pulls)) < 0.05
    assert abs(np.std(pulls) - 1) < 0.04


def test_prepare_masks_and_header(info_factory):
    info = info_factory(gain=GAIN, read_noise_e=RN)
    raw = np.full((64, 80), 1000.0, np.float32)
    raw[10, 10] = 65535
    bpm = np.zeros((64, 64), bool)
    bpm[:, 30] = True
    p = prepare(raw, fits.Header({"OBJECT": "T"}), info, bias=None, dark=None, bpm=bpm,
                settings=Prepare(), calibration=Calibration())
    assert p.mask[10, 10] & Mask.SATURATED and p.mask[5, 30] & Mask.BAD
    assert not p.mask[40, 40]
    assert p.sci.dtype == np.float32 and p.var.dtype == np.float32
    assert p.header["GAIN"] == 1.0 and p.header["OBJECT"] == "T"  # the data are electrons
    assert p.header["GAINRAW"] == GAIN and p.header["SATURRAW"] == info.saturation_adu
    # SATURATE: the raw saturation level in the units of the data (no bias or dark here)
    expected = (info.saturation_adu - p.header["OVERSCAN"]) * GAIN
    assert p.header["SATURATE"] == pytest.approx(expected, abs=0.5)


def test_flatten_low_flat_masked(info_factory):
    from photowatch.core.frame import Frame

    frame = Frame(np.ones((8, 8), np.float32), np.ones((8, 8), np.float32),
                  np.zeros((8, 8), np.uint16), fits.Header())
    flat = np.ones((8, 8), np.float32)
    flat[2, 3] = 0.1
    out = flatten(frame, flat=MasterImage("flat", flat, np.zeros_like(flat), label="f.fits"),
                  settings=Flatten(low_flat=0.3))
    assert out.mask[2, 3] & Mask.LOWFLAT and np.isfinite(out.sci).all()
    assert out.header["MFLAT"] == "f.fits"
    assert frame.mask[2, 3] == 0  # input not modified
