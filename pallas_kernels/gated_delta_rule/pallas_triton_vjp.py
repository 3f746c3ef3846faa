"""Backward pass of the Pallas Triton gated-delta-rule kernels (``pallas_triton``).

Given ``dO`` and the final state's cotangent, with W, h (the state entering each chunk) and
V' = U − W S saved by the forward:

1. ``state_bwd`` (one program per value block, row and value head) walks the chunks right to left
   carrying dS, the cotangent of the state leaving the chunk (the final state's at the start):
   ``dV'_c = scale · (Q Kᵀ ⊙ Γ ⊙ causal)ᵀ dO_c + K̃_c dS``, writes dS (as ``dh_c``) and dV'_c, then
   ``dS ← diag(γ_c) dS + scale · (e^b ⊙ Q)ᵀ dO_c − W_cᵀ dV'_c``; the last dS is the initial
   state's gradient.
2. ``chunk_bwd`` (one program per chunk, row and value head) gives every other gradient from the
   chunk's h_c, dh_c, V'_c, dV'_c and dO_c: the output's (``common.output_backward``), the state
   step's (``dW = −dV' hᵀ``, ``dK̃ = V' dhᵀ``, ``dγ = ⟨h, dh⟩``; ``common.state_backward``) and the
   WY form's with ``dU = dV'`` (``common.wy_backward``): dq, dk, dv, dβ and the gradient of the
   chunk-local cumulative log gate b (autodiff of the cumsum outside turns it into dg).

Grouped value heads: dq and dk are per value head (float32) and summed over each group after.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, dot
from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule.config import SUB_TILE
from pallas_kernels.gated_delta_rule.layout import (
    Layout,
    Residuals,
    Statics,
    compiler_params,
    gate_inputs,
    load_docs,
    load_rows,
    pop_gate_refs,
    store_tiles,
)


def _state_bwd_kernel(q_ref, k_ref, w_ref, do_ref, *refs, mode, has_docs, mxu, scale, chunk, num_chunks, parts):
    """The reverse state pass over one (row, value head, value block): dh_c, dV' and d initial state."""
    refs = list(refs)
    gate_ref, doc_refs = pop_gate_refs(refs, mode=mode, has_docs=has_docs)
    d_final_ref, dh_ref, dv_new_ref, ds0_ref = refs

    def body(i, ds):
        c = num_chunks - 1 - i
        t0 = pl.multiple_of(c * chunk, chunk)
        b = load_rows(gate_ref, t0, chunk)
        docs = load_docs(doc_refs, t0, chunk)
        to_row, to_end, gamma = common.gate_factors(b, docs)
        q, k = q_ref[pl.ds(t0, chunk), :], k_ref[pl.ds(t0, chunk), :]
        do = do_ref[pl.ds(t0, chunk), :]
        dh_ref[c] = ds.astype(dh_ref.dtype)
        intra = common.dvn_intra(q, k, b, docs, do, scale=scale, mode=mode, mxu=mxu, parts=parts)
        k_end = common.split_rows(common.row_scale(k, to_end).astype(mxu), parts)
        w = common.split_rows(w_ref[pl.ds(t0, chunk), :], parts)
        ds_mxu = ds.astype(mxu)
        dv_new = [x + dot(ke, ds_mxu) for x, ke in zip(intra, k_end, strict=True)]
        store_tiles(dv_new_ref, dv_new, start=t0)
        from_output = scale * dot(common.row_scale(q, to_row).astype(mxu), do.astype(mxu), trans_a=True)
        through_w = sum(dot(wt.astype(mxu), dv.astype(mxu), trans_a=True) for wt, dv in zip(w, dv_new, strict=True))
        return common.decay_state(ds, gamma) + from_output - through_w

    ds0_ref[...] = lax.fori_loop(0, num_chunks, body, d_final_ref[...].astype(F32))


def _tiles(tiles: list, parts: int) -> list:
    """Row tiles re-cut into ``parts`` tiles (from one whole-chunk tile, or already so)."""
    return tiles if len(tiles) == parts else common.split_rows(tiles[0], parts)


def _chunk_bwd_kernel(
    q_ref,
    k_ref,
    v_ref,
    beta_ref,
    h_ref,
    dh_ref,
    v_new_ref,
    dv_new_ref,
    do_ref,
    *refs,
    mode,
    has_docs,
    mxu,
    scale,
    parts,
):
    """dq, dk, dv, dβ and db of one chunk."""
    refs = list(refs)
    gate_ref, doc_refs = pop_gate_refs(refs, mode=mode, has_docs=has_docs)
    dq_ref, dk_ref, dv_ref, dbeta_ref, *db_ref = refs
    q, k, v, beta = q_ref[...], k_ref[...], v_ref[...], beta_ref[...]
    b, docs = load_rows(gate_ref), load_docs(doc_refs)
    h, dh, v_new, dv_new = h_ref[...], dh_ref[...], v_new_ref[...], dv_new_ref[...]
    statics = dict(mode=mode, mxu=mxu)
    dq, dk_out, db_out = common.output_backward(
        q, k, b, docs, h, v_new, do_ref[...], scale=scale, parts=parts, **statics
    )
    dw, dk_state, db_state = common.state_backward(k, b, docs, h, dh, v_new, dv_new, **statics)
    tiles = k.shape[0] // SUB_TILE
    chunk = common.make_chunk(k, v, beta, b, docs, sub=SUB_TILE)
    wy = common.wy_backward(chunk, common.split_rows(dw, tiles), common.split_rows(dv_new, tiles), **statics)
    dk = [a + s + w for a, s, w in zip(_tiles(dk_out, tiles), common.split_rows(dk_state, tiles), wy.dk, strict=True)]
    store_tiles(dq_ref, dq)
    store_tiles(dk_ref, dk)
    store_tiles(dv_ref, wy.dv)
    store_tiles(dbeta_ref, wy.dbeta)
    if db_ref:
        parts_db = zip(_tiles(db_out, tiles), common.split_rows(db_state, tiles), wy.db, strict=True)
        store_tiles(db_ref[0], [a + s + w for a, s, w in parts_db])


