"""The standalone token mixers (``models.standalone``): own constructor arguments, caches, Linen forms.

Each layer on fresh random inputs: a sequence run in two pieces through ``cache`` equals the
whole run (for the linear layers this is the state hand-off, for softmax the key/value cache);
the layer a language model builds (``from_config``) is the standalone class with the same
arguments (same parameter names, same output); the Linen wrapper with the NNX layer's parameters
gives the NNX layer's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

from lasp_jax import make_mesh
from models.model import LanguageModel
from models.standalone import (
    KDA,
    GatedDeltaNet,
    GatedLinearAttention,
    LaspContext,
    LinearAttention,
    LinenGatedDeltaNet,
    LinenLinearAttention,
    SoftmaxAttention,
    tnl_log_decay,
    to_linen,
)
from tests.helpers import rel_err
from tests.models.common import small_hybrid, small_model

B, T, D, H = 2, 12, 32, 4
DECAY = tuple(tnl_log_decay(H, 0, 2))
LAYERS = {
    "lightning-rope": (LinearAttention, dict(g_gamma=DECAY, position="rope", n_kv_heads=2)),
    "linear-transformer": (LinearAttention, dict(feature_map="elu1", output_norm="denominator")),
    "gdn": (GatedDeltaNet, dict(n_v_heads=8)),
    "softmax-gqa": (SoftmaxAttention, dict(n_kv_heads=2)),
}
# the delta rule's token scan: its eager run dispatches fewer ops than the chunked path
CTX = {"gdn": LaspContext(impl="reference")}


def make(name, seed):
    cls, kwargs = LAYERS[name]
    return cls(D, H, **kwargs, rngs=nnx.Rngs(seed))


def empty_cache(layer):
    return layer.init_cache(B, T) if isinstance(layer, SoftmaxAttention) else layer.init_cache(B)


@pytest.mark.parametrize("name", list(LAYERS))
def test_cache_continues_the_sequence(rng, name):
    layer, ctx = make(name, int(rng.integers(1 << 30))), CTX.get(name)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    run = nnx.jit(lambda layer, x, cache: layer(x, ctx, cache=cache))
    whole, none = run(layer, x, None)
    assert none is None and whole.shape == (B, T, D)
    first, cache = run(layer, x[:, :5], empty_cache(layer))
    second, cache = run(layer, x[:, 5:], cache)
    assert rel_err(np.asarray(jnp.concatenate([first, second], axis=1)), np.asarray(whole)) < 1e-5
    if hasattr(cache, "length"):
        assert int(cache.length) == T


@pytest.mark.parametrize(
    "config, index, cls, kwargs",
    [
        (small_hybrid("tnl", position="lrpe"), 0, LinearAttention, dict(output_norm="srms_gate", position="lrpe")),
        (small_hybrid("linear_llama3"), 1, SoftmaxAttention, dict(n_kv_heads=1, position="rope", norm_eps=1e-5)),
        (small_model("kda"), 0, KDA, dict(n_v_heads=4)),
    ],
    ids=["tnl-linear", "llama-softmax", "kda"],
)
def test_language_model_layers_are_the_standalone_layers(rng, config, index, cls, kwargs):
    """A model's mixer is the standalone class with the same arguments: same parameter names and output."""
    model = LanguageModel(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    mixer = model.blocks[index].attn
    assert type(mixer) is cls
    decay = dict(g_gamma=mixer.log_decay) if cls is LinearAttention else {}
    out_std = config.init_std / np.sqrt(2 * config.n_layers)
    split = dict(split_projections=config.split_projections)  # the presets' default; bitwise equality needs it
    layer = cls(config.d_model, config.n_heads, **kwargs, **decay, **split, out_std=out_std, rngs=nnx.Rngs(0))
    nnx.update(layer, nnx.state(mixer, nnx.Param))  # raises if a name or shape differs
    x = jnp.asarray(rng.standard_normal((B, T, config.d_model)), jnp.float32)
    ctx = LaspContext(impl="reference")
    want, _ = nnx.jit(lambda m, x: m(x, ctx, jnp.arange(T)))(mixer, x)
    got, _ = nnx.jit(lambda m, x: m(x, ctx))(layer, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, linen_cls", [("lightning-rope", LinenLinearAttention), ("gdn", LinenGatedDeltaNet)], ids=["lightning", "gdn"]
)
def test_linen_wrapper_equals_the_layer(rng, name, linen_cls):
    cls, kwargs = LAYERS[name]
    module = linen_cls(D, H, **kwargs)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    variables = jax.jit(module.init)(jax.random.key(int(rng.integers(1 << 30))), x)
    y, _ = jax.jit(module.apply, static_argnums=2)(variables, x, CTX.get(name))
    layer = make(name, 0)
    params = jax.tree.map(lambda m: m.value, variables["params"], is_leaf=lambda v: isinstance(v, bridge.NNXMeta))
    state = nnx.state(layer, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(layer, state)
    want, _ = nnx.jit(lambda m, x: m(x, CTX.get(name)))(layer, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=0, atol=1e-6)
    # the generic form, with a cache through the Linen call
    generic = to_linen(SoftmaxAttention, D, H, n_kv_heads=2)
    v = jax.jit(generic.init)(jax.random.key(0), x)
    cache = SoftmaxAttention(D, H, n_kv_heads=2, rngs=nnx.Rngs(0)).init_cache(B, T)
    _, cache = jax.jit(lambda v, x, c: generic.apply(v, x, cache=c))(v, x[:, :4], cache)
    assert int(cache.length) == 4


def test_standalone_argument_errors():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LinearAttention(D, H, n_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="output_norm"):
        SoftmaxAttention(D, H, output_norm="denominator", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="g_gamma"):
        LinearAttention(D, H, g_gamma=(-0.1,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_v_heads"):
        GatedDeltaNet(D, H, n_v_heads=6, rngs=nnx.Rngs(0))


ALL_MIXERS = [LinearAttention, SoftmaxAttention, GatedDeltaNet, KDA, GatedLinearAttention]


@pytest.mark.parametrize("cls", ALL_MIXERS, ids=lambda c: c.__name__)
def test_mixer_input_errors_name_the_layer_and_shapes(cls):
    """Each mixer checks its input before its projections or the mesh would reject it deep inside jax
    (a wrong width, a missing axis, T = 0, T or B not dividing over the mesh) and refuses a d_model that
    n_heads does not divide (it built d_model // n_heads-wide heads that dropped channels)."""
    layer = cls(D, H, rngs=nnx.Rngs(0))
    name = cls.__name__
    for shape in [(B, T, D + 1), (T, D), (B, 0, D)]:
        with pytest.raises(ValueError, match=rf"{name}: x must be \[B, T, d_model={D}\] with T > 0, got x.shape="):
            layer(jnp.zeros(shape))
    ctx = LaspContext(mesh=make_mesh(dp=2, sp=4), batch_axis="dp")
    with pytest.raises(ValueError, match=rf"{name}: the sequence length must divide over the sequence axis: T=6"):
        layer(jnp.zeros((B, 6, D)), ctx)
    with pytest.raises(ValueError, match=rf"{name}: the batch must divide over the batch axis: B=3"):
        layer(jnp.zeros((3, 8, D)), ctx)
    with pytest.raises(ValueError, match=rf"{name}: seq_axis='context' is not an axis of the mesh"):
        layer(jnp.zeros((B, 8, D)), LaspContext(mesh=make_mesh(dp=2, sp=4), seq_axis="context"))
    # a tuple batch axis (as the ops take it) passes
    tuple_ctx = LaspContext(mesh=make_mesh(dp=2, sp=4), batch_axis=("dp",), impl="xla")
    assert nnx.jit(lambda m, x: m(x, tuple_ctx))(layer, jnp.zeros((B, 8, D)))[0].shape == (B, 8, D)
    with pytest.raises(ValueError, match=rf"{name}: d_model=30 is not a multiple of n_heads=4: pass head_dim"):
        cls(30, H, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=rf"{name}: n_heads must be positive, got n_heads=0"):
        cls(D, 0, rngs=nnx.Rngs(0))
    assert cls(30, H, head_dim=8, rngs=nnx.Rngs(0))(jnp.zeros((1, 4, 30)))[0].shape == (1, 4, 30)


def test_softmax_cache_overflow_raises_or_poisons(rng):
    """Writing past a key/value cache's capacity: eagerly a ValueError; under jit (a traced length) the
    overflowing call's outputs are NaN, never the silently wrong attention of a clamped write. Within
    capacity the outputs stay finite."""
    layer = SoftmaxAttention(D, H, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((1, 12, D)), jnp.float32)
    _, cache = layer(x[:, :6], cache=layer.init_cache(1, 8))
    with pytest.raises(ValueError, match="the cache holds 8 positions: 6 filled \\+ 6 new tokens overflow it"):
        layer(x[:, 6:], cache=cache)
    run = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
    ok, cache = run(layer, x[:, 6:8], cache)
    assert np.all(np.isfinite(np.asarray(ok)))
    overflow, _ = run(layer, x[:, 8:10], cache)
    assert np.all(np.isnan(np.asarray(overflow)))
    k_cache, v_cache = layer.init_cache(1, 4).k, layer.init_cache(1, 4).v
    with pytest.raises(ValueError, match="the cache holds 4 positions: 4 filled \\+ 1 new tokens overflow it"):
        layer.step(x[:, 0], (k_cache, v_cache), 4)
    step = nnx.jit(lambda layer, x, state, pos: layer.step(x, state, pos))
    # the cache path is not sequence-parallel: one token under a sp=2 mesh continues (no T % sp check)
    ctx = LaspContext(mesh=make_mesh(dp=1, sp=2, devices=jax.devices()[:2]))
    one, _ = nnx.jit(lambda layer, x, cache: layer(x, ctx, cache=cache))(layer, x[:, :1], layer.init_cache(1, 8))
    assert one.shape == (1, 1, D) and np.all(np.isfinite(np.asarray(one)))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        SoftmaxAttention(D, H, scale=float("nan"), rngs=nnx.Rngs(0))
    assert np.all(np.isfinite(np.asarray(step(layer, x[:, 0], (k_cache, v_cache), jnp.int32(3))[0])))
    assert np.all(np.isnan(np.asarray(step(layer, x[:, 0], (k_cache, v_cache), jnp.int32(4))[0])))
