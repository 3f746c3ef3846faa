"""Token-wise pieces of a block that stay lean at long sequence lengths (issue 20: a million tokens).

``rms_normalize(x, scale, bias, eps=, center=)`` is the block norms' math (``models.layers.Norm``):

    x̂ = (x − μ) · rsqrt(mean((x − μ)²) + eps)       (μ = mean(x) with ``center``, LayerNorm; else 0)
    y = x̂ · scale + bias                           (each optional), in x's dtype, computed in float32

as a ``custom_vjp`` whose residuals are x itself (the compute dtype) and the per-token float32
``rsqrt`` (and μ) ``[..., 1]``. Autodiff of the plain float32 expression keeps a float32 copy of
x ``[T, d]`` (and sums float32 cotangents of that size) for the backward: 8 GiB per norm at a
million tokens of d = 2048. The backward here re-forms x̂ inside its elementwise expressions:

    g = dy · scale,    dx = rsqrt · (g − mean(g) − x̂ · mean(g · x̂))      (mean(g) only with ``center``)
    d scale = Σ_tokens dy · x̂,    d bias = Σ_tokens dy

``map_token_chunks(fn, x, chunk, strided=)`` runs a token-wise ``fn`` (``[B, t, d] → [B, t, d']``,
every token on its own: the MLP) over chunks of ``chunk`` tokens, each chunk a ``jax.checkpoint``
under one ``lax.map``: the forward keeps nothing per chunk and the backward recomputes one chunk at a
time, so the ``[T, ffn]`` activations of an MLP never exist at once. The value and the gradients are
those of ``fn(x)``: the same products on the same tokens. Chunks are contiguous runs of tokens (for
one row a reshape, no copy) or, with ``strided`` (a sequence sharded over devices), chunk j holds
tokens ``t ≡ j (mod k)``, so each chunk keeps its share of every shard (as the chunked loss of
``models.loss``) at the price of transposing ``x`` and the output.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class NormStatics:
    """Static arguments of ``rms_normalize``'s ``custom_vjp``: the epsilon, and LayerNorm's centring."""

    eps: float
    center: bool


class NormResiduals(NamedTuple):
    x: Array  # the input, in its own (compute) dtype
    inv_rms: Array  # float32 [..., 1]
    mean: Array | None  # float32 [..., 1] with ``center``, else None
    scale: Array | None
    bias: Array | None


def rms_normalize(
    x: Array, scale: Array | None = None, bias: Array | None = None, *, eps: float, center: bool = False
) -> Array:
    """``x̂ · scale + bias`` of the module docstring, in x's dtype; ``scale``/``bias`` ``[d]`` or None."""
    return _normalize(x, scale, bias, NormStatics(eps=float(eps), center=bool(center)))


def _moments(x: Array, statics: NormStatics) -> tuple[Array | None, Array]:
    """μ (or None) and rsqrt(mean((x − μ)²) + eps), float32 ``[..., 1]``."""
    xf = x.astype(F32)
    mean = jnp.mean(xf, axis=-1, keepdims=True) if statics.center else None
    xc = xf if mean is None else xf - mean
    return mean, jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + statics.eps)


def _normalized(x: Array, mean: Array | None, inv_rms: Array) -> Array:
    """x̂ in float32 (an elementwise expression of x: fused into its consumers, never a [T, d] buffer)."""
    xf = x.astype(F32)
    return (xf if mean is None else xf - mean) * inv_rms


def _affine(xhat: Array, scale: Array | None, bias: Array | None) -> Array:
    y = xhat if scale is None else xhat * scale.astype(F32)
    return y if bias is None else y + bias.astype(F32)


@functools.partial(jax.custom_vjp, nondiff_argnames=("statics",))
def _normalize(x, scale, bias, statics: NormStatics):
    mean, inv_rms = _moments(x, statics)
    return _affine(_normalized(x, mean, inv_rms), scale, bias).astype(x.dtype)


def _normalize_fwd(x, scale, bias, statics: NormStatics):
    mean, inv_rms = _moments(x, statics)
    y = _affine(_normalized(x, mean, inv_rms), scale, bias).astype(x.dtype)
    return y, NormResiduals(x, inv_rms, mean, scale, bias)


def _sum_tokens(a: Array, like: Array) -> Array:
    """``a [..., d]`` summed over every leading axis, in ``like``'s dtype (a parameter's gradient)."""
    return jnp.sum(a, axis=tuple(range(a.ndim - 1))).astype(like.dtype)


def _normalize_bwd(statics: NormStatics, res: NormResiduals, dy):
    dyf = dy.astype(F32)
    xhat = _normalized(res.x, res.mean, res.inv_rms)
    g = dyf if res.scale is None else dyf * res.scale.astype(F32)
    inner = g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    if statics.center:
        inner = inner - jnp.mean(g, axis=-1, keepdims=True)
    dx = (res.inv_rms * inner).astype(res.x.dtype)
    dscale = None if res.scale is None else _sum_tokens(dyf * xhat, res.scale)
    dbias = None if res.bias is None else _sum_tokens(dyf, res.bias)
    return dx, dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def map_token_chunks(fn: Callable[[Array], Array], x: Array, chunk: int, *, strided: bool = False) -> Array:
    """``fn(x)`` for a token-wise ``fn``, run over chunks of ``chunk`` tokens (see the module).

    x ``[B, T, ...]``. ``chunk <= 0`` or ``T <= chunk``: ``fn(x)`` as it is. Otherwise the fewest
    equal chunks of at most ``chunk`` tokens: k chunks for the smallest divisor k of T with
    ``T / k <= chunk`` (a T with few divisors gets smaller chunks; powers of two get exactly ``chunk``).
    """
    b, t = x.shape[:2]
    if chunk <= 0 or t <= chunk:
        return fn(x)
    k = next(k for k in range(-(-t // chunk), t + 1) if t % k == 0)
    # [B, T, ...] -> [k, B, T/k, ...]; chunk j: tokens [j·T/k, (j+1)·T/k), or tokens j, j + k, ... (strided)
    split, axis = ((t // k, k), 2) if strided else ((k, t // k), 1)
    chunks = jnp.moveaxis(x.reshape(b, *split, *x.shape[2:]), axis, 0)
    ys = jax.lax.map(jax.checkpoint(fn, prevent_cse=False), chunks)  # under a scan no CSE barrier is needed
    return jnp.moveaxis(ys, 0, axis).reshape(b, t, *ys.shape[3:])
