"""Causal flash attention as Pallas Triton kernels: the backward (FlashAttention-2, arXiv 2307.08691).

Given the *final* output ``o`` and log-sum-exp ``lse`` of every query row (over all the keys the
row sees, possibly in other key blocks or on other ranks), the gradient contribution of one key
block set is independent of the others:

    P = exp(scale · Q Kᵀ − lse),  dV = Pᵀ dO,  dS = P ⊙ (dO Vᵀ − Δ),  Δ = rowsum(dO ⊙ O),
    dQ = scale · dS K,  dK = scale · dSᵀ Q

so ring attention and the gathered keys of LASP-2H add block contributions up. This equals
``xla.block_attention_bwd``.

Two variants (``BlockConfig.backward``), both recomputing P tile by tile (nothing ``[Lq, Lk]`` is
stored):

- ``"split"``: two kernels. ``dq`` (one program per query block, batch row and query head, the
  last query block first as in the forward) walks the visible key blocks with the forward's loop
  bounds; ``dk/dv`` (one program per key block, batch row and *key* head) walks, for each query
  head of the key head's group in turn, the query blocks that see its keys, accumulating dK and
  dV of the group in float32 registers. Both recompute Q Kᵀ and dO Vᵀ: seven tile products per
  visible tile (dq kernel: Q Kᵀ, dO Vᵀ, dS K; dk/dv kernel: Q Kᵀ, dO Vᵀ, Pᵀ dO, dSᵀ Q).
- ``"fused"``: the dk/dv kernel alone, which also adds each tile's ``dS K`` into a float32 dQ in
  global memory with atomic adds (FlashAttention-2's original scheme; ``scale`` multiplies the
  sum once, outside the kernel): five products per tile,
  one pass over Q and dO, at the price of ``[B, Lq, H, D]`` float32 read-modify-writes
  (``Lk / block_k_dkv`` of them per dQ row) and a summation order that varies from run to run.

Masks as in the forward: only tiles that cross the diagonal or the end of the keys get the causal
mask, and with sorted document numbers only tiles that may pair two documents get the document
mask (``common.key_loops`` / ``common.query_loops``).

Summing the group inside the dk/dv kernel keeps its outputs at ``[B, Lk, Hk, ·]`` float32; a
per-query-head output summed afterwards would write (and hold) ``H / Hk`` times as many bytes,
which at the gathered length of LASP-2H is hundreds of MiB.

Δ is computed in XLA (one fused elementwise reduction). Rows with ``lse = −inf`` (no visible key)
and padded query rows get ``lse = +inf`` so that their P is exactly zero.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import F32, dot, pad_dim
from pallas_kernels.flash_attention.common import (
    K_PAD_DOC,
    LOG2E,
    Q_PAD_DOC,
    SHIFT_SPEC,
    both,
    bound_spec_q,
    causal_mask,
    cdiv,
    check_documents,
    first_key_blocks,
    fit_block,
    heavy_first,
    key_block_range,
    key_loops,
    pad_to,
    padded_ids,
    query_block_ends,
    query_block_of_program,
    query_loops,
    resolve,
    round_up,
    same_document,
    shift_operand,
    single_document_blocks,
)
from pallas_kernels.flash_attention.config import BlockConfig


def query_block_range(k_first, shift, *, block_q: int, block_k: int, k_len: int, num_q_blocks: int):
    """(first visible, first fully visible) query block for key rows ``[k_first, k_first + block_k)``.

    Query block qb sees some key of the block when its last row is at or after the first key
    (``qb·block_q + block_q − 1 + shift ≥ k_first``) and every key when its first row is at or
    after the last key and the block holds no padded key. Blocks ``[first, full)`` need a mask,
    ``[full, num_q_blocks)`` do not, earlier ones see nothing of this key block.
    """
    first = jnp.minimum(cdiv(k_first - shift - block_q + 1, block_q), num_q_blocks)
    full = jnp.minimum(cdiv(k_first + block_k - 1 - shift, block_q), num_q_blocks)
    inside = k_first + block_k <= k_len
    return first, jnp.where(inside, full, num_q_blocks)


def _dq_kernel(*refs, scale, block_q, block_k, k_len, has_docs, skip):
    """dQ of ``block_q`` query rows of one (batch row, head): Σ over the visible key blocks."""
    refs = list(refs)
    bound_refs = [refs.pop(7) for _ in range(3)] if skip else []  # after shift, q, k, v, do, lse, delta
    if has_docs:
        shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_doc_ref, k_doc_ref, dq_ref = refs
        q_docs = q_doc_ref[...]
    else:
        shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    q_first = query_block_of_program() * block_q
    shift = shift_ref[...]
    full, visible = key_block_range(
        q_first, shift, block_q=block_q, block_k=block_k, k_len=k_len, num_k_blocks=k_ref.shape[0] // block_k
    )
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]  # lse in log2 units
    qk_scale = scale * LOG2E

    def body(kb, dq, *, causal, docs):
        k_first = pl.multiple_of(kb * block_k, block_k)
        k = k_ref[pl.ds(k_first, block_k), :]
        v = v_ref[pl.ds(k_first, block_k), :]
        p = jnp.exp2(dot(q, k, trans_b=True) * qk_scale - lse[:, None])
        mask = both(
            causal_mask(q_first, k_first, shift, rows=block_q, cols=block_k, k_len=k_len) if causal else None,
            same_document(q_docs, k_doc_ref[pl.ds(k_first, block_k)]) if docs else None,
        )
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(dq_ref.shape, F32)
    for loop in key_loops(full, visible, has_docs, [ref[...] for ref in bound_refs] if skip else None):
        dq = lax.fori_loop(loop.start, loop.stop, functools.partial(body, causal=loop.causal, docs=loop.docs), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, block_q, block_k, k_len, group, has_docs, skip, fused):
    """dK, dV of ``block_k`` key rows of one (batch row, key head), summed over the head's group;
    ``fused``: also each tile's dQ contribution, atomically added to the float32 dQ output
    (unscaled: the caller multiplies the sum by ``scale`` once).

    q_ref/do_ref hold the group's ``[Lq, group, ·]`` query heads, lse_ref/delta_ref ``[group, Lq]``
    (and dq_ref ``[Lq, group, D]``, zeroed before the call). Works on transposed tiles (key rows ×
    query columns) so that no [block_k, block_q] tile is transposed for the dK and dV products.
    """
    refs = list(refs)
    bound_refs = [refs.pop(7) for _ in range(3)] if skip else []  # after shift, q, k, v, do, lse, delta
    dq_ref = refs.pop() if fused else None  # the last output; its zeroed input (aliased) is unused
    if fused:
        refs.pop(-3)
    if has_docs:
        shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_doc_ref, k_doc_ref, dk_ref, dv_ref = refs
        k_docs = k_doc_ref[...]
    else:
        shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    k_first = pl.program_id(0) * block_k
    shift = shift_ref[...]
    first, full = query_block_range(
        k_first, shift, block_q=block_q, block_k=block_k, k_len=k_len, num_q_blocks=q_ref.shape[0] // block_q
    )
    num_q_blocks, bounds = q_ref.shape[0] // block_q, None
    if skip:  # query blocks after this key block's last document see none of it
        end, *bounds = [ref[...] for ref in bound_refs]
        num_q_blocks = jnp.minimum(num_q_blocks, end)
        first, full = jnp.minimum(first, num_q_blocks), jnp.minimum(full, num_q_blocks)
    loops = query_loops(first, full, num_q_blocks, has_docs, bounds)
    k, v = k_ref[...], v_ref[...]
    qk_scale = scale * LOG2E

    def body(qb, carry, *, head, causal, docs):
        dk, dv = carry
        q_first = pl.multiple_of(qb * block_q, block_q)
        rows = pl.ds(q_first, block_q)
        q = q_ref[rows, head, :]
        do = do_ref[rows, head, :]
        lse, delta = lse_ref[head, rows], delta_ref[head, rows]
        p_t = jnp.exp2(dot(k, q, trans_b=True) * qk_scale - lse[None, :])  # [block_k, block_q]
        mask = both(
            causal_mask(q_first, k_first, shift, rows=block_k, cols=block_q, k_len=k_len, transpose=True)
            if causal
            else None,
            same_document(q_doc_ref[rows], k_docs, transpose=True) if docs else None,
        )
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv = dv + dot(p_t.astype(do.dtype), do)
        ds_t = (p_t * (dot(v, do, trans_b=True) - delta[None, :])).astype(q.dtype)
        if fused:
            plgpu.atomic_add(dq_ref, (rows, head, slice(None)), dot(ds_t, k, trans_a=True))
        return dk + dot(ds_t, q), dv

    def one_head(head, carry):
        for loop in loops:
            step = functools.partial(body, head=head, causal=loop.causal, docs=loop.docs)
            carry = lax.fori_loop(loop.start, loop.stop, step, carry)
        return carry

    init = (jnp.zeros(dk_ref.shape, F32), jnp.zeros(dv_ref.shape, F32))
    dk, dv = lax.fori_loop(0, group, one_head, init)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


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
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
    documents_sorted: bool = False,
    out_dtype=None,
    interpret: bool | None = None,
    config: BlockConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of ``block_attention_fwd`` given the *final* ``o`` and ``lse`` of every query row.

    Args:
      q, k, v, q_start, k_start, scale, q_segment_ids, k_segment_ids, documents_sorted, interpret,
        config: as in ``block_attention_fwd``.
      o: ``[B, Lq, H, E]`` final output (any float dtype); lse: ``[B, H, Lq]`` its float32
        log-sum-exp over every key the row sees; do: ``[B, Lq, H, E]`` the output cotangent.
      out_dtype: the dtype of the gradients (default float32, what contributions that are added
        up later need; the kernels write it directly, the fused dq is cast from its float32 sum).

    Returns:
      dq ``[B, Lq, H, D]``, dk ``[B, Lk, Hk, D]``, dv ``[B, Lk, Hk, E]``, in ``out_dtype``: this
      key block set's contribution, as ``xla.block_attention_bwd``.
    """
    interpret, cfg, dtype = resolve(q, k, v, interpret, config)
    check_documents(q, k, q_segment_ids, k_segment_ids)
    lq, d = q.shape[1], q.shape[3]
    lk, e = k.shape[1], v.shape[3]

    fused = cfg.backward == "fused"
    bq_dq, bk_dq = fit_block(cfg.block_q_dq, lq), fit_block(cfg.block_k_dq, lk)
    bq_dkv, bk_dkv = fit_block(cfg.block_q_dkv, lq), fit_block(cfg.block_k_dkv, lk)
    if fused:  # the dq kernel does not run: its blocks need not divide the padded lengths
        bq_dq, bk_dq = bq_dkv, bk_dkv
    lq_pad, lk_pad = round_up(lq, max(bq_dq, bq_dkv)), round_up(lk, max(bk_dq, bk_dkv))

    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1).transpose(0, 2, 1)  # [B, H, Lq]
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse.astype(F32) * LOG2E)  # no visible key: P = 0
    lse2, delta = pad_to(lse2, lq_pad, value=jnp.inf), pad_to(delta, lq_pad)
    ops = _Operands(
        shift=shift_operand(q_start, k_start),
        q=pad_to(q.astype(dtype), lq_pad, pad_dim(d)),
        k=pad_to(k.astype(dtype), lk_pad, pad_dim(d)),
        v=pad_to(v.astype(dtype), lk_pad, pad_dim(e)),
        do=pad_to(do.astype(dtype), lq_pad, pad_dim(e)),
        lse2=lse2,
        delta=delta,
        docs=None,
    )
    if q_segment_ids is not None:
        docs = (padded_ids(q_segment_ids, lq_pad, Q_PAD_DOC), padded_ids(k_segment_ids, lk_pad, K_PAD_DOC))
        ops = ops._replace(docs=docs)
    statics = dict(
        scale=float(scale),
        k_len=lk,
        has_docs=ops.docs is not None,
        skip=ops.docs is not None and documents_sorted,
        interpret=interpret,
        params=plgpu.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd),
    )
    dq_params = plgpu.CompilerParams(
        num_warps=cfg.num_warps_dq or cfg.num_warps_bwd, num_stages=cfg.num_stages_dq or cfg.num_stages_bwd
    )
    ids = dict(q_ids=q_segment_ids, k_ids=k_segment_ids)
    out_dtype = out_dtype or F32
    dk, dv, dq = _dkv_call(ops, ids, block_q=bq_dkv, block_k=bk_dkv, fused=fused, out_dtype=out_dtype, **statics)
    if fused:
        dq = (dq[:, :lq, :, :d] * scale).astype(out_dtype)
    else:
        dq_statics = statics | dict(params=dq_params)
        dq = _dq_call(ops, ids, block_q=bq_dq, block_k=bk_dq, out_dtype=out_dtype, **dq_statics)[:, :lq, :, :d]
    return dq, dk[:, :lk, :, :d], dv[:, :lk, :, :e]


