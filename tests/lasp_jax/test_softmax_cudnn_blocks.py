"""``softmax_attention(impl="cudnn_blocks")``: every strategy with cuDNN's calls as its block pairs.

On the CPU the calls run on their dense jnp twin, so these tests check the decomposition of each
strategy's block pairs (prefix and causal band, merged by log-sum-exp; the backward given the final
statistics) against the float64 oracle on every shard; on GPUs (``-m gpu``) cuDNN itself runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lasp_jax import softmax_attention
from tests.lasp_jax.test_softmax_attention import _check, _documents, _mesh

CASES = [  # strategy, balance, dp, sp
    ("allgather", None, 1, 2),
    ("allgather", None, 2, 4),
    ("allgather", False, 1, 4),
    ("ring", None, 1, 4),
    ("ring", False, 2, 2),
    ("zigzag_ring", None, 1, 4),
    ("zigzag_ring", None, 2, 2),
    ("tokenring", None, 1, 4),
    ("tokenring", False, 1, 2),
]


@pytest.mark.parametrize(
    "strategy,balance,dp,sp",
    CASES,
    ids=[f"{s}-{'contiguous' if b is False else 'balanced'}-dp{a}xsp{p}" for s, b, a, p in CASES],
)
def test_every_strategy_every_shard(rng, strategy, balance, dp, sp):
    mesh = _mesh(dp, sp)
    attn = functools.partial(
        softmax_attention, mesh=mesh, batch_axis="dp", strategy=strategy, impl="cudnn_blocks", balance=balance
    )
    _check(rng, attn, dp=dp, sp=sp, b=2 * dp, t=8 * sp, h=4, hk=2, d=16)


@pytest.mark.parametrize("strategy", ["allgather", "zigzag_ring"])
def test_bf16(rng, strategy):
    attn = functools.partial(softmax_attention, mesh=_mesh(1, 4), strategy=strategy, impl="cudnn_blocks")
    _check(rng, attn, dtype=jnp.bfloat16, sp=4, b=2, t=64, h=4, hk=1, d=16)


def test_single_device(rng):
    attn = functools.partial(softmax_attention, mesh=None, impl="cudnn_blocks")
    _check(rng, attn, dtype=jnp.bfloat16, b=2, t=24, h=4, hk=2, d=16)


DOC_CASES = [
    ("allgather", None, 1, 4),
    ("allgather", False, 2, 2),
    ("ring", None, 1, 4),
    ("ring", False, 1, 4),
    ("zigzag_ring", None, 1, 4),
    ("tokenring", None, 1, 2),
]


@pytest.mark.parametrize(
    "strategy,balance,dp,sp",
    DOC_CASES,
    ids=[f"{s}-{'contiguous' if b is False else 'balanced'}-dp{a}xsp{p}" for s, b, a, p in DOC_CASES],
)
def test_packed_documents_every_shard(rng, strategy, balance, dp, sp):
    """Packed documents (boundaries at shard and half-shard edges, one-token documents): the first
    document's rows against its earlier keys by cuDNN's calls, bands with a boundary on the fallback."""
    attn = functools.partial(
        softmax_attention, mesh=_mesh(dp, sp), batch_axis="dp", strategy=strategy, impl="cudnn_blocks", balance=balance
    )
    b, t = 2 * dp, 16 * sp
    _check(rng, attn, dp=dp, sp=sp, b=b, t=t, h=4, hk=2, d=16, segment_ids=_documents(rng, b, t, sp))


def test_packed_documents_single_device(rng):
    attn = functools.partial(softmax_attention, mesh=None, impl="cudnn_blocks")
    _check(rng, attn, b=2, t=32, h=4, hk=2, d=16, segment_ids=_documents(rng, 2, 32, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("docs", [False, True], ids=["one-sequence", "documents"])
@pytest.mark.parametrize("strategy", ["allgather", "zigzag_ring", "tokenring"])
def test_on_gpus(rng, strategy, docs):
    """cuDNN block pairs over every local GPU (one: the single block), bf16 at 2K tokens per GPU,
    with and without packed documents, every shard of o, dq, dk, dv against the float64 oracle."""
    n = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()), ("sp",))
    attn = functools.partial(softmax_attention, mesh=mesh, strategy=strategy, impl="cudnn_blocks")
    t = 2048 * n
    ids = _documents(rng, 1, t, n) if docs else None
    _check(rng, attn, dtype=jnp.bfloat16, sp=n, b=1, t=t, h=8, hk=2, d=128, segment_ids=ids)


@pytest.mark.parametrize("sp", [4, 8])
def test_odd_local_length_and_eight_ranks(rng, sp):
    """An odd local length (contiguous shards: every pair at whole-shard offsets) and a ring of 8."""
    attn = functools.partial(softmax_attention, mesh=_mesh(1, sp), strategy="ring", impl="cudnn_blocks")
    _check(rng, attn, sp=sp, b=1, t=5 * sp if sp == 4 else 4 * sp, h=4, hk=1, d=8, e=4)


def test_heads_over_a_tp_axis(rng):
    mesh = _mesh(2, 4, names=("tp", "sp"))
    attn = functools.partial(softmax_attention, mesh=mesh, head_axis="tp", strategy="tokenring", impl="cudnn_blocks")
    _check(rng, attn, sp=4, b=1, t=32, h=4, hk=2, d=8)
