"""lasp_attention with per-key-channel gates (GLA, ``g [B, T, H, D]``) on 8 fake CPU devices.

Every strategy against the single-device float64 reference, shard by shard: outputs, dq, dk, dv, dg,
d(initial_state) and the final state, with packed documents whose boundaries fall inside shards, on
a shard edge and one token apart, so the per-channel shard decay Γ_r is reset by documents too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lasp_jax import lasp_attention, lasp_attention_shard, make_mesh
from pallas_kernels import linear_attention
from tests.helpers import x64
from tests.lasp_jax.test_lasp_attention import assert_matches, grads_fn, rank_coded_inputs

T, SP = 32, 4  # 8 tokens a shard
B, H, HK, D = 2, 4, 2, 8


def _segment_ids():
    """Document boundaries at token 8 (a shard edge), 13 and 14 (a one-token document) in row 0 and at
    token 20 in row 1."""
    starts = np.zeros((B, T), np.int32)
    starts[0, [8, 13, 14]] = 1
    starts[1, 20] = 1
    return np.cumsum(starts, axis=1) + 3


SEGMENT_IDS = _segment_ids()


def channel_case(rng, *, g_range=(0.01, 0.5)):
    """Rank-coded q, k, v with a per-channel g and an initial state, the cotangents do and ds."""
    q, k, v, kw = rank_coded_inputs(rng, b=B, t=T, sp=SP, h=H, hk=HK, d=D, e=D, decay=None)
    kw["g"] = -rng.uniform(*g_range, (B, T, H, D))
    do = rng.standard_normal(q.shape[:3] + v.shape[3:])
    ds = rng.standard_normal((B, H, D, D))
    return q, k, v, kw, do, ds


@functools.cache
def _reference_fn():
    # one jitted oracle for the module (the document ids are fixed), so it compiles once
    return grads_fn(lambda *a, **kw: linear_attention(*a, **kw, segment_ids=SEGMENT_IDS, impl="reference"))


def reference(case):
    with x64():
        out = _reference_fn()(*jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), case))
        return {n: np.asarray(x, np.float64) for n, x in out.items()}


def check(rng, *, dp, strategy, impl="xla", g_range=(0.01, 0.5), mesh=None, **axes):
    case = channel_case(rng, g_range=g_range)
    want = reference(case)
    mesh = mesh or make_mesh(dp, SP, devices=jax.devices()[: dp * SP])
    batch_axis = "dp" if dp > 1 else None

    def layer(*a, **kw):
        seg = jnp.asarray(SEGMENT_IDS)
        return lasp_attention(
            *a, **kw, mesh=mesh, batch_axis=batch_axis, strategy=strategy, segment_ids=seg, impl=impl, **axes
        )

    got = grads_fn(layer)(*jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), case))
    got = {n: np.asarray(x, np.float64) for n, x in got.items()}
    assert got["dg"].shape == case[3]["g"].shape
    label = f"{strategy} {dict(mesh.shape)} per-channel impl={impl}"
    assert_matches(got, want, sp=mesh.shape["sp"], label=label)


CASES = [(1, "ring"), (1, "scan"), (2, "allgather"), (2, "ulysses"), (2, "gather_kv")]


@pytest.mark.parametrize("dp,strategy", CASES, ids=[f"dp{dp}xsp{SP}-{s}" for dp, s in CASES])
def test_every_strategy_every_shard(rng, dp, strategy):
    check(rng, dp=dp, strategy=strategy)


def test_strong_channel_decay(rng):
    # g ≈ −20: each shard's Γ_r underflows to 0 per channel; finite and exact (allgather sums log Γ over ranks)
    check(rng, dp=1, strategy="allgather", g_range=(18.0, 22.0))


@pytest.mark.parametrize("g_range", [(0.01, 0.5), (6.0, 8.0)], ids=["factored-tiles", "exact-tiles"])
def test_pallas_split_kernels(rng, g_range):
    """The split entry points in interpret mode: usual decays take the kernels with factored
    diagonal sub-tiles, g ≈ −7 (half-spans past 40) the exact ones (``gated_delta_rule.products.gate_case``)."""
    check(rng, dp=1, strategy="ring", impl="pallas", g_range=g_range)


def test_heads_over_a_tp_axis(rng):
    """dp 2 × sp 2 × tp 2: g's heads split with q's, the per-channel Γ_r of each rank's heads only."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("dp", "sp", "tp"))
    check(rng, dp=2, strategy="scan", mesh=mesh, head_axis="tp")


def test_per_shard_function_in_a_checked_shard_map(rng):
    """lasp_attention_shard in the caller's own shard_map with varying axes checked."""
    case = channel_case(rng)
    want = reference(case)
    mesh = make_mesh(1, SP, devices=jax.devices()[:SP])
    tokens = P(None, "sp")

    def layer(q, k, v, *, g, initial_state, output_final_state):
        def body(q, k, v, g, s0, seg):
            return lasp_attention_shard(
                q, k, v, strategy="ring", g=g, initial_state=s0, segment_ids=seg, output_final_state=output_final_state
            )

        in_specs = (tokens, tokens, tokens, tokens, P(), tokens)
        shard = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(tokens, P()), check_vma=True)
        return shard(q, k, v, g, initial_state, jnp.asarray(SEGMENT_IDS))

    got = grads_fn(layer)(*jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), case))
    assert_matches({n: np.asarray(x, np.float64) for n, x in got.items()}, want, sp=SP, label="checked shard_map")
