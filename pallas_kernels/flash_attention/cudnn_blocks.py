"""Block functions on cuDNN's fused attention (``impl="cudnn_blocks"``): every strategy's block pairs.

cuDNN's flash kernels (through JAX's ``jax._src.cudnn.fused_attention_stablehlo``) take a causal
mask only where queries and keys start at the same position, and a key length per batch row (the
padding mask), not the global offsets a sequence-parallel block pair has. The pairs the strategies
form are chunk-aligned, so each is at most two cuDNN calls. With ``d = q_start − k_start``, ``Lq``
queries and ``Tk`` keys (query i sees key j iff ``j ≤ d + i``):

- ``d ≥ Tk``: every key is visible: one call with the padding mask at key length ``Tk``;
- ``0 ≤ d ≤ Tk − Lq``: keys ``[0, d)`` are visible to every query (the padding mask at key
  length ``d``, skipped when ``d = 0``) and keys ``[d, d + Lq)`` are causal, as one causal call
  on that slice (the "band");
- ``d ≤ −Lq``: nothing is visible.

Any other offset (a partial overlap) is outside the contract and gives NaN outputs, log-sum-exps
and query gradients, so a misuse cannot pass silently; the strategies never form one (their parts are
whole chunks). Each call sits under ``lax.cond`` on the traced offsets, so a rank's skipped part
costs no kernel. The two partial outputs merge by their log-sum-exps in float32 (each partial
output is rounded to the input dtype by cuDNN first). The backward runs cuDNN's backward on each
part given the *final* o and lse (``P = exp(scale·QKᵀ − lse)``, ``Δ = rowsum(dO ⊙ O)``:
FlashAttention-2's backward needs nothing else), so the gradients of the parts add up to the exact
gradient as the Pallas blocks' do (each part's dq, dk, dv are rounded to the input dtype by cuDNN
before the float32 sums, where the Pallas blocks write float32).

Documents (segment ids as non-decreasing global document numbers, as ``softmax_attention`` passes
them): only the queries' first document can see keys before the queries' own positions, and those
keys are one run. So the prefix call takes that document's rows (cuDNN's per-row query length; all
the rows, as a pair runs here only where its queries hold one document) and its run of keys,
rotated to the front of K and V per batch row (a gather, skipped when no row needs it; the key
length is the run's), and the band is cuDNN's causal call. A pair whose queries hold a document
boundary runs whole on the ``fallback`` block functions (the Pallas kernels on a GPU, whose
document masks and tile skipping serve short documents better than cuDNN calls on short runs would).

Off a GPU the same decomposition runs on ``xla_dense``, a dense jnp twin of the two cuDNN calls
(same dtypes and masks), which is what the CPU tests check; the GPU tests check cuDNN itself.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import on_gpu

# ---- the two dense calls: cuDNN, and its jnp twin ----------------------------------------------


class Dense(NamedTuple):
    """``fwd(q, k, v, *, scale, causal, q_len=None, kv_len=None) -> (o in q's dtype, lse [B, H, Lq]
    float32)`` and ``bwd(q, k, v, o, lse, do, *, same keywords) -> (dq, dk, dv)`` in the inputs'
    dtypes. ``q_len`` / ``kv_len``: None (every row) or int32 ``[B]``: per batch row, only queries
    ``[0, q_len)`` and keys ``[0, kv_len)`` take part (cuDNN's padding mask; not with ``causal``).
    Query rows past ``q_len`` are unspecified in the forward, and a batch row with ``kv_len = 0``
    gets o = 0 and lse = 0 (not −inf) from cuDNN (H200, jax 0.11.2): the caller masks both; the
    jnp twin gives the same zeros, so the CPU tests check the masking."""

    fwd: object
    bwd: object


def _fa():
    from jax._src.cudnn import fused_attention_stablehlo as fa  # private: JAX exposes no backward with given stats

    return fa


def _mask_type(fa, causal: bool, padded: bool):
    if padded:
        return fa.MaskType.PADDING
    return fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK


def cudnn_fwd(q, k, v, *, scale: float, causal: bool, q_len=None, kv_len=None):
    fa = _fa()
    padded = q_len is not None or kv_len is not None
    q_rows, k_rows = _row_lengths(q, k, q_len, kv_len) if padded else (None, None)
    o, lse = fa.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=q_rows,
        kv_seqlen=k_rows,
        scale=scale,
        mask_type=_mask_type(fa, causal, padded),
        qkv_layout="BTNH",
        return_residual=True,
    )
    return o, lse.astype(jnp.float32)


def _row_lengths(q, k, q_len, kv_len):
    """int32 ``[B]`` query and key lengths, the full length where one is None."""
    b = q.shape[0]

    def rows(x, n):
        return jnp.full((b,), n, jnp.int32) if x is None else jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b,))

    return rows(q_len, q.shape[1]), rows(kv_len, k.shape[1])


def cudnn_bwd(q, k, v, o, lse, do, *, scale: float, causal: bool, q_len=None, kv_len=None):
    """cuDNN's backward primitive, bound as JAX's own VJP rule binds it but with the given o and lse."""
    fa = _fa()
    unused = jnp.zeros(0, dtype=q.dtype)
    padded = q_len is not None or kv_len is not None
    q_rows, k_rows = _row_lengths(q, k, q_len, kv_len) if padded else (unused, unused)
    keywords = dict(
        scale=scale,
        seed=42,
        dropout_rate=0.0,
        variadic_args=(False, False),
        mask_type=_mask_type(fa, causal, padded),
        layout=fa.AttentionLayout.BTNH.value,
        sliding_window_length=None,
    )
    if "score_mod" in inspect.signature(fa._dot_product_attention_bwd_rule).parameters:  # jax ≥ 0.12
        keywords["score_mod"] = None
    dq, dk, dv = fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, q_rows, k_rows, unused, unused, unused, unused, lse, o, do, **keywords
    )[:3]
    return dq, dk, dv


def _scores(q, k, *, scale: float, causal: bool, q_len, kv_len):
    """Float32 scaled logits ``[B, Hk, G, Lq, Tk]`` and the visibility mask ``[B, 1, 1, Lq, Tk]``."""
    b, lq, h, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    qg = q.reshape(b, lq, hk, h // hk, d).astype(jnp.float32)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32), precision=lax.Precision.HIGHEST) * scale
    rows, cols = jnp.arange(lq)[:, None], jnp.arange(tk)[None, :]
    visible = jnp.broadcast_to(cols <= rows if causal else jnp.ones((lq, tk), bool), (b, lq, tk))
    if q_len is not None:
        visible = visible & (rows[None] < jnp.asarray(q_len).reshape(-1, 1, 1))
    if kv_len is not None:
        visible = visible & (cols[None] < jnp.asarray(kv_len).reshape(-1, 1, 1))
    return s, visible[:, None, None]


def xla_dense_fwd(q, k, v, *, scale: float, causal: bool, q_len=None, kv_len=None):
    b, lq, h, _ = q.shape
    s, visible = _scores(q, k, scale=scale, causal=causal, q_len=q_len, kv_len=kv_len)
    s = jnp.where(visible, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, Hk, G, Lq]; −inf on rows that see nothing
    p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    if kv_len is not None:  # as cuDNN: a batch row with no keys gets lse 0, not −inf
        lse = jnp.where(jnp.asarray(kv_len).reshape(-1, 1, 1, 1) == 0, 0.0, lse)
    o = jnp.einsum("bhgqk,bkhe->bqhge", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return o.reshape(b, lq, h, v.shape[-1]).astype(q.dtype), lse.reshape(b, h, lq)


def xla_dense_bwd(q, k, v, o, lse, do, *, scale: float, causal: bool, q_len=None, kv_len=None):
    b, lq, h, d = q.shape
    hk, e = k.shape[2], v.shape[-1]
    s, visible = _scores(q, k, scale=scale, causal=causal, q_len=q_len, kv_len=kv_len)
    lse = lse.reshape(b, hk, h // hk, lq)
    p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
    dog = do.reshape(b, lq, hk, h // hk, e).astype(jnp.float32)
    delta = jnp.sum(dog * o.reshape(dog.shape).astype(jnp.float32), axis=-1)  # [B, Lq, Hk, G]
    hi = lax.Precision.HIGHEST
    dv = jnp.einsum("bhgqk,bqhge->bkhe", p, dog, precision=hi)
    dp = jnp.einsum("bqhge,bkhe->bhgqk", dog, v.astype(jnp.float32), precision=hi)
    ds = p * (dp - jnp.moveaxis(delta, 1, 3)[..., None]) * scale
    dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k.astype(jnp.float32), precision=hi).reshape(b, lq, h, d)
    qg = q.reshape(b, lq, hk, h // hk, d).astype(jnp.float32)
    dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qg, precision=hi)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


CUDNN = Dense(cudnn_fwd, cudnn_bwd)
XLA_DENSE = Dense(xla_dense_fwd, xla_dense_bwd)


def default_dense() -> Dense:
    """cuDNN on a GPU, else the jnp twin."""
    return CUDNN if on_gpu() else XLA_DENSE


# ---- one block pair at global offsets as its prefix and its band -------------------------------


class Parts(NamedTuple):
    first: jax.Array  # int32 [B]: the prefix keys start here (0 without documents)
    prefix: jax.Array  # int32 [B]: keys [first, first + prefix) seen by the prefix rows
    rows: jax.Array  # int32 [B]: the prefix rows [0, rows) (Lq without documents)
    band: jax.Array  # bool: keys [d, d + Lq) seen causally
    start: jax.Array  # int32: the band's first key (clipped into range)
    valid: jax.Array  # bool: the offsets are in the contract


def _parts(q_len: int, k_len: int, q_start, k_start, q_ids, k_ids) -> Parts:
    """The prefix and band of a pair. With (non-decreasing, global) document numbers only the
    queries' first document can reach keys before the queries' own positions: its rows
    ``[0, rows)`` see keys ``[first, first + prefix)``, the run of that document before them."""
    d = jnp.asarray(q_start, jnp.int32) - jnp.asarray(k_start, jnp.int32)
    band = (d >= 0) & (d <= k_len - q_len)
    valid = (d >= k_len) | (d <= -q_len) | band
    end = jnp.clip(d, 0, k_len)
    if q_ids is None:
        b = 1
        first, rows = jnp.zeros((b,), jnp.int32), jnp.full((b,), q_len, jnp.int32)
    else:
        doc = q_ids[:, :1]
        rows = jnp.sum(q_ids == doc, axis=1, dtype=jnp.int32)  # the first document's run of queries
        first = jnp.minimum(jnp.sum(k_ids < doc, axis=1, dtype=jnp.int32), end)  # its first key here
    prefix = jnp.maximum(end - first, 0)
    return Parts(first, prefix, rows, band, jnp.clip(d, 0, max(k_len - q_len, 0)), valid)


def _band(x, parts: Parts, q_len: int):
    return lax.dynamic_slice_in_dim(x, parts.start, q_len, axis=1)


def _roll(shift, *xs):
    """Row b of each ``[B, T, ...]`` rotated left by ``shift[b]`` (None: unchanged; a gather of the
    whole blocks under one ``lax.cond``, skipped when every shift is 0)."""
    if shift is None:
        return xs

    def gather():
        idx = (jnp.arange(xs[0].shape[1])[None, :] + shift[:, None]) % xs[0].shape[1]
        return tuple(jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1) for x in xs)

    return lax.cond(jnp.any(shift > 0), gather, lambda: xs)


def _row_mask(lengths, n: int):
    """``[B, n, 1, 1]``: row i of batch row b is below ``lengths[b]``."""
    return (jnp.arange(n)[None, :] < lengths[:, None])[:, :, None, None]


def _single_document(q_ids):
    """Every batch row's queries lie in one document (the band can use cuDNN's causal mask)."""
    return jnp.all(q_ids[:, 0] == q_ids[:, -1])


def _documents(q_ids, k_ids, fallback) -> bool:
    if (q_ids is None) != (k_ids is None):
        raise ValueError("q_segment_ids and k_segment_ids go together: pass both or neither")
    if q_ids is not None and fallback is None:
        raise ValueError(
            "cudnn_blocks with segment_ids needs non-decreasing global document numbers and a fallback pair of "
            "block functions for blocks whose queries hold a document boundary: block_functions('cudnn_blocks', "
            "documents_sorted=True) passes one"
        )
    return q_ids is not None


def block_attention_fwd(
    q,
    k,
    v,
    *,
    q_start,
    k_start,
    scale: float,
    q_segment_ids=None,
    k_segment_ids=None,
    dense: Dense | None = None,
    fallback=None,
):
    """As ``xla.block_attention_fwd`` (o float32 ``[B, Lq, H, E]``, lse ``[B, H, Lq]``, zero / −inf
    on rows that see no key) for chunk-aligned offsets (module docstring). Segment ids must be
    non-decreasing document numbers along the global sequence (``softmax_attention``'s); a pair
    whose queries hold a document boundary runs on ``fallback`` (a ``(fwd, bwd)`` pair of block
    functions that take documents: the Pallas kernels on a GPU)."""
    docs = _documents(q_segment_ids, k_segment_ids, fallback)
    parts = _parts(q.shape[1], k.shape[1], q_start, k_start, q_segment_ids, k_segment_ids)
    pair = functools.partial(_pair_fwd, q, k, v, parts, scale=scale, dense=dense or default_dense(), docs=docs)
    if docs:
        ids = dict(q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids)
        other = lambda: tuple(  # noqa: E731  (float32 as the pair's, also for float64 input)
            x.astype(jnp.float32) for x in fallback[0](q, k, v, q_start=q_start, k_start=k_start, scale=scale, **ids)
        )
        o, lse = lax.cond(_single_document(q_segment_ids), pair, other)
    else:
        o, lse = pair()
    return jnp.where(parts.valid, o, jnp.nan), jnp.where(parts.valid, lse, jnp.nan)


def _pair_fwd(q, k, v, parts: Parts, *, scale: float, dense: Dense, docs: bool):
    """The prefix call and the causal band, merged; float32 o and lse."""
    b, lq, h, _ = q.shape
    tk = k.shape[1]
    f32 = jnp.float32
    none = (jnp.zeros((b, lq, h, v.shape[-1]), f32), jnp.full((b, h, lq), -jnp.inf, f32))
    call = functools.partial(dense.fwd, scale=scale)

    def prefix():
        shift = parts.first if docs else None
        o, lse = call(q, *_roll(shift, k, v), causal=False, q_len=parts.rows, kv_len=parts.prefix)
        seen = _row_mask(parts.rows, lq) & (parts.prefix > 0)[:, None, None, None]  # [B, Lq, 1, 1]
        return jnp.where(seen, o.astype(f32), 0.0), jnp.where(seen[:, :, 0, 0][:, None, :], lse, -jnp.inf)

    def band():
        o, lse = call(q, _band(k, parts, lq), _band(v, parts, lq), causal=True)
        return o.astype(f32), lse

    o_p, lse_p = lax.cond(jnp.any(parts.prefix > 0), prefix, lambda: none)
    o_b, lse_b = lax.cond(parts.band, band, lambda: none) if tk >= lq else none  # no band fits: none
    lse = jnp.logaddexp(lse_p, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w_p, w_b = (jnp.exp(x - safe).transpose(0, 2, 1)[..., None] for x in (lse_p, lse_b))
    return w_p * o_p + w_b * o_b, lse


def block_attention_bwd(
    q,
    k,
    v,
    o,
    lse,
    do,
    *,
    q_start,
    k_start,
    scale: float,
    q_segment_ids=None,
    k_segment_ids=None,
    dense: Dense | None = None,
    fallback=None,
):
    """As ``xla.block_attention_bwd``: float32 ``(dq, dk, dv)`` of this key block given the queries'
    *final* o and lse, for chunk-aligned offsets; documents as in ``block_attention_fwd``."""
    docs = _documents(q_segment_ids, k_segment_ids, fallback)
    parts = _parts(q.shape[1], k.shape[1], q_start, k_start, q_segment_ids, k_segment_ids)
    o_in, do_in = o.astype(q.dtype), do.astype(q.dtype)  # cuDNN takes them in the input dtype
    pair = functools.partial(
        _pair_bwd, q, k, v, o_in, lse, do_in, parts, scale=scale, dense=dense or default_dense(), docs=docs
    )
    if docs:
        kw = dict(q_start=q_start, k_start=k_start, scale=scale, q_segment_ids=q_segment_ids)
        other = lambda: tuple(  # noqa: E731
            g.astype(jnp.float32) for g in fallback[1](q, k, v, o, lse, do, k_segment_ids=k_segment_ids, **kw)
        )
        grads = lax.cond(_single_document(q_segment_ids), pair, other)
    else:
        grads = pair()
    dq, dk, dv = grads  # the guard on dq alone: dK/dV are whole key blocks, a pass over them costs
    return jnp.where(parts.valid, dq, jnp.nan), dk, dv


def _pair_bwd(q, k, v, o, lse, do, parts: Parts, *, scale: float, dense: Dense, docs: bool):
    """float32 ``(dq, dk, dv)`` of the prefix call and the causal band given the final o and lse."""
    lq, tk = q.shape[1], k.shape[1]
    f32 = jnp.float32
    call = functools.partial(dense.bwd, scale=scale)

    def prefix():
        shift = parts.first if docs else None
        kr, vr = _roll(shift, k, v)
        dq, dk, dv = call(q, kr, vr, o, lse, do, causal=False, q_len=parts.rows, kv_len=parts.prefix)
        rows = _row_mask(parts.rows, lq) & (parts.prefix > 0)[:, None, None, None]
        keys = _row_mask(parts.prefix, tk)  # keys past the length: zero, whatever cuDNN left there
        dk, dv = (jnp.where(keys, x.astype(f32), 0.0) for x in (dk, dv))
        back = None if shift is None else (tk - shift) % tk
        return (jnp.where(rows, dq.astype(f32), 0.0), *_roll(back, dk, dv))

    zeros = (jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    grads = lax.cond(jnp.any(parts.prefix > 0), prefix, lambda: zeros)
    if tk < lq:  # no band fits
        return grads

    def band(grads):
        dq, dk, dv = grads
        dq_b, dk_b, dv_b = call(q, _band(k, parts, lq), _band(v, parts, lq), o, lse, do, causal=True)
        add = lambda acc, x: lax.dynamic_update_slice_in_dim(  # noqa: E731
            acc, _band(acc, parts, lq) + x.astype(f32), parts.start, axis=1
        )
        return dq + dq_b.astype(f32), add(dk, dk_b), add(dv, dv_b)

    return lax.cond(parts.band, band, lambda g: g, grads)
