"""Chunked causal linear attention in plain jnp: the portable path and the CPU default.

One ``lax.scan`` walks the chunks of C tokens. Each step computes the chunk's masked C×C
attention, adds the contribution of the float32 ``[B, H, D, E]`` state entering the chunk and
updates that state (DESIGN.md §1). Per-chunk states are never stacked in memory, which is what
makes this path fast on CPUs with little memory bandwidth. Tensors are laid out as
``[N, B, Hk, G, C, ·]`` (G = H // Hk query heads per key head), so keys and values are never
repeated. Gradients come from autodiff; each step is rematerialised, so the backward stores only
the state entering each chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 64


def _chunk_step(state, chunk, *, scale, causal):
    """One chunk: q [B, Hk, G, C, D], k [B, Hk, C, D], v [B, Hk, C, E], cum [B, Hk, G, C] or None."""
    q, k, v, cum = chunk
    scores = jnp.einsum("bkgid,bkjd->bkgij", q, k)
    if cum is None:
        scores = jnp.where(causal, scores, 0.0)
        o_inter = jnp.einsum("bkgid,bkgde->bkgie", q, state)
        new_state = state + jnp.einsum("bkjd,bkje->bkde", k, v)[:, :, None]
    else:
        diff = cum[..., :, None] - cum[..., None, :]
        scores = scores * jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
        o_inter = jnp.einsum("bkgid,bkgde->bkgie", q * jnp.exp(cum)[..., None], state)
        to_end = jnp.exp(cum[..., -1:] - cum)  # exp(b_{C-1} - b_j)
        new_state = jnp.exp(cum[..., -1])[..., None, None] * state + jnp.einsum(
            "bkjd,bkgje->bkgde", k, to_end[..., None] * v[:, :, None]
        )
    o = jnp.einsum("bkgij,bkje->bkgie", scores, v) + o_inter
    return new_state, scale * o


def linear_attention(q, k, v, log_decay=None, *, scale, initial_state=None, chunk_size=DEFAULT_CHUNK):
    """Same contract as ``reference.recurrent``; returns ``(o, final_state)`` in float32."""
    b, t, h, d = q.shape
    hk, e = k.shape[2], v.shape[-1]
    grp = h // hk
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    f32 = jnp.float32

    def chunks(x):
        # [B, T, Hk, (G,) F] -> [N, B, Hk, (G,) C, F]; zero padding is exact: k = v = 0 adds
        # nothing to the state and a zero log decay does not decay it
        x = jnp.pad(x.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, n, c) + x.shape[2:])
        return jnp.moveaxis(x, (1, 2), (0, x.ndim - 2))

    qc = chunks(q.reshape(b, t, hk, grp, d))
    kc, vc = chunks(k), chunks(v)
    cum = None
    if log_decay is not None:
        cum = jnp.cumsum(chunks(log_decay.reshape(b, t, hk, grp, 1))[..., 0], axis=-1)

    s0 = jnp.zeros((b, hk, grp, d, e), f32)
    if initial_state is not None:
        s0 = initial_state.astype(f32).reshape(b, hk, grp, d, e)
    causal = jnp.tril(jnp.ones((c, c), bool))

    @jax.checkpoint
    def step(state, chunk):
        return _chunk_step(state, chunk, scale=scale, causal=causal)

    final, o = jax.lax.scan(step, s0, (qc, kc, vc, cum))
    o = jnp.moveaxis(o, (0, 4), (1, 2)).reshape(b, n * c, h, e)[:, :t]
    return o, final.reshape(b, h, d, e)
