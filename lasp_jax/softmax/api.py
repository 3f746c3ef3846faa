"""Causal softmax attention with the sequence sharded over a mesh axis (LASP-2H, RingAttention, TokenRing).

Hybrid models (LASP-2, arXiv 2502.07563, §3.4 "LASP-2H"; notes/design.md §2) mix linear-attention
layers, which ``lasp_jax`` parallelises by passing d×e states, with ordinary softmax-attention
layers. Those cannot be summarised by a fixed-size state, so under sequence parallelism they move
keys and values instead. Rank r of the ``sp`` axis holds the contiguous tokens ``[r·L, (r+1)·L)``
(``L = T / P``, no zig-zag), exactly as the linear layers do, and every strategy equals

    o_i = Σ_{j ≤ i} softmax_j(scale · q_i·k_j) v_j          (query head h reads kv head h // (H // Hk))

on the whole sequence, to floating-point rounding (``pallas_kernels.flash_attention.reference``).
Four strategies, each one ``jax.custom_vjp``: ``allgather`` (LASP-2H, ``allgather.py``: gather K and
V, reduce-scatter dK and dV), ``ring`` (RingAttention, ``ring.py``: K/V blocks travel rank to
rank), ``zigzag_ring`` (the same ring with K/V dealt as half-shards like the queries, so every
ring step does the same work on every rank) and ``tokenring`` (TokenRing, ``tokenring.py``: the
queries travel and the partial outputs come back, both directions of every link at once; K/V
stay). Causal load balancing (``balance``, ``deal.py``) deals each rank the queries of two
half-shards so that every rank attends the same number of (query, key) pairs.

Local block compute. Every strategy is written against one block function pair
(``pallas_kernels.flash_attention.block_functions``): the forward of queries at global positions
``q_start + i`` against keys at ``k_start + j`` returning the float32 output and log-sum-exp, and
the FlashAttention-2 backward given the *final* output and log-sum-exp of every query row (so
contributions of different key blocks and ranks add up). The rings and TokenRing need exactly that
(they merge block results and add float32 dq/dK/dV partials), which ``jax.nn.dot_product_attention`` does
not give. Two implementations of the pair: ``impl="pallas"`` (the default on a GPU), the fused
Pallas Triton kernels, which never load key blocks wholly in a query block's future; ``impl="xla"``
(the default on CPU), the same recurrence in jnp.

For comparison the allgather strategy also runs on cuDNN's fused kernel through
``jax.nn.dot_product_attention(implementation="cudnn")`` (``impl="cudnn"``) where it supports the
input (bf16/fp16, equal head dims D = E, D a multiple of 8, D ≤ 128, or ≤ 256 on Hopper, even
lengths). jax's cuDNN binding only has a top-left-aligned causal mask, which is wrong for query
blocks at an offset, so that path passes the causal mask at global positions as a boolean
``mask`` that cuDNN turns into an additive ``[1, 1, L, T]`` bias (``2·L·T`` bytes, transient) and
attends to every key (no causal block skipping). Single-device attention (``mesh=None``) with
``impl="auto"`` uses cuDNN with its own causal mask where it supports the input (no offsets
there), else the Pallas kernels.

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

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lasp_jax.mesh import check_mesh, layer_shard_map, layer_specs
from lasp_jax.softmax.allgather import DpaStatics, allgather_attention, dpa_attention, local_documents
from lasp_jax.softmax.deal import Statics
from lasp_jax.softmax.ring import ring_attention
from lasp_jax.softmax.tokenring import tokenring_attention
from pallas_kernels.common import on_gpu, resolve_scale
from pallas_kernels.flash_attention import fits_shared_memory
from pallas_kernels.flash_attention import pallas_triton as flash_pallas
from pallas_kernels.flash_attention import xla as flash_xla
from pallas_kernels.flash_attention.api import check_pallas_dtypes
from pallas_kernels.flash_attention.common import compiled_kernels_take
from pallas_kernels.linear_attention.api import validate
from pallas_kernels.linear_attention.reference import document_index

Strategy = Literal["allgather", "ring", "zigzag_ring", "tokenring"]
Impl = Literal["auto", "pallas", "cudnn_blocks", "cudnn", "xla", "dpa_xla"]
STRATEGIES = ("allgather", "ring", "zigzag_ring", "tokenring")
KEYS_DEALT = ("zigzag_ring", "tokenring")  # strategies that deal K/V with the queries when balanced
ATTEND = {
    "allgather": allgather_attention,
    "ring": ring_attention,
    "zigzag_ring": ring_attention,
    "tokenring": tokenring_attention,
}
IMPLS = ("auto", "pallas", "cudnn_blocks", "cudnn", "xla", "dpa_xla")
DEFAULT_BLOCK = flash_xla.DEFAULT_BLOCK  # query and key block of the jnp flash recurrence


# ---- public functions ----------------------------------------------------------------------------


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh | None,
    seq_axis: str = "sp",
    batch_axis: str | tuple[str, ...] | None = None,
    head_axis: str | None = None,
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
      batch_axis: mesh axis (or tuple of axes) the batch is split over, or None (replicated over it).
      head_axis: mesh axis the heads are split over (tensor parallelism), or None: H and Hk split
        contiguously (each rank keeps whole groups of query heads with their key/value head, so
        both must divide over it); a manual axis of the layer's ``shard_map``, so nothing is
        gathered over it and the output keeps its head sharding.
      strategy: ``"allgather"`` (LASP-2H), ``"ring"`` (RingAttention), ``"zigzag_ring"`` (the ring
        with queries and K/V both dealt as half-shards: equal work at every step; always balanced)
        or ``"tokenring"`` (TokenRing: queries out, partial outputs back, K/V stay).
      scale: multiplies the logits; defaults to ``D ** -0.5``.
      impl: local block compute: ``"auto"`` (on a GPU where cuDNN takes the input:
        ``"cudnn_blocks"`` under a mesh, with or without ``segment_ids``, and cuDNN's own causal
        kernel on one device without them; else ``"pallas"`` for bf16/fp16/fp32 input; ``"xla"``
        on CPU; with documents shorter than a rank's half-shard pass ``"pallas"`` to save ~2%),
        ``"pallas"`` (the Pallas Triton flash-attention kernels; the Pallas interpreter off the
        GPU), ``"cudnn_blocks"`` (cuDNN's fused kernels as every strategy's block pairs, at most
        two calls per pair; bf16/fp16 on a GPU, a dense jnp twin off it; with ``segment_ids`` a
        pair whose queries hold a document boundary runs whole on the Pallas kernels),
        ``"xla"`` (the jnp flash recurrence), ``"cudnn"`` (allgather and single device only: a
        dense global-position mask),
        or ``"dpa_xla"`` (the cuDNN code path with ``jax.nn.dot_product_attention``'s XLA kernel;
        materialises ``[B, H, L, T]`` logits, for checking that path off the GPU).
      block_size: query and key block of the jnp flash recurrence (used when it divides the
        local length, else the whole local length is one block); the Pallas kernels tile with
        ``pallas_kernels.flash_attention.default_config``.
      balance: causal load balancing: each rank computes the queries of two half-shards, ``r``
        and ``2P − 1 − r``, dealt to it by ``ppermute`` (and the outputs dealt back), so every rank
        attends the same number of (query, key) pairs; the layout seen by the caller stays
        contiguous. ``None`` (default): on with an even local length and ``impl`` "pallas", "cudnn_blocks" or
        "xla", else off; ``True`` requires that; ``False``: off. (The plain ring's K/V blocks still
        travel as contiguous shards, so its steps stay unequal: it gains less than allgather;
        ``"zigzag_ring"`` and a balanced ``"tokenring"`` deal K/V too. ``"zigzag_ring"`` is always
        balanced: it needs an even local length and rejects ``False``.)
      segment_ids: ``[B, T]`` integers (packed documents): a query sees only the keys of its own
        document, a document boundary being wherever the id changes along the global sequence
        (as in ``lasp_attention``: equal ids in two separate runs are two documents).

    Returns:
      ``o`` ``[B, T, H, E]`` in q's dtype, sharded like q under ``mesh`` (heads over ``head_axis``).
    """
    validate(q, k, v, segment_ids=segment_ids)
    _check_choice(strategy=strategy, impl=impl, block_size=block_size, balance=balance)
    scale = resolve_scale(scale, q.shape[-1])
    if mesh is None:
        return causal_attention(q, k, v, scale=scale, impl=impl, block_size=block_size, segment_ids=segment_ids)
    heads = {"H": q.shape[2], "Hk": k.shape[2]}
    check_mesh(mesh, q.shape, seq_axis=seq_axis, batch_axis=batch_axis, head_axis=head_axis, heads=heads)
    specs = layer_specs(seq_axis=seq_axis, batch_axis=batch_axis, head_axis=head_axis)
    shard_fn = functools.partial(
        _shard_with_ids,
        axis_name=seq_axis,
        strategy=strategy,
        scale=scale,
        impl=impl,
        block_size=block_size,
        balance=balance,
    )
    args, in_specs = (q, k, v), (specs.tokens,) * 3
    if segment_ids is not None:
        args, in_specs = (*args, segment_ids), (*in_specs, specs.ids)
    return layer_shard_map(shard_fn, mesh, in_specs=in_specs, out_specs=specs.tokens, axes=specs.axes)(*args)