class _Operands(NamedTuple):
    """The backward kernels' padded inputs: the offset operand, q, k, v, dO, lse in log2 units and
    Δ (both ``[B, H, Lq_pad]`` float32), and the padded document ids ``(q, k)`` or None."""

    shift: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    do: jax.Array
    lse2: jax.Array
    delta: jax.Array
    docs: tuple[jax.Array, jax.Array] | None


def _dq_call(ops: _Operands, ids, *, block_q, block_k, out_dtype, interpret, params, **statics):
    """The dq kernel: ``[B, Lq_pad, H, D_pad]`` in ``out_dtype``."""
    b, lq_pad, h, dp = ops.q.shape
    lk_pad, hk, ep = ops.k.shape[1], ops.k.shape[2], ops.v.shape[3]
    group = h // hk
    num_q_blocks = lq_pad // block_q
    q_block = heavy_first(num_q_blocks)
    bounds = []
    if statics["skip"]:  # the first key block of each query block, and its single-document key blocks
        bounds = [
            first_key_blocks(**ids, block_q=block_q, block_k=block_k, num_q_blocks=num_q_blocks),
            *single_document_blocks(
                ids["q_ids"], ids["k_ids"], block_rows=block_q, block_cols=block_k, num_row_blocks=num_q_blocks
            ),
        ]
    # grid (query block q_block(i), batch row bb, query head hh); keys and values of head hh // group
    rows = lambda width: pl.BlockSpec((None, block_q, None, width), lambda i, bb, hh: (bb, q_block(i), hh, 0))  # noqa: E731
    kv_all = lambda width: pl.BlockSpec((None, lk_pad, None, width), lambda i, bb, hh: (bb, 0, hh // group, 0))  # noqa: E731
    stats = pl.BlockSpec((None, None, block_q), lambda i, bb, hh: (bb, hh, q_block(i)))
    doc_specs = [
        pl.BlockSpec((None, block_q), lambda i, bb, hh: (bb, q_block(i))),
        pl.BlockSpec((None, lk_pad), lambda i, bb, hh: (bb, 0)),
    ]
    return pl.pallas_call(
        functools.partial(_dq_kernel, block_q=block_q, block_k=block_k, **statics),
        grid=(num_q_blocks, b, h),
        in_specs=[SHIFT_SPEC, rows(dp), kv_all(dp), kv_all(ep), rows(ep), stats, stats]
        + [bound_spec_q(num_q_blocks)] * len(bounds)
        + (doc_specs if ops.docs is not None else []),
        out_specs=rows(dp),
        out_shape=jax.ShapeDtypeStruct((b, lq_pad, h, dp), out_dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_backward_dq",
    )(ops.shift, ops.q, ops.k, ops.v, ops.do, ops.lse2, ops.delta, *bounds, *(ops.docs or ()))


def _dkv_call(ops: _Operands, ids, *, block_q, block_k, fused, out_dtype, interpret, params, **statics):
    """The dk/dv kernel: dk, dv ``[B, Lk_pad, Hk, ·]`` in ``out_dtype``, and with ``fused`` dq
    ``[B, Lq_pad, H, D_pad]`` float32 without the factor ``scale`` (atomic adds into zeros), else None."""
    b, lq_pad, h, dp = ops.q.shape
    lk_pad, hk, ep = ops.k.shape[1], ops.k.shape[2], ops.v.shape[3]
    group = h // hk
    bounds = []
    if statics["skip"]:  # how many query blocks see each key block, and its single-document query blocks
        num = dict(num_k_blocks=lk_pad // block_k, num_q_blocks=lq_pad // block_q)
        bounds = [
            query_block_ends(**ids, block_q=block_q, block_k=block_k, **num),
            *single_document_blocks(
                ids["k_ids"], ids["q_ids"], block_rows=block_k, block_cols=block_q, num_row_blocks=lk_pad // block_k
            ),
        ]
    # grid (key block j, batch row bb, key head hh); the query heads [hh·group, (hh + 1)·group)
    keys = lambda width: pl.BlockSpec((None, block_k, None, width), lambda j, bb, hh: (bb, j, hh, 0))  # noqa: E731
    q_group = lambda width: pl.BlockSpec((None, lq_pad, group, width), lambda j, bb, hh: (bb, 0, hh, 0))  # noqa: E731
    stats_group = pl.BlockSpec((None, group, lq_pad), lambda j, bb, hh: (bb, hh, 0))
    doc_specs = [
        pl.BlockSpec((None, lq_pad), lambda j, bb, hh: (bb, 0)),
        pl.BlockSpec((None, block_k), lambda j, bb, hh: (bb, j)),
    ]
    in_specs = (
        [SHIFT_SPEC, q_group(dp), keys(dp), keys(ep), q_group(ep), stats_group, stats_group]
        + [pl.BlockSpec((None, None), lambda j, bb, hh: (bb, j))] * len(bounds)
        + (doc_specs if ops.docs is not None else [])
    )
    args = [ops.shift, ops.q, ops.k, ops.v, ops.do, ops.lse2, ops.delta, *bounds, *(ops.docs or ())]
    out_specs = [keys(dp), keys(ep)]
    out_shape = [
        jax.ShapeDtypeStruct((b, lk_pad, hk, dp), out_dtype),
        jax.ShapeDtypeStruct((b, lk_pad, hk, ep), out_dtype),
    ]
    aliases = {}
    if fused:  # dq: zeros in, every program's atomic adds, out in place
        aliases = {len(args): 2}
        in_specs, out_specs = in_specs + [q_group(dp)], out_specs + [q_group(dp)]
        args.append(jnp.zeros((b, lq_pad, h, dp), F32))
        out_shape.append(jax.ShapeDtypeStruct((b, lq_pad, h, dp), F32))
    out = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=block_q, block_k=block_k, group=group, fused=fused, **statics),
        grid=(lk_pad // block_k, b, hk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_backward_fused" if fused else "flash_attention_backward_dkv",
    )(*args)
    return out[0], out[1], out[2] if fused else None
