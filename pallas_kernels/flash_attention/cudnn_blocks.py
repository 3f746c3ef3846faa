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
and gradients, so a misuse cannot pass silently; the strategies never form one (their parts are
whole chunks). Each call sits under ``lax.cond`` on the traced offsets, so a rank's skipped part
costs no kernel. The two partial outputs merge by their log-sum-exps in float32 (each partial
output is rounded to the input dtype by cuDNN first). The backward runs cuDNN's backward on each
part given the *final* o and lse (``P = exp(scale·QKᵀ − lse)``, ``Δ = rowsum(dO ⊙ O)``:
FlashAttention-2's backward needs nothing else), so the gradients of the parts add up to the exact
gradient as the Pallas blocks' do (each part's dq, dk, dv are rounded to the input dtype by cuDNN
before the float32 sums, where the Pallas blocks write float32).

No documents (``segment_ids``): cuDNN's packed layout needs per-segment offsets that a block at
global offsets does not have; ``lasp_jax.softmax_attention`` refuses the combination.

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
    """``fwd(q, k, v, kv_len, *, scale, causal) -> (o in q's dtype, lse [B, H, Lq] float32)`` and
    ``bwd(q, k, v, o, lse, do, kv_len, *, scale, causal) -> (dq, dk, dv)`` in the inputs' dtypes;
    ``kv_len``: None (every key) or a traced int32 scalar (keys ``[0, kv_len)``, not with ``causal``)."""

    fwd: object
    bwd: object


def _fa():
    from jax._src.cudnn import fused_attention_stablehlo as fa  # private: JAX exposes no backward with given stats

    return fa


def _lengths(q, k, kv_len):
    """cuDNN's per-row query and key lengths (int32 ``[B]``), or None without a key length."""
    if kv_len is None:
        return None, None
    b = q.shape[0]
    return jnp.full((b,), q.shape[1], jnp.int32), jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (b,))


def _mask_type(fa, causal: bool, kv_len):
    if kv_len is not None:
        return fa.MaskType.PADDING
    return fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK


def cudnn_fwd(q, k, v, kv_len, *, scale: float, causal: bool):
    fa = _fa()
    q_len, k_len = _lengths(q, k, kv_len)
    o, lse = fa.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=q_len,
        kv_seqlen=k_len,
        scale=scale,
        mask_type=_mask_type(fa, causal, kv_len),
        qkv_layout="BTNH",
        return_residual=True,
    )
    return o, lse.astype(jnp.float32)


def cudnn_bwd(q, k, v, o, lse, do, kv_len, *, scale: float, causal: bool):
    """cuDNN's backward primitive, bound as JAX's own VJP rule binds it but with the given o and lse."""
    fa = _fa()
    unused = jnp.zeros(0, dtype=q.dtype)
    q_len, k_len = _lengths(q, k, kv_len)
    q_len, k_len = (unused, unused) if q_len is None else (q_len, k_len)
    keywords = dict(
        scale=scale,
        seed=42,
        dropout_rate=0.0,
        variadic_args=(False, False),
        mask_type=_mask_type(fa, causal, kv_len),
        layout=fa.AttentionLayout.BTNH.value,
        sliding_window_length=None,
    )
    if "score_mod" in inspect.signature(fa._dot_product_attention_bwd_rule).parameters:  # jax ≥ 0.12
        keywords["score_mod"] = None
    dq, dk, dv = fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, q_len, k_len, unused, unused, unused, unused, lse, o, do, **keywords
    )[:3]
    return dq, dk, dv


