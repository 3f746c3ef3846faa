"""The gated delta rule as Pallas kernels lowered to Triton: the forward pass and its ``custom_vjp``.

Computes exactly ``reference.recurrent`` (notes/design.md §6) per value head, with the state S
``[D, E]`` in float32: ``S'_t = diag(exp g_t) S_{t−1}``, ``S_t = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ``,
``o_t = scale · S_tᵀ q_t``; g none (DeltaNet), one per token (Gated DeltaNet) or one per key channel
(KDA). Inputs bf16, fp16 or fp32, every product accumulated in float32 (bf16/fp16 operands on the
tensor cores), the output in q's dtype. The chunked WY form (Yang et al. 2024), chunks of C tokens:

1. ``wy`` (chunk-parallel): ``A = strictly_lower(diag(β)(K Kᵀ ⊙ Γ))``, ``X = (I + A)⁻¹`` from 16×16
   blocks, ``W = X (β e^b ⊙ K)``, ``U = X (β ⊙ V)``; nothing of it depends on the state. The key
   and value columns are walked in blocks (``cfg.block_cols``) to keep the live tiles small.
2. ``state`` (one program per value block, row and value head; the sequential part): walks the
   chunks, ``h_c = S``, ``V'_c = U_c − W_c S``, ``S ← diag(γ_c) S + K̃_cᵀ V'_c``; writes every h_c,
   V' and the final state.
3. ``output`` (chunk-parallel): ``O = scale · [(e^b ⊙ Q) h_c + (Q Kᵀ ⊙ Γ ⊙ causal) V'_c]``; with
   ``cfg.fuse_output`` (scalar or no gates) the state pass writes O itself and there is no third kernel.

Splits (``cfg.splits`` > 1, LASP inside one GPU): the rows are cut into runs of whole chunks
treated as rows of their own; a ``transition`` pass (the state pass over ``[U | 0]`` from
``[0 | I]``, storing nothing per chunk) gives each run's ``(Φ, M)``, a float32 scan over runs their
entering states, and the state pass starts each run from its own, so the sequential walk is
``NC / splits`` chunks long with ``splits`` times the programs.

The backward (``pallas_triton_vjp``) reads W, h and V' (saved) and mirrors it: the output's
gradients first, a reverse state pass, then the state step's and WY form's gradients. Grouped value
heads read their q/k head through the index maps; head dims are padded to a power of two ≥ 16 and
the time axis to whole chunks × splits (zero k, v, β and log gate: exact) outside the
``custom_vjp``. The chunk math is ``common``; the block specs ``layout``; the entry points split at
the entering state (sequence parallelism) ``pallas_triton_split``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, KERNEL_DTYPES, MAX_ELEMENTS, chain_pieces, pad_dim
from pallas_kernels.gated_delta_rule import common, pallas_triton_vjp
from pallas_kernels.gated_delta_rule.config import BlockConfig, default_config
from pallas_kernels.gated_delta_rule.layout import (
    Layout,
    Residuals,
    Statics,
    channel_chunk_cumsum,
    chunk_cumsum,
    compiler_params,
    entering_states,
    from_splits,
    gate_inputs,
    key_chunk,
    leaving_cotangents,
    load_col_tiles,
    load_doc_tiles,
    load_docs,
    load_rows,
    load_tiles,
    pop_gate_refs,
    pregated_operands,
    store_col_tiles,
    store_lower_blocks,
    store_tiles,
    to_splits,
    value_chunk,
    zero_blocks,
)
from pallas_kernels.gated_delta_rule.products import (
    CHANNEL_MODES,
    by_gates,
    case_of,
    check_gate_lower_bound,
    floor_gates,
    gate_case,
    kept_case,
)
from pallas_kernels.gated_delta_rule.reference import document_index

# ---- kernels ----------------------------------------------------------------------------------


def _wy_kernel(k_ref, v_ref, beta_ref, *refs, mode, has_docs, mxu, block_cols, parts, precision, stacked=False):
    """W and U of one chunk: the Gram blocks summed over key-column blocks, X, then W and U
    column block by column block; X itself too when given an output for it. ``stacked``: per-channel
    off-diagonal Gram blocks from whole-chunk loads (``BlockConfig.stacked_pairs``)."""
    refs = list(refs)
    gate_ref, doc_refs = pop_gate_refs(refs, mode=mode, has_docs=has_docs)
    w_ref, u_ref, *x_ref = refs
    beta, docs = load_tiles(beta_ref, parts), load_doc_tiles(doc_refs, parts)
    kw, vw = min(block_cols, k_ref.shape[1]), min(block_cols, v_ref.shape[1])

    def keys(j):
        return key_chunk(k_ref, gate_ref, beta, docs, pl.multiple_of(j * kw, kw), mode=mode, width=kw)

    def add_gram(j, gram):
        whole = None
        if stacked and mode in CHANNEL_MODES:
            cols = pl.ds(pl.multiple_of(j * kw, kw), kw)
            whole = (k_ref[:, cols], gate_ref[:, cols])
        return common.add_blocks(gram, common.gram_blocks(keys(j), mode=mode, mxu=mxu, whole=whole))

    gram = lax.fori_loop(0, k_ref.shape[1] // kw, add_gram, zero_blocks(parts, k_ref.shape[0] // parts))
    x = common.inverse_blocks(gram, beta, precision)
    if x_ref:  # the whole C × C inverse, block column by block column (zeros above the diagonal)
        store_lower_blocks(x_ref[0], x, parts, k_ref.shape[0] // parts)

    def store_w(j, carry):
        store_col_tiles(w_ref, common.solve_blocks(x, common.key_rhs(keys(j), mxu), mxu), j * kw)
        return carry

    def store_u(j, carry):
        chunk = value_chunk(v_ref, beta, pl.multiple_of(j * vw, vw), width=vw)
        store_col_tiles(u_ref, common.solve_blocks(x, common.value_rhs(chunk, mxu), mxu), j * vw)
        return carry

    lax.fori_loop(0, k_ref.shape[1] // kw, store_w, 0)
    lax.fori_loop(0, v_ref.shape[1] // vw, store_u, 0)


def _state_kernel(
    w_ref, u_ref, k_ref, *refs, mode, has_docs, mxu, chunk, num_chunks, store_chunks, u_blocks, scale, pregated
):
    """The state pass over one (row, value head, value block): h_c, V' (if ``store_chunks``) and the
    final state. ``u_blocks``: value blocks from ``u_blocks`` on run with U = 0 (the transition's
    identity columns; their programs read a real block of U and zero it), None: every block is U's.
    With ``scale`` (``BlockConfig.fuse_output``; scalar or no gates) it also reads Q and writes each
    chunk's output block ``scale · [(e^b ⊙ Q) h_c + (Q Kᵀ ⊙ Γ ⊙ causal) V'_c]``, off the chain of
    states, so no output kernel reads h and V' again. ``pregated``: ``k_ref`` holds the gated keys and
    the gate ref each chunk's decay ``[NC, D]`` (``layout.pregated_operands``; no documents)."""
    refs = list(refs)
    q_ref = refs.pop(0) if scale is not None else None
    gate_ref, doc_refs = pop_gate_refs(refs, mode=mode, has_docs=has_docs)
    s0_ref, *chunk_refs, final_ref = refs
    real_values = None if u_blocks is None else pl.program_id(0) < u_blocks

    def body(c, state):
        t0 = pl.multiple_of(c * chunk, chunk)
        if pregated:
            b, docs, to_end, gamma = None, None, None, gate_ref[c, :]
        else:
            b, docs = load_rows(gate_ref, t0, chunk), load_docs(doc_refs, t0, chunk)
            _, to_end, gamma = common.gate_factors(b, docs)
        k, w, u = k_ref[pl.ds(t0, chunk), :], w_ref[pl.ds(t0, chunk), :], u_ref[pl.ds(t0, chunk), :]
        if real_values is not None:
            u = jnp.where(real_values, u, jnp.zeros_like(u))
        entering = state
        v_new, state = common.state_step(state, w, u, k, to_end, gamma, mxu)
        if store_chunks:
            h_ref, v_new_ref = chunk_refs[:2]
            h_ref[c] = entering.astype(h_ref.dtype)
            v_new_ref[pl.ds(t0, chunk), :] = v_new.astype(v_new_ref.dtype)
        if q_ref is not None:
            o_ref = chunk_refs[-1]
            q = q_ref[pl.ds(t0, chunk), :]
            (o,) = common.output_forward(q, k, b, docs, entering, v_new, scale=scale, mode=mode, mxu=mxu, parts=1)
            o_ref[pl.ds(t0, chunk), :] = o.astype(o_ref.dtype)
        return state

    final_ref[...] = lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(F32))


