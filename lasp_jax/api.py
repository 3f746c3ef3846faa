"""Public entry points of sequence-parallel linear attention (notes/design.md §2-3).

``lasp_attention`` takes global arrays and a mesh and wraps ``lasp_attention_shard`` in
``jax.shard_map``; ``lasp_attention_shard`` is the per-shard function for the inside of a user's
own ``shard_map`` and knows only the name of the sequence axis. Without a mesh (or with every
axis the layer splits of size 1) both are exactly ``pallas_kernels.linear_attention``. A
``head_axis`` (tensor parallelism) is a manual axis of the layer's ``shard_map`` too: each rank
sees only its heads and nothing crosses that axis.

Rank r of the sequence axis holds the contiguous tokens ``[r·L, (r+1)·L)`` with ``L = T / P``.
There is no zig-zag (load-balancing) reordering: the prefix structure of the recurrence needs
contiguous shards, so data loaders built for Megatron-style zig-zag context parallelism must
not permute tokens.
"""

from __future__ import annotations

from typing import Literal

import jax
from jax.sharding import Mesh

from lasp_jax import baselines, lasp
from lasp_jax.mesh import check_mesh, check_ulysses_heads, layer_shard_map, layer_specs, mesh_size, shard_axis_size
from pallas_kernels import linear_attention
from pallas_kernels.common import resolve_scale
from pallas_kernels.linear_attention.api import IMPLS, validate

Strategy = Literal["ring", "allgather", "scan", "ulysses", "gather_kv"]
STRATEGIES = ("ring", "allgather", "scan", "ulysses", "gather_kv")


def _check_options(strategy, impl):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")


