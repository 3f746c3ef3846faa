"""Oracles for causal linear attention: the token recurrence and the quadratic masked form.

Both take the normalised arguments the public function passes to every backend:
q ``[B, T, H, D]``, k ``[B, T, Hk, D]``, v ``[B, T, Hk, E]``, a per-token log decay
``log_decay`` ``[B, T, H]`` (or ``None`` for no decay), a float ``scale``, an optional
``initial_state`` ``[B, H, D, E]`` and optional ``doc_ids`` ``[B, T]`` (non-decreasing document
index per token, see ``document_index``). They compute in float32, or in float64 when any input is
float64, and return ``(o, final_state)`` with ``o`` in that compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_index(segment_ids):
    """Document number of each token: 0 for the first document of a row, +1 wherever the id changes."""
    change = jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return jnp.cumsum(change, axis=1, dtype=jnp.int32)


def _compute_dtype(*xs):
    return jnp.result_type(jnp.float32, *[x.dtype for x in xs if x is not None])


def _expand_heads(x, num_heads):
    """Repeat grouped key/value heads up to the query heads (oracle only)."""
    return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def recurrent(q, k, v, log_decay=None, *, scale, initial_state=None, doc_ids=None):
    """S_t = exp(g_t) S_{t-1} + k_tᵀ v_t,  o_t = scale · q_t S_t, one token at a time.

    With ``doc_ids`` the state is zeroed before the first token of every document but the first.
    """
    dt = _compute_dtype(q, k, v, log_decay, initial_state)
    b, t, h, d = q.shape
    e = v.shape[-1]
    q, k, v = (x.astype(dt) for x in (q, k, v))
    k, v = _expand_heads(k, h), _expand_heads(v, h)
    g = jnp.zeros((b, t, h), dt) if log_decay is None else log_decay.astype(dt)
    s0 = jnp.zeros((b, h, d, e), dt) if initial_state is None else initial_state.astype(dt)
    if doc_ids is None:
        keep = jnp.ones((b, t), dt)
    else:
        keep = jnp.concatenate([jnp.ones((b, 1), bool), doc_ids[:, 1:] == doc_ids[:, :-1]], axis=1).astype(dt)

    def step(s, xs):
        q_t, k_t, v_t, g_t, keep_t = xs
        decay = jnp.exp(g_t) * keep_t[:, None]
        s = decay[..., None, None] * s + k_t[..., :, None] * v_t[..., None, :]
        return s, scale * jnp.einsum("bhd,bhde->bhe", q_t, s)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, keep))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s


def quadratic(q, k, v, log_decay=None, *, scale, initial_state=None, doc_ids=None):
    """o = scale · ((Q Kᵀ) ⊙ M) V + scale · (exp(b) ⊙ Q) S_0 with M[i, j] = exp(b_i − b_j), i ≥ j."""
    dt = _compute_dtype(q, k, v, log_decay, initial_state)
    b, t, h = q.shape[:3]
    q, k, v = (x.astype(dt) for x in (q, k, v))
    k, v = _expand_heads(k, h), _expand_heads(v, h)
    g = jnp.zeros((b, t, h), dt) if log_decay is None else log_decay.astype(dt)
    doc = jnp.zeros((b, t), jnp.int32) if doc_ids is None else doc_ids
    cum = jnp.cumsum(g, axis=1)  # [B, T, H]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (doc[:, :, None] == doc[:, None, :])
    allowed = allowed[..., None]  # [B, Ti, Tj, 1]
    diff = cum[:, :, None, :] - cum[:, None, :, :]  # [B, Ti, Tj, H]
    mask = jnp.where(allowed, jnp.exp(jnp.where(allowed, diff, 0)), 0)
    scores = jnp.einsum("bihd,bjhd->bijh", q, k) * mask
    o = scale * jnp.einsum("bijh,bjhe->bihe", scores, v)
    in_last = (doc == doc[:, -1:])[..., None]  # tokens of the row's last document
    last = jnp.exp(jnp.where(in_last, cum[:, -1:, :] - cum, 0)) * in_last  # exp(b_{T-1} - b_j)
    final = jnp.einsum("bjhd,bjh,bjhe->bhde", k, last, v)
    if initial_state is not None:
        s0 = initial_state.astype(dt)
        in_first = (doc == doc[:, :1])[..., None]
        o = o + scale * jnp.einsum("bih,bihd,bhde->bihe", jnp.exp(cum) * in_first, q, s0)
        final = final + (jnp.exp(cum[:, -1]) * in_first[:, -1])[..., None, None] * s0
    return o, final
