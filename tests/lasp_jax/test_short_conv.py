"""lasp_jax.short_conv: the causal depthwise convolution with the sequence sharded, shard by shard.

The oracle is the definition in float64 numpy, token by token: ``y_t = Σ_i w_i x_{t−W+1+i}`` over
inputs of t's own document, the inputs before token 0 taken from the initial cache. Every shard's
output, the gradients of x, the weight and the initial cache, and the final cache are checked on
dp × sp meshes, with shards shorter than ``W − 1`` (their window spans several ranks) and documents
that start exactly at a shard edge, inside a shard and one token before an edge.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lasp_jax import make_mesh, short_conv, short_conv_shard, short_conv_step
from lasp_jax.short_conv import short_conv_local
from tests.helpers import rel_err, x64

W, C = 4, 6


def oracle(x, w, ids, init):
    """float64: y ``[B, T, C]`` and the final cache ``[B, W−1, C]``, by the definition."""
    b, t, _ = x.shape
    n = w.shape[0] - 1
    ext = np.concatenate([init, x], axis=1)
    ext_ids = np.concatenate([np.repeat(ids[:, :1], n, axis=1), ids], axis=1)

    def same_doc(row, a, z):  # extended indices a ≤ z: no id change between them
        return np.all(ext_ids[row, a : z + 1] == ext_ids[row, z])

    y = np.zeros_like(x)
    for r in range(b):
        for s in range(t):
            for i in range(n + 1):
                if same_doc(r, s + i, s + n):
                    y[r, s] += w[i] * ext[r, s + i]
    final = np.zeros((b, n, x.shape[2]))
    for r in range(b):
        for j in range(n):
            e = t + j  # extended index of the j-th of the last n inputs
            if same_doc(r, e, t + n - 1):
                final[r, j] = ext[r, e]
    return y, final


def documents(b, t, sp):
    """Row 0: boundaries exactly at the first shard edge, inside the next shard and one token before
    the following edge; row 1: one document (ids equal, a non-zero label)."""
    length = t // sp
    ids = np.zeros((b, t), np.int32)
    ids[0, length:] = 1
    ids[0, length + 1 :] = 2
    ids[0, min(2 * length - 1, t - 1) :] = 3
    ids[1:] = 7
    return ids


def inputs(rng, b, t, *, docs, init, sp):
    x = rng.standard_normal((b, t, C))
    x[..., 0] += np.repeat(np.arange(sp), t // sp)[None]  # each token carries its shard
    w = rng.standard_normal((W, C))
    ids = documents(b, t, sp) if docs else np.zeros((b, t), np.int32)
    cache = rng.standard_normal((b, W - 1, C)) if init else np.zeros((b, W - 1, C))
    return x, w, ids, cache


def test_local_matches_definition(rng):
    x, w, ids, cache = inputs(rng, 2, 13, docs=True, init=True, sp=1)
    with x64():
        y, final = jax.jit(short_conv_local, static_argnames="output_final_state")(
            jnp.asarray(x),
            jnp.asarray(w),
            segment_ids=jnp.asarray(ids),
            initial_state=jnp.asarray(cache),
            output_final_state=True,
        )
        want_y, want_final = oracle(x, w, ids, cache)
        assert rel_err(y, want_y) < 1e-12 and rel_err(final, want_final) < 1e-12
        y, final = short_conv_local(jnp.asarray(x), jnp.asarray(w), output_final_state=True)
        want_y, want_final = oracle(x, w, np.zeros_like(ids), np.zeros_like(cache))
        assert rel_err(y, want_y) < 1e-12 and rel_err(final, want_final) < 1e-12


def _loss_fn(conv, cotangent, final_cotangent):
    def loss(x, w, cache, ids):
        y, final = conv(x, w, ids, cache)
        return jnp.sum(y * cotangent) + jnp.sum(final * final_cotangent)

    return loss


# (dp, sp, T): T / sp = 6 ≥ W − 1 (a padded local convolution, the first W − 1 outputs rewritten),
# T / sp = 3 = W − 1 (the same, the window is the whole shard), T / sp = 2 and 1 < W − 1 (one window
# over inputs borrowed from two or three ranks back)
MESHES = [(1, 2, 12), (1, 4, 12), (2, 4, 8), (1, 8, 8)]


@pytest.mark.parametrize("with_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("dp, sp, t", MESHES, ids=[f"dp{d}xsp{s}-T{t}" for d, s, t in MESHES])
def test_sharded_equals_one_device(rng, dp, sp, t, with_cache):
    """With a cache (the autodiff path) and without one (shards of at least W − 1 tokens take the
    hand-written backward of ``_halo_conv``), documents in every case."""
    b = 2 * dp
    x, w, ids, cache = inputs(rng, b, t, docs=True, init=with_cache, sp=sp)
    mesh = make_mesh(dp, sp, devices=jax.devices()[: dp * sp])
    dy = rng.standard_normal((b, t, C))
    dfinal = rng.standard_normal((b, W - 1, C))

    def sharded(x, w, ids, cache):
        kw = dict(segment_ids=ids, initial_state=cache if with_cache else None, output_final_state=True)
        return short_conv(x, w, mesh=mesh, seq_axis="sp", batch_axis="dp", **kw)

    def local(x, w, ids, cache):
        kw = dict(segment_ids=ids, initial_state=cache if with_cache else None, output_final_state=True)
        return short_conv_local(x, w, **kw)

    args = (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(cache, jnp.float32))
    y, final = jax.jit(sharded)(args[0], args[1], jnp.asarray(ids), args[2])
    want_y, want_final = oracle(x, w, ids, cache)
    length = t // sp
    for r in range(sp):  # shard by shard, so a misplaced shard names itself
        block = slice(r * length, (r + 1) * length)
        assert rel_err(y[:, block], want_y[:, block]) < 1e-5, f"shard {r}"
    assert rel_err(final, want_final) < 1e-5

    grads = jax.jit(jax.grad(_loss_fn(sharded, dy, dfinal), argnums=(0, 1, 2)))(
        args[0], args[1], args[2], jnp.asarray(ids)
    )
    with x64():
        want = jax.jit(jax.grad(_loss_fn(local, dy, dfinal), argnums=(0, 1, 2)))(
            jnp.asarray(x), jnp.asarray(w), jnp.asarray(cache), jnp.asarray(ids)
        )
        want = [np.asarray(g) for g in want]
    for name, got, ref in zip(("dx", "dweight", "dinitial_state"), grads, want, strict=True):
        if name == "dx":
            for r in range(sp):
                block = slice(r * length, (r + 1) * length)
                assert rel_err(got[:, block], ref[:, block]) < 1e-5, f"{name} shard {r}"
        assert rel_err(got, ref) < 1e-5, name


def test_no_documents_no_cache_and_the_check_fails_without_the_halo(rng):
    """Plain rows (no ids, zero cache) under sp=4; rank r's first outputs do depend on rank r − 1."""
    x, w, ids, cache = inputs(rng, 2, 16, docs=False, init=False, sp=4)
    mesh = make_mesh(1, 4, devices=jax.devices()[:4])
    y, final = jax.jit(lambda x, w: short_conv(x, w, mesh=mesh, output_final_state=True))(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    )
    want_y, want_final = oracle(x, w, ids, cache)
    assert rel_err(y, want_y) < 1e-5 and rel_err(final, want_final) < 1e-5
    # each shard convolved alone (zeros before it) differs at its first W − 1 outputs
    alone = np.concatenate([oracle(x[:, s : s + 4], w, ids[:, :4], cache)[0] for s in range(0, 16, 4)], axis=1)
    assert rel_err(alone, want_y) > 1e-2


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("width, length", [(2, 1), (4, 3), (5, 6)], ids=["W2-L1", "W4-L3", "W5-L6"])
def test_per_shard_function_in_a_users_shard_map(rng, width, length, check_vma):
    """The training path (no cache, shards of at least W − 1 tokens): outputs, dx and dweight in a
    user's shard_map on dp 2 × sp 4, documents, other widths than the models' 4."""
    dp, sp = 2, 4
    t = sp * length
    x = rng.standard_normal((2 * dp, t, C))
    w = rng.standard_normal((width, C))
    ids = np.cumsum(rng.random((2 * dp, t)) < 0.3, axis=1).astype(np.int32)
    ids[0] = np.repeat(np.arange(sp), length)  # a document at every shard edge
    dy = rng.standard_normal((2 * dp, t, C))
    mesh = make_mesh(dp, sp, devices=jax.devices()[: dp * sp])

    def body(x, w, ids):
        return short_conv_shard(x, w, axis_name="sp", segment_ids=ids)[0]

    spec = P("dp", "sp")
    conv = jax.shard_map(body, mesh=mesh, in_specs=(spec, P(), spec), out_specs=spec, check_vma=check_vma)
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    y = jax.jit(conv)(*args, jnp.asarray(ids))
    assert rel_err(y, oracle(x, w, ids, np.zeros((2 * dp, width - 1, C)))[0]) < 1e-5
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, jnp.asarray(ids)) * dy), argnums=(0, 1)))(*args)
    with x64():
        want = jax.grad(
            lambda x, w: jnp.sum(short_conv_local(x, w, segment_ids=jnp.asarray(ids))[0] * dy), argnums=(0, 1)
        )(jnp.asarray(x), jnp.asarray(w))
    for name, got, ref in zip(("dx", "dweight"), grads, want, strict=True):
        assert rel_err(got, np.asarray(ref)) < 1e-5, name


