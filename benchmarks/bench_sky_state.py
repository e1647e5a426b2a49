"""Master-sky state per frame: the former single ``.npz`` (np.load + ``from_state`` copy
for the view; add and ``save_npz`` from the cached accumulator) against the memory-mapped
``.npy`` generations of :mod:`photowatch.state.skies` (``read_state``, ``write_state``).

Both views include the leave-one-out master (``SkyAccumulator.master``). Thread CPU and
wall, median of 3, on synthetic N x N patterns (three members)::

    .venv/bin/python benchmarks/bench_sky_state.py 4096
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from photowatch.io.fits import save_npz
from photowatch.stages.mastersky import SkyAccumulator, SkyPattern
from photowatch.state.skies import read_state, write_state


def clock(f) -> tuple[float, float]:
    c, w = time.thread_time(), time.perf_counter()
    f()
    return time.thread_time() - c, time.perf_counter() - w


def main(n: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="pw_skystate_"))
    rng = np.random.default_rng(1)

    def pattern():
        d = 1 + 0.01 * rng.standard_normal((n, n), dtype=np.float32)
        return SkyPattern(d, d * np.float32(1e-4), np.ones((n, n), bool), 1000.0, None)

    try:
        pats = [pattern() for _ in range(3)]
        acc = SkyAccumulator()
        for i, p in enumerate(pats[:2]):
            acc.add(f"f{i}", p, (float(i), 0.0))
        npz = work / "old.npz"
        save_npz(npz, fsync=False, **acc.state())
        man = work / "sky.json"
        write_state(man, SkyAccumulator(), "f0", pats[0], (0.0, 0.0))
        write_state(man, read_state(man), "f1", pats[1], (1.0, 0.0))

        def old_load():
            with np.load(npz, allow_pickle=False) as z:
                return SkyAccumulator.from_state({k: z[k] for k in z.files})

        res: dict[str, list] = {"old view": [], "old add": [], "new view": [], "new add": []}
        for rep in range(3):
            cached = old_load()  # main: cached by the view, added to by the frame's add
            name = f"x{rep}"
            steps = {
                "old view": lambda: old_load().master(exclude="f2", pattern=pats[2]),
                "old add": lambda c=cached, m=name: (
                    c.add(m, pats[2], (2.0, 0.0)), save_npz(npz, fsync=False, **c.state())),
                "new view": lambda: read_state(man).master(exclude="f2", pattern=pats[2]),
                "new add": lambda m=name: write_state(man, read_state(man), m, pats[2],
                                                      (2.0, 0.0)),
            }
            for k, f in steps.items():
                res[k].append(clock(f))
        for k, v in res.items():
            a = np.array(v)
            print(f"{k:9s} CPU {np.median(a[:, 0]):.3f} s  wall {np.median(a[:, 1]):.3f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
