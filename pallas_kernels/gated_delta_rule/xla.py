"""Chunked gated delta rule in plain jnp (the WY/UT form): the portable path and the CPU default.

One ``lax.scan`` walks chunks of C = 64 tokens carrying the float32 state ``[B, H, G, D, E]``
(G = Hv // H value heads per q/k head, so q and k are never repeated). Per chunk, with ``b`` the
cumulative log decay inside the chunk (notes/design.md §6; Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"; Yang et al. 2024, "Gated Delta Networks"):

    A   = strictly_lower(diag(β) (K Kᵀ ⊙ Γ)),         Γ[i, j] = exp(b_i − b_j)
    [U | W] = (I + A)⁻¹ diag(β) [V | exp(b) ⊙ K]       (unit lower-triangular: ``unit_lower_inverse``)
    V'  = U − W S_in                                   (the "new values")
    O   = scale · ((exp(b) ⊙ Q) S_in + ((Q Kᵀ) ⊙ Γ ⊙ causal) V')
    S_out = exp(b_{C−1}) S_in + (exp(b_{C−1} − b) ⊙ K)ᵀ V'

Every decay factor is the exp of a non-positive difference of cumulative log decays, so nothing
overflows for any finite gates (a single gate near −1e4 or below costs the float32 sums digits, and
−inf gives NaN: README, Limitations). Per key channel gates (KDA, Kimi Linear 2025) make ``K Kᵀ ⊙ Γ`` and
``Q Kᵀ ⊙ Γ`` sums ``Σ_d x_{id} k_{jd} exp(b_{id} − b_{jd})``, which this path computes by
**secondary chunking**: sub-blocks of 16 tokens; across sub-blocks the pair factor is split at the
first token r of the row's sub-block, ``(x_i ⊙ exp(b_i − b_r)) · (k_j ⊙ exp(b_r − b_j))`` with both
exps ≤ 1 (a matmul per sub-block), and inside a sub-block the 16×16×D factors are formed directly
for i > j only. Chosen over the direct masked C×C×D form because it keeps most of the work in
matmuls and needs under a third of that form's C²·D temporaries (C²·D/16 + 16·C·D per value head
at C = 64), formed once per chunk and shared by ``A`` and the output; they are what limits this
path at D = 128.

Packed documents (``doc_ids``): factors between tokens of different documents are masked to 0,
tokens of a document that starts inside the chunk do not see the entering state, and the carried
state is zeroed when the chunk's last document differs from the one entering it (masks only, no
infinities). Gradients come from autodiff (the triangular inverse has its own ``custom_vjp``); each
step is rematerialised, so the backward stores only the state entering each chunk.

Besides the op, ``shard_transition`` (the shard's final state from zero and its composed
transition Φ) and ``state_cotangent`` (the cotangent the shard's outputs put on its entering
state) are what sequence parallelism (``lasp_jax``) needs (notes/design.md §6).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.channel_gates import SUB_BLOCK, KeyFactors, key_factors, masked_exp, per_channel_scores, sums_after
from pallas_kernels.common import acc_dtype
from pallas_kernels.gated_delta_rule.reference import group_values

DEFAULT_CHUNK = 64


class Chunks(NamedTuple):
    """Inputs cut into N chunks of C tokens, scanned over the leading axis (None where not used).

    q, k ``[N, B, H, C, D]``; v, do ``[N, B, H, G, C, E]``; beta ``[N, B, H, G, C]``; cum (cumulative
    log decay inside each chunk, ``b_i = Σ_{t≤i} g_t``) ``[N, B, H, G, C]`` or ``[N, B, H, G, C, D]``;
    to_end (``b_{C−1} − b_j = Σ_{t>j} g_t``, a suffix sum, not a difference of prefix sums: the
    weight of a token into the leaving state, e.g. 1 before zero-padded tokens, then sends no
    O(1) gradients of opposite sign to two prefix sums); docs ``(doc [N, B, C], doc_before [N, B])``,
    the document index of every token and of the token before the chunk.
    """

    q: jax.Array | None
    k: jax.Array
    v: jax.Array | None
    beta: jax.Array
    cum: jax.Array | None
    to_end: jax.Array | None
    docs: tuple[jax.Array, jax.Array] | None
    do: jax.Array | None


class Masks(NamedTuple):
    """Which pairs interact inside a chunk and which tokens meet the carried state.

    allowed ``[B|1, 1, 1, C, C]`` bool (causal, same document); from_state / to_state
    ``[B, 1, 1, C, 1]`` (0/1: the token sees the entering state / feeds the leaving one) and carry
    ``[B, 1, 1, 1, 1]`` (the entering state survives the chunk), all None without documents.
    """

    allowed: jax.Array
    from_state: jax.Array | None
    to_state: jax.Array | None
    carry: jax.Array | None


class Terms(NamedTuple):
    """What one chunk's state update needs, whatever reads it (output, transition, cotangent).

    a ``[B, H, G, C, C]``: strictly lower ``β_i Σ_d k_id k_jd exp(b_id − b_jd)``; k_in
    ``[B, H, G|1, C, D]``: ``exp(b) ⊙ k`` for tokens that see the entering state; k_out: ``exp(b_{C−1} −
    b) ⊙ k`` for tokens of the leaving state; decay_out: the factor on the entering state's rows in
    the leaving state, ``[B, H, G, 1|D, 1]``, or None for 1.
    """

    a: jax.Array
    k_in: jax.Array
    k_out: jax.Array
    decay_out: jax.Array | None


def chunk_length(t: int, chunk_size: int = DEFAULT_CHUNK) -> int:
    """The chunk length for T tokens: ``chunk_size``, or T rounded up to a whole sub-block when shorter."""
    if chunk_size % SUB_BLOCK:
        raise ValueError(f"chunk_size must be a multiple of {SUB_BLOCK}, got {chunk_size=}")
    return min(chunk_size, -(-t // SUB_BLOCK) * SUB_BLOCK)


def _to_chunks(x, c, *, feature: bool):
    """``[B, T, ...]`` -> ``[N, B, ..., C(, F)]``; zero padding is exact (β = 0 adds nothing, g = 0 keeps)."""
    b, t = x.shape[:2]
    n = -(-t // c)
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, c) + x.shape[2:])
    return jnp.moveaxis(x, (1, 2), (0, x.ndim - 2 if feature else x.ndim - 1))


def _chunk_inputs(q, k, v, beta, g, doc_ids, do, *, chunk_size) -> tuple[Chunks, int]:
    b, t, h, _ = k.shape
    dt = acc_dtype(*(None if x is None else x.dtype for x in (q, k, v, beta, g, do)))
    c = chunk_length(t, chunk_size)

    def cut(x, feature=True, grouped=True):
        if x is None:
            return None
        x = x.astype(dt)
        return _to_chunks(group_values(x, h) if grouped else x, c, feature=feature)

    cum = to_end = None
    if g is not None:
        axis = -2 if g.ndim == 4 else -1
        gates = cut(g, feature=g.ndim == 4)
        cum = jnp.cumsum(gates, axis=axis)
        to_end = sums_after(gates, axis)
    docs = None
    if doc_ids is not None:
        # padding continues the last document, so the final state is untouched
        n = -(-t // c)
        doc = jnp.pad(doc_ids, [(0, 0), (0, n * c - t)], mode="edge").reshape(b, n, c)
        doc_before = jnp.concatenate([doc[:, :1, 0], doc[:, :-1, -1]], axis=1)  # chunk 0: its own first
        docs = (jnp.moveaxis(doc, 1, 0), jnp.moveaxis(doc_before, 1, 0))
    chunks = Chunks(
        q=cut(q, grouped=False),
        k=cut(k, grouped=False),
        v=cut(v),
        beta=cut(beta, feature=False),
        cum=cum,
        to_end=to_end,
        docs=docs,
        do=cut(do),
    )
    return chunks, c


def _masks(docs, c) -> Masks:
    causal = jnp.tril(jnp.ones((c, c), bool))
    if docs is None:
        return Masks(causal[None, None, None], None, None, None)
    doc, doc_before = docs
    dt = jnp.float32

    def per_token(x):
        return x[:, None, None, :, None]

    allowed = causal & (doc[:, :, None] == doc[:, None, :])
    return Masks(
        allowed=allowed[:, None, None],
        from_state=per_token(doc == doc_before[:, None]).astype(dt),
        to_state=per_token(doc == doc[:, -1:]).astype(dt),
        carry=(doc[:, -1] == doc_before)[:, None, None, None, None].astype(dt),
    )


def _decayed_scores(x, keys: KeyFactors, allowed):
    """``Σ_d x_id k_jd exp(b_id − b_jd)`` for the allowed j ≤ i, ``[B, H, G|1, C, C]``.

    x ``[B, H, C, D]``. The diagonal factor is exactly 1 and kept out of the graph
    (``exp(b_i − b_i)`` would send two opposite gradients to b_i).
    """
    cum = keys.cum
    if keys.k_ref is not None:
        return jnp.where(allowed, per_channel_scores(x, keys), 0.0)
    scores = jnp.einsum("bhid,bhjd->bhij", x, keys.k)[:, :, None]
    if cum is None:
        return jnp.where(allowed, scores, 0.0)
    eye = jnp.eye(scores.shape[-1], dtype=bool)
    off = allowed & ~eye
    return scores * (masked_exp(off, cum[..., :, None] - cum[..., None, :]) + eye)


def _from_start(x, cum):
    """``exp(b) ⊙ x`` per value head: x ``[B, H, C, D]`` -> ``[B, H, G|1, C, D]``."""
    x = x[:, :, None]
    if cum is None:
        return x
    return x * jnp.exp(cum if cum.ndim == 5 else cum[..., None])


def _terms(chunk: Chunks, masks: Masks, keys: KeyFactors) -> Terms:
    k, cum = chunk.k, chunk.cum
    strict = masks.allowed & ~jnp.eye(k.shape[-2], dtype=bool)
    a = jnp.where(strict, chunk.beta[..., :, None] * _decayed_scores(k, keys, masks.allowed), 0.0)
    k_in = _from_start(k, cum)
    k_out = k[:, :, None]
    decay_out = None
    if cum is not None:
        per_channel = cum.ndim == 5
        to_end = jnp.exp(chunk.to_end)
        k_out = k_out * (to_end if per_channel else to_end[..., None])
        decay_out = jnp.exp(cum[..., -1, :])[..., None] if per_channel else jnp.exp(cum[..., -1])[..., None, None]
    if masks.from_state is not None:
        k_in, k_out = k_in * masks.from_state, k_out * masks.to_state
        decay_out = masks.carry if decay_out is None else decay_out * masks.carry
    return Terms(a, k_in, k_out, decay_out)


@jax.custom_vjp
def unit_lower_inverse(a):
    """``T = (I + a)⁻¹`` for strictly lower-triangular ``a`` ``[..., C, C]`` by forward substitution,
    one row a step: ``T_i = e_i − Σ_{j<i} a_ij T_j``; its cotangent is ``−Tᵀ dT Tᵀ`` (strictly lower).

    Not ``triangular_solve``: XLA's CPU lowering (a LAPACK call per chunk) costs ten times the rest of
    a chunk. Not the product ``Π (I + (−a)^{2^k})``: its terms grow like binomials when keys are
    nearly parallel while the inverse stays small, so float32 loses every digit.
    """
    c = a.shape[-1]
    eye = jnp.eye(c, dtype=a.dtype)

    def row(i, t):
        a_i = jax.lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(t, eye[i] - jnp.einsum("...j,...jk->...k", a_i, t), i, axis=-2)

    # zeros_like(a): the carry varies along the mesh axes a does (inside a checked shard_map)
    return jax.lax.fori_loop(1, c, row, jnp.zeros_like(a) + eye)


def _unit_lower_inverse_fwd(a):
    t = unit_lower_inverse(a)
    return t, t


def _unit_lower_inverse_bwd(t, dt):
    t_transposed = jnp.swapaxes(t, -1, -2)
    return (jnp.tril(-(t_transposed @ dt @ t_transposed), -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _new_values(terms: Terms, beta, v, state):
    """``V' = U − W S_in`` with ``[U | W] = (I + A)⁻¹ diag(β) [V | k_in]``."""
    e = v.shape[-1]
    k_in = jnp.broadcast_to(terms.k_in, v.shape[:-1] + terms.k_in.shape[-1:])
    rhs = beta[..., None] * jnp.concatenate([v, k_in], axis=-1)
    solved = unit_lower_inverse(terms.a) @ rhs
    return solved[..., :e] - solved[..., e:] @ state