def test_training_path_in_bf16(rng):
    """bf16 inputs, float32 weight, sp=4 with documents: the bf16 rounding of y and dx only."""
    x, w, ids, _ = inputs(rng, 2, 16, docs=True, init=False, sp=4)
    mesh = make_mesh(1, 4, devices=jax.devices()[:4])
    dy = rng.standard_normal((2, 16, C))
    conv = lambda x, w: short_conv(x, w, mesh=mesh, segment_ids=jnp.asarray(ids))[0]  # noqa: E731
    xb, wf = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.float32)
    y = jax.jit(conv)(xb, wf)
    assert y.dtype == jnp.bfloat16
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w).astype(jnp.float32) * dy), argnums=(0, 1)))(xb, wf)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    dy = np.asarray(jnp.asarray(dy, jnp.bfloat16), np.float64)  # y is bf16: its cotangent arrives rounded
    with x64():
        xr = jnp.asarray(np.asarray(xb, np.float64))
        want = short_conv_local(xr, jnp.asarray(w), segment_ids=jnp.asarray(ids))[0]
        wdx, wdw = jax.grad(
            lambda x, w: jnp.sum(short_conv_local(x, w, segment_ids=jnp.asarray(ids))[0] * dy), argnums=(0, 1)
        )(xr, jnp.asarray(w))
    assert rel_err(np.asarray(y, np.float64), want) < 1e-2
    assert rel_err(np.asarray(dx, np.float64), wdx) < 1e-2
    assert rel_err(dw, wdw) < 1e-5


