"""Linear Attention Sequence Parallelism (LASP, LASP-2) for JAX: the sequence-sharded layer and mesh helpers."""

from lasp_jax.api import STRATEGIES, lasp_attention, lasp_attention_shard
from lasp_jax.mesh import DEFAULT_RULES, logical_spec, make_mesh, shard_logical

__all__ = [
    "DEFAULT_RULES",
    "STRATEGIES",
    "lasp_attention",
    "lasp_attention_shard",
    "logical_spec",
    "make_mesh",
    "shard_logical",
]
