"""Backward pass of the per-channel (GLA) Pallas Triton kernels (``pallas_triton_channel``).

Given ``dO`` and the final state's cotangent, with the forward's per-chunk local states, each run's
entering state and the scores ``Z = Q Kᵀ ⊙ Γ`` saved:

1. ``state_bwd`` (one program per value block, run and head; the sequential part) walks the run's
   chunks right to left from a zero cotangent, storing each chunk's local leaving cotangent
   ``dh_local_c = dS`` (operand dtype), then ``dS ← e^{b_last} ⊙ dS + scale · (e^b ⊙ Q)ᵀ dO``; the
   last dS is the cotangent of the run's entering state from its own outputs.
2. ``scan`` in reverse (float32, over runs): the cotangent of the state leaving each run (the final
   state's enters at the right end) and the initial state's gradient.
3. ``grads`` (one program per chunk, run and head) with the chunk's true entering state
   ``h = h_local + e^{a} ⊙ S_run`` and leaving cotangent ``dh = dh_local + e^{a'} ⊙ dS_run``:
   ``dV = scale · Zᵀ dO + (e^{b_last − b} ⊙ K) dh`` (Z read, not recomputed), and walking the key
   columns in blocks, ``dQ = scale · [(dO Vᵀ ⊙ Γ ⊙ causal) K + e^b ⊙ (dO hᵀ)]`` (the products'
   cotangents by the same secondary chunking as the forward), ``dK = scale · (dO Vᵀ ⊙ Γ ⊙ causal)ᵀ Q
   + e^{b_last − b} ⊙ (V dhᵀ)``, and the gradient of the chunk-local cumulative log decay b:
   ``q ⊙ dq − k ⊙ dk`` per row, plus ``Σ_j k_j ⊙ dk_j^{state} + e^{b_last} ⊙ Σ_e h ⊙ dh`` at the
   chunk's last row (``gated_delta_rule.common.output_backward`` and ``state_backward``), turned
   into ``dg_t = Σ_{u ≥ t} db_u`` inside the chunk before it is written.
   With ``cfg.split_grads`` two kernels: ``grads_state`` first (dV and the state step's shares of
   dK and db, float32, on whole-chunk products), then ``grads`` (dQ, dK, dg) reading those shares:
   fewer live tiles in each (notes/kernels.md, the GLA register report).

Grouped heads: dk and dv are per query head (float32) and summed over each group after.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, dot
from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule.layout import (
    compiler_params,
    load_col_tiles,
    load_doc_tiles,
    load_docs,
    load_tiles,
    store_col_tiles,
    store_tiles,
)
from pallas_kernels.gated_delta_rule.products import by_gates
from pallas_kernels.linear_attention.channel_common import (
    MODE,
    ChannelStatics,
    ChunkLogs,
    Layout,
    chunk_kernel,
    cotangent_update,
    cumulative_gates,
    cumulative_tiles,
    doc_inputs,
    full_state_rows,
    gate_grad_tiles,
    pregated_inputs,
    run_pass,
    run_scan,
    state_grads,
    value_grads_from_state,
)


class States(NamedTuple):
    """What the forward keeps for the backward beside its inputs: each chunk's local entering state
    ``[R, H, NC, D, E]`` (operand dtype), each run's entering state ``[R, H, D, E]`` (float32), the
    decays across chunks and runs, and the scores ``[R, T, H, C]`` (operand dtype)."""

    h_local: jax.Array
    s_run: jax.Array
    logs: ChunkLogs
    z: jax.Array


class LocalCotangents(NamedTuple):
    """The reverse pass from a zero cotangent (needs no final-state cotangent): ``do`` in the operand
    dtype, each chunk's local leaving cotangent ``[R, H, NC, D, E]`` and each run's entering-state
    cotangent from its own outputs ``[R, H, D, E]``."""

    do: jax.Array
    dh_local: jax.Array
    dm: jax.Array


# ---- kernels ------------------------------------------------------------------------------------


def _state_bwd_kernel(q_ref, do_ref, g_ref, *refs, has_docs, mxu, scale, chunk, num_chunks, pregated=False):
    """The reverse pass over one (value block, run, head) from a zero cotangent. ``pregated``:
    ``q_ref`` holds the gated queries and ``g_ref`` each chunk's decay ``[NC, D]`` (``pregated_inputs``)."""
    refs = list(refs)
    doc_refs = (refs.pop(0), refs.pop(0)) if has_docs else None
    dh_ref, dm_ref = refs

    def body(i, ds):
        c = num_chunks - 1 - i
        t0 = pl.multiple_of(c * chunk, chunk)
        dh_ref[c] = ds.astype(dh_ref.dtype)
        rows = pl.ds(t0, chunk)
        if pregated:
            update = dot(q_ref[rows, :], do_ref[rows, :], trans_a=True)
            return common.decay_state(ds, g_ref[c, :]) + scale * update
        docs = load_docs(doc_refs, t0, chunk)
        (b,) = cumulative_tiles([g_ref[rows, :]])
        return cotangent_update(ds, q_ref[rows, :], do_ref[rows, :], b, docs, scale=scale, mxu=mxu)

    dm_ref[...] = lax.fori_loop(0, num_chunks, body, jnp.zeros(dm_ref.shape, F32))


