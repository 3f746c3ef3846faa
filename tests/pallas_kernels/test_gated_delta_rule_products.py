"""The per-channel diagonal tile of ``pallas_kernels.gated_delta_rule.products`` (levels of masked
products in its cotangents) against its definition ``Z[i, j] = Σ_d x_id y_jd exp(b_id − b_jd)`` on the masked pairs,
and its cotangents against ``jax.vjp`` of the definition: tiles of 16, 32 and 64 rows, strict and
inclusive causal masks, documents, and log gates whose span inside the tile reaches ~1900 (every
factor of the levels stays ≤ 1; no inf or NaN)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import F32
from pallas_kernels.gated_delta_rule import common, products


def _definition(x, y, b, mask):
    diff = b[:, None, :] - b[None, :, :]
    decay = jnp.where(mask[:, :, None], jnp.exp(jnp.where(mask[:, :, None], diff, 0.0)), 0.0)
    return jnp.sum(x[:, None, :] * y[None, :, :] * decay, axis=-1)


def _tile(rng, n, d, g_max, docs):
    x = jnp.asarray(rng.standard_normal((n, d)), F32)
    y = jnp.asarray(rng.standard_normal((n, d)), F32)
    b = jnp.asarray(np.cumsum(-rng.uniform(0.0, g_max, (n, d)), axis=0), F32)
    doc = None
    if docs:
        ids = np.cumsum(np.isin(np.arange(n), [n // 3, n // 3 + 1, 3 * n // 4]))
        doc = common.Docs(jnp.asarray(ids, jnp.int32), None, None)
    return x, y, b, doc


@pytest.mark.parametrize("n", [16, 32, 64])
@pytest.mark.parametrize("causal", ["strict", "inclusive"])
@pytest.mark.parametrize("g_max,docs", [(0.5, False), (30.0, True)])
def test_channel_diagonal_tile_by_levels(rng, n, causal, g_max, docs):
    x, y, b, doc = _tile(rng, n, 24, g_max, docs)
    pair = products.make_pair(x, y, b, b, doc, doc, diag=True, causal=causal)
    z = products.gated_product(pair, "channel", F32)
    want = _definition(x, y, b, pair.mask)
    assert np.all(np.isfinite(np.asarray(z)))
    np.testing.assert_allclose(z, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))

    dz = jnp.asarray(rng.standard_normal((n, n)), F32)
    dx, dy = products.gated_product_vjp(pair, dz, "channel", F32)
    want_dx, want_dy = jax.vjp(lambda x, y: _definition(x, y, b, pair.mask), x, y)[1](dz)
    for got, ref in ((dx, want_dx), (dy, want_dy)):
        assert np.all(np.isfinite(np.asarray(got)))
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()))


def test_channel_diagonal_tile_bf16_operands(rng):
    """bf16 operands (the kernels' matmul dtype for bf16 inputs): the product and its cotangents
    carry the operands' rounding only."""
    x, y, b, doc = _tile(rng, 64, 32, 2.0, True)
    x, y = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    pair = products.make_pair(x, y, b, b, doc, doc, diag=True, causal="inclusive")
    z = products.gated_product(pair, "channel", jnp.bfloat16)
    want = _definition(x.astype(F32), y.astype(F32), b, pair.mask)
    err = float(jnp.linalg.norm(z - want) / jnp.linalg.norm(want))
    assert err < 1e-2, err
    dz = jnp.asarray(rng.standard_normal((64, 64)), F32)
    got = products.gated_product_vjp(pair, dz, "channel", jnp.bfloat16)
    want = jax.vjp(lambda x, y: _definition(x, y, b, pair.mask), x.astype(F32), y.astype(F32))[1](dz)
    for g, w in zip(got, want, strict=True):
        err = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
        assert err < 1e-2, err


def test_channel_diagonal_tile_needs_power_of_two_rows(rng):
    """A reference row past the tile would select nothing; the levels refuse such tiles."""
    x, y, b, _ = _tile(rng, 20, 8, 1.0, False)
    pair = products.make_pair(x, y, b, b, None, None, diag=True, causal="strict")
    with pytest.raises(ValueError, match="power-of-two row count, got 20"):
        products.gated_product_vjp(pair, jnp.ones((20, 20), F32), "channel", F32)
