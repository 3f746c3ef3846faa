"""Linear attention with per-key-channel decay (GLA) as Pallas kernels lowered to Triton: the forward
pass, its ``custom_vjp``, and the call split at its entering state (sequence parallelism).

Computes exactly ``reference.recurrent`` with ``g [B, T, H, D]`` (notes/design.md §6): per query head
h (reading key/value head ``h // (H // Hk)``), ``S_t = diag(exp g_t) S_{t−1} + k_tᵀ v_t``,
``o_t = scale · q_t S_t``, the state float32. Inputs bf16, fp16 or fp32, every product accumulated in
float32 (bf16/fp16 operands on the tensor cores), the output in q's dtype. Chunks of C tokens, each
row cut into runs of whole chunks (``cfg.splits``; ``channel_common`` says how they combine):

1. ``state`` (one program per value block, run and head; the sequential part): walks the run's
   chunks from a zero state, ``S ← e^{b_last} ⊙ S + (e^{b_last − b} ⊙ K)ᵀ V``, storing each chunk's
   local entering state (operand dtype), the log decay across each chunk and the run's local final
   state.
2. ``scan`` (float32, over runs): each run's entering state and the final state.
3. ``output`` (one program per chunk, run and head): with the chunk's true entering state
   ``h = h_local + e^{a} ⊙ S_run``, ``O = scale · [(e^b ⊙ Q) h + (Q Kᵀ ⊙ Γ ⊙ causal) V]``; the
   scores by secondary chunking (16-row sub-tiles: between two, a product of factors around a
   reference row, both ≤ 1; inside a diagonal one, the ``[16, 16, cols]`` pairs, or where every
   sub-tile of the input allows it one product around its middle row: ``statics.mode``), walking the key
   columns in blocks (``cfg.block_cols``). It stores the scores ``Q Kᵀ ⊙ Γ`` (operand dtype, a
   ``[C, C]`` block per chunk) for the backward's ``dV``.

Every kernel reads g itself and forms the chunk-local cumulative log decay b from it (float32, in
token order), and the backward writes dg (no pass over g or dg outside the kernels). The backward
(``pallas_triton_channel_vjp``) reads the stored states and scores. Head dims are padded to a power
of two ≥ 16 and the time to whole chunks × runs (zero q, k, v and log decay: exact) outside the
``custom_vjp``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, KERNEL_DTYPES, MAX_ELEMENTS, chain_pieces, dot, pad_dim
from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule.common import last_row
from pallas_kernels.gated_delta_rule.layout import (
    compiler_params,
    from_splits,
    load_col_tiles,
    load_doc_tiles,
    load_docs,
    load_tiles,
    store_tiles,
    to_splits,
    zero_blocks,
)
from pallas_kernels.gated_delta_rule.pallas_triton import document_rows
from pallas_kernels.gated_delta_rule.products import by_gates, gate_case
from pallas_kernels.linear_attention import pallas_triton_channel_vjp as vjp
from pallas_kernels.linear_attention.channel_common import (
    MODE,
    ChannelStatics,
    ChunkLogs,
    Layout,
    chunk_kernel,
    chunk_logs,
    cumulative_gates,
    cumulative_tiles,
    doc_inputs,
    full_state_rows,
    pregated_inputs,
    run_pass,
    run_scan,
    state_update,
)
from pallas_kernels.linear_attention.config import ChannelConfig, default_channel_config

# ---- kernels ------------------------------------------------------------------------------------


def _state_kernel(k_ref, v_ref, g_ref, *refs, has_docs, mxu, chunk, num_chunks, pregated=False):
    """The forward pass over one (value block, run, head) from a zero state: each chunk's local
    entering state, the log decay across each chunk and the run's local final state. ``pregated``:
    ``k_ref`` holds the gated keys and ``g_ref`` each chunk's decay ``[NC, D]`` (``pregated_inputs``,
    which gives the log decays too)."""
    refs = list(refs)
    doc_refs = (refs.pop(0), refs.pop(0)) if has_docs else None
    h_ref, *across_ref, m_ref = refs

    def body(c, state):
        t0 = pl.multiple_of(c * chunk, chunk)
        h_ref[c] = state.astype(h_ref.dtype)
        rows = pl.ds(t0, chunk)
        if pregated:
            update = dot(k_ref[rows, :], v_ref[rows, :].astype(mxu), trans_a=True)
            return common.decay_state(state, g_ref[c, :]) + update
        (b,) = cumulative_tiles([g_ref[rows, :]])
        across_ref[0][c] = last_row(b)
        docs = load_docs(doc_refs, t0, chunk)
        return state_update(state, k_ref[rows, :], v_ref[rows, :], b, docs, mxu)

    m_ref[...] = lax.fori_loop(0, num_chunks, body, jnp.zeros(m_ref.shape, F32))


def _output_kernel(
    q_ref, k_ref, v_ref, g_ref, *refs, has_docs, mxu, scale, parts, block_cols, stacked=False, mode=MODE
):
    """The output of one chunk and its scores, walking the key columns in blocks (the scores and
    ``(e^b ⊙ Q) h`` are sums over them); ``stacked``: the off-diagonal score blocks by whole-chunk
    products (``ChannelConfig.stacked_pairs``)."""
    refs = list(refs)
    doc_refs = (refs.pop(0), refs.pop(0)) if has_docs else None
    h_ref, s_run_ref, enter_ref, o_ref, z_ref = refs
    docs = load_doc_tiles(doc_refs, parts)
    width = block_cols

    def add_columns(j, carry):
        z, inter = carry
        start = pl.multiple_of(j * width, width)
        cols = pl.ds(start, width)
        q, k = load_col_tiles(q_ref, parts, start, width), load_col_tiles(k_ref, parts, start, width)
        whole = None
        if stacked and parts > 1:  # the tiles' b cut from the whole chunk's, so both sides agree
            (b_whole,) = cumulative_tiles([g_ref[:, cols]])
            b, whole = common.split_rows(b_whole, parts), (q_ref[:, cols], b_whole)
        else:
            b = cumulative_tiles(load_col_tiles(g_ref, parts, start, width))
        z = common.add_blocks(z, common.score_blocks(q, k, b, docs, mode=mode, mxu=mxu, parts=parts, whole=whole))
        h_rows = full_state_rows(h_ref[cols, :], enter_ref[cols], s_run_ref[cols, :])
        part = common.output_inter(q, b, docs, h_rows, mxu=mxu, parts=parts)
        return z, [a + c for a, c in zip(inter, part, strict=True)]

    rows = q_ref.shape[0] // parts
    init = (zero_blocks(parts, rows), [jnp.zeros((rows, v_ref.shape[1]), F32) for _ in range(parts)])
    z, inter = lax.fori_loop(0, q_ref.shape[1] // width, add_columns, init)
    store_tiles(o_ref, common.output_combine(z, inter, load_tiles(v_ref, parts), scale=scale, mxu=mxu))
    for (i, j), block in z.items():  # the lower blocks only: the backward reads no others
        z_ref[pl.ds(i * rows, rows), pl.ds(j * rows, rows)] = block.astype(z_ref.dtype)


# ---- the calls ------------------------------------------------------------------------------------


def local_states(k, v, g, docs, lay: Layout, statics: ChannelStatics, b=None):
    """Stage 1: ``(h_local [R, H, NC, D, E] operand dtype, log decay across each chunk [R, H, NC, D],
    local final state [R, H, D, E])``, float32 but h_local. ``b``: g's ``cumulative_gates`` if the
    caller has them (the pregated passes read them; formed here otherwise)."""
    pregated, name = statics.cfg.pregated_state, "linear_attention_channel_state"
    kernel = functools.partial(
        _state_kernel,
        has_docs=docs is not None and not pregated,
        mxu=lay.mxu,
        chunk=lay.chunk,
        num_chunks=lay.num_chunks,
        pregated=pregated,
    )
    if not pregated:
        return run_pass(kernel, k, v, g, docs, lay, statics, kv=True, logs=True, name=name)
    b = cumulative_gates(g, statics) if b is None else b
    keys, gamma, across = pregated_inputs(k, b, docs, lay, queries=False)
    h_local, m = run_pass(kernel, keys, v, gamma, None, lay, statics, kv=True, logs=False, name=name, pregated=True)
    return h_local, across, m


def output(q, k, v, g, docs, h_local, s_run, enter, lay: Layout, statics: ChannelStatics):
    """Stage 3: ``(o [R, T, H, E] in q's dtype, scores [R, T, H, C] operand dtype)``."""
    e, has_docs = lay.value_dim, docs is not None
    return pl.pallas_call(
        functools.partial(
            chunk_kernel(_output_kernel, lay, statics, has_docs=has_docs),
            parts=lay.output_parts,
            stacked=statics.cfg.stacked_pairs,
            mode=statics.mode,
        ),
        grid=lay.chunk_grid(),
        in_specs=[
            *lay.chunk_input_specs(has_docs=has_docs),
            lay.chunk_state_spec(),
            lay.run_state_spec(),
            lay.chunk_log_spec(),
        ],
        out_specs=[lay.chunk_spec(e), lay.chunk_spec(lay.chunk)],
        out_shape=[lay.per_head_shape(e, q.dtype), lay.per_head_shape(lay.chunk, lay.mxu)],
        compiler_params=compiler_params(statics.cfg, "chunk"),
        interpret=statics.interpret,
        name="linear_attention_channel_output",
    )(q, k, v, g, *doc_inputs(docs), h_local, s_run, enter)


class Local(NamedTuple):
    """What the forward computes before its entering state is known: each chunk's local entering
    state, each run's local final state, and the decays across chunks and runs."""

    h_local: jax.Array
    m: jax.Array
    logs: ChunkLogs


def forward_local(q, k, v, g, docs, statics: ChannelStatics, b=None) -> Local:
    lay = Layout(q, k, v, statics.cfg)
    h_local, across, m = local_states(k, v, g, docs, lay, statics, b)
    return Local(h_local, m, chunk_logs(across, docs, lay.chunk))


def forward_finish(q, k, v, g, docs, local: Local, s0, statics: ChannelStatics, case=None):
    """``(o, final state, residual states)`` from the initial state ``s0`` ``[B, H, D, E]``; the
    output kernel in the form ``case`` (``gate_case``) names (``by_gates``), each form on the layout of
    its own config (the output kernel's sub-tiles differ between them)."""
    s_run, final = run_scan(local.m, local.logs.run, s0, statics.cfg.splits, reverse=False, interpret=statics.interpret)

    def form(st):
        return output(q, k, v, g, docs, local.h_local, s_run, local.logs.enter, Layout(q, k, v, st.cfg), st)

    o, z = by_gates(case, statics, form)
    return o, final, vjp.States(local.h_local, s_run, local.logs, z)


class Residuals(NamedTuple):
    """What the backward reads: the padded inputs on runs and the forward's states and scores."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    docs: tuple | None
    states: vjp.States


# The output kernel and the gradient kernels form the diagonal sub-tiles' products; where every
# sub-tile allows it (``gate_case``) they run factored (mode "channel_bounded"), else exact: one
# lax.switch around each (``by_gates`` inside ``forward_finish`` and ``vjp.backward_finish``), as the
# gated delta rule's kernels do; with ``ChannelConfig.output_rows`` the output kernel has a third form
# (factored on its larger tiles). The state passes and the scans over runs form no such products.


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def _linear_attention(q, k, v, g, s0, docs, statics: ChannelStatics):
    return _linear_attention_fwd(q, k, v, g, s0, docs, statics)[0]  # the residuals unused: XLA drops them


def _linear_attention_fwd(q, k, v, g, s0, docs, statics: ChannelStatics):
    b = cumulative_gates(g, statics)  # one kernel for the gate check and the pregated passes
    case, local = gate_case(b, statics, q.dtype), forward_local(q, k, v, g, docs, statics, b)
    o, final, states = forward_finish(q, k, v, g, docs, local, s0, statics, case)
    return (o, final), (Residuals(q, k, v, g, docs, states), case)


def _linear_attention_bwd(statics: ChannelStatics, res, cotangents):
    do, d_final = cotangents
    res, case = res
    pending = vjp.backward_local(res.q, res.g, res.docs, do, statics=statics)
    grads = vjp.backward_finish(
        res.q, res.k, res.v, res.g, res.docs, res.states, pending, d_final, statics=statics, case=case
    )
    return (*grads, None)  # document numbers are integers: no cotangent


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)


# ---- public function ------------------------------------------------------------------------------


def supports(q, k, v) -> bool:
    """Whether the GPU kernels take these inputs: dtypes, and one chunk under the int32 offsets of the
    default tiling (any length: see ``piece_len``)."""
    b, t, h, _ = q.shape
    cfg = default_channel_config(
        batch=b,
        heads=h,
        seq_len=t,
        value_dim=pad_dim(v.shape[-1]),
        interpret=False,
        dtype=q.dtype,
        key_dim=pad_dim(q.shape[-1]),
    )
    return all(x.dtype in KERNEL_DTYPES for x in (q, k, v)) and piece_len(q, v, cfg) > 0


def piece_len(q, v, cfg: ChannelConfig) -> int:
    """The longest run of tokens (whole chunks) whose arrays have int32 element offsets under ``cfg``.

    Time is padded to whole chunks × runs; the per-chunk states (``D·E / C`` elements per token and
    head) are the largest arrays unless a head dim or the chunk is wider. Longer inputs run as pieces
    of this many tokens, the state chained from piece to piece.
    """
    b, _, h, d = q.shape
    dp, ep = pad_dim(d), pad_dim(v.shape[-1])
    per_token = b * h * max(dp, ep, cfg.chunk, -(-dp * ep // cfg.chunk))
    return max(0, (MAX_ELEMENTS // per_token - cfg.chunk * cfg.splits) // cfg.chunk * cfg.chunk)


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    g: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
    config: ChannelConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-channel-decay linear attention through the Pallas Triton kernels; equals ``reference.recurrent``.

    Args:
      q ``[B, T, H, D]``, k ``[B, T, Hk, D]``, v ``[B, T, Hk, E]`` (``H % Hk == 0``) in bf16, fp16 or
      fp32; g ``[B, T, H, D]`` log decay per query head and key channel (≤ 0); scale (default
      ``D ** -0.5``); initial_state ``[B, H, D, E]``; segment_ids ``[B, T]`` integer document ids of
      packed rows (the state resets where the id changes); interpret: run the kernels in the Pallas
      interpreter (CPU); config: tiling (default: a heuristic).

    Returns:
      ``(o [B, T, H, E] in q's dtype, final_state [B, H, D, E] float32)``, differentiable in q, k, v,
      g and initial_state.

    Arguments are assumed validated by ``api.validate`` (the public entry point).
    """
    t, d, e = q.shape[1], q.shape[-1], v.shape[-1]
    statics = _statics(q, k, v, scale=scale, interpret=interpret, config=config)
    piece = piece_len(q, v, statics.cfg)
    if piece < t:  # longer than int32 offsets allow: pieces, the state chained (notes/design.md §2)
        kw = dict(scale=scale, interpret=interpret, config=config)
        return chain_pieces(
            lambda q, k, v, g, **state: linear_attention(q, k, v, g=g, **kw, **state),
            (q, k, v, g),
            piece=piece,
            initial_state=initial_state,
            segment_ids=segment_ids,
        )
    q_, k_, v_, g_ = _prepare(q, k, v, g, statics)
    docs = _document_runs(segment_ids, q_.shape[1] * statics.cfg.splits, statics.cfg.splits)
    s0 = _padded_state(initial_state, q_, v_, q.shape[0])
    o, final = _linear_attention(q_, k_, v_, g_, s0, docs, statics=statics)
    return from_splits(o, statics.cfg.splits)[:, :t, :, :e], final[:, :, :d, :e]


def _statics(q, k, v, *, scale, interpret, config) -> ChannelStatics:
    """The statics of a call; raises on inputs the kernels cannot run."""
    b, t, h, d = q.shape
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Pallas kernels take bf16, fp16 or fp32 inputs, got q.dtype={q.dtype}")
    cfg = config or default_channel_config(
        batch=b,
        heads=h,
        seq_len=t,
        value_dim=pad_dim(v.shape[-1]),
        interpret=interpret,
        dtype=dtype,
        key_dim=pad_dim(d),
    )
    if piece_len(q, v, cfg) <= 0:
        raise ValueError(f"inputs too large for int32 offsets: q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)}")
    return ChannelStatics(scale=float(d**-0.5 if scale is None else scale), cfg=cfg, interpret=interpret)


def _prepare(q, k, v, g, statics: ChannelStatics):
    """Kernel inputs on runs ``(q, k, v, g)``: head dims padded to a power of two ≥ 16, time to
    whole chunks × runs (zeros: no decay), each row cut into runs; g keeps its dtype."""
    t, d, e = q.shape[1], q.shape[-1], v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    cfg = statics.cfg
    dp, ep = pad_dim(d), pad_dim(e)
    tp = -(-t // (cfg.chunk * cfg.splits)) * cfg.chunk * cfg.splits

    def pad(x, width):
        return jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, width - x.shape[-1])))

    padded = (pad(q.astype(dtype), dp), pad(k.astype(dtype), dp), pad(v.astype(dtype), ep), pad(g, dp))
    return tuple(to_splits(x, cfg.splits) for x in padded)


