"""lasp_jax.lasp_attention on 8 fake CPU devices against the single-device float64 reference.

Every strategy on every dp × sp mesh: each shard's output and each shard's dq, dk, dv, dg, plus
d(initial_state), d(g_gamma) and the final state, on fresh random inputs whose values carry the
global shard index (a misordered shard changes the answer), with the gradient of a loss that
reads the final state too (its cotangent must travel back across every shard).
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lasp_jax import STRATEGIES, lasp_attention, lasp_attention_shard, make_mesh
from pallas_kernels import linear_attention
from tests.helpers import rel_err, tol, x64

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
HAS_PALLAS = importlib.util.find_spec("pallas_kernels.linear_attention.pallas_triton") is not None
needs_pallas = pytest.mark.skipif(not HAS_PALLAS, reason="pallas_kernels.linear_attention.pallas_triton not present")
TOKEN_GRADS = ("o", "dq", "dk", "dv", "dg")  # [B, T, ...]: checked shard by shard


def rank_coded_inputs(rng, *, b, t, sp, h=8, hk=2, d=8, e=12, decay="g", init=True, g_range=(0.01, 0.5)):
    """Random inputs plus a component that names the global shard of every token.

    v's first feature is offset by the shard index and q's by a per-shard sign, so a shard that
    is computed in the wrong place, or given another shard's state, shows in its own error.
    """
    shard = np.repeat(np.arange(sp), t // sp)  # global shard of each token
    q = rng.standard_normal((b, t, h, d))
    q[..., 0] += np.where(shard % 2, 1.0, -1.0)[None, :, None]
    k = rng.standard_normal((b, t, hk, d)) / np.sqrt(d)
    v = rng.standard_normal((b, t, hk, e))
    v[..., 0] += shard[None, :, None] + 1.0
    kw = {}
    if decay == "g":
        kw["g"] = -rng.uniform(*g_range, (b, t, h))
    elif decay == "g_gamma":
        kw["g_gamma"] = -rng.uniform(*g_range, (h,))
    if init:
        kw["initial_state"] = rng.standard_normal((b, h, d, e)) / np.sqrt(d)
    return q, k, v, kw


def grads_fn(fn, *, final=True):
    """jit of: o (and final state) and the gradients of <o, do> (+ <final, ds>) w.r.t. every input."""

    def loss(q, k, v, kw, do, ds):
        o, s = fn(q, k, v, **kw, output_final_state=final)
        total = jnp.sum(o.astype(do.dtype) * do)
        if final:
            total = total + jnp.sum(s * ds)
        return total, (o, s)

    @jax.jit
    def run(q, k, v, kw, do, ds):
        grads, (o, s) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, kw, do, ds)
        out = {"o": o, "dq": grads[0], "dk": grads[1], "dv": grads[2]} | {f"d{n}": x for n, x in grads[3].items()}
        return out | ({"final_state": s} if final else {})

    return run


def outputs_and_grads(fn, q, k, v, kw, do, ds, *, final=True):
    out = grads_fn(fn, final=final)(q, k, v, kw, do, ds)
    return {n: np.asarray(x, np.float64) for n, x in out.items()}


@functools.cache
def _reference_fn(final):
    # one jitted oracle for the whole module, so equal shapes compile once
    return grads_fn(lambda *a, **kws: linear_attention(*a, **kws, impl="reference"), final=final)


def reference(q, k, v, kw, do, ds, *, final=True):
    with x64():
        f64 = lambda x: jnp.asarray(x, jnp.float64)
        out = _reference_fn(final)(f64(q), f64(k), f64(v), {n: f64(x) for n, x in kw.items()}, f64(do), f64(ds))
        return {n: np.asarray(x, np.float64) for n, x in out.items()}


def assert_matches(got, want, *, sp, label, dtype=jnp.float32):
    """Each shard of every token-indexed array, and every other array, within the dtype's tolerance."""
    assert set(got) == set(want), (set(got), set(want))
    bound = tol(dtype, want["o"].shape[1])
    bad = {}
    for name, ref in want.items():
        limit = 4 * bound if name in ("dg", "dg_gamma") else bound
        if name in TOKEN_GRADS:
            for r, (a, b) in enumerate(zip(np.split(got[name], sp, axis=1), np.split(ref, sp, axis=1))):
                if (err := rel_err(a, b)) > limit:
                    bad[f"{name}[shard {r}]"] = err
        elif (err := rel_err(got[name], ref)) > limit:
            bad[name] = err
    assert not bad, f"{label}: errors over tolerance {bound:.1e}: {bad}"


