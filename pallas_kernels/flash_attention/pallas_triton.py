"""Causal flash attention of one query block set against one key block set, as Pallas Triton kernels: the forward.

The local compute of ``lasp_jax.softmax_attention`` (allgather, ring) and of the single-device
``flash_attention``. Queries sit at global positions ``q_start + i``, keys at ``k_start + j``
(traced int32 scalars, e.g. from ``lax.axis_index`` inside ``shard_map``); query i sees key j iff
``q_start + i ≥ k_start + j``. It computes exactly the jnp recurrence ``xla.block_attention_fwd``:

    o_i = Σ_{j visible} softmax_j(scale · q_i·k_j) v_j,   lse_i = log Σ_{j visible} exp(scale · q_i·k_j)

with query head h reading key/value head ``h // (H // Hk)`` through the index maps (the repeat
is never materialised), float32 running max and sum (FlashAttention-2, arXiv 2307.08691), the
output in float32 (zero on rows with no visible key) and ``lse`` float32 (−inf on such rows),
so that ring attention can merge block results and the backward (``pallas_triton_vjp``) can
add the contributions of different key blocks.

Layout. One program per (query block, batch row, query head), the last query block first (it
sees the most keys; ``common.heavy_first``). The offset ``shift = q_start − k_start`` reaches the
kernel as a one-element int32 array; from it each program computes, with traced loop bounds, the
key blocks it must see: those wholly visible (a loop without a mask) and those that cross the
diagonal or the end of the keys (a masked loop). Key blocks wholly in the program's future are
never loaded; with sorted document numbers neither are key blocks before the rows' documents,
and tiles wholly inside one document skip the document mask (``common.key_loops``). Head dims are
padded to a power of two ≥ 16 and the lengths to whole blocks outside the kernel: zero head
columns are exact, padded keys are masked (they are never seen), padded query rows are sliced off.
Exponentials run in base 2; the row maxima are taken of the raw products ``q·k`` and
``scale · log2 e`` enters once, in the exponent's multiply-add.

``flash_attention`` (end of the file) is single-device causal attention as one ``custom_vjp``
over ``block_attention_fwd`` and the backward kernels of ``pallas_triton_vjp``; it has the
kernels write o and the gradients in the input dtypes (no float32 copy through memory).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import F32, dot, pad_dim
from pallas_kernels.flash_attention import pallas_triton_vjp
from pallas_kernels.flash_attention.common import (
    K_PAD_DOC,
    LN2,
    LOG2E,
    Q_PAD_DOC,
    SHIFT_SPEC,
    both,
    bound_spec_q,
    causal_mask,
    check_documents,
    first_key_blocks,
    fit_block,
    heavy_first,
    key_block_range,
    key_loops,
    pad_to,
    padded_ids,
    query_block_of_program,
    resolve,
    round_up,
    same_document,
    shift_operand,
    single_document_blocks,
)
from pallas_kernels.flash_attention.config import BlockConfig

# ---- forward kernel -------------------------------------------------------------------------


def logit_operand(q, scale: float):
    """``(q', c)`` with ``c > 0`` and ``c · q'·k = scale · log2(e) · q·k``: the kernel takes row maxima
    of the raw products ``q'·k`` and folds ``c`` into the exponent's one multiply-add (a positive
    ``c`` keeps the maximum a maximum; negating q is exact; a zero scale makes every logit 0)."""
    if scale > 0:
        return q, scale * LOG2E
    if scale < 0:
        return -q, -scale * LOG2E
    return jnp.zeros_like(q), 1.0


def _forward_kernel(*refs, scale, block_q, block_k, k_len, has_docs, skip):
    """o and lse of ``block_q`` query rows of one (batch row, head) against every visible key
    (with documents: visible and in the query row's document; with ``skip``, key blocks before
    the first row's document are not visited and tiles inside one document are not masked)."""
    refs = list(refs)
    bound_refs = [refs.pop(4) for _ in range(3)] if skip else []  # after shift, q, k, v
    if has_docs:
        shift_ref, q_ref, k_ref, v_ref, q_doc_ref, k_doc_ref, o_ref, lse_ref = refs
        q_docs = q_doc_ref[...]
    else:
        shift_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    q_first = query_block_of_program() * block_q
    shift = shift_ref[...]
    full, visible = key_block_range(
        q_first, shift, block_q=block_q, block_k=block_k, k_len=k_len, num_k_blocks=k_ref.shape[0] // block_k
    )
    loops = key_loops(full, visible, has_docs, [ref[...] for ref in bound_refs] if skip else None)
    q, qk_scale = logit_operand(q_ref[...], scale)

    def body(kb, carry, *, causal, docs):
        m, row_sum, acc = carry  # running max (log2 units), running sum, unnormalised output
        k_first = pl.multiple_of(kb * block_k, block_k)
        k = k_ref[pl.ds(k_first, block_k), :]
        v = v_ref[pl.ds(k_first, block_k), :]
        s = dot(q, k, trans_b=True)  # raw products: qk_scale enters the row max and the exponent
        mask = both(
            causal_mask(q_first, k_first, shift, rows=block_q, cols=block_k, k_len=k_len) if causal else None,
            same_document(q_docs, k_doc_ref[pl.ds(k_first, block_k)]) if docs else None,
        )
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1) * qk_scale)
        # rows with nothing visible yet keep m = −inf; exponentiate against 0 there (p = 0)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if mask is not None else m_new
        p = jnp.exp2(s * qk_scale - m_safe[:, None])  # one multiply-add per logit
        alpha = jnp.exp2(m - m_safe)
        acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
        return m_new, alpha * row_sum + jnp.sum(p, axis=1), acc

    carry = (
        jnp.full((block_q,), -jnp.inf, F32),
        jnp.zeros((block_q,), F32),
        jnp.zeros((block_q, v_ref.shape[-1]), F32),
    )
    for loop in loops:
        carry = lax.fori_loop(loop.start, loop.stop, functools.partial(body, causal=loop.causal, docs=loop.docs), carry)
    m, row_sum, acc = carry
    seen = row_sum > 0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_sum[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(safe_sum)) * LN2, -jnp.inf)


