"""Chunked causal linear attention as Pallas kernels lowered to Triton: the forward pass.

Computes exactly ``reference.recurrent`` (DESIGN.md §1): ``S_t = exp(g_t) S_{t-1} + k_tᵀ v_t``,
``o_t = scale · q_t S_t``, with the state S ``[D, E]`` in float32. Inputs in bf16, fp16 or fp32,
every product accumulated in float32 (bf16/fp16 operands on the tensor cores; float32 inputs
use exact float32 products), the output in q's dtype.

Parallel layout (LASP inside one GPU, arXiv 2404.02882): each (batch row, head) is cut into
segments of whole chunks of C tokens.

1. ``segment_state`` (one program per row, head, segment and value block): the state the
   segment's tokens build from a zero state, ``M_s = Σ_j exp(b_end − b_j) k_jᵀ v_j``.
2. ``state_scan`` (one program per D×E tile, row and head): the float32 prefix over segments,
   ``S_in(s + 1) = exp(l_s) S_in(s) + M_s`` from ``S_in(0) = initial_state`` (``l_s`` the
   segment's log decay), gives each segment's entering state and the final state.
3. ``chunk_output`` (same grid): walks the segment's chunks from ``S_in(s)``:
   ``O = ((Q Kᵀ) ⊙ M) V + (exp(b) ⊙ Q) S`` and ``S ← exp(b_{C−1}) S + (exp(b_{C−1} − b) ⊙ K)ᵀ V``.

Only the segment entering states (float32 ``[B, H, segments + 1, D, E]``) are kept for the
backward pass (``pallas_triton_vjp``), which mirrors this layout. Grouped heads are read
through the index maps (query head h reads key/value head ``h // (H // Hk)``); head dims are
padded to a power of two ≥ 16 and the time axis to whole chunks (zeros with zero log decay are
exact), outside the ``custom_vjp`` so autodiff slices the gradients back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.linear_attention import reference
from pallas_kernels.linear_attention.config import BlockConfig, default_config, segments

DecayMode = Literal["none", "gamma", "g"]
SUPPORTS_SEGMENT_IDS = True  # packed documents (segment_ids) in the forward and backward kernels
_F32 = jnp.float32
# the Triton lowering computes element offsets in int32
_MAX_ELEMENTS = 2**31 - 1


# ---- chunk math shared by the forward and backward kernels ----------------------------------


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """``a @ b`` (``aᵀ`` / ``bᵀ`` when asked) with float32 accumulation.

    HIGHEST keeps float32 operands exact (jax 0.11's Triton lowering maps DEFAULT to tf32);
    bf16/fp16 operands go to the tensor cores either way.
    """
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=_F32)


def chunk_decay(decay_ref, t0, *, chunk: int, mode: DecayMode):
    """(b, b_last): the chunk's inclusive cumulative log decay ``[C]`` and its last entry.

    ``decay_ref`` holds the chunk-local cumulative sums of g (mode "g") or the head's constant
    log decay (mode "gamma"); mode "none" has no decay and returns ``(None, None)``.
    """
    if mode == "none":
        return None, None
    pos = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    if mode == "gamma":
        gamma = decay_ref[...].astype(_F32)
        return gamma * (pos + 1).astype(_F32), gamma * chunk
    b = decay_ref[pl.ds(t0, chunk)]
    return b, jnp.sum(jnp.where(pos == chunk - 1, b, 0.0))


class Docs(NamedTuple):
    """Document numbers around one chunk of a packed row (``segment_ids`` given).

    ``doc [C]`` of each token, ``prev`` the document of the state entering the chunk (that of the
    token before it; the first document for the row's first chunk) and ``last`` that of the
    chunk's last token. Every decay factor between two positions is multiplied by "same
    document", which resets the state at each boundary exactly (no −inf log decays).
    """

    doc: jax.Array
    prev: jax.Array
    last: jax.Array


def chunk_docs(doc_refs, t0, *, chunk: int) -> Docs | None:
    """The chunk's ``Docs`` from the ``doc`` and ``prev`` rows ``[T]`` (None without segment ids)."""
    if doc_refs is None:
        return None
    doc_ref, prev_ref = doc_refs
    pos = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    doc = doc_ref[pl.ds(t0, chunk)]
    prev = jnp.sum(jnp.where(pos == 0, prev_ref[pl.ds(t0, chunk)], 0))
    return Docs(doc, prev, jnp.sum(jnp.where(pos == chunk - 1, doc, 0)))


def decay_mask(b, *, chunk: int, transpose: bool = False, docs: Docs | None = None):
    """Causal decay mask ``M[i, j] = exp(b_i − b_j)`` for ``i ≥ j`` (its transpose if asked).

    The exponent is masked before the exp, so the upper triangle never overflows. With ``docs``
    pairs of different documents are zero.
    """
    row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    causal = col <= row if not transpose else row <= col
    if docs is not None:
        causal = causal & (docs.doc[:, None] == docs.doc[None, :])
    if b is None:
        return causal.astype(_F32)
    diff = b[:, None] - b[None, :] if not transpose else b[None, :] - b[:, None]
    return jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)


def row_scale(x, log_factor, keep=None):
    """``exp(log_factor)[:, None] · x`` in float32 (x itself when there is no decay), rows where
    ``keep`` (a ``[C]`` boolean, or None for all) is False set to zero."""
    if log_factor is None and keep is None:
        return x
    x = x.astype(_F32)
    if log_factor is not None:
        x = x * jnp.exp(log_factor)[:, None]
    return x if keep is None else jnp.where(keep[:, None], x, 0.0)


def carry_scale(state, b_last, docs: Docs | None):
    """The state (or state cotangent) carried across a chunk: ``exp(b_{C−1}) S``, zero where the
    chunk holds a document boundary."""
    if b_last is not None:
        state = jnp.exp(b_last) * state
    if docs is not None:
        state = jnp.where(docs.last == docs.prev, state, 0.0)
    return state


def same_doc(docs: Docs | None, which: str):
    """Rows of the chunk in the document of its entering state (``"prev"``) or of its last token
    (``"last"``); None (all rows) without segment ids."""
    return None if docs is None else docs.doc == getattr(docs, which)


def segment_bounds(num_chunks: int, per_segment: int):
    """(first chunk, number of chunks) of the segment this program handles (grid axis 1)."""
    first = pl.program_id(1) * per_segment
    return first, jnp.minimum(per_segment, num_chunks - first)


def compiler_params(cfg: BlockConfig, *, backward: bool = False):
    if backward:
        return plgpu.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd)
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ---- forward kernels ------------------------------------------------------------------------


