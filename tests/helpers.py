"""Shared test helpers: float64 context, relative error, random linear-attention inputs."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

# tolerance on ‖out − ref‖ / ‖ref‖ against a float64 reference, per input dtype
TOL = {jnp.float32: 2e-4, jnp.float16: 5e-3, jnp.bfloat16: 3e-2, jnp.float64: 1e-10}


def tol(dtype, length: int = 1) -> float:
    """Tolerance for ``dtype``, loosened slowly with the reduction length."""
    base = TOL[jnp.dtype(dtype).type] if jnp.dtype(dtype).type in TOL else TOL[jnp.float32]
    return base * max(1.0, np.log2(max(length, 2)) / 6)


@contextlib.contextmanager
def x64():
    """float64 enabled inside the block."""
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(True):
            yield
    else:  # older jax
        from jax.experimental import enable_x64

        with enable_x64():
            yield


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.isfinite(a)), "non-finite values in the result under test"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(rng, *, b=2, t=37, h=4, hk=None, d=16, e=None, decay="g", dtype=jnp.float32, init=True, g_scale=1.0):
    """Random q, k, v, decay and initial state as numpy float64 arrays plus the dtype to cast to.

    ``decay``: None, "g_gamma" or "g"; ``g_scale`` sets the size of the log decays.
    """
    hk = hk or h
    e = e or d
    q = rng.standard_normal((b, t, h, d))
    k = rng.standard_normal((b, t, hk, d)) / np.sqrt(d)
    v = rng.standard_normal((b, t, hk, e))
    kw = {}
    if decay == "g":
        kw["g"] = -g_scale * rng.uniform(0.01, 1.0, (b, t, h))
    elif decay == "g_gamma":
        kw["g_gamma"] = -g_scale * rng.uniform(0.01, 1.0, (h,))
    if init:
        kw["initial_state"] = rng.standard_normal((b, h, d, e)) / np.sqrt(d)
    return q, k, v, kw


def cast(x, dtype):
    return jnp.asarray(x, dtype)


def dg_gamma_error(got, want, q, k, v, kw, do, ds, segment_ids=None) -> float:
    """Error of a ``g_gamma`` gradient, measured against ``Σ_{b,t} |dg_t|`` per head.

    ``dg_gamma = Σ_{b,t} dg_t`` can be far smaller than its terms (they nearly cancel under strong
    decay, or by chance), so its error relative to itself says nothing about the arithmetic; the
    per-token gradients of the same loss, ``<o, do> + <final_state, ds>`` (float64 reference
    with ``g = g_gamma`` at every token), give the scale the float32 arithmetic works at.
    """
    from pallas_kernels import linear_attention

    per_token = {n: x for n, x in kw.items() if n != "g_gamma"}
    per_token["g"] = np.broadcast_to(kw["g_gamma"], np.shape(q)[:3])
    with x64():
        f64 = {n: jnp.asarray(x, jnp.float64) for n, x in per_token.items()}
        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v, do, ds)]

        def loss(g, kw, q, k, v, do, ds):
            o, s = linear_attention(
                q, k, v, **(kw | {"g": g}), segment_ids=segment_ids, output_final_state=True, impl="reference"
            )
            return jnp.sum(o * do) + jnp.sum(s * ds)

        # one program (eager, each primitive of the token scan's gradient compiles apart)
        dg = jax.jit(jax.grad(loss))(f64.pop("g"), f64, *args)
        scale = float(np.abs(np.asarray(dg)).sum((0, 1)).max())
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max()
    return float(diff / max(scale, np.abs(np.asarray(want)).max()))
