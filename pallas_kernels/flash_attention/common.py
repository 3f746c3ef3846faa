"""What the Pallas flash-attention forward (``pallas_triton``) and backward (``pallas_triton_vjp``) share.

Causal visibility at global offsets: queries sit at ``q_start + i``, keys at ``k_start + j``, and
query i sees key j iff ``q_start + i ≥ k_start + j``; the kernels get ``shift = q_start − k_start``
as a one-element int32 input. Here: the key-block loop bounds that follow from it, the tile masks
(causal, same document), the document block bounds used to skip tiles, the padding of lengths and
head dims to whole blocks, and the checks of what the kernels take.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import KERNEL_DTYPES, MAX_ELEMENTS, kernel_width, on_gpu, pad_dim
from pallas_kernels.flash_attention.config import BlockConfig, default_config

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# padded queries and keys get different document ids: a padded row sees no key, no padded key is seen
Q_PAD_DOC, K_PAD_DOC = -1, -2


# ---- loop bounds and tile masks -------------------------------------------------------------


def cdiv(x, n: int):
    """⌈x / n⌉ of a traced int32 x, 0 for x ≤ 0 (lax.div truncates, so keep it non-negative)."""
    return lax.div(jnp.maximum(x, 0) + (n - 1), n)


def key_block_range(q_first, shift, *, block_q: int, block_k: int, k_len: int, num_k_blocks: int):
    """(fully visible, visible) key-block counts for query rows ``[q_first, q_first + block_q)``.

    Key block kb is fully visible when its last key is at or before the first query row
    (``(kb + 1)·block_k − 1 ≤ q_first + shift``) and inside the keys; it is visible when its
    first key is at or before the last query row. Blocks ``[0, full)`` need no mask, blocks
    ``[full, visible)`` do, the rest are wholly in the future.
    """
    full = jnp.minimum(lax.div(jnp.maximum(q_first + shift + 1, 0), block_k), k_len // block_k)
    visible = jnp.minimum(cdiv(q_first + block_q + shift, block_k), num_k_blocks)
    return full, visible


def causal_mask(q_first, k_first, shift, *, rows: int, cols: int, k_len: int, transpose: bool = False):
    """Which (query, key) pairs of a tile are visible, ``[rows, cols]``: query rows × key columns,
    or key rows × query columns when ``transpose``. Padded keys (≥ k_len) are never visible."""
    r = lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    c = lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    q_pos, k_pos = (c + q_first, r + k_first) if transpose else (r + q_first, c + k_first)
    return (k_pos <= q_pos + shift) & (k_pos < k_len)


def same_document(q_docs, k_docs, *, transpose: bool = False):
    """``[rows, cols]``: query and key in one document (key rows × query columns when ``transpose``)."""
    return (k_docs[:, None] == q_docs[None, :]) if transpose else (q_docs[:, None] == k_docs[None, :])


class Loop(NamedTuple):
    """One kernel loop over blocks ``[start, stop)`` and the masks its tiles need."""

    start: jax.Array
    stop: jax.Array
    causal: bool  # tiles may cross the causal diagonal or the end of the keys
    docs: bool  # tiles may pair rows and columns of different documents


def around_single_document(start, stop, same_lo, same_hi, *, causal: bool) -> list[Loop]:
    """``[start, stop)`` as three loops: the blocks of ``[same_lo, same_hi)`` (one document on both
    sides of every tile) without the document mask, between two loops with it."""
    lo = jnp.clip(same_lo, start, stop)
    hi = jnp.clip(same_hi, lo, stop)
    return [Loop(start, lo, causal, True), Loop(lo, hi, causal, False), Loop(hi, stop, causal, True)]


def key_loops(full, visible, has_docs: bool, bounds=None) -> list[Loop]:
    """The key-block loops of a query-block program (forward, dq): ``[0, full)`` without the causal
    mask, ``[full, visible)`` with it. ``bounds`` (sorted documents): the first key block of the rows'
    documents (earlier ones are skipped) and the single-document key blocks ``[lo, hi)``
    (``single_document_blocks``), which need no document mask either."""
    if bounds is None:
        return [Loop(0, full, False, has_docs), Loop(full, visible, True, has_docs)]
    first, same_lo, same_hi = bounds
    unmasked = around_single_document(jnp.minimum(first, full), full, same_lo, same_hi, causal=False)
    return [*unmasked, Loop(jnp.maximum(first, full), visible, True, True)]


def query_loops(first, full, stop, has_docs: bool, bounds=None) -> list[Loop]:
    """The query-block loops of a key-block program (dk/dv): ``[first, full)`` with the causal mask,
    ``[full, stop)`` without. ``bounds`` (sorted documents): the single-document query blocks
    ``[lo, hi)``, which need no document mask either."""
    if bounds is None:
        return [Loop(first, full, True, has_docs), Loop(full, stop, False, has_docs)]
    return [Loop(first, full, True, True), *around_single_document(full, stop, *bounds, causal=False)]


def both(*masks):
    """The AND of the masks given (None entries skipped); None when there are none (no masking)."""
    masks = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, masks) if masks else None


# ---- documents: padded ids and the block bounds that skip other documents ---------------------

# binary search unrolled (log2 L steps in one program): jnp's default ("scan") is a while loop, whose
# every step reads its condition back on a GPU (H200, 8K-token documents at sp=2: ~300 round trips and
# 2.3 ms of idle device per rank's fwd+bwd, session 16)
SEARCH = "scan_unrolled"


def padded_ids(segment_ids, length: int, pad_value: int):
    """``[B, L]`` int32 ids padded to ``length`` with ``pad_value`` (``Q_PAD_DOC`` or ``K_PAD_DOC``)."""
    ids = segment_ids.astype(jnp.int32)
    return jnp.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=pad_value)


def first_key_blocks(q_ids, k_ids, *, block_q: int, block_k: int, num_q_blocks: int):
    """``[B, num_q_blocks]`` int32: for ids non-decreasing along each row (document numbers), the
    first key block any row of each query block can see (its first row's document starts there;
    later rows' documents start no earlier). Blocks of padding rows get 0 (nothing skipped)."""
    firsts = q_ids[:, ::block_q].astype(jnp.int32)  # first row of every block holding real rows
    key = jax.vmap(lambda k, x: jnp.searchsorted(k, x, side="left", method=SEARCH))(k_ids.astype(jnp.int32), firsts)
    blocks = (key // block_k).astype(jnp.int32)
    return jnp.pad(blocks, ((0, 0), (0, num_q_blocks - blocks.shape[1])))


def single_document_blocks(row_ids, col_ids, *, block_rows: int, block_cols: int, num_row_blocks: int):
    """Two ``[B, num_row_blocks]`` int32 ``(lo, hi)``: for ids non-decreasing along each row
    (document numbers), the column blocks ``[lo, hi)`` wholly inside the one document that holds
    every real row of each row block, whose tiles need no document mask; ``lo = hi`` where a block's
    rows span documents or are all padding. Rows are queries and columns keys for the forward and
    dq kernels, the other way round for the dk/dv kernel; both ids unpadded."""
    length = row_ids.shape[1]
    row_ids, col_ids = row_ids.astype(jnp.int32), col_ids.astype(jnp.int32)
    starts = jnp.arange(num_row_blocks) * block_rows
    lasts = jnp.minimum(starts + block_rows, length) - 1
    doc = row_ids[:, jnp.minimum(starts, length - 1)]
    one_doc = (doc == row_ids[:, lasts]) & (starts < length)[None, :]

    def find(side):
        return jax.vmap(lambda cols, x: jnp.searchsorted(cols, x, side=side, method=SEARCH))(col_ids, doc)

    lo = -(-find("left") // block_cols)  # first column block starting in the document
    hi = jnp.maximum(find("right") // block_cols, lo)  # end of the column blocks ending in it
    return jnp.where(one_doc, lo, 0).astype(jnp.int32), jnp.where(one_doc, hi, 0).astype(jnp.int32)


def query_block_ends(q_ids, k_ids, *, block_q: int, block_k: int, num_k_blocks: int, num_q_blocks: int):
    """``[B, num_k_blocks]`` int32: for non-decreasing ids, how many query blocks can see any key of
    each key block (queries of later documents than its last key's see none of it). Blocks of
    padding keys get ``num_q_blocks`` (nothing skipped)."""
    lk = k_ids.shape[1]
    lasts = jnp.minimum(jnp.arange(num_k_blocks) * block_k + block_k - 1, lk - 1)
    last_ids = k_ids[:, lasts].astype(jnp.int32)
    rows = jax.vmap(lambda q, x: jnp.searchsorted(q, x, side="right", method=SEARCH))(q_ids.astype(jnp.int32), last_ids)
    ends = -(-rows // block_q)
    padding = jnp.arange(num_k_blocks) * block_k >= lk
    return jnp.where(padding[None, :], num_q_blocks, ends).astype(jnp.int32)


def check_documents(q, k, q_segment_ids, k_segment_ids):
    """Both or neither, each ``[B, L]`` integers matching its q or k."""
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("q_segment_ids and k_segment_ids go together: pass both or neither")
    if q_segment_ids is None:
        return
    for name, ids, x in (("q_segment_ids", q_segment_ids, q), ("k_segment_ids", k_segment_ids, k)):
        if ids.shape != x.shape[:2] or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be integers of shape [B, L] = {tuple(x.shape[:2])}, got {ids.dtype}{list(ids.shape)}"
            )


# ---- program order: heavy query blocks first ---------------------------------------------------


def heavy_first(num_q_blocks: int):
    """The query block of grid index i, last block first.

    Under the causal mask a later query block sees more keys; launching the heavy blocks first
    leaves light ones for the tail of the launch, where idle SMs would otherwise wait on the
    heaviest programs. Kernels recover their block with ``query_block_of_program``.
    """
    return lambda i: num_q_blocks - 1 - i


def query_block_of_program():
    """Inside a kernel whose grid axis 0 runs over query blocks in ``heavy_first`` order: its block."""
    return pl.num_programs(0) - 1 - pl.program_id(0)


def bound_spec_q(num_q_blocks: int):
    """One int32 per (batch row, query block), ``heavy_first`` order: the first key block of ``first_key_blocks``."""
    block = heavy_first(num_q_blocks)
    return pl.BlockSpec((None, None), lambda i, bb, hh: (bb, block(i)))


# ---- shapes, padding, the offset operand, what the kernels take -------------------------------


def fit_block(block: int, length: int) -> int:
    """The configured block, shrunk to the padded length of a short sequence."""
    return min(block, pad_dim(length))


def pad_to(x, length: int, width: int | None = None, value=0.0):
    """Pad axis 1 of ``[B, L, heads, X]`` (or the last axis of ``[B, H, L]``) to ``length``, X to ``width``."""
    if x.ndim == 3:
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2])), constant_values=value)
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, width - x.shape[3])))


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def shift_operand(q_start, k_start):
    """``q_start − k_start`` as the kernels' one-element int32 input."""
    return (jnp.asarray(q_start, jnp.int32) - jnp.asarray(k_start, jnp.int32)).reshape(1)


