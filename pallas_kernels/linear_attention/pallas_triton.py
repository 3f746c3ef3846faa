"""Chunked causal linear attention as Pallas kernels lowered to Triton: the forward pass.

Computes exactly ``reference.recurrent`` (notes/design.md §1): ``S_t = exp(g_t) S_{t-1} + k_tᵀ v_t``,
``o_t = scale · q_t S_t``, with the state S ``[D, E]`` in float32. Inputs in bf16, fp16 or fp32,
every product accumulated in float32 (bf16/fp16 operands on the tensor cores; float32 inputs
use exact float32 products), the output in q's dtype.

Parallel layout (LASP inside one GPU, arXiv 2404.02882): each (batch row, head) is cut into
splits, runs of whole chunks of C tokens, one per program.

1. ``split_state`` (one program per row, head, split and value block): the state the split's
   tokens build from a zero state, ``M_s = Σ_j exp(b_end − b_j) k_jᵀ v_j``.
2. ``state_scan`` (one program per D×E tile, row and head): the float32 prefix over splits,
   ``S_in(s + 1) = exp(l_s) S_in(s) + M_s`` from ``S_in(0) = initial_state`` (``l_s`` the
   split's log decay), gives each split's entering state and the final state.
3. ``chunk_output`` (same grid): walks the split's chunks from ``S_in(s)``:
   ``O = ((Q Kᵀ) ⊙ M) V + (exp(b) ⊙ Q) S`` and ``S ← exp(b_{C−1}) S + (exp(b_{C−1} − b) ⊙ K)ᵀ V``.

Only the split entering states (float32 ``[B, H, splits + 1, D, E]``) are kept for the backward
pass (``pallas_triton_vjp``), which mirrors this layout. Grouped heads are read through the
index maps (query head h reads key/value head ``h // (H // Hk)``); head dims are padded to a
power of two ≥ 16 and the time axis to whole chunks (zeros with zero log decay are exact),
outside the ``custom_vjp`` so autodiff slices the gradients back. What the forward and backward
share (chunk math, layout, statics, the prefix scan) is in ``common``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (
    F32,
    KERNEL_DTYPES,
    MAX_ELEMENTS,
    chain_pieces,
    dot,
    is_two_byte,
    kernel_width,
    pad_dim,
)
from pallas_kernels.linear_attention import pallas_triton_vjp, reference
from pallas_kernels.linear_attention.common import (
    ChunkWalk,
    DecayMode,
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
from pallas_kernels.linear_attention.config import BlockConfig, default_config

# ---- forward kernels ------------------------------------------------------------------------


def _split_state_kernel(*refs, walk: ChunkWalk, last_token):
    """M_s = Σ_j exp(b_end − b_j) k_jᵀ v_j over the split's tokens, from a zero state.

    Token ``last_token`` (≥ 0) is left out: the caller adds its ``k_tᵀ v_t`` to the final state
    itself, so that the state before it stays available for the decay gradient.
    """
    k_ref, v_ref, *refs = refs
    decay_ref, doc_refs = walk.pop_inputs(refs)
    (m_ref,) = refs
    chunk, mxu_dtype = walk.chunk, walk.mxu_dtype
    first, count = walk.split_bounds()

    def body(i, state):
        t0 = pl.multiple_of((first + i) * chunk, chunk)
        b, b_last = walk.decay(decay_ref, t0)
        docs = walk.docs(doc_refs, t0)
        k = k_ref[pl.ds(t0, chunk), :]
        v = v_ref[pl.ds(t0, chunk), :]
        v_to_end = row_scale(v, None if b is None else b_last - b, same_doc(docs, "last"))
        if last_token >= 0:
            pos = t0 + lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
            v_to_end = jnp.where(pos == last_token, 0.0, v_to_end.astype(F32))
        update = dot(k.astype(mxu_dtype), v_to_end.astype(mxu_dtype), trans_a=True)
        return update + carry_scale(state, b_last, docs)

    m_ref[...] = lax.fori_loop(0, count, body, jnp.zeros(m_ref.shape, F32))


def _chunk_output_kernel(*refs, walk: ChunkWalk, scale):
    """o for the split's chunks, carrying the float32 state from the split's entering state."""
    q_ref, k_ref, v_ref, *refs = refs
    decay_ref, doc_refs = walk.pop_inputs(refs)
    s_in_ref, o_ref = refs
    chunk, mxu_dtype = walk.chunk, walk.mxu_dtype
    first, count = walk.split_bounds()

    def body(i, state):
        t0 = pl.multiple_of((first + i) * chunk, chunk)
        b, b_last = walk.decay(decay_ref, t0)
        docs = walk.docs(doc_refs, t0)
        q = q_ref[pl.ds(t0, chunk), :]
        k = k_ref[pl.ds(t0, chunk), :]
        v = v_ref[pl.ds(t0, chunk), :].astype(mxu_dtype)
        scores = dot(q, k, trans_b=True) * decay_mask(b, chunk=chunk, docs=docs)
        # row scalings commute with the matmuls: decay the [C, block] products, not the operands
        inter = row_scale(dot(q, state.astype(mxu_dtype)), b, same_doc(docs, "prev"))
        o = dot(scores.astype(mxu_dtype), v) + inter
        o_ref[pl.ds(t0, chunk), :] = (scale * o).astype(o_ref.dtype)
        v_to_end = row_scale(v, None if b is None else b_last - b, same_doc(docs, "last")).astype(mxu_dtype)
        update = dot(k, v_to_end, trans_a=True)
        return update + carry_scale(state, b_last, docs)

    lax.fori_loop(0, count, body, s_in_ref[...])


# ---- the forward pass -----------------------------------------------------------------------


def _split_states(q, k, v, g, gamma, docs, statics: Statics):
    """Stage 1: the state each split builds from a zero state ``[B, H, splits, D, E]``."""
    lay = Layout(q, k, v, statics.cfg)
    d, e = lay.dim, lay.value_dim
    block_e = min(statics.cfg.block_e, e)
    decay, decay_specs = decay_inputs(g, gamma, docs, lay, statics.mode)
    walk = lay.walk(statics.mode, q.dtype, has_docs=docs is not None, last_token=statics.last_token)
    return pl.pallas_call(
        functools.partial(_split_state_kernel, walk=walk, last_token=statics.last_token),
        grid=lay.grid(e // block_e),
        in_specs=[lay.seq_spec(d, kv=True), lay.seq_spec(e, kv=True, block=block_e), *decay_specs],
        out_specs=lay.state_spec(d, block_e),
        out_shape=jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.num_splits, d, e), F32),
        compiler_params=compiler_params(statics.cfg),
        interpret=statics.interpret,
        name="linear_attention_segment_state",  # the name profiles know
    )(k, v, *decay)


def _with_last_token(state, k, v, lay: Layout, last_token):
    """Adds token ``last_token``'s own ``kᵀ v`` (kept out of the saved states, see _forward)."""
    if last_token < 0:
        return state
    k_last = jnp.repeat(k[:, last_token].astype(F32), lay.group, axis=1)
    v_last = jnp.repeat(v[:, last_token].astype(F32), lay.group, axis=1)
    return state + k_last[..., :, None] * v_last[..., None, :]