def _segment_state_kernel(*refs, chunk, per_segment, num_chunks, mode, mxu_dtype, segmented, last_token):
    """M_s = Σ_j exp(b_end − b_j) k_jᵀ v_j over the segment's tokens, from a zero state.

    Token ``last_token`` (≥ 0) is left out: the caller adds its ``k_tᵀ v_t`` to the final state
    itself, so that the state before it stays available for the decay gradient.
    """
    k_ref, v_ref, *refs = refs
    decay_ref, doc_refs = pop_decay_refs(refs, mode=mode, segmented=segmented)
    (m_ref,) = refs
    first, count = segment_bounds(num_chunks, per_segment)

    def body(i, state):
        t0 = pl.multiple_of((first + i) * chunk, chunk)
        b, b_last = chunk_decay(decay_ref, t0, chunk=chunk, mode=mode)
        docs = chunk_docs(doc_refs, t0, chunk=chunk)
        k = k_ref[pl.ds(t0, chunk), :]
        v = v_ref[pl.ds(t0, chunk), :]
        v_to_end = row_scale(v, None if b is None else b_last - b, same_doc(docs, "last"))
        if last_token >= 0:
            pos = t0 + lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
            v_to_end = jnp.where(pos == last_token, 0.0, v_to_end.astype(_F32))
        update = dot(k.astype(mxu_dtype), v_to_end.astype(mxu_dtype), trans_a=True)
        return update + carry_scale(state, b_last, docs)

    m_ref[...] = lax.fori_loop(0, count, body, jnp.zeros(m_ref.shape, _F32))


