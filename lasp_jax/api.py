"""Public entry points of sequence-parallel linear attention (DESIGN.md §2-3).

``lasp_attention`` takes global arrays and a mesh and wraps ``lasp_attention_shard`` in
``jax.shard_map``; ``lasp_attention_shard`` is the per-shard function for the inside of a user's
own ``shard_map`` and knows only the name of the sequence axis. Without a mesh (or with a
sequence axis of size 1) both are exactly ``pallas_kernels.linear_attention``.
"""

from __future__ import annotations

from typing import Literal

import jax

from pallas_kernels import linear_attention

Strategy = Literal["ring", "allgather", "ulysses", "gather_kv"]
STRATEGIES = ("ring", "allgather", "ulysses", "gather_kv")


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
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """Sequence-parallel linear attention on one shard (call inside ``jax.shard_map``)."""
    raise NotImplementedError("lasp_attention_shard lands in the next commit")


def lasp_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: jax.sharding.Mesh | None,
    seq_axis: str = "sp",
    batch_axis: str | tuple[str, ...] | None = None,
    strategy: Strategy = "ring",
    g: jax.Array | None = None,
    g_gamma: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """Causal linear attention with the sequence sharded over ``mesh[seq_axis]`` (stub: mesh=None only)."""
    if mesh is None or mesh.shape.get(seq_axis, 1) == 1:
        return linear_attention(
            q,
            k,
            v,
            g=g,
            g_gamma=g_gamma,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            impl=impl,
        )
    raise NotImplementedError("the sharded path lands in the next commit")
