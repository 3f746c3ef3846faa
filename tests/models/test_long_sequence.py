"""What lets a million tokens train on one GPU (issue 20) leaves the math unchanged.

The block norms (``models.tokenwise.rms_normalize``) equal their float64 definition in value and
every gradient and keep no float32 copy of their input for the backward; the MLP run over
checkpointed token chunks (``ModelConfig.mlp_chunk``) equals the whole MLP; remat ``offload`` keeps
exactly the block inputs in host memory, and the model's loss and gradients under it (with chunked
MLPs, scanned or not, under sequence parallelism) equal the plain model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from jax.extend import core as jax_core

from models.layers import LaspContext, Mlp, Norm
from models.model import LanguageModel, lm_loss
from models.sharding import build_mesh
from models.tokenwise import map_token_chunks, rms_normalize
from tests.helpers import rel_err, tol, x64
from tests.models.common import large_weights, small_model


def norm_reference(x, scale, bias, eps, center):
    """The norm written out in float64 jnp (differentiable for the reference gradients)."""
    xc = x - jnp.mean(x, axis=-1, keepdims=True) if center else x
    y = xc / jnp.sqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    return (y if scale is None else y * scale) + (0.0 if bias is None else bias)


@pytest.mark.parametrize("kind", ["srms", "rms", "layer"])
def test_norm_value_and_grads_equal_float64(kind, rng):
    x, dy = 1.0 + rng.standard_normal((2, 3, 5, 48)), rng.standard_normal((2, 3, 5, 48))  # non-zero mean
    scale = None if kind == "srms" else 1.0 + 0.5 * rng.standard_normal(48)
    bias = rng.standard_normal(48) if kind == "layer" else None
    args = [a for a in (x, scale, bias) if a is not None]

    def run(*args, impl, dtype):
        it = iter(jnp.asarray(a, dtype) for a in args)
        x, s, b = next(it), (None if scale is None else next(it)), (None if bias is None else next(it))
        return impl(x, s, b, eps=1e-6, center=kind == "layer")

    def value_and_grads(impl, dtype):
        y, vjp = jax.vjp(lambda *a: run(*a, impl=impl, dtype=dtype), *[jnp.asarray(a, dtype) for a in args])
        return [y, *vjp(jnp.asarray(dy, dtype))]

    got = value_and_grads(rms_normalize, jnp.float32)
    with x64():
        want = [np.asarray(w) for w in value_and_grads(norm_reference, jnp.float64)]
    for name, g, w in zip(["y", "dx", "dscale", "dbias"], got, want, strict=False):
        assert g.dtype == jnp.float32, name
        assert rel_err(g, w) < tol(jnp.float32, x.size), name


def saved_residuals(fn, *args) -> str:
    """What ``jax.vjp(fn, *args)`` keeps for the backward, as jax prints it."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(fn, *args)
    return out.getvalue()


def test_norm_backward_keeps_no_float32_copy_of_its_input(rng):
    """The residuals of a bf16 ``Norm`` are its bf16 input and the float32 per-token rsqrt, not a float32
    copy of x (which autodiff of the float32 expression keeps: checked too, so the test can fail)."""
    x = jnp.asarray(rng.standard_normal((2, 64, 32)), jnp.bfloat16)
    norm = Norm("rms", 32, eps=1e-6, config=small_model("tnl"))
    residuals = saved_residuals(lambda x: norm(x), x)
    assert "f32[2,64,32]" not in residuals and "bf16[2,64,32]" in residuals and "f32[2,64,1]" in residuals
    plain = saved_residuals(lambda x: norm_reference(x.astype(jnp.float32), None, None, 1e-6, False), x)
    assert "f32[2,64,32]" in plain


