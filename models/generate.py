"""Generation: prefill with the chunked (sequence-parallel) op, then O(1)-memory token-by-token decode.

``generate`` runs the largest prefix of the prompt that the sequence axis divides through
``LanguageModel.prefill`` (``lasp_attention`` with the mesh in ``ctx``), feeds the remaining prompt
tokens through the recurrence, then samples new tokens. Each linear layer carries one float32 state
``[B, H, D', E']`` whatever the length (a delta-rule layer also its last ``W − 1`` short-convolution
inputs), so memory per generated token is constant; each softmax
layer of a hybrid model carries a key/value cache sized for the prompt plus the new tokens.

``lasp-generate`` (``models.cli``) samples from a checkpoint written by ``lasp-train``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import SINGLE_DEVICE, LaspContext
from models.model import LanguageModel


def _sample(logits, key, temperature: float, top_k: int | None):
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _feed(model: LanguageModel, states, tokens, start):
    """Teacher-forced recurrence over tokens ``[B, R]`` from global position ``start``: all logits, states."""

    def body(carry, xs):
        states, pos = carry
        logits, states = model.decode_step(xs, states, pos)
        return (states, pos + 1), logits

    (states, _), logits = jax.lax.scan(body, (states, start), jnp.moveaxis(tokens, 1, 0))
    return jnp.moveaxis(logits, 0, 1), states


def _decode(model: LanguageModel, states, logits, start, key, *, n: int, temperature: float, top_k: int | None):
    """Sample n tokens, each from the previous step's logits; returns tokens ``[B, n]`` and their logits."""

    def body(carry, key):
        states, logits, pos = carry
        token = _sample(logits, key, temperature, top_k)
        next_logits, states = model.decode_step(token, states, pos)
        return (states, next_logits, pos + 1), (token, logits)

    _, (tokens, used) = jax.lax.scan(body, (states, logits, start), jax.random.split(key, n))
    return jnp.moveaxis(tokens, 0, 1), jnp.moveaxis(used, 0, 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "ctx", "cache_size"))
def _prefill(params, tokens, *, graphdef, ctx, cache_size):
    return nnx.merge(graphdef, params).prefill(tokens, ctx, cache_size=cache_size)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _feed_jit(params, states, tokens, start, *, graphdef):
    return _feed(nnx.merge(graphdef, params), states, tokens, start)


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "temperature", "top_k"))
def _decode_jit(params, states, logits, start, key, *, graphdef, n, temperature, top_k):
    return _decode(nnx.merge(graphdef, params), states, logits, start, key, n=n, temperature=temperature, top_k=top_k)


def _sampling_args(max_new_tokens, temperature, top_k, vocab: int) -> tuple[int, float, int | None]:
    """The sampling arguments checked: an int ``max_new_tokens >= 0``, a finite ``temperature >= 0``,
    ``top_k`` None or an int >= 0 (0: off), at most the vocabulary (a larger one is all of it)."""
    try:
        max_new_tokens = operator.index(max_new_tokens)
        top_k = None if top_k is None else operator.index(top_k)
    except TypeError:
        raise TypeError(f"max_new_tokens and top_k must be integers, got {max_new_tokens=}, {top_k=}") from None
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got temperature={temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: off), got top_k={top_k}")
    return max_new_tokens, float(temperature), (min(top_k, vocab) if top_k else None)


def generate(
    model: LanguageModel,
    prompt,
    *,
    max_new_tokens: int,
    ctx: LaspContext = SINGLE_DEVICE,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    return_logits: bool = False,
):
    """Continue ``prompt`` (int ``[B, P]``, B, P ≥ 1) by ``max_new_tokens`` tokens; returns ``[B, P + N]``.

    ``temperature=0`` is greedy; ``top_k`` keeps the k most likely tokens (None or 0: all; past the
    vocabulary: all). There is no stop token: every row gets ``max_new_tokens``. With
    ``return_logits`` also returns the logits each new token was drawn from (``[B, N, V]``) and the
    prompt's logits (``[B, P, V]``, position t predicting t+1; positions covered by the parallel
    prefill other than its last are zeros). The compiled steps are cached per model structure,
    mesh and sampling arguments, so repeated calls do not compile again.
    """
    prompt = np.asarray(prompt)
    if prompt.ndim != 2 or min(prompt.shape) < 1 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt must be integer [B, P] with B, P >= 1, got shape={prompt.shape} dtype={prompt.dtype}")
    b, p = prompt.shape
    vocab = model.config.vocab_size
    max_new_tokens, temperature, top_k = _sampling_args(max_new_tokens, temperature, top_k, vocab)
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={vocab}), got [{prompt.min()}, {prompt.max()}]")
    graphdef, params = nnx.split(model)
    sp = ctx.mesh.shape[ctx.seq_axis] if ctx.mesh is not None else 1
    if ctx.mesh is not None and ctx.batch_axis is not None and b % ctx.mesh.shape[ctx.batch_axis]:
        ctx = dataclasses.replace(ctx, batch_axis=None)
    n_par = (p // sp) * sp
    cache_size = p + max_new_tokens if model.has_softmax_layers else None  # softmax layers' key/value cache
    tokens = jnp.asarray(prompt, jnp.int32)
    if ctx.mesh is not None:
        replicated = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec())
        tokens = jax.device_put(tokens, replicated)
        params = jax.device_put(params, replicated) if _single_device(params) else params

    prompt_logits = jnp.zeros((b, p, vocab), jnp.float32) if return_logits else None
    if n_par:
        last, states = _prefill(params, tokens[:, :n_par], graphdef=graphdef, ctx=ctx, cache_size=cache_size)
        if return_logits:
            prompt_logits = prompt_logits.at[:, n_par - 1].set(last)
    else:
        states = nnx.merge(graphdef, params).init_states(b, cache_size)
    if n_par < p:
        rest, states = _feed_jit(params, states, tokens[:, n_par:], jnp.int32(n_par), graphdef=graphdef)
        last = rest[:, -1]
        if return_logits:
            prompt_logits = prompt_logits.at[:, n_par:].set(rest)
    if max_new_tokens == 0:
        new, used = jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0, vocab), jnp.float32)
    else:
        sampling = dict(n=max_new_tokens, temperature=temperature, top_k=top_k)
        new, used = _decode_jit(params, states, last, jnp.int32(p), jax.random.key(seed), graphdef=graphdef, **sampling)
    out = jnp.concatenate([jnp.asarray(prompt, jnp.int32), jax.device_get(new)], axis=1)
    if return_logits:
        return out, used, prompt_logits
    return out


def _single_device(tree) -> bool:
    return all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


def decode_bytes(tokens) -> str:
    """Byte-level tokens (ids ≥ 256 dropped) as text."""
    data = bytes(int(t) for t in np.asarray(tokens).reshape(-1) if 0 <= int(t) < 256)
    return data.decode("utf-8", errors="replace")
