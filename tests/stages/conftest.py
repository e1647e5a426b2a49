"""Small frame descriptions for stage tests."""

from datetime import UTC, datetime

import pytest

from photowatch.core.classify import FrameInfo


def make_info(**changes) -> FrameInfo:
    base = dict(kind="object", instrument="lmi", camera="C0", filter="SDSS-R", exptime_s=100.0,
                obs_time=datetime(2020, 1, 29, 2, 0, tzinfo=UTC), night="2020-01-28",
                target="T", binning="1x1", readout="", ra_deg=150.0, dec_deg=2.2, airmass=1.1,
                gain=2.0, read_noise_e=6.0, saturation_adu=60000.0, pixel_scale_arcsec=0.5,
                datasec=(0, 64, 0, 64), biassec=(0, 64, 64, 80), trimsec=None,
                raw_name="raw.fits", std_name="20200129T020000C0o.fits")
    base.update(changes)
    return FrameInfo(**base)


@pytest.fixture
def info_factory():
    return make_info