def _outputs(q, k, v, g, gamma, docs, local, s0, statics: Statics):
    """Stages 2–3: entering states from ``s0`` and the output; (o, final state, states)."""
    lay = Layout(q, k, v, statics.cfg)
    d, e = lay.dim, lay.value_dim
    block_e = min(statics.cfg.block_e, e)
    decay, decay_specs = decay_inputs(g, gamma, docs, lay, statics.mode)
    walk = lay.walk(statics.mode, q.dtype, has_docs=docs is not None, last_token=statics.last_token)
    split_log = split_log_decay(g, gamma, lay, docs, last_token=statics.last_token)
    states = state_scan(local, split_log, s0, reverse=False, interpret=statics.interpret)
    o = pl.pallas_call(
        functools.partial(_chunk_output_kernel, walk=walk, scale=statics.scale),
        grid=lay.grid(e // block_e),
        in_specs=[
            lay.seq_spec(d),
            lay.seq_spec(d, kv=True),
            lay.seq_spec(e, kv=True, block=block_e),
            *decay_specs,
            lay.state_spec(d, block_e),
        ],
        out_specs=lay.seq_spec(e, block=block_e),
        out_shape=jax.ShapeDtypeStruct((lay.batch, lay.seq_len, lay.heads, e), q.dtype),
        compiler_params=compiler_params(statics.cfg),
        interpret=statics.interpret,
        name="linear_attention_chunk_output",
    )(q, k, v, *decay, states)
    return o, _with_last_token(states[:, :, -1], k, v, lay, statics.last_token), states


def _forward(q, k, v, g, gamma, s0, docs, statics: Statics):
    """(o, final state, entering states ``[B, H, splits + 1, D, E]``).

    The last entry of the states is the final state without token ``last_token``'s own
    ``kᵀ v`` (when ``last_token`` ≥ 0): the decay gradient needs it (see the backward).
    """
    local = _split_states(q, k, v, g, gamma, docs, statics)
    return _outputs(q, k, v, g, gamma, docs, local, s0, statics)


class Residuals(NamedTuple):
    """What the forward keeps for the backward: the padded inputs and the split entering states."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array | None
    gamma: jax.Array | None
    docs: tuple | None
    states: jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def _linear_attention(q, k, v, g, gamma, s0, docs, statics: Statics):
    o, final, _ = _forward(q, k, v, g, gamma, s0, docs, statics)
    return o, final


def _linear_attention_fwd(q, k, v, g, gamma, s0, docs, statics: Statics):
    o, final, states = _forward(q, k, v, g, gamma, s0, docs, statics)
    return (o, final), Residuals(q, k, v, g, gamma, docs, states)


def _linear_attention_bwd(statics: Statics, residuals: Residuals, cotangents):
    do, d_final = cotangents
    grads = pallas_triton_vjp.backward(*residuals, do, d_final, statics=statics)
    return (*grads, None)  # document numbers are integers: no cotangent


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)


# ---- public function ------------------------------------------------------------------------


def supports(q, k, v) -> bool:
    """Whether the GPU kernels take these inputs: dtypes (any length: see ``piece_len``)."""
    return all(x.dtype in KERNEL_DTYPES for x in (q, k, v)) and piece_len(q, v) > 0


# the widest padded head the default tiles are known to launch at (H200, session 21: 256 in bf16 and
# float32 with ``split_dkdv``; nothing wider was tried)
MAX_KERNEL_WIDTH = 256


def fits_shared_memory(q, v) -> bool:
    """Whether the compiled kernels' default tiles are known to fit a GPU's shared memory: padded
    heads up to ``MAX_KERNEL_WIDTH`` wide (``config.default_config`` splits dk / dv past 128). The
    interpreter has no such limit."""
    return kernel_width(q, v) <= MAX_KERNEL_WIDTH


def compiled_kernels_take(q, k, v) -> bool:
    """Whether ``impl="auto"`` may run the compiled kernels on these inputs: ``supports`` (dtypes,
    int32 offsets), ``fits_shared_memory`` (the default tiles' width), and past 128 only bf16/fp16:
    float32 heads of 256 launch but take exact float32 products on the FMA units, 52.71 ms fwd+bwd
    at (1, 4096, 8, 256) against 4.54 for the XLA path (H200, session 21)."""
    narrow = kernel_width(q, v) <= 128
    two_byte = is_two_byte(jnp.result_type(q.dtype, k.dtype, v.dtype))
    return supports(q, k, v) and fits_shared_memory(q, v) and (narrow or two_byte)


def piece_len(q, v) -> int:
    """The longest run of tokens whose padded tensors have int32 element offsets: a multiple of 128
    (so padding to whole chunks of up to 128 tokens never lengthens it) whose ``[B, T, H, D]``
    tensors' largest element offset, ``B·T·H·D − 1``, is at most ``MAX_ELEMENTS``. TNL-1B's million
    tokens (``1 · 2²⁰ · 16 · 128 = 2³¹`` elements) run as one call.

    Longer inputs run as pieces of this many tokens, the state chained from piece to piece.
    """
    b, _, h, _ = q.shape
    per_token = b * h * kernel_width(q, v)
    return max(0, (MAX_ELEMENTS + 1) // per_token // 128 * 128)


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    g: jax.Array | None = None,
    g_gamma: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
    config: BlockConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal linear attention through the Pallas Triton kernels; equals ``reference.recurrent``.

    Args:
      q ``[B, T, H, D]``, k ``[B, T, Hk, D]``, v ``[B, T, Hk, E]`` (``H % Hk == 0``), in bf16,
      fp16 or fp32; g ``[B, T, H]`` per-token or g_gamma ``[H]`` per-head log decay (or
      neither); scale (default ``D ** -0.5``); initial_state ``[B, H, D, E]``; segment_ids
      ``[B, T]`` integer document ids of packed rows (the state resets where the id changes);
      interpret: run the kernels in the Pallas interpreter (CPU); config: tiling (default: a
      heuristic).

    Returns:
      ``(o [B, T, H, E] in q's dtype, final_state [B, H, D, E] float32)``, differentiable in
      q, k, v, g, g_gamma and initial_state.

    Arguments are assumed validated by ``api.validate`` (the public entry point).
    """
    t, d, e = q.shape[1], q.shape[-1], v.shape[-1]
    piece = piece_len(q, v)
    if 0 < piece < t:  # longer than int32 offsets allow: pieces, the state chained (notes/design.md §2)
        kw = dict(g_gamma=g_gamma, scale=scale, interpret=interpret, config=config)
        return chain_pieces(
            lambda q, k, v, g, **state: linear_attention(q, k, v, g=g, **kw, **state),
            (q, k, v, g),
            piece=piece,
            initial_state=initial_state,
            segment_ids=segment_ids,
        )
    statics = _statics(q, k, v, g, g_gamma, scale=scale, interpret=interpret, config=config)
    args = _padded_inputs(q, k, v, g, g_gamma, initial_state, statics)
    docs = _document_rows(segment_ids, args[0].shape[1])
    o, final = _linear_attention(*args, docs, statics=statics)
    return o[:, :t, :, :e], final[:, :, :d, :e]


def _statics(q, k, v, g, g_gamma, *, scale, interpret, config) -> Statics:
    """The statics of a call; raises on inputs the kernels cannot run."""
    b, t, h, d = q.shape
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Pallas kernels take bf16, fp16 or fp32 inputs, got q.dtype={q.dtype}")
    if piece_len(q, v) < t:
        raise ValueError(f"inputs too large for int32 offsets: q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)}")
    if not interpret and config is None and not fits_shared_memory(q, v):
        raise ValueError(
            f"the compiled Pallas linear-attention kernels take heads up to {MAX_KERNEL_WIDTH} wide (wider ones "
            f"are padded to a power of two; none wider was tried on a GPU): got q {q.dtype}{tuple(q.shape)}, "
            f"v {v.dtype}{tuple(v.shape)}; use impl='xla' (impl='auto' does), or call pallas_triton.linear_attention "
            "with a config of your own (benchmarks/wide_heads_probe.py tries configs on a GPU)"
        )
    # a constant decay stays [H] at any T (the kernels stop it at the last real token)
    mode: DecayMode = "gamma" if g_gamma is not None else "g" if g is not None else "none"
    shape = dict(grouped=k.shape[2] != h, decay=mode != "none", head_dim=max(d, v.shape[-1]), dtype=dtype)
    cfg = config or default_config(batch=b, heads=h, seq_len=t, interpret=interpret, **shape)
    # with a decay, the last token's own kᵀv is kept out of the saved final state (see _forward)
    last_token = t - 1 if mode != "none" else -1
    scale = float(d**-0.5 if scale is None else scale)
    return Statics(scale=scale, mode=mode, cfg=cfg, interpret=interpret, last_token=last_token)


def _padded_inputs(q, k, v, g, g_gamma, initial_state, statics: Statics):
    """Kernel inputs ``(q, k, v, g [B, H, T'] | None, gamma | None, s0)``: head dims padded to a
    power of two ≥ 16, time to whole chunks, the decay in the form ``statics.mode`` takes."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    dp, ep = pad_dim(d), pad_dim(e)
    tp = -(-t // statics.cfg.chunk) * statics.cfg.chunk

    def pad(x, width):
        x = x.astype(dtype)
        return jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, width - x.shape[-1])))

    gamma = gt = None
    if statics.mode == "gamma":
        gamma = g_gamma.astype(F32)
    elif statics.mode == "g":
        gt = jnp.pad(jnp.swapaxes(g.astype(F32), 1, 2), ((0, 0), (0, 0), (0, tp - t)))
    if initial_state is None:
        s0 = jnp.zeros((b, h, dp, ep), F32)
    else:
        s0 = jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, dp - d), (0, ep - e)))
    return pad(q, dp), pad(k, dp), pad(v, ep), gt, gamma, s0


def _document_rows(segment_ids, padded_len):
    """``(doc, prev)`` ``[B, T']`` int32: each token's document number (the padding continues the
    last document) and that of the token before it; None without segment ids."""
    if segment_ids is None:
        return None
    t = segment_ids.shape[1]
    doc = jnp.pad(reference.document_index(segment_ids), ((0, 0), (0, padded_len - t)), mode="edge")
    return doc, jnp.concatenate([doc[:, :1], doc[:, :-1]], axis=1)


# ---- the call split at its initial state (for sequence parallelism) ----------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q", "k", "v", "g", "gamma", "docs", "split_log", "unpad"],
    meta_fields=["statics", "shape"],
)
@dataclasses.dataclass(frozen=True)
class SplitCall:
    """One kernel call whose initial state comes later (``split_forward``): padded inputs, the
    log decay across each split, the pullback of the padding, and the statics."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array | None
    gamma: jax.Array | None
    docs: tuple | None
    split_log: jax.Array
    unpad: object
    statics: Statics
    shape: tuple  # (T, D, E) before padding

    def unpadded(self, state):
        _, d, e = self.shape
        return state[:, :, :d, :e]

    def padded(self, state):
        _, d, e = self.shape
        return jnp.pad(state, ((0, 0), (0, 0), (0, self.q.shape[-1] - d), (0, self.v.shape[-1] - e)))


class PendingBackward(NamedTuple):
    """What ``split_backward`` hands ``finish_backward``: the padded ``dO`` and the dq stage."""

    do: jax.Array
    stage: pallas_triton_vjp.DqStage


def split_forward(q, k, v, *, g=None, g_gamma=None, scale=None, segment_ids=None, interpret=False, config=None):
    """The part of a call that needs no initial state: ``(M, call, local)``.

    ``M`` ``[B, H, D, E]`` float32 is the state the call's tokens build from a zero state (with
    ``segment_ids``: that of the last document); the state after the call from an initial state
    ``S`` is ``Γ S + M``. ``finish_forward(call, local, S)`` gives the output. Sequence
    parallelism sends ``M`` to the next rank while nothing else waits, then finishes with the
    state that arrives: no pass over k, v beyond the kernel's own.
    """
    statics = _statics(q, k, v, g, g_gamma, scale=scale, interpret=interpret, config=config)

    def pad(q, k, v, g, g_gamma):
        return _padded_inputs(q, k, v, g, g_gamma, None, statics)[:5]

    (qp, kp, vp, gt, gamma), unpad = jax.vjp(pad, q, k, v, g, g_gamma)
    docs = _document_rows(segment_ids, qp.shape[1])
    lay = Layout(qp, kp, vp, statics.cfg)
    split_log = split_log_decay(gt, gamma, lay, docs, last_token=statics.last_token)
    local = _split_states(qp, kp, vp, gt, gamma, docs, statics)
    # M = Σ_s exp(l_{s+1} + … + l_{S-1}) local[s]: suffix sums, never differences (l may be −inf)
    after = jnp.flip(jnp.cumsum(jnp.flip(split_log[..., 1:], -1), -1), -1)
    after = jnp.concatenate([after, jnp.zeros_like(split_log[..., :1])], -1)
    m = jnp.einsum("bhs,bhsde->bhde", jnp.exp(after), local)
    m = _with_last_token(m, kp, vp, lay, statics.last_token)
    call = SplitCall(qp, kp, vp, gt, gamma, docs, split_log, unpad, statics, (q.shape[1], q.shape[-1], v.shape[-1]))
    return call.unpadded(m), call, local


def finish_forward(call: SplitCall, local, initial_state):
    """``(o [B, T, H, E], states)`` from ``split_forward``'s call and the initial state; ``states``
    are what ``split_backward`` needs."""
    t, _, e = call.shape
    s0 = call.padded(initial_state.astype(F32))
    o, _, states = _outputs(call.q, call.k, call.v, call.g, call.gamma, call.docs, local, s0, call.statics)
    return o[:, :t, :, :e], states


def split_backward(call: SplitCall, states, do):
    """The part of the backward that needs no final-state cotangent: ``(dM, pending)``.

    ``dM`` ``[B, H, D, E]`` is the initial state's cotangent from ``do`` alone (with
    ``segment_ids``: from the tokens of the first document); ``finish_backward`` completes it.
    """
    t, _, e = call.shape
    do = jnp.pad(do, ((0, 0), (0, call.q.shape[1] - t), (0, 0), (0, call.v.shape[-1] - e)))
    stage = pallas_triton_vjp.dq_stage(
        call.q, call.k, call.v, call.g, call.gamma, call.docs, states, do, statics=call.statics
    )
    # dM = Σ_s exp(l_0 + … + l_{s-1}) dm[s]: prefix sums (l may be −inf)
    before = jnp.cumsum(call.split_log[..., :-1], -1)
    before = jnp.concatenate([jnp.zeros_like(call.split_log[..., :1]), before], -1)
    dm = jnp.einsum("bhs,bhsde->bhde", jnp.exp(before), stage.dm)
    return call.unpadded(dm), PendingBackward(do, stage)


def finish_backward(call: SplitCall, states, pending: PendingBackward, d_final):
    """Cotangents ``(dq, dk, dv, dg, dg_gamma, d initial_state)`` given the final state's cotangent."""
    dq, dk, dv, dg, dgamma, ds0 = pallas_triton_vjp.finish(
        call.q,
        call.k,
        call.v,
        call.g,
        call.gamma,
        call.docs,
        states,
        pending.do,
        call.padded(d_final.astype(F32)),
        pending.stage,
        statics=call.statics,
    )
    return (*call.unpad((dq, dk, dv, dg, dgamma)), call.unpadded(ds0))
