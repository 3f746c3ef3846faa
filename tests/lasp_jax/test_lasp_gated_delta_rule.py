"""lasp_jax.lasp_gated_delta_rule on 8 fake CPU devices against the single-device float64 op.

Every strategy: each shard's output and each shard's dq, dk, dv, dβ, dg, plus d(initial_state) and
the final state, on fresh random inputs whose values carry the global shard index (a misordered
shard changes the answer), with a loss that reads the final state too (its cotangent must travel
back across every shard); packed documents that cross shard edges and start exactly at one.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lasp_jax import lasp_gated_delta_rule, lasp_gated_delta_rule_shard, make_mesh
from lasp_jax.delta_rule import STRATEGIES
from pallas_kernels import gated_delta_rule
from tests.helpers import rel_err, tol, x64

TOKEN_ARRAYS = ("o", "dq", "dk", "dv", "dbeta", "dg")  # [B, T, ...]: checked shard by shard
H, HV, D, E = 4, 8, 8, 8  # two value heads per q/k head; H % 4 == 0 for ulysses
# XLA's cheap optimisation level: these small programs run once, their compile is the test's cost
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def rank_coded_inputs(rng, *, b, t, sp, gate="gdn", init=True, gate_scale=1.0):
    """Layer-like inputs (unit q, k; sigmoid β; log-sigmoid gates) plus a component naming each
    token's global shard: v's first feature is offset by the shard index, q's sign flips per shard."""
    shard = np.repeat(np.arange(sp), t // sp)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = rng.standard_normal((b, t, H, D))
    q[..., 0] += np.where(shard % 2, 1.0, -1.0)[None, :, None]
    xs = {
        "q": unit(q),
        "k": unit(rng.standard_normal((b, t, H, D))),
        "v": rng.standard_normal((b, t, HV, E)),
        "beta": 1 / (1 + np.exp(-rng.standard_normal((b, t, HV)))),
    }
    xs["v"][..., 0] += shard[None, :, None] + 1.0
    gate_shape = {"gdn": (b, t, HV), "kda": (b, t, HV, D)}.get(gate)
    if gate_shape is not None:
        xs["g"] = -np.logaddexp(0.0, -(rng.standard_normal(gate_shape) + 2)) / (16 if gate == "kda" else 1)
        xs["g"] = xs["g"] * gate_scale
    if init:
        xs["initial_state"] = rng.standard_normal((b, HV, D, E)) / np.sqrt(D)
    return xs


def crossing_documents(b, t, sp):
    """Row 0: a boundary inside shard 0, one exactly at shard 1's first token, a document inside
    shard 1, then label 2 again in a separate run to the end (across every later edge); row 1: a
    document across the first edge, a boundary one token after it."""
    length = t // sp
    ids = np.zeros((b, t), np.int32)
    ids[0, length // 2 :] = 1
    ids[0, length:] = 2
    ids[0, length + 3 : length + length // 2] = 3
    ids[1, length + 1 :] = 7
    return ids


def grads_fn(fn, *, final=True, fast_compile=True):
    """jit of: o (and final state) and the gradients of <o, do> (+ <final, ds>) w.r.t. every input
    (``fast_compile``: XLA's cheap optimisation level, for the CPU's small programs)."""

    def loss(xs, do, ds, segment_ids):
        o, s = fn(**xs, output_final_state=final, segment_ids=segment_ids)
        total = jnp.sum(o.astype(do.dtype) * do)
        if final:
            total = total + jnp.sum(s * ds)
        return total, (o, s)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE if fast_compile else None)
    def run(xs, do, ds, segment_ids):
        grads, (o, s) = jax.grad(loss, has_aux=True)(xs, do, ds, segment_ids)
        return {"o": o} | {f"d{n}": x for n, x in grads.items()} | ({"final_state": s} if final else {})

    return run


@functools.cache
def _reference_fn(final, gate_lower_bound=None):
    # one jitted oracle for the module, so equal shapes compile once
    op = functools.partial(gated_delta_rule, impl="reference", gate_lower_bound=gate_lower_bound)
    return grads_fn(op, final=final)


def reference(xs, do, ds, segment_ids, *, final=True, gate_lower_bound=None):
    with x64():
        f64 = lambda x: jnp.asarray(x, jnp.float64)
        ids = None if segment_ids is None else jnp.asarray(segment_ids)
        out = _reference_fn(final, gate_lower_bound)({n: f64(x) for n, x in xs.items()}, f64(do), f64(ds), ids)
        return {n: np.asarray(x, np.float64) for n, x in out.items()}


def assert_matches(got, want, *, sp, label):
    """Each shard of every token-indexed array, and every other array, within float32's tolerance."""
    assert set(got) == set(want), (set(got), set(want))
    bound = tol(jnp.float32, want["o"].shape[1])
    bad = {}
    for name, ref in want.items():
        limit = 4 * bound if name == "dg" else bound
        if name in TOKEN_ARRAYS:
            for r, (a, b) in enumerate(zip(np.split(got[name], sp, axis=1), np.split(ref, sp, axis=1))):
                if (err := rel_err(a, b)) > limit:
                    bad[f"{name}[shard {r}]"] = err
        elif (err := rel_err(got[name], ref)) > limit:
            bad[name] = err
    assert not bad, f"{label}: errors over tolerance {bound:.1e}: {bad}"


def mesh_for(dp, sp):
    return make_mesh(dp, sp, devices=jax.devices()[: dp * sp])


def run_case(
    rng,
    *,
    dp,
    sp,
    strategy,
    gate="gdn",
    docs=False,
    init=True,
    final=True,
    t=64,
    mesh=None,
    impl="xla",
    gate_scale=1.0,
    **layer_kw,
):
    b = max(2, dp)
    xs = rank_coded_inputs(rng, b=b, t=t, sp=sp, gate=gate, init=init, gate_scale=gate_scale)
    if (bound := layer_kw.get("gate_lower_bound")) is not None:  # the op compares in float32, the oracle in float64
        xs["g"] = np.where(np.abs(xs["g"] - bound) < 1e-6, bound - 1e-5, xs["g"])
    ids = crossing_documents(b, t, sp) if docs else None
    do = rng.standard_normal((b, t, HV, E))
    ds = rng.standard_normal((b, HV, D, E))
    want = reference(xs, do, ds, ids, final=final, gate_lower_bound=bound)
    mesh = mesh_for(dp, sp) if mesh is None else mesh
    batch_axis = "dp" if dp > 1 else None
    fn = functools.partial(
        lasp_gated_delta_rule, mesh=mesh, batch_axis=batch_axis, strategy=strategy, impl=impl, **layer_kw
    )
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = grads_fn(fn, final=final)({n: f32(x) for n, x in xs.items()}, f32(do), f32(ds), ids)
    got = {n: np.asarray(x, np.float64) for n, x in got.items()}
    assert_matches(got, want, sp=sp, label=f"{strategy} dp={dp} sp={sp} gate={gate} docs={docs}")


@pytest.mark.parametrize("dp,sp", [(1, 2), (2, 4)], ids=["sp2", "dp2xsp4"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_shard_matches_reference(rng, strategy, dp, sp):
    """Gated DeltaNet gates (they differ per rank and shape every transition Φ_r), initial and final state."""
    run_case(rng, dp=dp, sp=sp, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_documents_cross_shards(rng, strategy):
    run_case(rng, dp=2, sp=4, strategy=strategy, docs=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kda_with_documents(rng, strategy):
    """Per-channel gates: one KDA case per strategy (with documents, so Φ_r = 0 is exercised too)."""
    run_case(rng, dp=1, sp=2, strategy=strategy, gate="kda", docs=True)


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_deltanet_training_path(rng, strategy):
    """No gate, no initial state, no final state asked for: the path a language model trains on."""
    run_case(rng, dp=2, sp=4, strategy=strategy, gate="deltanet", init=False, final=False)


@pytest.mark.parametrize("strategy,gate", [("allgather", "kda"), ("ring", "gdn")])
def test_pallas_kernel_split_at_the_entering_state(rng, strategy, gate):
    """impl="pallas" (interpret mode here): the kernel's split entry points give (Φ_r, M_r) and the
    local entering-state cotangent; documents cross the shard edges."""
    run_case(rng, dp=1, sp=2, strategy=strategy, gate=gate, docs=True, t=32, impl="pallas")


def test_pallas_kernel_split_strong_per_channel_gates(rng):
    """KDA gates ~1500× the usual (about −12 per token): the split entry points' diagonal tiles
    cannot be factored (``products.diag_tiles_bounded``), so they take the exact kernels; the
    usual gates above take the factored ones."""
    run_case(rng, dp=1, sp=2, strategy="allgather", gate="kda", docs=True, t=32, impl="pallas", gate_scale=1500.0)


@pytest.mark.parametrize("strategy,impl", [("allgather", "pallas"), ("ring", "xla"), ("ulysses", "xla")])
def test_gate_lower_bound_under_sp(rng, strategy, impl):
    """``gate_lower_bound`` under sp: the gates below it (about 40% of these KDA gates) are raised
    to it on every shard and get no gradient, every shard against the float64 scan on the raised
    gates; on the Pallas path the split entry points run with the bound in their statics (the
    interpret config's 16-row tiles: one form, chosen at trace time)."""
    run_case(rng, dp=1, sp=2, strategy=strategy, gate="kda", docs=True, t=32, impl=impl, gate_lower_bound=-0.01)


def test_head_axis(rng):
    """Heads sharded over a third mesh axis (H and Hv split contiguously), sequence over sp."""
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("sp", "tp"))
    run_case(rng, dp=1, sp=4, strategy="allgather", mesh=mesh, head_axis="tp")


CHECKED_CASES = [("allgather", True), ("ring", True), ("ulysses", True), ("ring", False)]


@pytest.mark.parametrize(
    "strategy,check_vma", CHECKED_CASES, ids=[f"{s}-{'checked' if c else 'unchecked'}" for s, c in CHECKED_CASES]
)
def test_per_shard_function_in_user_shard_map(rng, strategy, check_vma):
    """lasp_gated_delta_rule_shard inside the caller's own shard_map, the state replicated over sp."""
    dp, sp, t = 2, 4, 32
    xs = rank_coded_inputs(rng, b=2, t=t, sp=sp)
    do = rng.standard_normal((2, t, HV, E))
    ds = rng.standard_normal((2, HV, D, E))
    want = reference(xs, do, ds, None)
    mesh = mesh_for(dp, sp)

    def fn(q, k, v, beta, *, g, initial_state, output_final_state, segment_ids):
        def body(q, k, v, beta, g, s0):
            return lasp_gated_delta_rule_shard(
                q,
                k,
                v,
                beta,
                axis_name="sp",
                strategy=strategy,
                g=g,
                initial_state=s0,
                output_final_state=output_final_state,
                impl="xla",
            )

        tokens = P("dp", "sp")
        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(tokens,) * 5 + (P("dp"),),
            out_specs=(tokens, P("dp")),
            check_vma=check_vma,
        )(q, k, v, beta, g, initial_state)

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = grads_fn(fn)({n: f32(x) for n, x in xs.items()}, f32(do), f32(ds), None)
    got = {n: np.asarray(x, np.float64) for n, x in got.items()}
    assert_matches(got, want, sp=sp, label=f"shard_map check_vma={check_vma} {strategy}")


def test_no_mesh_is_the_single_device_op(rng):
    xs = {n: jnp.asarray(x, jnp.float32) for n, x in rank_coded_inputs(rng, b=2, t=16, sp=1).items()}
    want = gated_delta_rule(**xs, output_final_state=True, impl="xla")
    for mesh in (None, make_mesh(8, 1, axis_names=("data", "sp")), mesh_for(1, 1)):
        got = lasp_gated_delta_rule(**xs, mesh=mesh, output_final_state=True, impl="xla")
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------- bad input
def _small(b=2, t=16, h=4, hv=8, d=8):
    return {
        "q": jnp.ones((b, t, h, d)),
        "k": jnp.ones((b, t, h, d)),
        "v": jnp.ones((b, t, hv, d)),
        "beta": jnp.ones((b, t, hv)),
    }


@pytest.mark.parametrize(
    "mesh_shape, kwargs, match",
    [
        ((1, 8), dict(seq_axis="seq"), r"seq_axis='seq' is not an axis of the mesh"),
        ((2, 4), dict(batch_axis="data"), r"batch_axis='data' is not an axis"),
        ((2, 4), dict(batch_axis="sp"), r"cannot also be a batch axis"),
        ((2, 4), dict(head_axis="tp"), r"head_axis='tp' is not an axis"),
        ((2, 4), dict(head_axis="sp"), r"head_axis='sp' must differ"),
        ((8, 1), dict(head_axis="dp"), r"heads must divide over the head axis: H=4, Hv=8"),
        ((1, 8), dict(strategy="zigzag"), r"strategy must be one of"),
        ((1, 8), dict(strategy="gather_kv"), r"strategy must be one of"),
        ((1, 8), dict(impl="cuda"), r"impl must be one of"),
        ((1, 8), dict(strategy="ulysses"), r"H=4, Hv=8, P=8"),
    ],
    ids=[
        "missing-seq-axis",
        "missing-batch-axis",
        "seq-as-batch",
        "missing-head-axis",
        "head-is-seq",
        "heads-not-divisible",
        "strategy",
        "strategy-of-linear-attention",
        "impl",
        "ulysses-heads",
    ],
)
def test_bad_options(mesh_shape, kwargs, match):
    # meshes are built in the test, not at collection (a one-GPU machine collects this module too)
    with pytest.raises(ValueError, match=match):
        lasp_gated_delta_rule(**_small(), mesh=make_mesh(*mesh_shape), **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"T=20, mesh.shape\['sp'\]=8"):
        lasp_gated_delta_rule(**_small(t=20), mesh=make_mesh(1, 8))
    with pytest.raises(ValueError, match=r"B=3, 'dp' has 2 devices"):
        lasp_gated_delta_rule(**_small(b=3), mesh=make_mesh(2, 4), batch_axis="dp")
    with pytest.raises(ValueError, match=r"beta must be \[B, T, Hv\]"):
        lasp_gated_delta_rule(**(_small() | {"beta": jnp.ones((2, 16, 4))}), mesh=make_mesh(1, 8))
    with pytest.raises(ValueError, match=r"initial_state must be"):
        lasp_gated_delta_rule(**_small(), mesh=make_mesh(1, 8), initial_state=jnp.ones((2, 8, 8, 9)))
    with pytest.raises(TypeError, match=r"q must be"):
        lasp_gated_delta_rule(**(_small() | {"q": jnp.ones((2, 16, 4, 8), jnp.int32)}), mesh=make_mesh(1, 8))


def test_per_shard_function_outside_shard_map():
    with pytest.raises(ValueError, match=r"runs inside jax.shard_map over a mesh with the axis 'sp'"):
        lasp_gated_delta_rule_shard(**_small())


@pytest.mark.parametrize(
    "strategy,gate,dp",
    [("allgather", "gdn", 1), ("ring", "gdn", 2), ("allgather", "deltanet", 2), ("ring", "kda", 1), ("scan", "gdn", 1)],
)
def test_pallas_two_ranks_without_states_forms_no_transition(rng, strategy, gate, dp):
    """Two ranks, no initial state, no final state (the training path on two GPUs): no rank applies
    Φ, so under scalar or no gates the split kernel forms only M (a state pass over the E value
    columns, one run, the kernel ``gated_delta_rule_leaving``; KDA keeps its runs, the scan its Φ) —
    outputs and every gradient against the reference with documents crossing the edge, dp × sp
    meshes too, and the program holds no transition pass, which the same call with a final state does.
    (The interpreter's config is one run per shard; on a GPU the shard's default decides, see below.)"""
    run_case(rng, dp=dp, sp=2, strategy=strategy, gate=gate, docs=True, init=False, final=False, t=32, impl="pallas")
    xs = rank_coded_inputs(rng, b=2, t=32, sp=2, gate=gate, init=False)
    xs = {n: jnp.asarray(x, jnp.float32) for n, x in xs.items()}
    mesh = mesh_for(dp, 2)
    batch_axis = "dp" if dp > 1 else None

    def kernels(final):
        layer = functools.partial(
            lasp_gated_delta_rule, mesh=mesh, batch_axis=batch_axis, strategy=strategy, impl="pallas"
        )
        do, ds = jnp.ones((2, 32, HV, E)), jnp.ones((2, HV, D, E))
        run = grads_fn(layer, final=final)
        text = str(run.trace(xs, do, ds, None).jaxpr)  # the kernels by name
        return set(re.findall(r"gated_delta_rule_(?:transition|leaving|state)\b", text))

    with_states = {"gated_delta_rule_transition", "gated_delta_rule_state"}
    if gate == "kda" or strategy == "scan":
        assert kernels(final=False) == with_states
    else:
        assert kernels(final=False) == {"gated_delta_rule_leaving", "gated_delta_rule_state"}
    assert kernels(final=True) == with_states


@pytest.mark.parametrize(
    "heads,shard,runs,kernel", [(16, 8192, 4, "transition"), (32, 8192, 1, "leaving"), (16, 1024, 1, "leaving")]
)
def test_two_ranks_keep_their_runs_where_the_shard_default_splits(monkeypatch, heads, shard, runs, kernel):
    """On a GPU the M-only pass runs as one run, so where the split entry points' default cuts the
    shard into runs (few heads: 2×H200, 16 heads 5.50 ms with 2 runs and Φ against 7.30 with the
    M-only pass) the layer keeps them and the transition pass; where the default is one run (more
    heads, or a shard too short to cut) it forms M alone. Traced (not run) for the GPU at
    (1, 2 × shard, heads, 128) bf16."""
    from lasp_jax.delta_rule import layer
    from pallas_kernels.gated_delta_rule import pallas_triton_split

    monkeypatch.setattr(layer, "on_gpu", lambda: True)
    t = 2 * shard
    tok = jax.ShapeDtypeStruct((1, t, heads, 128), jnp.bfloat16)
    gates = jax.ShapeDtypeStruct((1, t, heads), jnp.float32)
    local = jax.ShapeDtypeStruct((1, shard, heads, 128), jnp.bfloat16)
    assert pallas_triton_split.shard_config(local, local, local, None).splits == runs

    def loss(q, k, v, beta, g):
        o, _ = lasp_gated_delta_rule(q, k, v, beta, g=g, mesh=make_mesh(sp=2), strategy="allgather", impl="pallas")
        return jnp.sum(o.astype(jnp.float32))

    text = str(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(tok, tok, tok, gates, gates).jaxpr)
    assert set(re.findall(r"gated_delta_rule_(?:transition|leaving)\b", text)) == {f"gated_delta_rule_{kernel}"}


@pytest.mark.parametrize("gate", ["gdn", "kda"])
def test_leaving_state_pass_lowers_to_triton(triton_lowering_h100, gate):
    """The M-only pass of ``split_forward(with_phi=False)`` lowers for CUDA (bf16, D = E = 128)."""
    from pallas_kernels.gated_delta_rule import pallas_triton_split

    spec = jax.ShapeDtypeStruct
    q, beta = spec((1, 256, 2, 128), jnp.bfloat16), spec((1, 256, 2), jnp.float32)
    g = spec((1, 256, 2, 128) if gate == "kda" else (1, 256, 2), jnp.float32)

    def m_only(q, k, v, beta, g):
        phi, m, _ = pallas_triton_split.split_forward(q, k, v, beta, g=g, with_phi=False)
        assert phi is None
        return m

    text = jax.jit(m_only).trace(q, q, q, beta, g).lower(lowering_platforms=("cuda",)).as_text()
    assert "gated_delta_rule_leaving" in text and "gated_delta_rule_transition" not in text


def test_affine_passing_without_phi_refuses_what_needs_it():
    from lasp_jax.delta_rule import affine

    assert not affine.needs_phi(2, initial_state=False, final_state=False)
    assert affine.needs_phi(3, initial_state=False, final_state=False)
    assert affine.needs_phi(2, initial_state=True, final_state=False)
    assert affine.needs_phi(2, initial_state=False, final_state=True)
    m = jnp.ones((1, 1, 2, 2))
    for call in (
        lambda: affine.ring_prefix(None, m, None, axis_name="sp", size=4),
        lambda: affine.ring_prefix(None, m, m, axis_name="sp", size=2),
        lambda: affine.allgather_prefix(None, m, m, axis_name="sp", size=2, want_final=False),
        lambda: affine.allgather_prefix(None, m, None, axis_name="sp", size=2, want_final=True),
        lambda: affine.ring_suffix(None, m, m, axis_name="sp", size=2),
        lambda: affine.allgather_suffix(None, m, m, axis_name="sp", size=2),
        lambda: affine.allgather_suffix(None, m, None, axis_name="sp", size=3),
    ):
        with pytest.raises(ValueError, match="Φ is needed"):
            call()


# ---------------------------------------------------------------------------------- on GPUs
@pytest.mark.gpu
@pytest.mark.parametrize(
    "strategy,gate,states,hv",
    [
        ("allgather", "gdn", True, 4),
        ("ring", "kda", True, 4),
        ("ring", "gdn", True, 4),
        ("ring", "gdn", False, 4),  # few programs: the runs and Φ are kept
        ("ring", "gdn", False, 32),  # one run fills the GPU: M alone
        ("allgather", "gdn", False, 32),
    ],
)
def test_compiled_split_kernels_under_sp(rng, strategy, gate, states, hv):
    """On two GPUs, the compiled kernels' split entry points with their default in-GPU splits (each
    shard cut into runs whose transitions compose), bf16 q/k/v, D = 128, 4096 tokens per shard,
    a document from token 4000 across the shard edge (so rank 1's entering state matters): outputs
    and every gradient against the float32 recurrence, with the single-device kernels' tolerance,
    compiled at XLA's usual optimisation level. Without states (no initial state, no final state:
    the training path) no rank applies Φ and, with 32 value heads (one run fills the GPU), the
    kernels form only M."""
    if len(jax.devices()) < 2:
        pytest.skip("needs two GPUs")
    from pallas_kernels.gated_delta_rule import reference as ref_mod
    from tests.pallas_kernels.test_gated_delta_rule_pallas import make_inputs

    t = 8192
    xs, cot, seg = make_inputs(
        rng, b=1, t=t, h=hv // 2, hv=hv, d=128, e=128, gate=gate, g_max=0.5, docs=(1000, 4000, 6000)
    )
    low = ("q", "k", "v")
    xs = {n: jnp.asarray(x, jnp.bfloat16 if n in low else jnp.float32) for n, x in xs.items()}
    seg = jnp.asarray(seg)
    do, ds = jnp.asarray(cot["o"], jnp.float32), jnp.asarray(cot["final_state"], jnp.float32)
    mesh = make_mesh(1, 2, devices=jax.devices()[:2])
    layer = functools.partial(lasp_gated_delta_rule, mesh=mesh, strategy=strategy, impl="pallas")
    if not states:
        xs.pop("initial_state", None)
    got = grads_fn(layer, final=states, fast_compile=False)(xs, do, ds, seg)

    def oracle(*, q, k, v, beta, g=None, initial_state=None, output_final_state, segment_ids):
        f32 = lambda x: x.astype(jnp.float32)
        doc_ids = ref_mod.document_index(segment_ids)
        o, s = ref_mod.recurrent(
            f32(q), f32(k), f32(v), beta, g, scale=128**-0.5, doc_ids=doc_ids, initial_state=initial_state
        )
        return o, s

    with jax.default_matmul_precision("highest"):
        want = grads_fn(oracle, final=states, fast_compile=False)(xs, do, ds, seg)
    bound = tol(jnp.bfloat16, 4096)
    errors = {n: rel_err(np.asarray(got[n], np.float64), np.asarray(want[n], np.float64)) for n in want}
    assert all(e < bound for e in errors.values()), (bound, errors)
