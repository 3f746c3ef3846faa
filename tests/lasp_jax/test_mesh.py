"""Mesh construction (LASP's rank map) and logical-name sharding on 8 fake CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lasp_jax import DEFAULT_RULES, logical_spec, make_mesh, shard_logical, with_logical_constraint


@pytest.mark.parametrize("dp,sp", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_sequence_groups_contiguous_data_groups_strided(dp, sp):
    mesh = make_mesh(dp, sp)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert mesh.axis_names == ("dp", "sp") and ids.shape == (dp, sp)
    for i in range(dp):  # sequence group i: devices [i·sp, (i+1)·sp)
        assert list(ids[i]) == list(range(i * sp, (i + 1) * sp))
    for j in range(sp):  # data group j: devices j, j+sp, j+2·sp, ...
        assert list(ids[:, j]) == list(range(j, dp * sp, sp))


def test_sizes_inferred_and_subsets():
    assert make_mesh(dp=2).shape == {"dp": 2, "sp": 4}
    assert make_mesh(sp=2).shape == {"dp": 4, "sp": 2}
    assert make_mesh().shape == {"dp": 1, "sp": 8}
    assert make_mesh(1, 3, devices=jax.devices()[:3]).shape == {"dp": 1, "sp": 3}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dp=3, sp=2), r"dp=3, sp=2, devices=8"),
        (dict(dp=3), r"dp=3, devices=8"),
        (dict(sp=5), r"sp=5, devices=8"),
        (dict(dp=0, sp=8), r"dp must be a positive integer"),
        (dict(dp=2, sp=4, axis_names=("x", "x")), r"two distinct names"),
    ],
)
def test_bad_mesh(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(**kwargs)


def test_logical_spec_rules():
    mesh = make_mesh(2, 4)
    assert logical_spec(("batch", "length", "heads", "head_dim"), mesh=mesh) == P("dp", "sp", None, None)
    assert logical_spec(("batch", None, "embed")) == P("dp", None, None)
    # a rule whose axis the mesh lacks means replicated
    assert logical_spec(("batch", "length"), mesh=make_mesh(8, 1, axis_names=("dp", "seq"))) == P("dp", None)
    # sequence parallelism off by a rules change only
    rules = dict(DEFAULT_RULES) | {"length": None}
    assert logical_spec(("batch", "length"), tuple(rules.items()), mesh) == P("dp", None)
    # several mesh axes for one name
    rules = dict(DEFAULT_RULES) | {"batch": ("dp", "sp"), "length": None}
    assert logical_spec(("batch", "length"), tuple(rules.items()), mesh) == P(("dp", "sp"), None)


def test_logical_spec_errors():
    with pytest.raises(ValueError, match=r"logical axis 'seq' has no rule"):
        logical_spec(("batch", "seq"))
    rules = dict(DEFAULT_RULES) | {"heads": "sp"}
    with pytest.raises(ValueError, match=r"mesh axis 'sp' used twice"):
        logical_spec(("batch", "length", "heads"), tuple(rules.items()))


def test_shard_logical_places_blocks(rng):
    mesh = make_mesh(2, 4)
    x = jnp.asarray(rng.standard_normal((4, 16, 3)), jnp.float32)
    y = shard_logical(x, ("batch", "length", "heads"), mesh)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    for shard in y.addressable_shards:
        dp_index, sp_index = np.argwhere(mesh.devices == shard.device)[0]
        assert shard.index[:2] == (slice(2 * dp_index, 2 * dp_index + 2), slice(4 * sp_index, 4 * sp_index + 4))
    z = jax.jit(lambda a: with_logical_constraint(a * 2, ("batch", "length", None), mesh))(x)
    assert z.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("dp", "sp", None)), 3)


def test_shard_logical_divisibility_errors():
    mesh = make_mesh(2, 4)
    with pytest.raises(ValueError, match=r"dimension 1 \('length'\) of size 10 does not divide over mesh axes 'sp'"):
        shard_logical(jnp.ones((2, 10)), ("batch", "length"), mesh)
    with pytest.raises(ValueError, match=r"dimension 0 \('batch'\) of size 3"):
        shard_logical(jnp.ones((3, 8)), ("batch", "length"), mesh)
    with pytest.raises(ValueError, match=r"one logical name per dimension"):
        shard_logical(jnp.ones((2, 8)), ("batch",), mesh)


def test_layer_adds_no_all_reduce_over_a_size_one_axis(rng):
    """A mesh with an axis of size 1 the layer does not split (tp = 1, as the trainer's): the layer's
    shard_map stays automatic over it, so its backward has no all-reduce at all (a manual size-1 axis
    made autodiff psum dq, dk, dv over it, which XLA keeps as a one-device all-reduce: a copy)."""
    import lasp_jax

    mesh = jax.make_mesh((1, 2, 1), ("dp", "sp", "tp"), devices=jax.devices()[:2])
    sharding = jax.sharding.NamedSharding(mesh, P("dp", "sp"))
    q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal((1, 32, 2, 16)), jnp.float32), sharding) for _ in "qkv")

    def loss(q, k, v):
        o, _ = lasp_jax.lasp_attention(
            q, k, v, g_gamma=jnp.full((2,), -0.1), mesh=mesh, seq_axis="sp", batch_axis="dp", strategy="ring"
        )
        return jnp.sum(o)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    assert "collective-permute" in text  # the ring is there
    assert "all-reduce" not in text
