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

from models.model import LanguageModel
from models.standalone import (
    KDA,
    GatedDeltaNet,
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
