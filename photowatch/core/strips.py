"""Run a function over strips of rows, in threads when asked (numpy releases the GIL)."""

from __future__ import annotations

from collections.abc import Callable, Iterable


def for_each_strip(fn: Callable[[int], None], starts: Iterable[int], workers: int = 1) -> None:
    """``fn(start)`` for every start, on ``workers`` threads when there are two or more
    strips; exceptions propagate. The strips must write disjoint rows."""
    starts = list(starts)
    if workers > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fn, starts))
    else:
        for s in starts:
            fn(s)
