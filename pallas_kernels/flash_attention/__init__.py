"""Causal softmax (flash) attention on one device, and its block functions at global offsets.

``flash_attention`` (``api``) is the public op. ``block_attention_fwd`` / ``block_attention_bwd``
(the Pallas Triton kernels) attend a query block set to a key block set at global offsets and
return the float32 output and log-sum-exp, resp. the float32 gradients given the final output and
log-sum-exp (so block contributions add up across key blocks and ranks): the local compute of
``lasp_jax.softmax_attention``, which gets them, or their jnp twin in ``xla``, from ``block_functions``.
"""

from pallas_kernels.flash_attention.api import IMPLS, block_functions, flash_attention
from pallas_kernels.flash_attention.common import fits_shared_memory, supports
from pallas_kernels.flash_attention.config import BlockConfig, default_config
from pallas_kernels.flash_attention.pallas_triton import block_attention_fwd
from pallas_kernels.flash_attention.pallas_triton_vjp import block_attention_bwd

__all__ = [
    "IMPLS",
    "BlockConfig",
    "block_attention_bwd",
    "block_attention_fwd",
    "block_functions",
    "default_config",
    "fits_shared_memory",
    "flash_attention",
    "supports",
]
