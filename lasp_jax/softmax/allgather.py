"""LASP-2H: all-gather K and V, attend the local queries to them, reduce-scatter dK and dV.

One ``all_gather`` of the local K and V (grouped KV heads keep it cheap), attention of this
rank's queries (its shard, or the two half-shards of ``deal``) against the gathered sequence with
the causal mask at global positions, and in the backward ``psum_scatter`` of the gathered dK, dV
back to their owners. It is one ``jax.custom_vjp``; the residuals are the *local* K and V, so the
backward gathers K and V once more (the same bytes as the forward gather) instead of keeping the
gathered copy alive between the passes. (When forward and backward sit in one jit program without
remat, XLA may merge the two identical gathers, seen in the compiled HLO of a plain fwd+bwd step;
then the gathered copy does stay alive and nothing is sent twice.)

``dpa_attention`` is the same strategy on ``jax.nn.dot_product_attention`` (cuDNN on a GPU): the
causal mask at global positions (and the document mask) as a dense boolean ``mask``, every key
attended (no block skipping), and a backward that gathers K, V again and recomputes the forward
through the attention function's own VJP.

Packed documents: the key document numbers are gathered with K and V (``local_documents`` numbers
the gathered ids once, so equal numbers mean one document on every rank).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lasp_jax.softmax.deal import (
    Residuals,
    SavedPart,
    Statics,
    cotangent_parts,
    first_position,
    join_parts,
    query_parts,
)
from pallas_kernels.common import acc_dtype
from pallas_kernels.linear_attention.reference import document_index


def gather(x, axis_name):
    """``[B, L, ...]`` shards -> ``[B, P·L, ...]`` on every rank (None and no axis: unchanged)."""
    return x if axis_name is None or x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)


def scatter(x, axis_name):
    """Sum ``[B, P·L, ...]`` over the ranks and keep this rank's ``[B, L, ...]`` (no axis: unchanged)."""
    return x if axis_name is None else lax.psum_scatter(x, axis_name, scatter_dimension=1, tiled=True)


def local_documents(segment_ids, axis_name):
    """This shard's global document numbers ``[B, L]`` (+1 wherever the id changes along the whole
    sequence): the ids of every rank are gathered (``B·T`` int32, small) and numbered once, so equal
    numbers mean one document on every rank."""
    length = segment_ids.shape[1]
    doc = document_index(gather(segment_ids.astype(jnp.int32), axis_name))
    return lax.dynamic_slice_in_dim(doc, first_position(axis_name, length), length, axis=1)


# ---- block compute ("pallas" or "xla") -----------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def allgather_attention(q, k, v, ids, statics: Statics):
    """Causal attention of this rank's ``[B, L, H, D]`` queries against the gathered K and V;
    ``ids``: the local document numbers ``[B, L]`` or None."""
    return _allgather_fwd(q, k, v, ids, statics)[0]


def _allgather_fwd(q, k, v, ids, statics: Statics):
    axis = statics.axis_name
    block_fwd, _ = statics.block_functions()
    k_all, v_all, k_ids = gather(k, axis), gather(v, axis), gather(ids, axis)
    plan, parts = query_parts(q, ids, axis, statics.balance)
    saved = []
    for part in parts:
        o, lse = block_fwd(
            part.q,
            k_all,
            v_all,
            q_start=part.start,
            k_start=0,
            scale=statics.scale,
            q_segment_ids=part.ids,
            k_segment_ids=k_ids,
        )
        saved.append(SavedPart(*part, o.astype(q.dtype), lse))
    return join_parts(plan, [part.o for part in saved], axis), Residuals(k, v, ids, tuple(saved))


def _allgather_bwd(statics: Statics, res: Residuals, do):
    axis = statics.axis_name
    _, block_bwd = statics.block_functions()
    k_all, v_all = gather(res.k, axis), gather(res.v, axis)  # re-gathered: only local K/V were kept
    k_ids = gather(res.ids, axis)
    plan, dos = cotangent_parts(do, len(res.parts), axis)
    dqs, dk, dv = [], 0.0, 0.0
    for part, do_part in zip(res.parts, dos, strict=True):
        dq_p, dk_p, dv_p = block_bwd(
            part.q,
            k_all,
            v_all,
            part.o,
            part.lse,
            do_part,
            q_start=part.start,
            k_start=0,
            scale=statics.scale,
            q_segment_ids=part.ids,
            k_segment_ids=k_ids,
        )
        dqs.append(dq_p.astype(part.q.dtype))
        dk, dv = dk + dk_p, dv + dv_p
    dk, dv = scatter(dk, axis), scatter(dv, axis)
    return join_parts(plan, dqs, axis), dk.astype(res.k.dtype), dv.astype(res.v.dtype), None


allgather_attention.defvjp(_allgather_fwd, _allgather_bwd)


# ---- jax.nn.dot_product_attention (cuDNN on a GPU) ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class DpaStatics:
    """``axis_name`` None: one device; ``implementation``: ``jax.nn.dot_product_attention``'s ("cudnn" or "xla")."""

    axis_name: str | None
    scale: float
    implementation: str


class DpaResiduals(NamedTuple):
    q: jax.Array
    k: jax.Array  # local: gathered again in the backward
    v: jax.Array
    ids: jax.Array | None


def _dpa_local(q, k_all, v_all, ids, k_ids, *, statics: DpaStatics):
    """The local queries against the gathered keys, causal at global positions (and same document)."""
    length, n_keys = q.shape[1], k_all.shape[1]
    q_start = first_position(statics.axis_name, length)
    mask = ((q_start + jnp.arange(length))[:, None] >= jnp.arange(n_keys)[None, :])[None, None]
    if ids is not None:  # [B, 1, L, T]: and the same document
        mask = mask & (ids[:, None, :, None] == k_ids[:, None, None, :])
    return jax.nn.dot_product_attention(
        q, k_all, v_all, mask=mask, scale=statics.scale, implementation=statics.implementation
    )


def _dpa_gathered(q, k, v, ids, statics: DpaStatics):
    axis = statics.axis_name
    return _dpa_local(q, gather(k, axis), gather(v, axis), ids, gather(ids, axis), statics=statics)


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def dpa_attention(q, k, v, ids, statics: DpaStatics):
    """The allgather strategy on ``jax.nn.dot_product_attention`` with a dense global-position mask."""
    return _dpa_gathered(q, k, v, ids, statics)


def _dpa_fwd(q, k, v, ids, statics: DpaStatics):
    return _dpa_gathered(q, k, v, ids, statics), DpaResiduals(q, k, v, ids)


def _dpa_bwd(statics: DpaStatics, res: DpaResiduals, do):
    axis = statics.axis_name
    k_ids = gather(res.ids, axis)
    local = functools.partial(_dpa_local, ids=res.ids, k_ids=k_ids, statics=statics)
    _, vjp = jax.vjp(local, res.q, gather(res.k, axis), gather(res.v, axis))  # recomputes the forward
    dq, dk, dv = vjp(do)
    dk = scatter(dk.astype(acc_dtype(res.k.dtype)), axis)
    dv = scatter(dv.astype(acc_dtype(res.v.dtype)), axis)
    return dq, dk.astype(res.k.dtype), dv.astype(res.v.dtype), None


dpa_attention.defvjp(_dpa_fwd, _dpa_bwd)
