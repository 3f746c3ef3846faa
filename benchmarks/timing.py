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


def forward_and_grads(attn, *args):
    """``(o, gradients of ⟨o, do⟩)`` for ``args = (*inputs, do)``: one forward+backward as a training
    step runs it. o is returned so that a forward kernel whose output the backward does not read is
    not dropped by the compiler (a plain ``jax.vjp(attn, ...)[1](do)`` lets XLA remove it, and the
    forward+backward time then misses the output)."""
    import jax

    *inputs, do = args
    o, vjp = jax.vjp(attn, *inputs)
    return o, vjp(do)