SHIFT_SPEC = pl.BlockSpec((None,), lambda *_: (0,))


def supports(q, k, v) -> bool:
    """Whether the kernels take these inputs: dtypes, and int32 element offsets after padding."""
    if any(x.dtype not in KERNEL_DTYPES for x in (q, k, v)):
        return False
    b, lq, h, _ = q.shape
    lk, hk = k.shape[1], k.shape[2]
    width = kernel_width(q, v)
    return b * (lq + 128) * h * width <= MAX_ELEMENTS and b * (lk + 128) * hk * width <= MAX_ELEMENTS


def fits_shared_memory(q, k, v) -> bool:
    """Whether the compiled kernels' default tiles are known to fit a GPU's shared memory: heads up
    to 128 wide (H200, session 16: 128-wide float32 runs at 128×64 forward tiles; 256-wide float32
    asked 279,040 bytes of 232,448 at 128×32, and 256-wide bf16 was never run). The interpreter has
    no such limit."""
    return kernel_width(q, v) <= 128


def compiled_kernels_take(q, k, v) -> bool:
    """Whether ``impl="auto"`` may run the compiled kernels on these inputs: ``supports`` (dtypes,
    int32 offsets) and ``fits_shared_memory`` (the default tiles' width)."""
    return supports(q, k, v) and fits_shared_memory(q, k, v)


def resolve(q, k, v, interpret: bool | None, config: BlockConfig | None):
    """(interpret, config, compute dtype) after checking what the kernels take."""
    if interpret is None:
        interpret = not on_gpu()
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"the Pallas flash-attention kernels take bf16, fp16 or fp32 inputs, got "
            f"q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}"
        )
    if not supports(q, k, v):
        raise ValueError(
            f"inputs too large for int32 element offsets: q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, "
            f"v.shape={tuple(v.shape)}"
        )
    if not interpret and config is None and not fits_shared_memory(q, k, v):
        raise ValueError(
            "the compiled Pallas flash-attention kernels take heads up to 128 wide (wider ones exceeded an H200's "
            f"shared memory or were never run): got q {q.dtype}{tuple(q.shape)}, v {v.dtype}{tuple(v.shape)}; "
            "use impl='xla' (or 'cudnn' / 'cudnn_blocks' without documents), or pass a config with smaller tiles"
        )
    cfg = config or default_config(head_dim=kernel_width(q, v), interpret=interpret, dtype=dtype)
    return interpret, cfg, dtype
