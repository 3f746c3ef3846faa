"""The queries (and keys) a rank computes with: its own shard, or two half-shards dealt for causal load balance.

Contiguous shards leave the last rank (2P − 1)/P² of all causal (query, key) pairs (¾ at P = 2).
With ``balance`` the sequence is seen as 2P half-shards ("chunks") and rank r computes the queries
of chunks r and 2P − 1 − r: every rank then attends 2P chunk pairs. Two ``ppermute``s deal each
rank's halves to the ranks that compute them, and the outputs go back the same way (dO out and dq
back in the backward); the layout the caller and the linear layers see stays contiguous. Only
queries, outputs and their cotangents move for allgather and the plain ring (K and V are gathered
or passed as whole shards anyway). The zig-zag ring and tokenring deal K and V the same way
(``Statics.deal_keys``), so that every step of their rings pairs two chunks of each side: at step s
≥ 1 rank r's chunks {r, 2P − 1 − r} meet the other side's {r', 2P − 1 − r'} (r' ≠ r) in exactly two
visible, unmasked chunk pairs on every rank, and step 0 in two chunk pairs' worth (two diagonal
halves and one full pair).

Also here, being what the strategies share: their ``custom_vjp`` statics, the query and key parts,
the residuals (the local — or dealt — K/V and, per query part, what ``SavedPart`` holds), the ring
shift and the online-softmax merge.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention import block_functions


def first_position(axis_name, length: int):
    """Global position of the first token of this rank's ``length``-token shard (0 without an axis)."""
    return 0 if axis_name is None else lax.axis_index(axis_name) * length


@dataclasses.dataclass(frozen=True)
class Deal:
    """Causal load balancing (both strategies): the sequence as 2P half-shards ("chunks"),
    chunk c computed on rank ``c`` if ``c < P`` else ``2P − 1 − c``, so rank r attends the queries of
    chunks r and 2P − 1 − r: (r + ½) + (2P − 1 − r + ½) = 2P chunk pairs on every rank, where
    contiguous shards give rank r (2r + 1)·2 (the last rank (2P − 1)/P² of all pairs, ¾ at P = 2).

    Rank r holds chunks 2r ("lo") and 2r + 1 ("hi"); ``to_lo`` / ``to_hi`` send them to the ranks that
    compute them (each a permutation: every rank receives one even and one odd chunk); ``c_lo`` /
    ``c_hi`` are the (traced) indices of the even / odd chunk this rank computes.
    """

    to_lo: tuple
    to_hi: tuple
    c_lo: jax.Array
    c_hi: jax.Array

    @staticmethod
    def of(axis_name) -> Deal:
        n = lax.axis_size(axis_name)
        c_lo, c_hi = dealt_chunks(lax.axis_index(axis_name), n)
        return Deal(
            to_lo=tuple((r, _chunk_owner(2 * r, n)) for r in range(n)),
            to_hi=tuple((r, _chunk_owner(2 * r + 1, n)) for r in range(n)),
            c_lo=c_lo,
            c_hi=c_hi,
        )

    def deal(self, x, axis_name):
        """Local ``[B, L, ...]`` (chunks 2r, 2r + 1) -> the two halves this rank computes."""
        half = x.shape[1] // 2
        return (
            lax.ppermute(x[:, :half], axis_name, self.to_lo),
            lax.ppermute(x[:, half:], axis_name, self.to_hi),
        )

    def undeal(self, xa, xb, axis_name):
        """The inverse of ``deal``: computed halves back to their owners, ``[B, L, ...]``."""
        back = [tuple((t, s) for s, t in perm) for perm in (self.to_lo, self.to_hi)]
        return jnp.concatenate([lax.ppermute(xa, axis_name, back[0]), lax.ppermute(xb, axis_name, back[1])], axis=1)


def dealt_chunks(rank, n: int):
    """(even, odd) half-shard indices that ``rank`` (traced) of ``n`` computes: ``r`` and ``2n − 1 − r``."""
    even = rank % 2 == 0
    return jnp.where(even, rank, 2 * n - 1 - rank), jnp.where(even, 2 * n - 1 - rank, rank)


