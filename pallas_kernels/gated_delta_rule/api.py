"""Public entry point of the gated delta rule: argument checks and dispatch between implementations.

Per batch row and value head (state ``S`` ``[D, E]``, float32), notes/design.md §6:

    S'_t = diag(exp g_t) S_{t-1}
    S_t  = (I − β_t k_t k_tᵀ) S'_t + β_t k_t v_tᵀ        o_t = scale · S_tᵀ q_t

DeltaNet with ``g=None``, Gated DeltaNet with a scalar gate per token and value head, KDA with one
gate per key channel. Every implementation equals ``reference.recurrent`` up to floating-point
rounding. Dtype policy: q, k, v, beta, g in bf16, fp16 or fp32 (fp64 for the oracle and the XLA
path, which then compute in fp64), the state and every accumulation in float32, the output in q's
dtype, ``final_state`` float32 ``[B, Hv, D, E]``. The op does not normalise q or k (layers
L2-normalise them, which keeps ``I − β k kᵀ`` contractive for β ∈ [0, 1]).

Papers: Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length" (DeltaNet, the chunked WY form); Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks:
Improving Mamba2 with Delta Rule"; Kimi Team 2025, "Kimi Linear" (KDA, per-channel gates).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.common import on_gpu, resolve_scale
from pallas_kernels.gated_delta_rule import reference, xla
from pallas_kernels.gated_delta_rule.products import check_gate_lower_bound, floor_gates

Impl = Literal["auto", "pallas", "xla", "reference"]
IMPLS = ("auto", "pallas", "xla", "reference")
_FLOATS = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)
_PALLAS_MODULE = "pallas_kernels.gated_delta_rule.pallas_triton"


def _shape(x):
    return tuple(x.shape)


def _check_float(name, x):
    if not any(x.dtype == jnp.dtype(f) for f in _FLOATS):
        raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {name}.dtype={x.dtype}")


def _check_tensors(q, k, v, beta):
    for name, x, layout in (("q", q, "[B, T, H, D]"), ("k", k, "[B, T, H, D]"), ("v", v, "[B, T, Hv, E]")):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 {layout}, got {name}.shape={_shape(x)}")
        _check_float(name, x)
    if beta.ndim != 3:
        raise ValueError(f"beta must have rank 3 [B, T, Hv], got beta.shape={_shape(beta)}")
    _check_float("beta", beta)
    b, t, h, d = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, H, D]: q.shape={_shape(q)}, k.shape={_shape(k)}")
    if v.shape[:2] != (b, t):
        raise ValueError(f"v must agree with q in batch and time: q.shape={_shape(q)}, v.shape={_shape(v)}")
    if t == 0:
        raise ValueError(f"sequence length must be positive, got q.shape={_shape(q)}")
    hv = v.shape[2]
    if h == 0 or hv % h:
        raise ValueError(
            f"value heads must be a multiple of q/k heads: H={h}, Hv={hv} (Hv % H != 0); "
            f"q.shape={_shape(q)}, v.shape={_shape(v)}"
        )
    if beta.shape != (b, t, hv):
        raise ValueError(f"beta must be [B, T, Hv]={(b, t, hv)}, got beta.shape={_shape(beta)}")


def validate(q, k, v, beta, *, g=None, initial_state=None, segment_ids=None, gate_lower_bound=None):
    """Raise ValueError/TypeError naming the argument and the shapes seen; return (B, T, H, Hv, D, E)."""
    _check_tensors(q, k, v, beta)
    check_gate_lower_bound(gate_lower_bound)
    if gate_lower_bound is not None and g is None:
        raise ValueError(f"gate_lower_bound={gate_lower_bound} bounds the log gates, but g is None (DeltaNet has none)")
    b, t, h, d = q.shape
    hv, e = v.shape[2:]
    if g is not None:
        _check_float("g", g)
        if g.shape not in ((b, t, hv), (b, t, hv, d)):
            raise ValueError(
                f"g must be [B, T, Hv]={(b, t, hv)} (one gate per value head) or [B, T, Hv, D]={(b, t, hv, d)} "
                f"(per key channel), got g.shape={_shape(g)}"
            )
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        if initial_state.shape != (b, hv, d, e):
            raise ValueError(
                f"initial_state must be [B, Hv, D, E]={(b, hv, d, e)}, got initial_state.shape={_shape(initial_state)}"
            )
    if segment_ids is not None:
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be an integer array, got segment_ids.dtype={segment_ids.dtype}")
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [B, T]={(b, t)}, got segment_ids.shape={_shape(segment_ids)}")
    return b, t, h, hv, d, e


def check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")


def has_pallas() -> bool:
    """Whether the Pallas kernel module is present in this checkout."""
    return importlib.util.find_spec(_PALLAS_MODULE) is not None


def resolve_impl(impl: str, q, k, v) -> str:
    """The implementation ``impl`` runs: ``"auto"`` becomes ``"pallas"`` on a CUDA GPU when the kernel
    exists and takes these shapes and dtypes, else ``"xla"``; others are unchanged."""
    if impl != "auto":
        return impl
    if not (on_gpu() and has_pallas()):
        return "xla"
    from pallas_kernels.gated_delta_rule import pallas_triton

    return "pallas" if pallas_triton.supports(q, k, v) else "xla"


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: Impl = "auto",
    gate_lower_bound: float | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated delta rule: ``S_t = (I − β_t k_t k_tᵀ) diag(exp g_t) S_{t-1} + β_t k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``.

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, T, H, D]`` (not normalised here).
      v: values ``[B, T, Hv, E]`` with ``Hv % H == 0``: q/k head h serves value heads
        ``h·Hv/H … (h+1)·Hv/H − 1`` (grouped value heads, never repeated in memory).
      beta: writing strength ``[B, T, Hv]`` (usually a sigmoid, in [0, 1]).
      g: log decay (≤ 0): None (DeltaNet), ``[B, T, Hv]`` (Gated DeltaNet) or ``[B, T, Hv, D]``
        (KDA: one gate per key channel).
      scale: multiplies q; defaults to ``D ** -0.5``.
      initial_state: state before the first token ``[B, Hv, D, E]``; zeros when None.
      output_final_state: also return the float32 state after the last token.
      segment_ids: integer document ids ``[B, T]`` for packed rows: a document is a run of equal ids
        and the state resets wherever the id changes; ``initial_state`` applies to the first
        document of each row and ``final_state`` is the state of the last one.
      impl: ``"auto"`` (Pallas kernel on a supported GPU, else ``"xla"``), ``"pallas"`` (interpret
        mode off the GPU), ``"xla"`` (chunked WY form in jnp) or ``"reference"`` (token scan).
      gate_lower_bound: None, or a negative floor on the log gates: every gate below it is raised to
        it (its gradient there is zero), for every ``impl``. Gates built as ``bound · sigmoid(·)``
        (flash-linear-attention's ``lower_bound``; the models' ``gate_lower_bound``) never reach
        below it. With per-channel gates and bf16 / float32 q, k, v the Pallas kernels build only the
        diagonal-tile forms the bound allows (``products._cases``): ≥ −5 drops the exact form and the
        16-row check (the bf16 default still switches between its 16- and 32-row factored forms on
        a 32-row check); ≥ −2.5 (or 16-row tiles only) leaves one form, no check, no switch.

    Returns:
      ``(o, final_state)``: o ``[B, T, Hv, E]`` in q's dtype; final_state float32 ``[B, Hv, D, E]``
      (float64 for float64 inputs) or None when ``output_final_state`` is False.
    """
    check_impl(impl)
    validate(
        q, k, v, beta, g=g, initial_state=initial_state, segment_ids=segment_ids, gate_lower_bound=gate_lower_bound
    )
    scale = resolve_scale(scale, q.shape[-1])
    impl = resolve_impl(impl, q, k, v)
    if impl == "pallas":  # the kernels' prepare raises the gates to the bound itself
        if not has_pallas():
            raise NotImplementedError(
                f"impl='pallas': the Pallas kernel ({_PALLAS_MODULE}) is not in this checkout; use impl='xla'"
            )
        from pallas_kernels.gated_delta_rule import pallas_triton

        o, final = pallas_triton.gated_delta_rule(
            q,
            k,
            v,
            beta,
            g=g,
            scale=scale,
            initial_state=initial_state,
            segment_ids=segment_ids,
            interpret=not on_gpu(),
            gate_lower_bound=gate_lower_bound,
        )
    else:
        fn = xla.gated_delta_rule if impl == "xla" else reference.recurrent
        g = floor_gates(g, gate_lower_bound)
        doc_ids = None if segment_ids is None else reference.document_index(segment_ids)
        o, final = fn(q, k, v, beta, g, scale=scale, initial_state=initial_state, doc_ids=doc_ids)
    state_dtype = jnp.float64 if final.dtype == jnp.float64 else jnp.float32
    return o.astype(q.dtype), (final.astype(state_dtype) if output_final_state else None)
