"""Chunked causal linear attention in plain jnp: the portable path and the CPU default.

One ``lax.scan`` walks the chunks of C tokens. Each step computes the chunk's masked C×C
attention, adds the contribution of the float32 ``[B, H, D, E]`` state entering the chunk and
updates that state (notes/design.md §1). The forward never stacks per-chunk states, which is what
makes this path fast on CPUs with little memory bandwidth. Tensors are laid out as
``[N, B, Hk, G, C, ·]`` (G = H // Hk query heads per key head), so keys and values are never
repeated; q, k, v and o stay in the input dtype (bf16 chunks and cotangents for bf16 inputs) and
each step computes in float32. Gradients come from autodiff; each step is rematerialised, so the
backward stores only the state entering each chunk, and from ``GROUP_FROM`` chunks on only the
state entering each group of about √N chunks (an outer checkpointed scan; one group's step
residuals are recomputed at a time, and every step still runs forward twice): at a million tokens
of 16 heads of 128 × 128, 128 states (128 MiB) instead of 16,384 (16 GiB). A constant per-head
decay (``gamma``) never becomes a T-long array: each step forms its chunk's cumulative log decay
as ``gamma · (position + 1)`` from the chunk's start, so no cumulative sum of a long broadcast
constant is left for XLA to fold.

Per key channel (GLA, ``log_decay [B, T, H, D]``, notes/design.md §6) the masked scores
``Σ_d q_id k_jd exp(b_id − b_jd)`` are no longer one matmul: ``pallas_kernels.channel_gates``
forms them by secondary chunking (sub-blocks of 16 tokens factored around a reference point, so
every exp is of a non-positive difference), and the chunk length is a multiple of 16. The state
step scales rows: ``S_out = exp(b_{C−1}) ⊙ S_in + (exp(b_{C−1} − b) ⊙ K)ᵀ V`` with
``b_{C−1} − b`` a suffix sum (never a difference of two prefix sums).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.channel_gates import SUB_BLOCK, key_factors, per_channel_scores, sums_after

DEFAULT_CHUNK = 64
# chunks from which the scan runs in checkpointed groups (fewer stored states; see the module)
GROUP_FROM = 256


def _doc_masks(docs, causal, dtype):
    """(allowed ``[B|1, 1, 1, C, C]``, from_state ``[B, 1, 1, C, 1]``, to_state ``[B, 1, C, 1]``, carry
    ``[B, 1, 1, 1, 1]``): pairs in one document, tokens that see / feed the state, whether the entering
    state survives the chunk (float masks; all but ``allowed`` None without documents)."""
    if docs is None:
        return causal, None, None, None
    doc, doc_before = docs
    allowed = causal & (doc[:, None, None, :, None] == doc[:, None, None, None, :])
    from_state = (doc == doc_before[:, None])[:, None, None, :, None].astype(dtype)
    to_state = (doc == doc[:, -1:])[:, None, :, None].astype(dtype)
    carry_state = (doc[:, -1] == doc_before)[:, None, None, None, None].astype(dtype)
    return allowed, from_state, to_state, carry_state


def _chunk_step(state, chunk, *, scale, causal):
    """One chunk: q [B, Hk, G, C, D], k [B, Hk, C, D], v [B, Hk, C, E], cum [B, Hk, G, C] or None,
    docs None or (doc [B, C], doc_before [B]) with the document index of the token before the chunk."""
    q, k, v, cum, docs = chunk
    c = q.shape[-2]
    allowed, from_state, to_state, carry_state = _doc_masks(docs, causal, q.dtype)
    scores = jnp.einsum("bkgid,bkjd->bkgij", q, k)
    if cum is None:
        scores = jnp.where(allowed, scores, 0.0)
        q_state = q if from_state is None else q * from_state
        k_state = k if to_state is None else k * to_state
        o_inter = jnp.einsum("bkgid,bkgde->bkgie", q_state, state)
        kept = state if carry_state is None else carry_state * state
        new_state = kept + jnp.einsum("bkjd,bkje->bkde", k_state, v)[:, :, None]
    else:
        # the diagonal factor is exactly 1 and kept out of the graph: exp(b_i - b_i) would send two
        # O(1) gradients of opposite sign to b_i, whose float32 rounding swamps a small true dg
        eye = jnp.eye(c, dtype=bool)
        off_diag = allowed & ~eye
        diff = cum[..., :, None] - cum[..., None, :]
        scores = scores * (jnp.where(off_diag, jnp.exp(jnp.where(off_diag, diff, 0.0)), 0.0) + eye)
        q_state = q * jnp.exp(cum)[..., None]
        if from_state is not None:
            q_state = q_state * from_state
        o_inter = jnp.einsum("bkgid,bkgde->bkgie", q_state, state)
        last = jnp.arange(c) == c - 1  # exp(b_{C-1} - b_j), the last factor exactly 1 as above
        to_end = jnp.where(last, 1.0, jnp.exp(jnp.where(last, 0.0, cum[..., -1:] - cum)))
        if to_state is not None:
            to_end = to_end * to_state[..., 0][:, :, None]
        decay = jnp.exp(cum[..., -1])[..., None, None]
        if carry_state is not None:
            decay = decay * carry_state
        new_state = decay * state + jnp.einsum("bkjd,bkgje->bkgde", k, to_end[..., None] * v[:, :, None])
    o = jnp.einsum("bkgij,bkje->bkgie", scores, v) + o_inter
    return new_state, scale * o


def _channel_chunk_step(state, chunk, *, scale, causal):
    """One chunk with a log decay per key channel: q [B, Hk, G, C, D], k [B, Hk, C, D], v [B, Hk, C, E],
    cum [B, Hk, G, C, D] (``b``), to_end [B, Hk, G, C, D] (``b_{C−1} − b``), docs as ``_chunk_step``."""
    q, k, v, cum, to_end, docs = chunk
    allowed, from_state, to_state, carry_state = _doc_masks(docs, causal, q.dtype)
    scores = jnp.where(allowed, per_channel_scores(q, key_factors(k, cum)), 0.0)
    q_state = q * jnp.exp(cum)
    k_state = k[:, :, None] * jnp.exp(to_end)
    decay = jnp.exp(cum[..., -1, :])[..., None]  # [B, Hk, G, D, 1]: scales the state's rows
    if docs is not None:
        q_state, k_state, decay = q_state * from_state, k_state * to_state[:, :, None], decay * carry_state
    o = jnp.einsum("bkgij,bkje->bkgie", scores, v) + jnp.einsum("bkgid,bkgde->bkgie", q_state, state)
    new_state = decay * state + jnp.einsum("bkgjd,bkje->bkgde", k_state, v)
    return new_state, scale * o


def gamma_cumsum(gamma, start, *, chunk: int, length: int):
    """The chunk-local inclusive cumulative log decay of a constant per-head ``gamma`` for the
    chunk that starts at token ``start``: ``gamma · (min(t, length − 1) − start + 1)``, ``[..., chunk]``
    (the padding after token ``length − 1`` does not decay)."""
    pos = jnp.minimum(start + jnp.arange(chunk), length - 1) - start + 1
    return gamma[..., None] * pos.astype(gamma.dtype)


def linear_attention(
    q,
    k,
    v,
    log_decay=None,
    *,
    scale,
    initial_state=None,
    doc_ids=None,
    gamma=None,
    chunk_size=DEFAULT_CHUNK,
    out_dtype=jnp.float32,
):
    """Same contract as ``reference.recurrent``; returns ``(o, final_state)``, o in ``out_dtype``
    (each chunk's float32 output cast once; the public op passes q's dtype), the state in float32.

    ``gamma [H]``: a constant per-head log decay in place of ``log_decay`` (its cumulative sums in
    closed form, see ``gamma_cumsum``). ``log_decay [B, T, H, D]`` (per key channel) runs chunks of
    a multiple of 16 tokens (``chunk_size`` must be one).
    """
    if log_decay is not None and gamma is not None:
        raise ValueError("pass log_decay or gamma, not both")
    per_channel = log_decay is not None and log_decay.ndim == 4
    b, t, h, d = q.shape
    hk, e = k.shape[2], v.shape[-1]
    grp = h // hk
    c = min(chunk_size, t)
    if per_channel:
        if chunk_size % SUB_BLOCK:
            raise ValueError(f"chunk_size must be a multiple of {SUB_BLOCK} for per-channel gates, got {chunk_size=}")
        c = min(chunk_size, -(-t // SUB_BLOCK) * SUB_BLOCK)
    group = chunk_group(-(-t // c))
    n = -(-t // (c * group)) * group
    pad = n * c - t
    f32 = jnp.float32

    def chunks(x, dtype=f32):
        # [B, T, Hk, (G,) F] -> [N, B, Hk, (G,) C, F]; zero padding is exact: k = v = 0 adds
        # nothing to the state and a zero log decay does not decay it
        x = jnp.pad(x.astype(dtype), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, n, c) + x.shape[2:])
        return jnp.moveaxis(x, (1, 2), (0, x.ndim - 2))

    # q, k, v chunks stay in their dtype (float64 becomes float32): each step casts them to float32,
    # so a bf16 input's chunks and their cotangents are half the bytes and every value is the same
    kept = lambda x: x.dtype if x.dtype.itemsize <= 4 else f32  # noqa: E731
    qc = chunks(q.reshape(b, t, hk, grp, d), kept(q))
    kc, vc = chunks(k, kept(k)), chunks(v, kept(v))
    cum = to_end = None
    if per_channel:  # [N, B, Hk, G, C, D]
        gates = chunks(log_decay.reshape(b, t, hk, grp, d))
        cum, to_end = jnp.cumsum(gates, axis=-2), sums_after(gates, axis=-2)
    elif log_decay is not None:
        cum = jnp.cumsum(chunks(log_decay.reshape(b, t, hk, grp, 1))[..., 0], axis=-1)
    starts = jnp.arange(n) * c  # each chunk's first token (an iota, not a T-long constant)

    docs = None
    if doc_ids is not None:
        # padding continues the last document, so the final state is untouched
        doc = jnp.pad(doc_ids, [(0, 0), (0, pad)], mode="edge").reshape(b, n, c)
        doc_before = jnp.concatenate([doc[:, :1, 0], doc[:, :-1, -1]], axis=1)  # chunk 0: the first document
        docs = (jnp.moveaxis(doc, 1, 0), jnp.moveaxis(doc_before, 1, 0))

    s0 = jnp.zeros((b, hk, grp, d, e), f32)
    if initial_state is not None:
        s0 = initial_state.astype(f32).reshape(b, hk, grp, d, e)
    causal = jnp.tril(jnp.ones((c, c), bool))

    gamma_f = None if gamma is None else gamma.astype(f32).reshape(1, hk, grp)

    def step(state, chunk):
        q, k, v, cum, to_end, docs, start = chunk
        q, k, v = (x.astype(f32) for x in (q, k, v))
        if to_end is not None:
            state, o = _channel_chunk_step(state, (q, k, v, cum, to_end, docs), scale=scale, causal=causal)
        else:
            if gamma_f is not None:
                cum = gamma_cumsum(gamma_f, start, chunk=c, length=t)
            state, o = _chunk_step(state, (q, k, v, cum, docs), scale=scale, causal=causal)
        return state, o.astype(out_dtype)

    final, o = scan_chunks(step, s0, (qc, kc, vc, cum, to_end, docs, starts), group=group)
    o = jnp.moveaxis(o, (0, 4), (1, 2)).reshape(b, n * c, h, e)[:, :t]
    return o, final.reshape(b, h, d, e)


def chunk_group(num_chunks: int) -> int:
    """Chunks per checkpointed group: 1 (a plain scan, each step rematerialised) below ``GROUP_FROM``
    chunks, else the power of two nearest above √N (the stored states, N / group, and one group's
    step residuals then grow alike)."""
    if num_chunks < GROUP_FROM:
        return 1
    return 1 << math.ceil(math.log2(num_chunks) / 2)


def scan_chunks(step, state, xs, *, group: int):
    """``lax.scan(step, state, xs)`` over ``[N, ...]`` chunks with the backward's memory bounded:
    ``group`` = 1 rematerialises each step from its stored entering state; ``group`` > 1 (N a
    multiple of it) stores only each group's entering state and recomputes one group at a time."""
    if group == 1:
        return jax.lax.scan(jax.checkpoint(step), state, xs)
    n = jax.tree.leaves(xs)[0].shape[0]
    grouped = jax.tree.map(lambda x: x.reshape(n // group, group, *x.shape[1:]), xs)

    @jax.checkpoint
    def group_step(state, chunks):
        return jax.lax.scan(step, state, chunks)

    final, ys = jax.lax.scan(group_step, state, grouped)
    return final, ys.reshape(n, *ys.shape[2:])