def _padded_state(state, q, v, batch: int):
    """The ``[B, H, D', E']`` float32 initial state padded to the kernels' head dims (zeros if None)."""
    dp, ep = q.shape[-1], v.shape[-1]
    if state is None:
        return jnp.zeros((batch, q.shape[2], dp, ep), F32)
    d, e = state.shape[-2:]
    return jnp.pad(state.astype(F32), ((0, 0), (0, 0), (0, dp - d), (0, ep - e)))


def _document_runs(segment_ids, padded_len: int, splits: int):
    """The ``(doc, prev)`` rows (``gated_delta_rule``'s ``document_rows``) cut into runs, or None."""
    docs = document_rows(segment_ids, padded_len)
    return None if docs is None else tuple(to_splits(x, splits) for x in docs)


# ---- the call split at its entering state (for sequence parallelism) ------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q", "k", "v", "g", "docs", "unpad", "gate_case"],
    meta_fields=["statics", "shape"],
)
@dataclasses.dataclass(frozen=True)
class SplitCall:
    """One call whose initial state comes later (``split_forward``): the inputs on runs, the pullback
    of the padding (and of the cumulative sum of g), the statics and the unpadded ``(B, T, D, E)``."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    docs: tuple | None
    unpad: object
    statics: ChannelStatics
    shape: tuple
    gate_case: jax.Array | None = None  # ``gate_case(b)``: the same kernels forward and backward

    def unpadded(self, state):
        _, _, d, e = self.shape
        return state[:, :, :d, :e]

    def padded(self, state):
        return _padded_state(state, self.q, self.v, self.shape[0])

    def zero_state(self):
        return self.padded(None)


def split_forward(q, k, v, *, g, g_gamma=None, scale=None, segment_ids=None, interpret=False, config=None):
    """The part of a call that needs no initial state: ``(M, call, local)``, as
    ``pallas_triton.split_forward`` (the same calling convention, ``g [B, T, H, D]``).

    ``M`` ``[B, H, D, E]`` float32 is the state the call's tokens build from a zero state (with
    ``segment_ids``: that of the last document); the state after the call from an entering state S
    is ``e^{Σ g} ⊙ S + M`` (per key channel). ``finish_forward(call, local, S)`` gives the output.
    Beyond the single call's kernels this costs one float32 scan over runs.
    """
    if g_gamma is not None:
        raise ValueError("the per-channel kernels take g [B, T, H, D], not g_gamma")
    statics = _statics(q, k, v, scale=scale, interpret=interpret, config=config)
    splits = statics.cfg.splits
    (qp, kp, vp, gp), unpad = jax.vjp(lambda q, k, v, g: _prepare(q, k, v, g, statics), q, k, v, g)
    docs = _document_runs(segment_ids, qp.shape[1] * splits, splits)
    shape = (q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    b = cumulative_gates(gp, statics)
    call = SplitCall(qp, kp, vp, gp, docs, unpad, statics, shape, gate_case=gate_case(b, statics, qp.dtype))
    local = forward_local(qp, kp, vp, gp, docs, statics, b)
    _, m = run_scan(local.m, local.logs.run, call.zero_state(), splits, reverse=False, interpret=interpret)
    return call.unpadded(m), call, local


def finish_forward(call: SplitCall, local: Local, initial_state):
    """``(o [B, T, H, E], states)`` from ``split_forward``'s call and the initial state; ``states``
    are what ``split_backward`` needs."""
    _, t, _, e = call.shape
    s0 = call.padded(initial_state)
    o, _, states = forward_finish(call.q, call.k, call.v, call.g, call.docs, local, s0, call.statics, call.gate_case)
    return from_splits(o, call.statics.cfg.splits)[:, :t, :, :e], states


def split_backward(call: SplitCall, states: vjp.States, do):
    """The part of the backward that needs no final-state cotangent: ``(dM, pending)``.

    ``dM`` ``[B, H, D, E]`` is the initial state's cotangent from ``do`` alone (with
    ``segment_ids``: from the tokens of the first document); ``finish_backward`` completes it.
    """
    _, t, _, e = call.shape
    splits = call.statics.cfg.splits
    tp = call.q.shape[1] * splits
    do = to_splits(jnp.pad(do, ((0, 0), (0, tp - t), (0, 0), (0, call.v.shape[-1] - e))), splits)
    pending = vjp.backward_local(call.q, call.g, call.docs, do, statics=call.statics)
    _, dm = run_scan(
        pending.dm, states.logs.run, call.zero_state(), splits, reverse=True, interpret=call.statics.interpret
    )
    return call.unpadded(dm), pending


def finish_backward(call: SplitCall, states: vjp.States, pending: vjp.LocalCotangents, d_final):
    """Cotangents ``(dq, dk, dv, dg, None, d initial_state)`` given the final state's cotangent (the
    scalar kernels' order; None stands for ``g_gamma``'s)."""
    dq, dk, dv, dg, ds0 = vjp.backward_finish(
        call.q,
        call.k,
        call.v,
        call.g,
        call.docs,
        states,
        pending,
        call.padded(d_final),
        statics=call.statics,
        case=call.gate_case,
    )
    return (*call.unpad((dq, dk, dv, dg)), None, call.unpadded(ds0))
