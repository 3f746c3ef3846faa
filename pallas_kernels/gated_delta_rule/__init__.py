"""The gated delta rule: DeltaNet, Gated DeltaNet and KDA as one op (notes/design.md §6)."""

from pallas_kernels.gated_delta_rule.api import IMPLS, gated_delta_rule

__all__ = ["IMPLS", "gated_delta_rule"]
