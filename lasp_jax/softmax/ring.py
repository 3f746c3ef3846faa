"""RingAttention (Liu et al. 2023): K/V blocks travel rank r → r+1, dK/dV accumulators travel with them.

At step s rank r holds the K/V block of rank (r − s) mod P; steps 0..P−2 run in a loop whose body
sends the held block on while it computes with it, step P−1 follows the loop (no send). Each rank
merges block results with the online softmax (running log-sum-exp in float32) and skips blocks
wholly in its queries' future (causal). One ``jax.custom_vjp``: the backward sends the K/V blocks
around again with float32 dK/dV accumulators riding along, which arrive back at their owners after
P hops. Packed documents: each K/V block travels with its document numbers.

Two layouts of the ring (``strategy`` in ``lasp_jax.softmax.api``):

- ``"ring"``: K/V blocks are the contiguous shards. With ``balance`` the queries are the two
  half-shards of ``deal`` (each merging its own statistics), but a step still waits for the rank
  with the most visible pairs in it (at P = 2 the busiest rank's total is unchanged).
- ``"zigzag_ring"`` (``Statics.deal_keys``): K/V are dealt like the queries before the ring starts,
  so the block a rank holds is two half-shards ``{r', 2P − 1 − r'}`` and every step gives every
  rank the same work (two chunk pairs, ``deal``); each (query half, key half) pair is merged on its
  own, skipped when wholly in the future. The dK/dV accumulators end at the rank that dealt the
  keys and are dealt back to their owners.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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
    merge_key_parts,
    part_starts,
    query_parts,
    shift,
    source_rank,
)
from pallas_kernels.common import acc_dtype


class HeldBlock(NamedTuple):
    """The K/V block a rank holds at one step, with its document numbers (None without documents)."""

    k: jax.Array
    v: jax.Array
    ids: jax.Array | None


def held_parts(step, held: HeldBlock, dealt: bool, axis_name):
    """The key parts of the block held at ``step``: one contiguous shard, or two dealt halves in
    ascending chunk order (``ascending``)."""
    src = source_rank(step, axis_name)
    starts = part_starts(src, held.k.shape[1], lax.axis_size(axis_name), dealt)
    parts = key_parts(*held, starts)
    return ascending(parts, src) if dealt else parts


def ascending(parts, rank):
    """Two dealt parts of ``rank`` (traced) in ascending chunk order: the deal gives odd ranks their
    later chunk first (``dealt_chunks``), so the same program slot would hold a full chunk pair on
    one rank and a skipped one on the next, and each ring step's hand-over would wait for the
    slower rank (2×H200: ~30 ms per step of the zig-zag ring). The swap is its own inverse."""
    odd = rank % 2 == 1
    first, second = parts
    pick = lambda x, y: jnp.where(odd, y, x)  # noqa: E731
    return [jax.tree.map(pick, first, second), jax.tree.map(pick, second, first)]


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def ring_attention(q, k, v, ids, statics: Statics):
    """Causal attention of this rank's ``[B, L, H, D]`` queries against every rank's K/V block in
    turn; ``ids``: the local document numbers ``[B, L]`` or None."""
    return _ring_fwd(q, k, v, ids, statics)[0]


# ---- forward: merge each held block into every query part's running (o, lse) --------------------


def _ring_fwd(q, k, v, ids, statics: Statics):
    b, _, h, _ = q.shape
    axis = statics.axis_name
    n = lax.axis_size(axis)
    acc = acc_dtype(q.dtype)
    plan, parts = query_parts(q, ids, axis, statics.balance)
    dealt = keys_dealt(statics, len(parts))
    if dealt:
        k, v, ids = deal_keys(k, v, ids, axis)
        parts = ascending(parts, lax.axis_index(axis))
    stats = [
        (jnp.zeros((b, part.q.shape[1], h, v.shape[-1]), acc), jnp.full((b, h, part.q.shape[1]), -jnp.inf, acc))
        for part in parts
    ]
    step = functools.partial(_forward_step, parts=parts, dealt=dealt, statics=statics)
    held, stats = lax.fori_loop(0, n - 1, step, (HeldBlock(k, v, ids), stats))
    stats = _merge_held(n - 1, held, stats, parts=parts, dealt=dealt, statics=statics)
    saved = tuple(SavedPart(*part, o.astype(q.dtype), lse) for part, (o, lse) in zip(parts, stats, strict=True))
    outs = [part.o for part in saved]
    if dealt:  # back in the deal's order (the residuals keep the ascending one)
        outs = ascending(outs, lax.axis_index(axis))
    return join_parts(plan, outs, axis), Residuals(k, v, ids, saved)


def _forward_step(step, carry, *, parts, dealt: bool, statics: Statics):
    held, stats = carry
    following = shift(held, statics.axis_name)  # issued before the compute so the two can overlap
    return following, _merge_held(step, held, stats, parts=parts, dealt=dealt, statics=statics)


def _merge_held(step, held: HeldBlock, stats, *, parts, dealt: bool, statics: Statics):
    """Every query part's (o, lse) with the block held at ``step`` merged in (where visible)."""
    keys = held_parts(step, held, dealt, statics.axis_name)
    out = []
    for part, carry in zip(parts, stats, strict=True):
        out.append(merge_key_parts(carry, q=part.q, ids=part.ids, q_start=part.start, keys=keys, statics=statics))
    return out