def test_decode_steps_continue_the_sequence(rng):
    """The final cache of a prefix, then ``short_conv_step`` token by token, equals the whole run."""
    x, w, ids, cache = inputs(rng, 2, 10, docs=False, init=True, sp=1)
    xj, wj = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    _, state = short_conv_local(xj[:, :6], wj, initial_state=jnp.asarray(cache, jnp.float32), output_final_state=True)
    outs = []
    for s in range(6, 10):
        out, state = short_conv_step(xj[:, s], state, wj)
        outs.append(out)
    want_y, want_final = oracle(x, w, ids, cache)
    assert rel_err(jnp.stack(outs, axis=1), want_y[:, 6:]) < 1e-5
    assert rel_err(state, want_final) < 1e-6


def test_bad_inputs_raise():
    x, w = jnp.zeros((2, 8, C)), jnp.zeros((W, C))
    with pytest.raises(ValueError, match="weight must be"):
        short_conv(x, jnp.zeros((W, C + 1)), mesh=None)
    with pytest.raises(ValueError, match="initial_state must be"):
        short_conv(x, w, mesh=None, initial_state=jnp.zeros((2, W, C)))
    with pytest.raises(TypeError, match="segment_ids must be an integer"):
        short_conv(x, w, mesh=None, segment_ids=jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="sequence length must divide"):
        short_conv(jnp.zeros((2, 6, C)), w, mesh=make_mesh(1, 4, devices=jax.devices()[:4]))