def _state_out(terms: Terms, state, v_new):
    kept = state if terms.decay_out is None else terms.decay_out * state
    return kept + jnp.einsum("bhgcd,bhgce->bhgde", terms.k_out, v_new)


def _query_terms(q, keys: KeyFactors, masks: Masks):
    """``(exp(b) ⊙ q`` for tokens that see the entering state, ``(Q Kᵀ) ⊙ Γ`` masked): the output's factors."""
    q_in = _from_start(q, keys.cum)
    if masks.from_state is not None:
        q_in = q_in * masks.from_state
    return q_in, _decayed_scores(q, keys, masks.allowed)


def _output_step(state, chunk: Chunks, *, scale):
    c = chunk.k.shape[-2]
    masks, keys = _masks(chunk.docs, c), key_factors(chunk.k, chunk.cum)
    terms = _terms(chunk, masks, keys)
    v_new = _new_values(terms, chunk.beta, chunk.v, state)
    q_in, scores = _query_terms(chunk.q, keys, masks)
    o = jnp.einsum("bhgcd,bhgde->bhgce", q_in, state) + jnp.einsum("bhgij,bhgje->bhgie", scores, v_new)
    return _state_out(terms, state, v_new), scale * o


def _state_step(state, chunk: Chunks):
    terms = _terms(chunk, _masks(chunk.docs, chunk.k.shape[-2]), key_factors(chunk.k, chunk.cum))
    return _state_out(terms, state, _new_values(terms, chunk.beta, chunk.v, state)), None


