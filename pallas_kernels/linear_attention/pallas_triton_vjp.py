"""Backward pass of the Pallas Triton linear-attention kernels (``pallas_triton``).

It mirrors the forward's layout of splits (runs of whole chunks, one per program; notes/design.md
§1, §2), with ``scale`` folded into q:

1. ``dq`` (one program per key-dim block, split, row, head) walks the split's chunks
   forward from the saved entering state S:
   ``dQ = ((dO Vᵀ) ⊙ M) K + (exp(b) ⊙ dO) Sᵀ``, and in the same pass accumulates the split's
   local state cotangent ``dM_s = Σ_i exp(b_i − b_start) q_iᵀ do_i`` and, for the decay
   gradient, ``q_t · dq_t``.
2. ``state_scan`` in reverse (a float32 suffix over splits) gives the cotangent of the state leaving each split
   (``dS_final`` enters at the right end) and the gradient of ``initial_state``.
3. ``dkdv`` walks each split's chunks in reverse from the state cotangent leaving it:
   ``dK = ((dO Vᵀ) ⊙ M)ᵀ Q + (exp(b_{C−1} − b) ⊙ V) dSᵀ``,
   ``dV = ((Q Kᵀ) ⊙ M)ᵀ dO + (exp(b_{C−1} − b) ⊙ K) dS``,
   ``dS ← exp(b_{C−1}) dS + (exp(b) ⊙ Q)ᵀ dO``, per query head (grouped heads summed after).

Decay gradient: with ``B_t`` the cumulative log decay, ``∂L/∂B_t = q_t·dq_t − k_t·dk_t^(h)``
(``dk^(h)`` the key gradient of query head h alone), plus ``⟨dS_final, S_final⟩`` at the last
token; ``dg_t = Σ_{u ≥ t} ∂L/∂B_u`` and ``dg_gamma = Σ_{b, t} dg``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, dot
from pallas_kernels.linear_attention.common import (
    ChunkWalk,
    Layout,
    Statics,
    carry_scale,
    compiler_params,
    decay_inputs,
    decay_mask,
    row_scale,
    same_doc,
    split_log_decay,
    state_scan,
)


class DqStage(NamedTuple):
    """What ``dq_stage`` gives ``finish``: dq, each split's local state cotangent
    ``[B, H, splits, D, E]`` and the inter-chunk ``q·dq`` ``[B, H, T]`` (None without decay)."""

    dq: jax.Array
    dm: jax.Array
    qdq: jax.Array | None


def _dq_kernel(*refs, walk: ChunkWalk, scale, with_dg):
    """dq and the split's local state cotangent dM (and q·dq), carrying S forward."""
    q_ref, k_ref, v_ref, do_ref, *refs = refs
    decay_ref, doc_refs = walk.pop_inputs(refs)
    s_in_ref, dq_ref, dm_ref, *refs = refs
    qdq_ref = refs[0] if with_dg else None
    chunk, mxu_dtype = walk.chunk, walk.mxu_dtype
    first, count = walk.split_bounds()
    # the document of the state entering the split: only its queries read that state
    first_docs = walk.docs(doc_refs, pl.multiple_of(first * chunk, chunk))

    def body(i, carry):
        state, dm, log_start = carry
        t0 = pl.multiple_of((first + i) * chunk, chunk)
        b, b_last = walk.decay(decay_ref, t0)
        docs = walk.docs(doc_refs, t0)
        q = q_ref[pl.ds(t0, chunk), :]
        k = k_ref[pl.ds(t0, chunk), :]
        v = v_ref[pl.ds(t0, chunk), :].astype(mxu_dtype)
        do = do_ref[pl.ds(t0, chunk), :].astype(mxu_dtype)
        dp = dot(do, v, trans_b=True) * decay_mask(b, chunk=chunk, docs=docs)
        dq_inter = row_scale(dot(do, state.astype(mxu_dtype), trans_b=True), b, same_doc(docs, "prev"))
        dq = scale * (dot(dp.astype(mxu_dtype), k) + dq_inter)
        dq_ref[pl.ds(t0, chunk), :] = dq.astype(dq_ref.dtype)
        if with_dg:  # the inter-chunk part of q·dq; the intra part is taken in the dk/dv kernel
            qdq_ref[pl.ds(t0, chunk)] = scale * jnp.sum(q.astype(F32) * dq_inter, axis=1)
        in_first_doc = None if docs is None else docs.doc == first_docs.prev
        q_from_start = row_scale(q, None if b is None else log_start + b, in_first_doc).astype(mxu_dtype)
        dm = dm + dot(q_from_start, do, trans_a=True)
        k_to_end = row_scale(k, None if b is None else b_last - b, same_doc(docs, "last")).astype(mxu_dtype)
        update = dot(k_to_end, v, trans_a=True)
        return carry_scale(state, b_last, docs) + update, dm, log_start + (0.0 if b is None else b_last)

    init = (s_in_ref[...], jnp.zeros(dm_ref.shape, F32), jnp.zeros((), F32))
    _, dm, _ = lax.fori_loop(0, count, body, init)
    dm_ref[...] = scale * dm


