"""Logical axis names → mesh axes for parameters, optimizer state and activations.

The trainer's mesh is ``(dp, sp, tp)``. Activations follow lasp_jax's rules (``batch → dp``,
``length → sp``). Parameters (Megatron-style tensor parallelism when ``tp > 1``): the first
dimension named ``heads``, ``qkv`` (attention heads' columns) or ``mlp`` (MLP hidden units) that
divides evenly is sharded over ``tp``, so q/k/v/gate/up projections are column-parallel and the
output/down projections row-parallel (``models.layers``); under FSDP every dimension named
``embed`` (or, failing that, the first other named dimension that divides evenly) is sharded over
the data axis. The optimizer's moments inherit the same layout because they carry the same
metadata. Turning FSDP, sequence or tensor parallelism on is a rules change, not a model change.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lasp_jax import DEFAULT_RULES

TENSOR_PARALLEL_NAMES = ("heads", "qkv", "mlp")  # logical names split over the tp axis


def build_mesh(dp: int, sp: int, devices=None, *, tp: int = 1) -> Mesh:
    """A ``(dp, sp, tp)`` mesh of Auto axes: tensor groups the innermost contiguous devices, then
    sequence groups (contiguous, as lasp_jax.make_mesh), data groups strided."""
    devices = list(jax.devices() if devices is None else devices)
    if dp <= 0 or sp <= 0 or tp <= 0:
        raise ValueError(f"dp, sp and tp must be positive, got dp={dp}, sp={sp}, tp={tp}")
    if dp * sp * tp != len(devices):
        raise ValueError(
            f"dp * sp * tp must equal the number of devices: dp={dp}, sp={sp}, tp={tp}, devices={len(devices)}"
        )
    grid = np.empty(len(devices), dtype=object)
    grid[:] = devices
    return Mesh(grid.reshape(dp, sp, tp), ("dp", "sp", "tp"), axis_types=(AxisType.Auto,) * 3)


def param_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh: Mesh,
    *,
    fsdp: bool,
    data_axis: str = "dp",
    tensor_axis: str = "tp",
):
    """PartitionSpec of one parameter: its first ``TENSOR_PARALLEL_NAMES`` dimension that divides
    over ``tensor_axis`` sharded there, and under FSDP one other dimension over ``data_axis``."""
    spec = [None] * len(shape)
    tp = mesh.shape.get(tensor_axis, 1)
    if tp > 1:
        split = [i for i, a in enumerate(axes) if a in TENSOR_PARALLEL_NAMES and shape[i] % tp == 0]
        if split:
            spec[split[0]] = tensor_axis
    size = mesh.shape.get(data_axis, 1)
    if fsdp and size > 1:
        order = [i for i, a in enumerate(axes) if a == "embed"] + [i for i, a in enumerate(axes) if a != "embed"]
        for i in order:
            if axes[i] is not None and spec[i] is None and shape[i] % size == 0:
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
