"""Per-key-channel decay inside a chunk by secondary chunking, shared by the chunked jnp paths.

With a log decay per key channel (GLA's ``g [B, T, H, D]``, KDA's ``g [B, T, Hv, D]``) and ``b`` the
cumulative log decay inside a chunk, the decayed products ``Σ_d x_id k_jd exp(b_id − b_jd)`` (j ≤ i)
are no longer one matmul. Secondary chunking (notes/design.md §6; Yang et al. 2023, "Gated Linear
Attention Transformers with Hardware-Efficient Training") cuts the chunk into sub-blocks of 16
tokens: across sub-blocks the pair factor is split at the first token r of the row's sub-block,
``(x_i ⊙ exp(b_i − b_r)) · (k_j ⊙ exp(b_r − b_j))`` with both exps ≤ 1 (a matmul per sub-block),
and inside a sub-block the 16×16×D factors are formed directly for i > j only. Every exp is of a
non-positive difference, so nothing overflows for any finite gates; never ``exp(b)`` against
``exp(−b)``. The key side (``key_factors``) is formed once per chunk and serves every x (queries,
keys) that reads it.

Used by ``linear_attention``'s and ``gated_delta_rule``'s ``xla.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SUB_BLOCK = 16


def masked_exp(mask, x):
    """``exp(x)`` where ``mask``, else 0, with no gradient through the masked-out ``x``."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def sums_after(x, axis):
    """``Σ_{t>j} x_t`` along ``axis``: a suffix sum that excludes j, so the last position's weight
    ``exp(0) = 1`` is a constant (no gradient of ``Σ_{t≥j} − x_j`` cancelling in float32)."""
    x = jnp.moveaxis(x, axis, -1)
    suffix = jnp.flip(jnp.cumsum(jnp.flip(x, -1), axis=-1), -1)
    after = jnp.concatenate([suffix[..., 1:], jnp.zeros_like(suffix[..., :1])], axis=-1)
    return jnp.moveaxis(after, -1, axis)


class KeyFactors(NamedTuple):
    """The key side of ``Σ_d x_id k_jd exp(b_id − b_jd)``, formed once per chunk. Per key channel
    (cum ``[B, H, G, C, D]``): ``k_ref`` ``[B, H, G, n, C, D]``, ``k_j exp(b_r − b_j)`` for j before
    sub-block n's first token r (else 0), and ``k_inside`` ``[B, H, G, n, S, S, D]``,
    ``k_j exp(b_i − b_j)`` for i > j inside sub-block n (else 0). Without per-channel gates (cum
    None or ``[B, H, G, C]``) only ``k`` and ``cum`` are set."""

    k: jax.Array
    cum: jax.Array | None
    k_ref: jax.Array | None = None
    k_inside: jax.Array | None = None


def key_factors(k, cum) -> KeyFactors:
    """``KeyFactors`` of keys ``k [B, H, C, D]`` under the chunk-local cumulative log decay ``cum``
    (``[B, H, G, C, D]`` per channel, G gates per key head; C a multiple of ``SUB_BLOCK``)."""
    if cum is None or cum.ndim == 4:
        return KeyFactors(k, cum)
    bsz, h, grp, c, d = cum.shape
    s = SUB_BLOCK
    n = c // s
    cum_sub = cum.reshape(bsz, h, grp, n, s, d)
    before = (jnp.arange(c)[None, :] < s * jnp.arange(n)[:, None])[..., None]  # [n, C, 1]: j < r
    k_ref = masked_exp(before, cum_sub[..., :, None, 0, :] - cum[..., None, :, :]) * k[:, :, None, None]
    strict = jnp.tril(jnp.ones((s, s), bool), -1)[..., None]
    factor = masked_exp(strict, cum_sub[..., :, None, :] - cum_sub[..., None, :, :])
    return KeyFactors(k, cum, k_ref, k.reshape(bsz, h, 1, n, 1, s, d) * factor)


def per_channel_scores(x, keys: KeyFactors):
    """``Σ_d x_id k_jd exp(b_id − b_jd)`` for j ≤ i by secondary chunking (see the module docstring):
    x ``[B, H, C, D]`` (shared by the G gates of a key head) or ``[B, H, G, C, D]`` -> ``[B, H, G, C, C]``
    (zero above the diagonal). The diagonal's factor is exactly 1 and kept out of the graph
    (``exp(b_i − b_i)`` would send two opposite gradients to b_i)."""
    bsz, h, grp, c, d = keys.cum.shape
    s = SUB_BLOCK
    n = c // s
    cum_sub = keys.cum.reshape(bsz, h, grp, n, s, d)
    x_sub, k_sub = x.reshape(bsz, h, -1, n, s, d), keys.k.reshape(bsz, h, 1, n, s, d)
    # across sub-blocks: split at the first token r of the row's sub-block, exp(b_i − b_r) ≤ 1
    x_ref = x_sub * jnp.exp(cum_sub - cum_sub[..., :1, :])
    across = jnp.einsum("bhgnid,bhgnjd->bhgnij", x_ref, keys.k_ref)  # [B, H, G, n, S, C]
    # inside a sub-block: the factors directly, i > j; the diagonal's factor is exactly 1
    inside = jnp.einsum("bhgnid,bhgnijd->bhgnij", x_sub, keys.k_inside)
    # (eyes in the operands' dtype: with jax_enable_x64 an untyped eye would make float32 scores float64)
    inside = inside + jnp.eye(s, dtype=x.dtype) * jnp.einsum("bhgnid,bhgnid->bhgni", x_sub, k_sub)[..., None]
    diagonal = inside[..., None, :] * jnp.eye(n, dtype=x.dtype)[:, None, :, None]
    blocks = across.reshape(bsz, h, grp, n, s, n, s) + diagonal
    return blocks.reshape(bsz, h, grp, c, c)
