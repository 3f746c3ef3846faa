"""Causal softmax attention of hybrid models under sequence parallelism (LASP-2H allgather,
RingAttention and its zig-zag form, TokenRing).

``api`` (the public functions, argument checks, the choice of block compute), ``allgather``,
``ring`` (plain and zig-zag) and ``tokenring`` (one ``custom_vjp`` per strategy), ``deal`` (the
causal half-shard deal and what the strategies share). The block compute itself is ``pallas_kernels.flash_attention``.
"""

from lasp_jax.softmax.api import IMPLS, STRATEGIES, causal_attention, softmax_attention, softmax_attention_shard

__all__ = ["IMPLS", "STRATEGIES", "causal_attention", "softmax_attention", "softmax_attention_shard"]
