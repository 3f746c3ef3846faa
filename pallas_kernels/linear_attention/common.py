"""What the forward (``pallas_triton``) and backward (``pallas_triton_vjp``) kernels share.

The time axis of each (batch row, head) is cut into splits: runs of whole chunks, one split per
kernel program (``config.splits``). This module holds the chunk math every kernel body uses
(cumulative log decays, the causal decay mask, document resets), the static description of a
call (``Statics``, the ``custom_vjp``'s nondiff argument; ``Layout`` and its block specs;
``ChunkWalk``, what a kernel needs to walk its split's chunks), the order in which the decay and
document inputs follow the tensors, and the float32 prefix scan over splits that both directions
run (``state_scan``). Documents (``segment_ids``) are only ever "docs" here; a split is never one.
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

from pallas_kernels.common import F32
from pallas_kernels.linear_attention.config import BlockConfig, splits

DecayMode = Literal["none", "gamma", "g"]


@dataclasses.dataclass(frozen=True)
class Statics:
    """Static arguments of one kernel call (the ``custom_vjp``'s nondiff argument; hashable).

    Attributes:
      scale: multiplies q.
      mode: the decay input: none, ``"gamma"`` (a constant per head) or ``"g"`` (per token).
      cfg: the tiling.
      interpret: run the kernels in the Pallas interpreter.
      last_token: with a decay, the last real token, whose own ``kᵀ v`` is kept out of the saved
        final state (the decay gradient needs the state before it), and where a constant decay
        stops in a row padded to whole chunks; -1 without a decay.
    """

    scale: float
    mode: DecayMode
    cfg: BlockConfig
    interpret: bool
    last_token: int


def mxu_dtype(dtype):
    """The operand dtype of the in-kernel matmuls: bf16/fp16 stay, anything else is float32."""
    return dtype if dtype in (jnp.bfloat16, jnp.float16) else F32


def compiler_params(cfg: BlockConfig, *, backward: bool = False):
    if backward:
        return plgpu.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd)
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ---- chunk math inside the kernels ----------------------------------------------------------


def chunk_decay(decay_ref, t0, *, chunk: int, mode: DecayMode, last_token: int = -1):
    """(b, b_last): the chunk's inclusive cumulative log decay ``[C]`` and its last entry.

    ``decay_ref`` holds the chunk-local cumulative sums of g (mode "g") or the head's constant
    log decay (mode "gamma"); mode "none" has no decay and returns ``(None, None)``. Mode "gamma"
    forms them in closed form, ``gamma · (t − t0 + 1)`` from iotas (never a cumulative sum of a
    T-long constant); with ``last_token`` ≥ 0 the positions stop at it, so the padding after the
    last real token does not decay.
    """
    if mode == "none":
        return None, None
    pos = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    if mode == "gamma":
        gamma = decay_ref[...].astype(F32)
        if last_token < 0:
            return gamma * (pos + 1).astype(F32), gamma * chunk
        steps = jnp.minimum(t0 + pos, last_token) - t0 + 1
        last_steps = jnp.minimum(t0 + chunk - 1, last_token) - t0 + 1
        return gamma * steps.astype(F32), gamma * last_steps.astype(F32)
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
    """The chunk's ``Docs`` from the ``doc`` and ``prev`` rows ``[T]`` (None without documents)."""
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
        return causal.astype(F32)
    diff = b[:, None] - b[None, :] if not transpose else b[None, :] - b[:, None]
    return jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)


