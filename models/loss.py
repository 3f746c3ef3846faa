"""The output head and the next-token loss: products in the compute dtype with float32 accumulation.

``head_logits(x, w)`` is ``x W`` with the ``[d, V]`` head kernel, or ``x Tᵀ`` with the tied
``[V, d]`` embedding table: operands in the compute dtype (bf16), float32 logits. Its
``custom_vjp`` casts the logits' cotangent back to the compute dtype before the two gradient
products (d x and d W), so all three are bf16 GEMMs with float32 accumulation, not TF32 GEMMs on
float32 copies; d W leaves the float32 accumulator in W's own dtype (float32 parameters keep
every bit of it).

``cross_entropy_sum(h, w, targets, weights, chunks=k)`` is ``Σ_t weights_t · (logsumexp(z_t) −
z_t[targets_t])`` with ``z = head_logits(h, w)``, over ``k`` strided chunks of tokens (chunk j:
tokens ``t ≡ j (mod k)``, so every chunk keeps its share of each sequence shard) walked by a
``fori_loop``: one chunk's ``[B, T/k, V]`` logits exist at a time and nothing is concatenated.
The loss is a scalar, so its gradient is linear in the one incoming cotangent: under
differentiation the forward pass computes the unscaled gradients chunk by chunk (``softmax −
one-hot``, weighted, cast to the compute dtype, then the two products) and the backward pass only
scales them, so no logits are stored or recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
Array = jax.Array


def logits_product(x: Array, w: Array, *, tied: bool) -> Array:
    """``x W`` (``[d, V]`` kernel) or ``x Wᵀ`` (``tied``: ``[V, d]`` table), float32 accumulation."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (1 if tied else 0,)), ((), ())), preferred_element_type=F32)


def input_grad(dlogits: Array, w: Array, *, tied: bool) -> Array:
    """``dz Wᵀ`` (or ``dz W`` for the table): the cotangent of x, float32."""
    dims = (((dlogits.ndim - 1,), (0 if tied else 1,)), ((), ()))
    return lax.dot_general(dlogits, w, dims, preferred_element_type=F32)


def weight_grad(x: Array, dlogits: Array, *, tied: bool) -> Array:
    """``xᵀ dz`` ``[d, V]`` (or ``dzᵀ x`` ``[V, d]`` for the table) summed over every token, float32."""
    lead = tuple(range(x.ndim - 1))
    a, b = (dlogits, x) if tied else (x, dlogits)
    return lax.dot_general(a, b, ((lead, lead), ((), ())), preferred_element_type=F32)


@dataclasses.dataclass(frozen=True)
class HeadStatics:
    """Static arguments of the head's ``custom_vjp``s.

    Attributes:
      tied: w is the ``[V, d]`` embedding table (else the ``[d, V]`` head kernel).
      dtype: the compute dtype, of x and of the products' operands.
      weight_dtype: w's dtype (its gradient's).
      chunks: strided token chunks of the loss (``cross_entropy_sum`` only).
    """

    tied: bool
    dtype: Any
    weight_dtype: Any
    chunks: int = 1


class HeadResiduals(NamedTuple):
    x: Array
    w: Array


class LossResiduals(NamedTuple):
    """The loss's gradients for a unit cotangent: d h ``[B, T/k, k, d]`` and d W (float32)."""

    dh: Array
    dw: Array


def _statics(w, *, tied, dtype, chunks=1) -> HeadStatics:
    return HeadStatics(tied=tied, dtype=jnp.dtype(dtype), weight_dtype=w.dtype, chunks=chunks)


def head_logits(x: Array, w: Array, *, tied: bool, dtype) -> Array:
    """float32 logits ``[..., V]`` of hidden states ``x [..., d]``: products in ``dtype`` (see the module)."""
    return _head(x.astype(dtype), w, _statics(w, tied=tied, dtype=dtype))


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def _head(x, w, statics: HeadStatics):
    return logits_product(x, w.astype(statics.dtype), tied=statics.tied)


def _head_fwd(x, w, statics: HeadStatics):
    return _head(x, w, statics), HeadResiduals(x, w)