def test_weight_gradient_is_one_psum_per_call(rng):
    """The backward sums the weight's gradient over the devices in one all-reduce of ``[W, C]``
    (the checked shard_map's implicit cast of the weight at every tap's product made one per tap),
    and no activation is all-reduced: the borrowed inputs' cotangents go back by ``ppermute``."""
    x, w, ids, cache = inputs(rng, 2, 8, docs=False, init=False, sp=2)
    auto = (jax.sharding.AxisType.Auto,) * 3  # the trainer's mesh: (dp, sp, tp) with tp = 1
    mesh = jax.make_mesh((1, 2, 1), ("dp", "sp", "tp"), devices=jax.devices()[:2], axis_types=auto)
    dy = jnp.asarray(rng.standard_normal((2, 8, C)), jnp.float32)

    def loss(x, w):
        return jnp.sum(short_conv(x, w, mesh=mesh, seq_axis="sp", batch_axis="dp")[0] * dy)

    args = (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = grad.lower(*args).as_text()
    reduced = re.findall(r"stablehlo\.all_reduce.*?\) -> (tensor<[^>]*>)", text, re.S)
    assert reduced == [f"tensor<{W}x{C}xf32>"], reduced
    assert "collective_permute" in text
    want = jax.grad(lambda x, w: jnp.sum(short_conv_local(x, w)[0] * dy), argnums=(0, 1))(*args)
    for got, ref in zip(grad(*args), want, strict=True):
        assert rel_err(got, ref) < 1e-5


def test_no_copy_of_the_shard_behind_the_borrowed_inputs():
    """The borrowed inputs are not concatenated before the whole shard (a copy of x, ~2.4 ms per
    gdn-1.3b layer on an H200): every concatenate of inputs in the lowered program is W − 1 + W − 1
    tokens long at most, with documents and a cache too (the document ids, int32, are concatenated)."""
    t, sp = 64, 2
    mesh = make_mesh(1, sp, devices=jax.devices()[:sp])
    x = jnp.ones((2, t, C))
    ids = jnp.zeros((2, t), jnp.int32)
    cache = jnp.zeros((2, W - 1, C))

    def loss(x, w):
        y, final = short_conv(x, w, mesh=mesh, segment_ids=ids, initial_state=cache, output_final_state=True)
        return jnp.sum(y) + jnp.sum(final)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, jnp.ones((W, C))).as_text()
    lengths = [int(m) for m in re.findall(r"stablehlo\.concatenate[^\n]*-> tensor<\d+x(\d+)x\d+xf32>", text)]
    assert lengths and max(lengths) <= 2 * (W - 1), lengths


@pytest.mark.parametrize("docs", [False, True], ids=["plain", "documents"])
def test_training_path_builds_nothing_shard_sized_from_the_borrowed_inputs(docs):
    """Without a cache, on shards of at least W − 1 tokens, the forward and backward hold no
    dynamic_update_slice (autodiff of the overwritten first outputs made a zeroed copy of dy) and
    no concatenate longer than 2 (W − 1) tokens; one ppermute each way."""
    t, sp = 64, 2
    mesh = make_mesh(1, sp, devices=jax.devices()[:sp])
    ids = jnp.asarray(documents(2, t, sp)) if docs else None

    def loss(x, w):
        return jnp.sum(short_conv(x, w, mesh=mesh, segment_ids=ids)[0] ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jnp.ones((2, t, C)), jnp.ones((W, C))).as_text()
    assert "dynamic_update_slice" not in text
    lengths = [int(m) for m in re.findall(r"stablehlo\.concatenate[^\n]*-> tensor<\d+x(\d+)x\d+xf32>", text)]
    assert max(lengths, default=0) <= 2 * (W - 1), lengths
    moved = re.findall(r"stablehlo\.collective_permute[^\n]*-> (tensor<[^>]*f32>)", text)
    assert moved == [f"tensor<2x{W - 1}x{C}xf32>"] * 2, moved  # x's tail on, its cotangent back (ids: int32)