# ---- backward: dq stays, dK/dV accumulators travel with their block ------------------------------


def _ring_bwd(statics: Statics, res: Residuals, do):
    axis = statics.axis_name
    n = lax.axis_size(axis)
    q_dtype = res.parts[0].q.dtype
    acc = acc_dtype(q_dtype)
    dealt = keys_dealt(statics, len(res.parts))
    plan, dos = cotangent_parts(do, len(res.parts), axis)
    if dealt:  # the saved query parts are in ascending chunk order
        dos = ascending(dos, lax.axis_index(axis))
    step = functools.partial(_backward_step, parts=res.parts, dos=dos, dealt=dealt, statics=statics)
    dqs = [jnp.zeros(part.q.shape, acc) for part in res.parts]
    shapes = key_parts(res.k, res.v, None, [0] * (2 if dealt else 1))  # only the part shapes are used
    dks, dvs = [jnp.zeros(key.k.shape, acc) for key in shapes], [jnp.zeros(key.v.shape, acc) for key in shapes]
    held, dqs, dks, dvs = lax.fori_loop(0, n - 1, step, (HeldBlock(res.k, res.v, res.ids), dqs, dks, dvs))
    dqs, dks, dvs = _add_held(n - 1, held, (dqs, dks, dvs), parts=res.parts, dos=dos, dealt=dealt, statics=statics)
    dks, dvs = shift((dks, dvs), axis)  # the P-th hop: every accumulator is back where its block started
    key_plan = plan if dealt else None  # dealt keys: their gradients dealt back to the owners
    dk, dv = join_parts(key_plan, dks, axis), join_parts(key_plan, dvs, axis)
    dqs = [dq.astype(q_dtype) for dq in dqs]
    if dealt:
        dqs = ascending(dqs, lax.axis_index(axis))
    return join_parts(plan, dqs, axis), dk.astype(res.k.dtype), dv.astype(res.v.dtype), None


def _backward_step(step, carry, *, parts, dos, dealt: bool, statics: Statics):
    held, dqs, dks, dvs = carry  # dks, dvs: float32 accumulators of the block held, per key part
    following = shift(held, statics.axis_name)
    dqs, dks, dvs = _add_held(step, held, (dqs, dks, dvs), parts=parts, dos=dos, dealt=dealt, statics=statics)
    return following, dqs, *shift((dks, dvs), statics.axis_name)


def _add_held(step, held: HeldBlock, grads, *, parts, dos, dealt: bool, statics: Statics):
    """(dqs, dks, dvs) with the held block's contribution added for every query part that sees it."""
    dqs, dks, dvs = grads
    keys = held_parts(step, held, dealt, statics.axis_name)
    src = source_rank(step, statics.axis_name)
    if dealt:  # the accumulators travel in the held block's order; the key parts are ascending
        dks, dvs = ascending(dks, src), ascending(dvs, src)
    new_dqs = []
    for part, do_part, dq in zip(parts, dos, dqs, strict=True):
        saved = dict(q=part.q, ids=part.ids, o=part.o, lse=part.lse, q_start=part.start)
        dq, dks, dvs = add_key_parts(dq, dks, dvs, **saved, do=do_part, keys=keys, statics=statics)
        new_dqs.append(dq)
    if dealt:
        dks, dvs = ascending(dks, src), ascending(dvs, src)
    return new_dqs, dks, dvs


ring_attention.defvjp(_ring_fwd, _ring_bwd)
