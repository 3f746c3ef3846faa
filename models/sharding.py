"""Logical axis names → mesh axes for parameters, optimizer state and activations.

Activations follow lasp_jax's rules (``batch → dp``, ``length → sp``). Parameters are replicated
unless FSDP is on, in which case every parameter dimension named ``embed`` (or, failing that,
the first named dimension that divides evenly) is sharded over the data axis; the optimizer's
moments inherit the same layout because they carry the same metadata. Turning FSDP or sequence
parallelism on is a rules change, not a model change.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lasp_jax import DEFAULT_RULES, make_mesh


def build_mesh(dp: int, sp: int, devices=None) -> Mesh:
    """A ``(dp, sp)`` mesh of Auto axes: sequence groups contiguous, data groups strided (lasp_jax.make_mesh)."""
    devices = jax.devices() if devices is None else devices
    if dp <= 0 or sp <= 0:
        raise ValueError(f"dp and sp must be positive, got dp={dp}, sp={sp}")
    if dp * sp != len(devices):
        raise ValueError(f"dp * sp must equal the number of devices: dp={dp}, sp={sp}, devices={len(devices)}")
    return make_mesh(dp, sp, devices=devices)


def param_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, *, fsdp: bool, data_axis="dp"):
    """PartitionSpec of one parameter: replicated, or one dimension sharded over ``data_axis`` under FSDP."""
    spec = [None] * len(shape)
    size = mesh.shape.get(data_axis, 1)
    if fsdp and size > 1:
        order = [i for i, a in enumerate(axes) if a == "embed"] + [i for i, a in enumerate(axes) if a != "embed"]
        for i in order:
            if axes[i] is not None and shape[i] % size == 0:
                spec[i] = data_axis
                break
    return PartitionSpec(*spec)


def tree_shardings(tree, mesh: Mesh | None, *, fsdp: bool = False, data_axis: str = "dp"):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments) and plain leaves."""
    if mesh is None:
        return None

    def one(x):
        if isinstance(x, nnx.Variable):
            shape = jax.tree.leaves(x)[0].shape  # the value (an array or a ShapeDtypeStruct)
            axes = x.get_metadata().get("logical_axes") or (None,) * len(shape)
            return x.replace(NamedSharding(mesh, param_spec(axes, shape, mesh, fsdp=fsdp, data_axis=data_axis)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def activation_sharding(mesh: Mesh, ndim: int, *, leading: int = 0) -> NamedSharding:
    """Sharding of a ``[..., B, T, ...]`` activation whose batch axis sits after ``leading`` unsharded axes."""
    rules = dict(DEFAULT_RULES)
    names = [None] * leading + [rules.get("batch"), rules.get("length")] + [None] * (ndim - leading - 2)
    names = [a if a in mesh.axis_names else None for a in names]
    return NamedSharding(mesh, PartitionSpec(*names))
