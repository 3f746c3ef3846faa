"""The gated delta rule (DeltaNet, Gated DeltaNet, KDA) under sequence parallelism (notes/design.md §6)."""

from lasp_jax.delta_rule.api import STRATEGIES, lasp_gated_delta_rule, lasp_gated_delta_rule_shard

__all__ = ["STRATEGIES", "lasp_gated_delta_rule", "lasp_gated_delta_rule_shard"]
