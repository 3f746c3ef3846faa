"""The token mixers' math as plain functions: feature maps, positions (LRPE, RoPE), TNL's decays,
SRMSNorm, and the decoding steps (the one-token linear recurrence, softmax attention against a cache).

``models.layers`` builds its modules from these (and re-exports them); nothing here holds weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.tokenwise import rms_normalize

Array = jax.Array


def srms(x: Array, eps: float) -> Array:
    """Simple RMSNorm (no gain), computed in float32, returned in x's dtype (``models.tokenwise``)."""
    return rms_normalize(x, eps=eps)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al. 2022), including its rule for head counts not a power of 2."""

    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_heads - closest]
    return np.asarray(slopes, np.float64)


def tnl_log_decay(n_heads: int, layer: int, n_layers: int) -> np.ndarray:
    """TNL's lightning-attention log decay ``g_gamma = −slope_h · (1 − l/(L−1) + 1e-5)``, float32 ``[H]``."""
    depth = layer / max(n_layers - 1, 1)
    return (-alibi_slopes(n_heads) * (1.0 - depth + 1e-5)).astype(np.float32)


def feature_map(kind: str, x: Array) -> Array:
    if kind == "silu":
        return jax.nn.silu(x)
    if kind == "elu1":
        return jax.nn.elu(x) + 1.0
    return x


def lrpe(x: Array, positions: Array, base: float) -> Array:
    """TNL's LRPE (cos form): ``[x cos(θp), x sin(θp)]``, so ``q'·k' = Σ q_i k_i cos(θ_i (p_q − p_k))``.

    x ``[B, T, H, D]``, positions ``[T]`` or ``[B, T]`` global token indices; doubles the head dim.
    """
    d = x.shape[-1]
    theta = base ** (-2.0 / d * jnp.arange(d, dtype=jnp.float32))
    angle = _positions(positions, x)[..., None, None] * theta  # [B|1, T, 1, D]
    xf = x.astype(jnp.float32)
    return jnp.concatenate([xf * jnp.cos(angle), xf * jnp.sin(angle)], axis=-1).astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding (rotate-half form) at global ``positions``; x ``[B, T, H, D]``."""
    d = x.shape[-1]
    freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle = _positions(positions, x)[..., None, None] * freq  # [B|1, T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    a, b = xf[..., : d // 2], xf[..., d // 2 :]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


def _positions(positions: Array, x: Array) -> Array:
    p = jnp.asarray(positions, jnp.float32)
    return p[None] if p.ndim == 1 else p


def recurrent_step(q, k, v, state, *, log_decay=None, scale: float):
    """One token of the recurrence: ``S = exp(g)·S + kᵀv``, ``o = scale · q S``.

    q ``[B, H, D]``, k ``[B, Hk, D]``, v ``[B, Hk, E]``, state float32 ``[B, H, D, E]``,
    log_decay ``[H]`` or None. Returns (o ``[B, H, E]`` float32, new state).
    """
    group = q.shape[1] // k.shape[1]
    k = jnp.repeat(k.astype(jnp.float32), group, axis=1)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=1)
    if log_decay is not None:
        state = jnp.exp(log_decay)[None, :, None, None] * state
    state = state + k[..., :, None] * v[..., None, :]
    o = scale * jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32), state)
    return o, state


def cached_attention(q: Array, k_cache: Array, v_cache: Array, start: Array, *, scale: float) -> Array:
    """Queries ``[B, T, H, D]`` at positions ``start + [0, T)`` against a key/value cache
    ``[B, S, Hk, ·]`` (entries after each query's position are masked): float32 ``[B, T, H, E]``."""
    b, t, h, _ = q.shape
    s, hk = k_cache.shape[1:3]
    qg = q.astype(jnp.float32).reshape(b, t, hk, h // hk, -1)
    logits = jnp.einsum("bthgd,bshd->bhgts", qg, k_cache.astype(jnp.float32)) * scale
    visible = jnp.arange(s)[None, :] <= (start + jnp.arange(t))[:, None]  # [T, S]
    logits = jnp.where(visible, logits, -jnp.inf)
    o = jnp.einsum("bhgts,bshe->bthge", jax.nn.softmax(logits, axis=-1), v_cache.astype(jnp.float32))
    return o.reshape(b, t, h, -1)