def run_case(rng, *, dp, sp, strategy, decay, impl, init=True, final=True, b=None, t=48, split_batch=True, **shape):
    b = b or max(2, dp)
    q, k, v, kw = rank_coded_inputs(rng, b=b, t=t, sp=sp, decay=decay, init=init, **shape)
    do = rng.standard_normal(q.shape[:3] + v.shape[3:])
    ds = rng.standard_normal((b, q.shape[2], q.shape[3], v.shape[3]))
    want = reference(q, k, v, kw, do, ds, final=final)
    mesh = make_mesh(dp, sp)
    batch_axis = "dp" if dp > 1 and split_batch else None

    def fn(*a, **kws):
        return lasp_attention(*a, **kws, mesh=mesh, batch_axis=batch_axis, strategy=strategy, impl=impl)

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = outputs_and_grads(
        fn, f32(q), f32(k), f32(v), {n: f32(x) for n, x in kw.items()}, f32(do), f32(ds), final=final
    )
    assert_matches(got, want, sp=sp, label=f"{strategy} dp={dp} sp={sp} decay={decay} impl={impl}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dp,sp", MESHES, ids=[f"dp{dp}xsp{sp}" for dp, sp in MESHES])
def test_every_shard_matches_reference_xla(rng, dp, sp, strategy):
    """Per-token decay (the hardest case: decays differ per rank and travel with the states)."""
    run_case(rng, dp=dp, sp=sp, strategy=strategy, decay="g", impl="xla")