def _dkdv_kernel(*refs, walk: ChunkWalk, scale, with_dk, with_dv, with_dg, last_token):
    """dk and/or dv per query head, carrying the state cotangent backward through the split.

    Fused (both): full D and E. dv alone: E tiled (q, k full). dk alone: D tiled (v, dO full).
    With ``with_dg`` it also writes this program's share of ``∂L/∂B_t`` except the inter-chunk
    q·dq term: the intra-chunk pairs ``X[i, j] = scale (q_i·k_j)(do_i·v_j) M[i, j]`` for
    ``j < i`` (query side minus key side; the diagonal pairs cancel exactly and are left out,
    which keeps dg accurate under strong decay) and minus the inter-chunk k·dk term, except for
    token ``last_token``, whose pair with the final state cancels the same way.
    """
    q_ref, k_ref, v_ref, do_ref, *refs = refs
    decay_ref, doc_refs = walk.pop_inputs(refs)
    ds_ref, *refs = refs
    dk_ref = refs.pop(0) if with_dk else None
    dv_ref = refs.pop(0) if with_dv else None
    dlog_ref = refs.pop(0) if with_dg else None
    chunk, mxu_dtype = walk.chunk, walk.mxu_dtype
    first, count = walk.split_bounds()
    row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)

    def body(i, ds):
        t0 = pl.multiple_of((first + count - 1 - i) * chunk, chunk)
        b, b_last = walk.decay(decay_ref, t0)
        docs = walk.docs(doc_refs, t0)
        mask_t = decay_mask(b, chunk=chunk, transpose=True, docs=docs)  # [key j, query i]
        to_end = None if b is None else b_last - b
        key_to_end = same_doc(docs, "last")
        q = q_ref[pl.ds(t0, chunk), :].astype(mxu_dtype)
        k = k_ref[pl.ds(t0, chunk), :].astype(mxu_dtype)
        v = v_ref[pl.ds(t0, chunk), :].astype(mxu_dtype)
        do = do_ref[pl.ds(t0, chunk), :].astype(mxu_dtype)
        ds_mxu = ds.astype(mxu_dtype)
        dlog = None
        dov_t = dot(v, do, trans_b=True) if with_dk or with_dg else None  # [key j, query i]
        if with_dv:
            scores_t = dot(k, q, trans_b=True) * mask_t
            dv = scale * dot(scores_t.astype(mxu_dtype), do) + row_scale(dot(k, ds_mxu), to_end, key_to_end)
            dv_ref[pl.ds(t0, chunk), :] = dv.astype(dv_ref.dtype)
            if with_dg:
                pairs = jnp.where(row < col, scores_t * dov_t, 0.0)
                dlog = scale * (jnp.sum(pairs, axis=0) - jnp.sum(pairs, axis=1))
        if with_dk:
            dp_t = dov_t * mask_t
            dk_inter = row_scale(dot(v, ds_mxu, trans_b=True), to_end, key_to_end)
            dk = scale * dot(dp_t.astype(mxu_dtype), q) + dk_inter
            dk_ref[pl.ds(t0, chunk), :] = dk.astype(dk_ref.dtype)
            if with_dg:
                k_dk = jnp.sum(k.astype(F32) * dk_inter, axis=1)
                k_dk = jnp.where(t0 + lax.broadcasted_iota(jnp.int32, (chunk,), 0) == last_token, 0.0, k_dk)
                dlog = -k_dk if dlog is None else dlog - k_dk
        if with_dg:
            dlog_ref[pl.ds(t0, chunk)] = dlog
        update = scale * dot(row_scale(q, b, same_doc(docs, "prev")).astype(mxu_dtype), do, trans_a=True)
        return update + carry_scale(ds, b_last, docs)

    lax.fori_loop(0, count, body, ds_ref[...])