def _chunk_output_kernel(*refs, chunk, per_segment, num_chunks, scale, mode, mxu_dtype, segmented):
    """o for the segment's chunks, carrying the float32 state from the segment's entering state."""
    q_ref, k_ref, v_ref, *refs = refs
    decay_ref, doc_refs = pop_decay_refs(refs, mode=mode, segmented=segmented)
    s_in_ref, o_ref = refs
    first, count = segment_bounds(num_chunks, per_segment)

    def body(i, state):
        t0 = pl.multiple_of((first + i) * chunk, chunk)
        b, b_last = chunk_decay(decay_ref, t0, chunk=chunk, mode=mode)
        docs = chunk_docs(doc_refs, t0, chunk=chunk)
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


# ---- layout helpers shared with the backward pass -------------------------------------------


class Layout:
    """Static sizes of one call: ``[B, T, H, D]`` q, ``Hk`` key heads, value dim ``E``, tiling."""

    def __init__(self, q, k, v, cfg: BlockConfig):
        self.batch, self.seq_len, self.heads, self.dim = q.shape
        self.kv_heads, self.value_dim = k.shape[2], v.shape[3]
        self.group = self.heads // self.kv_heads
        self.chunk = cfg.chunk
        if self.seq_len % self.chunk:
            raise ValueError(f"seq_len={self.seq_len} must be a multiple of chunk={self.chunk}")
        self.num_chunks = self.seq_len // self.chunk
        self.num_segments, self.per_segment = segments(self.num_chunks, self.batch * self.heads, cfg.min_programs)

    def seq_spec(self, width: int, *, kv: bool = False, block: int | None = None):
        """Whole-sequence ``[T, width]`` view of a ``[B, T, heads, ·]`` array for a program.

        Grid axes: (feature block j, segment s, batch b, head h); key/value arrays are read by
        query head h through head ``h // group``; ``block`` tiles the last dim by j.
        """
        group = self.group if kv else 1
        if block is None:
            return pl.BlockSpec((None, self.seq_len, None, width), lambda j, s, b, h: (b, 0, h // group, 0))
        return pl.BlockSpec((None, self.seq_len, None, block), lambda j, s, b, h: (b, 0, h // group, j))

    def decay_spec(self, mode: DecayMode):
        if mode == "gamma":
            return pl.BlockSpec((None,), lambda j, s, b, h: (h,))
        return pl.BlockSpec((None, None, self.seq_len), lambda j, s, b, h: (b, h, 0))

    def doc_specs(self, docs):
        """Specs of the ``(doc, prev)`` rows ``[B, T]`` int32 (none without segment ids)."""
        if docs is None:
            return []
        return [pl.BlockSpec((None, self.seq_len), lambda j, s, b, h: (b, 0))] * 2

    def state_spec(self, rows: int, cols: int, *, block_rows: bool = False, offset: int = 0):
        """One segment's ``[rows, cols]`` state of a ``[B, H, segments(+1), D, E]`` array.

        ``block_rows`` tiles D by grid axis j, else E is tiled; ``offset`` shifts the segment.
        """
        if block_rows:
            return pl.BlockSpec((None, None, None, rows, cols), lambda j, s, b, h: (b, h, s + offset, j, 0))
        return pl.BlockSpec((None, None, None, rows, cols), lambda j, s, b, h: (b, h, s + offset, 0, j))

    def grid(self, blocks: int):
        return (blocks, self.num_segments, self.batch, self.heads)


def chunk_cumsum(g, chunk: int):
    """Chunk-local inclusive cumulative sums of g ``[B, H, T]`` (float32)."""
    b, h, t = g.shape
    return jnp.cumsum(g.reshape(b, h, t // chunk, chunk), axis=-1).reshape(b, h, t)


def segment_log_decay(g, gamma, lay: Layout, docs=None):
    """Log decay across each segment ``[B, H, segments]`` (zeros without decay); −inf (a zero
    factor) across a segment that holds a document boundary."""
    tokens = lay.per_segment * lay.chunk
    shape = (lay.batch, lay.heads, lay.num_segments)
    if gamma is not None:
        counts = jnp.minimum(tokens, lay.seq_len - tokens * jnp.arange(lay.num_segments))
        log = jnp.broadcast_to(gamma[:, None] * counts, shape)
    elif g is None:
        log = jnp.zeros(shape, _F32)
    else:
        pad = lay.num_segments * tokens - lay.seq_len
        g = jnp.pad(g, ((0, 0), (0, 0), (0, pad)))
        log = g.reshape(shape + (tokens,)).sum(-1)
    if docs is None:
        return log
    doc, prev = docs
    starts = tokens * jnp.arange(lay.num_segments)
    ends = jnp.minimum(starts + tokens, lay.seq_len) - 1
    reset = doc[:, ends] != prev[:, starts]  # [B, segments]
    return jnp.where(reset[:, None, :], -jnp.inf, log)


def _state_scan_kernel(local_ref, log_ref, init_ref, out_ref, *, num_segments, reverse):
    """out[0] = init, out[s + 1] = exp(l_s) out[s] + local[s] (reverse: from out[S] = init down)."""
    out_ref[num_segments if reverse else 0] = init_ref[...]

    def body(i, carry):
        s = num_segments - 1 - i if reverse else i
        carry = jnp.exp(log_ref[s]) * carry + local_ref[s]
        out_ref[s if reverse else s + 1] = carry
        return carry

    lax.fori_loop(0, num_segments, body, init_ref[...])


def state_scan(local, seg_log, init, *, reverse: bool, interpret: bool, block=(32, 64)):
    """Float32 prefix over segments of ``[B, H, S, D, E]`` local states (one pass, tiled D×E).

    Forward (``reverse=False``): the state entering each segment, ``out[s + 1] = exp(l_s) out[s]
    + local[s]`` from ``out[0] = init`` (``out[S]`` is the final state). Backward: the state
    cotangent leaving each segment, ``out[s] = exp(l_s) out[s + 1] + local[s]`` from
    ``out[S] = init`` (``out[0]`` is the initial state's gradient). The sequential direction is
    over segments only (tens), the D×E tiles run in parallel.
    """
    b, h, n, d, e = local.shape
    bd, be = min(block[0], d), min(block[1], e)
    tile = lambda i, j, bb, hh: (bb, hh, i, j)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_state_scan_kernel, num_segments=n, reverse=reverse),
        grid=(d // bd, e // be, b, h),
        in_specs=[
            pl.BlockSpec((None, None, n, bd, be), lambda i, j, bb, hh: (bb, hh, 0, i, j)),
            pl.BlockSpec((None, None, n), lambda i, j, bb, hh: (bb, hh, 0)),
            pl.BlockSpec((None, None, bd, be), tile),
        ],
        out_specs=pl.BlockSpec((None, None, n + 1, bd, be), lambda i, j, bb, hh: (bb, hh, 0, i, j)),
        out_shape=jax.ShapeDtypeStruct((b, h, n + 1, d, e), _F32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="linear_attention_state_scan_reverse" if reverse else "linear_attention_state_scan",
    )(local, seg_log, init)


def _mxu_dtype(dtype):
    return dtype if dtype in (jnp.bfloat16, jnp.float16) else _F32


def _decay_inputs(g, gamma, docs, lay: Layout, mode: DecayMode):
    """The decay input (if any) and the ``(doc, prev)`` rows (if any) that every kernel takes
    after its tensors, with their specs; ``pop_decay_refs`` takes them off in the same order."""
    decay = [chunk_cumsum(g, lay.chunk)] if mode == "g" else [gamma] if mode == "gamma" else []
    return decay + list(docs or ()), [lay.decay_spec(mode)] * len(decay) + lay.doc_specs(docs)


def pop_decay_refs(refs: list, *, mode: DecayMode, segmented: bool):
    """``(decay_ref or None, (doc_ref, prev_ref) or None)`` taken off the front of ``refs``."""
    decay_ref = refs.pop(0) if mode != "none" else None
    doc_refs = (refs.pop(0), refs.pop(0)) if segmented else None
    return decay_ref, doc_refs


# ---- the forward pass -----------------------------------------------------------------------


def _kernel_statics(lay: Layout, q, mode, docs):
    return dict(
        chunk=lay.chunk,
        per_segment=lay.per_segment,
        num_chunks=lay.num_chunks,
        mode=mode,
        mxu_dtype=_mxu_dtype(q.dtype),
        segmented=docs is not None,
    )


def _segment_states(q, k, v, g, gamma, docs, *, mode, cfg, interpret, last_token):
    """Stage 1: the state each segment builds from a zero state ``[B, H, segments, D, E]``."""
    lay = Layout(q, k, v, cfg)
    d, e = lay.dim, lay.value_dim
    block_e = min(cfg.block_e, e)
    decay, decay_specs = _decay_inputs(g, gamma, docs, lay, mode)
    return pl.pallas_call(
        functools.partial(_segment_state_kernel, last_token=last_token, **_kernel_statics(lay, q, mode, docs)),
        grid=lay.grid(e // block_e),
        in_specs=[lay.seq_spec(d, kv=True), lay.seq_spec(e, kv=True, block=block_e), *decay_specs],
        out_specs=lay.state_spec(d, block_e),
        out_shape=jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.num_segments, d, e), _F32),
        compiler_params=compiler_params(cfg),
        interpret=interpret,
        name="linear_attention_segment_state",
    )(k, v, *decay)


def _with_last_token(state, k, v, lay: Layout, last_token):
    """Adds token ``last_token``'s own ``kᵀ v`` (kept out of the saved states, see _forward)."""
    if last_token < 0:
        return state
    k_last = jnp.repeat(k[:, last_token].astype(_F32), lay.group, axis=1)
    v_last = jnp.repeat(v[:, last_token].astype(_F32), lay.group, axis=1)
    return state + k_last[..., :, None] * v_last[..., None, :]


def _outputs(q, k, v, g, gamma, docs, local, s0, *, scale, mode, cfg, interpret, last_token):
    """Stages 2–3: entering states from ``s0`` and the output; (o, final state, states)."""
    lay = Layout(q, k, v, cfg)
    d, e = lay.dim, lay.value_dim
    block_e = min(cfg.block_e, e)
    decay, decay_specs = _decay_inputs(g, gamma, docs, lay, mode)
    states = state_scan(local, segment_log_decay(g, gamma, lay, docs), s0, reverse=False, interpret=interpret)
    o = pl.pallas_call(
        functools.partial(_chunk_output_kernel, scale=scale, **_kernel_statics(lay, q, mode, docs)),
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
        compiler_params=compiler_params(cfg),
        interpret=interpret,
        name="linear_attention_chunk_output",
    )(q, k, v, *decay, states)
    return o, _with_last_token(states[:, :, -1], k, v, lay, last_token), states


def _forward(q, k, v, g, gamma, s0, docs, *, scale, mode, cfg, interpret, last_token):
    """(o, final state, entering states ``[B, H, segments + 1, D, E]``).

    The last entry of the states is the final state without token ``last_token``'s own
    ``kᵀ v`` (when ``last_token`` ≥ 0): the decay gradient needs it (see the backward).
    """
    statics = dict(mode=mode, cfg=cfg, interpret=interpret, last_token=last_token)
    local = _segment_states(q, k, v, g, gamma, docs, **statics)
    return _outputs(q, k, v, g, gamma, docs, local, s0, scale=scale, **statics)


_STATICS = ("scale", "mode", "cfg", "interpret", "last_token")


@functools.partial(jax.custom_vjp, nondiff_argnames=_STATICS)
def _linear_attention(q, k, v, g, gamma, s0, docs, scale, mode, cfg, interpret, last_token):
    statics = dict(scale=scale, mode=mode, cfg=cfg, interpret=interpret, last_token=last_token)
    o, final, _ = _forward(q, k, v, g, gamma, s0, docs, **statics)
    return o, final


def _linear_attention_fwd(q, k, v, g, gamma, s0, docs, scale, mode, cfg, interpret, last_token):
    statics = dict(scale=scale, mode=mode, cfg=cfg, interpret=interpret, last_token=last_token)
    o, final, states = _forward(q, k, v, g, gamma, s0, docs, **statics)
    return (o, final), (q, k, v, g, gamma, docs, states)


def _linear_attention_bwd(scale, mode, cfg, interpret, last_token, residuals, cotangents):
    from pallas_kernels.linear_attention import pallas_triton_vjp

    q, k, v, g, gamma, docs, states = residuals
    do, d_final = cotangents
    statics = dict(scale=scale, mode=mode, cfg=cfg, interpret=interpret, last_token=last_token)
    grads = pallas_triton_vjp.backward(q, k, v, g, gamma, docs, states, do, d_final, **statics)
    return (*grads, None)  # document numbers are integers: no cotangent


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)


# ---- public function ------------------------------------------------------------------------


def _pad_dim(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def supports(q, k, v) -> bool:
    """Whether the GPU kernels take these inputs (dtypes, and int32 element offsets)."""
    dtypes_ok = all(x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) for x in (q, k, v))
    b, t, h, d = q.shape
    padded = b * (t + 128) * h * max(_pad_dim(d), _pad_dim(v.shape[-1]))
    return dtypes_ok and padded <= _MAX_ELEMENTS


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
    b, t, h, d = q.shape
    e = v.shape[-1]
    scale = float(d**-0.5 if scale is None else scale)
    args, docs, statics = _prepare(q, k, v, g, g_gamma, initial_state, segment_ids, interpret=interpret, config=config)
    o, final = _linear_attention(*args, docs, scale=scale, **statics)
    return o[:, :t, :, :e], final[:, :, :d, :e]


def _prepare(q, k, v, g, g_gamma, initial_state, segment_ids, *, interpret, config):
    """Kernel inputs: ``(q, k, v, g [B, H, T'] | None, gamma | None, s0)`` padded (head dims to a
    power of two ≥ 16, time to whole chunks), the document rows (or None) and the statics."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise TypeError(f"the Pallas kernels take bf16, fp16 or fp32 inputs, got q.dtype={q.dtype}")
    if not supports(q, k, v):
        raise ValueError(f"inputs too large for int32 offsets: q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)}")
    cfg = config or default_config(batch=b, heads=h, seq_len=t, interpret=interpret)
    dp, ep = _pad_dim(d), _pad_dim(e)
    tp = -(-t // cfg.chunk) * cfg.chunk

    def pad(x, width):
        x = x.astype(dtype)
        return jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, width - x.shape[-1])))

    q, k, v = pad(q, dp), pad(k, dp), pad(v, ep)
    mode: DecayMode = "none"
    gamma = gt = None
    if g_gamma is not None and tp == t:
        mode, gamma = "gamma", g_gamma.astype(_F32)
    elif g_gamma is not None or g is not None:
        # a padded tail must not decay the final state: spell the constant decay out per token
        g = jnp.broadcast_to(g_gamma.astype(_F32), (b, t, h)) if g is None else g.astype(_F32)
        mode, gt = "g", jnp.pad(jnp.swapaxes(g, 1, 2), ((0, 0), (0, 0), (0, tp - t)))
    if initial_state is None:
        s0 = jnp.zeros((b, h, dp, ep), _F32)
    else:
        s0 = jnp.pad(initial_state.astype(_F32), ((0, 0), (0, 0), (0, dp - d), (0, ep - e)))
    docs = _document_rows(segment_ids, tp)
    # with a decay, the last token's own kᵀv is kept out of the saved final state (see _forward)
    last_token = t - 1 if mode != "none" else -1
    statics = dict(mode=mode, cfg=cfg, interpret=interpret, last_token=last_token)
    return (q, k, v, gt, gamma, s0), docs, statics


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
    data_fields=["q", "k", "v", "g", "gamma", "docs", "seg_log", "unpad"],
    meta_fields=["scale", "statics", "shape"],
)
@dataclasses.dataclass(frozen=True)
class SplitCall:
    """One kernel call whose initial state comes later (``split_forward``): padded inputs, the
    log decay across each kernel segment, the pullback of the padding, and the statics."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array | None
    gamma: jax.Array | None
    docs: tuple | None
    seg_log: jax.Array
    unpad: object
    scale: float
    statics: tuple
    shape: tuple  # (T, D, E) before padding

    def kw(self):
        return dict(self.statics)

    def unpadded(self, state):
        _, d, e = self.shape
        return state[:, :, :d, :e]

    def padded(self, state):
        _, d, e = self.shape
        return jnp.pad(state, ((0, 0), (0, 0), (0, self.q.shape[-1] - d), (0, self.v.shape[-1] - e)))


def split_forward(q, k, v, *, g=None, g_gamma=None, scale=None, segment_ids=None, interpret=False, config=None):
    """The part of a call that needs no initial state: ``(M, call, local)``.

    ``M`` ``[B, H, D, E]`` float32 is the state the call's tokens build from a zero state (with
    ``segment_ids``: that of the last document); the state after the call from an initial state
    ``S`` is ``Γ S + M``. ``finish_forward(call, local, S)`` gives the output. Sequence
    parallelism sends ``M`` to the next rank while nothing else waits, then finishes with the
    state that arrives: no pass over k, v beyond the kernel's own.
    """
    d = q.shape[-1]
    scale = float(d**-0.5 if scale is None else scale)
    statics = {}

    def pad(q, k, v, g, g_gamma):
        args, _, st = _prepare(q, k, v, g, g_gamma, None, None, interpret=interpret, config=config)
        statics.update(st)
        return args[:5]

    (qp, kp, vp, gt, gamma), unpad = jax.vjp(pad, q, k, v, g, g_gamma)
    docs = _document_rows(segment_ids, qp.shape[1])
    lay = Layout(qp, kp, vp, statics["cfg"])
    seg_log = segment_log_decay(gt, gamma, lay, docs)
    local = _segment_states(qp, kp, vp, gt, gamma, docs, **statics)
    # M = Σ_s exp(l_{s+1} + … + l_{S-1}) local[s]: suffix sums, never differences (l may be −inf)
    after = jnp.flip(jnp.cumsum(jnp.flip(seg_log[..., 1:], -1), -1), -1)
    after = jnp.concatenate([after, jnp.zeros_like(seg_log[..., :1])], -1)
    m = jnp.einsum("bhs,bhsde->bhde", jnp.exp(after), local)
    m = _with_last_token(m, kp, vp, lay, statics["last_token"])
    call = SplitCall(
        qp, kp, vp, gt, gamma, docs, seg_log, unpad, scale, tuple(sorted(statics.items())), (q.shape[1], d, v.shape[-1])
    )
    return call.unpadded(m), call, local


def finish_forward(call: SplitCall, local, initial_state):
    """``(o [B, T, H, E], states)`` from ``split_forward``'s call and the initial state; ``states``
    are what ``split_backward`` needs."""
    t, _, e = call.shape
    s0 = call.padded(initial_state.astype(_F32))
    o, _, states = _outputs(
        call.q, call.k, call.v, call.g, call.gamma, call.docs, local, s0, scale=call.scale, **call.kw()
    )
    return o[:, :t, :, :e], states


def split_backward(call: SplitCall, states, do):
    """The part of the backward that needs no final-state cotangent: ``(dM, partial)``.

    ``dM`` ``[B, H, D, E]`` is the initial state's cotangent from ``do`` alone (with
    ``segment_ids``: from the tokens of the first document); ``finish_backward`` completes it.
    """
    from pallas_kernels.linear_attention import pallas_triton_vjp

    t, _, e = call.shape
    do = jnp.pad(do, ((0, 0), (0, call.q.shape[1] - t), (0, 0), (0, call.v.shape[-1] - e)))
    kw = call.kw()
    del kw["last_token"]
    partial = pallas_triton_vjp.dq_stage(
        call.q, call.k, call.v, call.g, call.gamma, call.docs, states, do, scale=call.scale, **kw
    )
    # dM = Σ_s exp(l_0 + … + l_{s-1}) dm[s]: prefix sums (l may be −inf)
    before = jnp.cumsum(call.seg_log[..., :-1], -1)
    before = jnp.concatenate([jnp.zeros_like(call.seg_log[..., :1]), before], -1)
    dm = jnp.einsum("bhs,bhsde->bhde", jnp.exp(before), partial[1])
    return call.unpadded(dm), (do, partial)


def finish_backward(call: SplitCall, states, partial, d_final):
    """Cotangents ``(dq, dk, dv, dg, dg_gamma, d initial_state)`` given the final state's cotangent."""
    from pallas_kernels.linear_attention import pallas_triton_vjp

    do, partial = partial
    dq, dk, dv, dg, dgamma, ds0 = pallas_triton_vjp.finish(
        call.q,
        call.k,
        call.v,
        call.g,
        call.gamma,
        call.docs,
        states,
        do,
        call.padded(d_final.astype(_F32)),
        partial,
        scale=call.scale,
        **call.kw(),
    )
    return (*call.unpad((dq, dk, dv, dg, dgamma)), call.unpadded(ds0))