def _state_cotangent_step(ds, chunk: Chunks, *, scale):
    """Cotangent of the state entering the chunk from that of the state leaving it and the chunk's dO.

    With ``O = scale (q_in S + P V')``, ``S_out = decay_out S + k_outᵀ V'``, ``V' = U − W S``:
    ``dS = decay_out dS_out + scale q_inᵀ dO − Wᵀ Y``, ``Y = scale Pᵀ dO + k_out dS_out`` and
    ``Wᵀ Y = k_inᵀ diag(β) (I + A)⁻ᵀ Y`` (no W).
    """
    masks, keys = _masks(chunk.docs, chunk.k.shape[-2]), key_factors(chunk.k, chunk.cum)
    terms = _terms(chunk, masks, keys)
    q_in, scores = _query_terms(chunk.q, keys, masks)
    y = scale * jnp.einsum("bhgij,bhgie->bhgje", scores, chunk.do) + jnp.einsum("bhgcd,bhgde->bhgce", terms.k_out, ds)
    z = jnp.einsum("...ji,...je->...ie", unit_lower_inverse(terms.a), y)  # (I + A)⁻ᵀ Y
    kept = ds if terms.decay_out is None else terms.decay_out * ds
    through_new_values = jnp.einsum("bhgcd,bhgce->bhgde", terms.k_in, chunk.beta[..., None] * z)
    return kept + scale * jnp.einsum("bhgcd,bhgce->bhgde", q_in, chunk.do) - through_new_values, None


