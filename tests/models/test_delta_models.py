"""Gated DeltaNet and KDA language models: presets, the layers against their definition, the FLOPs
formula by counting, sequence-parallel training against one device, generation against the full
forward pass.

Small models (d 32, two q/k heads of 16 and four value heads) keep the compiles short. The layer
check writes the whole mixer out in float64 numpy token by token (projection, short convolution,
SiLU, unit q/k, gates, the delta rule, gated RMSNorm, W_o). Packed documents run in
``test_packing`` (a Gated DeltaNet hybrid under sp=2).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.checkpoint import config_from_json, config_to_json
from models.cli import config_from_args
from models.config import PRESETS, get_config
from models.delta_layers import KDA, DeltaRuleState, GatedDeltaNet
from models.flops import model_flops_per_token, param_count
from models.layers import SINGLE_DEVICE, LaspContext
from models.model import LanguageModel
from models.sharding import build_mesh
from models.train import Trainer, check_config
from pallas_kernels.gated_delta_rule import products
from tests.models.common import (
    check_generation_equals_full_forward,
    dot_flops,
    large_weights,
    small_hybrid,
    small_model,
    train_config,
)

T = 11
STEPS = 20
ATOL = 5e-5  # float32 reduction order differs between meshes
# the models' own tests run the op's token scan: the chunked XLA path (the CPU default, checked
# against the definition in test_layer_matches_definition and against the scan in the op's tests)
# compiles its gradient ~10x slower, and the sharding, documents and decoding are the same either way
IMPL = "reference"


def test_presets_and_cli():
    for family, sizes in (("gdn", {"0.4b": 0.47e9, "1.3b": 1.36e9}), ("kda", {"0.4b": 0.39e9, "1.3b": 1.38e9})):
        for size, params in sizes.items():
            config = PRESETS[f"{family}-{size}"]
            model = nnx.eval_shape(lambda c=config: LanguageModel(c, rngs=nnx.Rngs(0)))
            n = param_count(nnx.state(model, nnx.Param))
            assert abs(n - params) < 0.02e9, (family, size, n)
    gdn = get_config("gdn-1.3b")
    assert (gdn.d_model, gdn.n_heads, gdn.v_heads, gdn.head_dim, gdn.conv_size) == (2048, 16, 32, 128, 4)
    assert get_config("kda-1.3b").v_heads == 16
    hybrid = get_config("gdn-hybrid-1.3b")
    assert hybrid.types == ("linear", "linear", "linear", "softmax") * 5  # Qwen3-Next's 3 : 1
    assert get_config("gdn-hybrid-tiny").types == ("linear", "linear", "linear", "softmax")
    # the checkpoint's JSON config reads back equal (hybrids' layer_types come back as lists)
    saved = json.loads(json.dumps(config_to_json(train_config(model=hybrid))))
    assert config_from_json(saved).model == hybrid
    config = config_from_args(["--preset", "kda-tiny", "--demo", "--strategy", "allgather"])
    assert config.model.family == "kda" and (config.mesh.dp, config.mesh.sp) == (2, 4)
    with pytest.raises(ValueError, match="n_v_heads must be a multiple of n_heads"):
        get_config("gdn-tiny", n_v_heads=6)
    with pytest.raises(ValueError, match="strategy must be one of"):
        check_config(train_config(model=small_model("gdn"), mesh=dict(strategy="gather_kv")), 1)


# ---------------------------------------------------------------- the layers, written out in float64


def _silu(x):
    return x / (1 + np.exp(-x))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _f64(param):
    return np.asarray(param[...], np.float64)


def _gates(layer, parts, c):
    """beta [T, Hv], g [T, Hv] or [T, Hv, D], output gate [T, Hv, E] after its activation."""
    group = c.v_heads // c.n_heads
    if isinstance(layer, KDA):
        decay_down, gate_down, b = parts
        f = (decay_down @ _f64(layer.decay_up.kernel) + _f64(layer.dt_bias)).reshape(T, c.n_heads, c.head_dim)
        rate = np.exp(_f64(layer.a_log))[:, None]
        bound = c.gate_lower_bound
        g = -rate * _softplus(f) if bound is None else bound * _sigmoid(rate * f)
        gate = _sigmoid(gate_down @ _f64(layer.gate_up.kernel) + _f64(layer.gate_bias))
        return np.repeat(_sigmoid(b), group, axis=1), np.repeat(g, group, axis=1), gate
    z, a, b = parts
    return _sigmoid(b), -np.exp(_f64(layer.a_log)) * _softplus(a + _f64(layer.dt_bias)), _silu(z)


def _definition(layer, x, c):
    h, hv, dh, width = c.n_heads, c.v_heads, c.head_dim, c.conv_size
    widths = (layer.conv_channels, *layer.gate_widths())
    parts = np.split(x @ _f64(layer.in_proj.kernel), np.cumsum(widths)[:-1], axis=-1)
    padded = np.concatenate([np.zeros((width - 1, parts[0].shape[1])), parts[0]])
    conv = _f64(layer.conv_weight)
    qkv = _silu(np.stack([sum(conv[i] * padded[t + i] for i in range(width)) for t in range(T)]))
    q, k, v = np.split(qkv, [h * dh, 2 * h * dh], axis=-1)
    q, k = (z.reshape(T, h, dh) / np.sqrt((z.reshape(T, h, dh) ** 2).sum(-1, keepdims=True) + 1e-6) for z in (q, k))
    v = v.reshape(T, hv, dh)
    beta, g, gate = _gates(layer, parts[1:], c)
    state = np.zeros((hv, dh, dh))
    o = np.zeros((T, hv, dh))
    for t in range(T):
        for j in range(hv):
            i = j // (hv // h)  # the q/k head serving value head j
            decay = np.exp(g[t, j])
            state[j] = (decay[:, None] if np.ndim(decay) else decay) * state[j]
            state[j] += beta[t, j] * np.outer(k[t, i], v[t, j] - state[j].T @ k[t, i])
            o[t, j] = dh**-0.5 * state[j].T @ q[t, i]
    o = o / np.sqrt((o**2).mean(-1, keepdims=True) + c.norm_eps) * _f64(layer.norm_scale)
    o = o * gate.reshape(T, hv, dh)
    return o.reshape(T, hv * dh) @ _f64(layer.out_proj.kernel)


@pytest.mark.parametrize(
    "mixer, bound", [(GatedDeltaNet, None), (KDA, None), (KDA, -5.0)], ids=["gdn", "kda", "kda-lower-bound"]
)
def test_layer_matches_definition(rng, mixer, bound):
    config = small_model("gdn" if mixer is GatedDeltaNet else "kda").replace(gate_lower_bound=bound)
    layer = mixer.from_config(config, 0, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    if mixer is KDA:
        assert layer.gate_lower_bound == bound
    x = rng.standard_normal((1, T, config.d_model))
    got, _ = jax.jit(lambda x: layer(x, SINGLE_DEVICE, jnp.arange(T)))(jnp.asarray(x, jnp.float32))
    want = _definition(layer, x[0], config)
    np.testing.assert_allclose(np.asarray(got[0], np.float64), want, rtol=2e-4, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("family,bound", [("kda", -5.0), ("kda", None), ("gdn", None)])
def test_layer_tells_the_op_its_gate_bound(rng, monkeypatch, family, bound):
    """The layer passes its gate bound to the op (``gate_lower_bound``). On the Pallas path
    (interpret mode, 16-row tiles) KDA's −5 leaves the kernels one form, chosen at trace time
    (``products._cases`` gives lowest = highest case), where without the bound all forms stay; the
    output equals, bit for bit, that of the op not told (its gates never reach below the bound, so
    its run-time check picks the same form)."""
    import models.delta_layers as delta_layers

    real, seen, cases = delta_layers.lasp_gated_delta_rule, [], []
    real_cases = products._cases

    def op(*args, told=True, **kwargs):
        seen.append(kwargs["gate_lower_bound"])
        return real(*args, **(kwargs if told else kwargs | {"gate_lower_bound": None}))

    def spy(statics, rows):
        cases.append(real_cases(statics, rows))
        return cases[-1]

    config = small_model(family).replace(gate_lower_bound=bound)
    layer = (KDA if family == "kda" else GatedDeltaNet).from_config(config, 0, rngs=nnx.Rngs(0))
    x = jnp.asarray(30 * rng.standard_normal((1, T, config.d_model)), jnp.float32)  # saturating gates
    ctx = LaspContext(impl="pallas")
    monkeypatch.setattr(products, "_cases", spy)
    monkeypatch.setattr(delta_layers, "lasp_gated_delta_rule", op)
    got, _ = layer(x, ctx, jnp.arange(T))
    told_cases, cases[:] = list(cases), []
    monkeypatch.setattr(delta_layers, "lasp_gated_delta_rule", functools.partial(op, told=False))
    want, _ = layer(x, ctx, jnp.arange(T))
    assert seen == [bound, bound]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    if family == "kda":
        assert told_cases and cases  # per-channel gates: the kernels asked which forms to build
        assert all(low == top for low, top in told_cases) is (bound is not None), told_cases
        assert all(low == 0 for low, _ in cases), cases
    else:
        assert not told_cases and not cases  # scalar gates: one form, no question


def test_kda_gate_lower_bound_keeps_the_kernels_factored_form(rng):
    """Saturating inputs: with ``gate_lower_bound=-5`` KDA's log decays stay in [-5, 0] and every 16-row
    diagonal tile of their chunk-local cumulative sums passes the Pallas kernels' check for the
    factored form; the unbounded softplus gates of the same layer fail it."""
    config = small_model("kda")
    x = jnp.asarray(30 * rng.standard_normal((2, 128, config.d_model)), jnp.float32)

    def decays(bound):
        layer = KDA.from_config(config.replace(gate_lower_bound=bound), 0, rngs=nnx.Rngs(0))
        _, (_, g, _) = layer._split(x, SINGLE_DEVICE)
        return g

    def factored(g):  # cumulative sums within 64-token chunks, as the kernels form them
        b = jnp.cumsum(g.reshape(2, 2, 64, *g.shape[2:]), axis=2).reshape(g.shape)
        return bool(products.diag_tiles_bounded(b, 16))

    bounded = decays(-5.0)
    assert float(bounded.min()) >= -5.0 and float(bounded.max()) <= 0.0 and float(bounded.min()) < -4.9
    assert factored(bounded)
    assert not factored(decays(None))
    for bad in (0.0, 1.0, True, "x", -np.inf, np.nan):
        with pytest.raises(ValueError, match="gate_lower_bound must be a negative number"):
            config.replace(gate_lower_bound=bad)
        with pytest.raises(ValueError, match="gate_lower_bound must be a negative number"):
            KDA(config.d_model, config.n_heads, gate_lower_bound=bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bounds KDA's gates; family='gdn'"):
        small_model("gdn").replace(gate_lower_bound=-5.0)
    args = ["--preset", "kda-tiny", "--model.gate_lower_bound", "-5"]
    assert config_from_args(args).model.gate_lower_bound == -5.0


# ---------------------------------------------------------------- FLOPs by counting


@pytest.mark.parametrize("family", ["gdn", "kda"])
def test_flops_formula_counts_the_decode_step(family):
    """The formula (training = 3 × forward) against the matmul FLOPs of one decoded token counted
    from its jaxpr: the weights, the convolution taps and the three D×E products per value head."""
    config = small_model(family, n_heads=4, n_v_heads=8, conv_size=3)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    states = model.init_states(1)
    assert all(isinstance(s, DeltaRuleState) for s in states)
    jaxpr = jax.make_jaxpr(model.decode_step)(jnp.zeros((1,), jnp.int32), states, jnp.int32(0)).jaxpr
    assert 3 * dot_flops(jaxpr) == model_flops_per_token(config, 4096)


# ---------------------------------------------------------------- training under sp = one device


def losses(config, n_devices):
    result = Trainer(config, devices=jax.devices()[:n_devices], log=lambda *a: None).fit()
    return np.array([result["losses"][s] for s in range(1, config.run.steps + 1)])


MODELS = {"gdn-hybrid": lambda: small_hybrid("gdn"), "kda": lambda: small_model("kda", n_layers=1)}


@functools.cache
def reference(name: str) -> np.ndarray:
    return losses(train_config(steps=STEPS, model=MODELS[name](), mesh=dict(impl=IMPL)), 1)


# sp=2 with the ring (LASP, and the softmax layer's ring), sp=4 with allgather (LASP-2) beside dp=2
# and FSDP: every compile is the cost here, so two meshes cover both sizes and both strategies
CASES = {
    ("gdn-hybrid", "sp2-ring"): dict(dp=1, sp=2, mesh=dict(strategy="ring", softmax_strategy="ring", impl=IMPL)),
    ("kda", "dp2xsp4-allgather-fsdp"): dict(dp=2, sp=4, mesh=dict(strategy="allgather", fsdp=True, impl=IMPL)),
}


@pytest.mark.parametrize("name, case", list(CASES), ids=[f"{n}-{c}" for n, c in CASES])
def test_sequence_parallel_training_equals_one_device(name, case):
    kw = CASES[name, case]
    got = losses(train_config(steps=STEPS, model=MODELS[name](), **kw), kw["dp"] * kw["sp"])
    want = reference(name)
    assert want[-1] < want[0] - 0.5, f"the reference run did not learn: {want}"
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{name} {case}")


# ---------------------------------------------------------------- generation = the full forward


@pytest.mark.parametrize("name, sp", [("gdn-hybrid", 4), ("kda", 1)], ids=["gdn-hybrid-sp4-prefill", "kda"])
def test_generation_equals_full_forward(rng, name, sp):
    """sp=4 prefills 8 tokens (shards of 2 < W − 1: the convolution reads two ranks back), the
    recurrence feeds the other 3 prompt tokens, then 6 new tokens are decoded."""
    model = large_weights(LanguageModel(MODELS[name](), rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
    prompt = rng.integers(0, 256, (2, T)).astype(np.int32)
    ctx = LaspContext(impl=IMPL)
    if sp > 1:
        ctx = LaspContext(mesh=build_mesh(1, sp, jax.devices()[:sp]), strategy="allgather", impl=IMPL)
    fed = [7, 8, 9, 10] if sp == 4 else [10]
    check_generation_equals_full_forward(model, prompt, ctx, new_tokens=6, fed=fed)
