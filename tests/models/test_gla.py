"""Gated Linear Attention (GLA) language models: presets and the CLI, the layer against its
definition, the FLOPs formula by counting, sequence-parallel training against one device (ring and
allgather), a cache hand-off, generation against the full forward pass.

Small models (d 32, two query heads of 16 sharing one key/value head) keep the compiles short. The
layer check writes the whole mixer out in float64 numpy token by token (projection, the low-rank
per-channel gate, the recurrence, gated RMSNorm, W_o). Packed documents run in ``test_packing``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.cli import config_from_args
from models.config import PRESETS, get_config
from models.flops import model_flops_per_token, param_count
from models.gla_layers import GatedLinearAttention
from models.layers import LaspContext, LinearCache
from models.model import LanguageModel
from models.sharding import build_mesh
from models.train import Trainer
from tests.helpers import rel_err
from tests.models.common import (
    check_generation_equals_full_forward,
    dot_flops,
    large_weights,
    small_model,
    train_config,
)

T = 11
STEPS = 6
ATOL = 5e-5  # float32 reduction order differs between meshes
# training and decoding run the op's token scan: the chunked XLA path's gradient compiles ~2x slower
# on the CPU (it runs in test_layer_matches_definition and the op's own tests), and the sharding,
# the strategies, documents and decoding are the same either way
IMPL = "reference"


def test_presets_and_cli():
    for size, params in {"0.4b": 0.40e9, "1.3b": 1.355e9}.items():
        config = PRESETS[f"gla-{size}"]
        model = nnx.eval_shape(lambda c=config: LanguageModel(c, rngs=nnx.Rngs(0)))
        n = param_count(nnx.state(model, nnx.Param))
        assert abs(n - params) < 0.01e9, (size, n)
    big = get_config("gla-1.3b")
    assert (big.d_model, big.n_layers, big.n_heads, big.head_dim, big.mlp) == (2048, 22, 16, 128, "swiglu")
    config = config_from_args(["--preset", "gla-tiny", "--demo", "--strategy", "allgather"])
    assert config.model.family == "gla" and (config.mesh.dp, config.mesh.sp) == (2, 4)
    assert type(LanguageModel(small_model("gla"), rngs=nnx.Rngs(0)).blocks[0].attn) is GatedLinearAttention
    with pytest.raises(ValueError, match="n_heads must be a multiple of n_kv_heads"):
        GatedLinearAttention(32, 4, n_kv_heads=3, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- the layer, written out in float64


def _f64(param):
    return np.asarray(param[...], np.float64)


def _definition(layer, x):
    s = layer.spec
    h, hk, dh = s.n_heads, s.n_kv_heads, s.head_dim
    t = x.shape[0]
    q, k, v, r, down = np.split(x @ _f64(layer.in_proj.kernel), np.cumsum(layer.widths)[:-1], axis=-1)
    logits = down @ _f64(layer.gate_up.kernel) + _f64(layer.gate_bias)
    g = -np.logaddexp(0.0, -logits).reshape(t, h, dh) / 16  # logsigmoid / 16
    q, k, v = q.reshape(t, h, dh), k.reshape(t, hk, dh), v.reshape(t, hk, dh)
    state, o = np.zeros((h, dh, dh)), np.zeros((t, h, dh))
    for i in range(t):
        for j in range(h):
            kv = j // (h // hk)  # the key/value head query head j reads
            state[j] = np.exp(g[i, j])[:, None] * state[j] + np.outer(k[i, kv], v[i, kv])
            o[i, j] = dh**-0.5 * q[i, j] @ state[j]
    o = o / np.sqrt((o**2).mean(-1, keepdims=True) + s.norm_eps) * _f64(layer.norm_scale)
    o = o * (r / (1 + np.exp(-r))).reshape(t, h, dh)
    return o.reshape(t, h * dh) @ _f64(layer.out_proj.kernel)


def test_layer_matches_definition(rng):
    """The chunked per-channel op (``impl="xla"``, the CPU default) inside the layer; gate biases
    spread so the channels decay at different rates (0.5 to 1 per token)."""
    config = small_model("gla")
    layer = GatedLinearAttention.from_config(config, 0, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    layer.gate_bias[...] = jnp.asarray(rng.uniform(-12.0, 4.0, layer.gate_bias.shape), jnp.float32)
    x = rng.standard_normal((1, T, config.d_model))
    got, _ = jax.jit(lambda x: layer(x, LaspContext(impl="xla")))(jnp.asarray(x, jnp.float32))
    want = _definition(layer, x[0])
    np.testing.assert_allclose(np.asarray(got[0], np.float64), want, rtol=2e-4, atol=2e-5 * np.abs(want).max())


def test_cache_continues_the_sequence(rng):
    layer = GatedLinearAttention(32, 4, n_kv_heads=2, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.standard_normal((2, T, 32)), jnp.float32)
    run = nnx.jit(lambda layer, x, cache: layer(x, LaspContext(impl=IMPL), cache=cache))
    whole, none = run(layer, x, None)
    assert none is None
    first, cache = run(layer, x[:, :4], layer.init_cache(2))
    second, cache = run(layer, x[:, 4:], cache)
    assert isinstance(cache, LinearCache) and int(cache.length) == T
    assert rel_err(np.asarray(jnp.concatenate([first, second], axis=1)), np.asarray(whole)) < 1e-5


# ---------------------------------------------------------------- FLOPs by counting


def test_flops_formula_counts_the_decode_step():
    """The formula (training = 3 × forward) against the matmul FLOPs of one decoded token counted
    from its jaxpr: the weights (the rank-16 gate included) and the write and readout per head."""
    config = small_model("gla", n_heads=4, n_kv_heads=2)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    jaxpr = jax.make_jaxpr(model.decode_step)(jnp.zeros((1,), jnp.int32), model.init_states(1), jnp.int32(0)).jaxpr
    assert 3 * dot_flops(jaxpr) == model_flops_per_token(config, 4096)


# ---------------------------------------------------------------- training under sp = one device


def losses(config, n_devices):
    result = Trainer(config, devices=jax.devices()[:n_devices], log=lambda *a: None).fit()
    return np.array([result["losses"][s] for s in range(1, config.run.steps + 1)])


@functools.cache
def reference() -> np.ndarray:
    return losses(train_config(steps=STEPS, model=small_model("gla"), mesh=dict(impl=IMPL)), 1)


# sp=2 with the ring (LASP), sp=4 with allgather (LASP-2) beside dp=2 and FSDP
CASES = {
    "sp2-ring": dict(dp=1, sp=2, mesh=dict(strategy="ring", impl=IMPL)),
    "dp2xsp4-allgather-fsdp": dict(dp=2, sp=4, mesh=dict(strategy="allgather", fsdp=True, impl=IMPL)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_training_equals_one_device(case):
    kw = CASES[case]
    got = losses(train_config(steps=STEPS, model=small_model("gla"), **kw), kw["dp"] * kw["sp"])
    want = reference()
    assert want[-1] < want[0] - 0.1, f"the reference run did not learn: {want}"
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=case)


# ---------------------------------------------------------------- generation = the full forward


def test_generation_equals_full_forward(rng):
    """sp=2 prefills 10 tokens (allgather), the recurrence feeds the last prompt token, then 6 new
    tokens are decoded."""
    model = large_weights(LanguageModel(small_model("gla"), rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
    prompt = rng.integers(0, 256, (2, T)).astype(np.int32)
    ctx = LaspContext(mesh=build_mesh(1, 2, jax.devices()[:2]), strategy="allgather", impl=IMPL)
    check_generation_equals_full_forward(model, prompt, ctx, new_tokens=6, fed=[9, 10])