def _shard_with_ids(q, k, v, *ids, **keywords):
    """``softmax_attention_shard`` with the local segment ids as an optional fourth positional argument."""
    return softmax_attention_shard(q, k, v, segment_ids=ids[0] if ids else None, **keywords)


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
    ``softmax_attention``. Where the caller's ``shard_map`` also splits the heads (tensor
    parallelism), q, k, v hold the local heads (``H / tp`` and ``Hk / tp``, whole query groups) and
    nothing here communicates over that axis.
    """
    validate(q, k, v, segment_ids=segment_ids)
    _check_choice(strategy=strategy, impl=impl, block_size=block_size, balance=balance)
    scale = resolve_scale(scale, q.shape[-1])
    impl = resolve_impl(impl, q, k, v, n_keys=None, documents=segment_ids is not None)
    if segment_ids is not None:
        segment_ids = local_documents(segment_ids, axis_name)
    if balance and impl in ("cudnn", "dpa_xla"):
        raise ValueError(
            f"balance=True needs impl 'pallas', 'cudnn_blocks' or 'xla' (their block offsets), got impl={impl!r}"
        )
    if balance and q.shape[1] % 2:
        raise ValueError(
            f"balance=True splits each shard in two halves: the local length must be even, q.shape={q.shape}"
        )
    if strategy == "zigzag_ring" and q.shape[1] % 2:
        raise ValueError(
            f"strategy='zigzag_ring' deals each shard as two halves: the local length must be even, q.shape={q.shape}"
        )
    if impl in ("cudnn", "dpa_xla"):
        statics = DpaStatics(axis_name=axis_name, scale=scale, implementation=_dpa_implementation(impl))
        return dpa_attention(q, k, v, segment_ids, statics)
    statics = Statics(
        axis_name=axis_name,
        scale=scale,
        impl=impl,
        block=block_size,
        balance=balance is not False,
        deal_keys=strategy in KEYS_DEALT,
    )
    return ATTEND[strategy](q, k, v, segment_ids, statics)


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
    scale = resolve_scale(scale, q.shape[-1])
    impl = resolve_impl(impl, q, k, v, n_keys=q.shape[1], documents=segment_ids is not None)
    if impl == "cudnn_blocks":  # one block pair: a single causal cuDNN call, with the blocks' backward
        statics = Statics(axis_name=None, scale=scale, impl=impl, block=block_size, balance=False)
        return allgather_attention(q, k, v, None if segment_ids is None else document_index(segment_ids), statics)
    doc_ids = None if segment_ids is None else document_index(segment_ids)
    if impl in ("cudnn", "dpa_xla"):
        implementation = _dpa_implementation(impl)
        if doc_ids is not None:
            return dpa_attention(
                q, k, v, doc_ids, DpaStatics(axis_name=None, scale=scale, implementation=implementation)
            )
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)
    if impl == "pallas":
        return flash_pallas.flash_attention(q, k, v, scale=scale, doc_ids=doc_ids)
    return flash_xla.flash_attention(q, k, v, scale=scale, doc_ids=doc_ids, block=block_size)


# ---- argument checks and the choice of block compute --------------------------------------------


def _check_choice(*, strategy, impl, block_size=DEFAULT_BLOCK, balance=None):
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got block_size={block_size!r}")
    if balance not in (None, True, False):
        raise ValueError(f"balance must be None, True or False, got balance={balance!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    if strategy != "allgather" and impl in ("cudnn", "dpa_xla"):
        raise ValueError(
            f"strategy={strategy!r} merges per-block float32 log-sum-exps, which jax.nn.dot_product_attention does "
            f"not return: use impl='cudnn_blocks', 'pallas', 'xla' or 'auto', got impl={impl!r}"
        )
    if strategy == "zigzag_ring" and balance is False:
        raise ValueError(
            "strategy='zigzag_ring' is the balanced ring (K/V dealt like the queries): balance=False contradicts it; "
            "use strategy='ring', balance=False for contiguous shards"
        )


def _dpa_implementation(impl: str) -> str:
    """``jax.nn.dot_product_attention``'s ``implementation`` for impl "cudnn" / "dpa_xla"."""
    return "cudnn" if impl == "cudnn" else "xla"


