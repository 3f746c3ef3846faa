"""Oracles for causal linear attention: the token recurrence and the quadratic masked form.

Both take the normalised arguments the public function passes to every backend:
q ``[B, T, H, D]``, k ``[B, T, Hk, D]``, v ``[B, T, Hk, E]``, a log decay
``log_decay`` ``[B, T, H]`` per token or ``[B, T, H, D]`` per key channel (GLA, notes/design.md §6;
``None`` for no decay), a float ``scale``, an optional
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


def _row_log_decay(log_decay, shape, dt):
    """The log decay as ``[B, T, H, 1]`` (per token) or ``[B, T, H, D]`` (per key channel), zeros when None."""
    if log_decay is None:
        return jnp.zeros(shape + (1,), dt)
    log_decay = log_decay.astype(dt)
    return log_decay[..., None] if log_decay.ndim == 3 else log_decay


def recurrent(q, k, v, log_decay=None, *, scale, initial_state=None, doc_ids=None):
    """S_t = diag(exp g_t) S_{t-1} + k_tᵀ v_t,  o_t = scale · q_t S_t, one token at a time (a
    per-token g scales the whole state, a per-channel one each row d of it).

    With ``doc_ids`` the state is zeroed before the first token of every document but the first.
    """
    dt = _compute_dtype(q, k, v, log_decay, initial_state)
    b, t, h, d = q.shape
    e = v.shape[-1]
    q, k, v = (x.astype(dt) for x in (q, k, v))
    k, v = _expand_heads(k, h), _expand_heads(v, h)
    g = _row_log_decay(log_decay, (b, t, h), dt)  # [B, T, H, 1 | D]
    s0 = jnp.zeros((b, h, d, e), dt) if initial_state is None else initial_state.astype(dt)
    if doc_ids is None:
        keep = jnp.ones((b, t), dt)
    else:
        keep = jnp.concatenate([jnp.ones((b, 1), bool), doc_ids[:, 1:] == doc_ids[:, :-1]], axis=1).astype(dt)

    def step(s, xs):
        q_t, k_t, v_t, g_t, keep_t = xs
        decay = jnp.exp(g_t) * keep_t[:, None, None]
        s = decay[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
        return s, scale * jnp.einsum("bhd,bhde->bhe", q_t, s)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, keep))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s


def quadratic(q, k, v, log_decay=None, *, scale, initial_state=None, doc_ids=None):
    """o = scale · ((Q Kᵀ) ⊙ M) V + scale · (exp(b) ⊙ Q) S_0 with M[i, j] = exp(b_i − b_j), i ≥ j.

    Per key channel, ``(Q Kᵀ) ⊙ M`` is ``Σ_d q_id k_jd exp(b_id − b_jd)`` (a ``[B, T, T, H, D]`` temporary).
    """
    dt = _compute_dtype(q, k, v, log_decay, initial_state)
    b, t, h = q.shape[:3]
    q, k, v = (x.astype(dt) for x in (q, k, v))
    k, v = _expand_heads(k, h), _expand_heads(v, h)
    per_channel = log_decay is not None and log_decay.ndim == 4
    g = _row_log_decay(log_decay, (b, t, h), dt)
    doc = jnp.zeros((b, t), jnp.int32) if doc_ids is None else doc_ids
    cum = jnp.cumsum(g, axis=1)  # [B, T, H, 1 | D]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (doc[:, :, None] == doc[:, None, :])
    allowed = allowed[..., None, None]  # [B, Ti, Tj, 1, 1]
    diff = cum[:, :, None] - cum[:, None, :]  # [B, Ti, Tj, H, 1 | D]
    mask = jnp.where(allowed, jnp.exp(jnp.where(allowed, diff, 0)), 0)
    if per_channel:
        scores = jnp.einsum("bihd,bjhd,bijhd->bijh", q, k, mask)
    else:
        scores = jnp.einsum("bihd,bjhd->bijh", q, k) * mask[..., 0]
    o = scale * jnp.einsum("bijh,bjhe->bihe", scores, v)
    in_last = (doc == doc[:, -1:])[..., None, None]  # tokens of the row's last document
    last = jnp.exp(jnp.where(in_last, cum[:, -1:] - cum, 0)) * in_last  # exp(b_{T-1} - b_j)
    final = jnp.einsum("bjhd,bjhd,bjhe->bhde", k, jnp.broadcast_to(last, k.shape), v)
    if initial_state is not None:
        s0 = initial_state.astype(dt)
        in_first = (doc == doc[:, :1])[..., None, None]
        o = o + scale * jnp.einsum("bihd,bhde->bihe", jnp.exp(cum) * in_first * q, s0)
        final = final + (jnp.exp(cum[:, -1]) * in_first[:, -1])[..., None] * s0
    return o, final