def backward(q, k, v, g, gamma, docs, states, do, d_final, *, statics: Statics):
    """Cotangents of (q, k, v, g, gamma, initial_state) for ``pallas_triton``'s ``custom_vjp``."""
    stage = dq_stage(q, k, v, g, gamma, docs, states, do, statics=statics)
    return finish(q, k, v, g, gamma, docs, states, do, d_final, stage, statics=statics)


def _setup(q, k, v, g, gamma, docs, statics: Statics):
    """(layout, chunk walk, decay and document inputs, their specs) of one backward call."""
    lay = Layout(q, k, v, statics.cfg)
    decay, decay_specs = decay_inputs(g, gamma, docs, lay, statics.mode)
    walk = lay.walk(statics.mode, q.dtype, has_docs=docs is not None, last_token=statics.last_token)
    return lay, walk, decay, decay_specs


def _token_spec(t):
    """Per-token float32 terms ``[blocks, B, H, T]``, one row per program."""
    return pl.BlockSpec((None, None, None, t), lambda j, s, bb, hh: (j, bb, hh, 0))


def dq_stage(q, k, v, g, gamma, docs, states, do, *, statics: Statics) -> DqStage:
    """Stage 1 (needs no state cotangent from the right): dq, dM per split and q·dq."""
    lay, walk, decay, decay_specs = _setup(q, k, v, g, gamma, docs, statics)
    b, t, h, d, e = lay.batch, lay.seq_len, lay.heads, lay.dim, lay.value_dim
    cfg = statics.cfg
    with_dg = statics.mode != "none"
    do = do.astype(q.dtype)

    # 1. dq, the local state cotangents and q·dq
    block_d = min(cfg.block_d, d)
    n_d = d // block_d
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, h, lay.num_splits, d, e), F32),
    ]
    out_specs = [lay.seq_spec(d, block=block_d), lay.state_spec(block_d, e, block_rows=True)]
    if with_dg:
        out_shape.append(jax.ShapeDtypeStruct((n_d, b, h, t), F32))
        out_specs.append(_token_spec(t))
    dq, dm, *qdq = pl.pallas_call(
        functools.partial(_dq_kernel, walk=walk, scale=statics.scale, with_dg=with_dg),
        grid=lay.grid(n_d),
        in_specs=[
            lay.seq_spec(d, block=block_d),
            lay.seq_spec(d, kv=True, block=block_d),
            lay.seq_spec(e, kv=True),
            lay.seq_spec(e),
            *decay_specs,
            lay.state_spec(block_d, e, block_rows=True),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg, backward=True),
        interpret=statics.interpret,
        name="linear_attention_dq",
    )(q, k, v, do, *decay, states)
    return DqStage(dq, dm, qdq[0].sum(0) if with_dg else None)


