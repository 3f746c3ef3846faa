"""How token mixers run: the mesh, its axes and the strategies (``LaspContext``), not part of the
model's weights; every layer of ``models`` takes one (``SINGLE_DEVICE`` when None is given)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lasp_jax.mesh import check_mesh

Array = jax.Array


@dataclass(frozen=True)
class LaspContext:
    """How token mixers run: the mesh and the strategies; not part of the model's weights.

    ``mesh=None`` runs on one device. Activations ``[B, T, ...]`` are sharded ``(batch_axis, seq_axis)``.
    ``head_axis`` (tensor parallelism): heads and MLP hidden units split over that mesh axis.
    ``strategy``/``impl`` go to ``lasp_attention`` (linear layers), ``softmax_strategy``
    (``"allgather"`` = LASP-2H or ``"ring"``) to ``softmax_attention`` (softmax layers of hybrids).
    """

    mesh: Mesh | None = None
    seq_axis: str = "sp"
    batch_axis: str | None = None
    strategy: str = "ring"
    impl: str = "auto"
    softmax_strategy: str = "allgather"
    head_axis: str | None = None

    @property
    def tensor_parallel(self) -> int:
        """The number of devices along ``head_axis`` (1 without a mesh or a head axis)."""
        return 1 if self.mesh is None or self.head_axis is None else self.mesh.shape[self.head_axis]

    def constrain(self, x: Array, *, split_dim: int | None = None) -> Array:
        """Pin a ``[B, T, ...]`` activation to (batch_axis, seq_axis) sharding under a mesh; with
        ``split_dim`` (and a head axis) that dimension also splits over ``head_axis``."""
        if self.mesh is None:
            return x
        names = [self.batch_axis, self.seq_axis] + [None] * (x.ndim - 2)
        if split_dim is not None and self.head_axis is not None:
            names[split_dim] = self.head_axis
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*names)))

    def check_tokens(self, x: Array, d_model: int, *, layer: str, sharded: bool = True) -> None:
        """A clear error for a token mixer's input that its projections or the mesh would reject deep
        inside jax: x must be ``[B, T, d_model]`` with T > 0 and, when ``sharded`` under a mesh, the
        axes must exist and T / B divide over ``seq_axis`` / ``batch_axis`` (``lasp_jax.check_mesh``;
        a softmax layer's cached continuation is not sharded)."""
        if x.ndim != 3 or x.shape[-1] != d_model or x.shape[1] == 0:
            raise ValueError(f"{layer}: x must be [B, T, d_model={d_model}] with T > 0, got x.shape={tuple(x.shape)}")
        if self.mesh is None or not sharded:
            return
        try:
            check_mesh(
                self.mesh,
                x.shape,
                seq_axis=self.seq_axis,
                batch_axis=self.batch_axis,
                head_axis=self.head_axis,
                heads={},
            )
        except ValueError as err:
            raise ValueError(f"{layer}: {err} (x.shape={tuple(x.shape)})") from err

    def op_options(self) -> dict:
        """The mesh, axes, strategy and impl a token mixer passes to its ``lasp_jax`` op."""
        return {
            name: getattr(self, name) for name in ("mesh", "seq_axis", "batch_axis", "head_axis", "strategy", "impl")
        }

    def constrain_columns(self, w: Array, *, split: bool) -> Array:
        """Pin a ``[..., out]`` weight to its columns split over ``head_axis`` (``split``) or replicated."""
        if self.mesh is None:
            return w
        names = [None] * (w.ndim - 1) + [self.head_axis if split else None]
        return jax.lax.with_sharding_constraint(w, NamedSharding(self.mesh, PartitionSpec(*names)))


SINGLE_DEVICE = LaspContext()
