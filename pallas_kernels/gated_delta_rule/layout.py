"""The plumbing the forward (``pallas_triton``) and backward (``pallas_triton_vjp``) kernels share.

``Statics`` (the ``custom_vjp``'s nondiff argument), ``Layout`` (sizes of one call and the block
specs of its two grids), the order in which the gate and document inputs follow the tensors, and
loading one chunk's gate and document rows inside a kernel. The chunk math itself is in
``common``.

Two grids:
- chunk-parallel kernels: one program per (chunk c, batch row, value head), each reading its
  chunk's ``[C, ·]`` blocks; q/k blocks of value head ``hv`` come from q/k head ``hv // group``.
- the state passes: one program per (value block j, batch row, value head) holding the ``[T, ·]``
  rows of its head and walking the chunks with ``pl.ds``.
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

from pallas_kernels.common import F32, TF32_X3
from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule.common import BF16_PRODUCTS, CHANNEL_MODES, Docs, GateMode, last_row
from pallas_kernels.gated_delta_rule.config import SUB_TILE, BlockConfig


@dataclasses.dataclass(frozen=True)
class Statics:
    """Static arguments of one call (hashable).

    Attributes:
      scale: multiplies q.
      mode: the gate: none (DeltaNet), ``"scalar"`` (one per token and value head, Gated DeltaNet)
        or ``"channel"`` (one per key channel, KDA; ``"channel_bounded"``: the same where every
        diagonal tile's factors are bounded, ``products.diag_tiles_bounded``).
      cfg: the tiling.
      interpret: run the kernels in the Pallas interpreter.
      gate_floor: the log gates' floor (``gate_lower_bound``; the gates were raised to it), where it
        may pick the per-channel kernels at trace time (``products.static_case``); None otherwise.
    """

    scale: float
    mode: GateMode
    cfg: BlockConfig
    interpret: bool
    gate_floor: float | None = None

    @property
    def inverse_precision(self):
        """The precision of the float32 products that form ``(I + A)⁻¹`` (``cfg.inverse_precision``):
        a ``lax.Precision`` / dot algorithm, or ``common.BF16_PRODUCTS`` for ``"bf16"`` (bf16 operands,
        the same in the interpreter); the tf32 forms run exact float32 in the interpreter (the CPU)."""
        if self.cfg.inverse_precision == "bf16":  # explicit bf16 operands: the same on the CPU
            return BF16_PRODUCTS
        if self.interpret:
            return lax.Precision.HIGHEST
        # jax's Triton lowering takes DEFAULT for float32 operands as one tf32 product
        return {"tf32x3": TF32_X3, "tf32": lax.Precision.DEFAULT}.get(self.cfg.inverse_precision, lax.Precision.HIGHEST)


def mxu_dtype(dtype):
    """The operand dtype of the in-kernel matmuls: bf16/fp16 stay, anything else is float32."""
    return dtype if dtype in (jnp.bfloat16, jnp.float16) else F32


def compiler_params(cfg: BlockConfig, kind: str, mode: GateMode | None = None):
    """Triton launch parameters of a kernel ``kind``: "chunk", "state", "backward" or
    "output_backward". ``cfg`` is a ``BlockConfig`` or the per-channel linear-attention kernels'
    ``ChannelConfig`` (the same launch fields, no ``num_warps_output_bwd``: its output backward
    takes ``num_warps_bwd``). ``mode`` "channel" (the exact diagonal sub-tiles) takes
    ``num_stages_bwd_exact`` where it is set."""
    if kind == "chunk":
        return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if kind == "state":
        return plgpu.CompilerParams(num_warps=cfg.num_warps_state, num_stages=cfg.num_stages_state)
    if kind not in ("backward", "output_backward"):
        raise ValueError(f"unknown kernel kind {kind!r}")
    warps = cfg.num_warps_bwd
    if kind == "output_backward":
        warps = getattr(cfg, "num_warps_output_bwd", None) or warps
    stages = cfg.num_stages_bwd
    if mode == "channel" and getattr(cfg, "num_stages_bwd_exact", None) is not None:
        stages = cfg.num_stages_bwd_exact
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


class Layout:
    """Static sizes of one call: q/k ``[B, T, H, D]``, v ``[B, T, Hv, E]`` (T whole chunks)."""

    def __init__(self, q, v, cfg: BlockConfig, mode: GateMode, *, heads: int | None = None, block_e: int | None = None):
        self.batch, self.seq_len, self.heads, self.dim = q.shape
        self.heads = heads or self.heads  # q/k heads when ``q`` is a per-value-head array
        self.value_heads, self.value_dim = v.shape[2], v.shape[3]
        self.group = self.value_heads // self.heads
        self.chunk = cfg.chunk
        if self.seq_len % self.chunk:
            raise ValueError(f"seq_len={self.seq_len} must be a multiple of chunk={self.chunk}")
        self.num_chunks = self.seq_len // self.chunk
        self.block_e = min(block_e or cfg.block_e, self.value_dim)
        self.mode = mode
        if cfg.fuse_output and mode in CHANNEL_MODES:
            raise ValueError("BlockConfig.fuse_output needs scalar or no gates (per-channel outputs walk key blocks)")
        self.mxu = mxu_dtype(q.dtype)
        # sub-tiles of the output's Q Kᵀ ⊙ Γ: per-channel gates factor between ``channel_rows`` tiles
        self.parts = self.chunk // cfg.channel_rows if mode in CHANNEL_MODES else 1
        # the forward output kernel's own (``BlockConfig.output_rows``; its stored scores are read back
        # as ``parts`` blocks, which lie inside its larger ones)
        self.output_parts = self.chunk // (cfg.output_rows or cfg.channel_rows) if mode in CHANNEL_MODES else 1
        # sub-tiles of the WY kernels (``BlockConfig.wy_rows``; ``channel_rows`` for per-channel gates)
        self.wy_parts = self.chunk // (cfg.channel_rows if mode in CHANNEL_MODES else min(cfg.wy_rows, self.chunk))
        # the forward stores X (``BlockConfig.store_inverse``) and the WY backward reads it: on whole
        # chunks under scalar or no gates, as the ``channel_rows`` blocks per channel
        self.store_inverse = cfg.store_inverse
        self.wy_bwd_parts = 1 if cfg.store_inverse and mode not in CHANNEL_MODES else self.wy_parts
        if mode in CHANNEL_MODES and cfg.wy_bwd_rows:  # the stored X is whole (zeros above its blocks)
            self.wy_bwd_parts = self.chunk // cfg.wy_bwd_rows
        # per-channel gates: the state passes read gated keys and queries (``pregated_operands``)
        self.pregated = cfg.pregated_state and mode in CHANNEL_MODES

    # -- chunk-parallel grid (c, b, h) --

    def chunk_grid(self):
        return (self.num_chunks, self.batch, self.value_heads)

    def chunk_spec(self, width: int, *, qk: bool = False):
        """One chunk ``[C, width]`` of a ``[B, T, heads, width]`` array (q/k: through the group)."""
        group = self.group if qk else 1
        return pl.BlockSpec((None, self.chunk, None, width), lambda c, b, h: (b, c, h // group, 0))

    def chunk_row_spec(self):
        """One chunk ``[C]`` of a per-token ``[B, Hv, T]`` row (β, scalar gates)."""
        return pl.BlockSpec((None, None, self.chunk), lambda c, b, h: (b, h, c))

    def chunk_state_spec(self):
        """The ``[D, E]`` state of chunk c in ``[B, Hv, NC, D, E]``."""
        return pl.BlockSpec((None, None, None, self.dim, self.value_dim), lambda c, b, h: (b, h, c, 0, 0))

    @property
    def gate_kind(self) -> str:
        """The gate's shape: "none", "scalar" or "channel" (either per-channel mode)."""
        return "channel" if self.mode in CHANNEL_MODES else self.mode

    def chunk_gate_specs(self, has_docs: bool) -> list:
        """Specs of the gate (if any) and document rows (if any), in ``gate_inputs`` order."""
        gate = {"none": [], "scalar": [self.chunk_row_spec()], "channel": [self.chunk_spec(self.dim)]}[self.gate_kind]
        docs = [pl.BlockSpec((None, self.chunk), lambda c, b, h: (b, c))] * 2 if has_docs else []
        return gate + docs

    # -- state-pass grid (j, b, h) --

    def state_grid(self):
        return (self.value_dim // self.block_e, self.batch, self.value_heads)

    def seq_spec(self, width: int, *, qk: bool = False, blocked: bool = False):
        """All ``[T, width]`` rows of one head (``blocked``: value block j of the last dim)."""
        group = self.group if qk else 1
        if blocked:
            return pl.BlockSpec((None, self.seq_len, None, self.block_e), lambda j, b, h: (b, 0, h // group, j))
        return pl.BlockSpec((None, self.seq_len, None, width), lambda j, b, h: (b, 0, h // group, 0))

    def chunk_gamma_spec(self):
        """Every chunk's ``[D]`` decay ``[NC, D]`` of a ``[B, Hv, NC, D]`` array (``pregated_operands``)."""
        return pl.BlockSpec((None, None, self.num_chunks, self.dim), lambda j, b, h: (b, h, 0, 0))

    def states_spec(self):
        """Value block j of every chunk's state ``[NC, D, block_e]`` in ``[B, Hv, NC, D, E]``."""
        shape = (None, None, self.num_chunks, self.dim, self.block_e)
        return pl.BlockSpec(shape, lambda j, b, h: (b, h, 0, 0, j))

    def state_spec(self):
        """Value block j of a ``[B, Hv, D, E]`` state."""
        return pl.BlockSpec((None, None, self.dim, self.block_e), lambda j, b, h: (b, h, 0, j))

    def seq_gate_specs(self, has_docs: bool) -> list:
        gate = {
            "none": [],
            "scalar": [pl.BlockSpec((None, None, self.seq_len), lambda j, b, h: (b, h, 0))],
            "channel": [self.seq_spec(self.dim)],
        }[self.gate_kind]
        docs = [pl.BlockSpec((None, self.seq_len), lambda j, b, h: (b, 0))] * 2 if has_docs else []
        return gate + docs

    # -- shapes --

    def states_shape(self, dtype):
        return jax.ShapeDtypeStruct((self.batch, self.value_heads, self.num_chunks, self.dim, self.value_dim), dtype)

    def values_shape(self, dtype, width: int | None = None):
        return jax.ShapeDtypeStruct((self.batch, self.seq_len, self.value_heads, width or self.value_dim), dtype)


def pregated_operands(k, b, docs, lay, q=None):
    """Per-channel gates (``BlockConfig.pregated_state``): the state passes' gated operands formed once
    per call, in XLA, instead of in every value-block program at every step: ``(e^{b_last − b} ⊙ K,
    γ, e^b ⊙ Q or None)``, the gated keys (and queries, given ``q``) ``[B, T, Hv, D]`` in the matmul
    operand dtype (per value head) and each chunk's decay ``γ = e^{b_last}`` ``[B, Hv, NC, D]`` float32,
    with ``common.gate_factors``'s document masks; the same factors and the same rounding (a float32
    product cast to the operand dtype) as the kernels' ``gated_dot``. ``b``: the chunk-local
    cumulative log gates ``[B, T, Hv, D]``, ``docs``: ``(doc, prev)`` rows ``[B, T]`` or None; ``lay``: the
    call's layout (its ``chunk`` and ``mxu``; the per-channel linear attention's passes its own)."""
    bsz, t, hv, d = b.shape
    nc, c = t // lay.chunk, lay.chunk
    # broadcasts in the time-major layout, each chunk's last row a strided slice: in-kernel helpers
    # such as ``last_row`` (a masked sum) would make XLA transpose the whole float32 tensor first
    chunks = b.reshape(bsz, nc, c, hv, d)
    b_last = chunks[:, :, -1:]  # [B, NC, 1, Hv, D]
    to_end, gamma = jnp.exp(b_last - chunks), jnp.exp(b_last[:, :, 0])
    to_row = None if q is None else jnp.exp(chunks)
    if docs is not None:  # the factors ``common.gate_factors`` gives each chunk with its ``Docs``
        doc, prev = (x.reshape(bsz, nc, c) for x in docs)
        first_prev, last = prev[:, :, :1], doc[:, :, -1:]  # [B, NC, 1]: Docs.prev, Docs.last
        to_end = jnp.where((doc == last)[..., None, None], to_end, 0.0)
        gamma = jnp.where((last == first_prev)[..., None], gamma, 0.0)
        to_row = None if q is None else jnp.where((doc == first_prev)[..., None, None], to_row, 0.0)

    def gated(x, factor):  # [B, T, H, D] through the value heads, times [B, NC, C, Hv, D]
        x = jnp.repeat(x, hv // x.shape[2], axis=2).astype(F32)
        return (x * factor.reshape(bsz, t, hv, d)).astype(lay.mxu)

    return gated(k, to_end), gamma.transpose(0, 2, 1, 3), None if q is None else gated(q, to_row)


def gate_inputs(b, docs) -> list:
    """The gate (if any) and the document rows (if any) that every kernel takes after its tensors."""
    return ([] if b is None else [b]) + ([] if docs is None else list(docs))


def pop_gate_refs(refs: list, *, mode: GateMode, has_docs: bool):
    """``(gate_ref or None, (doc_ref, prev_ref) or None)`` taken off the front of ``refs``."""
    gate_ref = refs.pop(0) if mode != "none" else None
    doc_refs = (refs.pop(0), refs.pop(0)) if has_docs else None
    return gate_ref, doc_refs


def load_rows(ref, start=None, size=None):
    """Rows ``[start, start + size)`` of a ``[n]`` or ``[n, w]`` ref (all rows when start is None)."""
    if ref is None:
        return None
    if start is None:
        return ref[...]
    index = (pl.ds(start, size),) + (slice(None),) * (len(ref.shape) - 1)
    return ref[index]


def load_docs(doc_refs, start=None, size=None) -> Docs | None:
    """One chunk's ``Docs`` from the ``doc`` and ``prev`` rows (None without documents)."""
    if doc_refs is None:
        return None
    doc_ref, prev_ref = doc_refs
    doc, prev = load_rows(doc_ref, start, size), load_rows(prev_ref, start, size)
    pos = lax.broadcasted_iota(jnp.int32, prev.shape, 0)
    return Docs(doc, jnp.sum(jnp.where(pos == 0, prev, 0)), last_row(doc))


def load_tiles(ref, parts: int) -> list | None:
    """A chunk block ``[C]`` / ``[C, w]`` as ``parts`` row tiles, each its own load (no splits of
    values inside the kernel); None for a missing input."""
    if ref is None:
        return None
    rows = ref.shape[0] // parts
    rest = (slice(None),) * (len(ref.shape) - 1)
    return [ref[(pl.ds(i * rows, rows),) + rest] for i in range(parts)]


def load_col_tiles(ref, parts: int, start, width: int) -> list | None:
    """Columns ``[start, start + width)`` of a chunk block ``[C, w]`` as ``parts`` row tiles."""
    if ref is None:
        return None
    rows = ref.shape[0] // parts
    return [ref[pl.ds(i * rows, rows), pl.ds(start, width)] for i in range(parts)]


def store_col_tiles(ref, tiles: list, start):
    """Writes row tiles into columns ``[start, start + width)`` of a chunk block ``[C, w]``."""
    for i, tile in enumerate(tiles):
        rows, width = tile.shape
        ref[pl.ds(i * rows, rows), pl.ds(start, width)] = tile.astype(ref.dtype)


def store_lower_blocks(ref, blocks: dict, parts: int, rows: int):
    """Writes the lower blocks ``{(i, j): [rows, rows]}`` (j ≤ i) of a chunk's ``C × C`` matrix into
    a chunk block ``[C, C]``, block column by block column, zeros above the diagonal blocks."""
    for j in range(parts):
        column = [blocks[i, j] if j <= i else jnp.zeros((rows, rows), ref.dtype) for i in range(parts)]
        store_col_tiles(ref, column, j * rows)


def load_lower_blocks(ref, parts: int) -> dict:
    """The lower blocks ``{(i, j): [rows, rows]}`` (j ≤ i) of a chunk block ``[C, C]``."""
    rows = ref.shape[0] // parts
    return {(i, j): ref[pl.ds(i * rows, rows), pl.ds(j * rows, rows)] for i in range(parts) for j in range(i + 1)}


def key_chunk(k_ref, gate_ref, beta: list, docs: Docs | None, start, *, mode: GateMode, width: int) -> common.Chunk:
    """The chunk restricted to key columns ``[start, start + width)`` (per-channel gates too)."""
    parts = len(beta)
    gate = load_col_tiles(gate_ref, parts, start, width) if mode in CHANNEL_MODES else load_tiles(gate_ref, parts)
    keys = load_col_tiles(k_ref, parts, start, width)
    return common.make_chunk(keys, [None] * parts, beta, gate, docs, sub=SUB_TILE)


def value_chunk(v_ref, beta: list, start, *, width: int) -> common.Chunk:
    """The chunk's value columns ``[start, start + width)`` (for the value side of the WY form)."""
    parts = len(beta)
    return common.make_chunk([None] * parts, load_col_tiles(v_ref, parts, start, width), beta, None, None, sub=SUB_TILE)


def zero_blocks(parts: int, rows: int) -> dict:
    """Float32 zeros for the lower ``[rows, rows]`` blocks of a ``parts × parts`` block matrix."""
    return {(i, j): jnp.zeros((rows, rows), F32) for i in range(parts) for j in range(i + 1)}


def load_doc_tiles(doc_refs, parts: int) -> Docs | None:
    """One chunk's ``Docs`` with ``doc`` as row tiles (None without documents)."""
    if doc_refs is None:
        return None
    doc_ref, prev_ref = doc_refs
    doc = load_tiles(doc_ref, parts)
    first = load_tiles(prev_ref, parts)[0]
    pos = lax.broadcasted_iota(jnp.int32, first.shape, 0)
    return Docs(doc, jnp.sum(jnp.where(pos == 0, first, 0)), last_row(doc[-1]))


def store_tiles(ref, tiles: list, start=0):
    """Writes row tiles one after another from row ``start`` of a ``[n]`` or ``[n, w]`` ref, cast to its dtype."""
    for i, tile in enumerate(tiles):
        index = (pl.ds(start + i * tile.shape[0], tile.shape[0]),) + (slice(None),) * (len(ref.shape) - 1)
        ref[index] = tile.astype(ref.dtype)


class Residuals(NamedTuple):
    """What the backward pass reads: the padded inputs and the forward's intermediates.

    ``w`` ``[B, T, Hv, D]`` (the WY keys), ``h`` ``[B, Hv, NC, D, E]`` (the state entering each
    chunk), ``v_new`` ``[B, T, Hv, E]`` (V' = U − W S), in the matmul operand dtype; ``x`` ``[B, T,
    Hv, C]`` in the matmul operand dtype (row t: row ``t mod C`` of its chunk's ``(I + A)⁻¹``) with
    ``BlockConfig.store_inverse``, else None; ``z`` ``[B, T, Hv, C]`` (the chunk's score blocks ``Q Kᵀ ⊙
    Γ ⊙ causal``, same layout, matmul operand dtype) with ``BlockConfig.store_scores``, else None.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    beta: jax.Array
    b: jax.Array | None
    docs: tuple | None
    w: jax.Array
    h: jax.Array
    v_new: jax.Array
    x: jax.Array | None = None
    z: jax.Array | None = None


def chunk_cumsum(g, chunk: int, axis: int):
    """Chunk-local inclusive cumulative sums of g along ``axis`` (float32)."""
    shape = g.shape
    split = shape[:axis] + (shape[axis] // chunk, chunk) + shape[axis + 1 :]
    return lax.cumsum(g.astype(F32).reshape(split), axis=axis + 1).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnames=("chunk", "interpret"))
def channel_chunk_cumsum(g, chunk: int, interpret: bool):
    """``chunk_cumsum(g, chunk, axis=1)`` of per-channel gates ``[B, T, H, D]`` (float32, T whole
    chunks) as one Pallas kernel, one program per (row, chunk, head) summing its ``[C, D]`` block
    down the chunk (``BlockConfig.cumsum_kernel``, instead of XLA's cumsum over the whole float32
    tensor). Its gradient, the chunk-local reverse sums, is a second kernel of the same grid
    (``_chunk_suffix_kernel``)."""
    return _chunk_cumsum_call(g, chunk, interpret)


def _chunk_cumsum_fwd(g, chunk, interpret):
    return _chunk_cumsum_call(g, chunk, interpret), None


def _chunk_cumsum_bwd(chunk, interpret, _, db):
    return (_chunk_cumsum_call(db, chunk, interpret, reverse=True),)


channel_chunk_cumsum.defvjp(_chunk_cumsum_fwd, _chunk_cumsum_bwd)

SUFFIX_TILE = 16  # rows per exact [tile, tile] product of the reverse sums


def _chunk_cumsum_kernel(x_ref, o_ref):
    o_ref[...] = jnp.cumsum(x_ref[...], axis=0)


def _chunk_suffix_kernel(x_ref, o_ref):
    """The reverse sums ``Σ_{u ≥ t} x_u`` of one ``[C, D]`` block. Pallas Triton lowers no reverse
    scan, and the block's total minus each prefix would lose the relative accuracy of the small sums
    near the chunk's end when its early rows are larger. Here each sum adds only its own terms: per
    tile of rows an exact float32 product with the upper-triangular ones (``Σ_{u ≥ t}`` inside the
    tile), plus the totals of the later tiles. One difference from XLA's reverse cumsum: an inf or
    NaN makes the later rows of its tile NaN too (0 · inf in the product), where XLA keeps them
    finite; non-finite cotangents of the gates only follow an overflow, after which that chunk's
    gradient is not finite either way."""
    c = x_ref.shape[0]
    tile = min(SUFFIX_TILE, c)
    row, col = (lax.broadcasted_iota(jnp.int32, (tile, tile), i) for i in (0, 1))
    upper = jnp.where(col >= row, 1.0, 0.0).astype(F32)
    later = None  # Σ of the tiles after this one, [D]
    for start in reversed(range(0, c, tile)):
        x = x_ref[pl.ds(start, tile), :]
        sums = lax.dot(upper, x, precision=lax.Precision.HIGHEST, preferred_element_type=F32)
        o_ref[pl.ds(start, tile), :] = sums if later is None else sums + later[None, :]
        total = jnp.sum(x, axis=0)
        later = total if later is None else later + total


def _chunk_cumsum_call(x, chunk: int, interpret: bool, *, reverse: bool = False):
    b, t, h, d = x.shape
    if t % chunk:
        raise ValueError(f"channel_chunk_cumsum: T={t} of g{tuple(x.shape)} is not a multiple of chunk={chunk}")
    if reverse and chunk > SUFFIX_TILE and chunk % SUFFIX_TILE:
        raise ValueError(f"channel_chunk_cumsum: chunk={chunk} must be a multiple of {SUFFIX_TILE} (or smaller)")
    spec = pl.BlockSpec((None, chunk, None, d), lambda i, c, j: (i, c, j, 0))
    return pl.pallas_call(
        _chunk_suffix_kernel if reverse else _chunk_cumsum_kernel,
        grid=(b, t // chunk, h),
        in_specs=[spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(x.shape, F32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="gated_delta_rule_chunk_suffix_sum" if reverse else "gated_delta_rule_chunk_cumsum",
    )(x.astype(F32))


# ---- splits: rows of whole chunks run in parallel as if they were batch rows -------------------


def to_splits(x, splits: int, *, time_axis: int = 1):
    """``[B, T, ...]`` (time on ``time_axis``, 1 or 2) → ``[B·S, T / S, ...]``: each row cut into
    ``splits`` runs of equal length, each run a row of its own (None stays None)."""
    if x is None or splits == 1:
        return x
    shape = x.shape
    t = shape[time_axis]
    x = x.reshape(shape[:time_axis] + (splits, t // splits) + shape[time_axis + 1 :])
    if time_axis == 2:  # [B, Hv, S, T/S, ...] → [B, S, Hv, T/S, ...]
        x = jnp.swapaxes(x, 1, 2)
    return x.reshape((shape[0] * splits,) + x.shape[2:])


def from_splits(x, splits: int, *, time_axis: int = 1):
    """The inverse of ``to_splits``."""
    if x is None or splits == 1:
        return x
    b = x.shape[0] // splits
    x = x.reshape((b, splits) + x.shape[1:])
    if time_axis == 2:
        x = jnp.swapaxes(x, 1, 2)
    shape = x.shape
    return x.reshape(shape[:time_axis] + (shape[time_axis] * shape[time_axis + 1],) + shape[time_axis + 2 :])


def _by_split(x, splits: int):
    """``[B·S, ...]`` → ``[S, B, ...]`` (scan order)."""
    return jnp.swapaxes(x.reshape((x.shape[0] // splits, splits) + x.shape[1:]), 0, 1)


def _by_row(x):
    """``[S, B, ...]`` → ``[B·S, ...]``."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def entering_states(phi, m, s0, splits: int):
    """The state entering each split ``[B·S, Hv, D, E]``: ``S_in(0) = s0``,
    ``S_in(s + 1) = Φ_s S_in(s) + M_s`` (float32, HIGHEST precision)."""

    def step(state, transition):
        phi_s, m_s = transition
        nxt = jnp.einsum("bhij,bhje->bhie", phi_s, state, precision=lax.Precision.HIGHEST) + m_s
        return nxt, state

    _, states = lax.scan(step, s0, (_by_split(phi, splits), _by_split(m, splits)))
    return _by_row(states)


def compose_transitions(phi, m, splits: int):
    """The transition ``(Φ [B, Hv, D, D], M [B, Hv, D, E])`` of whole rows from those of their
    splits ``[B·S, ...]`` in order: ``Φ = Φ_{S−1} ⋯ Φ_0``, ``M`` the state leaving the last split
    from a zero state (float32, HIGHEST precision)."""

    def step(carry, transition):
        total, state = carry
        phi_s, m_s = transition
        total = jnp.einsum("bhij,bhjk->bhik", phi_s, total, precision=lax.Precision.HIGHEST)
        state = jnp.einsum("bhij,bhje->bhie", phi_s, state, precision=lax.Precision.HIGHEST) + m_s
        return (total, state), None

    phi_s, m_s = _by_split(phi, splits), _by_split(m, splits)
    eye = jnp.broadcast_to(jnp.eye(phi.shape[-1], dtype=phi.dtype), phi_s.shape[1:])
    (total, state), _ = lax.scan(step, (eye, jnp.zeros_like(m_s[0])), (phi_s, m_s))
    return total, state


def leaving_cotangents(phi, local, d_final, splits: int):
    """The cotangent of the state leaving each split ``[B·S, Hv, D, E]``: ``d_final`` for the
    last, ``Φ_{s+1}ᵀ dS_out(s + 1) + dS_in_local(s + 1)`` before it; and the one entering the first
    split ``[B, Hv, D, E]`` (``Φ_0ᵀ dS_out(0) + dS_in_local(0)``)."""

    def step(d_out, transition):
        phi_s, local_s = transition  # of the split this cotangent leaves
        prev = jnp.einsum("bhji,bhje->bhie", phi_s, d_out, precision=lax.Precision.HIGHEST) + local_s
        return prev, d_out

    d_in, d_outs = lax.scan(step, d_final, (_by_split(phi, splits), _by_split(local, splits)), reverse=True)
    return _by_row(d_outs), d_in