def _output_kernel(q_ref, k_ref, h_ref, v_new_ref, *refs, mode, has_docs, mxu, scale, parts, block_cols, stacked=False):
    """The output of one chunk from its entering state and V', walking the key columns in blocks of
    ``block_cols`` (the scores and ``(e^b ⊙ Q) S`` are sums over them); ``stacked``: their
    off-diagonal score blocks from whole-chunk loads (``BlockConfig.stacked_pairs``)."""
    refs = list(refs)
    gate_ref, doc_refs = pop_gate_refs(refs, mode=mode, has_docs=has_docs)
    o_ref, *z_ref = refs
    docs = load_doc_tiles(doc_refs, parts)
    width = min(block_cols, k_ref.shape[1])

    def add_columns(j, carry):
        z, inter = carry
        start = pl.multiple_of(j * width, width)
        q, k = load_col_tiles(q_ref, parts, start, width), load_col_tiles(k_ref, parts, start, width)
        b = load_col_tiles(gate_ref, parts, start, width) if mode in CHANNEL_MODES else load_tiles(gate_ref, parts)
        whole = None
        if stacked and mode in CHANNEL_MODES:
            cols = pl.ds(start, width)
            whole = (q_ref[:, cols], gate_ref[:, cols])
        z = common.add_blocks(z, common.score_blocks(q, k, b, docs, mode=mode, mxu=mxu, parts=parts, whole=whole))
        h_rows = h_ref[pl.ds(start, width), :]
        inter = [
            a + c for a, c in zip(inter, common.output_inter(q, b, docs, h_rows, mxu=mxu, parts=parts), strict=True)
        ]
        return z, inter

    rows = q_ref.shape[0] // parts
    init = (zero_blocks(parts, rows), [jnp.zeros((rows, v_new_ref.shape[1]), F32) for _ in range(parts)])
    z, inter = lax.fori_loop(0, k_ref.shape[1] // width, add_columns, init)
    store_tiles(o_ref, common.output_combine(z, inter, load_tiles(v_new_ref, parts), scale=scale, mxu=mxu))
    if z_ref:  # the score blocks for the output backward, block column by block column
        store_lower_blocks(z_ref[0], z, parts, rows)


# ---- the three calls --------------------------------------------------------------------------


def wy_representation(k, v, beta, b, docs, lay: Layout, statics: Statics, *, store_inverse: bool | None = None):
    """Stage 1: ``(W [B, T, Hv, D], U [B, T, Hv, E])`` in the matmul operand dtype, and the inverse
    ``X [B, T, Hv, C]`` with ``lay.store_inverse`` (else None), also in the operand dtype: formed in
    float32, every product that reads it (W and U here, the WY backward's) takes it in that dtype."""
    d, e = lay.dim, lay.value_dim
    store_inverse = lay.store_inverse if store_inverse is None else store_inverse  # False: no backward reads it
    x_out = [(lay.chunk_spec(lay.chunk), lay.values_shape(lay.mxu, lay.chunk))] if store_inverse else []
    w, u, *x = pl.pallas_call(
        functools.partial(
            _wy_kernel,
            mode=lay.mode,
            has_docs=docs is not None,
            mxu=lay.mxu,
            block_cols=statics.cfg.block_cols,
            parts=lay.wy_parts,
            precision=statics.inverse_precision,
            stacked=statics.cfg.stacked_pairs,
        ),
        grid=lay.chunk_grid(),
        in_specs=[
            lay.chunk_spec(d, qk=True),
            lay.chunk_spec(e),
            lay.chunk_row_spec(),
            *lay.chunk_gate_specs(docs is not None),
        ],
        out_specs=[lay.chunk_spec(d), lay.chunk_spec(e), *(s for s, _ in x_out)],
        out_shape=[lay.values_shape(lay.mxu, d), lay.values_shape(lay.mxu), *(x for _, x in x_out)],
        compiler_params=compiler_params(statics.cfg, "chunk"),
        interpret=statics.interpret,
        name="gated_delta_rule_wy",
    )(k, v, beta, *gate_inputs(b, docs))
    return w, u, (x[0] if x else None)


def state_pass(w, u, k, b, docs, s0, lay: Layout, statics: Statics, *, store_chunks: bool = True, name=None, q=None):
    """Stage 2: ``(h [B, Hv, NC, D, E], V' [B, T, Hv, E], final state [B, Hv, D, E] float32)``, or
    only the final state when not ``store_chunks``. A ``u`` narrower than ``lay.value_dim`` is
    continued by zero columns (whole value blocks; read by no program). ``name``: the kernel's, in
    profiles (default: ``gated_delta_rule_state`` or, not storing, ``gated_delta_rule_transition``).
    Given ``q`` (``BlockConfig.fuse_output``) the pass writes the output too: ``(h, V', o [B, T, Hv,
    E] in q's dtype, final state)``, or ``(o, final state)`` when not ``store_chunks`` (a call that
    takes no gradient keeps no residuals)."""
    d = lay.dim
    u_blocks = None
    u_spec = lay.seq_spec(lay.value_dim, blocked=True)
    if u.shape[-1] != lay.value_dim:
        u_blocks = u.shape[-1] // lay.block_e
        if u_blocks * lay.block_e != u.shape[-1] or u.shape[-1] > lay.value_dim:
            raise ValueError(f"u's {u.shape[-1]} columns are not whole blocks of {lay.block_e} within {lay.value_dim}")
        last = u_blocks - 1
        u_spec = pl.BlockSpec((None, lay.seq_len, None, lay.block_e), lambda j, b, h: (b, 0, h, jnp.minimum(j, last)))
    keys, key_spec = k, lay.seq_spec(d, qk=True)
    gates, gate_specs = gate_inputs(b, docs), lay.seq_gate_specs(docs is not None)
    if lay.pregated:  # gated keys per value head and each chunk's decay, formed once (no documents)
        keys, gamma, _ = pregated_operands(k, b, docs, lay)
        key_spec, gates, gate_specs = lay.seq_spec(d), [gamma], [lay.chunk_gamma_spec()]
    kernel = functools.partial(
        _state_kernel,
        mode=lay.mode,
        has_docs=docs is not None and not lay.pregated,
        mxu=lay.mxu,
        chunk=lay.chunk,
        num_chunks=lay.num_chunks,
        store_chunks=store_chunks,
        u_blocks=u_blocks,
        scale=None if q is None else statics.scale,
        pregated=lay.pregated,
    )
    out_specs, out_shape = [lay.state_spec()], [jax.ShapeDtypeStruct(s0.shape, F32)]
    fused = [] if q is None else [(lay.seq_spec(d, qk=True), q)]
    if fused:  # the output block beside V'
        out_specs = [lay.seq_spec(lay.value_dim, blocked=True), *out_specs]
        out_shape = [lay.values_shape(q.dtype), *out_shape]
    if store_chunks:
        out_specs = [lay.states_spec(), lay.seq_spec(lay.value_dim, blocked=True), *out_specs]
        out_shape = [lay.states_shape(lay.mxu), lay.values_shape(lay.mxu), *out_shape]
    outs = pl.pallas_call(
        kernel,
        grid=lay.state_grid(),
        in_specs=[
            lay.seq_spec(d),
            u_spec,
            key_spec,
            *(spec for spec, _ in fused),
            *gate_specs,
            lay.state_spec(),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(statics.cfg, "state"),
        interpret=statics.interpret,
        name=name or ("gated_delta_rule_state" if store_chunks or fused else "gated_delta_rule_transition"),
    )(w, u, keys, *(x for _, x in fused), *gates, s0)
    return tuple(outs) if len(outs) > 1 else outs[0]


def transition(w, u, k, b, docs, lay: Layout, statics: Statics, *, with_phi: bool = True):
    """``(Φ [B, Hv, D, D], M [B, Hv, D, E])``: the call maps an entering state S to ``Φ S + M``.

    One state pass over ``[U | 0]`` from ``[0 | I]`` (notes/design.md §6: Φ is the recurrence run
    on the identity with no values), storing nothing per chunk; the zero columns are never formed
    (the programs of the identity's value blocks zero the U they read). ``with_phi=False``: ``(None,
    M)`` from a pass over U's E columns alone (for callers whose entering state is known to be zero
    or whose leaving state nobody reads).
    """
    d, e = lay.dim, lay.value_dim
    if not with_phi:
        zeros = jnp.zeros((lay.batch, lay.value_heads, d, e), F32)
        final = state_pass(w, u, k, b, docs, zeros, lay, statics, store_chunks=False, name="gated_delta_rule_leaving")
        return None, final
    eye = jnp.broadcast_to(jnp.eye(d, dtype=F32), (lay.batch, lay.value_heads, d, d))
    s0 = jnp.concatenate([jnp.zeros((lay.batch, lay.value_heads, d, e), F32), eye], axis=-1)
    values = jax.ShapeDtypeStruct(u.shape[:3] + (e + d,), u.dtype)  # [U | 0]: its shape only
    aug = Layout(w, values, statics.cfg, lay.mode, heads=lay.heads, block_e=min(lay.block_e, d, e))
    final = state_pass(w, u, k, b, docs, s0, aug, statics, store_chunks=False)
    return final[..., e:], final[..., :e]


def states_and_output(q, k, w, u, b, docs, s0, lay: Layout, statics: Statics, *, residuals: bool = True):
    """Stages 2–3: ``(h, V', final state, o in q's dtype, Z or None)``: the state pass then the
    output kernel, or with ``cfg.fuse_output`` the state pass writing the output itself (then,
    without ``residuals``, storing no h and V': ``(None, None, final, o, None)``)."""
    if statics.cfg.fuse_output:
        *stored, o, final = state_pass(w, u, k, b, docs, s0, lay, statics, store_chunks=residuals, q=q)
        h, v_new = stored or (None, None)
        return h, v_new, final, o, None
    h, v_new, final = state_pass(w, u, k, b, docs, s0, lay, statics)
    o, z = output(q, k, b, docs, h, v_new, lay, statics, q.dtype, store_scores=residuals and statics.cfg.store_scores)
    return h, v_new, final, o, z


def output(q, k, b, docs, h, v_new, lay: Layout, statics: Statics, dtype, *, store_scores: bool | None = None):
    """Stage 3: ``(o [B, T, Hv, E] in dtype, Z [B, T, Hv, C] with ``store_scores`` (default
    ``cfg.store_scores``) else None)``."""
    store_scores = statics.cfg.store_scores if store_scores is None else store_scores
    d, e = lay.dim, lay.value_dim
    kernel = functools.partial(
        _output_kernel,
        mode=lay.mode,
        has_docs=docs is not None,
        mxu=lay.mxu,
        scale=statics.scale,
        parts=lay.output_parts,
        block_cols=statics.cfg.block_cols,
        stacked=statics.cfg.stacked_pairs,
    )
    o, *z = pl.pallas_call(
        kernel,
        grid=lay.chunk_grid(),
        in_specs=[
            lay.chunk_spec(d, qk=True),
            lay.chunk_spec(d, qk=True),
            lay.chunk_state_spec(),
            lay.chunk_spec(e),
            *lay.chunk_gate_specs(docs is not None),
        ],
        out_specs=[lay.chunk_spec(e), *([lay.chunk_spec(lay.chunk)] if store_scores else [])],
        out_shape=[
            lay.values_shape(dtype),
            *([lay.values_shape(lay.mxu, lay.chunk)] if store_scores else []),
        ],
        compiler_params=compiler_params(statics.cfg, "chunk"),
        interpret=statics.interpret,
        name="gated_delta_rule_output",
    )(q, k, h, v_new, *gate_inputs(b, docs))
    return o, (z[0] if z else None)


# ---- the custom_vjp ---------------------------------------------------------------------------


class SplitResiduals(NamedTuple):
    """Residuals of a split call: those of its splits (as rows) and each one's Φ."""

    rows: Residuals
    phi: jax.Array


def split_rows(q, k, v, beta, b, docs, splits: int):
    """The inputs with each row cut into ``splits`` rows (``layout.to_splits``)."""
    gate_axis = 2 if b is not None and b.ndim == 3 else 1  # scalar gates are [B, Hv, T]
    q, k, v = (to_splits(x, splits) for x in (q, k, v))
    docs = None if docs is None else tuple(to_splits(x, splits) for x in docs)
    return q, k, v, to_splits(beta, splits, time_axis=2), to_splits(b, splits, time_axis=gate_axis), docs


def _forward(q, k, v, beta, b, s0, docs, statics: Statics, *, keep_residuals: bool = True):
    """(o, final state, residuals). With ``cfg.splits`` > 1 the rows are cut into splits that
    the state passes walk in parallel, each from its entering state, given by a transition pass
    and a float32 scan over splits (``Residuals`` then describe the split rows). Without
    ``keep_residuals`` (a call that takes no gradient) nothing only the backward reads is written (the
    stored inverse; with ``cfg.fuse_output`` also h and V') and the residuals are None."""
    splits = statics.cfg.splits
    q, k, v, beta, b, docs = split_rows(q, k, v, beta, b, docs, splits)
    lay = Layout(q, v, statics.cfg, statics.mode)
    w, u, x = wy_representation(k, v, beta, b, docs, lay, statics, store_inverse=keep_residuals and lay.store_inverse)
    phi = None
    if splits > 1:
        phi, m = transition(w, u, k, b, docs, lay, statics)
        s0 = entering_states(phi, m, s0, splits)
    h, v_new, final, o, z = states_and_output(q, k, w, u, b, docs, s0, lay, statics, residuals=keep_residuals)
    residuals = Residuals(q, k, v, beta, b, docs, w, h, v_new, x, z) if keep_residuals else None
    if splits == 1:
        return o, final, residuals
    last = final.reshape((-1, splits) + final.shape[1:])[:, -1]
    return from_splits(o, splits), last, (SplitResiduals(residuals, phi) if keep_residuals else None)


def _backward(statics: Statics, residuals, do, d_final):
    splits = statics.cfg.splits
    if splits == 1:
        return pallas_triton_vjp.backward(residuals, do, d_final, statics=statics)
    rows, phi = residuals
    local, stage = pallas_triton_vjp.backward_local(rows, to_splits(do, splits), statics=statics)
    d_out, _ = leaving_cotangents(phi, local, d_final.astype(F32), splits)
    grads = pallas_triton_vjp.backward_finish(rows, stage, d_out, statics=statics)
    return join_split_grads(grads, splits)


def join_split_grads(grads, splits: int):
    """``(dq, dk, dv, dβ, db, d initial_state)`` of split rows back to whole rows (the initial
    state's cotangent: the first split's)."""
    dq, dk, dv, dbeta, db, ds0 = grads
    if splits == 1:
        return grads
    gate_axis = 2 if db is not None and db.ndim == 3 else 1  # scalar gates are [B, Hv, T]
    dq, dk, dv = (from_splits(x, splits) for x in (dq, dk, dv))
    dbeta, db = from_splits(dbeta, splits, time_axis=2), from_splits(db, splits, time_axis=gate_axis)
    return dq, dk, dv, dbeta, db, ds0.reshape((-1, splits) + ds0.shape[1:])[:, 0]


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def _gated_delta_rule(q, k, v, beta, b, s0, docs, statics: Statics):
    run = lambda st: _forward(q, k, v, beta, b, s0, docs, st, keep_residuals=False)[:2]  # noqa: E731
    case = gate_case(b, statics, q.dtype, backward=False)
    return by_gates(case, statics, run, rows=statics.cfg.forward_factored_rows)


def _gated_delta_rule_fwd(q, k, v, beta, b, s0, docs, statics: Statics):
    case = gate_case(b, statics, q.dtype)
    o, final, residuals = by_gates(case, statics, lambda st: _forward(q, k, v, beta, b, s0, docs, st))
    return (o, final), (residuals, kept_case(case))


def _gated_delta_rule_bwd(statics: Statics, residuals, cotangents):
    do, d_final = cotangents
    residuals, case = residuals
    grads = by_gates(case_of(case, statics), statics, lambda st: _backward(st, residuals, do, d_final))
    return (*grads, None)  # document numbers are integers: no cotangent


_gated_delta_rule.defvjp(_gated_delta_rule_fwd, _gated_delta_rule_bwd)


# ---- public function --------------------------------------------------------------------------


def supports(q, k, v) -> bool:
    """Whether the GPU kernels take these inputs: dtypes (any length: see ``piece_len``)."""
    return all(x.dtype in KERNEL_DTYPES for x in (q, k, v)) and piece_len(q, v) > 0


def piece_len(q, v, chunk: int = 16) -> int:
    """The longest run of tokens (whole chunks of ``chunk``) whose arrays have int32 element offsets.

    Time is padded to whole chunks × splits (at most 2048 tokens more); the transition pass's grid
    spans ``[U | 0]``'s D + E columns (the widest per-token offsets, though U alone is stored), the
    per-chunk states are the largest array. Longer inputs run as pieces of this many tokens, the
    state chained from piece to piece.
    """
    b, _, _, d = q.shape
    hv, e = v.shape[2:]
    dp, ep = pad_dim(d), pad_dim(e)
    per_token = max(b * hv * (dp + ep), -(-b * hv * dp * ep // chunk))
    return max(0, (MAX_ELEMENTS // per_token - 2048) // chunk * chunk)


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
    config: BlockConfig | None = None,
    gate_lower_bound: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule through the Pallas Triton kernels; equals ``reference.recurrent``.

    Args:
      q, k ``[B, T, H, D]``, v ``[B, T, Hv, E]`` (``Hv % H == 0``), in bf16, fp16 or fp32; beta
      ``[B, T, Hv]``; g None, ``[B, T, Hv]`` or ``[B, T, Hv, D]`` log gates (≤ 0); scale (default
      ``D ** -0.5``); initial_state ``[B, Hv, D, E]``; segment_ids ``[B, T]`` integer document ids
      of packed rows (the state resets where the id changes); interpret: run the kernels in the
      Pallas interpreter (CPU); config: tiling (default: a heuristic); gate_lower_bound: raise
      log gates below it to it (``products.floor_gates``); under per-channel gates with bf16 /
      float32 q, k, v only the kernel forms it allows are built (as ``api.gated_delta_rule`` says).

    Returns:
      ``(o [B, T, Hv, E] in q's dtype, final_state [B, Hv, D, E] float32)``, differentiable in q, k,
      v, beta, g and initial_state.

    Arguments are assumed validated by ``api.validate`` (the public entry point).
    """
    t, d = q.shape[1], q.shape[3]
    e = v.shape[3]
    piece = piece_len(q, v, config.chunk if config else 16 if interpret else 64)
    if 0 < piece < t:  # longer than int32 offsets allow: pieces, the state chained (notes/design.md §6)
        kw = dict(scale=scale, interpret=interpret, config=config, gate_lower_bound=gate_lower_bound)
        return chain_pieces(
            lambda q, k, v, beta, g, **state: gated_delta_rule(q, k, v, beta, g=g, **kw, **state),
            (q, k, v, beta, g),
            piece=piece,
            initial_state=initial_state,
            segment_ids=segment_ids,
        )
    scale = float(d**-0.5 if scale is None else scale)
    args, docs, statics = prepare(
        q, k, v, beta, g, initial_state, segment_ids, scale, interpret, config, gate_lower_bound=gate_lower_bound
    )
    o, final = _gated_delta_rule(*args, docs, statics=statics)
    return o[:, :t, :, :e], final[:, :, :d, :e]


def prepare(q, k, v, beta, g, initial_state, segment_ids, scale, interpret, config, *, gate_lower_bound=None):
    """Kernel inputs ``(q, k, v, beta [B, Hv, T'], b, s0)`` padded (head dims to a power of two ≥ 16,
    time to whole chunks), with b the chunk-local cumulative log gate (of the gates raised to
    ``gate_lower_bound``), the document rows (or None) and the statics."""
    b, t, _, d = q.shape
    hv, e = v.shape[2:]
    check_gate_lower_bound(gate_lower_bound)  # a positive one would pick factored forms the gates break
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Pallas kernels take bf16, fp16 or fp32 inputs, got q.dtype={q.dtype}")
    dp, ep = pad_dim(d), pad_dim(e)
    cfg = config or default_config(
        batch=b,
        value_heads=hv,
        seq_len=t,
        value_dim=ep,
        key_dim=dp,
        per_channel=g is not None and g.ndim == 4,
        interpret=interpret,
        dtype=dtype,
    )
    if t > piece_len(q, v, cfg.chunk):
        raise ValueError(f"inputs too large for int32 offsets: q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)}")
    tp = -(-t // (cfg.chunk * cfg.splits)) * cfg.chunk * cfg.splits

    def pad(x, width=None):
        pads = [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2)
        if width is not None:
            pads[-1] = (0, width - x.shape[-1])
        return jnp.pad(x, pads)

    q, k, v = pad(q.astype(dtype), dp), pad(k.astype(dtype), dp), pad(v.astype(dtype), ep)
    beta = jnp.swapaxes(pad(beta.astype(F32)), 1, 2)
    mode, gate = "none", None
    g = floor_gates(g, gate_lower_bound)
    if g is not None and g.ndim == 3:
        mode, gate = "scalar", chunk_cumsum(jnp.swapaxes(pad(g.astype(F32)), 1, 2), cfg.chunk, axis=2)
    elif g is not None:
        g = pad(g.astype(F32), dp)
        gate = (
            channel_chunk_cumsum(g, chunk=cfg.chunk, interpret=interpret)
            if cfg.cumsum_kernel
            else chunk_cumsum(g, cfg.chunk, axis=1)
        )
        mode = "channel"
    if initial_state is None:
        s0 = jnp.zeros((b, hv, dp, ep), F32)
    else:
        s0 = jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, dp - d), (0, ep - e)))
    docs = document_rows(segment_ids, tp)
    # fp16 inputs keep the exact kernels whatever the gates (``products.factored_diagonals_allowed``)
    floor = None if dtype == jnp.float16 or gate_lower_bound is None else float(gate_lower_bound)
    statics = Statics(scale=scale, mode=mode, cfg=cfg, interpret=interpret, gate_floor=floor)
    return (q, k, v, beta, gate, s0), docs, statics


def document_rows(segment_ids, padded_len):
    """``(doc, prev)`` ``[B, T']`` int32: each token's document number (the padding continues the
    last document) and that of the token before it; None without segment ids."""
    if segment_ids is None:
        return None
    t = segment_ids.shape[1]
    doc = jnp.pad(document_index(segment_ids), ((0, 0), (0, padded_len - t)), mode="edge")
    return doc, jnp.concatenate([doc[:, :1], doc[:, :-1]], axis=1)
