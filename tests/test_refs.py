"""Field references: two workers reaching a field's first frames at once found one field."""

from __future__ import annotations

import threading

from astropy.table import Table

from photowatch.state.refs import FieldRefs


def test_concurrent_first_frames_found_one_field(tmp_path):
    refs = FieldRefs(tmp_path)
    barrier = threading.Barrier(8)
    results = []

    def first_frame(i):
        table = Table({"ra": [10.0], "dec": [20.0]},
                      meta={"frame": f"f{i}", "ra0": 10.0 + i * 1e-4, "dec0": 20.0})
        barrier.wait()
        results.append(refs.claim_field("2020-01-28", "M1", None, "astrom", table,
                                        10.0 + i * 1e-4, 20.0, 0.05))

    threads = [threading.Thread(target=first_frame, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    founders = [ref.meta["frame"] for ref, founded in results if founded]
    assert len(founders) == 1
    assert {ref.meta["frame"] for ref, _ in results} == set(founders)
    assert len(list((tmp_path / "state" / "refs" / "2020-01-28").glob("astrom_*.ecsv"))) == 1
    # a pointing farther than the radius is another field
    far = Table({"ra": [11.0], "dec": [20.0]}, meta={"frame": "g", "ra0": 11.0, "dec0": 20.0})
    ref, founded = refs.claim_field("2020-01-28", "M1", None, "astrom", far, 11.0, 20.0, 0.05)
    assert founded and ref.meta["frame"] == "g"
