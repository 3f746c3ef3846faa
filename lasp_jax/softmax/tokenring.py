"""TokenRing (Wang et al. 2024, arXiv 2412.20501): queries travel one way, block outputs travel back.

K and V never move. At step s = 0..P−1 rank r holds the queries of rank ``src = (r − s) mod P``
(passed one hop r → r + 1 per step) and attends them to its own K/V, giving a partial output and
log-sum-exp over its keys; the partial goes straight back to ``src`` (one ``ppermute`` by −s) while
the next step computes, and ``src`` merges its P partials with the online softmax (float32). Queries
flow forward and partial results backward at the same time, so every link carries data in both
directions (at P = 2 the one pair of links is busy both ways at every step), where RingAttention
uses one direction only. The steps are unrolled (P is static): each step's ``ppermute`` pattern is
fixed, and nothing but data dependencies orders the sends and the compute.

Bytes per step and rank: forward q ``[B, L, H, D]`` and the partial o ``[B, L, H, E]`` (q's dtype)
with lse ``[B, H, L]`` float32; backward q, dO, o (q's dtype) and lse forward, the dq partial
(float32) back. K/V stay, and so do the float32 dK/dV accumulators. Cheapest where H·D is small
against Hk·D of the ring's K/V blocks, i.e. with few query heads per KV head; with grouped heads
the ring moves fewer bytes, so the two are there to be timed side by side.

Balanced (``balance``, the default with an even local length): queries *and* K/V are dealt as the
half-shards r and 2P − 1 − r (``deal``), so at every step every rank computes two chunk pairs and
waits for no one; the partial results follow the dealt queries home, and the dK/dV of the dealt
keys are dealt back at the end. Packed documents: the queries travel with their document numbers.
One ``jax.custom_vjp``; the residuals are the local (dealt) K/V and, per query part, q, o and lse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lasp_jax.softmax.deal import (
    Residuals,
    SavedPart,
    Statics,
    add_key_parts,
    cotangent_parts,
    deal_keys,
    join_parts,
    key_parts,
    keys_dealt,
    merge,
    merge_key_parts,
    part_starts,
    query_parts,
    shift,
    source_rank,
)
from pallas_kernels.common import acc_dtype


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def tokenring_attention(q, k, v, ids, statics: Statics):
    """Causal attention of this rank's ``[B, L, H, D]`` queries, sent round the ring to every rank's
    K/V; ``ids``: the local document numbers ``[B, L]`` or None."""
    return _tokenring_fwd(q, k, v, ids, statics)[0]


def _local_keys(k, v, ids, n_parts: int, statics: Statics):
    """This rank's key parts (dealt halves with the dealt queries) and the (k, v, ids) they come from."""
    axis = statics.axis_name
    dealt = keys_dealt(statics, n_parts)
    if dealt:
        k, v, ids = deal_keys(k, v, ids, axis)
    starts = part_starts(lax.axis_index(axis), k.shape[1], lax.axis_size(axis), dealt)
    return key_parts(k, v, ids, starts), (k, v, ids)


def _query_starts(step, rows: int, n_parts: int, axis_name) -> list:
    """First positions of the query parts received at ``step`` (those of rank ``src``)."""
    src = source_rank(step, axis_name)
    return part_starts(src, rows * n_parts, lax.axis_size(axis_name), n_parts == 2)


# ---- forward: queries out, partial (o, lse) back ------------------------------------------------


def _tokenring_fwd(q, k, v, ids, statics: Statics):
    axis = statics.axis_name
    n = lax.axis_size(axis)
    plan, parts = query_parts(q, ids, axis, statics.balance)
    keys, local = _local_keys(k, v, ids, len(parts), statics)
    held = [(part.q, part.ids) for part in parts]
    stats = None
    for step in range(n):
        following = shift(held, axis) if step < n - 1 else None  # issued before the compute
        starts = _query_starts(step, parts[0].q.shape[1], len(parts), axis)
        partial = [_attend(q_p, ids_p, start, keys, statics) for (q_p, ids_p), start in zip(held, starts, strict=True)]
        if step:  # to the queries' owner, in q's dtype, while the next step computes
            partial = shift([(o.astype(q.dtype), lse) for o, lse in partial], axis, hops=-step)
            partial = [merge(*acc, o.astype(acc[0].dtype), lse) for acc, (o, lse) in zip(stats, partial, strict=True)]
        stats, held = partial, following
    saved = tuple(SavedPart(*part, o.astype(q.dtype), lse) for part, (o, lse) in zip(parts, stats, strict=True))
    return join_parts(plan, [part.o for part in saved], axis), Residuals(*local, saved)


def _attend(q, ids, q_start, keys, statics: Statics):
    """(o float32, lse) of queries at ``q_start`` against every visible local key part, merged."""
    b, rows, h, _ = q.shape
    acc = acc_dtype(q.dtype)
    carry = (jnp.zeros((b, rows, h, keys[0].v.shape[-1]), acc), jnp.full((b, h, rows), -jnp.inf, acc))
    return merge_key_parts(carry, q=q, ids=ids, q_start=q_start, keys=keys, statics=statics)


# ---- backward: q, dO, o, lse out, partial dq back; dK/dV stay -----------------------------------


def _tokenring_bwd(statics: Statics, res: Residuals, do):
    axis = statics.axis_name
    n = lax.axis_size(axis)
    q_dtype = res.parts[0].q.dtype
    acc = acc_dtype(q_dtype)
    plan, dos = cotangent_parts(do, len(res.parts), axis)
    dealt = keys_dealt(statics, len(res.parts))
    starts = part_starts(lax.axis_index(axis), res.k.shape[1], n, dealt)
    keys = key_parts(res.k, res.v, res.ids, starts)
    dks, dvs = [jnp.zeros(key.k.shape, acc) for key in keys], [jnp.zeros(key.v.shape, acc) for key in keys]
    held = [(part.q, part.ids, part.o, part.lse, do_p) for part, do_p in zip(res.parts, dos, strict=True)]
    dqs = None
    for step in range(n):
        following = shift(held, axis) if step < n - 1 else None
        q_starts = _query_starts(step, res.parts[0].q.shape[1], len(res.parts), axis)
        partial = []
        for (q, ids, o, lse, do_p), q_start in zip(held, q_starts, strict=True):
            dq = jnp.zeros(q.shape, acc)  # this rank's partial dq of the travelling queries
            dq, dks, dvs = add_key_parts(
                dq, dks, dvs, q=q, ids=ids, o=o, lse=lse, do=do_p, q_start=q_start, keys=keys, statics=statics
            )
            partial.append(dq)
        if step:  # the float32 dq partials back to the queries' owner
            partial = [a + b for a, b in zip(dqs, shift(partial, axis, hops=-step), strict=True)]
        dqs, held = partial, following
    key_plan = plan if dealt else None  # dealt keys: their gradients dealt back to the owners
    dk, dv = join_parts(key_plan, dks, axis), join_parts(key_plan, dvs, axis)
    dq = join_parts(plan, [dq.astype(q_dtype) for dq in dqs], axis)
    return dq, dk.astype(res.k.dtype), dv.astype(res.v.dtype), None


tokenring_attention.defvjp(_tokenring_fwd, _tokenring_bwd)
