"""Arguments every public op shares, checked the same way in each: ``scale`` (a static finite
scalar) and float32 inputs under ``jax_enable_x64``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp_jax import lasp_attention, lasp_gated_delta_rule, make_mesh, softmax_attention
from pallas_kernels import flash_attention, gated_delta_rule, linear_attention
from tests.helpers import x64

B, T, H, D = 2, 16, 2, 8


def _ops():
    """The public ops by name, called with ``q`` as every input (the sharded ones on a 2-device mesh)."""
    mesh = make_mesh(dp=1, sp=2, devices=jax.devices()[:2])
    beta = jnp.full((B, T, H), 0.5)
    return {
        "linear_attention": lambda q, **kw: linear_attention(q, q, q, impl="xla", **kw),
        "gated_delta_rule": lambda q, **kw: gated_delta_rule(q, q, q, beta, impl="xla", **kw),
        "flash_attention": lambda q, **kw: flash_attention(q, q, q, impl="xla", **kw),
        "lasp_attention": lambda q, **kw: lasp_attention(q, q, q, mesh=mesh, **kw),
        "lasp_gated_delta_rule": lambda q, **kw: lasp_gated_delta_rule(q, q, q, beta, mesh=mesh, impl="xla", **kw),
        "softmax_attention": lambda q, **kw: softmax_attention(q, q, q, mesh=mesh, **kw),
    }


# names only: the mesh is built when a test runs, so collecting this module needs no second device
OPS = [
    "linear_attention",
    "gated_delta_rule",
    "flash_attention",
    "lasp_attention",
    "lasp_gated_delta_rule",
    "softmax_attention",
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "scale,err,match",
    [
        (float("nan"), ValueError, "scale must be a finite number"),
        (float("inf"), ValueError, "scale must be a finite number"),
        (np.ones(H), TypeError, r"scale must be a scalar, got an array of shape \(2,\)"),
    ],
    ids=["nan", "inf", "per-head"],
)
def test_bad_scale_raises(op, scale, err, match):
    """NaN went through as NaN, zeros or a uniform average depending on the implementation."""
    q = jnp.ones((B, T, H, D))
    with pytest.raises(err, match=match):
        _ops()[op](q, scale=scale)


@pytest.mark.parametrize("op", OPS)
def test_traced_scale_raises_and_numpy_scalars_pass(op):
    q = jax.random.normal(jax.random.key(0), (B, T, H, D))
    fn = _ops()[op]
    with pytest.raises(TypeError, match="scale must be a static Python number"):
        jax.jit(lambda s: fn(q, scale=s))(0.5)
    want = fn(q, scale=0.5)
    got = fn(q, scale=np.float32(0.5))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("gate", ["gdn", "kda"])
def test_float32_delta_rule_under_x64(gate):
    """With ``jax_enable_x64`` on, float32 per-channel gates crashed the XLA path's chunk scan (an
    untyped identity made the scores float64); outputs stay float32 and equal those without x64."""
    keys = jax.random.split(jax.random.key(1), 5)
    q, k, v = (jax.random.normal(kk, (B, T, H, D)) for kk in keys[:3])
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (B, T, H)))
    g = -jax.nn.softplus(jax.random.normal(keys[4], (B, T, H, D) if gate == "kda" else (B, T, H)))
    want = gated_delta_rule(q, k, v, beta, g=g, impl="xla", output_final_state=True)
    with x64():
        got = gated_delta_rule(q, k, v, beta, g=g, impl="xla", output_final_state=True)
    assert got[0].dtype == got[1].dtype == jnp.float32
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
