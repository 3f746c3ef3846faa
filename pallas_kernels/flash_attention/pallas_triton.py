"""Causal flash attention of one query block set against one key block set, as Pallas Triton kernels: the forward.

The local compute of ``lasp_jax.softmax_attention`` (allgather, ring, single device). Queries sit
at global positions ``q_start + i``, keys at ``k_start + j`` (traced int32 scalars, e.g. from
``lax.axis_index`` inside ``shard_map``); query i sees key j iff ``q_start + i ≥ k_start + j``.
It computes exactly the jnp recurrence ``lasp_jax.softmax_attention._flash_fwd``:

    o_i = Σ_{j visible} softmax_j(scale · q_i·k_j) v_j,   lse_i = log Σ_{j visible} exp(scale · q_i·k_j)

with query head h reading key/value head ``h // (H // Hk)`` through the index maps (the repeat
is never materialised), float32 running max and sum (FlashAttention-2, arXiv 2307.08691), the
output in float32 (zero on rows with no visible key) and ``lse`` float32 (−inf on such rows),
so that ring attention can merge block results and the backward (``pallas_triton_vjp``) can
add the contributions of different key blocks.

Layout. One program per (query block, batch row, query head). The offset ``shift = q_start −
k_start`` reaches the kernel as a one-element int32 array; from it each program computes, with
traced loop bounds, the key blocks it must see: those wholly visible (a loop without a mask)
and those that cross the diagonal or the end of the keys (a masked loop). Key blocks wholly in
the program's future are never loaded. Head dims are padded to a power of two ≥ 16 and the
lengths to whole blocks outside the kernel: zero head columns are exact, padded keys are masked
(they are never seen), padded query rows are sliced off. Exponentials run in base 2 with
``log2 e`` folded into the logit scale.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.config import BlockConfig, default_config

_F32 = jnp.float32
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# the Triton lowering computes element offsets in int32
_MAX_ELEMENTS = 2**31 - 1
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


# ---- math shared by the forward and backward kernels ----------------------------------------


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """``a @ b`` (``aᵀ`` / ``bᵀ`` when asked) with float32 accumulation.

    HIGHEST keeps float32 operands exact (the Triton lowering maps DEFAULT to tf32 on some jax
    versions); bf16/fp16 operands go to the tensor cores either way.
    """
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=_F32)


def _cdiv(x, n: int):
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
    visible = jnp.minimum(_cdiv(q_first + block_q + shift, block_k), num_k_blocks)
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


def both(*masks):
    """The AND of the masks given (None entries skipped); None when there are none (no masking)."""
    masks = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, masks) if masks else None


def padded_ids(segment_ids, length: int, pad_value: int):
    """``[B, L]`` int32 ids padded to ``length`` with ``pad_value`` (padded queries and keys get
    different values, so a padded row sees no key and no padded key is seen)."""
    ids = segment_ids.astype(jnp.int32)
    return jnp.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=pad_value)


Q_PAD_DOC, K_PAD_DOC = -1, -2


def first_key_blocks(q_ids, k_ids, *, block_q: int, block_k: int, num_q_blocks: int):
    """``[B, num_q_blocks]`` int32: for ids non-decreasing along each row (document numbers), the
    first key block any row of each query block can see (its first row's document starts there;
    later rows' documents start no earlier). Blocks of padding rows get 0 (nothing skipped)."""
    firsts = q_ids[:, ::block_q].astype(jnp.int32)  # first row of every block holding real rows
    key = jax.vmap(lambda k, x: jnp.searchsorted(k, x, side="left"))(k_ids.astype(jnp.int32), firsts)
    blocks = (key // block_k).astype(jnp.int32)
    return jnp.pad(blocks, ((0, 0), (0, num_q_blocks - blocks.shape[1])))


def query_block_ends(q_ids, k_ids, *, block_q: int, block_k: int, num_k_blocks: int, num_q_blocks: int):
    """``[B, num_k_blocks]`` int32: for non-decreasing ids, how many query blocks can see any key of
    each key block (queries of later documents than its last key's see none of it). Blocks of
    padding keys get ``num_q_blocks`` (nothing skipped)."""
    lk = k_ids.shape[1]
    lasts = jnp.minimum(jnp.arange(num_k_blocks) * block_k + block_k - 1, lk - 1)
    last_ids = k_ids[:, lasts].astype(jnp.int32)
    rows = jax.vmap(lambda q, x: jnp.searchsorted(q, x, side="right"))(q_ids.astype(jnp.int32), last_ids)
    ends = -(-rows // block_q)
    padding = jnp.arange(num_k_blocks) * block_k >= lk
    return jnp.where(padding[None, :], num_q_blocks, ends).astype(jnp.int32)


BOUND_SPEC_Q = pl.BlockSpec((None, None), lambda i, bb, hh: (bb, i))  # one int32 per (row, block)


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


# ---- forward kernel -------------------------------------------------------------------------


def _forward_kernel(*refs, scale, block_q, block_k, k_len, segmented, skip):
    """o and lse of ``block_q`` query rows of one (batch row, head) against every visible key
    (with documents: visible and in the query row's document; with ``skip``, key blocks before
    the first row's document are not visited)."""
    refs = list(refs)
    lo_ref = refs.pop(4) if skip else None  # after shift, q, k, v
    if segmented:
        shift_ref, q_ref, k_ref, v_ref, q_doc_ref, k_doc_ref, o_ref, lse_ref = refs
        q_docs = q_doc_ref[...]
    else:
        shift_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    q_first = pl.program_id(0) * block_q
    shift = shift_ref[...]
    full, visible = key_block_range(
        q_first, shift, block_q=block_q, block_k=block_k, k_len=k_len, num_k_blocks=k_ref.shape[0] // block_k
    )
    lo = lo_ref[...] if skip else 0
    q = q_ref[...]
    qk_scale = scale * LOG2E

    def body(kb, carry, *, masked):
        m, row_sum, acc = carry  # running max (log2 units), running sum, unnormalised output
        k_first = pl.multiple_of(kb * block_k, block_k)
        k = k_ref[pl.ds(k_first, block_k), :]
        v = v_ref[pl.ds(k_first, block_k), :]
        s = dot(q, k, trans_b=True) * qk_scale
        mask = both(
            causal_mask(q_first, k_first, shift, rows=block_q, cols=block_k, k_len=k_len) if masked else None,
            same_document(q_docs, k_doc_ref[pl.ds(k_first, block_k)]) if segmented else None,
        )
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # rows with nothing visible yet keep m = −inf; exponentiate against 0 there (p = 0)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if mask is not None else m_new
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
        return m_new, alpha * row_sum + jnp.sum(p, axis=1), acc

    carry = (
        jnp.full((block_q,), -jnp.inf, _F32),
        jnp.zeros((block_q,), _F32),
        jnp.zeros((block_q, v_ref.shape[-1]), _F32),
    )
    carry = lax.fori_loop(jnp.minimum(lo, full), full, functools.partial(body, masked=False), carry)
    m, row_sum, acc = lax.fori_loop(jnp.maximum(lo, full), visible, functools.partial(body, masked=True), carry)
    seen = row_sum > 0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_sum[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(safe_sum)) * LN2, -jnp.inf)


# ---- shapes, padding, launch parameters (shared with the backward) ----------------------------


def pad_dim(n: int) -> int:
    """A head dim padded to a power of two ≥ 16 (tl.dot needs ≥ 16, loads need powers of two)."""
    return max(16, 1 << (n - 1).bit_length())


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


def resolve(q, k, v, interpret: bool | None, config: BlockConfig | None):
    """(interpret, config, compute dtype) after checking what the kernels take."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in DTYPES:
        raise TypeError(
            f"the Pallas flash-attention kernels take bf16, fp16 or fp32 inputs, got "
            f"q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}"
        )
    if not supports(q, k, v):
        raise ValueError(
            f"inputs too large for int32 element offsets: q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, "
            f"v.shape={tuple(v.shape)}"
        )
    cfg = config or default_config(head_dim=max(pad_dim(q.shape[-1]), pad_dim(v.shape[-1])), interpret=interpret)
    return interpret, cfg, dtype


def supports(q, k, v) -> bool:
    """Whether the kernels take these inputs: dtypes, and int32 element offsets after padding."""
    if any(x.dtype not in DTYPES for x in (q, k, v)):
        return False
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    width = max(pad_dim(d), pad_dim(v.shape[-1]))
    return b * (lq + 128) * h * width <= _MAX_ELEMENTS and b * (lk + 128) * hk * width <= _MAX_ELEMENTS


# ---- the forward pass -----------------------------------------------------------------------


def block_attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_start,
    k_start,
    scale: float,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
    documents_sorted: bool = False,
    interpret: bool | None = None,
    config: BlockConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal attention of queries at ``q_start + i`` against keys at ``k_start + j`` (Pallas Triton).

    Args:
      q: ``[B, Lq, H, D]``; k: ``[B, Lk, Hk, D]``; v: ``[B, Lk, Hk, E]`` (``H % Hk == 0``), bf16,
        fp16 or fp32 (mixed dtypes are promoted).
      q_start, k_start: global positions of the first query and key (int or traced int32 scalar).
      scale: multiplies the logits.
      q_segment_ids, k_segment_ids: ``[B, Lq]`` / ``[B, Lk]`` integer document ids of the queries
        and keys (both or neither): a query sees only keys of its own id (packed documents).
      documents_sorted: the ids are non-decreasing along each row (document numbers, as
        ``lasp_jax.softmax_attention`` passes them): then key blocks before a query block's first
        document are not visited (and, backward, query blocks after a key block's last document).
        Without it every causally visible tile is visited and masked.
      interpret: run the Pallas interpreter (default: when the backend is not a GPU).
      config: tiling (default: ``config.default_config``).

    Returns:
      ``o`` ``[B, Lq, H, E]`` float32 (zero rows where no key is visible) and ``lse``
      ``[B, H, Lq]`` float32 (−inf there), as ``_flash_fwd`` of ``lasp_jax.softmax_attention``.
    """
    interpret, cfg, dtype = resolve(q, k, v, interpret, config)
    check_documents(q, k, q_segment_ids, k_segment_ids)
    segmented = q_segment_ids is not None
    b, lq, h, d = q.shape
    lk, hk, e = k.shape[1], k.shape[2], v.shape[3]
    group = h // hk
    dp, ep = pad_dim(d), pad_dim(e)
    bq, bk = fit_block(cfg.block_q, lq), fit_block(cfg.block_k, lk)
    lq_pad, lk_pad = round_up(lq, bq), round_up(lk, bk)
    q_p = pad_to(q.astype(dtype), lq_pad, dp)
    k_p = pad_to(k.astype(dtype), lk_pad, dp)
    v_p = pad_to(v.astype(dtype), lk_pad, ep)
    skip = segmented and documents_sorted
    kernel = functools.partial(
        _forward_kernel, scale=float(scale), block_q=bq, block_k=bk, k_len=lk, segmented=segmented, skip=skip
    )
    doc_specs, docs = [], []
    if segmented:
        doc_specs = [
            pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, i)),
            pl.BlockSpec((None, lk_pad), lambda i, bb, hh: (bb, 0)),
        ]
        docs = [padded_ids(q_segment_ids, lq_pad, Q_PAD_DOC), padded_ids(k_segment_ids, lk_pad, K_PAD_DOC)]
    if skip:  # after q, k, v: the first key block of each query block
        doc_specs.insert(0, BOUND_SPEC_Q)
        docs.insert(
            0,
            first_key_blocks(q_segment_ids, k_segment_ids, block_q=bq, block_k=bk, num_q_blocks=lq_pad // bq),
        )
    # grid (query block i, batch row bb, query head hh); keys and values of head hh // group
    o, lse = pl.pallas_call(
        kernel,
        grid=(lq_pad // bq, b, h),
        in_specs=[
            SHIFT_SPEC,
            pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0)),
            pl.BlockSpec((None, lk_pad, None, dp), lambda i, bb, hh: (bb, 0, hh // group, 0)),
            pl.BlockSpec((None, lk_pad, None, ep), lambda i, bb, hh: (bb, 0, hh // group, 0)),
            *doc_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, ep), lambda i, bb, hh: (bb, i, hh, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, lq_pad, h, ep), _F32),
            jax.ShapeDtypeStruct((b, h, lq_pad), _F32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="flash_attention_forward",
    )(shift_operand(q_start, k_start), q_p, k_p, v_p, *docs)
    return o[:, :lq, :, :e], lse[:, :, :lq]
