"""Causal linear attention with optional per-head or per-token decay (notes/design.md §1)."""

from pallas_kernels.linear_attention.api import IMPLS, linear_attention

__all__ = ["IMPLS", "linear_attention"]
