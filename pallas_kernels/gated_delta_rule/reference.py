"""The oracle of the gated delta rule: the token-by-token ``lax.scan`` of notes/design.md §6.

Per batch row and value head, with state ``S`` ``[D, E]``:

    S'_t = diag(exp g_t) S_{t-1}
    S_t  = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ   =  (I − β_t k_t k_tᵀ) S'_t + β_t k_t v_tᵀ
    o_t  = scale · S_tᵀ q_t

``g`` is None (DeltaNet: no decay), a scalar per token and value head (Gated DeltaNet) or one per
key channel (KDA). This is flash-linear-attention's ``naive_recurrent_gated_delta_rule`` (scalar
``g``) and ``naive_recurrent_kda`` (per-channel ``g``): both decay the state, subtract the state's
prediction ``S'ᵀ k`` from ``v``, scale the difference by β and add its outer product with k; fla
scales q by ``scale`` before the loop, which is the same product.

Arguments are the normalised ones every backend receives from ``api.gated_delta_rule``:
q, k ``[B, T, H, D]``, v ``[B, T, Hv, E]`` (``Hv % H == 0``: q/k head h serves value heads
``h·G … h·G + G − 1`` with ``G = Hv // H``), beta ``[B, T, Hv]``, g None / ``[B, T, Hv]`` /
``[B, T, Hv, D]``, a float ``scale``, an optional ``initial_state`` ``[B, Hv, D, E]`` and optional
``doc_ids`` ``[B, T]`` (non-decreasing document index per token, ``document_index``). Computes in
float32, or float64 when any input is float64; returns ``(o, final_state)`` in that dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import acc_dtype
from pallas_kernels.linear_attention.reference import document_index

__all__ = ["document_index", "group_values", "recurrent"]


def group_values(x, num_heads):
    """``[B, T, Hv, ...]`` -> ``[B, T, H, G, ...]``: the value heads each q/k head serves (no copy)."""
    b, t, hv = x.shape[:3]
    return x.reshape((b, t, num_heads, hv // num_heads) + x.shape[3:])


def recurrent(q, k, v, beta, g=None, *, scale, initial_state=None, doc_ids=None):
    """The token recurrence above; with ``doc_ids`` the state is zeroed before every document but the first."""
    dt = acc_dtype(*(None if x is None else x.dtype for x in (q, k, v, beta, g, initial_state)))
    b, t, h, d = q.shape
    hv, e = v.shape[2:]
    q, k = q.astype(dt), k.astype(dt)
    v, beta = group_values(v.astype(dt), h), group_values(beta.astype(dt), h)
    log_decay = jnp.zeros((b, t, h, hv // h), dt) if g is None else group_values(g.astype(dt), h)
    per_channel = log_decay.ndim == 5
    s0 = jnp.zeros((b, hv, d, e), dt) if initial_state is None else initial_state.astype(dt)
    s0 = s0.reshape(b, h, hv // h, d, e)
    keep = jnp.ones((b, t), bool)
    if doc_ids is not None:
        keep = jnp.concatenate([keep[:, :1], doc_ids[:, 1:] == doc_ids[:, :-1]], axis=1)

    def step(s, xs):
        q_t, k_t, v_t, beta_t, g_t, keep_t = xs  # [B,H,D] [B,H,D] [B,H,G,E] [B,H,G] [B,H,G(,D)] [B]
        decay = jnp.exp(g_t) * keep_t.astype(dt).reshape((-1,) + (1,) * (g_t.ndim - 1))
        s = (decay[..., None] if per_channel else decay[..., None, None]) * s
        predicted = jnp.einsum("bhd,bhgde->bhge", k_t, s)
        delta = beta_t[..., None] * (v_t - predicted)
        s = s + k_t[:, :, None, :, None] * delta[..., None, :]
        return s, scale * jnp.einsum("bhd,bhgde->bhge", q_t, s)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, log_decay, keep))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).reshape(b, t, hv, e), s.reshape(b, hv, d, e)
