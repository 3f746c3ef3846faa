"""Layers under a scan: the blocks' parameters stacked on a leading axis, one ``lax.scan`` over them.

With ``ModelConfig.scan_layers`` the model traces (and XLA compiles) one period of its layer pattern
instead of every layer, so compile time stays flat in depth. A period is the shortest repeating
run of ``layer_types``: one layer for a homogeneous model, e.g. three linear layers and one softmax
layer for ``gdn-hybrid`` (``layer_period``). Layer ``l < steps · period`` is position
``l % period`` of scan step ``l // period``; position j holds the parameters of layers
``j, j + period, ...`` stacked into one block (``stack_modules``). The layers after the last whole
period (e.g. the last two of a 6-layer model with a 1-in-4 softmax pattern) run unscanned after it.

Per-layer constants that a block keeps as static attributes (TNL's decay, which depends on the layer
index: ``attn.log_decay``) cannot live in a shared graph: they are stacked too and scanned along, set
on each step's block as a traced ``[H]`` array. Any other static difference between the layers of one
position is an error at construction, not a silent reuse of the first layer's value.

Stacked parameters carry ``logical_axes = (None, *axes)`` (the layer axis is never sharded) and the
metadata ``stacked_layers=True``; ``matrix_mask`` tells weight decay which parameters are matrices
per layer. ``stack_layer_params`` / ``unstack_layer_params`` convert a model state (parameters,
checkpoints) between the two layouts; the values are the same, so a scanned model with the same
weights computes the same loss and gradients as the unscanned one (notes/models.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig

STACKED = "stacked_layers"  # Variable metadata of a parameter with a leading layer axis
_SCANNED_CONSTANT = "per layer: stacked in ScannedBlocks.constants"


def layer_period(types: Sequence[str]) -> int:
    """The shortest p with ``types[l] == types[l − p]`` for every ``l ≥ p``: the layers of one scan step."""
    n = len(types)
    return next(p for p in range(1, n + 1) if all(types[i] == types[i - p] for i in range(p, n)))


def scan_shape(config: ModelConfig) -> tuple[int, int]:
    """``(period, steps)`` of a scanned model: layers ``[0, steps · period)`` run under the scan."""
    period = layer_period(config.types)
    return period, config.n_layers // period


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


# ---- per-layer constants ----
def layer_constants(block: nnx.Module):
    """The static per-layer values of a block: TNL's log decay ``[H]`` (a tuple), or None."""
    return getattr(block.attn, "log_decay", None)


def with_layer_constants(block: nnx.Module, constants) -> nnx.Module:
    """``block`` with its per-layer constants set: a tuple restores the layer as built (its
    ``spec.g_gamma`` too); a traced ``[H]`` array (under the scan) sets only what the layer computes with."""
    if constants is None:
        return block
    block.attn.log_decay = constants
    if isinstance(constants, tuple) and hasattr(block.attn, "spec"):
        block.attn.spec = dataclasses.replace(block.attn.spec, g_gamma=constants)
    return block


def _without_layer_constants(block: nnx.Module) -> nnx.Module:
    """``block`` with its per-layer constants replaced by a marker, so that the layers' graphs compare equal."""
    block.attn.log_decay = _SCANNED_CONSTANT
    if hasattr(block.attn, "spec"):
        block.attn.spec = dataclasses.replace(block.attn.spec, g_gamma=None)
    return block


