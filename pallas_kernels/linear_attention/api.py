"""Public entry point: argument checks and dispatch between implementations.

``linear_attention`` equals ``reference.recurrent`` (the token recurrence of notes/design.md §1; per
key channel gates §6) on every implementation, up to floating-point rounding. Dtype policy: q, k, v
in bf16, fp16 or fp32 (fp64 for the oracles and the XLA path), the state and every accumulation in
float32, the output in q's dtype, ``final_state`` float32 ``[B, H, D, E]``. Papers: Katharopoulos
et al. 2020 (linear attention), Qin et al. 2024 (lightning attention / TransNormerLLM), Yang et al.
2023 (Gated Linear Attention), LASP (arXiv 2404.02882).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.common import on_gpu, resolve_scale
from pallas_kernels.linear_attention import pallas_triton, pallas_triton_channel, reference, xla

Impl = Literal["auto", "pallas", "xla", "reference", "reference_quadratic"]
IMPLS = ("auto", "pallas", "xla", "reference", "reference_quadratic")
_FLOATS = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


def _check_float(name, x):
    if not any(x.dtype == jnp.dtype(f) for f in _FLOATS):
        raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {name}.dtype={x.dtype}")


def validate(q, k, v, *, g=None, g_gamma=None, initial_state=None, segment_ids=None):
    """Raise ValueError/TypeError naming the argument and the shapes seen; return (B, T, H, Hk, D, E)."""
    for name, x, rank in (("q", q, 4), ("k", k, 4), ("v", v, 4)):
        if x.ndim != rank:
            raise ValueError(f"{name} must have rank 4 [B, T, H, D], got {name}.shape={tuple(x.shape)}")
        _check_float(name, x)
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or v.shape[:2] != (b, t):
        raise ValueError(
            f"q, k and v must agree in batch and time: q.shape={tuple(q.shape)}, "
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"
        )
    hk, e = k.shape[2], v.shape[3]
    if k.shape[3] != d:
        raise ValueError(f"k's head dim must equal q's: q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    if v.shape[2] != hk:
        raise ValueError(f"k and v must have the same heads: k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    if hk == 0 or h % hk:
        raise ValueError(f"query heads must be a multiple of key/value heads: H={h}, Hk={hk} (H % Hk != 0)")
    if t == 0:
        raise ValueError(f"sequence length must be positive, got q.shape={tuple(q.shape)}")
    if g is not None and g_gamma is not None:
        raise ValueError(f"pass g or g_gamma, not both: g.shape={tuple(g.shape)}, g_gamma.shape={tuple(g_gamma.shape)}")
    if g is not None:
        _check_float("g", g)
        if g.shape not in ((b, t, h), (b, t, h, d)):
            raise ValueError(
                f"g must be [B, T, H]={(b, t, h)} (per token) or [B, T, H, D]={(b, t, h, d)} (per key channel), "
                f"got g.shape={tuple(g.shape)} for q.shape={tuple(q.shape)}"
            )
    if g_gamma is not None:
        _check_float("g_gamma", g_gamma)
        if g_gamma.shape != (h,):
            raise ValueError(f"g_gamma must be [H]={(h,)}, got g_gamma.shape={tuple(g_gamma.shape)}")
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        if initial_state.shape != (b, h, d, e):
            raise ValueError(
                f"initial_state must be [B, H, D, E]={(b, h, d, e)}, "
                f"got initial_state.shape={tuple(initial_state.shape)}"
            )
    if segment_ids is not None:
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be an integer array, got segment_ids.dtype={segment_ids.dtype}")
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [B, T]={(b, t)}, got segment_ids.shape={tuple(segment_ids.shape)}")
    return b, t, h, hk, d, e


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    g: jax.Array | None = None,
    g_gamma: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """Causal linear attention ``o_t = scale · q_t S_t``, ``S_t = exp(g_t) S_{t-1} + k_tᵀ v_t``.

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, T, Hk, D]`` with ``H % Hk == 0`` (query head h reads key head ``h // (H // Hk)``).
      v: values ``[B, T, Hk, E]``.
      g: log decay (values ≤ 0), or None: per token ``[B, T, H]``, or per key channel
        ``[B, T, H, D]`` (Gated Linear Attention, notes/design.md §6: ``S_t = diag(exp g_t) S_{t-1}
        + k_tᵀ v_t``), one gate per query head in both forms.
      g_gamma: constant per-head log decay ``[H]`` (lightning attention's ``-slope``), or None.
      scale: multiplies q; defaults to ``D ** -0.5``.
      initial_state: state before the first token ``[B, H, D, E]``; zeros when None.
      output_final_state: also return the float32 state after the last token.
      segment_ids: integer document ids ``[B, T]`` for packed rows: the state resets wherever the id
        changes, so nothing flows between documents; ``initial_state`` applies to the first
        document of each row and ``final_state`` is the state of the last one.
      impl: ``"auto"`` (Pallas kernel on a supported GPU, else ``"xla"``), ``"pallas"`` (interpret
        mode off GPU; per-channel g runs ``pallas_triton_channel``), ``"xla"`` (chunked jnp;
        secondary chunking for per-channel g), ``"reference"`` (token scan) or
        ``"reference_quadratic"`` (masked T×T form).

    Returns:
      ``(o, final_state)``: o ``[B, T, H, E]`` in q's dtype; final_state float32 ``[B, H, D, E]``
      or None when ``output_final_state`` is False.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    validate(q, k, v, g=g, g_gamma=g_gamma, initial_state=initial_state, segment_ids=segment_ids)
    d = q.shape[-1]
    scale = resolve_scale(scale, d)
    impl = resolve_impl(impl, q, k, v, g=g)

    if impl == "pallas" and g is not None and g.ndim == 4:
        o, final = pallas_triton_channel.linear_attention(
            q,
            k,
            v,
            g=g,
            scale=scale,
            initial_state=initial_state,
            segment_ids=segment_ids,
            interpret=interpret_pallas(),
        )
    elif impl == "pallas":
        o, final = pallas_triton.linear_attention(
            q,
            k,
            v,
            g=g,
            g_gamma=g_gamma,
            scale=scale,
            initial_state=initial_state,
            segment_ids=segment_ids,
            interpret=interpret_pallas(),
        )
    else:
        doc_ids = None if segment_ids is None else reference.document_index(segment_ids)
        if impl == "xla":  # g_gamma stays [H]: the chunked path forms its decays in closed form
            o, final = xla.linear_attention(
                q, k, v, g, scale=scale, initial_state=initial_state, doc_ids=doc_ids, gamma=g_gamma, out_dtype=q.dtype
            )
        else:
            log_decay = g if g_gamma is None else jnp.broadcast_to(g_gamma, q.shape[:3])
            fn = {"reference": reference.recurrent, "reference_quadratic": reference.quadratic}[impl]
            o, final = fn(q, k, v, log_decay, scale=scale, initial_state=initial_state, doc_ids=doc_ids)
    state_dtype = jnp.float64 if final.dtype == jnp.float64 else jnp.float32
    return o.astype(q.dtype), (final.astype(state_dtype) if output_final_state else None)


def resolve_impl(impl: str, q, k, v, g=None) -> str:
    """The implementation ``impl`` runs for these inputs: ``"auto"`` becomes ``"pallas"`` on a
    CUDA GPU when the kernel takes the shapes, dtypes and decay (per-channel ``g [B, T, H, D]``:
    ``pallas_triton_channel``'s; scalar or no decay: ``pallas_triton.compiled_kernels_take``, heads up
    to 256 wide in bf16/fp16 and 128 in float32), else ``"xla"`` (for float32 heads past 128 that is
    the XLA path at the default matmul precision, tf32 on a GPU, where the kernels' products are
    exact float32: 52.7 against 4.5 ms at (1, 4K, 8, 256)); others are unchanged."""
    if impl != "auto":
        return impl
    if g is not None and g.ndim == 4:
        takes = pallas_triton_channel.supports(q, k, v)
    else:
        takes = pallas_triton.compiled_kernels_take(q, k, v)
    return "pallas" if on_gpu() and takes else "xla"


def interpret_pallas() -> bool:
    """Whether ``impl="pallas"`` runs the kernels in the Pallas interpreter (no GPU)."""
    return not on_gpu()
