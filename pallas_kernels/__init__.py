"""Single-device chunked linear attention: Pallas GPU kernels, a portable XLA path and oracles."""

from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.linear_attention import linear_attention

__all__ = ["gated_delta_rule", "linear_attention"]
