"""The per-channel products of one diagonal tile (``gated_delta_rule.common.gated_product`` and its
cotangents), which the KDA and GLA kernels form key row by key row: against the pairs written out in
float64, with documents and strong decays (every exp of a non-positive difference: finite)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import common
from tests.helpers import rel_err, tol


def _pairs(b, mask):
    """``exp(b_i − b_j)`` ``[n, n, D]`` on the masked pairs, float64."""
    diff = b[:, None, :] - b[None, :, :]
    return np.where(mask[:, :, None], np.exp(np.where(mask[:, :, None], diff, 0.0)), 0.0)


@pytest.mark.parametrize("causal", ["strict", "inclusive"])
def test_diagonal_tile_products_and_cotangents(rng, causal):
    n, d = 16, 32
    x, y, dz = rng.standard_normal((n, d)), rng.standard_normal((n, d)), rng.standard_normal((n, n))
    b = np.cumsum(-rng.exponential(4.0, (n, d)), axis=0)  # down to about −64 within the tile
    doc = np.sort(rng.integers(0, 3, n))
    mask = (np.arange(n)[None, :] < np.arange(n)[:, None]) if causal == "strict" else np.tri(n, dtype=bool)
    mask = mask & (doc[:, None] == doc[None, :])
    decay = _pairs(b, mask)
    want_z = np.einsum("id,jd,ijd->ij", x, y, decay)
    want_dx = np.einsum("ij,jd,ijd->id", dz, y, decay)
    want_dy = np.einsum("ij,id,ijd->jd", dz, x, decay)

    def products(x, y, b, dz, doc):
        docs = common.Docs(doc, doc[0], doc[-1])
        pair = common.make_pair(x, y, b, b, docs, docs, diag=True, causal=causal)
        z = common.gated_product(pair, "channel", jnp.float32)
        return z, *common.gated_product_vjp(pair, dz, "channel", jnp.float32)

    f32 = [jnp.asarray(a, jnp.float32) for a in (x, y, b, dz)]
    z, dx, dy = jax.jit(products)(*f32, jnp.asarray(doc, jnp.int32))
    assert np.all(np.asarray(z)[~mask] == 0.0)
    for got, want in ((z, want_z), (dx, want_dx), (dy, want_dy)):
        assert rel_err(got, want) < tol(jnp.float32, n)
