"""Single-device ops (linear attention, gated delta rule, flash attention): Pallas GPU kernels, XLA paths, oracles."""

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.linear_attention import linear_attention

__all__ = ["flash_attention", "gated_delta_rule", "linear_attention"]