@pytest.mark.parametrize("decay", ["g_gamma", None], ids=["g_gamma", "nodecay"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_constant_and_no_decay_xla(rng, strategy, decay):
    run_case(rng, dp=2, sp=4, strategy=strategy, decay=decay, impl="xla")


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_batch_replicated_over_the_data_axis(rng, strategy):
    """batch_axis=None on a 2×4 mesh: the data axis stays automatic (no cotangent all-reduce over it)."""
    run_case(rng, dp=2, sp=4, strategy=strategy, decay="g", impl="xla", split_batch=False)


@pytest.mark.parametrize("g_range", [(8.0, 12.0), (1e-7, 1e-6)], ids=["strong", "near-one"])
@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_extreme_decays(rng, strategy, g_range):
    """Decays that kill the state within a token, and decays that keep it for ever: finite and exact."""
    run_case(rng, dp=1, sp=8, strategy=strategy, decay="g", impl="xla", t=32, g_range=g_range)


def test_long_shards(rng):
    """256 tokens per shard: the shard's log decays reach −100s, where differences of prefix sums lose digits."""
    run_case(rng, dp=1, sp=8, strategy="allgather", decay="g", impl="xla", b=1, t=2048, h=2, hk=1, d=8, e=8)


@needs_pallas
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_shard_matches_reference_pallas(rng, strategy):
    run_case(rng, dp=2, sp=4, strategy=strategy, decay="g", impl="pallas", t=32)


@needs_pallas
@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_pallas_constant_decay_sp8(rng, strategy):
    run_case(rng, dp=1, sp=8, strategy=strategy, decay="g_gamma", impl="pallas", t=32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_path_without_state(rng, strategy):
    """No initial state, no final state requested: the path a language model trains on."""
    run_case(rng, dp=2, sp=4, strategy=strategy, decay="g_gamma", impl="xla", init=False, final=False)


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_bfloat16(rng, strategy):
    """bf16 activations, float32 states across shards: within bf16 tolerance of the float64 reference."""
    dp, sp = 2, 4
    q, k, v, kw = rank_coded_inputs(rng, b=2, t=64, sp=sp, decay="g_gamma")
    q, k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in (q, k, v))
    do = rng.standard_normal(q.shape[:3] + v.shape[3:])
    ds = rng.standard_normal((2, q.shape[2], q.shape[3], v.shape[3]))
    want = reference(q, k, v, kw, do, ds)
    mesh = make_mesh(dp, sp)
    fn = lambda *a, **kws: lasp_attention(*a, **kws, mesh=mesh, batch_axis="dp", strategy=strategy, impl="xla")
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = outputs_and_grads(fn, bf16(q), bf16(k), bf16(v), {n: f32(x) for n, x in kw.items()}, f32(do), f32(ds))
    assert_matches(got, want, sp=sp, label=f"bf16 {strategy}", dtype=jnp.bfloat16)


def test_strategies_agree_to_float32_rounding(rng):
    """ring and allgather compute the same prefix: equal to float32 rounding, not just to tolerance."""
    q, k, v, kw = rank_coded_inputs(rng, b=2, t=64, sp=8, decay="g")
    mesh = make_mesh(1, 8)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    kw = {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}
    run = jax.jit(
        lambda q, k, v, kw, s: lasp_attention(
            q, k, v, **kw, mesh=mesh, strategy=s, output_final_state=True, impl="xla"
        ),
        static_argnums=4,
    )
    outs = {s: run(*args, kw, s) for s in ("ring", "allgather")}
    for a, b in zip(outs["ring"], outs["allgather"]):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_shard_function_in_user_shard_map(rng, strategy, check_vma):
    """lasp_attention_shard inside the caller's own shard_map, with the state replicated over sp."""
    dp, sp = 2, 4
    q, k, v, kw = rank_coded_inputs(rng, b=2, t=32, sp=sp, decay="g_gamma")
    do = rng.standard_normal(q.shape[:3] + v.shape[3:])
    ds = rng.standard_normal((2, q.shape[2], q.shape[3], v.shape[3]))
    want = reference(q, k, v, kw, do, ds)
    mesh = make_mesh(dp, sp)

    def fn(q, k, v, *, g_gamma, initial_state, output_final_state):
        def body(q, k, v, g_gamma, s0):
            return lasp_attention_shard(
                q,
                k,
                v,
                axis_name="sp",
                strategy=strategy,
                g_gamma=g_gamma,
                initial_state=s0,
                output_final_state=output_final_state,
                impl="xla",
            )

        tokens = P("dp", "sp")
        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(tokens, tokens, tokens, P(), P("dp")),
            out_specs=(tokens, P("dp")),
            check_vma=check_vma,
        )(q, k, v, g_gamma, initial_state)

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = outputs_and_grads(fn, f32(q), f32(k), f32(v), {n: f32(x) for n, x in kw.items()}, f32(do), f32(ds))
    assert_matches(got, want, sp=sp, label=f"shard_map check_vma={check_vma} {strategy}")


def test_jit_grad_of_loss_on_sharded_inputs(rng):
    """A jitted training-style loss over device_put inputs: gradients land sharded like the inputs."""
    mesh = make_mesh(2, 4)
    q, k, v, kw = rank_coded_inputs(rng, b=4, t=64, sp=4, decay="g", init=False)
    tokens = NamedSharding(mesh, P("dp", "sp"))
    q, k, v, g = (jax.device_put(jnp.asarray(x, jnp.float32), tokens) for x in (q, k, v, kw["g"]))
    w = jnp.asarray(rng.standard_normal((12, 12)), jnp.float32)

    def loss(q, k, v, g, w, *, use_mesh):
        o, _ = lasp_attention(q, k, v, g=g, mesh=mesh if use_mesh else None, batch_axis="dp", impl="xla")
        return jnp.mean(jnp.tanh(o @ w) ** 2)

    args = (q, k, v, g, w)
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnames="use_mesh")
    (value, grads), (value_ref, grads_ref) = grad_fn(*args, use_mesh=True), grad_fn(*args, use_mesh=False)
    assert abs(float(value) - float(value_ref)) < 1e-5 * abs(float(value_ref))
    for gr, gr_ref in zip(grads, grads_ref):
        assert rel_err(gr, gr_ref) < 1e-4
    assert grads[0].sharding.is_equivalent_to(tokens, 4)


