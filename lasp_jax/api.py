"""Public entry points of sequence-parallel linear attention (notes/design.md §2-3).

``lasp_attention`` takes global arrays and a mesh and wraps ``lasp_attention_shard`` in
``jax.shard_map``; ``lasp_attention_shard`` is the per-shard function for the inside of a user's
own ``shard_map`` and knows only the name of the sequence axis. Without a mesh (or with a
sequence axis of size 1) both are exactly ``pallas_kernels.linear_attention``.

Rank r of the sequence axis holds the contiguous tokens ``[r·L, (r+1)·L)`` with ``L = T / P``.
There is no zig-zag (load-balancing) reordering: the prefix structure of the recurrence needs
contiguous shards, so data loaders built for Megatron-style zig-zag context parallelism must
not permute tokens.
"""

from __future__ import annotations

from typing import Literal

import jax
from jax.sharding import Mesh, PartitionSpec

from lasp_jax import baselines, lasp
from lasp_jax.mesh import axes_tuple, check_mesh, mesh_size
from pallas_kernels import linear_attention
from pallas_kernels.linear_attention.api import IMPLS, validate

Strategy = Literal["ring", "allgather", "ulysses", "gather_kv"]
STRATEGIES = ("ring", "allgather", "ulysses", "gather_kv")


def _check_options(strategy, impl):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")


def _axis_size(axis_name) -> int:
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError as err:
        raise ValueError(
            f"lasp_attention_shard runs inside jax.shard_map over a mesh with the axis {axis_name!r} "
            f"({err}); with global arrays call lasp_attention(..., mesh=mesh) instead"
        ) from err


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
    v ``[B, L, Hk, E]``, g ``[B, L, H]`` for the L tokens this rank of ``axis_name`` holds
    (rank r holds global tokens ``[r·L, (r+1)·L)``); ``g_gamma`` ``[H]`` and ``initial_state``
    ``[B, H, D, E]`` (the state before global token 0) are the same on every rank.
    ``segment_ids`` ``[B, L]`` (int) are the local block of the global document ids: a boundary is
    wherever the id changes along the global sequence (including between this rank's first token
    and the previous rank's last, which one ``ppermute`` of ``[B]`` ids brings here); nothing flows
    between documents, ``initial_state`` applies to each row's first document and ``final_state``
    is the state of its last one.

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
    size = _axis_size(axis_name)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
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
    if strategy in ("ring", "allgather"):
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
      ``g`` is given) and a float32 prefix scan on every rank;
    - ``"ulysses"``: all-to-all sequence↔heads around the single-device op (needs ``H % P == 0``);
    - ``"gather_kv"``: all-gather K and V, state of the gathered prefix, local op.

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, T, Hk, D]``, ``[B, T, Hk, E]``, sharded or not.
      mesh: the device mesh, or None for the single-device op (also used when the sequence
        axis has size 1 and no batch axis is sharded).
      seq_axis: mesh axis that splits T (contiguous blocks, no zig-zag).
      batch_axis: mesh axis (or tuple of axes) that splits B, or None (replicated batch).
      strategy: one of ``STRATEGIES``.
      g, g_gamma, scale, initial_state, output_final_state, impl: as in
        ``pallas_kernels.linear_attention``; ``impl`` picks the local kernel on every shard.
      segment_ids: integer document ids ``[B, T]`` for packed rows, sharded like q: the state
        resets wherever the id changes (also exactly at a shard edge), so nothing flows between
        documents; ``initial_state`` applies to each row's first document and ``final_state`` is
        the state of its last one. Every strategy and every ``impl``.

    Returns:
      ``(o, final_state)``: o ``[B, T, H, E]`` sharded like q; ``final_state`` float32
      ``[B, H, D, E]`` (the state after the last token of the whole sequence) or None.

    Raises:
      ValueError: a missing mesh axis, ``T % P != 0``, ``B`` not divisible over the batch axis,
        an unknown strategy or impl, or any shape error of the single-device op.
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
    check_mesh(mesh, q.shape, seq_axis=seq_axis, batch_axis=batch_axis)
    if mesh.shape[seq_axis] == 1 and mesh_size(mesh, batch_axis) == 1:
        return linear_attention(q, k, v, impl=impl, **kwargs)

    batch = axes_tuple(batch_axis) or None
    if batch is not None and len(batch) == 1:
        batch = batch[0]
    token_spec = PartitionSpec(batch, seq_axis)
    specs = {
        "q": token_spec,
        "k": token_spec,
        "v": token_spec,
        "g": token_spec,
        "segment_ids": token_spec,
        "g_gamma": PartitionSpec(),
        "initial_state": PartitionSpec(batch),
    }
    named = (("q", q), ("k", k), ("v", v), ("g", g), ("g_gamma", g_gamma), ("segment_ids", segment_ids))
    arrays = {n: x for n, x in named if x is not None}
    if initial_state is not None:
        arrays["initial_state"] = initial_state

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

    out_specs = (token_spec, PartitionSpec(batch) if output_final_state else None)
    # unchecked: interpret-mode Pallas has no varying-axes rules; lasp_attention_shard follows
    # the unchecked convention for the replicated final state (see its docstring)
    # when the mesh has other axes of size > 1, be manual only over the axes named here: an
    # unchecked shard_map would otherwise all-reduce every cotangent over axes the layer never splits
    used = (seq_axis, *axes_tuple(batch_axis))
    others_split = any(size > 1 for name, size in mesh.shape.items() if name not in used)
    partial_manual = {"axis_names": frozenset(used)} if others_split else {}
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=({n: specs[n] for n in arrays},),
        out_specs=out_specs,
        check_vma=False,
        **partial_manual,
    )(arrays)