def row_scale(x, log_factor, keep=None):
    """``exp(log_factor)[:, None] · x`` in float32 (x itself when there is no decay), rows where
    ``keep`` (a ``[C]`` boolean, or None for all) is False set to zero."""
    if log_factor is None and keep is None:
        return x
    x = x.astype(F32)
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
    (``"last"``); None (all rows) without documents."""
    return None if docs is None else docs.doc == getattr(docs, which)


@dataclasses.dataclass(frozen=True)
class ChunkWalk:
    """What a kernel program needs to walk the chunks of its split (grid axis 1), bound into
    every chunk-loop kernel with ``functools.partial``.

    Its methods take, in order, the decay and document refs that follow a kernel's tensors
    (``decay_inputs``) and read the chunk's decay and documents at token ``t0``.
    """

    chunk: int
    per_split: int
    num_chunks: int
    mode: DecayMode
    mxu_dtype: object
    has_docs: bool
    last_token: int = -1  # ≥ 0: the last real token of a padded row, where a constant decay stops

    def split_bounds(self):
        """(first chunk, number of chunks) of the split this program handles."""
        first = pl.program_id(1) * self.per_split
        return first, jnp.minimum(self.per_split, self.num_chunks - first)

    def pop_inputs(self, refs: list):
        """``(decay_ref or None, (doc_ref, prev_ref) or None)`` taken off the front of ``refs``."""
        decay_ref = refs.pop(0) if self.mode != "none" else None
        doc_refs = (refs.pop(0), refs.pop(0)) if self.has_docs else None
        return decay_ref, doc_refs

    def decay(self, decay_ref, t0):
        return chunk_decay(decay_ref, t0, chunk=self.chunk, mode=self.mode, last_token=self.last_token)

    def docs(self, doc_refs, t0) -> Docs | None:
        return chunk_docs(doc_refs, t0, chunk=self.chunk)


# ---- the layout of one call -----------------------------------------------------------------


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
        self.num_splits, self.per_split = splits(self.num_chunks, self.batch * self.heads, cfg.min_programs)

    def walk(self, mode: DecayMode, dtype, *, has_docs: bool, last_token: int = -1) -> ChunkWalk:
        """The ``ChunkWalk`` of this call's kernels for inputs of ``dtype``; ``last_token`` the last
        real token (a constant decay stops there; only a padded row needs it)."""
        padded = 0 <= last_token < self.seq_len - 1
        return ChunkWalk(
            self.chunk,
            self.per_split,
            self.num_chunks,
            mode,
            mxu_dtype(dtype),
            has_docs,
            last_token if padded else -1,
        )

    def seq_spec(self, width: int, *, kv: bool = False, block: int | None = None):
        """Whole-sequence ``[T, width]`` view of a ``[B, T, heads, ·]`` array for a program.

        Grid axes: (feature block j, split s, batch b, head h); key/value arrays are read by
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
        """Specs of the ``(doc, prev)`` rows ``[B, T]`` int32 (none without documents)."""
        if docs is None:
            return []
        return [pl.BlockSpec((None, self.seq_len), lambda j, s, b, h: (b, 0))] * 2

    def state_spec(self, rows: int, cols: int, *, block_rows: bool = False, offset: int = 0):
        """One split's ``[rows, cols]`` state of a ``[B, H, splits(+1), D, E]`` array.

        ``block_rows`` tiles D by grid axis j, else E is tiled; ``offset`` shifts the split.
        """
        if block_rows:
            return pl.BlockSpec((None, None, None, rows, cols), lambda j, s, b, h: (b, h, s + offset, j, 0))
        return pl.BlockSpec((None, None, None, rows, cols), lambda j, s, b, h: (b, h, s + offset, 0, j))

    def grid(self, blocks: int):
        return (blocks, self.num_splits, self.batch, self.heads)


