"""Photon transfer (gain, read noise) on synthetic frames, and what happens without it."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from photowatch.calib.ptc import photon_transfer
from photowatch.core.classify import FrameInfo
from photowatch.core.config import Settings
from photowatch.core.errors import WaitForMasters
from photowatch.state.masters import GAIN_WAIT, MasterBook
from photowatch.state.store import Store


def frames(gain, rn_e, seed, shape=(300, 400), levels=(20000.0, 21000.0, 35000.0, 36500.0)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    pattern = (1 + 0.05 * np.cos(xx / 90.0) * np.sin(yy / 70.0)) * \
        (1 + rng.normal(0, 0.01, shape))  # vignetting and pixel response, common to all
    bias_struct = 500 + 3 * np.sin(xx / 30.0)
    rn = rn_e / gain

    def read(e):
        return bias_struct + (rng.poisson(e) / gain if e is not None else 0) + \
            rng.normal(0, rn, shape)

    biases = [read(None) for _ in range(4)]
    flats = [("r", lvl, read(lvl * gain * pattern)) for lvl in levels]
    return biases, flats


@pytest.mark.parametrize("gain, rn, seed", [(2.89, 6.0, 1), (0.8, 3.5, 2), (5.5, 12.0, 3)])
def test_photon_transfer_recovers_gain_and_read_noise(gain, rn, seed):
    biases, flats = frames(gain, rn, seed)
    result = photon_transfer(biases, flats)
    assert result.n_bias_pairs == 2 and result.n_flat_pairs == 2
    assert result.gain == pytest.approx(gain, rel=0.02)
    assert result.read_noise_e == pytest.approx(rn, rel=0.03)


def test_photon_transfer_needs_pairs():
    biases, flats = frames(2.0, 5.0, 4)
    assert photon_transfer(biases[:1], flats) is None
    assert photon_transfer(biases, flats[:1]) is None
    # two flats too far apart in level are not a pair
    assert photon_transfer(biases, [flats[0], flats[2]]) is None


def _info(**kw):
    base = dict(kind="object", instrument="generic", camera="C0", filter="r", exptime_s=60.0,
                obs_time=datetime(2024, 5, 2, 3, tzinfo=UTC), night="2024-05-01", target="T",
                binning="1x1", readout="", ra_deg=None, dec_deg=None, airmass=None, gain=1.0,
                read_noise_e=5.0, saturation_adu=65535.0, pixel_scale_arcsec=0.5, datasec=None,
                biassec=None, trimsec=None, raw_name="a.fits", std_name="x.fits",
                gain_source="measure", read_noise_source="measure")
    base.update(kw)
    return FrameInfo(**base)


def test_unmeasurable_gain_waits_in_the_daemon_and_is_assumed_in_batch(tmp_path):
    settings = Settings()
    watch = MasterBook(Store(tmp_path / "w.sqlite", command="watch"), tmp_path / "w",
                       settings, lambda name: None)
    with pytest.raises(WaitForMasters, match=GAIN_WAIT):
        watch.detector_numbers(_info())
    store = Store(tmp_path / "b.sqlite", command="reduce")
    batch = MasterBook(store, tmp_path / "b", settings, lambda name: None)
    info = batch.detector_numbers(_info())
    assert info.gain_source == "assumed" and info.gain == 1.0
    batch.detector_numbers(_info(raw_name="b.fits"))
    warned = [e for e in store.events(level="problems") if e["event"] == "header_assumption"]
    assert len(warned) == 1 and "could not be measured" in warned[0]["message"]
    # a measurement of another night is used (the nearest)
    for night, g in (("2024-04-20", 2.5), ("2024-04-29", 2.7)):
        store.set_meta(f"ptc|generic|C0|1x1||{night}", {"gain": g, "read_noise_e": 7.0})
    info = batch.detector_numbers(_info())
    assert info.gain == 2.7 and info.gain_source == "measured 2024-04-29"
    assert info.read_noise_e == 7.0
    # header values are left alone
    assert batch.detector_numbers(_info(gain_source="header", read_noise_source="header",
                                        gain=3.0)).gain == 3.0
