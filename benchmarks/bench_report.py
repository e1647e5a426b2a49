"""Seconds to refresh the night report: the store read, the page render, a whole refresh.

    python benchmarks/bench_report.py OUT [--copies 100] [--repeat 5]

OUT is a reduced output directory (e.g. ``photowatch demo --out D`` gives ``D/out``).
The page is rendered from the night's facts with the frame list repeated ``--copies``
times (a long night), so the figure is the template cost per frame. Prints one line
per measurement (median of ``--repeat``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from photowatch.core.config import Settings
from photowatch.report.html import collect_facts, render_html, write_report
from photowatch.state.store import Store


def _median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--copies", type=int, default=100)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    store = Store(args.out / "state.sqlite", command="bench")
    night = store.nights()[-1]
    settings = Settings()
    facts = collect_facts(args.out, store, night, settings, final=False)
    print(f"night {night}: {len(facts['frames'])} frames")
    s = _median_s(lambda: collect_facts(args.out, store, night, settings, final=False),
                  args.repeat)
    print(f"collect_facts: {s * 1000:.1f} ms")
    big = {**facts, "frames": facts["frames"] * args.copies}
    with tempfile.TemporaryDirectory() as tmp:
        s = _median_s(lambda: render_html(big, {}, Path(tmp), settings), args.repeat)
        print(f"render_html, {len(big['frames'])} frames: {s * 1000:.1f} ms")
    write_report(args.out, store, night, settings, final=False)  # images made once
    s = _median_s(lambda: write_report(args.out, store, night, settings, final=False),
                  args.repeat)
    print(f"write_report refresh (images cached): {s * 1000:.1f} ms")
    store.close()


if __name__ == "__main__":
    main()