def test_no_mesh_is_the_single_device_op(rng):
    q, k, v, kw = rank_coded_inputs(rng, b=2, t=20, sp=1, decay="g")
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    kw = {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}
    want = linear_attention(*args, **kw, output_final_state=True, impl="xla")
    for mesh in (None, make_mesh(8, 1, axis_names=("data", "sp")), make_mesh(1, 1, devices=jax.devices()[:1])):
        got = lasp_attention(*args, **kw, mesh=mesh, output_final_state=True, impl="xla")
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------- bad input
def _small(b=2, t=16, h=4, hk=4, d=8):
    return jnp.ones((b, t, h, d)), jnp.ones((b, t, hk, d)), jnp.ones((b, t, hk, d))


@pytest.mark.parametrize(
    "mesh_shape, kwargs, match",
    [
        ((1, 8), dict(seq_axis="seq"), r"seq_axis='seq' is not an axis of the mesh"),
        ((2, 4), dict(batch_axis="data"), r"batch_axis='data' is not an axis"),
        ((2, 4), dict(batch_axis="sp"), r"cannot also be a batch axis"),
        ((1, 8), dict(strategy="zigzag"), r"strategy must be one of"),
        ((1, 8), dict(impl="cuda"), r"impl must be one of"),
    ],
    ids=["missing-seq-axis", "missing-batch-axis", "seq-as-batch", "strategy", "impl"],
)
def test_bad_options(mesh_shape, kwargs, match):
    # meshes are built in the test, not at collection (a one-GPU machine collects this module too)
    with pytest.raises(ValueError, match=match):
        lasp_attention(*_small(), mesh=make_mesh(*mesh_shape), **kwargs)


def test_sequence_not_divisible():
    with pytest.raises(ValueError, match=r"T=20, mesh.shape\['sp'\]=8"):
        lasp_attention(*_small(t=20), mesh=make_mesh(1, 8))


def test_batch_not_divisible():
    with pytest.raises(ValueError, match=r"B=3, 'dp' has 2 devices"):
        lasp_attention(*_small(b=3), mesh=make_mesh(2, 4), batch_axis="dp")


def test_shape_errors_name_the_arguments():
    q, k, v = _small(hk=3)
    with pytest.raises(ValueError, match=r"H % Hk"):
        lasp_attention(q, k, v, mesh=make_mesh(1, 8))
    q, k, v = _small()
    with pytest.raises(ValueError, match=r"initial_state must be"):
        lasp_attention(q, k, v, mesh=make_mesh(1, 8), initial_state=jnp.ones((2, 4, 8, 9)))
    with pytest.raises(TypeError, match=r"q must be"):
        lasp_attention(q.astype(jnp.int32), k, v, mesh=make_mesh(1, 8))


def test_per_shard_function_outside_shard_map():
    with pytest.raises(ValueError, match=r"runs inside jax.shard_map over a mesh with the axis 'sp'"):
        lasp_attention_shard(*_small())


def test_ulysses_needs_heads_divisible():
    with pytest.raises(ValueError, match=r"H=4, P=8"):
        lasp_attention(*_small(), mesh=make_mesh(1, 8), strategy="ulysses")


