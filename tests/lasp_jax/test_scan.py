"""strategy="scan" (lasp_jax.scan: the log-depth prefix over ranks) on fake CPU devices.

The scan itself against a plain fold over the ranks (scalar decays, shared decays, matrix
transitions; P a power of two or not), then both layer families end to end against the float64
single-device op: every shard's output and gradients, initial and final state, documents across
shard edges, P = 3, 4, 8 and dp × sp. The cases where "scan" joins the other strategies'
parametrisations live in test_lasp_attention.py, test_segments.py and test_lasp_gated_delta_rule.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lasp_jax import lasp_attention, make_mesh, scan
from pallas_kernels import linear_attention
from tests.helpers import rel_err
from tests.lasp_jax import test_head_axis as heads
from tests.lasp_jax import test_lasp_gated_delta_rule as delta
from tests.lasp_jax.test_lasp_attention import assert_matches, outputs_and_grads, rank_coded_inputs, reference
from tests.lasp_jax.test_segments import run_packed

B, H, D, E = 2, 3, 4, 5


def draw_pairs(rng, kind, size):
    """Every rank's transition (log Γ ``[B, H]`` or Φ ``[B, H, D, D]``) and ``M`` ``[B, H, D, E]``."""
    if isinstance(kind, scan.MatrixTransition):
        phi = rng.standard_normal((size, B, H, D, D)) / np.sqrt(D)
    elif kind.shared:
        phi = np.broadcast_to(-rng.uniform(0.1, 1.0, (1, B, H)), (size, B, H))
    else:
        phi = -rng.uniform(0.1, 1.0, (size, B, H))
        phi[size // 2, 0, 0] = -1e30  # a document boundary: nothing crosses this rank in this row and head
    return phi, rng.standard_normal((size, B, H, D, E))


def fold(kind, phi, m, start, *, reverse):
    """The exclusive prefix (suffix with Φᵀ) over ranks, one rank after the other, in float64."""
    apply = (
        (lambda p, s: (np.swapaxes(p, -1, -2) if reverse else p) @ s)
        if isinstance(kind, scan.MatrixTransition)
        else (lambda p, s: np.exp(p)[..., None, None] * s)
    )
    order = range(len(m) - 1, -1, -1) if reverse else range(len(m))
    state, out = start, [None] * len(m)
    for r in order:
        out[r] = state
        state = apply(phi[r], state) + m[r]
    return np.stack(out), state


KINDS = {
    "scalar": scan.ScalarDecay(),
    "shared-scalar": scan.ScalarDecay(shared=True),
    "matrix": scan.MatrixTransition(),
}


@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_scan_equals_the_fold_over_ranks(rng, kind):
    """prefix / suffix / final state on every rank; P = 3 (the last round has one pair) and 8."""
    kind = KINDS[kind]
    for size in (3, 8):
        mesh = make_mesh(1, size, devices=jax.devices()[:size])
        phi, m = draw_pairs(rng, kind, size)
        s0, d_final = rng.standard_normal((2, B, H, D, E))

        def body(phi, m, s0, d_final, size=size):
            s_in, final = scan.prefix(kind, phi[0], m[0], s0, axis_name="sp", size=size, want_final=True)
            ds_out = scan.suffix(kind, phi[0], m[0], d_final, axis_name="sp", size=size)
            return s_in[None], final, ds_out[None]

        run = jax.jit(
            jax.shard_map(body, mesh=mesh, in_specs=(P("sp"), P("sp"), P(), P()), out_specs=(P("sp"), P(), P("sp"))),
            compiler_options=delta.FAST_COMPILE,
        )
        s_in, final, ds_out = run(*(jnp.asarray(x, jnp.float32) for x in (phi, m, s0, d_final)))
        want_in, want_final = fold(kind, phi, m, s0, reverse=False)
        want_out, _ = fold(kind, phi, m, d_final, reverse=True)
        for name, got, want in (("S_in", s_in, want_in), ("final", final, want_final), ("dS_out", ds_out, want_out)):
            assert rel_err(got, want) < 1e-5, (size, name)


def test_rounds_and_offsets():
    assert [scan.num_rounds(p) for p in (1, 2, 3, 4, 5, 8, 9, 64, 1000, 1024)] == [0, 1, 2, 2, 3, 3, 4, 6, 10, 10]
    assert scan.offsets(8) == (1, 2, 4) and scan.offsets(5) == (1, 2, 4) and scan.offsets(1) == ()


# ----------------------------------------------------------------------------- linear attention
def run_linear_attention(rng, *, dp, sp, decay, t, states=True):
    b = max(2, dp)
    q, k, v, kw = rank_coded_inputs(rng, b=b, t=t, sp=sp, decay=decay, init=states)
    do = rng.standard_normal(q.shape[:3] + v.shape[3:])
    ds = rng.standard_normal((b, q.shape[2], q.shape[3], v.shape[3]))
    want = reference(q, k, v, kw, do, ds, final=states)
    mesh = make_mesh(dp, sp, devices=jax.devices()[: dp * sp])
    batch_axis = "dp" if dp > 1 else None

    def fn(*a, **kws):
        return lasp_attention(*a, **kws, mesh=mesh, batch_axis=batch_axis, strategy="scan", impl="xla")

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    kw = {n: f32(x) for n, x in kw.items()}
    got = outputs_and_grads(fn, f32(q), f32(k), f32(v), kw, f32(do), f32(ds), final=states)
    assert_matches(got, want, sp=sp, label=f"scan dp={dp} sp={sp} decay={decay} states={states}")


LINEAR_CASES = [(1, 3, "g_gamma", False), (2, 3, "g", True)]


@pytest.mark.parametrize(
    "dp,sp,decay,states",
    LINEAR_CASES,
    ids=[f"dp{dp}xsp{sp}-{d}{'' if s else '-training'}" for dp, sp, d, s in LINEAR_CASES],
)
def test_linear_attention_every_shard(rng, dp, sp, decay, states):
    """P = 3 (not a power of two: the last round has one pair): per-token decay with initial and
    final state on dp × sp; the shared-decay path (no decay sent) as a model trains it, without
    states. P = 2, 4 and 8 run in test_lasp_attention.py's strategy parametrisations."""
    run_linear_attention(rng, dp=dp, sp=sp, decay=decay, t=36, states=states)


def test_linear_attention_documents_dp2xsp3(rng):
    """Packed documents across the shard edges of P = 3 (boundaries at, around and between edges),
    per-token decay, initial and final state, the batch split over dp = 2."""
    run_packed(rng, strategy="scan", sp=3, dp=2, t=48, kinds=("shard_edges", "around_edges"))


def test_linear_attention_head_axis(rng):
    """Heads over a tp axis (dp 2 × sp 2 × tp 2): every head block right, nothing crosses tp."""
    xs = heads.linear_inputs(rng, "g")
    do, ds = rng.standard_normal((heads.B, heads.T, heads.H, heads.D)), rng.standard_normal(xs["initial_state"].shape)
    layer = functools.partial(
        lasp_attention, mesh=heads.tp_mesh(), batch_axis="dp", head_axis="tp", strategy="scan", impl="xla"
    )
    op = functools.partial(linear_attention, impl="reference")
    layer, op = (functools.partial(f, output_final_state=True) for f in (layer, op))
    heads.check_layer(layer, op, xs, do, ds, has_state=True, label="lasp scan xla g")


def test_linear_attention_scan_equals_ring(rng):
    """The scan and the ring compute the same prefix: equal to float32 rounding, not just to tolerance."""
    q, k, v, kw = rank_coded_inputs(rng, b=2, t=64, sp=8, decay="g")
    mesh = make_mesh(1, 8)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    kw = {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}

    def run(q, k, v, kw, strategy):
        return lasp_attention(q, k, v, **kw, mesh=mesh, strategy=strategy, output_final_state=True, impl="xla")

    run = jax.jit(run, static_argnums=4)
    outs = {s: run(*args, kw, s) for s in ("ring", "scan")}
    for a, b in zip(outs["ring"], outs["scan"]):
        assert rel_err(a, b) < 1e-5


# ----------------------------------------------------------------------------------- delta rule
def delta_mesh(dp, sp):
    return make_mesh(dp, sp, devices=jax.devices()[: dp * sp])


DELTA_CASES = [(1, 3, "gdn", True), (1, 8, "kda", False), (2, 3, "deltanet", True)]


@pytest.mark.parametrize(
    "dp,sp,gate,docs", DELTA_CASES, ids=[f"dp{dp}xsp{sp}-{g}{'-docs' if d else ''}" for dp, sp, g, d in DELTA_CASES]
)
def test_delta_rule_every_shard(rng, dp, sp, gate, docs):
    """Gated DeltaNet, KDA and DeltaNet transitions Φ_r (matrices, every round but the last sends
    them), initial and final state, documents across the edges of P = 3; P = 2 and 2 × 4 run in
    test_lasp_gated_delta_rule.py's strategy parametrisations."""
    delta.run_case(rng, dp=dp, sp=sp, strategy="scan", gate=gate, docs=docs, t=48, mesh=delta_mesh(dp, sp))


@pytest.mark.parametrize("check_vma", [True, False], ids=["checked", "unchecked"])
def test_delta_rule_in_user_shard_map(rng, check_vma):
    """lasp_gated_delta_rule_shard with strategy="scan" inside the caller's own shard_map (dp 2 × sp 4)."""
    delta.test_per_shard_function_in_user_shard_map(rng, "scan", check_vma)


def test_delta_rule_pallas_split(rng):
    """impl="pallas" (interpret mode): the kernel's split entry points give (Φ_r, M_r) and the local
    entering-state cotangent around the scan; documents cross the shard edges."""
    delta.run_case(rng, dp=1, sp=2, strategy="scan", gate="gdn", docs=True, t=32, impl="pallas")
