"""RingAttention (Liu et al. 2023): K/V blocks travel rank r → r+1, dK/dV accumulators travel with them.

At step s rank r holds the K/V block of rank (r − s) mod P; steps 0..P−2 run in a loop whose body
sends the held block on while it computes with it, step P−1 follows the loop (no send). Each rank
merges block results with the online softmax (running log-sum-exp in float32) and skips blocks
wholly in its queries' future (causal). One ``jax.custom_vjp``: the backward sends the K/V blocks
around again with float32 dK/dV accumulators riding along, which arrive back at their owners after
P hops. With ``balance`` the queries are the two half-shards of ``deal`` (each merging its own
statistics); the K/V blocks stay contiguous shards, so a step still waits for the rank with the
most visible pairs in it (at P = 2 the busiest rank's total is unchanged). Packed documents: each
K/V block travels with its document numbers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lasp_jax.softmax.deal import Residuals, SavedPart, Statics, cotangent_parts, join_parts, query_parts
from pallas_kernels.common import acc_dtype


class HeldBlock(NamedTuple):
    """The K/V block a rank holds at one step, with its document numbers (None without documents)."""

    k: jax.Array
    v: jax.Array
    ids: jax.Array | None


def shift(x, axis_name):
    """Send ``x`` (any pytree) from rank r to rank r + 1 (mod P)."""
    n = lax.axis_size(axis_name)
    return lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)])


def held_start(step, length: int, axis_name):
    """Global position of the first key of the block held at ``step``."""
    rank, n = lax.axis_index(axis_name), lax.axis_size(axis_name)
    return ((rank - jnp.asarray(step, rank.dtype) + n) % n) * length  # int32 also under x64


def merge(o, lse, o_blk, lse_blk):
    """Online-softmax merge of two partial results over disjoint key sets (float32 weights)."""
    new = jnp.logaddexp(lse, lse_blk)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    w, w_blk = jnp.exp(lse - safe), jnp.exp(lse_blk - safe)  # [B, H, L]
    return o * w.transpose(0, 2, 1)[..., None] + o_blk * w_blk.transpose(0, 2, 1)[..., None], new


def _if_visible(k_start, q_start, rows: int, fn, carry):
    """``fn(carry)``, or ``carry`` unchanged when the key block is wholly in these query rows' future."""
    return lax.cond(k_start <= q_start + rows - 1, fn, lambda c: c, carry)


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def ring_attention(q, k, v, ids, statics: Statics):
    """Causal attention of this rank's ``[B, L, H, D]`` queries against every rank's K/V block in
    turn; ``ids``: the local document numbers ``[B, L]`` or None."""
    return _ring_fwd(q, k, v, ids, statics)[0]


# ---- forward: merge each held block into every query part's running (o, lse) --------------------


def _ring_fwd(q, k, v, ids, statics: Statics):
    b, _, h, _ = q.shape
    n = lax.axis_size(statics.axis_name)
    acc = acc_dtype(q.dtype)
    plan, parts = query_parts(q, ids, statics.axis_name, statics.balance)
    stats = [
        (jnp.zeros((b, part.q.shape[1], h, v.shape[-1]), acc), jnp.full((b, h, part.q.shape[1]), -jnp.inf, acc))
        for part in parts
    ]
    step = functools.partial(_forward_step, parts=parts, statics=statics)
    held, stats = lax.fori_loop(0, n - 1, step, (HeldBlock(k, v, ids), stats))
    stats = _merge_held(n - 1, held, stats, parts=parts, statics=statics)
    saved = tuple(SavedPart(*part, o.astype(q.dtype), lse) for part, (o, lse) in zip(parts, stats, strict=True))
    return join_parts(plan, [part.o for part in saved], statics.axis_name), Residuals(k, v, ids, saved)


def _forward_step(step, carry, *, parts, statics: Statics):
    held, stats = carry
    following = shift(held, statics.axis_name)  # issued before the compute so the two can overlap
    return following, _merge_held(step, held, stats, parts=parts, statics=statics)


