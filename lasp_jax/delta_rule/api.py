"""Public entry points of the sequence-parallel gated delta rule (notes/design.md §3, §6).

``lasp_gated_delta_rule`` takes global arrays and a mesh and wraps ``lasp_gated_delta_rule_shard``
in ``jax.shard_map``; ``lasp_gated_delta_rule_shard`` is the per-shard function for the inside of a
user's own ``shard_map`` and knows only the name of the sequence axis. Without a mesh (or with
every axis it would use of size 1) both are exactly ``pallas_kernels.gated_delta_rule``.

Rank r of the sequence axis holds the contiguous tokens ``[r·L, (r+1)·L)`` with ``L = T / P`` (no
zig-zag reordering: the prefix structure needs contiguous shards). Strategies:

- ``"allgather"`` (LASP-2 for affine recurrences): one ``all_gather`` of every rank's
  ``(Φ_r, M_r)`` per layer, a float32 fold over the ranks, the local op from ``S_in(r)``;
- ``"ring"`` (LASP): P−1 chained ``ppermute``s of the ``[B, Hv, D, E]`` state;
- ``"scan"``: the same prefix as a log-depth (Hillis–Steele) scan, ``⌈log2 P⌉`` rounds of one
  ``ppermute`` of ``(Φ, M)`` each (the last sends M alone); backward: the scan from the right with
  ``Φᵀ`` (``lasp_jax.scan``);
- ``"ulysses"``: all-to-all sequence↔heads around the single-device op (``H % P == Hv % P == 0``).
"""

from __future__ import annotations

from typing import Literal

import jax
from jax.sharding import Mesh

from lasp_jax.delta_rule.layer import delta_rule_layer
from lasp_jax.mesh import check_mesh, check_ulysses_heads, layer_shard_map, layer_specs, mesh_size, shard_axis_size
from lasp_jax.state_passing import broadcast_from, varying_axes
from pallas_kernels import gated_delta_rule
from pallas_kernels.common import resolve_scale
from pallas_kernels.gated_delta_rule.api import check_impl, validate
from pallas_kernels.gated_delta_rule.products import floor_gates

Strategy = Literal["allgather", "ring", "scan", "ulysses"]
STRATEGIES = ("allgather", "ring", "scan", "ulysses")
_TOKEN_ARGS = ("q", "k", "v", "beta", "g")


def _check_strategy(strategy):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")