def chunk_cumsum(g, chunk: int):
    """Chunk-local inclusive cumulative sums of g ``[B, H, T]`` (float32)."""
    b, h, t = g.shape
    return jnp.cumsum(g.reshape(b, h, t // chunk, chunk), axis=-1).reshape(b, h, t)


def decay_inputs(g, gamma, docs, lay: Layout, mode: DecayMode):
    """The decay input (if any) and the ``(doc, prev)`` rows (if any) that every kernel takes
    after its tensors, with their specs; ``ChunkWalk.pop_inputs`` takes them off in the same order."""
    decay = [chunk_cumsum(g, lay.chunk)] if mode == "g" else [gamma] if mode == "gamma" else []
    return decay + list(docs or ()), [lay.decay_spec(mode)] * len(decay) + lay.doc_specs(docs)


def split_log_decay(g, gamma, lay: Layout, docs=None, *, last_token: int = -1):
    """Log decay across each split ``[B, H, splits]`` (zeros without decay); −inf (a zero
    factor) across a split that holds a document boundary. A constant ``gamma`` decays the
    split's tokens up to ``last_token`` (default: the whole padded row)."""
    tokens = lay.per_split * lay.chunk
    shape = (lay.batch, lay.heads, lay.num_splits)
    if gamma is not None:
        length = lay.seq_len if last_token < 0 else last_token + 1
        counts = jnp.minimum(tokens, length - tokens * jnp.arange(lay.num_splits))
        log = jnp.broadcast_to(gamma[:, None] * counts, shape)
    elif g is None:
        log = jnp.zeros(shape, F32)
    else:
        pad = lay.num_splits * tokens - lay.seq_len
        g = jnp.pad(g, ((0, 0), (0, 0), (0, pad)))
        log = g.reshape(shape + (tokens,)).sum(-1)
    if docs is None:
        return log
    doc, prev = docs
    starts = tokens * jnp.arange(lay.num_splits)
    ends = jnp.minimum(starts + tokens, lay.seq_len) - 1
    reset = doc[:, ends] != prev[:, starts]  # [B, splits]
    return jnp.where(reset[:, None, :], -jnp.inf, log)


# ---- the prefix over splits (forward and backward) ------------------------------------------


def _state_scan_kernel(local_ref, log_ref, init_ref, out_ref, *, num_splits, reverse):
    """out[0] = init, out[s + 1] = exp(l_s) out[s] + local[s] (reverse: from out[S] = init down)."""
    out_ref[num_splits if reverse else 0] = init_ref[...]

    def body(i, carry):
        s = num_splits - 1 - i if reverse else i
        carry = jnp.exp(log_ref[s]) * carry + local_ref[s]
        out_ref[s if reverse else s + 1] = carry
        return carry

    lax.fori_loop(0, num_splits, body, init_ref[...])


def state_scan(local, split_log, init, *, reverse: bool, interpret: bool, block=(32, 64)):
    """Float32 prefix over splits of ``[B, H, S, D, E]`` local states (one pass, tiled D×E).

    Forward (``reverse=False``): the state entering each split, ``out[s + 1] = exp(l_s) out[s]
    + local[s]`` from ``out[0] = init`` (``out[S]`` is the final state). Backward: the state
    cotangent leaving each split, ``out[s] = exp(l_s) out[s + 1] + local[s]`` from
    ``out[S] = init`` (``out[0]`` is the initial state's gradient). The sequential direction is
    over splits only (tens), the D×E tiles run in parallel.
    """
    b, h, n, d, e = local.shape
    bd, be = min(block[0], d), min(block[1], e)
    tile = lambda i, j, bb, hh: (bb, hh, i, j)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_state_scan_kernel, num_splits=n, reverse=reverse),
        grid=(d // bd, e // be, b, h),
        in_specs=[
            pl.BlockSpec((None, None, n, bd, be), lambda i, j, bb, hh: (bb, hh, 0, i, j)),
            pl.BlockSpec((None, None, n), lambda i, j, bb, hh: (bb, hh, 0)),
            pl.BlockSpec((None, None, bd, be), tile),
        ],
        out_specs=pl.BlockSpec((None, None, n + 1, bd, be), lambda i, j, bb, hh: (bb, hh, 0, i, j)),
        out_shape=jax.ShapeDtypeStruct((b, h, n + 1, d, e), F32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="linear_attention_state_scan_reverse" if reverse else "linear_attention_state_scan",
    )(local, split_log, init)
