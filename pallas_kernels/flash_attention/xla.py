"""Causal flash attention in jnp: the block recurrence at global offsets, and single-device attention.

The portable twin of the Pallas kernels (``pallas_triton`` / ``pallas_triton_vjp``), with the same
contract. ``block_attention_fwd`` attends queries at global positions ``q_start + i`` to keys at
``k_start + j`` (query i sees key j iff ``q_start + i ≥ k_start + j``, and with segment ids only
keys of its own document) and returns the output and the float32 log-sum-exp; ``block_attention_bwd``
gives the gradients of one key block set given the *final* output and log-sum-exp of every query
row, so contributions of different key blocks and ranks add up (FlashAttention-2, arXiv 2307.08691):

    P = exp(scale · Q Kᵀ − lse),  dV = Pᵀ dO,  dS = P ⊙ (dO Vᵀ − Δ),  Δ = rowsum(dO ⊙ O),
    dQ = scale · dS K,  dK = scale · dSᵀ Q

Query blocks × key blocks of ``block`` rows (the whole length when ``block`` does not divide it):
``lax.map`` over query blocks, ``lax.scan`` over key blocks with float32 running max and sum,
block pairs wholly in the future skipped with ``lax.cond``; the scores are never larger than
``[B, Hk, G, block_q, block_k]``. Query head h reads key/value head ``h // G`` (``G = H // Hk``)
by reshaping the queries to ``[..., Hk, G, D]``; the repeat is never materialised. Accumulation in
float32 (float64 for float64 inputs).

``flash_attention`` is single-device causal attention as one ``custom_vjp`` over the pair.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import acc_dtype

DEFAULT_BLOCK = 1024  # query and key block of the recurrence


# ---- blocks ------------------------------------------------------------------------------------


def block_length(n: int, want: int) -> int:
    """The block length: ``want`` when it divides ``n``, else the whole length."""
    return want if n % want == 0 else n


def split_blocks(x, n_blocks: int, groups: int | None = None):
    """``[B, N·n, Hk(·G), X]`` -> ``[n_blocks, B, n, Hk, (G,) X]``."""
    b, length, heads, last = x.shape
    if groups is None:
        x = x.reshape(b, n_blocks, length // n_blocks, heads, last)
    else:
        x = x.reshape(b, n_blocks, length // n_blocks, heads // groups, groups, last)
    return jnp.moveaxis(x, 1, 0)


def split_ids(ids, n_blocks: int):
    """``[B, N·n]`` -> ``[n_blocks, B, n]`` (None stays None)."""
    if ids is None:
        return None
    b, length = ids.shape
    return jnp.moveaxis(ids.reshape(b, n_blocks, length // n_blocks), 1, 0)


class QueryBlock(NamedTuple):
    """One query block (a slice of ``lax.map``'s inputs): q ``[B, bq, Hk, G, D]``; the backward
    adds dO ``[B, bq, Hk, G, E]`` and ``stats`` ``[B, Hk, G, bq, 2]`` (lse with +inf on rows that
    see nothing, Δ)."""

    index: jax.Array
    q: jax.Array
    ids: jax.Array | None
    do: jax.Array | None = None
    stats: jax.Array | None = None


class KeyBlock(NamedTuple):
    """One key block: k ``[B, bk, Hk, D]``, v ``[B, bk, Hk, E]``, ids ``[B, bk]`` or None."""

    index: jax.Array
    k: jax.Array
    v: jax.Array
    ids: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Where the blocks sit and how logits are formed (closed over by the loop bodies)."""

    q_start: Any  # int or traced int32 scalar
    k_start: Any
    block_q: int
    block_k: int
    scale: float
    acc: Any  # accumulation dtype

    def visible(self, qi, ki):
        """Whether key block ki has a key at or before the last row of query block qi."""
        return self.k_start + ki * self.block_k <= self.q_start + qi * self.block_q + self.block_q - 1

    def logits(self, query: QueryBlock, key: KeyBlock):
        """Scaled logits ``[B, Hk, G, bq, bk]`` with −inf where a key is invisible (future, other document)."""
        q_pos = self.q_start + query.index * self.block_q + jnp.arange(self.block_q)
        k_pos = self.k_start + key.index * self.block_k + jnp.arange(self.block_k)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", query.q, key.k, preferred_element_type=self.acc) * self.scale
        return jnp.where(visible_mask(q_pos, k_pos, query.ids, key.ids), s, -jnp.inf)


def visible_mask(q_pos, k_pos, q_docs, k_docs):
    """``[B or 1, 1, 1, bq, bk]``: causal at global positions, and the same document when given."""
    mask = (q_pos[:, None] >= k_pos[None, :])[None]
    if q_docs is not None:
        mask = mask & (q_docs[:, :, None] == k_docs[:, None, :])
    return mask[:, None, None]


def _unchanged(carry):
    return carry


# ---- forward -----------------------------------------------------------------------------------


def block_attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_start,
    k_start,
    scale: float,
    block: int = DEFAULT_BLOCK,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal attention of queries at global positions ``q_start + i`` against keys at ``k_start + j``
    (and, with ``[B, L]`` segment ids, only keys of the query's document).

    Args:
      q: ``[B, Lq, H, D]``; k: ``[B, Lk, Hk, D]``; v: ``[B, Lk, Hk, E]`` (``H % Hk == 0``).
      q_start, k_start: global positions of the first query and key (int or traced int32 scalar).
      scale: multiplies the logits.
      block: query and key block length (used when it divides the length, else one block).
      q_segment_ids, k_segment_ids: ``[B, Lq]`` / ``[B, Lk]`` integer document ids (both or neither).

    Returns:
      ``o`` (accumulation dtype, ``[B, Lq, H, E]``, zero on rows with no visible key) and the
      log-sum-exp of the scaled logits ``lse`` (``[B, H, Lq]``, −inf on such rows).
    """
    b, lq, h, _ = q.shape
    lk, hk, e = k.shape[1], k.shape[2], v.shape[3]
    g = h // hk
    bq, bk = block_length(lq, block), block_length(lk, block)
    nq, nk = lq // bq, lk // bk
    tiling = Tiling(q_start, k_start, bq, bk, scale, acc_dtype(q.dtype))
    keys = KeyBlock(jnp.arange(nk), split_blocks(k, nk), split_blocks(v, nk), split_ids(k_segment_ids, nk))
    queries = QueryBlock(jnp.arange(nq), split_blocks(q, nq, g), split_ids(q_segment_ids, nq))
    o, lse = lax.map(functools.partial(_query_block_fwd, tiling=tiling, keys=keys), queries)  # [nq, B, Hk, G, bq, (E)]
    o = jnp.moveaxis(o, 0, 3).reshape(b, hk, g, lq, e)
    o = o.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, e)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, h, lq)
    return o, lse


def _query_block_fwd(query: QueryBlock, *, tiling: Tiling, keys: KeyBlock):
    """o ``[B, Hk, G, bq, E]`` and lse ``[B, Hk, G, bq]`` of one query block against every key block."""
    b, bq, hk, g, _ = query.q.shape
    acc = tiling.acc
    init = (
        jnp.full((b, hk, g, bq), -jnp.inf, acc),  # running max
        jnp.zeros((b, hk, g, bq), acc),  # running sum
        jnp.zeros((b, hk, g, bq, keys.v.shape[-1]), acc),  # unnormalised output
    )
    (m, row_sum, o), _ = lax.scan(functools.partial(_key_step_fwd, tiling=tiling, query=query), init, keys)
    seen = row_sum > 0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    o = jnp.where(seen[..., None], o / safe_sum[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(safe_sum), -jnp.inf)
    return o, lse


def _key_step_fwd(carry, key: KeyBlock, *, tiling: Tiling, query: QueryBlock):
    """Skip key blocks wholly in this query block's future, else fold the block in."""
    update = functools.partial(_online_softmax_update, tiling=tiling, query=query, key=key)
    return lax.cond(tiling.visible(query.index, key.index), update, _unchanged, carry), None


def _online_softmax_update(carry, *, tiling: Tiling, query: QueryBlock, key: KeyBlock):
    m, row_sum, o = carry
    s = tiling.logits(query, key)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    pv = jnp.einsum("bhgqk,bkhe->bhgqe", p.astype(key.v.dtype), key.v, preferred_element_type=tiling.acc)
    return m_new, alpha * row_sum + p.sum(-1), alpha[..., None] * o + pv


# ---- backward ----------------------------------------------------------------------------------


def block_attention_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    o: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    *,
    q_start,
    k_start,
    scale: float,
    block: int = DEFAULT_BLOCK,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of ``block_attention_fwd`` given the *final* ``o`` and ``lse`` of every query row.

    With the global ``lse`` and ``Δ = rowsum(dO ⊙ O)`` the contribution of one key block is
    independent of the others (FlashAttention-2), so ring blocks and gathered blocks add up.
    Returns dq ``[B, Lq, H, D]`` and dk, dv ``[B, Lk, Hk, ·]`` in the accumulation dtype.
    """
    b, lq, h, d = q.shape
    lk, hk, e = k.shape[1], k.shape[2], v.shape[3]
    g = h // hk
    acc = acc_dtype(q.dtype)
    bq, bk = block_length(lq, block), block_length(lk, block)
    nq, nk = lq // bq, lk // bk
    delta = jnp.sum(do.astype(acc) * o.astype(acc), -1).transpose(0, 2, 1)  # [B, H, Lq]
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows with no visible key: P = 0, not exp(−inf + inf)
    stats = jnp.stack([lse, delta], -1).reshape(b, hk, g, nq, bq, 2)
    queries = QueryBlock(
        jnp.arange(nq),
        split_blocks(q, nq, g),
        split_ids(q_segment_ids, nq),
        split_blocks(do.astype(q.dtype), nq, g),
        jnp.moveaxis(stats, 3, 0),  # [nq, B, Hk, G, bq, 2]
    )
    keys = KeyBlock(jnp.arange(nk), split_blocks(k, nk), split_blocks(v, nk), split_ids(k_segment_ids, nk))
    tiling = Tiling(q_start, k_start, bq, bk, scale, acc)
    dq = lax.map(functools.partial(_query_block_dq, tiling=tiling, keys=keys), queries)  # [nq, B, bq, Hk, G, D]
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, lq, h, d)
    dk, dv = lax.map(functools.partial(_key_block_dkv, tiling=tiling, queries=queries), keys)  # [nk, B, bk, Hk, ·]
    dk = jnp.moveaxis(dk, 0, 1).reshape(b, lk, hk, d)
    dv = jnp.moveaxis(dv, 0, 1).reshape(b, lk, hk, e)
    return dq, dk, dv


def _probabilities(tiling: Tiling, query: QueryBlock, key: KeyBlock):
    """P and dS of one block pair, ``[B, Hk, G, bq, bk]``."""
    s = tiling.logits(query, key)
    p = jnp.exp(s - query.stats[..., 0:1])
    dp = jnp.einsum("bqhge,bkhe->bhgqk", query.do, key.v, preferred_element_type=tiling.acc)
    return p, p * (dp - query.stats[..., 1:2])


def _query_block_dq(query: QueryBlock, *, tiling: Tiling, keys: KeyBlock):
    """dQ ``[B, bq, Hk, G, D]`` of one query block: Σ over the visible key blocks."""
    dq = jnp.zeros(query.q.shape, tiling.acc)
    dq, _ = lax.scan(functools.partial(_key_step_dq, tiling=tiling, query=query), dq, keys)
    return dq * tiling.scale


def _key_step_dq(dq, key: KeyBlock, *, tiling: Tiling, query: QueryBlock):
    update = functools.partial(_dq_update, tiling=tiling, query=query, key=key)
    return lax.cond(tiling.visible(query.index, key.index), update, _unchanged, dq), None


def _dq_update(dq, *, tiling: Tiling, query: QueryBlock, key: KeyBlock):
    _, ds = _probabilities(tiling, query, key)
    return dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(query.q.dtype), key.k, preferred_element_type=tiling.acc)


def _key_block_dkv(key: KeyBlock, *, tiling: Tiling, queries: QueryBlock):
    """dK ``[B, bk, Hk, D]`` and dV ``[B, bk, Hk, E]`` of one key block: Σ over the query blocks that see it."""
    init = (jnp.zeros(key.k.shape, tiling.acc), jnp.zeros(key.v.shape, tiling.acc))
    (dk, dv), _ = lax.scan(functools.partial(_query_step_dkv, tiling=tiling, key=key), init, queries)
    return dk * tiling.scale, dv


def _query_step_dkv(carry, query: QueryBlock, *, tiling: Tiling, key: KeyBlock):
    update = functools.partial(_dkv_update, tiling=tiling, query=query, key=key)
    return lax.cond(tiling.visible(query.index, key.index), update, _unchanged, carry), None


def _dkv_update(carry, *, tiling: Tiling, query: QueryBlock, key: KeyBlock):
    dk, dv = carry
    p, ds = _probabilities(tiling, query, key)
    dv = dv + jnp.einsum("bhgqk,bqhge->bkhe", p.astype(key.v.dtype), query.do, preferred_element_type=tiling.acc)
    dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(query.q.dtype), query.q, preferred_element_type=tiling.acc)
    return dk, dv


# ---- single-device causal attention: one custom_vjp over the pair -----------------------------


@dataclasses.dataclass(frozen=True)
class Statics:
    """The ``custom_vjp``'s static arguments (hashable)."""

    scale: float
    block: int


class Residuals(NamedTuple):
    q: jax.Array
    k: jax.Array
    v: jax.Array
    doc_ids: jax.Array | None
    o: jax.Array  # in q's dtype
    lse: jax.Array  # accumulation dtype, [B, H, T]


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    doc_ids: jax.Array | None = None,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:
    """Causal attention of ``[B, T, H, D]`` queries against ``[B, T, Hk, D]`` keys on one device.

    ``doc_ids``: ``[B, T]`` document numbers (a query sees only keys of its own) or None.
    Returns o ``[B, T, H, E]`` in q's dtype; differentiable in q, k, v.
    """
    return _attention(q, k, v, doc_ids, Statics(scale=float(scale), block=block))


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def _attention(q, k, v, doc_ids, statics: Statics):
    return _attention_fwd(q, k, v, doc_ids, statics)[0]


def _block_kwargs(doc_ids, statics: Statics) -> dict:
    return dict(
        q_start=0, k_start=0, scale=statics.scale, block=statics.block, q_segment_ids=doc_ids, k_segment_ids=doc_ids
    )


def _attention_fwd(q, k, v, doc_ids, statics: Statics):
    o, lse = block_attention_fwd(q, k, v, **_block_kwargs(doc_ids, statics))
    o = o.astype(q.dtype)
    return o, Residuals(q, k, v, doc_ids, o, lse)


def _attention_bwd(statics: Statics, res: Residuals, do):
    dq, dk, dv = block_attention_bwd(res.q, res.k, res.v, res.o, res.lse, do, **_block_kwargs(res.doc_ids, statics))
    return dq.astype(res.q.dtype), dk.astype(res.k.dtype), dv.astype(res.v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
