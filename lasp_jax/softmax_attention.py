"""Causal softmax attention with the sequence sharded over a mesh axis (LASP-2H and RingAttention).

Hybrid models (LASP-2, arXiv 2502.07563, §3.4 "LASP-2H") mix linear-attention layers, which
``lasp_jax`` parallelises by passing d×e states, with ordinary softmax-attention layers. Those
cannot be summarised by a fixed-size state, so under sequence parallelism they move keys and
values instead. Rank r of the ``sp`` axis holds the contiguous tokens ``[r·L, (r+1)·L)``
(``L = T / P``, no zig-zag), exactly as the linear layers do, and every strategy equals

    o_i = Σ_{j ≤ i} softmax_j(scale · q_i·k_j) v_j          (query head h reads kv head h // (H // Hk))

on the whole sequence, to floating-point rounding. Two strategies:

- ``allgather`` (LASP-2H): one ``all_gather`` of the local K and V (grouped KV heads keep it
  cheap), attention of the local queries against the gathered sequence with the causal mask at
  global positions, and in the backward ``psum_scatter`` of the gathered dK, dV back to their
  owners. It is one ``jax.custom_vjp``; the residuals are the *local* K and V, so the backward
  gathers K and V once more (the same bytes as the forward gather) instead of keeping the
  gathered copy alive between the passes. (When forward and backward sit in one jit program
  without remat, XLA may merge the two identical gathers, seen in the compiled HLO of a plain
  fwd+bwd step; then the gathered copy does stay alive and nothing is sent twice.)
  Causal load balancing (``balance``, on by default for an even local length): contiguous shards
  leave the last rank (2P − 1)/P² of all (query, key) pairs (¾ at P = 2), so each rank instead
  computes the queries of two half-shards, chunks ``r`` and ``2P − 1 − r`` of the 2P halves, dealt
  to it by two ``ppermute``s of half its queries (the outputs dealt back the same way; dO and dq in
  the backward): 2P chunk pairs on every rank. The layout the caller and the linear layers see
  stays contiguous; only queries, outputs and their cotangents move (K and V are gathered anyway).
- ``ring`` (RingAttention, Liu et al. 2023): K/V blocks travel rank r → r+1 by ``ppermute``;
  each rank merges block results with the online softmax (running log-sum-exp in float32) and
  skips blocks wholly in its queries' future (causal). One ``jax.custom_vjp``: the backward sends
  the K/V blocks around again with float32 dK/dV accumulators riding along, which arrive back at
  their owners after P hops. ``balance`` deals the queries as for allgather (each half merges
  its own statistics); the K/V blocks stay contiguous shards, so a step still waits for the rank
  with the most visible pairs in it (at P = 2 the busiest rank's total is unchanged).

Local block compute. Both strategies are written against one block function pair: the forward
of queries at global positions ``q_start + i`` against keys at ``k_start + j`` returning the float32
output and log-sum-exp, and the FlashAttention-2 backward given the *final* output and
log-sum-exp of every query row (so contributions of different key blocks and ranks add up). The
ring needs exactly that (it merges block results and passes float32 dK/dV accumulators), which
``jax.nn.dot_product_attention`` does not give. Two implementations of the pair:

- ``impl="pallas"`` (the default on a GPU): fused Pallas Triton kernels,
  ``pallas_kernels.flash_attention``, that take ``q_start``/``k_start`` as traced scalars and never
  load key blocks wholly in a query block's future (causal block skipping with dynamic loop
  bounds), GQA through the index maps, float32 statistics.
- ``impl="xla"`` (the default on CPU): the same recurrence written here in jnp: query blocks ×
  key blocks, float32 running max and sum, fully masked block pairs skipped with ``lax.cond``,
  the scores never larger than ``[B, H, block_q, block_k]``.

For comparison the allgather strategy also runs on cuDNN's fused kernel through
``jax.nn.dot_product_attention(implementation="cudnn")`` (``impl="cudnn"``) where it supports the
input (bf16/fp16, equal head dims D = E, D a multiple of 8, D ≤ 128, or ≤ 256 on Hopper, even
lengths). jax's cuDNN binding only has a top-left-aligned causal mask, which is wrong for query
blocks at an offset, so that path passes the causal mask at global positions as a boolean
``mask`` that cuDNN turns into an additive ``[1, 1, L, T]`` bias (``2·L·T`` bytes, transient) and
attends to every key (no causal block skipping). Its backward gathers K, V again and recomputes
the forward through cuDNN's own VJP (one extra forward pass). Single-device attention
(``mesh=None``) with ``impl="auto"`` uses cuDNN with its own causal mask where it supports the
input (no offsets there), else the Pallas kernels.

Packed documents (``segment_ids``): a document is a run of equal ids along the global sequence;
each shard numbers the gathered ids once (``B·T`` int32) so the block functions receive global,
non-decreasing document numbers and mask ``same document`` next to causality. The allgather
strategy gathers the key numbers with K/V and deals the query numbers with the queries, the ring
passes them with each K/V block. The Pallas kernels, told the numbers are sorted, skip key blocks
before a query block's first document and query blocks after a key block's last one.

Dtype policy: q, k, v in bf16, fp16, fp32 (fp64 on the jnp path), softmax statistics and all
accumulation in float32 (float64 for float64 inputs), the output in q's dtype. Collectives carry
K and V in their dtype, dK and dV (reduce-scatter and ring accumulators) in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels import flash_attention
from pallas_kernels.linear_attention.api import validate
from pallas_kernels.linear_attention.reference import document_index

Strategy = Literal["allgather", "ring"]
Impl = Literal["auto", "pallas", "cudnn", "xla", "dpa_xla"]
STRATEGIES = ("allgather", "ring")
IMPLS = ("auto", "pallas", "cudnn", "xla", "dpa_xla")
DEFAULT_BLOCK = 1024  # query and key block of the jnp flash recurrence


# ---------------------------------------------------------------------------------------------
# Public functions


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh | None,
    seq_axis: str = "sp",
    batch_axis: str | None = None,
    strategy: Strategy = "allgather",
    scale: float | None = None,
    impl: Impl = "auto",
    block_size: int = DEFAULT_BLOCK,
    balance: bool | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Causal softmax attention of global ``[B, T, H, D]`` arrays, sequence-sharded over ``seq_axis``.

    Args:
      q: queries ``[B, T, H, D]`` (global; sharded or not).
      k: keys ``[B, T, Hk, D]`` with ``H % Hk == 0`` (grouped/multi-query attention).
      v: values ``[B, T, Hk, E]``.
      mesh: the device mesh; ``None`` runs single-device causal attention.
      seq_axis: mesh axis the time dimension is split over (contiguous blocks, rank order).
      batch_axis: mesh axis the batch is split over, or None (replicated over it).
      strategy: ``"allgather"`` (LASP-2H) or ``"ring"`` (RingAttention).
      scale: multiplies the logits; defaults to ``D ** -0.5``.
      impl: local block compute: ``"auto"`` (``"pallas"`` on a GPU for bf16/fp16/fp32 input, both
        strategies; single device prefers cuDNN where it supports the input; ``"xla"`` on CPU),
        ``"pallas"`` (the Pallas Triton flash-attention kernels; the Pallas interpreter off the
        GPU), ``"xla"`` (the jnp flash recurrence), ``"cudnn"`` (allgather and single device only),
        or ``"dpa_xla"`` (the cuDNN code path with ``jax.nn.dot_product_attention``'s XLA kernel;
        materialises ``[B, H, L, T]`` logits, for checking that path off the GPU).
      block_size: query and key block of the jnp flash recurrence (used when it divides the
        local length, else the whole local length is one block); the Pallas kernels tile with
        ``pallas_kernels.flash_attention.default_config``.
      balance: causal load balancing: each rank computes the queries of two half-shards, ``r``
        and ``2P − 1 − r``, dealt to it by ``ppermute`` (and the outputs dealt back), so every rank
        attends the same number of (query, key) pairs; the layout seen by the caller stays
        contiguous. ``None`` (default): on with an even local length and ``impl`` "pallas" or
        "xla", else off; ``True`` requires that; ``False``: off. (The ring's K/V blocks still
        travel as contiguous shards, so its steps stay unequal: it gains less than allgather.)
      segment_ids: ``[B, T]`` integers (packed documents): a query sees only the keys of its own
        document, a document boundary being wherever the id changes along the global sequence
        (as in ``lasp_attention``: equal ids in two separate runs are two documents).

    Returns:
      ``o`` ``[B, T, H, E]`` in q's dtype, sharded like q under ``mesh``.
    """
    validate(q, k, v, segment_ids=segment_ids)
    _check_choice(strategy=strategy, impl=impl, block_size=block_size, balance=balance)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if mesh is None:
        return causal_attention(q, k, v, scale=scale, impl=impl, block_size=block_size, segment_ids=segment_ids)
    _check_mesh(q, mesh, seq_axis, batch_axis)
    spec = PartitionSpec(batch_axis, seq_axis)
    keywords = dict(strategy=strategy, scale=scale, impl=impl, block_size=block_size, balance=balance)

    def shard_fn(q, k, v, *ids):  # ids: the local segment ids, when given
        return softmax_attention_shard(q, k, v, axis_name=seq_axis, segment_ids=ids[0] if ids else None, **keywords)

    args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
    return jax.shard_map(shard_fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


def softmax_attention_shard(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: str,
    strategy: Strategy = "allgather",
    scale: float | None = None,
    impl: Impl = "auto",
    block_size: int = DEFAULT_BLOCK,
    balance: bool | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """The per-shard form of ``softmax_attention`` for use inside a user's own ``jax.shard_map``.

    q ``[B, L, H, D]``, k ``[B, L, Hk, D]``, v ``[B, L, Hk, E]`` are this rank's contiguous slice
    ``[r·L, (r+1)·L)`` of the sequence, r the index along ``axis_name``. Returns the local
    ``[B, L, H, E]`` output; ``segment_ids`` is the local ``[B, L]`` slice. Arguments as in
    ``softmax_attention``.
    """
    validate(q, k, v, segment_ids=segment_ids)
    _check_choice(strategy=strategy, impl=impl, block_size=block_size, balance=balance)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    impl = _resolve_impl(impl, strategy, q, k, v, n_keys=None)
    if segment_ids is not None:
        segment_ids = _local_documents(segment_ids, axis_name)
    if balance and impl in ("cudnn", "dpa_xla"):
        raise ValueError(f"balance=True needs impl 'pallas' or 'xla' (their block offsets), got impl={impl!r}")
    if balance and q.shape[1] % 2:
        raise ValueError(
            f"balance=True splits each shard in two halves: the local length must be even, q.shape={q.shape}"
        )
    if strategy == "ring":
        return _ring(axis_name, scale, block_size, impl, balance is not False)(q, k, v, segment_ids)
    if impl in ("cudnn", "dpa_xla"):
        return _allgather_dpa(axis_name, scale, "cudnn" if impl == "cudnn" else "xla")(q, k, v, segment_ids)
    return _allgather(axis_name, scale, block_size, impl, balance is not False)(q, k, v, segment_ids)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    impl: Impl = "auto",
    block_size: int = DEFAULT_BLOCK,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Single-device causal softmax attention with the same conventions and ``impl`` choices
    (with ``segment_ids``, ``"auto"`` runs the Pallas kernels on a GPU: cuDNN's causal mask has no
    documents; ``"cudnn"`` then passes a dense causal-and-document mask)."""
    validate(q, k, v, segment_ids=segment_ids)
    _check_choice(strategy="allgather", impl=impl, block_size=block_size)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    impl = _resolve_impl(impl, "allgather", q, k, v, n_keys=None if segment_ids is not None else q.shape[1])
    if segment_ids is not None:
        segment_ids = document_index(segment_ids)
    if impl in ("cudnn", "dpa_xla"):
        implementation = "cudnn" if impl == "cudnn" else "xla"
        if segment_ids is not None:
            return _allgather_dpa(None, scale, implementation)(q, k, v, segment_ids)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)
    return _allgather(None, scale, block_size, impl)(q, k, v, segment_ids)


def reference_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None, segment_ids: jax.Array | None = None
) -> jax.Array:
    """The oracle: dense masked softmax in the inputs' dtype (run it in float64 for tests); with
    ``segment_ids`` ``[B, T]`` a query sees only keys of its own document (a run of equal ids)."""
    b, t, h, d = q.shape
    hk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hk, h // hk, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
    mask = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None]
    if segment_ids is not None:
        doc = document_index(segment_ids)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhgqk,bkhe->bqhge", p, v)
    return o.reshape(b, t, h, v.shape[-1])


# ---------------------------------------------------------------------------------------------
# Argument checks and dispatch


def _check_choice(*, strategy, impl, block_size=DEFAULT_BLOCK, balance=None):
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got block_size={block_size!r}")
    if balance not in (None, True, False):
        raise ValueError(f"balance must be None, True or False, got balance={balance!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    if strategy == "ring" and impl in ("cudnn", "dpa_xla"):
        raise ValueError(
            f"strategy='ring' merges per-block float32 log-sum-exps, which jax.nn.dot_product_attention does not "
            f"return: use impl='pallas', 'xla' or 'auto', got impl={impl!r}"
        )


def _check_mesh(q, mesh, seq_axis, batch_axis):
    names = tuple(mesh.axis_names)
    for arg, axis in (("seq_axis", seq_axis), ("batch_axis", batch_axis)):
        if axis is not None and axis not in names:
            raise ValueError(f"{arg}={axis!r} is not an axis of the mesh; mesh.axis_names={names}")
    if seq_axis == batch_axis:
        raise ValueError(f"seq_axis and batch_axis must differ, got both {seq_axis!r}")
    b, t = q.shape[:2]
    sp = mesh.shape[seq_axis]
    if t % sp:
        raise ValueError(
            f"sequence length T={t} must be a multiple of the {seq_axis!r} axis size {sp} (q.shape={q.shape})"
        )
    if batch_axis is not None and b % mesh.shape[batch_axis]:
        raise ValueError(
            f"batch B={b} must be a multiple of the {batch_axis!r} axis size {mesh.shape[batch_axis]} "
            f"(q.shape={q.shape})"
        )


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def _cudnn_supports(q, k, v, n_keys) -> bool:
    """What cuDNN's fused attention takes through jax.nn.dot_product_attention (its own checks)."""
    if not _on_gpu() or q.dtype not in (jnp.bfloat16, jnp.float16) or not q.dtype == k.dtype == v.dtype:
        return False
    d, e = q.shape[-1], v.shape[-1]
    cc = getattr(jax.devices()[0], "compute_capability", "0.0")
    d_max = 256 if tuple(int(x) for x in str(cc).split(".")[:2]) >= (9, 0) else 128
    even = q.shape[1] % 2 == 0 and (n_keys is None or n_keys % 2 == 0)  # a bias needs even lengths
    return d == e and d % 8 == 0 and d <= d_max and even


def _resolve_impl(impl, strategy, q, k, v, *, n_keys):
    """The block compute to run: "pallas", "xla", "cudnn" or "dpa_xla" (``n_keys``: single device)."""
    if impl == "auto":
        if n_keys is not None and _cudnn_supports(q, k, v, n_keys):  # one device: cuDNN's own causal mask
            return "cudnn"
        return "pallas" if _on_gpu() and flash_attention.supports(q, k, v) else "xla"
    if impl == "pallas" and not all(x.dtype in flash_attention.pallas_triton.DTYPES for x in (q, k, v)):
        raise TypeError(
            f"impl='pallas' takes bf16, fp16 or fp32 inputs, got q.dtype={q.dtype}, k.dtype={k.dtype}, "
            f"v.dtype={v.dtype}; use impl='xla'"
        )
    if impl in ("cudnn", "dpa_xla") and v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"impl={impl!r} needs equal q/k and v head dims: q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)}"
        )
    return impl


@functools.cache
def _block_kernels(impl, block):
    """(fwd, bwd) block compute with the signatures of ``_flash_fwd`` / ``_flash_bwd`` less ``block``."""
    if impl == "pallas":  # segment ids reach the blocks as global document numbers: non-decreasing
        return (
            functools.partial(flash_attention.block_attention_fwd, documents_sorted=True),
            functools.partial(flash_attention.block_attention_bwd, documents_sorted=True),
        )
    return functools.partial(_flash_fwd, block=block), functools.partial(_flash_bwd, block=block)


def _acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _block(n: int, want: int) -> int:
    """The block length: ``want`` when it divides ``n``, else the whole length."""
    return want if n % want == 0 else n


def _positions(axis_name, length):
    """First global position of this rank's block and the number of ranks (0, 1 without an axis)."""
    if axis_name is None:
        return 0, 1
    return lax.axis_index(axis_name) * length, lax.axis_size(axis_name)


# ---------------------------------------------------------------------------------------------
# Local block compute: the flash-attention recurrence in jnp (float32 statistics)


def _split(x, n_blocks, groups=None):
    """[B, N·n, Hk(·G), X] -> [n_blocks, B, n, Hk, (G,) X]."""
    b, length, heads, last = x.shape
    if groups is None:
        x = x.reshape(b, n_blocks, length // n_blocks, heads, last)
    else:
        x = x.reshape(b, n_blocks, length // n_blocks, heads // groups, groups, last)
    return jnp.moveaxis(x, 1, 0)


def _split_ids(ids, n_blocks):
    """[B, N·n] -> [n_blocks, B, n] (None stays None)."""
    if ids is None:
        return None
    b, length = ids.shape
    return jnp.moveaxis(ids.reshape(b, n_blocks, length // n_blocks), 1, 0)


def _visible(q_pos, k_pos, q_docs, k_docs):
    """``[B or 1, 1, 1, bq, bk]``: causal at global positions, and the same document when given."""
    mask = (q_pos[:, None] >= k_pos[None, :])[None]
    if q_docs is not None:
        mask = mask & (q_docs[:, :, None] == k_docs[:, None, :])
    return mask[:, None, None]


def _flash_fwd(q, k, v, *, q_start, k_start, scale, block, q_segment_ids=None, k_segment_ids=None):
    """Causal attention of queries at global positions ``q_start + i`` against keys at ``k_start + j``
    (and, with ``[B, L]`` segment ids, only keys of the query's document).

    Returns ``o`` (accumulation dtype, ``[B, Lq, H, E]``, zero on rows with no visible key) and the
    log-sum-exp of the scaled logits ``lse`` (``[B, H, Lq]``, −inf on such rows).
    """
    b, lq, h, _ = q.shape
    lk, hk, e = k.shape[1], k.shape[2], v.shape[3]
    g = h // hk
    acc = _acc_dtype(q.dtype)
    bq, bk = _block(lq, block), _block(lk, block)
    qs, ks, vs = _split(q, lq // bq, g), _split(k, lk // bk), _split(v, lk // bk)
    q_ids, k_ids = _split_ids(q_segment_ids, lq // bq), _split_ids(k_segment_ids, lk // bk)

    def one_query_block(args):
        qi, qc, qd = args
        q_pos = q_start + qi * bq + jnp.arange(bq)

        def step(carry, inputs):
            ki, kc, vc, kd = inputs
            k_first = k_start + ki * bk

            def attend(carry):
                m, row_sum, o = carry
                s = jnp.einsum("bqhgd,bkhd->bhgqk", qc, kc, preferred_element_type=acc) * scale
                s = jnp.where(_visible(q_pos, k_first + jnp.arange(bk), qd, kd), s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = jnp.einsum("bhgqk,bkhe->bhgqe", p.astype(v.dtype), vc, preferred_element_type=acc)
                return m_new, alpha * row_sum + p.sum(-1), alpha[..., None] * o + pv

            visible = k_first <= q_pos[-1]  # skip key blocks wholly in this query block's future
            return lax.cond(visible, attend, lambda c: c, carry), None

        init = (
            jnp.full((b, hk, g, bq), -jnp.inf, acc),
            jnp.zeros((b, hk, g, bq), acc),
            jnp.zeros((b, hk, g, bq, e), acc),
        )
        (m, row_sum, o), _ = lax.scan(step, init, (jnp.arange(lk // bk), ks, vs, k_ids))
        seen = row_sum > 0
        safe_sum = jnp.where(seen, row_sum, 1.0)
        o = jnp.where(seen[..., None], o / safe_sum[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(safe_sum), -jnp.inf)
        return o, lse

    o, lse = lax.map(one_query_block, (jnp.arange(lq // bq), qs, q_ids))  # [nq, B, Hk, G, bq, (E)]
    o = jnp.moveaxis(o, 0, 3).reshape(b, hk, g, lq, e)
    o = o.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, e)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, h, lq)
    return o, lse


def _flash_bwd(q, k, v, o, lse, do, *, q_start, k_start, scale, block, q_segment_ids=None, k_segment_ids=None):
    """Gradients of the block attention given the *final* ``o`` and ``lse`` of every query row.

    With the global ``lse`` and ``Δ = rowsum(dO ⊙ O)`` the contribution of one key block is
    independent of the others (FlashAttention-2), so ring blocks and gathered blocks add up.
    Returns dq ``[B, Lq, H, D]`` and dk, dv ``[B, Lk, Hk, ·]`` in the accumulation dtype.
    """
    b, lq, h, d = q.shape
    lk, hk, e = k.shape[1], k.shape[2], v.shape[3]
    g = h // hk
    acc = _acc_dtype(q.dtype)
    bq, bk = _block(lq, block), _block(lk, block)
    nq, nk = lq // bq, lk // bk
    delta = jnp.sum(do.astype(acc) * o.astype(acc), -1).transpose(0, 2, 1)  # [B, H, Lq]
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows with no visible key: P = 0, not exp(−inf + inf)
    stats = jnp.stack([lse, delta], -1).reshape(b, hk, g, nq, bq, 2)
    stats = jnp.moveaxis(stats, 3, 0)  # [nq, B, Hk, G, bq, 2]
    qs, dos = _split(q, nq, g), _split(do.astype(q.dtype), nq, g)
    ks, vs = _split(k, nk), _split(v, nk)
    q_ids, k_ids = _split_ids(q_segment_ids, nq), _split_ids(k_segment_ids, nk)

    def probs(qi, qc, doc, st, qd, ki, kc, vc, kd):
        """P and dS of one block pair, [B, Hk, G, bq, bk]."""
        q_pos = q_start + qi * bq + jnp.arange(bq)
        k_pos = k_start + ki * bk + jnp.arange(bk)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qc, kc, preferred_element_type=acc) * scale
        s = jnp.where(_visible(q_pos, k_pos, qd, kd), s, -jnp.inf)
        p = jnp.exp(s - st[..., 0:1])
        dp = jnp.einsum("bqhge,bkhe->bhgqk", doc, vc, preferred_element_type=acc)
        return p, p * (dp - st[..., 1:2])

    def visible(qi, ki):
        return k_start + ki * bk <= q_start + qi * bq + bq - 1

    def dq_block(args):
        qi, qc, doc, st, qd = args

        def step(dq, inputs):
            ki, kc, vc, kd = inputs

            def add(dq):
                _, ds = probs(qi, qc, doc, st, qd, ki, kc, vc, kd)
                return dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(q.dtype), kc, preferred_element_type=acc)

            return lax.cond(visible(qi, ki), add, lambda x: x, dq), None

        dq, _ = lax.scan(step, jnp.zeros((b, bq, hk, g, d), acc), (jnp.arange(nk), ks, vs, k_ids))
        return dq * scale

    def dkv_block(args):
        ki, kc, vc, kd = args

        def step(carry, inputs):
            qi, qc, doc, st, qd = inputs

            def add(carry):
                dk, dv = carry
                p, ds = probs(qi, qc, doc, st, qd, ki, kc, vc, kd)
                dv = dv + jnp.einsum("bhgqk,bqhge->bkhe", p.astype(v.dtype), doc, preferred_element_type=acc)
                dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q.dtype), qc, preferred_element_type=acc)
                return dk, dv

            return lax.cond(visible(qi, ki), add, lambda c: c, carry), None

        init = (jnp.zeros((b, bk, hk, d), acc), jnp.zeros((b, bk, hk, e), acc))
        (dk, dv), _ = lax.scan(step, init, (jnp.arange(nq), qs, dos, stats, q_ids))
        return dk * scale, dv

    dq = lax.map(dq_block, (jnp.arange(nq), qs, dos, stats, q_ids))  # [nq, B, bq, Hk, G, D]
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, lq, h, d)
    dk, dv = lax.map(dkv_block, (jnp.arange(nk), ks, vs, k_ids))  # [nk, B, bk, Hk, ·]
    dk = jnp.moveaxis(dk, 0, 1).reshape(b, lk, hk, d)
    dv = jnp.moveaxis(dv, 0, 1).reshape(b, lk, hk, e)
    return dq, dk, dv


def _merge(o, lse, o_blk, lse_blk):
    """Online-softmax merge of two partial results over disjoint key sets (float32 weights)."""
    new = jnp.logaddexp(lse, lse_blk)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    w, w_blk = jnp.exp(lse - safe), jnp.exp(lse_blk - safe)  # [B, H, L]
    return o * w.transpose(0, 2, 1)[..., None] + o_blk * w_blk.transpose(0, 2, 1)[..., None], new


# ---------------------------------------------------------------------------------------------
# allgather (LASP-2H): gather K, V; reduce-scatter dK, dV


def _local_documents(segment_ids, axis_name):
    """This shard's global document numbers ``[B, L]`` (+1 wherever the id changes along the whole
    sequence): the ids of every rank are gathered (``B·T`` int32, small) and numbered once, so equal
    numbers mean one document on every rank."""
    length = segment_ids.shape[1]
    doc = document_index(_gather(segment_ids.astype(jnp.int32), axis_name))
    start = 0 if axis_name is None else lax.axis_index(axis_name) * length
    return lax.dynamic_slice_in_dim(doc, start, length, axis=1)


def _gather(x, axis_name):
    return x if axis_name is None or x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)


def _scatter(x, axis_name):
    return x if axis_name is None else lax.psum_scatter(x, axis_name, scatter_dimension=1, tiled=True)


@dataclasses.dataclass(frozen=True)
class _Deal:
    """Causal load balancing (both strategies): the sequence as 2P half-shards ("chunks"),
    chunk c computed on rank ``c`` if ``c < P`` else ``2P − 1 − c``, so rank r attends the queries of
    chunks r and 2P − 1 − r: (r + ½) + (2P − 1 − r + ½) = 2P chunk pairs on every rank, where
    contiguous shards give rank r (2r + 1)·2 (the last rank (2P − 1)/P² of all pairs, ¾ at P = 2).

    Rank r holds chunks 2r ("lo") and 2r + 1 ("hi"); ``to_lo`` / ``to_hi`` send them to the ranks that
    compute them (each a permutation: every rank receives one even and one odd chunk); ``c_lo`` /
    ``c_hi`` are the (traced) indices of the even / odd chunk this rank computes.
    """

    to_lo: tuple
    to_hi: tuple
    c_lo: jax.Array
    c_hi: jax.Array

    @staticmethod
    def of(axis_name):
        n = lax.axis_size(axis_name)

        def owner(c):
            return c if c < n else 2 * n - 1 - c

        rank = lax.axis_index(axis_name)
        even = rank % 2 == 0
        return _Deal(
            to_lo=tuple((r, owner(2 * r)) for r in range(n)),
            to_hi=tuple((r, owner(2 * r + 1)) for r in range(n)),
            c_lo=jnp.where(even, rank, 2 * n - 1 - rank),
            c_hi=jnp.where(even, 2 * n - 1 - rank, rank),
        )

    def deal(self, x, axis_name):
        """Local ``[B, L, ...]`` (chunks 2r, 2r + 1) -> the two halves this rank computes."""
        half = x.shape[1] // 2
        return (
            lax.ppermute(x[:, :half], axis_name, self.to_lo),
            lax.ppermute(x[:, half:], axis_name, self.to_hi),
        )

    def undeal(self, xa, xb, axis_name):
        """The inverse of ``deal``: computed halves back to their owners, ``[B, L, ...]``."""
        back = [tuple((t, s) for s, t in perm) for perm in (self.to_lo, self.to_hi)]
        return jnp.concatenate([lax.ppermute(xa, axis_name, back[0]), lax.ppermute(xb, axis_name, back[1])], axis=1)


def _query_parts(q, ids, axis_name, balance: bool):
    """The query blocks this rank computes, ``(plan, [(q, ids, global start), ...])``: its own shard,
    or with ``balance`` (an even local length, more than one rank) the two half-shards ``_Deal``
    gives it (``plan`` None when not dealt)."""
    n = 1 if axis_name is None else lax.axis_size(axis_name)
    if not (balance and n > 1 and q.shape[1] % 2 == 0):
        return None, [(q, ids, _positions(axis_name, q.shape[1])[0])]
    plan, half = _Deal.of(axis_name), q.shape[1] // 2
    (qa, qb), (ida, idb) = plan.deal(q, axis_name), (plan.deal(ids, axis_name) if ids is not None else (None, None))
    return plan, [(qa, ida, plan.c_lo * half), (qb, idb, plan.c_hi * half)]


def _cotangent_parts(do, n_parts, axis_name):
    """dO split like the queries (``n_parts`` of ``_query_parts``): ``(plan, [dO parts])``."""
    if n_parts == 1:
        return None, [do]
    plan = _Deal.of(axis_name)
    return plan, list(plan.deal(do, axis_name))


def _join_parts(plan: _Deal | None, parts, axis_name):
    """Per-part results (outputs or dq) back in this rank's contiguous layout."""
    return parts[0] if plan is None else plan.undeal(*parts, axis_name)


@functools.cache
def _allgather(axis_name, scale, block, impl, balance=False):
    """Block compute ``impl`` ("pallas" or "xla"); ``axis_name=None`` is single-device attention.

    ``balance``: queries re-dealt by ``_Deal`` (an even local length; off on one rank)."""
    block_fwd, block_bwd = _block_kernels(impl, block)

    @jax.custom_vjp
    def attend(q, k, v, ids):
        return fwd(q, k, v, ids)[0]

    def fwd(q, k, v, ids):
        k_all, v_all, k_ids = _gather(k, axis_name), _gather(v, axis_name), _gather(ids, axis_name)
        plan, parts = _query_parts(q, ids, axis_name, balance)
        saved = []
        for qp, idp, q_start in parts:
            o, lse = block_fwd(
                qp, k_all, v_all, q_start=q_start, k_start=0, scale=scale, q_segment_ids=idp, k_segment_ids=k_ids
            )
            saved.append((qp, idp, q_start, o.astype(q.dtype), lse))
        return _join_parts(plan, [part[3] for part in saved], axis_name), (k, v, ids, saved)

    def bwd(res, do):
        k, v, ids, saved = res
        k_all, v_all = _gather(k, axis_name), _gather(v, axis_name)  # re-gathered: only local K/V were kept
        k_ids = _gather(ids, axis_name)
        plan, dos = _cotangent_parts(do, len(saved), axis_name)
        dqs, dk, dv = [], 0.0, 0.0
        for (q, idp, q_start, o, lse), do_part in zip(saved, dos, strict=True):
            dq_p, dk_p, dv_p = block_bwd(
                q,
                k_all,
                v_all,
                o,
                lse,
                do_part,
                q_start=q_start,
                k_start=0,
                scale=scale,
                q_segment_ids=idp,
                k_segment_ids=k_ids,
            )
            dqs.append(dq_p.astype(q.dtype))
            dk, dv = dk + dk_p, dv + dv_p
        dk, dv = _scatter(dk, axis_name), _scatter(dv, axis_name)
        return _join_parts(plan, dqs, axis_name), dk.astype(k.dtype), dv.astype(v.dtype), None

    attend.defvjp(fwd, bwd)
    return attend


@functools.cache
def _allgather_dpa(axis_name, scale, implementation):
    """jax.nn.dot_product_attention path (cuDNN on GPU) with the causal mask at global positions."""

    def local(q, k_all, v_all, ids, k_ids):
        length, n_keys = q.shape[1], k_all.shape[1]
        q_start, _ = _positions(axis_name, length)
        mask = ((q_start + jnp.arange(length))[:, None] >= jnp.arange(n_keys)[None, :])[None, None]
        if ids is not None:  # [B, 1, L, T]: and the same document
            mask = mask & (ids[:, None, :, None] == k_ids[:, None, None, :])
        return jax.nn.dot_product_attention(q, k_all, v_all, mask=mask, scale=scale, implementation=implementation)

    def primal(q, k, v, ids):
        return local(q, _gather(k, axis_name), _gather(v, axis_name), ids, _gather(ids, axis_name))

    attend = jax.custom_vjp(primal)

    def fwd(q, k, v, ids):
        return primal(q, k, v, ids), (q, k, v, ids)

    def bwd(res, do):
        q, k, v, ids = res
        k_ids = _gather(ids, axis_name)
        _, vjp = jax.vjp(  # recomputes the forward
            lambda q, k_all, v_all: local(q, k_all, v_all, ids, k_ids), q, _gather(k, axis_name), _gather(v, axis_name)
        )
        dq, dk, dv = vjp(do)
        dk = _scatter(dk.astype(_acc_dtype(k.dtype)), axis_name)
        dv = _scatter(dv.astype(_acc_dtype(v.dtype)), axis_name)
        return dq, dk.astype(k.dtype), dv.astype(v.dtype), None

    attend.defvjp(fwd, bwd)
    return attend


# ---------------------------------------------------------------------------------------------
# ring (RingAttention): K/V blocks travel r -> r+1, dK/dV accumulators travel with them


@functools.cache
def _ring(axis_name, scale, block, impl, balance=False):
    """At step s rank r holds the K/V block of rank (r − s) mod P; steps 0..P−2 run in a loop whose
    body sends the held block on while it computes with it, step P−1 follows the loop (no send).
    Block compute ``impl`` ("pallas" or "xla"). ``balance``: the queries are the two half-shards
    ``_Deal`` gives this rank (an even local length), each merging the blocks it can see."""
    block_fwd, block_bwd = _block_kernels(impl, block)

    def shift(x):
        n = lax.axis_size(axis_name)
        return lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)])

    def held_start(s, length):
        """Global position of the first key of the block held at step s."""
        rank, n = lax.axis_index(axis_name), lax.axis_size(axis_name)
        return ((rank - jnp.asarray(s, rank.dtype) + n) % n) * length  # int32 also under x64

    def if_visible(k_start, q_start, rows, fn, carry):
        # a key block wholly in the future of these query rows is skipped
        return lax.cond(k_start <= q_start + rows - 1, fn, lambda c: c, carry)

    @jax.custom_vjp
    def attend(q, k, v, ids):
        return fwd(q, k, v, ids)[0]

    def fwd(q, k, v, ids):
        b, length, h, _ = q.shape
        n = lax.axis_size(axis_name)
        acc = _acc_dtype(q.dtype)
        plan, parts = _query_parts(q, ids, axis_name, balance)

        def merge_blocks(s, kb, vb, kd, stats):
            k_start, out = held_start(s, length), []
            for (qp, idp, q_start), carry in zip(parts, stats, strict=True):

                def merge(carry, qp=qp, idp=idp, q_start=q_start):
                    o_blk, lse_blk = block_fwd(
                        qp, kb, vb, q_start=q_start, k_start=k_start, scale=scale, q_segment_ids=idp, k_segment_ids=kd
                    )
                    return _merge(*carry, o_blk, lse_blk)

                out.append(if_visible(k_start, q_start, qp.shape[1], merge, carry))
            return out

        def step(s, carry):
            kb, vb, kd, stats = carry  # kd: the held block's segment ids (None without documents)
            nxt = shift((kb, vb, kd))  # issued before the compute so the two can overlap
            return (*nxt, merge_blocks(s, kb, vb, kd, stats))

        stats = [
            (jnp.zeros((b, qp.shape[1], h, v.shape[-1]), acc), jnp.full((b, h, qp.shape[1]), -jnp.inf, acc))
            for qp, _, _ in parts
        ]
        kb, vb, kd, stats = lax.fori_loop(0, n - 1, step, (k, v, ids, stats))
        stats = merge_blocks(n - 1, kb, vb, kd, stats)
        saved = [(*part, o.astype(q.dtype), lse) for part, (o, lse) in zip(parts, stats, strict=True)]
        return _join_parts(plan, [part[3] for part in saved], axis_name), (k, v, ids, saved)

    def bwd(res, do):
        k, v, ids, saved = res
        length = k.shape[1]
        n = lax.axis_size(axis_name)
        acc = _acc_dtype(saved[0][0].dtype)
        plan, dos = _cotangent_parts(do, len(saved), axis_name)

        def add_blocks(s, kb, vb, kd, carry):
            dqs, dk, dv = carry
            k_start, new_dqs = held_start(s, length), []
            for (qp, idp, q_start, o_p, lse), do_p, dq in zip(saved, dos, dqs, strict=True):

                def add(c, qp=qp, idp=idp, o_p=o_p, lse=lse, do_p=do_p, q_start=q_start):
                    dq, dk, dv = c
                    dq_b, dk_b, dv_b = block_bwd(
                        qp,
                        kb,
                        vb,
                        o_p,
                        lse,
                        do_p,
                        q_start=q_start,
                        k_start=k_start,
                        scale=scale,
                        q_segment_ids=idp,
                        k_segment_ids=kd,
                    )
                    return dq + dq_b, dk + dk_b, dv + dv_b

                dq, dk, dv = if_visible(k_start, q_start, qp.shape[1], add, (dq, dk, dv))
                new_dqs.append(dq)
            return new_dqs, dk, dv

        def step(s, carry):
            kb, vb, kd, dqs, dk, dv = carry  # dk, dv: float32 accumulators of the block held
            nxt = shift((kb, vb, kd))
            dqs, dk, dv = add_blocks(s, kb, vb, kd, (dqs, dk, dv))
            return (*nxt, dqs, *shift((dk, dv)))

        dqs = [jnp.zeros(part[0].shape, acc) for part in saved]
        init = (k, v, ids, dqs, jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc))
        kb, vb, kd, dqs, dk, dv = lax.fori_loop(0, n - 1, step, init)
        dqs, dk, dv = add_blocks(n - 1, kb, vb, kd, (dqs, dk, dv))
        dk, dv = shift((dk, dv))  # the P-th hop: every accumulator is back at its owner
        dqs = [dq.astype(saved[0][0].dtype) for dq in dqs]
        return _join_parts(plan, dqs, axis_name), dk.astype(k.dtype), dv.astype(v.dtype), None

    attend.defvjp(fwd, bwd)
    return attend