def _merge_held(step, held: HeldBlock, stats, *, parts, statics: Statics):
    """Every query part's (o, lse) with the block held at ``step`` merged in (where visible)."""
    k_start = held_start(step, held.k.shape[1], statics.axis_name)
    out = []
    for part, carry in zip(parts, stats, strict=True):
        fn = functools.partial(_merge_block, part=part, held=held, k_start=k_start, statics=statics)
        out.append(_if_visible(k_start, part.start, part.q.shape[1], fn, carry))
    return out


def _merge_block(carry, *, part, held: HeldBlock, k_start, statics: Statics):
    block_fwd, _ = statics.block_functions()
    o_blk, lse_blk = block_fwd(
        part.q,
        held.k,
        held.v,
        q_start=part.start,
        k_start=k_start,
        scale=statics.scale,
        q_segment_ids=part.ids,
        k_segment_ids=held.ids,
    )
    return merge(*carry, o_blk, lse_blk)


# ---- backward: dq stays, dK/dV accumulators travel with their block ------------------------------


def _ring_bwd(statics: Statics, res: Residuals, do):
    axis = statics.axis_name
    n = lax.axis_size(axis)
    q_dtype = res.parts[0].q.dtype
    acc = acc_dtype(q_dtype)
    plan, dos = cotangent_parts(do, len(res.parts), axis)
    step = functools.partial(_backward_step, parts=res.parts, dos=dos, statics=statics)
    dqs = [jnp.zeros(part.q.shape, acc) for part in res.parts]
    init = (HeldBlock(res.k, res.v, res.ids), dqs, jnp.zeros(res.k.shape, acc), jnp.zeros(res.v.shape, acc))
    held, dqs, dk, dv = lax.fori_loop(0, n - 1, step, init)
    dqs, dk, dv = _add_held(n - 1, held, (dqs, dk, dv), parts=res.parts, dos=dos, statics=statics)
    dk, dv = shift((dk, dv), axis)  # the P-th hop: every accumulator is back at its owner
    dqs = [dq.astype(q_dtype) for dq in dqs]
    return join_parts(plan, dqs, axis), dk.astype(res.k.dtype), dv.astype(res.v.dtype), None


def _backward_step(step, carry, *, parts, dos, statics: Statics):
    held, dqs, dk, dv = carry  # dk, dv: float32 accumulators of the block held
    following = shift(held, statics.axis_name)
    dqs, dk, dv = _add_held(step, held, (dqs, dk, dv), parts=parts, dos=dos, statics=statics)
    return following, dqs, *shift((dk, dv), statics.axis_name)


def _add_held(step, held: HeldBlock, grads, *, parts, dos, statics: Statics):
    """(dqs, dk, dv) with the held block's contribution added for every query part that sees it."""
    dqs, dk, dv = grads
    k_start = held_start(step, held.k.shape[1], statics.axis_name)
    new_dqs = []
    for part, do_part, dq in zip(parts, dos, dqs, strict=True):
        fn = functools.partial(_add_block, part=part, do=do_part, held=held, k_start=k_start, statics=statics)
        dq, dk, dv = _if_visible(k_start, part.start, part.q.shape[1], fn, (dq, dk, dv))
        new_dqs.append(dq)
    return new_dqs, dk, dv


def _add_block(carry, *, part: SavedPart, do, held: HeldBlock, k_start, statics: Statics):
    dq, dk, dv = carry
    _, block_bwd = statics.block_functions()
    dq_b, dk_b, dv_b = block_bwd(
        part.q,
        held.k,
        held.v,
        part.o,
        part.lse,
        do,
        q_start=part.start,
        k_start=k_start,
        scale=statics.scale,
        q_segment_ids=part.ids,
        k_segment_ids=held.ids,
    )
    return dq + dq_b, dk + dk_b, dv + dv_b


ring_attention.defvjp(_ring_fwd, _ring_bwd)