def ulysses(
    q, k, v, beta, *, axis_name, size, g, scale, initial_state, output_final_state, segment_ids, impl, gate_lower_bound
):
    """All-to-all from sequence- to head-sharded, the single-device op on the whole sequence, back.

    Heads split contiguously, so rank r's q/k heads ``[r·H/P, (r+1)·H/P)`` serve exactly its value
    heads ``[r·Hv/P, (r+1)·Hv/P)``. Differentiates by autodiff through the collectives.
    """
    h, hv = q.shape[2], v.shape[2]
    if h % size or hv % size:
        raise ValueError(
            f"strategy='ulysses' needs the q/k and value heads divisible by the sequence axis: H={h}, Hv={hv}, P={size}"
        )
    rank = jax.lax.axis_index(axis_name)

    def seq_to_heads(x):
        return None if x is None else jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)

    o, final = gated_delta_rule(
        *(seq_to_heads(x) for x in (q, k, v, beta)),
        g=seq_to_heads(g),
        scale=scale,
        initial_state=(
            None
            if initial_state is None
            else jax.lax.dynamic_slice_in_dim(initial_state, rank * (hv // size), hv // size, axis=1)
        ),
        output_final_state=output_final_state,
        segment_ids=None if segment_ids is None else jax.lax.all_gather(segment_ids, axis_name, axis=1, tiled=True),
        impl=impl,
        gate_lower_bound=gate_lower_bound,
    )
    o = jax.lax.all_to_all(o, axis_name, split_axis=1, concat_axis=2, tiled=True)
    if output_final_state:
        final = jax.lax.all_gather(final, axis_name, axis=1, tiled=True)
        if axis_name in varying_axes(q):  # checked shard_map: type the replicated state invariant
            final = broadcast_from(final, 0, axis_name)
    return o, final


def lasp_gated_delta_rule_shard(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    axis_name: str = "sp",
    strategy: Strategy = "allgather",
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: str = "auto",
    gate_lower_bound: float | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The sequence-parallel gated delta rule on one shard; call it inside ``jax.shard_map``.

    Every argument is the local block of the global one: q, k ``[B, L, H, D]``, v ``[B, L, Hv, E]``,
    beta ``[B, L, Hv]``, g ``[B, L, Hv(, D)]`` for the L tokens this rank of ``axis_name`` holds
    (rank r holds global tokens ``[r·L, (r+1)·L)``); ``initial_state`` ``[B, Hv, D, E]`` (the state
    before global token 0) is the same on every rank. ``segment_ids`` ``[B, L]``: the local block of
    the global document ids; a boundary is wherever the id changes along the global sequence
    (including between this rank's first token and the previous rank's last).

    Returns ``(o, final_state)``: o ``[B, L, Hv, E]`` for the local tokens; ``final_state`` the
    float32 state after the last token of the whole sequence, the same on every rank (None unless
    ``output_final_state``). Differentiable in every array argument. In a ``shard_map`` with
    ``check_vma=True`` the returned ``final_state`` is invariant along ``axis_name``; unchecked, every
    rank's copy is its own output (replicate it over ``axis_name`` in the out_spec).
    ``gate_lower_bound``: as in ``pallas_kernels.gated_delta_rule`` (the gates are raised to it here,
    in float32, before any collective).
    """
    _check_strategy(strategy)
    check_impl(impl)
    validate(
        q, k, v, beta, g=g, initial_state=initial_state, segment_ids=segment_ids, gate_lower_bound=gate_lower_bound
    )
    size = shard_axis_size(axis_name, layer="lasp_gated_delta_rule")
    scale = resolve_scale(scale, q.shape[-1])
    kwargs = dict(
        g=floor_gates(g, gate_lower_bound),  # raised once here; the kernels take the bound as a hint
        gate_lower_bound=gate_lower_bound,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        segment_ids=segment_ids,
        impl=impl,
    )
    if size == 1:
        return gated_delta_rule(q, k, v, beta, **kwargs)
    layer = ulysses if strategy == "ulysses" else delta_rule_layer
    if strategy != "ulysses":
        kwargs["strategy"] = strategy
    return layer(q, k, v, beta, axis_name=axis_name, size=size, **kwargs)


def lasp_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    mesh: Mesh | None,
    seq_axis: str = "sp",
    batch_axis: str | tuple[str, ...] | None = None,
    head_axis: str | None = None,
    strategy: Strategy = "allgather",
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: str = "auto",
    gate_lower_bound: float | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The gated delta rule (DeltaNet, Gated DeltaNet, KDA) with the sequence sharded over ``mesh[seq_axis]``.

    Equals ``pallas_kernels.gated_delta_rule`` on the same global arrays, to float32 rounding, for
    every strategy (see the module docstring).

    Args:
      q, k, v, beta: ``[B, T, H, D]``, ``[B, T, H, D]``, ``[B, T, Hv, E]``, ``[B, T, Hv]``, sharded or not.
      mesh: the device mesh, or None for the single-device op.
      seq_axis: mesh axis that splits T (contiguous blocks, no zig-zag).
      batch_axis: mesh axis (or tuple of axes) that splits B, or None (replicated batch).
      head_axis: mesh axis that splits the heads (H and Hv contiguously; tensor parallelism), or None.
      strategy: one of ``STRATEGIES``.
      g, scale, initial_state, output_final_state, impl, gate_lower_bound: as in
        ``pallas_kernels.gated_delta_rule``; ``impl`` picks the local op on every shard.
      segment_ids: integer document ids ``[B, T]`` for packed rows: the state resets wherever the id
        changes (also exactly at a shard edge); ``initial_state`` applies to each row's first
        document and ``final_state`` is the state of its last one.

    Returns:
      ``(o, final_state)``: o ``[B, T, Hv, E]`` sharded like q; ``final_state`` float32
      ``[B, Hv, D, E]`` (the state after the last token of the whole sequence) or None.

    Raises:
      ValueError: a missing mesh axis, ``T % P != 0``, ``B`` or the heads not divisible over their
        axes, an unknown strategy or impl, ``ulysses`` with heads not divisible by P, or any shape
        error of the single-device op. TypeError: non-float inputs, non-integer ``segment_ids``.
    """
    _check_strategy(strategy)
    check_impl(impl)
    validate(
        q, k, v, beta, g=g, initial_state=initial_state, segment_ids=segment_ids, gate_lower_bound=gate_lower_bound
    )
    kwargs = dict(
        g=g,
        gate_lower_bound=gate_lower_bound,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        segment_ids=segment_ids,
        impl=impl,
    )
    if mesh is None:
        return gated_delta_rule(q, k, v, beta, **kwargs)
    heads = {"H": q.shape[2], "Hv": v.shape[2]}
    check_mesh(mesh, q.shape, seq_axis=seq_axis, batch_axis=batch_axis, head_axis=head_axis, heads=heads)
    if strategy == "ulysses":
        check_ulysses_heads(mesh, heads, seq_axis=seq_axis, head_axis=head_axis)
    specs = layer_specs(seq_axis=seq_axis, batch_axis=batch_axis, head_axis=head_axis)
    if mesh_size(mesh, specs.axes) == 1:
        return gated_delta_rule(q, k, v, beta, **kwargs)

    named = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "segment_ids": segment_ids, "initial_state": initial_state}
    arrays = {n: x for n, x in named.items() if x is not None}
    in_specs = {n: specs.tokens for n in _TOKEN_ARGS} | {"segment_ids": specs.ids, "initial_state": specs.state}

    def per_shard(xs):
        return lasp_gated_delta_rule_shard(
            xs["q"],
            xs["k"],
            xs["v"],
            xs["beta"],
            axis_name=seq_axis,
            strategy=strategy,
            g=xs.get("g"),
            scale=scale,
            initial_state=xs.get("initial_state"),
            output_final_state=output_final_state,
            segment_ids=xs.get("segment_ids"),
            impl=impl,
            gate_lower_bound=gate_lower_bound,
        )

    out_specs = (specs.tokens, specs.state if output_final_state else None)
    return layer_shard_map(
        per_shard, mesh, in_specs=({n: in_specs[n] for n in arrays},), out_specs=out_specs, axes=specs.axes
    )(arrays)