def block_attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_start,
    k_start,
    scale: float,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
    documents_sorted: bool = False,
    out_dtype=None,
    interpret: bool | None = None,
    config: BlockConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal attention of queries at ``q_start + i`` against keys at ``k_start + j`` (Pallas Triton).

    Args:
      q: ``[B, Lq, H, D]``; k: ``[B, Lk, Hk, D]``; v: ``[B, Lk, Hk, E]`` (``H % Hk == 0``), bf16,
        fp16 or fp32 (mixed dtypes are promoted).
      q_start, k_start: global positions of the first query and key (int or traced int32 scalar).
      scale: multiplies the logits.
      q_segment_ids, k_segment_ids: ``[B, Lq]`` / ``[B, Lk]`` integer document ids of the queries
        and keys (both or neither): a query sees only keys of its own id (packed documents).
      documents_sorted: the ids are non-decreasing along each row (document numbers, as
        ``lasp_jax.softmax_attention`` passes them): then key blocks before a query block's first
        document are not visited (and, backward, query blocks after a key block's last document).
        Without it every causally visible tile is visited and masked.
      out_dtype: the dtype the kernel writes ``o`` in (default float32, what block results that
        are merged later need; a caller that uses ``o`` as it is saves a float32 round trip).
      interpret: run the Pallas interpreter (default: when the backend is not a GPU).
      config: tiling (default: ``config.default_config``).

    Returns:
      ``o`` ``[B, Lq, H, E]`` in ``out_dtype`` (zero rows where no key is visible) and ``lse``
      ``[B, H, Lq]`` float32 (−inf there), as ``xla.block_attention_fwd``.
    """
    interpret, cfg, dtype = resolve(q, k, v, interpret, config)
    check_documents(q, k, q_segment_ids, k_segment_ids)
    has_docs = q_segment_ids is not None
    b, lq, h, d = q.shape
    lk, hk, e = k.shape[1], k.shape[2], v.shape[3]
    group = h // hk
    dp, ep = pad_dim(d), pad_dim(e)
    bq, bk = fit_block(cfg.block_q, lq), fit_block(cfg.block_k, lk)
    lq_pad, lk_pad = round_up(lq, bq), round_up(lk, bk)
    q_p = pad_to(q.astype(dtype), lq_pad, dp)
    k_p = pad_to(k.astype(dtype), lk_pad, dp)
    v_p = pad_to(v.astype(dtype), lk_pad, ep)
    skip = has_docs and documents_sorted
    kernel = functools.partial(
        _forward_kernel, scale=float(scale), block_q=bq, block_k=bk, k_len=lk, has_docs=has_docs, skip=skip
    )
    num_q_blocks = lq_pad // bq
    q_block = heavy_first(num_q_blocks)
    doc_specs, docs = [], []
    if has_docs:
        doc_specs = [
            pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, q_block(i))),
            pl.BlockSpec((None, lk_pad), lambda i, bb, hh: (bb, 0)),
        ]
        docs = [padded_ids(q_segment_ids, lq_pad, Q_PAD_DOC), padded_ids(k_segment_ids, lk_pad, K_PAD_DOC)]
    if skip:  # after q, k, v: the first key block of each query block and its single-document key blocks
        first = first_key_blocks(q_segment_ids, k_segment_ids, block_q=bq, block_k=bk, num_q_blocks=num_q_blocks)
        same = single_document_blocks(
            q_segment_ids, k_segment_ids, block_rows=bq, block_cols=bk, num_row_blocks=num_q_blocks
        )
        doc_specs[:0] = [bound_spec_q(num_q_blocks)] * 3
        docs[:0] = [first, *same]
    # grid (query block q_block(i), batch row bb, query head hh); keys and values of head hh // group
    o, lse = pl.pallas_call(
        kernel,
        grid=(num_q_blocks, b, h),
        in_specs=[
            SHIFT_SPEC,
            pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, q_block(i), hh, 0)),
            pl.BlockSpec((None, lk_pad, None, dp), lambda i, bb, hh: (bb, 0, hh // group, 0)),
            pl.BlockSpec((None, lk_pad, None, ep), lambda i, bb, hh: (bb, 0, hh // group, 0)),
            *doc_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, ep), lambda i, bb, hh: (bb, q_block(i), hh, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, q_block(i))),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, lq_pad, h, ep), out_dtype or F32),
            jax.ShapeDtypeStruct((b, h, lq_pad), F32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="flash_attention_forward",
    )(shift_operand(q_start, k_start), q_p, k_p, v_p, *docs)
    return o[:, :lq, :, :e], lse[:, :, :lq]


# ---- single-device causal attention: one custom_vjp over the forward and backward kernels -----


@dataclasses.dataclass(frozen=True)
class Statics:
    """The ``custom_vjp``'s static arguments (hashable)."""

    scale: float
    interpret: bool | None
    config: BlockConfig | None


class Residuals(NamedTuple):
    q: jax.Array
    k: jax.Array
    v: jax.Array
    doc_ids: jax.Array | None
    o: jax.Array  # in q's dtype
    lse: jax.Array  # float32 [B, H, T]


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    doc_ids: jax.Array | None = None,
    interpret: bool | None = None,
    config: BlockConfig | None = None,
) -> jax.Array:
    """Causal attention of ``[B, T, H, D]`` queries against ``[B, T, Hk, D]`` keys on one device.

    ``doc_ids``: ``[B, T]`` non-decreasing document numbers (``reference.document_index`` of the
    segment ids) or None. Returns o ``[B, T, H, E]`` in q's dtype; differentiable in q, k, v.
    """
    return _attention(q, k, v, doc_ids, Statics(scale=float(scale), interpret=interpret, config=config))


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def _attention(q, k, v, doc_ids, statics: Statics):
    return _attention_fwd(q, k, v, doc_ids, statics)[0]


def _block_kwargs(doc_ids, statics: Statics) -> dict:
    return dict(
        q_start=0,
        k_start=0,
        scale=statics.scale,
        q_segment_ids=doc_ids,
        k_segment_ids=doc_ids,
        documents_sorted=True,
        interpret=statics.interpret,
        config=statics.config,
    )


def _attention_fwd(q, k, v, doc_ids, statics: Statics):
    o, lse = block_attention_fwd(q, k, v, **_block_kwargs(doc_ids, statics), out_dtype=q.dtype)
    return o, Residuals(q, k, v, doc_ids, o, lse)


def _attention_bwd(statics: Statics, res: Residuals, do):
    dq, dk, dv = pallas_triton_vjp.block_attention_bwd(
        res.q,
        res.k,
        res.v,
        res.o,
        res.lse,
        do,
        **_block_kwargs(res.doc_ids, statics),
        out_dtype=jnp.result_type(res.q.dtype, res.k.dtype, res.v.dtype),
    )
    return dq.astype(res.q.dtype), dk.astype(res.k.dtype), dv.astype(res.v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
