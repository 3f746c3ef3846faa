"""Hybrid models (LASP-2H): softmax-attention layers among linear ones, presets, SP training, decoding.

The softmax layer is checked against its definition written out in float64 numpy; hybrid
training under sequence parallelism (both softmax strategies) must give the single-device loss
curve; generation from the key/value cache must equal a full forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.cli import config_from_args
from models.config import PRESETS, get_config, hybrid_layer_types
from models.flops import model_flops_per_token
from models.layers import SINGLE_DEVICE, LaspContext, SoftmaxAttention, lrpe, rope
from models.model import LanguageModel
from models.sharding import build_mesh
from models.train import Trainer, check_config
from tests.models.common import check_generation_equals_full_forward, large_weights, replace, small_hybrid, train_config

T = 11
STEPS = 20
ATOL = 5e-5  # as for the linear models: float32 reduction order differs between meshes


def test_hybrid_presets_and_softmax_every():
    c = get_config("tnl-hybrid-1b")
    assert c.types == ("linear", "linear", "linear", "softmax") * 4
    assert (c.d_model, c.n_layers, c.n_heads) == (2048, 16, 16)
    assert get_config("linear_llama3-hybrid-tiny").types == ("linear", "softmax")
    for size in ("0.4b", "1b", "7b"):
        for family in ("tnl", "linear-llama3"):
            hybrid, plain = PRESETS[f"{family}-hybrid-{size}"], PRESETS[f"{family}-{size}"]
            assert hybrid.replace(layer_types=None) == plain
            assert hybrid.types.count("softmax") == plain.n_layers // 4
    assert get_config("tnl-1b", softmax_every=2).types == ("linear", "softmax") * 8
    assert get_config("tnl-hybrid-1b", softmax_every=0).layer_types is None
    assert get_config("tnl-hybrid-1b", n_layers=8).types == ("linear", "linear", "linear", "softmax") * 2
    assert hybrid_layer_types(3, 3) == ("linear", "linear", "softmax")
    with pytest.raises(ValueError, match="softmax_every must be a positive int"):
        hybrid_layer_types(4, -1)
    with pytest.raises(ValueError, match="exceeds n_layers"):
        get_config("tnl-tiny", softmax_every=3)
    assert config_from_args(["--preset", "linear-llama3-1b", "--softmax-every", "8"]).model.types.count("softmax") == 2


def test_hybrid_flops_count_the_attention():
    linear, hybrid = get_config("tnl-1b"), get_config("tnl-hybrid-1b")
    h, dh = 16, 128
    delta = model_flops_per_token(hybrid, 4096) - model_flops_per_token(linear, 4096)
    # 4 layers lose the recurrence (3·4·H·D·E) and gain causal attention (3·2·H·(D+E)·T/2)
    assert delta == 4 * (3 * 2 * h * 2 * dh * 4096 / 2 - 3 * 4 * h * dh * dh)


def _softmax_definition(q, k, v, scale):
    """Causal softmax attention in float64: q [T, H, D], k [T, Hk, D], v [T, Hk, E]."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("ihd,jhd->hij", q, k) * scale
    s = np.where(np.tril(np.ones((len(q), len(q)), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hij,jhe->ihe", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("family", ["tnl", "linear_llama3"])
def test_softmax_layer_matches_definition(rng, family):
    kw = dict(n_heads=4, n_kv_heads=2) if family == "linear_llama3" else dict(n_heads=4)
    config = small_hybrid(family, **kw)
    attn = SoftmaxAttention.from_config(config, 1, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = rng.standard_normal((1, T, config.d_model)).astype(np.float32)
    got = np.asarray(attn(jnp.asarray(x), SINGLE_DEVICE, jnp.arange(T))[0][0], np.float64)
    w_in = np.asarray(attn.in_proj.kernel[...], np.float64)
    w_out = np.asarray(attn.out_proj.kernel[...], np.float64)
    h, hk, dh = config.n_heads, config.kv_heads, config.head_dim
    parts = np.split(x[0].astype(np.float64) @ w_in, np.cumsum([h * dh, hk * dh, hk * dh]), axis=-1)
    q, k, v = parts[0].reshape(T, h, dh), parts[1].reshape(T, hk, dh), parts[2].reshape(T, hk, dh)
    encode = (lambda z: lrpe(z, jnp.arange(T), config.lrpe_base)) if family == "tnl" else None
    encode = encode or (lambda z: rope(z, jnp.arange(T), config.rope_theta))
    q, k = (np.asarray(encode(jnp.asarray(z[None], jnp.float32))[0], np.float64) for z in (q, k))
    o = _softmax_definition(q, k, v, q.shape[-1] ** -0.5).reshape(T, h * dh)
    if family == "tnl":  # TNL's SRMSNorm-and-gate output
        o = o / np.sqrt(np.mean(o**2, axis=-1, keepdims=True) + config.norm_eps) * parts[3]
    np.testing.assert_allclose(got, o @ w_out, rtol=2e-4, atol=2e-5)


def losses(config, n_devices):
    result = Trainer(config, devices=jax.devices()[:n_devices], log=lambda *a: None).fit()
    return np.array([result["losses"][s] for s in range(1, config.run.steps + 1)])


@functools.cache
def reference(family: str) -> np.ndarray:
    return losses(train_config(family, steps=STEPS, model=small_hybrid(family)), 1)


CASES = {
    ("tnl", "sp2-softmax-ring"): dict(dp=1, sp=2, mesh=dict(softmax_strategy="ring")),
    ("tnl", "sp4-softmax-allgather"): dict(dp=1, sp=4, mesh=dict(strategy="allgather", softmax_strategy="allgather")),
    ("linear_llama3", "dp2xsp2-softmax-allgather"): dict(dp=2, sp=2, mesh=dict(softmax_strategy="allgather")),
    ("linear_llama3", "sp4-softmax-ring"): dict(dp=1, sp=4, mesh=dict(softmax_strategy="ring")),
}


@pytest.mark.parametrize("family, case", list(CASES), ids=[f"{f}-{c}" for f, c in CASES])
def test_hybrid_sequence_parallel_loss_curve_equals_single_device(family, case):
    kw = CASES[family, case]
    config = train_config(family, steps=STEPS, model=small_hybrid(family), **kw)
    assert "softmax" in config.model.types
    got = losses(config, kw["dp"] * kw["sp"])
    want = reference(family)
    assert want[-1] < want[0] - 0.5, f"the reference run did not learn: {want}"
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{family} {case}")


@pytest.mark.parametrize("family, sp", [("tnl", 1), ("linear_llama3", 4)], ids=["tnl-one-device", "llama-sp4-prefill"])
def test_hybrid_generation_equals_full_forward(rng, family, sp):
    kw = dict(n_heads=4, n_kv_heads=2) if family == "linear_llama3" else {}
    model = large_weights(LanguageModel(small_hybrid(family, **kw), rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
    prompt = rng.integers(0, 256, (2, 11)).astype(np.int32)  # sp=4: 8 by the parallel prefill + 3 fed
    ctx = LaspContext(mesh=build_mesh(1, sp, jax.devices()[:sp]), softmax_strategy="ring") if sp > 1 else SINGLE_DEVICE
    fed = [7, 8, 9, 10] if sp == 4 else [10]
    check_generation_equals_full_forward(model, prompt, ctx, new_tokens=6, fed=fed)


def test_hybrid_bad_uses_raise():
    model = LanguageModel(small_hybrid("tnl"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pass cache_size"):
        model.init_states(2)
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="cache_size must be >= the prompt length 4"):
        model.prefill(tokens, cache_size=3)
    with pytest.raises(ValueError, match="starts from the first token"):
        model.prefill(tokens, initial_states=model.init_states(1, 8), cache_size=8)
    config = train_config("tnl", model=small_hybrid("tnl"), mesh=dict(softmax_strategy="ulysses"))
    with pytest.raises(ValueError, match="softmax_strategy must be one of"):
        check_config(config, 1)
    assert replace(config, "mesh", softmax_strategy="ring").mesh.softmax_strategy == "ring"