def lasp_attention_shard(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: str = "sp",
    strategy: Strategy = "ring",
    g: jax.Array | None = None,
    g_gamma: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """Sequence-parallel causal linear attention on one shard; call it inside ``jax.shard_map``.

    Every argument is the local block of the global one: q ``[B, L, H, D]``, k ``[B, L, Hk, D]``,
    v ``[B, L, Hk, E]``, g ``[B, L, H]`` (or ``[B, L, H, D]`` per key channel) for the L tokens this
    rank of ``axis_name`` holds
    (rank r holds global tokens ``[r·L, (r+1)·L)``); ``g_gamma`` ``[H]`` and ``initial_state``
    ``[B, H, D, E]`` (the state before global token 0) are the same on every rank.
    ``segment_ids`` ``[B, L]`` (int) are the local block of the global document ids: a boundary is
    wherever the id changes along the global sequence (including between this rank's first token
    and the previous rank's last, which one ``ppermute`` of ``[B]`` ids brings here); nothing flows
    between documents, ``initial_state`` applies to each row's first document and ``final_state``
    is the state of its last one.

    Heads are independent: where the caller's ``shard_map`` also splits the heads over a mesh axis
    (tensor parallelism), every per-head argument is the local block of heads (q's ``H / tp`` heads,
    k/v's ``Hk / tp``, their ``g``, ``g_gamma`` and ``initial_state``) and nothing here communicates
    over that axis; ``strategy="ulysses"`` then needs the local ``H`` divisible by the sequence axis.

    Returns ``(o, final_state)``: o ``[B, L, H, E]`` for the local tokens; ``final_state`` the
    float32 state after the last token of the whole sequence, the same on every rank (None
    unless ``output_final_state``). Differentiable in every array argument.

    Inside a ``shard_map`` with ``check_vma=True`` (the default) the returned ``final_state``
    is invariant along ``axis_name``. With ``check_vma=False`` (needed by interpret-mode Pallas),
    every rank's copy of ``final_state`` is its own output, the convention of unchecked
    ``shard_map``; an out_spec that replicates it over ``axis_name`` is then correct.
    """
    _check_options(strategy, impl)
    validate(q, k, v, g=g, g_gamma=g_gamma, initial_state=initial_state, segment_ids=segment_ids)
    size = shard_axis_size(axis_name, layer="lasp_attention")
    scale = resolve_scale(scale, q.shape[-1])
    kwargs = dict(
        g=g,
        g_gamma=g_gamma,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        segment_ids=segment_ids,
    )
    if size == 1:
        return linear_attention(q, k, v, impl=impl, **kwargs)
    if strategy in ("ring", "allgather", "scan"):
        return lasp.lasp_layer(q, k, v, axis_name=axis_name, size=size, strategy=strategy, impl=impl, **kwargs)
    baseline = baselines.ulysses if strategy == "ulysses" else baselines.gather_kv
    return baseline(q, k, v, axis_name=axis_name, size=size, impl=impl, **kwargs)


def lasp_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh | None,
    seq_axis: str = "sp",
    batch_axis: str | tuple[str, ...] | None = None,
    head_axis: str | None = None,
    strategy: Strategy = "ring",
    g: jax.Array | None = None,
    g_gamma: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """Causal linear attention with the sequence sharded over ``mesh[seq_axis]`` (LASP / LASP-2).

    Equals ``pallas_kernels.linear_attention`` on the same global arrays, to float32 rounding of
    the state arithmetic, for every strategy:

    - ``"ring"`` (LASP): P−1 chained ``ppermute``s of the float32 ``[B, H, D, E]`` state;
    - ``"allgather"`` (LASP-2): one ``all_gather`` of the local states (and shard decays when
      ``g`` is given: ``[B, H]`` per token, ``[B, H, D]`` per key channel) and a float32 prefix scan
      on every rank;
    - ``"scan"``: the prefix over ranks as a log-depth (Hillis–Steele) scan, ``⌈log2 P⌉`` rounds of
      one ``ppermute`` each carrying one state (and its shard decay with ``g`` or documents);
      the backward is the same scan from the right (``lasp_jax.scan``);
    - ``"ulysses"``: all-to-all sequence↔heads around the single-device op (needs ``H % P == 0``);
    - ``"gather_kv"``: all-gather K and V, state of the gathered prefix, local op.

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, T, Hk, D]``, ``[B, T, Hk, E]``, sharded or not.
      mesh: the device mesh, or None for the single-device op (also used when every axis the
        layer splits, sequence, batch and head, has size 1).
      seq_axis: mesh axis that splits T (contiguous blocks, no zig-zag).
      batch_axis: mesh axis (or tuple of axes) that splits B, or None (replicated batch).
      head_axis: mesh axis that splits the heads (tensor parallelism), or None: q's H and k/v's Hk
        heads split contiguously (each rank keeps whole groups of query heads with their key/value
        head, so ``H`` and ``Hk`` must both divide over it), and with them ``g`` ``[B, T, H(, D)]``,
        ``g_gamma`` ``[H]``, ``initial_state`` and ``final_state``. It is a manual axis of the
        layer's ``shard_map``: nothing is gathered over it and o keeps its head sharding.
        ``"ulysses"`` then all-to-alls each rank's ``H / mesh[head_axis]`` heads over the sequence
        axis (they must divide by P).
      strategy: one of ``STRATEGIES``.
      g, g_gamma, scale, initial_state, output_final_state, impl: as in
        ``pallas_kernels.linear_attention``; ``impl`` picks the local kernel on every shard. With a
        per-channel ``g`` ``[B, T, H, D]`` (GLA) the shard decay Γ_r is a vector per key channel
        that scales the rows of the states passed between ranks (notes/design.md §6); every strategy.
      segment_ids: integer document ids ``[B, T]`` for packed rows, sharded like q: the state
        resets wherever the id changes (also exactly at a shard edge), so nothing flows between
        documents; ``initial_state`` applies to each row's first document and ``final_state`` is
        the state of its last one. Every strategy and every ``impl``.

    Returns:
      ``(o, final_state)``: o ``[B, T, H, E]`` sharded like q (heads over ``head_axis``);
      ``final_state`` float32 ``[B, H, D, E]`` (the state after the last token of the whole
      sequence) or None.

    Raises:
      ValueError: a missing mesh axis, a head axis equal to the sequence or a batch axis, ``T % P
        != 0``, ``B`` not divisible over the batch axis, ``H`` or ``Hk`` not divisible over the head
        axis, an unknown strategy or impl, or any shape error of the single-device op.
    """
    _check_options(strategy, impl)
    validate(q, k, v, g=g, g_gamma=g_gamma, initial_state=initial_state, segment_ids=segment_ids)
    kwargs = dict(
        g=g,
        g_gamma=g_gamma,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        segment_ids=segment_ids,
    )
    if mesh is None:
        return linear_attention(q, k, v, impl=impl, **kwargs)
    heads = {"H": q.shape[2], "Hk": k.shape[2]}
    check_mesh(mesh, q.shape, seq_axis=seq_axis, batch_axis=batch_axis, head_axis=head_axis, heads=heads)
    if strategy == "ulysses":
        check_ulysses_heads(mesh, {"H": q.shape[2]}, seq_axis=seq_axis, head_axis=head_axis)
    specs = layer_specs(seq_axis=seq_axis, batch_axis=batch_axis, head_axis=head_axis)
    if mesh_size(mesh, specs.axes) == 1:
        return linear_attention(q, k, v, impl=impl, **kwargs)

    in_specs = {
        "q": specs.tokens,
        "k": specs.tokens,
        "v": specs.tokens,
        "g": specs.tokens,
        "segment_ids": specs.ids,
        "g_gamma": specs.per_head,
        "initial_state": specs.state,
    }
    named = {
        "q": q,
        "k": k,
        "v": v,
        "g": g,
        "g_gamma": g_gamma,
        "segment_ids": segment_ids,
        "initial_state": initial_state,
    }
    arrays = {n: x for n, x in named.items() if x is not None}

    def per_shard(xs):
        return lasp_attention_shard(
            xs["q"],
            xs["k"],
            xs["v"],
            axis_name=seq_axis,
            strategy=strategy,
            g=xs.get("g"),
            g_gamma=xs.get("g_gamma"),
            scale=scale,
            initial_state=xs.get("initial_state"),
            output_final_state=output_final_state,
            segment_ids=xs.get("segment_ids"),
            impl=impl,
        )

    out_specs = (specs.tokens, specs.state if output_final_state else None)
    return layer_shard_map(
        per_shard, mesh, in_specs=({n: in_specs[n] for n in arrays},), out_specs=out_specs, axes=specs.axes
    )(arrays)