def state_backward_pass(res: Residuals, do, d_final, lay: Layout, statics: Statics):
    """Stage 1: ``(dh [B, Hv, NC, D, E], dV' [B, T, Hv, E], d initial_state [B, Hv, D, E] float32)``."""
    d = lay.dim
    has_docs = res.docs is not None
    kernel = functools.partial(
        _state_bwd_kernel,
        mode=lay.mode,
        has_docs=has_docs,
        mxu=lay.mxu,
        scale=statics.scale,
        chunk=lay.chunk,
        num_chunks=lay.num_chunks,
        parts=lay.parts,
    )
    return pl.pallas_call(
        kernel,
        grid=lay.state_grid(),
        in_specs=[
            lay.seq_spec(d, qk=True),
            lay.seq_spec(d, qk=True),
            lay.seq_spec(d),
            lay.seq_spec(lay.value_dim, blocked=True),
            *lay.seq_gate_specs(has_docs),
            lay.state_spec(),
        ],
        out_specs=[lay.states_spec(), lay.seq_spec(lay.value_dim, blocked=True), lay.state_spec()],
        out_shape=[lay.states_shape(lay.mxu), lay.values_shape(lay.mxu), jax.ShapeDtypeStruct(d_final.shape, F32)],
        compiler_params=compiler_params(statics.cfg, "state"),
        interpret=statics.interpret,
        name="gated_delta_rule_state_bwd",
    )(res.q, res.k, res.w, do, *gate_inputs(res.b, res.docs), d_final)


def chunk_backward(res: Residuals, do, dh, dv_new, lay: Layout, statics: Statics):
    """Stage 2: ``(dq, dk [B, T, Hv, D], dv [B, T, Hv, E], dβ [B, Hv, T], db or None)``."""
    d, e = lay.dim, lay.value_dim
    has_docs = res.docs is not None
    grad_dtype = res.q.dtype if lay.group == 1 else F32
    out_shape = [
        lay.values_shape(grad_dtype, d),
        lay.values_shape(grad_dtype, d),
        lay.values_shape(res.v.dtype),
        jax.ShapeDtypeStruct(res.beta.shape, F32),
    ]
    out_specs = [lay.chunk_spec(d), lay.chunk_spec(d), lay.chunk_spec(e), lay.chunk_row_spec()]
    if lay.mode != "none":
        out_shape.append(jax.ShapeDtypeStruct(res.b.shape, F32))
        out_specs.append(lay.chunk_gate_specs(False)[0])
    kernel = functools.partial(
        _chunk_bwd_kernel, mode=lay.mode, has_docs=has_docs, mxu=lay.mxu, scale=statics.scale, parts=lay.parts
    )
    grads = pl.pallas_call(
        kernel,
        grid=lay.chunk_grid(),
        in_specs=[
            lay.chunk_spec(d, qk=True),
            lay.chunk_spec(d, qk=True),
            lay.chunk_spec(e),
            lay.chunk_row_spec(),
            lay.chunk_state_spec(),
            lay.chunk_state_spec(),
            lay.chunk_spec(e),
            lay.chunk_spec(e),
            lay.chunk_spec(e),
            *lay.chunk_gate_specs(has_docs),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(statics.cfg, "backward"),
        interpret=statics.interpret,
        name="gated_delta_rule_chunk_bwd",
    )(res.q, res.k, res.v, res.beta, res.h, dh, res.v_new, dv_new, do, *gate_inputs(res.b, res.docs))
    return (*grads, None) if lay.mode == "none" else tuple(grads)


def _sum_groups(x, lay: Layout, dtype):
    """Per-value-head ``[B, T, Hv, D]`` gradients summed over each q/k head's group."""
    if lay.group == 1:
        return x
    b, t, _, d = x.shape
    return x.reshape(b, t, lay.heads, lay.group, d).sum(3).astype(dtype)


def backward(res: Residuals, do, d_final, *, statics: Statics):
    """Cotangents ``(dq, dk, dv, dβ, db, d initial_state)`` for ``pallas_triton``'s ``custom_vjp``."""
    lay = Layout(res.q, res.v, statics.cfg, statics.mode)
    do = do.astype(lay.mxu)
    dh, dv_new, ds0 = state_backward_pass(res, do, d_final.astype(F32), lay, statics)
    dq, dk, dv, dbeta, db = chunk_backward(res, do, dh, dv_new, lay, statics)
    dq, dk = _sum_groups(dq, lay, res.q.dtype), _sum_groups(dk, lay, res.k.dtype)
    return dq, dk, dv, dbeta, db, ds0
