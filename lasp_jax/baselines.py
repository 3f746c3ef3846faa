"""Baseline strategies for honest comparisons with LASP (same API, ``strategy=``).

Both differentiate by plain autodiff through their collectives (the transpose of an
``all_to_all`` is an ``all_to_all``, of an ``all_gather`` a reduce-scatter), and both move
activations whose size grows with the sequence, unlike LASP's fixed ``[B, H, D, E]`` states.

- ``ulysses`` (DeepSpeed-Ulysses): all-to-all from sequence-sharded to head-sharded, the
  single-device op over the whole sequence for ``H / P`` heads, all-to-all back. Needs
  ``H % P == 0``; when ``Hk % P != 0`` the key/value heads are repeated up to ``H`` first.
- ``gather_kv`` (Megatron-SP style): all-gather K and V (and the gates), build the state of the
  gathered prefix ``[0, r·L)`` for the local queries, run the local op from that state.

With ``segment_ids`` both gather the ``[B, L]`` ids over the sequence (tiny next to q, k, v), so the
document index is the global one: ``ulysses`` hands the global ids to the single-device op;
``gather_kv`` builds the prefix state from the prefix's last document only, and only when that
document continues into the shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp_jax.lasp import suffix_sums
from lasp_jax.state_passing import broadcast_from, state_decay, varying_axes
from pallas_kernels import linear_attention
from pallas_kernels.common import acc_dtype
from pallas_kernels.linear_attention import reference


def ulysses(
    q,
    k,
    v,
    *,
    axis_name,
    size,
    g=None,
    g_gamma=None,
    scale,
    initial_state=None,
    output_final_state,
    segment_ids=None,
    impl,
):
    h, hk = q.shape[2], k.shape[2]
    if h % size:
        raise ValueError(f"strategy='ulysses' needs the query heads divisible by the sequence axis: H={h}, P={size}")
    if hk % size:
        k, v = (jnp.repeat(x, h // hk, axis=2) for x in (k, v))
    rank = jax.lax.axis_index(axis_name)
    heads = h // size

    def seq_to_heads(x):
        return jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)

    def my_heads(x, axis):
        return jax.lax.dynamic_slice_in_dim(x, rank * heads, heads, axis=axis)

    o, final = linear_attention(
        seq_to_heads(q),
        seq_to_heads(k),
        seq_to_heads(v),
        g=None if g is None else seq_to_heads(g),
        g_gamma=None if g_gamma is None else my_heads(g_gamma, 0),
        scale=scale,
        initial_state=None if initial_state is None else my_heads(initial_state, 1),
        output_final_state=output_final_state,
        segment_ids=None if segment_ids is None else jax.lax.all_gather(segment_ids, axis_name, axis=1, tiled=True),
        impl=impl,
    )
    o = jax.lax.all_to_all(o, axis_name, split_axis=1, concat_axis=2, tiled=True)
    if output_final_state:
        final = jax.lax.all_gather(final, axis_name, axis=1, tiled=True)
        if axis_name in varying_axes(q):  # checked shard_map: type the replicated state invariant
            final = broadcast_from(final, 0, axis_name)
    return o, final


def _weighted_state(k, v, log_w, mask, num_heads):
    """Σ_j [mask_j] exp(log_w_j) k_jᵀ v_j over the gathered tokens, ``[B, H, D, E]`` float32.

    ``log_w`` ``[B, T, H]``, or ``[B, T, H, D]`` per key channel; ``mask`` ``[B|1, T, 1]``.
    """
    b, t, hk, d = k.shape
    grp = num_heads // hk
    acc = acc_dtype(k.dtype, v.dtype)
    mask = mask.reshape(mask.shape + (1,) * (log_w.ndim - mask.ndim))
    w = jnp.where(mask, jnp.exp(jnp.where(mask, log_w, 0.0)), 0.0).reshape(b, t, hk, grp, -1)
    k_weighted = (k[:, :, :, None].astype(acc) * w).astype(k.dtype)
    s = jnp.einsum("btkgd,btke->bkgde", k_weighted, v, preferred_element_type=acc)
    return s.reshape(b, num_heads, d, v.shape[-1])


def gather_kv(
    q,
    k,
    v,
    *,
    axis_name,
    size,
    g=None,
    g_gamma=None,
    scale,
    initial_state=None,
    output_final_state,
    segment_ids=None,
    impl,
):
    b, length, h, _ = q.shape
    rank = jax.lax.axis_index(axis_name)

    def gather(x):
        return jax.lax.all_gather(x, axis_name, axis=1, tiled=True)

    k_all, v_all = gather(k), gather(v)
    t = length * size
    if g is not None:  # [B, T, H], or [B, T, H, D] per key channel
        g_all = gather(g).astype(jnp.float32)
    elif g_gamma is not None:
        g_all = jnp.broadcast_to(g_gamma.astype(jnp.float32), (b, t, h))
    else:
        g_all = jnp.zeros((b, t, h), jnp.float32)
    # the local queries see the gathered prefix [0, r·L): decay from token j to the prefix end
    before = (jnp.arange(t) < rank * length)[None, :, None]
    g_before = jnp.where(before.reshape(before.shape + (1,) * (g_all.ndim - 3)), g_all, 0.0)
    feeds_s_in, feeds_final = before, jnp.ones_like(before)
    init_in = init_final = jnp.ones((b,), bool)  # the initial state reaches the shard / the end
    if segment_ids is not None:
        doc_all = reference.document_index(gather(segment_ids))  # [B, T], global document index
        start = rank * length
        prefix_doc = doc_all[:, jnp.maximum(start - 1, 0)]  # document of the prefix's last token
        init_in = (rank == 0) | (prefix_doc == doc_all[:, start])  # it continues into this shard
        feeds_s_in = before & ((doc_all == prefix_doc[:, None]) & init_in[:, None])[..., None]
        init_in = init_in & (prefix_doc == 0)
        feeds_final = (doc_all == doc_all[:, -1:])[..., None]
        init_final = doc_all[:, -1] == 0
    s_in = _weighted_state(k_all, v_all, suffix_sums(g_before)[1], feeds_s_in, h)
    if initial_state is not None:
        reaches = init_in[:, None, None, None].astype(s_in.dtype)
        s_in = s_in + reaches * state_decay(jnp.sum(g_before, axis=1), s_in) * initial_state.astype(s_in.dtype)
    o, _ = linear_attention(
        q,
        k,
        v,
        g=g,
        g_gamma=g_gamma,
        scale=scale,
        initial_state=s_in,
        output_final_state=False,
        segment_ids=segment_ids,
        impl=impl,
    )
    final = None
    if output_final_state:
        final = _weighted_state(k_all, v_all, suffix_sums(g_all)[1], feeds_final, h)
        if initial_state is not None:
            reaches = init_final[:, None, None, None].astype(final.dtype)
            final = final + reaches * state_decay(jnp.sum(g_all, axis=1), final) * initial_state.astype(final.dtype)
        if axis_name in varying_axes(q):
            final = broadcast_from(final, 0, axis_name)
    return o, final
