"""Single-device chunked linear attention: Pallas GPU kernels, a portable XLA path and oracles."""

from pallas_kernels.linear_attention import linear_attention

__all__ = ["linear_attention"]