def _grads_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    g_ref,
    *refs,
    has_docs,
    mxu,
    scale,
    parts,
    block_cols,
    split,
    recompute_dz,
    stacked=False,
    mode=MODE,
):
    """dq, dk, dg and dv of one chunk (per query head), walking the key columns in blocks; with
    ``split``, dq, dk and dg only, the state step's shares of dk and db read (``_state_grads_kernel``).
    The scores' cotangent ``dz`` is formed once before the loop or (``recompute_dz``) in each step."""
    refs = list(refs)
    doc_refs = (refs.pop(0), refs.pop(0)) if has_docs else None
    if split:
        dk_state_ref, db_state_ref, h_ref, s_run_ref, enter_ref, dq_ref, dk_ref, dg_ref = refs
    else:
        z_ref, h_ref, s_run_ref, enter_ref, dh_ref, d_run_ref, leave_ref, dq_ref, dk_ref, dv_ref, dg_ref = refs
    docs = load_doc_tiles(doc_refs, parts)
    kw = dict(mode=mode, mxu=mxu, parts=parts)
    dz_kw = dict(scale=scale, mxu=mxu, parts=parts)
    stacked = stacked and parts > 1  # ChannelConfig.stacked_pairs: the off-diagonal pairs by whole-chunk products
    doc = None if doc_refs is None or not stacked else doc_refs[0][...]

    def score_cotangent(do_rows):
        if stacked:
            return common.output_dz_stacked(v_ref[...], do_ref[...], **dz_kw)
        return common.output_dz(load_tiles(v_ref, parts), do_rows, **dz_kw)

    do = None if recompute_dz else load_tiles(do_ref, parts)  # else loaded where it is used, not kept live
    dz_kept = None if recompute_dz else score_cotangent(do)
    width = block_cols

    def columns(j, dv):
        start = pl.multiple_of(j * width, width)
        cols = pl.ds(start, width)
        q, k = load_col_tiles(q_ref, parts, start, width), load_col_tiles(k_ref, parts, start, width)
        whole = None
        if stacked:  # the tiles' b cut from the whole chunk's, so both sides agree
            (b_whole,) = cumulative_tiles([g_ref[:, cols]])
            b, whole = common.split_rows(b_whole, parts), (b_whole, doc)
        else:
            b = cumulative_tiles(load_col_tiles(g_ref, parts, start, width))
        h_rows = full_state_rows(h_ref[cols, :], enter_ref[cols], s_run_ref[cols, :])
        # dO and V rows (all of E) are reloaded at each step rather than kept live across the loop
        do_rows = load_tiles(do_ref, parts)
        dz = score_cotangent(do_rows) if recompute_dz else dz_kept
        dq, dk_out, db_out = common.output_backward(q, k, b, docs, h_rows, dz, do_rows, scale=scale, whole=whole, **kw)
        store_col_tiles(dq_ref, dq, start)
        if split:
            dk_state = load_col_tiles(dk_state_ref, parts, start, width)
            db_state = load_col_tiles(db_state_ref, parts, start, width)
        else:
            dh_rows = full_state_rows(dh_ref[cols, :], leave_ref[cols], d_run_ref[cols, :])
            dk_state, db_state = common.state_backward(k, b, docs, h_rows, dh_rows, load_tiles(v_ref, parts), **kw)
        store_col_tiles(dk_ref, [a + c for a, c in zip(dk_out, dk_state, strict=True)], start)
        db = [a + c for a, c in zip(db_out, db_state, strict=True)]
        store_col_tiles(dg_ref, gate_grad_tiles(db), start)
        if split:
            return dv
        dv_state = value_grads_from_state(k, b, docs, dh_rows, mxu)
        return [a + c for a, c in zip(dv, dv_state, strict=True)]

    num_blocks = q_ref.shape[1] // width
    if split:
        lax.fori_loop(0, num_blocks, columns, 0)
        return
    do = load_tiles(do_ref, parts) if do is None else do
    dv = common.dvn_from_scores(_score_tiles(z_ref, parts), do, **dz_kw)
    store_tiles(dv_ref, lax.fori_loop(0, num_blocks, columns, dv))