def part_starts(rank, length: int, n: int, dealt: bool) -> list:
    """Global first positions of the parts of ``rank``'s ``length``-row block: ``[rank·length]``
    (contiguous), or the two dealt halves' ``[c_lo·length/2, c_hi·length/2]``."""
    if not dealt:
        return [rank * length]
    return [c * (length // 2) for c in dealt_chunks(rank, n)]


def _chunk_owner(chunk: int, n: int) -> int:
    """The rank that computes half-shard ``chunk`` of ``2n``."""
    return chunk if chunk < n else 2 * n - 1 - chunk


@dataclasses.dataclass(frozen=True)
class Statics:
    """The static arguments of either strategy's ``custom_vjp`` (``allgather_attention``,
    ``ring_attention``): the sequence axis, the logit scale, the block compute (``impl`` "pallas",
    "cudnn_blocks" or "xla", ``block`` for the jnp recurrence), whether the queries are dealt (``balance``, where the
    local length is even and there is more than one rank) and whether K/V are dealt with them
    (``deal_keys``: the zig-zag ring and balanced tokenring)."""

    axis_name: str
    scale: float
    impl: str
    block: int
    balance: bool
    deal_keys: bool = False

    def block_functions(self):
        """(fwd, bwd) of one block pair (``pallas_kernels.flash_attention.block_functions``)."""
        # segment ids reach the blocks as global document numbers: non-decreasing
        return block_functions(self.impl, block=self.block, documents_sorted=True)


class QueryPart(NamedTuple):
    """Queries one rank computes: q ``[B, Lp, H, D]``, their document numbers ``[B, Lp]`` (or None)
    and the global position of the first one."""

    q: jax.Array
    ids: jax.Array | None
    start: jax.Array | int


class SavedPart(NamedTuple):
    """A query part with its final output (q's dtype) and float32 log-sum-exp ``[B, H, Lp]``."""

    q: jax.Array
    ids: jax.Array | None
    start: jax.Array | int
    o: jax.Array
    lse: jax.Array


class Residuals(NamedTuple):
    """What the strategies keep for the backward: the *local* K, V and document numbers (not the
    gathered or passed ones; dealt ones with ``Statics.deal_keys``) and every query part."""

    k: jax.Array
    v: jax.Array
    ids: jax.Array | None
    parts: tuple[SavedPart, ...]


def query_parts(q, ids, axis_name, balance: bool) -> tuple[Deal | None, list[QueryPart]]:
    """The query blocks this rank computes, ``(plan, parts)``: its own shard, or with ``balance``
    (an even local length, more than one rank) the two half-shards ``Deal`` gives it (``plan``
    None when not dealt)."""
    if not (balance and lax.axis_size(axis_name) > 1 and q.shape[1] % 2 == 0):
        return None, [QueryPart(q, ids, first_position(axis_name, q.shape[1]))]
    plan, half = Deal.of(axis_name), q.shape[1] // 2
    qa, qb = plan.deal(q, axis_name)
    ida, idb = plan.deal(ids, axis_name) if ids is not None else (None, None)
    return plan, [QueryPart(qa, ida, plan.c_lo * half), QueryPart(qb, idb, plan.c_hi * half)]


def cotangent_parts(do, n_parts: int, axis_name) -> tuple[Deal | None, list[jax.Array]]:
    """dO split like the queries (``n_parts`` of ``query_parts``): ``(plan, [dO parts])``."""
    if n_parts == 1:
        return None, [do]
    plan = Deal.of(axis_name)
    return plan, list(plan.deal(do, axis_name))


def join_parts(plan: Deal | None, parts, axis_name):
    """Per-part results (outputs or dq) back in this rank's contiguous layout."""
    return parts[0] if plan is None else plan.undeal(*parts, axis_name)


# ---- key parts: a rank's K/V block as one contiguous part or two dealt halves -----------------


class KeyPart(NamedTuple):
    """Keys ``[B, Lp, Hk, D]``, values, their document numbers (or None) and the first key's position."""

    k: jax.Array
    v: jax.Array
    ids: jax.Array | None
    start: jax.Array | int


def deal_keys(k, v, ids, axis_name):
    """The local K, V, ids ``[B, L, ...]`` -> the two dealt halves this rank keeps, joined ``[B, L, ...]``
    (chunk ``c_lo`` then ``c_hi``)."""
    plan = Deal.of(axis_name)
    join = lambda x: None if x is None else jnp.concatenate(plan.deal(x, axis_name), axis=1)  # noqa: E731
    return join(k), join(v), join(ids)


def key_parts(k, v, ids, starts) -> list[KeyPart]:
    """A ``[B, L, ...]`` K/V block cut into ``len(starts)`` equal parts starting at ``starts``."""
    size = k.shape[1] // len(starts)
    cut = lambda x, i: None if x is None else x[:, i * size : (i + 1) * size]  # noqa: E731
    return [KeyPart(cut(k, i), cut(v, i), cut(ids, i), start) for i, start in enumerate(starts)]


def keys_dealt(statics: Statics, n_query_parts: int) -> bool:
    """Whether this call's K/V are dealt: with ``deal_keys``, exactly when the queries are."""
    return statics.deal_keys and n_query_parts == 2


# ---- ring communication and the online-softmax merge ----------------------------------------


def shift(x, axis_name, hops: int = 1):
    """Send ``x`` (any pytree) from rank r to rank r + ``hops`` (mod P; negative: backwards)."""
    n = lax.axis_size(axis_name)
    return lax.ppermute(x, axis_name, [(i, (i + hops) % n) for i in range(n)])


def source_rank(step, axis_name):
    """The rank whose block this rank holds after ``step`` hops of ``shift`` (traced)."""
    rank, n = lax.axis_index(axis_name), lax.axis_size(axis_name)
    return (rank - jnp.asarray(step, rank.dtype) + n) % n  # int32 also under x64


def merge(o, lse, o_blk, lse_blk):
    """Online-softmax merge of two partial results over disjoint key sets (float32 weights)."""
    new = jnp.logaddexp(lse, lse_blk)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    w, w_blk = jnp.exp(lse - safe), jnp.exp(lse_blk - safe)  # [B, H, L]
    return o * w.transpose(0, 2, 1)[..., None] + o_blk * w_blk.transpose(0, 2, 1)[..., None], new


def if_visible(k_start, q_start, rows: int, fn, carry):
    """``fn(carry)``, or ``carry`` unchanged when the key part is wholly in these query rows' future."""
    return lax.cond(k_start <= q_start + rows - 1, fn, lambda c: c, carry)


# ---- queries against key parts: blocks merged into (o, lse), or their gradients added ----------


def merge_key_parts(carry, *, q, ids, q_start, keys: list[KeyPart], statics: Statics):
    """The running ``(o, lse)`` of queries ``q`` at ``q_start`` with every key part they see merged in."""
    for key in keys:
        fn = functools.partial(_merge_block, q=q, ids=ids, q_start=q_start, key=key, statics=statics)
        carry = if_visible(key.start, q_start, q.shape[1], fn, carry)
    return carry


def add_key_parts(dq, dks, dvs, *, q, ids, o, lse, do, q_start, keys: list[KeyPart], statics: Statics):
    """``(dq, dks, dvs)`` with the contribution of every key part the queries see added (``dks``,
    ``dvs``: one accumulator per key part), given the queries' *final* o and lse."""
    dks, dvs = list(dks), list(dvs)
    for i, key in enumerate(keys):
        fn = functools.partial(_add_block, q=q, ids=ids, o=o, lse=lse, do=do, q_start=q_start, key=key, statics=statics)
        dq, dks[i], dvs[i] = if_visible(key.start, q_start, q.shape[1], fn, (dq, dks[i], dvs[i]))
    return dq, dks, dvs


def _merge_block(carry, *, q, ids, q_start, key: KeyPart, statics: Statics):
    """The running ``(o, lse)`` of queries ``q`` at ``q_start`` with the key part's block merged in."""
    block_fwd, _ = statics.block_functions()
    kw = dict(q_start=q_start, k_start=key.start, scale=statics.scale, q_segment_ids=ids, k_segment_ids=key.ids)
    o_blk, lse_blk = block_fwd(q, key.k, key.v, **kw)
    return merge(*carry, o_blk, lse_blk)


def _add_block(carry, *, q, ids, o, lse, do, q_start, key: KeyPart, statics: Statics):
    """``(dq, dk, dv)`` with the key part's block contribution added, given the queries' *final* o, lse."""
    dq, dk, dv = carry
    _, block_bwd = statics.block_functions()
    dq_b, dk_b, dv_b = block_bwd(
        q,
        key.k,
        key.v,
        o,
        lse,
        do,
        q_start=q_start,
        k_start=key.start,
        scale=statics.scale,
        q_segment_ids=ids,
        k_segment_ids=key.ids,
    )
    return dq + dq_b, dk + dk_b, dv + dv_b
