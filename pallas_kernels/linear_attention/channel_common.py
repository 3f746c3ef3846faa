"""What the per-channel (GLA) kernels' forward (``pallas_triton_channel``) and backward
(``pallas_triton_channel_vjp``) share: the layout of a call, the decays across chunks and runs, the
float32 scan over runs, and the chunk math on tiles.

Per query head, with ``b`` the chunk-local cumulative per-channel log decay ``[C, D]`` (notes/design.md
§6; GLA is the per-channel gated delta rule without its WY part, so the tile math is
``gated_delta_rule.common``'s with ``V' = V``):

    O = scale · [(e^b ⊙ Q) S_in + (Q Kᵀ ⊙ Γ ⊙ causal-inclusive) V]
    S_out = e^{b_last} ⊙ S_in + (e^{b_last − b} ⊙ K)ᵀ V

Each row of the (padded) sequence is cut into ``cfg.splits`` runs of whole chunks, treated as rows of
their own (``layout.to_splits``). A forward pass per run from a zero state stores each chunk's
*local* entering state ``h_local_c`` and gives the run's local final state; a float32 scan over runs
(``split_scan``) gives each run's entering state ``S_r``; the chunk kernels form the true entering
state ``h_c = h_local_c + e^{a_c} ⊙ S_r`` with ``a_c`` the log decay from the run's start to chunk c
(``ChunkLogs.enter``, −inf past a document boundary). The backward mirrors it with the leaving
cotangents. So the sequential passes never wait for another run, and a call split at its entering
state (sequence parallelism) needs no pass of its own: its rank is one more run.

Pure jnp on loaded tiles (lists of 16-row tiles, ``gated_delta_rule.layout.load_tiles``), so a
Mosaic GPU sibling can reuse the math; the block specs are Pallas's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import F32, dot
from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule.common import Docs
from pallas_kernels.gated_delta_rule.layout import channel_chunk_cumsum, compiler_params, mxu_dtype, pregated_operands
from pallas_kernels.linear_attention.config import CHANNEL_SUB_TILE, ChannelConfig

MODE = "channel"  # the gate form of the shared tile math (gated_delta_rule.common)


@dataclasses.dataclass(frozen=True)
class ChannelStatics:
    """Static arguments of one call (the ``custom_vjp``'s nondiff argument; hashable).

    Attributes:
      scale: multiplies q.
      cfg: the tiling.
      interpret: run the kernels in the Pallas interpreter.
      mode: the gate form of the shared tile math: ``"channel"`` (exact for any gates) or
        ``"channel_bounded"`` (diagonal sub-tiles factored around their middle row; chosen by
        ``gated_delta_rule.products.gate_case`` and ``by_gates``).
    """

    scale: float
    cfg: ChannelConfig
    interpret: bool
    mode: str = MODE


def cumulative_gates(g, statics: ChannelStatics):
    """The chunk-local cumulative sums b of the log decays ``g`` ``[R, T, H, D]`` (the kernels' input
    on runs, T whole chunks), float32, by the delta rule's Pallas kernel (``channel_chunk_cumsum``;
    in the interpreter with ``statics.interpret``): what ``products.gate_case`` checks and
    ``pregated_inputs`` gates with."""
    return channel_chunk_cumsum(g.astype(F32), statics.cfg.chunk, statics.interpret)


class Layout:
    """Static sizes of one call on runs: q ``[R, T, H, D]``, k ``[R, T, Hk, D]``, v ``[R, T, Hk, E]``
    (R = batch × runs, T whole chunks), and the block specs of its two grids:

    - chunk kernels: one program per (chunk c, run r, query head h), k/v blocks of head ``h // group``;
    - state passes: one program per (value block j, run r, head h) holding the ``[T, ·]`` rows.
    """

    def __init__(self, q, k, v, cfg: ChannelConfig):
        self.rows, self.seq_len, self.heads, self.dim = q.shape
        self.kv_heads, self.value_dim = k.shape[2], v.shape[3]
        self.group = self.heads // self.kv_heads
        self.chunk = cfg.chunk
        if self.seq_len % self.chunk:
            raise ValueError(f"seq_len={self.seq_len} must be a multiple of chunk={self.chunk}")
        self.num_chunks = self.seq_len // self.chunk
        self.parts = self.chunk // CHANNEL_SUB_TILE
        # the output kernel's own (``ChannelConfig.output_rows``; its stored scores are read back as
        # ``parts`` blocks, which lie inside its larger ones)
        self.output_parts = self.chunk // (cfg.output_rows or CHANNEL_SUB_TILE)
        self.block_e = min(cfg.block_e, self.value_dim)
        self.block_cols = min(cfg.block_cols, self.dim)
        self.mxu = mxu_dtype(q.dtype)

    # -- chunk grid (c, r, h) --

    def chunk_grid(self):
        return (self.num_chunks, self.rows, self.heads)

    def chunk_spec(self, width: int, *, kv: bool = False):
        """One chunk ``[C, width]`` of a ``[R, T, heads, width]`` array (k, v: through the group)."""
        group = self.group if kv else 1
        return pl.BlockSpec((None, self.chunk, None, width), lambda c, r, h: (r, c, h // group, 0))

    def chunk_doc_specs(self, has_docs: bool) -> list:
        return [pl.BlockSpec((None, self.chunk), lambda c, r, h: (r, c))] * 2 if has_docs else []

    def chunk_input_specs(self, *, has_docs: bool, with_do: bool = False) -> list:
        """Specs of the chunk kernels' leading inputs: q, k, v, (dO,) g and the document rows."""
        d, e = self.dim, self.value_dim
        do = [self.chunk_spec(e)] if with_do else []
        qkv = [self.chunk_spec(d), self.chunk_spec(d, kv=True), self.chunk_spec(e, kv=True)]
        return [*qkv, *do, self.chunk_spec(d), *self.chunk_doc_specs(has_docs)]

    def chunk_state_spec(self):
        """Chunk c's ``[D, E]`` state of ``[R, H, NC, D, E]``."""
        return pl.BlockSpec((None, None, None, self.dim, self.value_dim), lambda c, r, h: (r, h, c, 0, 0))

    def run_state_spec(self):
        """Run r's ``[D, E]`` state of ``[R, H, D, E]``."""
        return pl.BlockSpec((None, None, self.dim, self.value_dim), lambda c, r, h: (r, h, 0, 0))

    def chunk_log_spec(self):
        """Chunk c's ``[D]`` log decay of ``[R, H, NC, D]``."""
        return pl.BlockSpec((None, None, None, self.dim), lambda c, r, h: (r, h, c, 0))

    # -- state-pass grid (j, r, h) --

    def state_grid(self):
        return (self.value_dim // self.block_e, self.rows, self.heads)

    def seq_spec(self, width: int, *, kv: bool = False, blocked: bool = False):
        """All ``[T, width]`` rows of one head (``blocked``: value block j of the last dim)."""
        group = self.group if kv else 1
        if blocked:
            return pl.BlockSpec((None, self.seq_len, None, self.block_e), lambda j, r, h: (r, 0, h // group, j))
        return pl.BlockSpec((None, self.seq_len, None, width), lambda j, r, h: (r, 0, h // group, 0))

    def seq_doc_specs(self, has_docs: bool) -> list:
        return [pl.BlockSpec((None, self.seq_len), lambda j, r, h: (r, 0))] * 2 if has_docs else []

    def states_spec(self):
        """Value block j of every chunk's state ``[NC, D, block_e]`` in ``[R, H, NC, D, E]``."""
        shape = (None, None, self.num_chunks, self.dim, self.block_e)
        return pl.BlockSpec(shape, lambda j, r, h: (r, h, 0, 0, j))

    def state_spec(self):
        """Value block j of a run's ``[R, H, D, E]`` state."""
        return pl.BlockSpec((None, None, self.dim, self.block_e), lambda j, r, h: (r, h, 0, j))

    def logs_spec(self):
        """Every chunk's ``[NC, D]`` of ``[R, H, NC, D]`` (each value block writes the same values)."""
        return pl.BlockSpec((None, None, self.num_chunks, self.dim), lambda j, r, h: (r, h, 0, 0))

    # -- shapes --

    def states_shape(self, dtype):
        return jax.ShapeDtypeStruct((self.rows, self.heads, self.num_chunks, self.dim, self.value_dim), dtype)

    def logs_shape(self):
        return jax.ShapeDtypeStruct((self.rows, self.heads, self.num_chunks, self.dim), F32)

    def run_states_shape(self):
        return jax.ShapeDtypeStruct((self.rows, self.heads, self.dim, self.value_dim), F32)

    def per_head_shape(self, width: int, dtype):
        return jax.ShapeDtypeStruct((self.rows, self.seq_len, self.heads, width), dtype)


def chunk_kernel(body, lay: Layout, statics: ChannelStatics, *, has_docs: bool):
    """A chunk kernel's body with its statics bound (documents, operand dtype, scale, sub-tiles,
    key-column block)."""
    return functools.partial(
        body, has_docs=has_docs, mxu=lay.mxu, scale=statics.scale, parts=lay.parts, block_cols=lay.block_cols
    )


def doc_inputs(docs) -> list:
    """The ``(doc, prev)`` rows that kernels take after their tensors (none without documents)."""
    return [] if docs is None else list(docs)


def run_pass(
    kernel, x, y, g, docs, lay: Layout, statics: ChannelStatics, *, kv: bool, logs: bool, name: str, pregated=False
):
    """One sequential pass over every run's chunks (grid: value block j, run, head), from ``x``
    ``[R, T, ·, D]`` (whole rows), ``y`` ``[R, T, ·, E]`` (value block j), g and the document rows (k
    and v through the group when ``kv``). ``kernel`` writes each chunk's ``[D, block_e]`` state
    (operand dtype), the log decay across each chunk if ``logs``, and the run's float32 state.
    ``pregated``: x holds the gated keys or queries per query head and g each chunk's decay ``[R, H,
    NC, D]`` (``pregated_inputs``; no document rows). ``ChannelConfig``'s launch parameters of kind
    "state" (``gated_delta_rule.layout.compiler_params`` reads the same field names)."""
    out_specs = [lay.states_spec(), *([lay.logs_spec()] if logs else []), lay.state_spec()]
    out_shape = [lay.states_shape(lay.mxu), *([lay.logs_shape()] if logs else []), lay.run_states_shape()]
    return pl.pallas_call(
        kernel,
        grid=lay.state_grid(),
        in_specs=[
            lay.seq_spec(lay.dim, kv=kv and not pregated),
            lay.seq_spec(lay.value_dim, kv=kv, blocked=True),
            lay.logs_spec() if pregated else lay.seq_spec(lay.dim),
            *lay.seq_doc_specs(docs is not None),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(statics.cfg, "state"),
        interpret=statics.interpret,
        name=name,
    )(x, y, g, *doc_inputs(docs))


def pregated_inputs(x, b, docs, lay: Layout, *, queries: bool):
    """``ChannelConfig.pregated_state``: a state pass's operands formed once per call in XLA, ``(gated x,
    γ, across)``: the keys ``e^{b_last − b} ⊙ x`` (or, with ``queries``, the queries ``e^b ⊙ x``) per
    query head ``[R, T, H, D]`` in the operand dtype, each chunk's decay ``γ = e^{b_last}`` (zero across
    a document boundary) and ``b_last`` ``[R, H, NC, D]`` float32, unmasked (the forward pass's ``across``:
    ``chunk_logs`` applies the boundaries); b the chunk-local cumulative sum of the gates ``[R, T, H,
    D]`` (``cumulative_gates``), with the kernels' document masks
    (``gated_delta_rule.layout.pregated_operands``, the delta rule's)."""
    c = lay.chunk
    keys, gamma, gated_queries = pregated_operands(x, b, docs, lay, q=x if queries else None)
    return gated_queries if queries else keys, gamma, b[:, c - 1 :: c].transpose(0, 2, 1, 3)


# ---- decays across chunks and runs ---------------------------------------------------------------


class ChunkLogs(NamedTuple):
    """Per-channel log decays across whole chunks, ``[R, H, NC, D]`` float32 (−inf: a document
    boundary in between, so the factor is exactly zero).

    ``enter``: from the run's start to chunk c's start; ``leave``: from chunk c's end to the run's
    end; ``run``: across the whole run ``[R, H, D]``. Sums only, never differences, so −inf stays
    −inf.
    """

    enter: jax.Array
    leave: jax.Array
    run: jax.Array


def chunk_logs(across, docs, chunk: int) -> ChunkLogs:
    """``ChunkLogs`` from the log decay across each chunk ``[R, H, NC, D]`` (the state pass's
    ``Σ g`` per chunk) and the document rows (a chunk holding a boundary, one at its first token
    included, passes no state on)."""
    if docs is not None:
        doc, prev = docs
        boundary = doc[:, chunk - 1 :: chunk] != prev[:, ::chunk]  # [R, NC]
        across = jnp.where(boundary[:, None, :, None], -jnp.inf, across)
    zero = jnp.zeros_like(across[:, :, :1])
    before = jnp.cumsum(across, axis=2)
    after = jnp.flip(jnp.cumsum(jnp.flip(across, 2), axis=2), 2)
    enter = jnp.concatenate([zero, before[:, :, :-1]], axis=2)
    leave = jnp.concatenate([after[:, :, 1:], zero], axis=2)
    return ChunkLogs(enter, leave, before[:, :, -1])


def _split_scan_kernel(local_ref, log_ref, init_ref, out_ref, *, splits: int, reverse: bool):
    """out[0] = init, out[s + 1] = e^{l_s} ⊙ out[s] + local[s] (reverse: from out[S] = init down)."""
    out_ref[splits if reverse else 0] = init_ref[...]

    def body(i, carry):
        s = splits - 1 - i if reverse else i
        carry = jnp.exp(log_ref[s])[:, None] * carry + local_ref[s]
        out_ref[s if reverse else s + 1] = carry
        return carry

    lax.fori_loop(0, splits, body, init_ref[...])


def split_scan(local, run_log, init, *, reverse: bool, interpret: bool, block=(32, 64)):
    """Float32 prefix over the runs of each row: ``local`` ``[B, S, H, D, E]`` (each run's state from
    zero, or its entering state's cotangent from its own outputs), ``run_log`` ``[B, S, H, D]``,
    ``init`` ``[B, H, D, E]``; returns ``[B, S + 1, H, D, E]``.

    Forward: ``out[s]`` is the state entering run s, ``out[S]`` the final state. Reverse:
    ``out[s + 1]`` the cotangent of the state leaving run s, ``out[0]`` the initial state's.
    """
    b, n, h, d, e = local.shape
    bd, be = min(block[0], d), min(block[1], e)
    return pl.pallas_call(
        functools.partial(_split_scan_kernel, splits=n, reverse=reverse),
        grid=(d // bd, e // be, b, h),
        in_specs=[
            pl.BlockSpec((None, n, None, bd, be), lambda i, j, bb, hh: (bb, 0, hh, i, j)),
            pl.BlockSpec((None, n, None, bd), lambda i, j, bb, hh: (bb, 0, hh, i)),
            pl.BlockSpec((None, None, bd, be), lambda i, j, bb, hh: (bb, hh, i, j)),
        ],
        out_specs=pl.BlockSpec((None, n + 1, None, bd, be), lambda i, j, bb, hh: (bb, 0, hh, i, j)),
        out_shape=jax.ShapeDtypeStruct((b, n + 1, h, d, e), F32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="linear_attention_channel_scan_reverse" if reverse else "linear_attention_channel_scan",
    )(local, run_log, init)


def run_scan(local, run_log, init, splits: int, *, reverse: bool, interpret: bool):
    """``split_scan`` on run-major arrays: ``local`` ``[R, H, D, E]`` and ``run_log`` ``[R, H, D]``
    (R = B × splits). Returns ``(per run [R, H, D, E], end [B, H, D, E])``: forward, each run's
    entering state and the final state; reverse, the cotangent of the state leaving each run and
    the initial state's."""
    r, h, d, e = local.shape
    out = split_scan(
        local.reshape(r // splits, splits, h, d, e),
        run_log.reshape(r // splits, splits, h, d),
        init,
        reverse=reverse,
        interpret=interpret,
    )
    per_run = out[:, 1:] if reverse else out[:, :-1]
    return per_run.reshape(r, h, d, e), out[:, 0] if reverse else out[:, -1]


# ---- chunk math on tiles -------------------------------------------------------------------------


def cumulative_tiles(g_tiles: list) -> list:
    """The chunk-local inclusive cumulative log decay b (float32) of a chunk's row tiles of g: each
    tile's cumulative sum plus the last row of the tile before (sums only, in token order)."""
    out = []
    for x in g_tiles:
        b = jnp.cumsum(x.astype(F32), axis=0)
        out.append(b if not out else b + common.last_row(out[-1])[None, :])
    return out


def gate_grad_tiles(db_tiles: list) -> list:
    """dg from the cotangent of the cumulative log decay, ``dg_t = Σ_{u ≥ t} db_u`` over the chunk:
    inside a tile by an upper-triangular float32 product (exact sums, no differences), plus the
    column sums of the tiles after it."""
    n = db_tiles[0].shape[0]
    row = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    col = lax.broadcasted_iota(jnp.int32, (n, n), 1)
    upper = jnp.where(col >= row, 1.0, 0.0).astype(F32)
    out, after = [], None
    for db in reversed(db_tiles):
        dg = dot(upper, db)
        out.append(dg if after is None else dg + after[None, :])
        total = jnp.sum(db, axis=0)
        after = total if after is None else after + total
    return out[::-1]


def full_state_rows(local_rows, log_rows, run_rows):
    """Rows of a chunk's true state (or state cotangent) from its local one and the run's:
    ``local + e^{log} ⊙ run`` (float32), ``log`` ``[w]`` the decay between them."""
    return local_rows.astype(F32) + jnp.exp(log_rows)[:, None] * run_rows.astype(F32)


def state_update(state, k, v, b, docs: Docs | None, mxu):
    """One chunk of the forward state pass: ``e^{b_last} ⊙ S + (e^{b_last − b} ⊙ K)ᵀ V`` (float32)."""
    _, to_end, gamma = common.gate_factors(b, docs)
    update = dot(common.row_scale(k, to_end).astype(mxu), v.astype(mxu), trans_a=True)
    return common.decay_state(state, gamma) + update


def cotangent_update(ds, q, do, b, docs: Docs | None, *, scale: float, mxu):
    """One chunk of the reverse pass: ``e^{b_last} ⊙ dS + scale · (e^b ⊙ Q)ᵀ dO`` (float32)."""
    to_row, _, gamma = common.gate_factors(b, docs)
    update = dot(common.row_scale(q, to_row).astype(mxu), do.astype(mxu), trans_a=True)
    return common.decay_state(ds, gamma) + scale * update


def state_grads(k, b, docs: Docs | None, h, dh, v, mxu):
    """``(dk, db, e^{b_last − b})`` of one chunk's state step on all its C rows, for some key columns
    (``gated_delta_rule.common.state_backward`` with ``V' = V`` on whole-chunk products): k, b
    ``[C, w]``, the entering state and leaving cotangent's rows ``h``, ``dh`` ``[w, E]``, v ``[C, E]``;
    db holds the last row's terms ``Σ_rows k ⊙ dk + γ ⊙ Σ_e h ⊙ dh``."""
    _, to_end, gamma = common.gate_factors(b, docs)
    dk = common.row_scale(dot(v.astype(mxu), dh.astype(mxu), trans_b=True), to_end)
    k_dk = k.astype(F32) * dk
    last = jnp.sum(k_dk, axis=0) + gamma * jnp.sum(h * dh, axis=1)
    pos = lax.broadcasted_iota(jnp.int32, k_dk.shape, 0)
    return dk, jnp.where(pos == k_dk.shape[0] - 1, last[None, :], 0.0) - k_dk, to_end


def value_grads_from_state(k: list, b: list, docs: Docs | None, dh, mxu) -> list:
    """Tiles of ``(e^{b_last − b} ⊙ K) dS``: the state step's share of dv for the key columns of
    ``k``, ``b`` (row tiles) and ``dh`` (those rows of the leaving state's cotangent)."""
    b_last = common.last_row(b[-1])
    dh = dh.astype(mxu)
    out = []
    for x, bx, dx in zip(k, b, common.split_docs(docs, len(k)), strict=True):
        _, to_end, _ = common.gate_factors(bx, dx, b_last)
        out.append(dot(common.row_scale(x, to_end).astype(mxu), dh))
    return out
