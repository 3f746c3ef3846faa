"""Backward pass of the Pallas Triton gated-delta-rule kernels (``pallas_triton``).

Given ``dO`` and the final state's cotangent, with W, h (the state entering each chunk) and
V' = U − W S saved by the forward:

1. ``output_bwd`` (one program per chunk, row and value head; needs no state cotangent): the
   output's gradients ``dQ = scale · [(dO V'ᵀ ⊙ Γ ⊙ causal) K + e^b ⊙ (dO hᵀ)]`` (final), its shares
   of dk and db, and ``dV'_intra = scale · (Q Kᵀ ⊙ Γ ⊙ causal)ᵀ dO`` (``common.output_backward``;
   the scores read from the forward's with ``cfg.store_scores``, else formed again).
2. ``state_bwd`` (one program per value block, row and value head: the sequential part) walks the
   chunks right to left carrying dS, the cotangent of the state leaving the chunk (the final
   state's at the start): writes ``dh_c = dS`` and ``dV'_c = dV'_intra + K̃_c dS``, then
   ``dS ← diag(γ_c) dS + scale · (e^b ⊙ Q)ᵀ dO_c − W_cᵀ dV'_c``; the last dS is the initial
   state's gradient. No Q Kᵀ inside the loop: its step is three matmuls.
3. ``wy_bwd`` (one program per chunk, row and value head): the state step's gradients
   (``dW = −dV' hᵀ``, ``dK̃ = V' dhᵀ``, ``dγ = ⟨h, dh⟩``; ``common.state_dw``, ``state_backward``) and the WY
   form's with ``dU = dV'`` (``common.wy_backward``), plus stage 1's shares: dk, dv, dβ and the
   gradient of the chunk-local cumulative log gate b (autodiff of the cumsum outside makes it dg:
   per channel by default the reverse-sum kernel behind ``layout.channel_chunk_cumsum``'s custom_vjp).
   With ``cfg.wy_bwd_split`` (not the default) the state step's terms run first as a kernel of their own
   (``state_step_bwd``: reads h, dh, V'), so the WY form's kernel keeps fewer tiles live.

Grouped value heads: dq and dk are per value head (float32) and summed over each group after.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, dot
from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule.layout import (
    Layout,
    Residuals,
    Statics,
    compiler_params,
    gate_inputs,
    key_chunk,
    load_col_tiles,
    load_doc_tiles,
    load_docs,
    load_lower_blocks,
    load_rows,
    load_tiles,
    pop_gate_refs,
    pregated_operands,
    store_col_tiles,
    store_tiles,
    value_chunk,
    zero_blocks,
)
from pallas_kernels.gated_delta_rule.pallas_triton_stacked import wy_bwd_stacked
from pallas_kernels.gated_delta_rule.products import CHANNEL_MODES


def _output_bwd_kernel(
    q_ref,
    k_ref,
    h_ref,
    v_new_ref,
    do_ref,
    *refs,
    mode,
    has_docs,
    mxu,
    scale,
    parts,
    block_cols,
    stored_scores,
    stacked=False,
):
    """The output's gradients of one chunk: dq (final), its share of dk and db, and ``dV'_intra``,
    walking the key columns in blocks of ``block_cols`` (scalar db and the scores are sums over
    them); ``stacked`` (per-channel gates, ``BlockConfig.stacked_pairs``): the off-diagonal pairs'
    cotangents by whole-chunk products."""
    refs = list(refs)
    z_ref = refs.pop(0) if stored_scores else None
    gate_ref, doc_refs = pop_gate_refs(refs, mode=mode, has_docs=has_docs)
    dq_ref, dk_ref, dv_intra_ref, *db_ref = refs
    docs = load_doc_tiles(doc_refs, parts)
    do = load_tiles(do_ref, parts)
    kw = dict(scale=scale, mode=mode, mxu=mxu, parts=parts)
    stacked = stacked and mode in CHANNEL_MODES and parts > 1
    if stacked:
        dz = common.output_dz_stacked(v_new_ref[...], do_ref[...], scale=scale, mxu=mxu, parts=parts)
        doc = None if doc_refs is None else doc_refs[0][...]
    else:
        dz = common.output_dz(load_tiles(v_new_ref, parts), do, scale=scale, mxu=mxu, parts=parts)
    width = min(block_cols, k_ref.shape[1])

    def columns(j, carry):
        z, db_rows = carry
        start = pl.multiple_of(j * width, width)
        q, k = load_col_tiles(q_ref, parts, start, width), load_col_tiles(k_ref, parts, start, width)
        b = load_col_tiles(gate_ref, parts, start, width) if mode in CHANNEL_MODES else load_tiles(gate_ref, parts)
        whole = None
        if stacked:
            cols = pl.ds(start, width)
            whole = (gate_ref[:, cols], doc)
        dq, dk, db = common.output_backward(q, k, b, docs, h_ref[pl.ds(start, width), :], dz, do, whole=whole, **kw)
        store_col_tiles(dq_ref, dq, start)
        store_col_tiles(dk_ref, dk, start)
        if mode in CHANNEL_MODES:
            store_col_tiles(db_ref[0], db, start)
        elif mode == "scalar":  # a sum over the key columns: stored after the loop
            db_rows = [a + c for a, c in zip(db_rows, db, strict=True)]
        if z_ref is not None:  # the forward stored the scores: nothing to carry
            return z, db_rows
        # the scores (small blocks) are summed over the columns; Zᵀ dO once after the loop
        score_whole = None if whole is None else (q_ref[:, pl.ds(start, width)], whole[0])  # (Q, b)
        z = common.add_blocks(z, common.score_blocks(q, k, b, docs, mode=mode, mxu=mxu, parts=parts, whole=score_whole))
        return z, db_rows

    rows = q_ref.shape[0] // parts
    init = 0 if z_ref is not None else zero_blocks(parts, rows)
    db_init = [jnp.zeros((rows,), F32) for _ in range(parts)] if mode == "scalar" else 0
    z, db_rows = lax.fori_loop(0, k_ref.shape[1] // width, columns, (init, db_init))
    if mode == "scalar":
        store_tiles(db_ref[0], db_rows)
    if z_ref is not None:
        z = load_lower_blocks(z_ref, parts)
    store_tiles(dv_intra_ref, common.dvn_from_scores(z, do, scale=scale, mxu=mxu, parts=parts))


def _state_bwd_kernel(
    q_ref, w_ref, k_ref, do_ref, dv_ref, *refs, mode, has_docs, mxu, scale, chunk, num_chunks, store_chunks, pregated
):
    """The reverse state pass over one (row, value head, value block): dh_c and dV' (if
    ``store_chunks``) and the initial state's cotangent, from ``dv_ref`` (the output's share of dV').
    ``pregated``: ``q_ref`` and ``k_ref`` hold the
    gated queries and keys and the gate ref each chunk's decay ``[NC, D]`` (``layout.pregated_operands``;
    no documents)."""
    refs = list(refs)
    gate_ref, doc_refs = pop_gate_refs(refs, mode=mode, has_docs=has_docs)
    d_final_ref, *chunk_refs, ds0_ref = refs

    def body(i, ds):
        c = num_chunks - 1 - i
        t0 = pl.multiple_of(c * chunk, chunk)
        if pregated:
            to_row, to_end, gamma = None, None, gate_ref[c, :]
        else:
            to_row, to_end, gamma = common.gate_factors(load_rows(gate_ref, t0, chunk), load_docs(doc_refs, t0, chunk))
        # per-row gates scale the [C, block_e] products, not the [C, D] key and query tiles
        k = k_ref[pl.ds(t0, chunk), :]
        dv_new = dv_ref[pl.ds(t0, chunk), :].astype(F32) + common.gated_dot(k, to_end, ds, mxu)
        if store_chunks:
            dh_ref, dv_new_ref = chunk_refs
            dh_ref[c] = ds.astype(dh_ref.dtype)
            dv_new_ref[pl.ds(t0, chunk), :] = dv_new.astype(dv_new_ref.dtype)
        q, do = q_ref[pl.ds(t0, chunk), :], do_ref[pl.ds(t0, chunk), :]
        from_output = scale * common.gated_dot(q, to_row, do, mxu, trans_a=True)
        through_w = dot(w_ref[pl.ds(t0, chunk), :].astype(mxu), dv_new.astype(mxu), trans_a=True)
        return common.decay_state(ds, gamma) + from_output - through_w

    ds0_ref[...] = lax.fori_loop(0, num_chunks, body, d_final_ref[...].astype(F32))


def _add_key_block(dk_ref, db_ref, dk_out_ref, db_out_ref, start, db_rows, dk_terms, db_terms, *, mode, parts):
    """dk of the key columns ``[start, start + width)``: the output's share plus ``dk_terms`` (lists of
    row tiles), added left to right; likewise per-channel db, while scalar db terms are added to the
    row carries ``db_rows`` (returned) and stored after the column loop."""
    width = dk_terms[0][0].shape[1]

    def total(first, terms):
        return functools.reduce(operator.add, terms, first)

    dk_out = load_col_tiles(dk_out_ref, parts, start, width)
    store_col_tiles(dk_ref, [total(a.astype(F32), t) for a, *t in zip(dk_out, *dk_terms, strict=True)], start)
    if mode in CHANNEL_MODES:  # per key channel: this block's columns of db are complete
        db_out = load_col_tiles(db_out_ref, parts, start, width)
        store_col_tiles(db_ref, [total(a, t) for a, *t in zip(db_out, *db_terms, strict=True)], start)
    elif mode == "scalar":
        db_rows = [total(a, t) for a, *t in zip(db_rows, *db_terms, strict=True)]
    return db_rows


def _state_step_bwd_kernel(
    k_ref, beta_ref, h_ref, dh_ref, v_new_ref, dk_out_ref, *refs, mode, has_docs, mxu, block_cols, parts
):
    """The state step's shares of dk and db of one chunk (``common.state_backward``) added to the
    output's: the first half of a split ``wy_bwd`` (``cfg.wy_bwd_split``), walking the key columns
    in blocks; dh and V' are not live in the WY form's kernel then."""
    refs = list(refs)
    gate_ref, doc_refs = pop_gate_refs(refs, mode=mode, has_docs=has_docs)
    db_out_ref = refs.pop(0) if mode != "none" else None
    dk_ref, *db_ref = refs
    rows = k_ref.shape[0] // parts
    beta, docs = load_tiles(beta_ref, parts), load_doc_tiles(doc_refs, parts)
    kw = min(block_cols, k_ref.shape[1])

    def key_step(j, db_rows):
        start = pl.multiple_of(j * kw, kw)
        chunk = key_chunk(k_ref, gate_ref, beta, docs, start, mode=mode, width=kw)
        dk_state, db_state = common.state_backward(
            chunk.k,
            chunk.b,
            docs,
            h_ref[pl.ds(start, kw), :],
            dh_ref[pl.ds(start, kw), :],
            load_tiles(v_new_ref, parts),
            mode=mode,
            mxu=mxu,
            parts=parts,
        )
        return _add_key_block(
            dk_ref,
            db_ref[0] if db_ref else None,
            dk_out_ref,
            db_out_ref,
            start,
            db_rows,
            [dk_state],
            [db_state],
            mode=mode,
            parts=parts,
        )

    row_zeros = [jnp.zeros((rows,), F32) for _ in range(parts)]
    db_rows = lax.fori_loop(0, k_ref.shape[1] // kw, key_step, row_zeros)
    if mode == "scalar":
        store_tiles(db_ref[0], [a + b for a, b in zip(db_rows, load_tiles(db_out_ref, parts), strict=True)])


def _wy_bwd_kernel(
    k_ref,
    v_ref,
    beta_ref,
    h_ref,
    dh_ref,
    v_new_ref,
    dv_new_ref,
    dk_out_ref,
    *refs,
    mode,
    has_docs,
    mxu,
    block_cols,
    with_state,
    stored_inverse,
    parts,
    precision,
    stacked=False,
):
    """dk, dv, dβ and db of one chunk: the state step's (if ``with_state``; else ``dk_out`` and
    ``db_out`` already hold them) and the WY form's, plus the output's share.

    The WY backward walks the key and value columns in blocks (``block_cols``): first dX summed over
    them (and, without ``stored_inverse``, the Gram blocks to form X again), then dA (small C×C
    blocks), then dk and dv block by block, A taken as the gated product of ``β ⊙ K`` and K
    (``common.key_grads``: no Gram block needed); dβ and scalar db are summed over the blocks. With
    ``stored_inverse`` X is read (the forward's; one tile, ``parts`` = 1, under scalar or no gates)
    and ``dA = −Xᵀ dX Xᵀ`` runs on the matmul operand dtype.
    """
    refs = list(refs)
    x_ref = refs.pop(0) if stored_inverse else None
    gate_ref, doc_refs = pop_gate_refs(refs, mode=mode, has_docs=has_docs)
    db_out_ref = refs.pop(0) if mode != "none" else None
    dk_ref, dv_ref, dbeta_ref, *db_ref = refs
    kw, vw = min(block_cols, k_ref.shape[1]), min(block_cols, v_ref.shape[1])
    if stacked and with_state and stored_inverse and mode in CHANNEL_MODES and parts > 1:  # whole arrays, no tiles
        outs = (dk_ref, dv_ref, dbeta_ref, db_ref[0])
        ins = (k_ref, v_ref, beta_ref, h_ref, dh_ref, v_new_ref, dv_new_ref, dk_out_ref, x_ref, gate_ref, db_out_ref)
        return wy_bwd_stacked(*ins, *outs, docs=load_docs(doc_refs), mxu=mxu, kw=kw, vw=vw, parts=parts)
    rows = k_ref.shape[0] // parts
    beta, docs = load_tiles(beta_ref, parts), load_doc_tiles(doc_refs, parts)
    key_steps, value_steps = k_ref.shape[1] // kw, v_ref.shape[1] // vw

    def keys(j):  # the chunk on key columns [j·kw, (j + 1)·kw), dW = −dV' hᵀ on them, and those rows of h
        start = pl.multiple_of(j * kw, kw)
        h_rows = h_ref[pl.ds(start, kw), :]
        chunk = key_chunk(k_ref, gate_ref, beta, docs, start, mode=mode, width=kw)
        # dV' rows (all of E) are reloaded at each step rather than kept live across the loops
        return start, chunk, h_rows, common.state_dw(h_rows, load_tiles(dv_new_ref, parts), mxu=mxu, parts=parts)

    def values(j):
        start = pl.multiple_of(j * vw, vw)
        du = load_col_tiles(dv_new_ref, parts, start, vw)
        return start, value_chunk(v_ref, beta, start, width=vw), du

    def dx_keys(j, carry):
        gram, dx = carry
        _, chunk, _, dw = keys(j)
        if not stored_inverse:  # the Gram blocks only to form X again
            gram = common.add_blocks(gram, common.gram_blocks(chunk, mode=mode, mxu=mxu))
        return gram, common.add_blocks(dx, common.dx_blocks(common.key_rhs(chunk, mxu), dw, mxu))

    def dx_values(j, dx):
        _, chunk, du = values(j)
        return common.add_blocks(dx, common.dx_blocks(common.value_rhs(chunk, mxu), du, mxu))

    zeros = zero_blocks(parts, rows)
    gram, dx = lax.fori_loop(0, key_steps, dx_keys, (0 if stored_inverse else zeros, zeros))
    dx = lax.fori_loop(0, value_steps, dx_values, dx)
    if stored_inverse:
        x = load_lower_blocks(x_ref, parts)
        da = common.inverse_backward(x, dx, mxu)
    else:
        x = common.inverse_blocks(gram, beta, precision)
        da = common.inverse_backward(x, dx)
    # X and dA only feed matmuls from here: keep them in the operand dtype (half the registers)
    x = {ij: block.astype(mxu) for ij, block in x.items()}
    da = {ij: block.astype(mxu) for ij, block in da.items()}
    row_zeros = [jnp.zeros((rows,), F32) for _ in range(parts)]

    def key_step(j, carry):
        dbeta, db_rows = carry
        start, chunk, h_rows, dw = keys(j)
        dk, dbeta_k, db = common.key_grads(chunk, x, dw, da, mode=mode, mxu=mxu)
        dbeta = [a + b for a, b in zip(dbeta, dbeta_k, strict=True)]
        add = functools.partial(
            _add_key_block, dk_ref, db_ref[0] if db_ref else None, dk_out_ref, db_out_ref, start, mode=mode, parts=parts
        )
        if not with_state:
            return dbeta, add(db_rows, [dk], [db])
        dk_state, db_state = common.state_backward(
            chunk.k,
            chunk.b,
            docs,
            h_rows,
            dh_ref[pl.ds(start, kw), :],
            load_tiles(v_new_ref, parts),
            mode=mode,
            mxu=mxu,
            parts=parts,
        )
        return dbeta, add(db_rows, [dk_state, dk], [db_state, db])

    def value_step(j, dbeta):
        start, chunk, du = values(j)
        dv, dbeta_v = common.value_grads(chunk, x, du, mxu)
        store_col_tiles(dv_ref, dv, start)
        return [a + b for a, b in zip(dbeta, dbeta_v, strict=True)]

    dbeta, db_rows = lax.fori_loop(0, key_steps, key_step, (row_zeros, row_zeros))
    store_tiles(dbeta_ref, lax.fori_loop(0, value_steps, value_step, dbeta))
    if mode == "scalar":
        store_tiles(db_ref[0], [a + b for a, b in zip(db_rows, load_tiles(db_out_ref, parts), strict=True)])


def _gate_grad_shape(lay: Layout, res: Residuals):
    """``(shape, spec)`` of a chunk-parallel kernel's log-gate gradient (None without gates)."""
    if lay.mode == "none":
        return []
    return [(jax.ShapeDtypeStruct(res.b.shape, F32), lay.chunk_gate_specs(False)[0])]


def output_backward(res: Residuals, do, lay: Layout, statics: Statics):
    """Stage 1 (needs no state cotangent): ``(dq, dk share, dV'_intra, db share or None)``."""
    d, e = lay.dim, lay.value_dim
    has_docs = res.docs is not None
    gate_out = _gate_grad_shape(lay, res)
    kernel = functools.partial(
        _output_bwd_kernel,
        mode=lay.mode,
        has_docs=has_docs,
        mxu=lay.mxu,
        scale=statics.scale,
        parts=lay.parts,
        block_cols=statics.cfg.block_cols,
        stored_scores=res.z is not None,
        stacked=statics.cfg.stacked_pairs,
    )
    z_in = [] if res.z is None else [(lay.chunk_spec(lay.chunk), res.z)]
    dq, dk, dv_intra, *db = pl.pallas_call(
        kernel,
        grid=lay.chunk_grid(),
        in_specs=[
            lay.chunk_spec(d, qk=True),
            lay.chunk_spec(d, qk=True),
            lay.chunk_state_spec(),
            lay.chunk_spec(e),
            lay.chunk_spec(e),
            *(s for s, _ in z_in),
            *lay.chunk_gate_specs(has_docs),
        ],
        out_specs=[lay.chunk_spec(d), lay.chunk_spec(d), lay.chunk_spec(e), *(s for _, s in gate_out)],
        out_shape=[
            lay.values_shape(res.q.dtype if lay.group == 1 else F32, d),
            lay.values_shape(F32, d),
            lay.values_shape(lay.mxu),
            *(x for x, _ in gate_out),
        ],
        compiler_params=compiler_params(statics.cfg, "output_backward", lay.mode),
        interpret=statics.interpret,
        name="gated_delta_rule_output_bwd",
    )(res.q, res.k, res.h, res.v_new, do, *(x for _, x in z_in), *gate_inputs(res.b, res.docs))
    return dq, dk, dv_intra, (db[0] if db else None)


def state_backward_pass(res: Residuals, do, dv_intra, d_final, lay: Layout, statics: Statics, *, store_chunks=True):
    """Stage 2: ``(dh [B, Hv, NC, D, E], dV' [B, T, Hv, E], d initial_state [B, Hv, D, E] float32)``,
    or only the initial state's cotangent when not ``store_chunks``."""
    d = lay.dim
    has_docs = res.docs is not None
    queries, keys, qk_spec = res.q, res.k, lay.seq_spec(d, qk=True)
    gates, gate_specs = gate_inputs(res.b, res.docs), lay.seq_gate_specs(has_docs)
    if lay.pregated:  # gated queries and keys per value head and each chunk's decay (no documents)
        keys, gamma, queries = pregated_operands(res.k, res.b, res.docs, lay, q=res.q)
        qk_spec, gates, gate_specs = lay.seq_spec(d), [gamma], [lay.chunk_gamma_spec()]
    kernel = functools.partial(
        _state_bwd_kernel,
        mode=lay.mode,
        has_docs=has_docs and not lay.pregated,
        mxu=lay.mxu,
        scale=statics.scale,
        chunk=lay.chunk,
        num_chunks=lay.num_chunks,
        store_chunks=store_chunks,
        pregated=lay.pregated,
    )
    out_specs, out_shape = [lay.state_spec()], [jax.ShapeDtypeStruct(d_final.shape, F32)]
    if store_chunks:
        out_specs = [lay.states_spec(), lay.seq_spec(lay.value_dim, blocked=True), *out_specs]
        out_shape = [lay.states_shape(lay.mxu), lay.values_shape(lay.mxu), *out_shape]
    outs = pl.pallas_call(
        kernel,
        grid=lay.state_grid(),
        in_specs=[
            qk_spec,
            lay.seq_spec(d),
            qk_spec,
            lay.seq_spec(lay.value_dim, blocked=True),
            lay.seq_spec(lay.value_dim, blocked=True),
            *gate_specs,
            lay.state_spec(),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(statics.cfg, "state"),
        interpret=statics.interpret,
        name="gated_delta_rule_state_bwd" if store_chunks else "gated_delta_rule_state_bwd_local",
    )(queries, res.w, keys, do, dv_intra, *gates, d_final)
    return tuple(outs) if store_chunks else outs[0]


def state_step_backward(res: Residuals, dh, dk_out, db_out, lay: Layout, statics: Statics):
    """Stage 3a of a split WY backward: ``(dk, db or None)``, the output's and the state step's shares."""
    d = lay.dim
    has_docs = res.docs is not None
    gate_out = _gate_grad_shape(lay, res)
    kernel = functools.partial(
        _state_step_bwd_kernel,
        mode=lay.mode,
        has_docs=has_docs,
        mxu=lay.mxu,
        block_cols=statics.cfg.block_cols,
        parts=lay.wy_parts,
    )
    dk, *db = pl.pallas_call(
        kernel,
        grid=lay.chunk_grid(),
        in_specs=[
            lay.chunk_spec(d, qk=True),
            lay.chunk_row_spec(),
            lay.chunk_state_spec(),
            lay.chunk_state_spec(),
            lay.chunk_spec(lay.value_dim),
            lay.chunk_spec(d),
            *lay.chunk_gate_specs(has_docs),
            *(s for _, s in gate_out),
        ],
        out_specs=[lay.chunk_spec(d), *(s for _, s in gate_out)],
        out_shape=[lay.values_shape(F32, d), *(x for x, _ in gate_out)],
        compiler_params=compiler_params(statics.cfg, "backward", lay.mode),
        interpret=statics.interpret,
        name="gated_delta_rule_state_step_bwd",
    )(
        res.k,
        res.beta,
        res.h,
        dh,
        res.v_new,
        dk_out,
        *gate_inputs(res.b, res.docs),
        *([] if db_out is None else [db_out]),
    )
    return dk, (db[0] if db else None)


def wy_backward(res: Residuals, dh, dv_new, dk_out, db_out, lay: Layout, statics: Statics):
    """Stage 3: ``(dk [B, T, Hv, D], dv [B, T, Hv, E], dβ [B, Hv, T], db or None)``, totals."""
    d, e = lay.dim, lay.value_dim
    has_docs = res.docs is not None
    gate_out = _gate_grad_shape(lay, res)
    split = statics.cfg.wy_bwd_split
    if split:
        dk_out, db_out = state_step_backward(res, dh, dk_out, db_out, lay, statics)
    kernel = functools.partial(
        _wy_bwd_kernel,
        mode=lay.mode,
        has_docs=has_docs,
        mxu=lay.mxu,
        block_cols=statics.cfg.block_cols,
        with_state=not split,
        stored_inverse=res.x is not None,
        precision=statics.inverse_precision,
        parts=lay.wy_bwd_parts,
        stacked=statics.cfg.stacked_pairs,
    )
    x_in = [] if res.x is None else [(lay.chunk_spec(lay.chunk), res.x)]
    grads = pl.pallas_call(
        kernel,
        grid=lay.chunk_grid(),
        in_specs=[
            lay.chunk_spec(d, qk=True),
            lay.chunk_spec(e),
            lay.chunk_row_spec(),
            lay.chunk_state_spec(),
            lay.chunk_state_spec(),
            lay.chunk_spec(e),
            lay.chunk_spec(e),
            lay.chunk_spec(d),
            *(s for s, _ in x_in),
            *lay.chunk_gate_specs(has_docs),
            *(s for _, s in gate_out),
        ],
        out_specs=[lay.chunk_spec(d), lay.chunk_spec(e), lay.chunk_row_spec(), *(s for _, s in gate_out)],
        out_shape=[
            lay.values_shape(res.k.dtype if lay.group == 1 else F32, d),
            lay.values_shape(res.v.dtype),
            jax.ShapeDtypeStruct(res.beta.shape, F32),
            *(x for x, _ in gate_out),
        ],
        compiler_params=compiler_params(statics.cfg, "backward", lay.mode),
        interpret=statics.interpret,
        name="gated_delta_rule_wy_bwd",
    )(
        res.k,
        res.v,
        res.beta,
        res.h,
        dh,
        res.v_new,
        dv_new,
        dk_out,
        *(x for _, x in x_in),
        *gate_inputs(res.b, res.docs),
        *([] if db_out is None else [db_out]),
    )
    return (*grads, None) if lay.mode == "none" else tuple(grads)


def _sum_groups(x, lay: Layout, dtype):
    """Per-value-head ``[B, T, Hv, D]`` gradients summed over each q/k head's group."""
    if lay.group == 1:
        return x
    b, t, _, d = x.shape
    return x.reshape(b, t, lay.heads, lay.group, d).sum(3).astype(dtype)


class OutputGrads(NamedTuple):
    """Stage 1's results (they need no state cotangent): ``do`` in the operand dtype, dq, the
    output's shares of dk and db, and ``dV'_intra``."""

    do: jax.Array
    dq: jax.Array
    dk_out: jax.Array
    dv_intra: jax.Array
    db_out: jax.Array | None


def backward_local(res: Residuals, do, *, statics: Statics) -> tuple[jax.Array, OutputGrads]:
    """The part of the backward that needs no final-state cotangent: ``(dS_in_local, stage 1)``.

    ``dS_in_local`` ``[B, Hv, D, E]`` is the initial state's cotangent from ``do`` alone; with a
    final-state cotangent ``dS`` the whole one is ``dS_in_local + Φᵀ dS`` (``pallas_triton.transition``).
    """
    lay = Layout(res.q, res.v, statics.cfg, statics.mode)
    do = do.astype(lay.mxu)
    stage = OutputGrads(do, *output_backward(res, do, lay, statics))
    zero = jnp.zeros(res.h.shape[:2] + res.h.shape[3:], F32)
    ds0 = state_backward_pass(res, do, stage.dv_intra, zero, lay, statics, store_chunks=False)
    return ds0, stage


def backward_finish(res: Residuals, stage: OutputGrads, d_final, *, statics: Statics):
    """Cotangents ``(dq, dk, dv, dβ, db, d initial_state)`` from stage 1 and the final state's cotangent."""
    lay = Layout(res.q, res.v, statics.cfg, statics.mode)
    dh, dv_new, ds0 = state_backward_pass(res, stage.do, stage.dv_intra, d_final.astype(F32), lay, statics)
    dk, dv, dbeta, db = wy_backward(res, dh, dv_new, stage.dk_out, stage.db_out, lay, statics)
    dq, dk = _sum_groups(stage.dq, lay, res.q.dtype), _sum_groups(dk, lay, res.k.dtype)
    return dq, dk, dv, dbeta, db, ds0


def backward(res: Residuals, do, d_final, *, statics: Statics):
    """Cotangents ``(dq, dk, dv, dβ, db, d initial_state)`` for ``pallas_triton``'s ``custom_vjp``."""
    lay = Layout(res.q, res.v, statics.cfg, statics.mode)
    do = do.astype(lay.mxu)
    stage = OutputGrads(do, *output_backward(res, do, lay, statics))
    return backward_finish(res, stage, d_final, statics=statics)