def _scores(q, k, kv_len, *, scale: float, causal: bool):
    """Float32 scaled logits ``[B, Hk, G, Lq, Tk]`` and the visibility mask."""
    b, lq, h, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    qg = q.reshape(b, lq, hk, h // hk, d).astype(jnp.float32)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32), precision=lax.Precision.HIGHEST) * scale
    cols = jnp.arange(tk)[None, :]
    visible = cols <= jnp.arange(lq)[:, None] if causal else jnp.ones((lq, tk), bool)
    if kv_len is not None:
        visible = visible & (cols < kv_len)
    return s, visible


def xla_dense_fwd(q, k, v, kv_len, *, scale: float, causal: bool):
    b, lq, h, _ = q.shape
    s, visible = _scores(q, k, kv_len, scale=scale, causal=causal)
    s = jnp.where(visible, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, Hk, G, Lq]
    p = jnp.exp(s - lse[..., None])
    o = jnp.einsum("bhgqk,bkhe->bqhge", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return o.reshape(b, lq, h, v.shape[-1]).astype(q.dtype), lse.reshape(b, h, lq)


def xla_dense_bwd(q, k, v, o, lse, do, kv_len, *, scale: float, causal: bool):
    b, lq, h, d = q.shape
    hk, e = k.shape[2], v.shape[-1]
    s, visible = _scores(q, k, kv_len, scale=scale, causal=causal)
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
    prefix: jax.Array  # int32: keys [0, prefix) seen by every query
    band: jax.Array  # bool: keys [d, d + Lq) seen causally
    start: jax.Array  # int32: the band's first key (clipped into range)
    valid: jax.Array  # bool: the offsets are in the contract


def _parts(q_len: int, k_len: int, q_start, k_start) -> Parts:
    d = jnp.asarray(q_start, jnp.int32) - jnp.asarray(k_start, jnp.int32)
    band = (d >= 0) & (d <= k_len - q_len)
    valid = (d >= k_len) | (d <= -q_len) | band
    return Parts(jnp.clip(d, 0, k_len), band, jnp.clip(d, 0, max(k_len - q_len, 0)), valid)


def _check_no_documents(q_segment_ids, k_segment_ids):
    if q_segment_ids is not None or k_segment_ids is not None:
        raise ValueError(
            "impl='cudnn_blocks' takes no segment_ids (packed documents): cuDNN's block calls have no document "
            "mask at global offsets; use impl='pallas' or 'xla'"
        )


def _band(x, parts: Parts, q_len: int):
    return lax.dynamic_slice_in_dim(x, parts.start, q_len, axis=1)


def block_attention_fwd(
    q, k, v, *, q_start, k_start, scale: float, q_segment_ids=None, k_segment_ids=None, dense: Dense | None = None
):
    """As ``xla.block_attention_fwd`` (o float32 ``[B, Lq, H, E]``, lse ``[B, H, Lq]``, zero / −inf
    on rows that see no key) for chunk-aligned offsets (module docstring); no documents."""
    _check_no_documents(q_segment_ids, k_segment_ids)
    dense = dense or default_dense()
    b, lq, h, _ = q.shape
    tk = k.shape[1]
    parts = _parts(lq, tk, q_start, k_start)
    none = (jnp.zeros((b, lq, h, v.shape[-1]), q.dtype), jnp.full((b, h, lq), -jnp.inf, jnp.float32))
    call = functools.partial(dense.fwd, scale=scale)
    o_p, lse_p = lax.cond(parts.prefix > 0, lambda: call(q, k, v, parts.prefix, causal=False), lambda: none)
    if tk >= lq:
        band = lambda: call(q, _band(k, parts, lq), _band(v, parts, lq), None, causal=True)  # noqa: E731
        o_b, lse_b = lax.cond(parts.band, band, lambda: none)
    else:  # no band fits
        o_b, lse_b = none
    lse = jnp.logaddexp(lse_p, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w_p, w_b = (jnp.exp(x - safe).transpose(0, 2, 1)[..., None] for x in (lse_p, lse_b))
    o = w_p * o_p.astype(jnp.float32) + w_b * o_b.astype(jnp.float32)
    return jnp.where(parts.valid, o, jnp.nan), jnp.where(parts.valid, lse, jnp.nan)


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
):
    """As ``xla.block_attention_bwd``: float32 ``(dq, dk, dv)`` of this key block given the queries'
    *final* o and lse, for chunk-aligned offsets; no documents."""
    _check_no_documents(q_segment_ids, k_segment_ids)
    dense = dense or default_dense()
    lq, tk = q.shape[1], k.shape[1]
    parts = _parts(lq, tk, q_start, k_start)
    o, do = o.astype(q.dtype), do.astype(q.dtype)  # cuDNN takes them in the input dtype
    f32 = jnp.float32
    call = functools.partial(dense.bwd, scale=scale)

    def prefix():
        dq, dk, dv = call(q, k, v, o, lse, do, parts.prefix, causal=False)
        seen = (jnp.arange(tk) < parts.prefix)[None, :, None, None]  # keys past the length: zero, whatever cuDNN left
        return dq.astype(f32), jnp.where(seen, dk.astype(f32), 0.0), jnp.where(seen, dv.astype(f32), 0.0)

    zeros = (jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    dq, dk, dv = lax.cond(parts.prefix > 0, prefix, lambda: zeros)
    if tk >= lq:

        def band(grads):
            dq, dk, dv = grads
            kb, vb = _band(k, parts, lq), _band(v, parts, lq)
            dq_b, dk_b, dv_b = call(q, kb, vb, o, lse, do, None, causal=True)
            add = lambda acc, x: lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, _band(acc, parts, lq) + x.astype(f32), parts.start, axis=1
            )
            return dq + dq_b.astype(f32), add(dk, dk_b), add(dv, dv_b)

        dq, dk, dv = lax.cond(parts.band, band, lambda g: g, (dq, dk, dv))
    return tuple(jnp.where(parts.valid, g, jnp.nan) for g in (dq, dk, dv))
