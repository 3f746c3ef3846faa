"""Linear Attention Sequence Parallelism (LASP, LASP-2) for JAX: the sequence-sharded layer and mesh helpers."""

from lasp_jax.api import STRATEGIES, lasp_attention, lasp_attention_shard
from lasp_jax.delta_rule import lasp_gated_delta_rule, lasp_gated_delta_rule_shard
from lasp_jax.mesh import (
    DEFAULT_RULES,
    logical_sharding,
    logical_spec,
    make_mesh,
    shard_logical,
    with_logical_constraint,
)
from lasp_jax.short_conv import short_conv, short_conv_shard, short_conv_step
from lasp_jax.softmax import softmax_attention

__all__ = [
    "DEFAULT_RULES",
    "STRATEGIES",
    "lasp_attention",
    "lasp_attention_shard",
    "lasp_gated_delta_rule",
    "lasp_gated_delta_rule_shard",
    "logical_sharding",
    "logical_spec",
    "make_mesh",
    "shard_logical",
    "short_conv",
    "short_conv_shard",
    "short_conv_step",
    "softmax_attention",
    "with_logical_constraint",
]
