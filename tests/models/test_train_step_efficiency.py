"""What makes the training step fast: the head's products in bf16 with float32 accumulation (forward
and both gradient products, tied or untied), the chunked loss against a float64 reference, and the
device-time profile of a step (``models.profile``) on a real CPU trace."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.loss import cross_entropy_sum
from models.model import LanguageModel, lm_loss
from tests.helpers import rel_err, tol
from tests.models.common import small_model

VOCAB = 320  # a size no other dimension of the small model has: it marks the head's products
_DOT = re.compile(r"stablehlo\.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)")


def head_dots(stablehlo: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) tensor types of every dot_general with a vocabulary-sized dimension."""
    dots = [m.groups() for m in map(_DOT.search, stablehlo.splitlines()) if m]
    return [d for d in dots if any(re.search(rf"[<x]{VOCAB}x", t) for t in d)]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_head_products_take_bf16_and_accumulate_in_float32(tied):
    """Lowered HLO (abstract parameters, no compile) of a bf16 model's loss gradient (chunked loss)
    and of its logits' gradient: the head's forward, d hidden and d weight products take bf16
    operands and give float32; the parameters' gradients stay float32."""
    config = small_model(n_layers=1, vocab_size=VOCAB, tie_embeddings=tied, dtype="bfloat16")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)

    def loss(params, tokens):
        return lm_loss(nnx.merge(graphdef, params), tokens, tokens, loss_chunks=2)[0]

    def logits(params, tokens):
        return jnp.sum(jax.nn.logsumexp(nnx.merge(graphdef, params)(tokens), axis=-1))

    for fn in (loss, logits):
        traced = jax.jit(jax.grad(fn)).trace(params, tokens)
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(traced.out_info))
        dots = head_dots(traced.lower().as_text())
        assert len(dots) >= 3, dots  # forward, d hidden, d weight
        for lhs, rhs, out in dots:
            assert lhs.endswith("xbf16>") and rhs.endswith("xbf16>") and out.endswith("xf32>"), (lhs, rhs, out)


def _reference(h, w, y, weight, tied):
    """float64 loss sum and its gradients in h and w."""
    wd = w.T if tied else w
    z = h @ wd
    z = z - z.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    picked = np.take_along_axis(z, y[..., None], -1)[..., 0]
    p = np.exp(z - lse[..., None])
    dz = p * weight[..., None]
    np.put_along_axis(dz, y[..., None], np.take_along_axis(dz, y[..., None], -1) - weight[..., None], -1)
    dh = dz @ wd.T
    dw = np.einsum("btd,btv->dv", h, dz)
    return ((lse - picked) * weight).sum(), dh, (dw.T if tied else dw)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_loss_matches_float64(rng, tied, chunks):
    b, t, d = 2, 24, 32
    h = np.asarray(jnp.asarray(rng.standard_normal((b, t, d)), jnp.bfloat16), np.float64)
    w_shape = (VOCAB, d) if tied else (d, VOCAB)
    w = rng.standard_normal(w_shape) / np.sqrt(d)
    y = rng.integers(0, VOCAB, (b, t))
    weight = (rng.random((b, t)) > 0.2).astype(np.float64)
    want = _reference(h, np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64), y, weight, tied)

    def loss(h, w):
        return cross_entropy_sum(
            h, w, jnp.asarray(y), jnp.asarray(weight), tied=tied, dtype=jnp.bfloat16, chunks=chunks
        )

    got, (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.float32)
    )
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert abs(float(got) - want[0]) < 1e-3 * abs(want[0])
    assert rel_err(dh, want[1]) < tol(jnp.bfloat16)
    assert rel_err(dw, want[2]) < tol(jnp.bfloat16)
    # without differentiation the loss runs alone (no gradient products) and agrees
    assert float(jax.jit(loss)(jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.float32))) == pytest.approx(float(got))
