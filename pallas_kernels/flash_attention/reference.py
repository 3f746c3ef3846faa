"""Oracles of causal softmax attention: the dense masked softmax, whole-sequence and at block offsets.

Both form the full ``[B, Hk, G, Lq, Lk]`` logits in the inputs' dtype (run them in float64 for
tests); query head h reads key/value head ``h // G`` (``G = H // Hk``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention.reference import document_index


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None, segment_ids: jax.Array | None = None
) -> jax.Array:
    """``o_i = Σ_{j ≤ i} softmax_j(scale · q_i·k_j) v_j`` for ``[B, T, H, D]`` queries, ``[B, T, Hk, ·]``
    keys and values; with ``segment_ids`` ``[B, T]`` a query sees only keys of its own document (a
    run of equal ids). ``scale`` defaults to ``D ** -0.5``."""
    b, t, h, d = q.shape
    hk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hk, h // hk, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
    mask = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None]
    if segment_ids is not None:
        doc = document_index(segment_ids)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhgqk,bkhe->bqhge", p, v)
    return o.reshape(b, t, h, v.shape[-1])


def block_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_start, k_start, scale: float):
    """What ``block_attention_fwd`` returns, densely: ``(o, lse)`` of queries at ``q_start + i``
    against keys at ``k_start + j``; o = 0 and lse = −inf on rows that see no key. Differentiable
    with finite gradients everywhere (masked logits never pass through ``exp(−inf)``)."""
    b, lq, h, d = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, lq, hk, h // hk, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
    mask = (q_start + jnp.arange(lq))[:, None] >= (k_start + jnp.arange(k.shape[1]))[None, :]
    m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, s, -jnp.inf), -1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, m) - m), 0.0)  # no inf in the unused branch: finite grads
    row_sum = p.sum(-1)
    seen = row_sum > 0
    o = jnp.einsum("bhgqk,bkhe->bqhge", p / jnp.where(seen, row_sum, 1.0)[..., None], v)
    lse = jnp.where(seen, m[..., 0] + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)
    return o.reshape(b, lq, h, v.shape[-1]), lse.reshape(b, h, lq)