def _head_bwd(statics: HeadStatics, res: HeadResiduals, dlogits):
    dz = dlogits.astype(statics.dtype)  # the products run on bf16 operands, not float32 copies
    dx = input_grad(dz, res.w.astype(statics.dtype), tied=statics.tied)
    dw = weight_grad(res.x, dz, tied=statics.tied)
    return dx.astype(res.x.dtype), dw.astype(statics.weight_dtype)


_head.defvjp(_head_fwd, _head_bwd)


def cross_entropy_sum(h: Array, w: Array, targets: Array, weights: Array, *, tied: bool, dtype, chunks: int = 1):
    """``Σ_t weights_t · (logsumexp(z_t) − z_t[targets_t])``, ``z = head_logits(h, w)``, float32 scalar.

    h ``[B, T, d]``; targets ``[B, T]`` int in ``[0, V)``; weights ``[B, T]`` (0 leaves a token
    out); ``chunks`` must divide T. Differentiable in h and w (see the module).
    """
    t = h.shape[1]
    if chunks < 1 or t % chunks:
        raise ValueError(f"seq_len={t} must be a multiple of loss_chunks={chunks}")
    statics = _statics(w, tied=tied, dtype=dtype, chunks=chunks)
    return _cross_entropy(h.astype(dtype), w, targets, weights.astype(F32), statics)


def _strided(x, k):
    """``[B, T, ...] -> [B, T/k, k, ...]``: chunk j is index j of axis 2 (a view, no copy)."""
    return x.reshape(x.shape[0], x.shape[1] // k, k, *x.shape[2:])


def _chunk_loss(h, w, y, weight, *, tied: bool, with_grads: bool):
    """One chunk's loss sum, and (``with_grads``) its unit-cotangent d h (in h's dtype) and d W (float32)."""
    z = logits_product(h, w, tied=tied)
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    hit = lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == y[..., None]
    picked = jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
    loss = jnp.sum((lse[..., 0] - picked) * weight)
    if not with_grads:
        return loss
    p = jnp.exp(z - lse)
    dz = (jnp.where(hit, p - 1.0, p) * weight[..., None]).astype(h.dtype)
    return loss, input_grad(dz, w, tied=tied).astype(h.dtype), weight_grad(h, dz, tied=tied)


def _loss_loop(h, w, targets, weights, statics: HeadStatics, *, with_grads: bool):
    k = statics.chunks
    hs, ys, ws = (_strided(x, k) for x in (h, targets, weights))
    wc = w.astype(statics.dtype)

    def chunk(j):
        hc, y, weight = (lax.dynamic_index_in_dim(x, j, axis=2, keepdims=False) for x in (hs, ys, ws))
        return _chunk_loss(hc, wc, y, weight, tied=statics.tied, with_grads=with_grads)

    if not with_grads:
        return lax.fori_loop(0, k, lambda j, total: total + chunk(j), jnp.zeros((), F32))

    def body(j, carry):
        total, dh, dw = carry
        loss, dh_j, dw_j = chunk(j)
        return total + loss, lax.dynamic_update_index_in_dim(dh, dh_j, j, axis=2), dw + dw_j

    init = (jnp.zeros((), F32), jnp.zeros_like(hs), jnp.zeros(w.shape, F32))
    return lax.fori_loop(0, k, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def _cross_entropy(h, w, targets, weights, statics: HeadStatics):
    return _loss_loop(h, w, targets, weights, statics, with_grads=False)


def _cross_entropy_fwd(h, w, targets, weights, statics: HeadStatics):
    total, dh, dw = _loss_loop(h, w, targets, weights, statics, with_grads=True)
    return total, LossResiduals(dh, dw)


def _cross_entropy_bwd(statics: HeadStatics, res: LossResiduals, g):
    dh = (g * res.dh.astype(F32)).astype(res.dh.dtype)
    dh = dh.reshape(dh.shape[0], -1, *dh.shape[3:])
    return dh, (g * res.dw).astype(statics.weight_dtype), None, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