def finish(q, k, v, g, gamma, docs, states, do, d_final, stage: DqStage, *, statics: Statics):
    """Stages 2–3 from ``dq_stage``'s result and the final state's cotangent ``d_final``."""
    dq, dm, qdq = stage
    lay, walk, decay, decay_specs = _setup(q, k, v, g, gamma, docs, statics)
    b, t, h, d, e = lay.batch, lay.seq_len, lay.heads, lay.dim, lay.value_dim
    cfg, scale, mode = statics.cfg, statics.scale, statics.mode
    with_dg = mode != "none"
    do = do.astype(q.dtype)

    # 2. state cotangents entering each split from the right: d_states[s] for s = 0 … num_splits,
    # where d_states[0] is the initial state's gradient and d_states[s + 1] leaves split s
    split_log = split_log_decay(g, gamma, lay, docs, last_token=statics.last_token)
    d_states = state_scan(dm, split_log, d_final, reverse=True, interpret=statics.interpret)

    # 3. dk, dv per query head
    grad_dtype = k.dtype if lay.group == 1 else F32
    variants = [(True, True, 1)]
    if cfg.split_dkdv:
        variants = [(True, False, d // min(cfg.block_dkdv, d)), (False, True, e // min(cfg.block_dkdv, e))]
    grads, d_logs = {}, [qdq]
    for with_dk, with_dv, blocks in variants:
        rows_tiled = with_dk and not with_dv  # dk alone tiles D; dv alone tiles E
        cols_tiled = with_dv and not with_dk
        block_dk = d // blocks if rows_tiled else d
        block_dv = e // blocks if cols_tiled else e
        out_shape, out_specs = [], []
        if with_dk:
            out_shape.append(jax.ShapeDtypeStruct((b, t, h, d), grad_dtype))
            out_specs.append(lay.seq_spec(d, block=block_dk if rows_tiled else None))
        if with_dv:
            out_shape.append(jax.ShapeDtypeStruct((b, t, h, e), grad_dtype))
            out_specs.append(lay.seq_spec(e, block=block_dv if cols_tiled else None))
        if with_dg:
            out_shape.append(jax.ShapeDtypeStruct((blocks, b, h, t), F32))
            out_specs.append(_token_spec(t))
        outs = pl.pallas_call(
            functools.partial(
                _dkdv_kernel,
                walk=walk,
                scale=scale,
                with_dk=with_dk,
                with_dv=with_dv,
                with_dg=with_dg,
                last_token=statics.last_token,
            ),
            grid=lay.grid(blocks),
            in_specs=[
                lay.seq_spec(d, block=block_dk if rows_tiled else None),
                lay.seq_spec(d, kv=True, block=block_dk if rows_tiled else None),
                lay.seq_spec(e, kv=True, block=block_dv if cols_tiled else None),
                lay.seq_spec(e, block=block_dv if cols_tiled else None),
                *decay_specs,
                lay.state_spec(block_dk, block_dv, block_rows=rows_tiled, offset=1),
            ],
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=compiler_params(cfg, backward=True),
            interpret=statics.interpret,
            name="linear_attention_dkdv"
            if with_dk and with_dv
            else ("linear_attention_dk" if with_dk else "linear_attention_dv"),
        )(q, k, v, do, *decay, d_states)
        outs = list(outs)
        if with_dk:
            grads["dk"] = outs.pop(0)
        if with_dv:
            grads["dv"] = outs.pop(0)
        if with_dg:
            d_logs.append(outs.pop(0).sum(0))

    dk, dv = grads["dk"], grads["dv"]
    if lay.group > 1:
        dk = dk.reshape(b, t, lay.kv_heads, lay.group, d).sum(3).astype(k.dtype)
        dv = dv.reshape(b, t, lay.kv_heads, lay.group, e).sum(3).astype(v.dtype)

    dg = dgamma = None
    if with_dg:
        d_log = sum(d_logs)  # ∂L/∂B_t  [B, H, T]
        final_term = jnp.sum(d_final * states[:, :, -1], axis=(-2, -1))
        dg_all = jnp.flip(jnp.cumsum(jnp.flip(d_log, -1), axis=-1), -1) + final_term[..., None]
        if mode == "g":
            dg = dg_all
        else:  # the padding after the last real token does not decay: its terms are not gamma's
            dgamma = dg_all[..., : statics.last_token + 1].sum((0, 2))
    return dq, dk, dv, dg, dgamma, d_states[:, :, 0]