# ---- stacking ----
def stack_states(states: Sequence[nnx.State]) -> nnx.State:
    """The layers' states stacked on a new leading axis; its logical axis is None (never sharded)."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def mark(v):
        axes = v.get_metadata().get("logical_axes") or (None,) * (v.get_value().ndim - 1)
        return v.replace(logical_axes=(None, *axes), **{STACKED: True})

    return jax.tree.map(mark, stacked, is_leaf=is_variable)


def unstack_state(state: nnx.State, index) -> nnx.State:
    """Layer ``index`` of a stacked state, with the unstacked metadata."""

    def take(v):
        metadata = {k: m for k, m in v.get_metadata().items() if k != STACKED}
        metadata["logical_axes"] = metadata["logical_axes"][1:]
        return type(v).from_metadata(v.get_value()[index], metadata)

    return jax.tree.map(take, state, is_leaf=is_variable)


def stack_modules(modules: Sequence[nnx.Module]) -> tuple[nnx.Module, tuple | None]:
    """One module holding the modules' parameters stacked, and their stacked per-layer constants.

    The inputs are not changed. Raises ValueError if the modules differ in anything but their
    parameter values and per-layer constants (they could not share one traced step).
    """
    constants = [layer_constants(m) for m in modules]
    graphdefs, states = [], []
    for m, c in zip(modules, constants, strict=True):
        graphdef, state = nnx.split(m)
        copy = nnx.merge(graphdef, state)  # the marker below must not touch the caller's module
        if c is not None:
            _without_layer_constants(copy)
        graphdef, state = nnx.split(copy)
        graphdefs.append(graphdef)
        states.append(state)
    for i, graphdef in enumerate(graphdefs[1:], 1):
        if graphdef != graphdefs[0]:
            raise ValueError(f"stacked layers 0 and {i} differ in structure or static attributes; cannot scan them")
    if any(c is None for c in constants) and not all(c is None for c in constants):
        raise ValueError("stacked layers must all have per-layer constants or none")
    stacked = nnx.merge(graphdefs[0], stack_states(states))
    return stacked, (None if constants[0] is None else tuple(constants))


def unstack_module(stacked: nnx.Module, constants: tuple | None, steps: int) -> list[nnx.Module]:
    """The ``steps`` layers of a stacked module (views of its parameters, constants restored)."""
    graphdef, state = nnx.split(stacked)
    return [
        with_layer_constants(nnx.merge(graphdef, unstack_state(state, i)), None if constants is None else constants[i])
        for i in range(steps)
    ]


class ScannedBlocks(nnx.Module):
    """Layers ``[0, steps · period)`` as ``period`` stacked blocks run by one ``lax.scan`` of ``steps`` steps.

    ``stacks[j]`` holds layers ``j, j + period, ...``; ``constants[j]`` their per-layer constants
    (``[steps, H]`` nested tuples, or None).
    """

    def __init__(self, blocks: Sequence[nnx.Module], period: int):
        if not blocks or len(blocks) % period:
            raise ValueError(f"ScannedBlocks needs whole periods: {len(blocks)} layers, period={period}")
        self.period, self.steps = period, len(blocks) // period
        stacked = [stack_modules(blocks[j::period]) for j in range(period)]
        self.stacks = nnx.List([s for s, _ in stacked])
        self.constants = tuple(c for _, c in stacked)

    def __call__(
        self, x: jax.Array, layer_fn: Callable, *, remat: bool = False, policy: Callable | None = None
    ) -> jax.Array:
        """x after every scanned layer; ``layer_fn(block, x) -> x`` runs one layer.

        With ``remat`` each layer is a ``jax.checkpoint`` with ``policy`` (as the unscanned blocks).
        """
        graphdefs, states = zip(*(nnx.split(s) for s in self.stacks), strict=True)
        constants = tuple(None if c is None else jnp.asarray(c, jnp.float32) for c in self.constants)

        def layer(graphdef, state, const, x):
            return layer_fn(with_layer_constants(nnx.merge(graphdef, state), const), x)

        if remat:  # the scan already keeps XLA from merging recomputation into the forward: no CSE barriers
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False, static_argnums=(0,))

        def step(x, xs):
            for graphdef, state, const in zip(graphdefs, *xs, strict=True):
                x = layer(graphdef, state, const, x)
            return x, None

        x, _ = jax.lax.scan(step, x, (states, constants))
        return x

    def layer_blocks(self) -> list[nnx.Module]:
        """Every scanned layer as a block of its own, in layer order (for decoding and states)."""
        per_position = [unstack_module(s, c, self.steps) for s, c in zip(self.stacks, self.constants, strict=True)]
        return [per_position[i % self.period][i // self.period] for i in range(self.steps * self.period)]


# ---- model states in either layout ----
# ``LanguageModel`` attribute names: unscanned ``blocks/l``; scanned ``layer_scan/stacks/j`` and ``tail_blocks/k``
BLOCKS, LAYER_SCAN, TAIL = "blocks", "layer_scan", "tail_blocks"


def _layer_items(flat: dict, prefix: tuple) -> dict:
    """The flat entries under ``prefix``, keyed by their path below it."""
    n = len(prefix)
    return {path[n:]: v for path, v in flat.items() if path[:n] == prefix}


def stack_layer_params(state: nnx.State, config: ModelConfig) -> nnx.State:
    """A model state (or its parameters) in the unscanned layout → the scanned layout of ``config``."""
    period, steps = scan_shape(config)
    flat = dict(nnx.to_flat_state(state))
    out = {path: v for path, v in flat.items() if path[0] != BLOCKS}
    for j in range(period):
        layers = [nnx.from_flat_state(_layer_items(flat, (BLOCKS, i))) for i in range(j, steps * period, period)]
        out |= {(LAYER_SCAN, "stacks", j, *p): v for p, v in nnx.to_flat_state(stack_states(layers))}
    for k, i in enumerate(range(steps * period, config.n_layers)):
        out |= {(TAIL, k, *p): v for p, v in _layer_items(flat, (BLOCKS, i)).items()}
    return nnx.from_flat_state(out)


def unstack_layer_params(state: nnx.State, config: ModelConfig) -> nnx.State:
    """A model state (or its parameters) in the scanned layout of ``config`` → the unscanned layout."""
    period, steps = scan_shape(config)
    flat = dict(nnx.to_flat_state(state))
    out = {path: v for path, v in flat.items() if path[0] not in (LAYER_SCAN, TAIL)}
    for j in range(period):
        stacked = nnx.from_flat_state(_layer_items(flat, (LAYER_SCAN, "stacks", j)))
        for step in range(steps):
            layer = unstack_state(stacked, step)
            out |= {(BLOCKS, step * period + j, *p): v for p, v in nnx.to_flat_state(layer)}
    for k, i in enumerate(range(steps * period, config.n_layers)):
        out |= {(BLOCKS, i, *p): v for p, v in _layer_items(flat, (TAIL, k)).items()}
    return nnx.from_flat_state(out)


def matrix_mask(params):
    """A tree of bools shaped like ``params``: True where a parameter is a matrix per layer (ndim ≥ 2
    not counting a stacked layer axis), the parameters AdamW decays, the same in both layouts."""

    def is_matrix(v) -> bool:
        if not is_variable(v):
            return v.ndim >= 2
        return v.get_value().ndim - int(bool(v.get_metadata().get(STACKED))) >= 2

    return jax.tree.map(lambda v: jax.tree.map(lambda _: is_matrix(v), v), params, is_leaf=is_variable)
