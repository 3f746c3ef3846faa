"""Causal flash attention of a query block set against a key block set at global offsets (Pallas Triton).

The local block compute of ``lasp_jax.softmax_attention``: ``block_attention_fwd`` returns the
float32 output and log-sum-exp, ``block_attention_bwd`` the float32 gradients given the final
output and log-sum-exp (so block contributions add up across key blocks and ranks).
"""

from pallas_kernels.flash_attention.config import BlockConfig, default_config
from pallas_kernels.flash_attention.pallas_triton import block_attention_fwd, supports
from pallas_kernels.flash_attention.pallas_triton_vjp import block_attention_bwd

__all__ = ["BlockConfig", "block_attention_bwd", "block_attention_fwd", "default_config", "supports"]
