"""Public entry points: single-device causal ``flash_attention`` and the block functions of the softmax SP layer.

``flash_attention`` equals ``reference.causal_attention`` (dense masked softmax; the softmax layers of
hybrid models, notes/design.md §2) on every implementation, up to floating-point rounding. Dtype policy: q, k, v in
bf16, fp16 or fp32 (fp64 on the XLA path and the oracle), softmax statistics and every
accumulation in float32, the output in q's dtype.

``block_functions`` gives the (forward, backward) pair that ``lasp_jax.softmax_attention`` runs on
each (query block, key block) at global offsets: the Pallas kernels or their jnp twin, same
signatures (less the implementation's own keyword), same results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax

from pallas_kernels.common import KERNEL_DTYPES, on_gpu, resolve_scale
from pallas_kernels.flash_attention import cudnn_blocks, pallas_triton, pallas_triton_vjp, reference, xla
from pallas_kernels.flash_attention.common import compiled_kernels_take
from pallas_kernels.linear_attention.api import validate
from pallas_kernels.linear_attention.reference import document_index

Impl = Literal["auto", "pallas", "xla", "reference"]
IMPLS = ("auto", "pallas", "xla", "reference")


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    impl: Impl = "auto",
) -> jax.Array:
    """Causal softmax attention ``o_i = Σ_{j ≤ i} softmax_j(scale · q_i·k_j) v_j`` on one device.

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, T, Hk, D]`` with ``H % Hk == 0`` (query head h reads key/value head ``h // (H // Hk)``).
      v: values ``[B, T, Hk, E]``.
      scale: multiplies the logits; defaults to ``D ** -0.5``.
      segment_ids: integer document ids ``[B, T]`` for packed rows: a query sees only the keys of
        its own document (a run of equal ids).
      impl: ``"auto"`` (the Pallas kernels on a GPU that takes the input, else ``"xla"``),
        ``"pallas"`` (Pallas Triton kernels; the interpreter off the GPU), ``"xla"`` (the jnp block
        recurrence) or ``"reference"`` (dense masked softmax, its logits in the input dtype: an
        oracle for float32 and bf16; float16 logits past 65504 give NaN there, the others accumulate
        in float32).

    Returns:
      o ``[B, T, H, E]`` in q's dtype; differentiable in q, k and v.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    validate(q, k, v, segment_ids=segment_ids)
    scale = resolve_scale(scale, q.shape[-1])
    impl = resolve_impl(impl, q, k, v)
    if impl == "reference":
        return reference.causal_attention(q, k, v, scale=scale, segment_ids=segment_ids).astype(q.dtype)
    doc_ids = None if segment_ids is None else document_index(segment_ids)
    if impl == "pallas":
        return pallas_triton.flash_attention(q, k, v, scale=scale, doc_ids=doc_ids)
    return xla.flash_attention(q, k, v, scale=scale, doc_ids=doc_ids)


def resolve_impl(impl: str, q, k, v) -> str:
    """``"auto"`` becomes ``"pallas"`` on a GPU when the kernels take the input, else ``"xla"``;
    ``"pallas"`` checks the dtypes; others are unchanged."""
    if impl == "auto":
        return "pallas" if on_gpu() and compiled_kernels_take(q, k, v) else "xla"
    if impl == "pallas":
        check_pallas_dtypes(q, k, v)
    return impl


def check_pallas_dtypes(q, k, v) -> None:
    """TypeError unless q, k and v are all bf16, fp16 or fp32 (what the Pallas kernels take)."""
    if not all(x.dtype in KERNEL_DTYPES for x in (q, k, v)):
        raise TypeError(
            f"impl='pallas' takes bf16, fp16 or fp32 inputs, got q.dtype={q.dtype}, k.dtype={k.dtype}, "
            f"v.dtype={v.dtype}; use impl='xla'"
        )


def block_functions(
    impl: str, *, block: int = xla.DEFAULT_BLOCK, documents_sorted: bool = False
) -> tuple[Callable, Callable]:
    """``(fwd, bwd)`` of one block pair at global offsets, for ``impl`` ``"pallas"``, ``"xla"`` or
    ``"cudnn_blocks"`` (cuDNN's fused kernels on chunk-aligned offsets: ``cudnn_blocks``; with documents
    they need ``documents_sorted`` numbers).

    ``fwd(q, k, v, *, q_start, k_start, scale, q_segment_ids=None, k_segment_ids=None) -> (o, lse)``
    and ``bwd(q, k, v, o, lse, do, *, same keywords) -> (dq, dk, dv)``, as
    ``pallas_triton.block_attention_fwd`` / ``pallas_triton_vjp.block_attention_bwd``. ``block``: the
    jnp recurrence's block length; ``documents_sorted``: the segment ids are non-decreasing document
    numbers, so the kernels may skip tiles of other documents.
    """
    if impl == "pallas":
        return (
            functools.partial(pallas_triton.block_attention_fwd, documents_sorted=documents_sorted),
            functools.partial(pallas_triton_vjp.block_attention_bwd, documents_sorted=documents_sorted),
        )
    if impl == "xla":
        return (
            functools.partial(xla.block_attention_fwd, block=block),
            functools.partial(xla.block_attention_bwd, block=block),
        )
    if impl == "cudnn_blocks":  # pairs whose queries hold a document boundary: the Pallas kernels (jnp off the GPU)
        fallback = block_functions("pallas" if on_gpu() else "xla", block=block, documents_sorted=True)
        fallback = fallback if documents_sorted else None  # unsorted ids: refused (the prefix needs sorted numbers)
        return (
            functools.partial(cudnn_blocks.block_attention_fwd, fallback=fallback),
            functools.partial(cudnn_blocks.block_attention_bwd, fallback=fallback),
        )
    raise ValueError(f"block functions exist for impl 'pallas', 'xla' and 'cudnn_blocks', got impl={impl!r}")