def _carry(state, chunks: Chunks):
    """A scan's initial carry typed to vary along every mesh axis the inputs vary along (inside a
    checked ``shard_map`` the body's output does; ``zeros_like`` keeps the type and costs nothing)."""
    for x in jax.tree.leaves(chunks):
        if jnp.issubdtype(x.dtype, jnp.floating):
            state = state + jnp.zeros_like(x.ravel()[0], dtype=state.dtype)
    return state


def _grouped_state(state, num_heads, shape, dt):
    b, hv, d, e = shape
    if state is None:
        return jnp.zeros((b, num_heads, hv // num_heads, d, e), dt)
    return state.astype(dt).reshape(b, num_heads, hv // num_heads, d, e)


def gated_delta_rule(q, k, v, beta, g=None, *, scale, initial_state=None, doc_ids=None, chunk_size=DEFAULT_CHUNK):
    """Same contract as ``reference.recurrent``; returns ``(o, final_state)`` in float32 (float64 for float64)."""
    b, t, h, d = q.shape
    hv, e = v.shape[2:]
    chunks, c = _chunk_inputs(q, k, v, beta, g, doc_ids, None, chunk_size=chunk_size)
    s0 = _carry(_grouped_state(initial_state, h, (b, hv, d, e), chunks.k.dtype), chunks)
    step = jax.checkpoint(lambda s, x: _output_step(s, x, scale=scale))
    final, o = jax.lax.scan(step, s0, chunks)
    o = jnp.moveaxis(o, (0, 4), (1, 2)).reshape(b, -1, hv, e)[:, :t]
    return o, final.reshape(b, hv, d, e)


def shard_transition(k, v, beta, g=None, *, doc_ids=None, chunk_size=DEFAULT_CHUNK):
    """The shard's affine map ``S_out = Φ S_in + M`` (notes/design.md §6): ``(M, Φ)``.

    ``M`` ``[B, Hv, D, E]`` is the final state from a zero entering state and ``Φ`` ``[B, Hv, D, D]``
    the composed transition ``A_{L−1} ⋯ A_0``: one state pass on ``E + D`` columns, ``v``
    augmented by zeros, from ``[0 | I]``. With ``doc_ids``, M counts the last document only and Φ is
    0 in a row with a boundary inside the shard (the carried state is reset there).
    """
    b, t, h, d = k.shape
    hv, e = v.shape[2:]
    dt = acc_dtype(k.dtype, v.dtype, beta.dtype, None if g is None else g.dtype)
    v_aug = jnp.concatenate([v.astype(dt), jnp.zeros((b, t, hv, d), dt)], axis=-1)
    chunks, _ = _chunk_inputs(None, k, v_aug, beta, g, doc_ids, None, chunk_size=chunk_size)
    s0 = jnp.concatenate([jnp.zeros((d, e), dt), jnp.eye(d, dtype=dt)], axis=-1)
    s0 = _carry(jnp.broadcast_to(s0, (b, h, hv // h, d, e + d)), chunks)
    final, _ = jax.lax.scan(jax.checkpoint(_state_step), s0, chunks)
    final = final.reshape(b, hv, d, e + d)
    return final[..., :e], final[..., e:]


def state_cotangent(q, k, beta, g, do, *, scale, doc_ids=None, chunk_size=DEFAULT_CHUNK):
    """``∂⟨dO, o⟩ / ∂S_in`` ``[B, Hv, D, E]``: the cotangent the outputs put on the entering state.

    One reverse pass over the chunks (the transpose of the state recurrence), no pass over v:
    equal to the ``initial_state`` gradient of ``gated_delta_rule`` with cotangent ``(dO, 0)``.
    """
    b, t, h, d = q.shape
    hv, e = do.shape[2:]
    chunks, _ = _chunk_inputs(q, k, None, beta, g, doc_ids, do, chunk_size=chunk_size)
    ds = _carry(jnp.zeros((b, h, hv // h, d, e), chunks.k.dtype), chunks)
    step = jax.checkpoint(lambda s, x: _state_cotangent_step(s, x, scale=scale))
    ds, _ = jax.lax.scan(step, ds, chunks, reverse=True)
    return ds.reshape(b, hv, d, e)
