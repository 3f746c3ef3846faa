"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import time


def median_ms(fn, *args, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn(*args)`` over ``reps`` calls (each waits for its outputs),
    after ``warmup`` untimed calls (compilation included)."""
    import jax
    import numpy as np

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))
