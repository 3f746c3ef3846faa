"""Meshes and logical-axis sharding for data × sequence parallelism.

Model code names the dimensions of its activations (``batch``, ``length``, ``heads``, ...); one
small rules table maps those names to mesh axes, so turning sequence parallelism on is a change of
mesh (or of rules), not of model code. A rule whose mesh axis is absent from the mesh means
"replicated", so one table serves every mesh from ``(dp, 1)`` to ``(1, sp)``.

Device layout follows the LASP reference: with ``world = dp · sp`` devices in id order, sequence
group i is the contiguous devices ``[i·sp, (i+1)·sp)`` (neighbours in a ring are neighbours on
the node) and data group j the strided devices ``{j, j+sp, j+2·sp, ...}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", "dp"),
    ("length", "sp"),
    ("heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("embed", None),
    ("mlp", None),
    ("vocab", None),
)


def _auto_axes(n: int):
    axis_type = getattr(jax.sharding, "AxisType", None)
    return {} if axis_type is None else {"axis_types": (axis_type.Auto,) * n}


def make_mesh(
    dp: int | None = None,
    sp: int | None = None,
    *,
    devices: Sequence | None = None,
    axis_names: tuple[str, str] = ("dp", "sp"),
) -> Mesh:
    """A ``(dp, sp)`` mesh over ``devices`` (default: all), sequence groups contiguous, data groups strided.

    Either size may be omitted and is then inferred from the device count; with both omitted
    every device goes to the sequence axis. Axes are of the ``Auto`` type, so ``jit`` propagates
    shardings through the code around ``lasp_attention``.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("dp", dp), ("sp", sp)):
        if size is not None and (not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(f"{name} must be a positive integer, got {name}={size!r}")
    if dp is None and sp is None:
        dp, sp = 1, n
    elif sp is None:
        if n % dp:
            raise ValueError(f"dp must divide the number of devices: dp={dp}, devices={n}")
        sp = n // dp
    elif dp is None:
        if n % sp:
            raise ValueError(f"sp must divide the number of devices: sp={sp}, devices={n}")
        dp = n // sp
    if dp * sp != n:
        raise ValueError(f"dp * sp must equal the number of devices: dp={dp}, sp={sp}, devices={n}")
    if len(axis_names) != 2 or axis_names[0] == axis_names[1]:
        raise ValueError(f"axis_names must be two distinct names (data, sequence), got {axis_names!r}")
    grid = np.empty(n, dtype=object)
    grid[:] = devices
    return Mesh(grid.reshape(dp, sp), tuple(axis_names), **_auto_axes(2))


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def logical_spec(names: Sequence[str | None], rules: Rules = DEFAULT_RULES, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry the logical ``names`` (None: unsharded).

    With a ``mesh``, rules that name axes the mesh lacks map to None. Raises ValueError for a
    logical name the rules do not know, and for a mesh axis used by two dimensions.
    """
    table = dict(rules)
    entries, used = [], {}
    for dim, name in enumerate(names):
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known names: {sorted(table)}")
        axes = _as_tuple(table[name])
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.axis_names)
        for a in axes:
            if a in used:
                raise ValueError(f"mesh axis {a!r} used twice: by {names[used[a]]!r} and {name!r} in names={names}")
            used[a] = dim
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def _check_divisible(shape, names, spec: PartitionSpec, mesh: Mesh):
    if len(shape) != len(names):
        raise ValueError(f"one logical name per dimension: shape={tuple(shape)}, names={tuple(names)}")
    for dim, (size, name, axes) in enumerate(zip(shape, names, spec)):
        parts = int(np.prod([mesh.shape[a] for a in _as_tuple(axes)]))
        if size % parts:
            raise ValueError(
                f"dimension {dim} ({name!r}) of size {size} does not divide over mesh axes {axes!r} "
                f"of {parts} devices: shape={tuple(shape)}"
            )


def logical_sharding(shape, names: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for an array of ``shape`` with logical ``names``, checking divisibility."""
    spec = logical_spec(names, rules, mesh)
    _check_divisible(shape, names, spec, mesh)
    return NamedSharding(mesh, spec)


def shard_logical(x: jax.Array, names: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Place ``x`` on ``mesh`` by logical dimension names (outside ``jit``), e.g. ``("batch", "length")``."""
    return jax.device_put(x, logical_sharding(x.shape, names, mesh, rules))


def with_logical_constraint(
    x: jax.Array, names: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> jax.Array:
    """``jax.lax.with_sharding_constraint`` by logical names (inside ``jit``)."""
    return jax.lax.with_sharding_constraint(x, logical_sharding(x.shape, names, mesh, rules))


def axes_tuple(axes) -> tuple:
    """A mesh axis name, a tuple of them, or None as a tuple of names."""
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def mesh_size(mesh: Mesh, axes) -> int:
    """The number of devices along axes (one name, a tuple of names or None)."""
    n = 1
    for a in axes_tuple(axes):
        n *= mesh.shape[a]
    return n


def check_mesh(mesh: Mesh, shape, *, seq_axis, batch_axis, head_axis=None, heads: Mapping[str, int] | None = None):
    """Raise ValueError when an axis is missing, two roles share an axis, or a dimension does not
    divide over its axes. ``heads``: every head count that ``head_axis`` splits, by name (e.g.
    ``{"H": 8, "Hk": 2}``); default ``{"H": shape[2]}``."""
    b, t = shape[:2]
    names = tuple(mesh.axis_names)
    roles = (("seq_axis", seq_axis), *(("batch_axis", a) for a in axes_tuple(batch_axis)))
    for role, axis in (*roles, *((("head_axis", head_axis),) if head_axis is not None else ())):
        if axis not in names:
            raise ValueError(f"{role}={axis!r} is not an axis of the mesh: mesh.axis_names={names}")
    if seq_axis in axes_tuple(batch_axis):
        raise ValueError(f"seq_axis={seq_axis!r} cannot also be a batch axis: batch_axis={batch_axis!r}")
    if head_axis is not None and (head_axis == seq_axis or head_axis in axes_tuple(batch_axis)):
        raise ValueError(
            f"head_axis={head_axis!r} must differ from seq_axis={seq_axis!r} and batch_axis={batch_axis!r}"
        )
    sp, dp = mesh.shape[seq_axis], mesh_size(mesh, batch_axis)
    if t % sp:
        raise ValueError(
            f"the sequence length must divide over the sequence axis: T={t}, mesh.shape[{seq_axis!r}]={sp} "
            f"(T % {sp} = {t % sp}); pad the sequence to a multiple of {sp}"
        )
    if b % dp:
        raise ValueError(
            f"the batch must divide over the batch axis: B={b}, {batch_axis!r} has {dp} devices (B % {dp} = {b % dp})"
        )
    if head_axis is None:
        return
    heads = {"H": shape[2]} if heads is None else dict(heads)
    tp = mesh.shape[head_axis]
    if any(n % tp for n in heads.values()):
        counts = ", ".join(f"{name}={n}" for name, n in heads.items())
        raise ValueError(
            f"the heads must divide over the head axis: {counts}, mesh.shape[{head_axis!r}]={tp} "
            "(each rank of the head axis keeps whole groups of query heads with their key/value heads)"
        )


def check_ulysses_heads(mesh: Mesh, heads: Mapping[str, int], *, seq_axis, head_axis):
    """``strategy="ulysses"`` under a head axis all-to-alls each rank's ``n / tp`` local heads over the
    sequence axis: raise ValueError unless they divide over it (``head_axis`` None: nothing to check
    here, the per-shard function checks the heads it sees)."""
    if head_axis is None:
        return
    tp, sp = mesh.shape[head_axis], mesh.shape[seq_axis]
    if any((n // tp) % sp for n in heads.values()):
        counts = ", ".join(f"{name}={n}" for name, n in heads.items())
        raise ValueError(
            f"strategy='ulysses' all-to-alls each rank's local heads over the sequence axis: the heads divided by "
            f"mesh.shape[{head_axis!r}]={tp} must divide by mesh.shape[{seq_axis!r}]={sp}, got {counts}"
        )


@dataclasses.dataclass(frozen=True)
class LayerSpecs:
    """PartitionSpecs of a sequence-parallel layer's arguments (notes/design.md §3).

    ``tokens``: ``[B, T, heads, ...]`` (q, k, v, per-token gates, outputs); ``ids``: ``[B, T]``
    (segment ids); ``per_head``: ``[H]`` (``g_gamma``); ``state``: ``[B, H, D, E]`` (initial and
    final states). ``axes``: the mesh axes the layer splits (its shard_map's manual axes).
    """

    tokens: PartitionSpec
    ids: PartitionSpec
    per_head: PartitionSpec
    state: PartitionSpec
    axes: tuple[str, ...]


def layer_specs(*, seq_axis, batch_axis, head_axis=None) -> LayerSpecs:
    """The specs of a layer whose batch splits over ``batch_axis``, sequence over ``seq_axis`` and
    heads over ``head_axis`` (None: replicated)."""
    batch = axes_tuple(batch_axis) or None
    if batch is not None and len(batch) == 1:
        batch = batch[0]
    return LayerSpecs(
        tokens=PartitionSpec(batch, seq_axis, head_axis),
        ids=PartitionSpec(batch, seq_axis),
        per_head=PartitionSpec(head_axis),
        state=PartitionSpec(batch, head_axis),
        axes=(seq_axis, *axes_tuple(batch_axis), *axes_tuple(head_axis)),
    )


def layer_shard_map(fn, mesh: Mesh, *, in_specs, out_specs, axes):
    """``jax.shard_map`` of a layer's per-shard function, manual over the mesh axes it splits.

    Unchecked: interpret-mode Pallas has no varying-axes rules (the per-shard functions follow the
    unchecked convention for a state replicated over the sequence axis). Manual over ``axes`` only
    when the mesh has other axes, even of size 1: an unchecked shard_map manual over them would
    all-reduce every cotangent over axes the layer never splits (for a size-1 axis XLA keeps that
    one-device all-reduce: a copy of dq, dk and dv per layer); those stay automatic.
    """
    others = any(name not in axes for name in mesh.axis_names)
    partial_manual = {"axis_names": frozenset(axes)} if others else {}
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False, **partial_manual)


def shard_axis_size(axis_name, *, layer: str) -> int:
    """The size of ``axis_name`` inside a ``shard_map``; a clear error naming ``layer`` (the public
    function with a mesh) and ``layer_shard`` (the per-shard one) when called outside one."""
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError as err:
        raise ValueError(
            f"{layer}_shard runs inside jax.shard_map over a mesh with the axis {axis_name!r} "
            f"({err}); with global arrays call {layer}(..., mesh=mesh) instead"
        ) from err
