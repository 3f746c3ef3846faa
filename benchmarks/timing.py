"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import time


def median_ms(fn, *args, reps: int, warmup: int = 1, inner: int = 1) -> float:
    """Median milliseconds of ``fn(*args)`` over ``reps`` samples, after ``warmup`` untimed calls
    (compilation included). A sample is the mean of ``inner`` back-to-back calls of which only the
    last is waited for (``inner`` > 1 amortises dispatch for short programs)."""
    import jax
    import numpy as np

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner - 1):
            fn(*args)
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) / inner)
    return 1e3 * float(np.median(times))