def cudnn_supports(q, k, v, n_keys: int | None) -> bool:
    """What cuDNN's fused attention takes through jax.nn.dot_product_attention (its own checks)."""
    if not on_gpu() or q.dtype not in (jnp.bfloat16, jnp.float16) or not q.dtype == k.dtype == v.dtype:
        return False
    d, e = q.shape[-1], v.shape[-1]
    cc = getattr(jax.devices()[0], "compute_capability", "0.0")
    d_max = 256 if tuple(int(x) for x in str(cc).split(".")[:2]) >= (9, 0) else 128
    even = q.shape[1] % 2 == 0 and (n_keys is None or n_keys % 2 == 0)  # a bias needs even lengths
    return d == e and d % 8 == 0 and d <= d_max and even


def resolve_impl(impl: str, q, k, v, *, n_keys: int | None, documents: bool = False) -> str:
    """The block compute to run: "pallas", "cudnn_blocks", "xla", "cudnn" or "dpa_xla". ``n_keys``:
    the key count of single-device attention, None under a mesh; ``documents``: segment ids are
    given. Under a mesh ``auto`` takes cuDNN block pairs with or without documents: a pair whose
    queries hold a document boundary runs on the Pallas kernels inside them (H200, each rank's block
    compute at sp = 2 / 4: documents of 16K–64K tokens 18–26% faster than the Pallas blocks, of 8K
    tokens, where every pair falls back, 2% slower; session 16). One device with documents: the
    Pallas kernels (cuDNN's own causal mask takes no documents)."""
    if impl == "auto":
        if n_keys is not None and not documents and cudnn_supports(q, k, v, n_keys):  # one device
            return "cudnn"
        # a mesh: cuDNN per block pair (with documents its fallback pairs run the Pallas kernels)
        if n_keys is None and cudnn_supports(q, k, v, None) and (not documents or fits_shared_memory(q, k, v)):
            return "cudnn_blocks"
        return "pallas" if on_gpu() and compiled_kernels_take(q, k, v) else "xla"
    if impl == "pallas":
        check_pallas_dtypes(q, k, v)
    if impl == "cudnn_blocks" and on_gpu() and not cudnn_supports(q, k, v, n_keys=None):
        raise ValueError(
            "impl='cudnn_blocks' on a GPU takes (this library's rule, kept to what the GPU tests cover) bf16/fp16 "
            "q, k, v of one dtype, equal head dims (a multiple of 8, at most 256 on Hopper) and an even length, "
            f"got q {q.dtype}{tuple(q.shape)}, "
            f"k {k.dtype}{tuple(k.shape)}, v {v.dtype}{tuple(v.shape)}"
        )
    if impl in ("cudnn", "dpa_xla") and v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"impl={impl!r} needs equal q/k and v head dims: q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)}"
        )
    return impl
