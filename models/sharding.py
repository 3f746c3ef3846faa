"""Logical axis names → mesh axes for parameters, optimizer state and activations.

The trainer's mesh is ``(dp, sp, tp)``. Activations follow lasp_jax's rules (``batch → dp``,
``length → sp``). Parameters (Megatron-style tensor parallelism when ``tp > 1``): the first
dimension named ``heads``, ``qkv`` (attention heads' columns) or ``mlp`` (MLP hidden units) that
divides evenly is sharded over ``tp``, so q/k/v/gate/up projections are column-parallel and the
output/down projections row-parallel (``models.layers``); under FSDP every dimension named
``embed`` (or, failing that, the first other named dimension that divides evenly) is sharded over
the data axis. The optimizer's moments inherit the same layout because they carry the same
metadata. Turning FSDP, sequence or tensor parallelism on is a rules change, not a model change.

ZeRO-1 (``MeshConfig.shard_optimizer_over_data``, ``optimizer_shardings``): the optimizer's moments
(and, inside the step, the gradients and the update) are split over every data-like axis of size > 1,
``dp`` and ``sp`` together (never ``tp``), on the first dimension, ``embed`` first, that divides
by their product; the parameters keep their own layout (replicated, or FSDP over ``dp``). A moment
with no such dimension keeps its parameter's layout (under FSDP also when the divisible dimension
is not the one FSDP splits, so the moments never take more memory than without ZeRO-1).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lasp_jax import DEFAULT_RULES

TENSOR_PARALLEL_NAMES = ("heads", "qkv", "mlp")  # logical names split over the tp axis
EMBEDDING_AXES = ("vocab", "embed")  # the token embedding table (models.layers.Embed)
DATA_AXES = ("dp", "sp")  # the axes over which the parameters are replicated (or FSDP-split over dp)


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
    data_axis: str | tuple[str, ...] = "dp",
    tensor_axis: str = "tp",
):
    """PartitionSpec of one parameter: its first ``TENSOR_PARALLEL_NAMES`` dimension that divides
    over ``tensor_axis`` sharded there, and under FSDP one other dimension over ``data_axis`` (one
    mesh axis, or several split together as one: ``("dp", "sp")``), the first named ``embed`` that
    divides by its size, else the first other named one; none that divides: not split."""
    spec = [None] * len(shape)
    tp = mesh.shape.get(tensor_axis, 1)
    if tp > 1:
        split = [i for i, a in enumerate(axes) if a in TENSOR_PARALLEL_NAMES and shape[i] % tp == 0]
        if split:
            spec[split[0]] = tensor_axis
    names = (data_axis,) if isinstance(data_axis, str) else data_axis
    size = math.prod(mesh.shape.get(a, 1) for a in names)
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
    return variable_shardings(
        tree, mesh, lambda axes, shape: param_spec(axes, shape, mesh, fsdp=fsdp, data_axis=data_axis)
    )


def variable_shardings(tree, mesh: Mesh, spec_of):
    """``NamedSharding(mesh, spec_of(logical_axes, shape))`` per nnx Variable of ``tree``; plain leaves replicated."""

    def one(x):
        if isinstance(x, nnx.Variable):
            shape = jax.tree.leaves(x)[0].shape  # the value (an array or a ShapeDtypeStruct)
            axes = x.get_metadata().get("logical_axes") or (None,) * len(shape)
            return x.replace(NamedSharding(mesh, spec_of(axes, shape)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_axes(mesh: Mesh) -> tuple[str, ...]:
    """The data-like axes of size > 1 that ZeRO-1 splits the optimizer state over (``()``: nothing to split)."""
    return tuple(a for a in DATA_AXES if mesh.shape.get(a, 1) > 1)


def optimizer_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, *, fsdp: bool) -> PartitionSpec:
    """ZeRO-1 PartitionSpec of an optimizer moment (or gradient) of a parameter: one dimension split over
    ``optimizer_axes`` (``param_spec``'s choice). Without such a dimension, or under FSDP when it is
    not FSDP's own, the parameter's layout: a moment never takes more memory than without ZeRO-1."""
    own = param_spec(axes, shape, mesh, fsdp=fsdp)
    zero = param_spec(axes, shape, mesh, fsdp=True, data_axis=optimizer_axes(mesh))
    split = [i for i, (z, t) in enumerate(zip(zero, param_spec(axes, shape, mesh, fsdp=False))) if z != t]
    if not split or (fsdp and "dp" in own and own[split[0]] != "dp"):
        return own
    return zero


def optimizer_shardings(tree, mesh: Mesh, *, fsdp: bool = False):
    """ZeRO-1 NamedShardings (``optimizer_spec``) for a pytree of nnx Variables of the parameters'
    shapes (moments, gradients, parameters) and plain leaves (replicated: Adam's step count)."""
    return variable_shardings(tree, mesh, lambda axes, shape: optimizer_spec(axes, shape, mesh, fsdp=fsdp))


def train_state_shardings(state: dict, mesh: Mesh, *, fsdp: bool, shard_optimizer: bool) -> dict:
    """Shardings of the train state ``{params, opt_state, step, skipped}``: ``tree_shardings``, with
    the optimizer state's by ``optimizer_shardings`` under ZeRO-1 (``shard_optimizer``)."""
    shardings = tree_shardings(state, mesh, fsdp=fsdp)
    if shard_optimizer and optimizer_axes(mesh):
        shardings["opt_state"] = optimizer_shardings(state["opt_state"], mesh, fsdp=fsdp)
    return shardings


def activation_sharding(mesh: Mesh, ndim: int, *, leading: int = 0) -> NamedSharding:
    """Sharding of a ``[..., B, T, ...]`` activation whose batch axis sits after ``leading`` unsharded axes."""
    rules = dict(DEFAULT_RULES)
    names = [None] * leading + [rules.get("batch"), rules.get("length")] + [None] * (ndim - leading - 2)
    names = [a if a in mesh.axis_names else None for a in names]
    return NamedSharding(mesh, PartitionSpec(*names))


def update_shardings(params, mesh: Mesh, *, fsdp: bool, shard_optimizer: bool):
    """ZeRO-1: the layout of the gradients, the parameters and the update inside the train step
    (``optimizer_shardings`` of the parameters); None without it (the step keeps the parameters' layout)."""
    return optimizer_shardings(params, mesh, fsdp=fsdp) if shard_optimizer and optimizer_axes(mesh) else None


def update_slices(tree, param_shardings, update_shardings):
    """ZeRO-1 inside the step: each device's slice (``update_shardings``) of a tree shaped as the
    parameters (the gradients, the parameters); unchanged when ``update_shardings`` is None.

    The partitioner slices a weight's gradient right after the all-reduce of the product that makes
    it (all-reduce + dynamic-slice, which XLA's GPU pipeline, ``ReduceScatterCreator``, turns into a
    reduce-scatter). The embedding table's gradient (a scatter-add of the token cotangents) is first
    summed whole in the parameter's layout: split on ``embed`` alone, the split would reach back into
    the scatter-add and gather the tokens and their cotangents across devices."""
    if update_shardings is None:
        return tree

    def one(x, own, update):
        if isinstance(x, nnx.Variable) and x.get_metadata().get("logical_axes") == EMBEDDING_AXES:
            x = jax.lax.with_sharding_constraint(x, own)
        return jax.lax.with_sharding_constraint(x, update)

    return jax.tree.map(one, tree, param_shardings, update_shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