def _state_grads_kernel(k_ref, v_ref, do_ref, g_ref, *refs, has_docs, mxu, scale, parts, block_cols):
    """``cfg.split_grads``: dv of one chunk (per query head) and the state step's shares of dk and db
    (float32, for ``_grads_kernel``), on whole-chunk products: ``dv = scale · Zᵀ dO`` (the stored
    scores' lower blocks) plus ``(e^{b_last − b} ⊙ K) dh`` summed over blocks of key columns."""
    refs = list(refs)
    doc_refs = (refs.pop(0), refs.pop(0)) if has_docs else None
    z_ref, h_ref, s_run_ref, enter_ref, dh_ref, d_run_ref, leave_ref, dv_ref, dk_ref, db_ref = refs
    docs = load_docs(doc_refs)
    chunk, width = k_ref.shape[0], block_cols
    v = v_ref[...].astype(mxu)

    def columns(j, dv):
        start = pl.multiple_of(j * width, width)
        cols = pl.ds(start, width)
        k = k_ref[:, cols]
        (b,) = cumulative_tiles([g_ref[:, cols]])
        h_rows = full_state_rows(h_ref[cols, :], enter_ref[cols], s_run_ref[cols, :])
        dh_rows = full_state_rows(dh_ref[cols, :], leave_ref[cols], d_run_ref[cols, :])
        dk, db, to_end = state_grads(k, b, docs, h_rows, dh_rows, v, mxu)
        dk_ref[:, cols] = dk
        db_ref[:, cols] = db
        return dv + dot(common.row_scale(k, to_end).astype(mxu), dh_rows.astype(mxu))

    # the forward writes the lower blocks only (the diagonal ones causal-masked): the others are zero
    row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) // (chunk // parts)
    col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1) // (chunk // parts)
    z = jnp.where(col <= row, z_ref[...], 0).astype(mxu)
    dv = scale * dot(z, do_ref[...].astype(mxu), trans_a=True)
    dv_ref[...] = lax.fori_loop(0, k_ref.shape[1] // width, columns, dv).astype(dv_ref.dtype)


def _score_tiles(z_ref, parts: int) -> dict:
    """The stored scores' lower ``[C/parts, C/parts]`` blocks ``{(i, j): tile}``."""
    rows = z_ref.shape[0] // parts
    return {(i, j): z_ref[pl.ds(i * rows, rows), pl.ds(j * rows, rows)] for i in range(parts) for j in range(i + 1)}


# ---- the calls ------------------------------------------------------------------------------------


def backward_local(q, g, docs, do, *, statics: ChannelStatics) -> LocalCotangents:
    """Stage 1 (needs no final-state cotangent): the reverse pass over every run from zero."""
    lay = Layout(q, q, do, statics.cfg)  # reads q and dO per query head only
    do = do.astype(lay.mxu)
    pregated = statics.cfg.pregated_state
    kernel = functools.partial(
        _state_bwd_kernel,
        has_docs=docs is not None and not pregated,
        mxu=lay.mxu,
        scale=statics.scale,
        chunk=lay.chunk,
        num_chunks=lay.num_chunks,
        pregated=pregated,
    )
    name = "linear_attention_channel_state_bwd"
    if pregated:  # the gated queries and each chunk's decay, formed once (no document rows)
        queries, gamma, _ = pregated_inputs(q, cumulative_gates(g, statics), docs, lay, queries=True)
        q, g, docs = queries, gamma, None
    dh_local, dm = run_pass(kernel, q, do, g, docs, lay, statics, kv=False, logs=False, name=name, pregated=pregated)
    return LocalCotangents(do, dh_local, dm)


def grads(q, k, v, g, docs, states: States, local: LocalCotangents, d_run, lay: Layout, statics: ChannelStatics):
    """Stage 3: ``(dq, dk, dv, dg)`` per query head (dk, dv float32 under grouped heads); one kernel,
    or with ``cfg.split_grads`` two: dv with the state step's shares of dk and db, then dq, dk, dg."""
    d, e, has_docs = lay.dim, lay.value_dim, docs is not None
    split = statics.cfg.split_grads
    grad_dtype = k.dtype if lay.group == 1 else F32
    state_specs = [lay.chunk_state_spec(), lay.run_state_spec(), lay.chunk_log_spec()]
    entering = (states.h_local, states.s_run, states.logs.enter)
    leaving = (local.dh_local, d_run, states.logs.leave)

    def call(body, in_specs, outs, name, *args, **statics_kw):
        return pl.pallas_call(
            functools.partial(chunk_kernel(body, lay, statics, has_docs=has_docs), **statics_kw),
            grid=lay.chunk_grid(),
            in_specs=in_specs,
            out_specs=[lay.chunk_spec(width) for width, _ in outs],
            out_shape=[lay.per_head_shape(width, dtype) for width, dtype in outs],
            compiler_params=compiler_params(statics.cfg, "backward"),
            interpret=statics.interpret,
            name=name,
        )(*args)

    qk_outs = [(d, q.dtype), (d, grad_dtype), (d, g.dtype)]
    qk_kw = dict(recompute_dz=statics.cfg.recompute_dz, stacked=statics.cfg.stacked_pairs, mode=statics.mode)
    inputs = (q, k, v, local.do, g, *doc_inputs(docs))
    input_specs = lay.chunk_input_specs(has_docs=has_docs, with_do=True)
    if not split:
        dq, dk, dv, dg = call(
            _grads_kernel,
            [*input_specs, lay.chunk_spec(lay.chunk), *state_specs, *state_specs],
            [*qk_outs[:2], (e, grad_dtype), qk_outs[2]],
            "linear_attention_channel_grads",
            *inputs,
            states.z,
            *entering,
            *leaving,
            split=False,
            **qk_kw,
        )
        return dq, dk, dv, dg
    dv, dk_state, db_state = call(
        _state_grads_kernel,
        [*input_specs[1:], lay.chunk_spec(lay.chunk), *state_specs, *state_specs],
        [(e, grad_dtype), (d, F32), (d, F32)],
        "linear_attention_channel_grads_state",
        *inputs[1:],
        states.z,
        *entering,
        *leaving,
    )
    dq, dk, dg = call(
        _grads_kernel,
        [*input_specs, lay.chunk_spec(d), lay.chunk_spec(d), *state_specs],
        qk_outs,
        "linear_attention_channel_grads",
        *inputs,
        dk_state,
        db_state,
        *entering,
        split=True,
        **qk_kw,
    )
    return dq, dk, dv, dg


def backward_finish(
    q, k, v, g, docs, states: States, local: LocalCotangents, d_final, *, statics: ChannelStatics, case=None
):
    """Cotangents ``(dq, dk, dv, dg, d initial_state)`` from stage 1 and the final state's cotangent
    ``[B, H, D, E]``; the gradient kernels in the form ``case`` names (``by_gates``, as the
    forward's output kernel)."""
    lay = Layout(q, k, v, statics.cfg)
    splits = statics.cfg.splits
    d_run, ds0 = run_scan(
        local.dm, states.logs.run, d_final.astype(F32), splits, reverse=True, interpret=statics.interpret
    )
    # the gradient kernels take 16-row sub-tiles in every factored case (only the output kernel has
    # larger ones): case 2 runs the 16-row factored form (``by_gates`` with ``rows``)
    rows = statics.cfg.channel_rows
    dq, dk, dv, dg = by_gates(
        case, statics, lambda st: grads(q, k, v, g, docs, states, local, d_run, lay, st), rows=rows
    )
    if lay.group > 1:
        r, t = dk.shape[:2]
        dk = dk.reshape(r, t, lay.kv_heads, lay.group, lay.dim).sum(3).astype(k.dtype)
        dv = dv.reshape(r, t, lay.kv_heads, lay.group, lay.value_dim).sum(3).astype(v.dtype)
    return dq, dk, dv, dg, ds0
