"""Meshes and logical-axis sharding for data x sequence parallelism (stub; full version follows)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "dp"),
    ("length", "sp"),
    ("heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("embed", None),
    ("mlp", None),
    ("vocab", None),
)


def make_mesh(dp: int | None = None, sp: int | None = None, *, devices=None, axis_names=("dp", "sp")) -> Mesh:
    """A ``(dp, sp)`` mesh: sequence groups are contiguous devices, data groups strided (LASP's rank map)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if sp is None:
        sp = n // (dp or 1)
    if dp is None:
        dp = n // sp
    if dp * sp != n:
        raise ValueError(f"dp * sp must equal the number of devices: dp={dp}, sp={sp}, devices={n}")
    return Mesh(np.array(devices, dtype=object).reshape(dp, sp), tuple(axis_names))


def logical_spec(names, rules=DEFAULT_RULES, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry the logical ``names``."""
    table = dict(rules)
    axes = [table.get(n) if n is not None else None for n in names]
    if mesh is not None:
        axes = [a if a in mesh.axis_names else None for a in axes]
    return PartitionSpec(*axes)


def shard_logical(x, names, mesh: Mesh, rules=DEFAULT_RULES):
    """Place ``x`` on ``mesh`` by logical dimension names."""
    return jax.device_put(x, NamedSharding(mesh, logical_spec(names, rules, mesh)))
