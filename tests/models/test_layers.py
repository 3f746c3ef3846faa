"""Layers against naive definitions written out here token by token, on fresh random inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import PRESETS, get_config
from models.layers import SINGLE_DEVICE, LinearAttention, alibi_slopes, lrpe, rope, srms, tnl_log_decay
from models.model import LanguageModel
from tests.models.common import small_model

T = 11


def _weights(layer):
    return np.asarray(layer.in_proj.kernel[...], np.float64), np.asarray(layer.out_proj.kernel[...], np.float64)


def _silu(x):
    return x / (1 + np.exp(-x))


def _causal_sum(q, k, v, decay):
    """o_t = Σ_{s≤t} decay^(t−s) (q_t·k_s) v_s per head, in float64: q, k [T, H, D], v [T, H, E], decay [H]."""
    t = q.shape[0]
    o = np.zeros(q.shape[:2] + v.shape[2:])
    for i in range(t):
        for j in range(i + 1):
            o[i] += (decay ** (i - j) * np.einsum("hd,hd->h", q[i], k[j]))[:, None] * v[j]
    return o


def _layer_and_input(rng, config, layer=0):
    attn = LinearAttention.from_config(config, layer, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = rng.standard_normal((1, T, config.d_model)).astype(np.float32)
    out, _ = attn(jnp.asarray(x), SINGLE_DEVICE, jnp.arange(T))
    return attn, x[0].astype(np.float64), np.asarray(out[0], np.float64)


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_tnl_norm_linear_attention_matches_definition(rng, layer):
    config = small_model("tnl", n_layers=4, position="none", n_heads=4)
    attn, x, got = _layer_and_input(rng, config, layer)
    w_in, w_out = _weights(attn)
    h, dh, d = config.n_heads, config.head_dim, config.d_model
    q, k, v, u = np.split(x @ w_in, 4, axis=-1)
    q, k = _silu(q).reshape(T, h, dh), _silu(k).reshape(T, h, dh)
    decay = np.exp(-alibi_slopes(h) * (1 - layer / 3 + 1e-5))  # λ_h = exp(−s_{h,l}), scale 1
    o = _causal_sum(q, k, v.reshape(T, h, dh), decay).reshape(T, d)
    o = o / np.sqrt(np.mean(o**2, axis=-1, keepdims=True) + config.norm_eps) * u
    np.testing.assert_allclose(got, o @ w_out, rtol=2e-4, atol=2e-5)


def test_linear_transformer_attention_matches_definition(rng):
    config = small_model("linear_transformer")
    attn, x, got = _layer_and_input(rng, config)
    w_in, w_out = _weights(attn)
    h, dh = config.n_heads, config.head_dim
    q, k, v = (p.reshape(T, h, dh) for p in np.split(x @ w_in, 3, axis=-1))
    phi = lambda z: np.where(z > 0, z + 1, np.exp(z))  # elu + 1
    num = _causal_sum(phi(q), phi(k), v, np.ones(h))
    den = _causal_sum(phi(q), phi(k), np.ones((T, h, 1)), np.ones(h))
    np.testing.assert_allclose(got, (num / den).reshape(T, -1) @ w_out, rtol=2e-4, atol=2e-5)


def test_linear_llama3_grouped_attention_matches_definition(rng):
    config = small_model("linear_llama3", n_heads=4, n_kv_heads=2, d_model=32)
    attn, x, got = _layer_and_input(rng, config)
    w_in, w_out = _weights(attn)
    h, hk, dh = config.n_heads, config.kv_heads, config.head_dim
    q, k, v = np.split(x @ w_in, np.cumsum([h * dh, hk * dh]), axis=-1)
    q, k, v = _silu(q).reshape(T, h, dh), _silu(k).reshape(T, hk, dh), v.reshape(T, hk, dh)
    pos = jnp.arange(T)
    q = np.asarray(rope(jnp.asarray(q[None], jnp.float32), pos, config.rope_theta)[0], np.float64)
    k = np.asarray(rope(jnp.asarray(k[None], jnp.float32), pos, config.rope_theta)[0], np.float64)
    group = h // hk  # query head i reads key/value head i // group
    o = _causal_sum(q, np.repeat(k, group, axis=1), np.repeat(v, group, axis=1), np.ones(h)) * dh**-0.5
    o = o / np.sqrt(np.mean(o**2, axis=-1, keepdims=True) + config.norm_eps)  # head RMSNorm, gain 1 at init
    np.testing.assert_allclose(got, o.reshape(T, -1) @ w_out, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("encode", ["lrpe", "rope"])
def test_position_encodings_are_relative(rng, encode):
    """q'·k' depends only on the distance of the positions: shifting both by any offset changes nothing."""
    q = jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32)
    fn = (lambda x, p: lrpe(x, p, 10_000.0)) if encode == "lrpe" else (lambda x, p: rope(x, p, 10_000.0))
    base = jnp.arange(5)
    scores = lambda off: jnp.einsum("bihd,bjhd->bhij", fn(q, base + off), fn(k, base + off))
    np.testing.assert_allclose(scores(0), scores(1000), rtol=1e-4, atol=1e-4)
    assert not np.allclose(scores(0), jnp.einsum("bihd,bjhd->bhij", q, k), atol=1e-3)  # positions do matter


def test_alibi_slopes_and_tnl_decay():
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    six = alibi_slopes(6)  # not a power of 2: the 4 slopes of 4 heads plus every other of 8 heads
    np.testing.assert_allclose(six, np.concatenate([2.0 ** (-2.0 * np.arange(1, 5)), 2.0 ** -np.array([1, 3])]))
    first, last = tnl_log_decay(8, 0, 5), tnl_log_decay(8, 4, 5)
    np.testing.assert_allclose(first, -(2.0 ** -np.arange(1, 9)) * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(last, -(2.0 ** -np.arange(1, 9)) * 1e-5, rtol=1e-6)
    assert np.all(np.diff([tnl_log_decay(8, i, 5)[0] for i in range(5)]) > 0), "decay must weaken with depth"


def test_srms_has_unit_rms_and_no_parameters(rng):
    x = jnp.asarray(3.0 * rng.standard_normal((4, 16)) + 1.0, jnp.float32)
    y = srms(x, 1e-6)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, axis=-1)), 1.0, rtol=1e-5)
    model = LanguageModel(small_model("tnl"), rngs=nnx.Rngs(0))
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any("norm" in n for n in names), f"TNL norms must have no gain: {sorted(names)}"


def _count(config) -> int:
    abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_preset_shapes():
    c = get_config("tnl-1b")
    assert (c.n_layers, c.d_model, c.n_heads, c.vocab_size) == (16, 2048, 16, 64_000)
    d, f, v, layers = 2048, 5632, 64_000, 16
    assert _count(c) == 2 * v * d + layers * (4 * d * d + d * d + 3 * d * f)  # untied head; no norm gains
    for size in ("tiny", "0.4b", "1b", "7b"):
        for family in ("tnl", "linear-transformer", "linear-llama3"):
            cfg = PRESETS[f"{family}-{size}"]
            assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == (
                PRESETS[f"tnl-{size}"].d_model,
                PRESETS[f"tnl-{size}"].n_layers,
                PRESETS[f"tnl-{size}"].n_heads,
            )
    assert 0.9e9 < _count(get_config("linear-llama3-1b")) < 1.6e9
    assert 6e9 < _count(get_config("tnl-7b")) < 8e9


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(d_model=30, n_heads=4), "d_model must be a multiple of n_heads"),
        (dict(n_kv_heads=3), "n_heads must be a multiple of n_kv_heads"),
        (dict(layer_types=("linear",)), "one type per layer"),
        (dict(layer_types=("linear", "mamba")), "layer_types may hold only"),
        (dict(family="gpt"), "family must be one of"),
        (dict(feature_map="relu2"), "feature_map must be one of"),
        (dict(n_layers=0), "n_layers must be a positive int"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(foo=1), "unknown ModelConfig fields"),
    ],
)
def test_bad_model_configs_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        small_model("linear_llama3", n_heads=4).replace(**changes)


def test_unknown_preset_and_bad_tokens_raise():
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("tnl-3b")
    model = LanguageModel(small_model("tnl"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must be integer"):
        model(jnp.zeros((2, 8), jnp.float32))


def test_chunked_loss_and_remat_equal_the_plain_loss(rng):
    from models.model import lm_loss

    model = LanguageModel(small_model("tnl", n_layers=1), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 32)), jnp.int32)
    targets = jnp.asarray(rng.integers(-1, 256, (2, 32)), jnp.int32)  # -1: not counted

    def loss(params, remat, chunks):
        return lm_loss(nnx.merge(graphdef, params), tokens, targets, remat=remat, loss_chunks=chunks)[0]

    loss_and_grads = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
    want, want_grads = loss_and_grads(params, "none", 1)
    ref_logits = np.asarray(model(tokens), np.float64)
    t = np.asarray(targets)
    lse = np.log(np.exp(ref_logits).sum(-1))
    picked = np.take_along_axis(ref_logits, np.maximum(t, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(want), ((lse - picked) * (t >= 0)).sum() / (t >= 0).sum(), rtol=1e-5)
    for remat, chunks in (("full", 4), ("dots", 2)):
        got, grads = loss_and_grads(params, remat, chunks)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_is_close_to_float32(rng):
    config = small_model("tnl")
    f32 = LanguageModel(config, rngs=nnx.Rngs(3))
    bf16 = LanguageModel(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(3))  # same float32 parameters
    tokens = jnp.asarray(rng.integers(0, 256, (2, 32)), jnp.int32)
    a, b = np.asarray(f32(tokens)), np.asarray(bf16(tokens))
    assert b.dtype == np.float32 and np.all(np.isfinite(b))
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 3e-2