@pytest.mark.parametrize("decay", ["g", None], ids=["g", "nodecay"])
def test_local_state_passes_over_splits(rng, decay):
    """The state pass (forward) and its cotangent pass (backward), contracted in splits for long shards."""
    from lasp_jax.lasp import local_state, local_state_cotangent, shard_decay

    q, k, v, kw = rank_coded_inputs(rng, b=1, t=2048, sp=1, h=4, hk=2, d=8, e=8, decay=decay, init=False)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    g = None if decay is None else jnp.asarray(kw["g"], jnp.float32)
    do = jnp.asarray(rng.standard_normal((1, 2048, 4, 8)), jnp.float32)
    scale = 0.3
    decay_terms = shard_decay(q, g, None)

    def op(s0):
        return linear_attention(q, k, v, g=g, scale=scale, initial_state=s0, output_final_state=True, impl="xla")

    (o, final), pullback = jax.vjp(op, jnp.zeros((1, 4, 8, 8)))
    (d_s0,) = pullback((do, jnp.zeros_like(final)))
    assert rel_err(local_state(k, v, decay_terms, 4), final) < 1e-5
    assert rel_err(local_state_cotangent(q, do, decay_terms, scale), d_s0) < 1e-5


def test_vmap_over_the_layer(rng):
    mesh = make_mesh(2, 4)
    q = jnp.asarray(rng.standard_normal((3, 2, 32, 4, 8)), jnp.float32)
    g_gamma = jnp.full((4,), -0.2)

    def layer(q, mesh):
        return lasp_attention(q, q, q, g_gamma=g_gamma, mesh=mesh, batch_axis="dp", output_final_state=True, impl="xla")

    got = jax.jit(jax.vmap(lambda q: layer(q, mesh)))(q)
    want = jax.vmap(lambda q: layer(q, None))(q)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_bf16_gates_and_state_get_cotangents_of_their_dtype(rng, strategy):
    mesh = make_mesh(2, 4)
    q = jnp.asarray(rng.standard_normal((2, 32, 4, 8)), jnp.bfloat16)
    g = jnp.asarray(-rng.uniform(0.01, 0.5, (2, 32, 4)), jnp.bfloat16)
    s0 = jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.bfloat16)

    def loss(q, g, s0, mesh):
        o, s = lasp_attention(
            q, q, q, g=g, initial_state=s0, mesh=mesh, batch_axis="dp", strategy=strategy, output_final_state=True
        )
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    got = jax.jit(jax.grad(lambda *a: loss(*a, mesh), argnums=(0, 1, 2)))(q, g, s0)
    want = jax.grad(lambda *a: loss(*a, None), argnums=(0, 1, 2))(q, g, s0)
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        assert rel_err(a, b) < 3e-2


@pytest.mark.parametrize("strategy", ["ring", "allgather", "scan"])  # ulysses and gather_kv differentiated already
def test_float64_inputs_differentiate_under_x64(rng, strategy):
    """float64 inputs (``jax_enable_x64``): the XLA path's local state is float32 while the state
    passing runs in float64; the backward took the float64 cotangent for the float32 state and failed
    (ring, allgather, scan). Every strategy's gradients against the float64 token scan."""
    shape = (2, 32, 4, 8)
    with x64():
        q, k, v = (jnp.asarray(rng.standard_normal(shape)) for _ in range(3))
        g = jnp.asarray(-rng.uniform(0.01, 0.5, shape[:3]))
        mesh = make_mesh(1, 4, devices=jax.devices()[:4])

        def loss(fn):
            return lambda q, k, v, g: jnp.sum(fn(q, k, v, g=g, output_final_state=True)[0] ** 2)

        lasp = functools.partial(lasp_attention, mesh=mesh, strategy=strategy, impl="xla")
        got = jax.grad(loss(lasp), argnums=(0, 1, 2, 3))(q, k, v, g)
        want = jax.grad(loss(functools.partial(linear_attention, impl="reference")), argnums=(0, 1, 2, 3))(q, k, v, g)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == jnp.float64 and rel_err(a, b) < 1e-5