@pytest.mark.parametrize("mlp", ["glu", "swiglu", "gelu"])
def test_chunked_mlp_equals_whole_mlp(mlp, rng):
    """Chunks of 8 tokens (3 chunks of 24) give the whole MLP's output and gradients."""
    config = small_model("tnl", mlp=mlp)
    whole = Mlp(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    graphdef, params = nnx.split(whole)
    chunked = nnx.merge(nnx.graphdef(Mlp(config.replace(mlp_chunk=8), rngs=nnx.Rngs(0))), params)
    x = jnp.asarray(rng.standard_normal((2, 24, 32)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((2, 24, 32)), jnp.float32)

    def value_and_grads(module):
        gd, p = nnx.split(module)
        y, vjp = jax.vjp(lambda p, x: nnx.merge(gd, p)(x), p, x)
        return y, vjp(dy)

    (y, grads), (want_y, want_grads) = value_and_grads(chunked), value_and_grads(whole)
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))

    # 7 does not divide 24: 4 chunks of 6 tokens (6j ... 6j + 5, or strided j, j + 4, ...), each its tokens' sum
    def chunk_sums(strided):
        return map_token_chunks(lambda c: jnp.broadcast_to(c.sum(1, keepdims=True), c.shape), x, 7, strided=strided)

    np.testing.assert_allclose(chunk_sums(False)[:, ::6], x.reshape(2, 4, 6, 32).sum(axis=2), rtol=1e-6)
    np.testing.assert_allclose(chunk_sums(True)[:, :4], x.reshape(2, 6, 4, 32).sum(axis=1), rtol=1e-6)


def host_transfer_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value a (nested) jaxpr puts in host memory."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "device_put" and "Host" in str(eqn.params.get("devices")):
            shapes += [tuple(v.aval.shape) for v in eqn.invars]
        for sub in jax_core.jaxprs_in_params(eqn.params):
            shapes += host_transfer_shapes(sub)
    return shapes


@pytest.mark.parametrize("scan,sp", [(False, 1), (True, 2)], ids=["unscanned", "scanned-sp2"])
def test_offload_and_chunked_mlp_loss_and_grads_equal_plain(scan, sp, rng):
    """remat ``offload`` moves only the block inputs ``[B, T, d]`` to host memory; with the MLP in chunks
    of 4 tokens (strided under sp) the loss and every gradient equal the plain model's (no remat, whole
    MLP, one device)."""
    config = small_model("tnl", n_layers=2, scan_layers=scan)
    plain = large_weights(LanguageModel(config.replace(scan_layers=False), rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
    lean = LanguageModel(config.replace(mlp_chunk=4), rngs=nnx.Rngs(0))
    params = nnx.state(plain)
    if scan:
        from models.layer_scan import stack_layer_params, unstack_layer_params

        params = stack_layer_params(params, config)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 16)), jnp.int32)
    targets = jnp.asarray(rng.integers(-1, 256, (2, 16)), jnp.int32)
    ctx = LaspContext() if sp == 1 else LaspContext(mesh=build_mesh(1, sp, jax.devices()[:sp]), batch_axis="dp")

    def loss_fn(model, ctx, remat):
        graphdef = nnx.graphdef(model)
        return lambda p: lm_loss(nnx.merge(graphdef, p), tokens, targets, ctx, remat=remat)[0]

    lean_loss = loss_fn(lean, ctx, "offload")
    # unrolled: one transfer per layer; scanned: one in the scan's body (the scan stacks them on the host)
    want_shapes = [(2, 16, 32)] * (1 if scan else 2)
    assert host_transfer_shapes(jax.make_jaxpr(jax.grad(lean_loss))(params).jaxpr) == want_shapes

    got, grads = jax.jit(jax.value_and_grad(lean_loss))(params)
    want, want_grads = jax.jit(jax.value_and_grad(loss_fn(plain, LaspContext(), "none")))(nnx.state(plain))
    if scan:
        grads = unstack_layer_params(grads, config)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    # float32 sums in another order (remat, chunks, the sp=2 reduction, the split projections' dx sum):
    # the whole array's relative error, since one cancelling element may differ by 1e-4 of itself
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads), strict=True):
        assert float(jnp.abs(w).max()) > 0, path  # every parameter takes part
        assert rel_err(g, w) <= 1e-5, (path, rel_err(g, w))
