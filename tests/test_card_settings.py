"""io.fits.fixed_card_settings: astropy's card settings read once, the same cards out."""

import threading

from astropy.io import fits
from astropy.io.fits import card

from photowatch.io.fits import fixed_card_settings


def _header_bytes() -> bytes:
    hdr = fits.Header()
    hdr["EXPTIME"] = (30.0, "[s] exposure time")
    hdr["OBJECT"] = ("NGC 1  ", "target with trailing blanks")
    hdr["REASON"] = ("a long reason " * 10, "cut onto CONTINUE cards")
    hdr["DP1"] = "AXIS.1: 1"  # a record-valued keyword card
    hdr.append(("HISTORY", "reduced"))
    return hdr.tostring().encode() + repr([c.value for c in hdr.cards]).encode()


def test_same_cards_and_settings_restored():
    before = _header_bytes()
    real = card.conf
    with fixed_card_settings():
        assert card.conf is not real
        assert card.conf.strip_header_whitespace == real.strip_header_whitespace
        with fixed_card_settings():  # nested: still the one snapshot
            inside = _header_bytes()
        assert card.conf is not real
    assert card.conf is real
    assert inside == before


def test_settings_changed_outside_are_seen():
    with fits.conf.set_temp("strip_header_whitespace", False), fixed_card_settings():
        value = fits.Card("OBJECT", "NGC 1  ").value
    assert value == "NGC 1  "
    assert fits.Card("OBJECT", "NGC 1  ").value == "NGC 1"  # the default again


def test_concurrent_blocks_restore_the_configuration():
    real = card.conf
    start, inside = threading.Barrier(4), threading.Barrier(4)

    def work():
        start.wait()
        with fixed_card_settings():
            inside.wait()
            _header_bytes()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert card.conf is real
