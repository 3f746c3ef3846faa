"""pallas_kernels.gated_delta_rule against the float64 token recurrence.

Outputs, the final state and every gradient (q, k, v, beta, g, initial_state) on fresh random inputs
each run (q, k L2-normalised, beta a sigmoid, g a log-sigmoid, /16 per channel as KDA layers do),
with tolerances per dtype (tests/helpers.py). ``IMPLS_UNDER_TEST`` lists the implementations
checked; ``"pallas"`` cases skip while ``pallas_triton.py`` is absent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_delta_rule
from pallas_kernels.gated_delta_rule import reference, xla
from pallas_kernels.gated_delta_rule.api import has_pallas
from tests.helpers import rel_err, tol, x64

IMPLS_UNDER_TEST = ["xla"]
GATES = ["deltanet", "gdn", "kda"]  # g: None, [B, T, Hv], [B, T, Hv, D]
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
LOW_PRECISION = ("q", "k", "v", "beta")  # cast to the dtype under test; g and initial_state stay float32
# XLA's cheap optimisation level: these small programs run once, their compile is the test's cost
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def skip_unavailable(impl):
    if impl == "pallas" and not has_pallas():
        pytest.skip("pallas_kernels/gated_delta_rule/pallas_triton.py is not present")


def make_inputs(rng, *, b=2, t=100, h=2, hv=4, d=16, e=32, gate="gdn", init=True, g_range=None, beta=None):
    """float64 numpy inputs as layers feed the op; ``g_range`` = (lo, hi) draws the log decays
    uniformly in [−hi, −lo] and ``beta`` = (lo, hi) draws β uniformly there (default: as layers do)."""

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def log_sigmoid(x):
        return -np.logaddexp(0.0, -x)

    xs = {
        "q": unit(rng.standard_normal((b, t, h, d))),
        "k": unit(rng.standard_normal((b, t, h, d))),
        "v": rng.standard_normal((b, t, hv, e)),
        "beta": 1 / (1 + np.exp(-rng.standard_normal((b, t, hv)))) if beta is None else rng.uniform(*beta, (b, t, hv)),
    }
    gate_shape = {"gdn": (b, t, hv), "kda": (b, t, hv, d)}.get(gate)
    if gate_shape is not None and g_range is not None:
        xs["g"] = -rng.uniform(*g_range, gate_shape)
    elif gate_shape is not None:
        xs["g"] = log_sigmoid(rng.standard_normal(gate_shape) + 2) / (16 if gate == "kda" else 1)
    if init:
        xs["initial_state"] = rng.standard_normal((b, hv, d, e)) / np.sqrt(d)
    return xs


def as_dtype(xs, dtype):
    return {n: jnp.asarray(x, dtype if n in LOW_PRECISION else jnp.float32) for n, x in xs.items()}


@functools.cache
def _grads_fn(impl, scale):
    """jit: o, final_state and the gradients of <o, do> + <final_state, ds> w.r.t. every input."""

    def loss(xs, do, ds, segment_ids):
        q, k, v, beta = (xs[n] for n in ("q", "k", "v", "beta"))
        rest = {n: x for n, x in xs.items() if n not in ("q", "k", "v", "beta")}
        o, s = gated_delta_rule(
            q, k, v, beta, **rest, scale=scale, output_final_state=True, segment_ids=segment_ids, impl=impl
        )
        return jnp.sum(o.astype(do.dtype) * do) + jnp.sum(s.astype(ds.dtype) * ds), (o, s)

    @fast_jit
    def run(xs, do, ds, segment_ids):
        grads, (o, s) = jax.grad(loss, has_aux=True)(xs, do, ds, segment_ids)
        return {"o": o, "final_state": s} | {f"d{n}": gr for n, gr in grads.items()}

    return run


def outputs_and_grads(impl, xs, do, ds, segment_ids=None, scale=None):
    return _grads_fn(impl, scale)(xs, do, ds, None if segment_ids is None else jnp.asarray(segment_ids))


def reference_outputs(xs, do, ds, segment_ids=None, scale=None):
    with x64():
        f64 = {n: jnp.asarray(x, jnp.float64) for n, x in xs.items()}
        do, ds = jnp.asarray(do, jnp.float64), jnp.asarray(ds, jnp.float64)
        out = outputs_and_grads("reference", f64, do, ds, segment_ids, scale)
        return {n: np.asarray(x) for n, x in out.items()}


def check_against_reference(rng, impl, dtype, *, t, gate, segment_ids=None, dg_factor=4.0, **kw):
    skip_unavailable(impl)
    xs = make_inputs(rng, t=t, gate=gate, **kw)
    xs = {n: np.asarray(x) for n, x in as_dtype(xs, dtype).items()}  # the reference sees the rounded values
    b, _, hv, e = xs["v"].shape
    do = rng.standard_normal((b, t, hv, e))
    ds = rng.standard_normal(xs["initial_state"].shape if "initial_state" in xs else (b, hv, xs["q"].shape[-1], e))
    cotangents = jnp.asarray(do, jnp.float32), jnp.asarray(ds, jnp.float32)
    got = outputs_and_grads(impl, as_dtype(xs, dtype), *cotangents, segment_ids)
    want = reference_outputs(xs, do, ds, segment_ids)
    assert got["o"].dtype == dtype and got["final_state"].dtype == jnp.float32
    assert set(got) == set(want) == {"o", "final_state"} | {f"d{n}" for n in xs}
    errors = {n: rel_err(got[n], want[n]) for n in want}
    bound = tol(dtype, t)
    bad = {n: err for n, err in errors.items() if err > (dg_factor * bound if n == "dg" else bound)}
    assert not bad, f"{impl} {jnp.dtype(dtype).name} {gate} T={t}: errors over tolerance {bound:.1e}: {bad}"
    return errors


# every gate form in float32, the low-precision dtypes on a subset (each case is one compile)
GATE_DTYPES = [(gate, "f32") for gate in GATES] + [("gdn", "bf16"), ("kda", "bf16"), ("deltanet", "f16")]


@pytest.mark.parametrize("gate,dtype", GATE_DTYPES, ids=[f"{g}-{d}" for g, d in GATE_DTYPES])
@pytest.mark.parametrize("impl", IMPLS_UNDER_TEST)
def test_matches_reference(rng, impl, gate, dtype):
    """T = 100 crosses a chunk boundary; grouped value heads (H = 2, Hv = 4), E ≠ D."""
    check_against_reference(rng, impl, DTYPES[dtype], t=100, gate=gate)


LENGTHS = [(1, "kda"), (63, "gdn"), (300, "kda")]


@pytest.mark.parametrize("t,gate", LENGTHS, ids=[f"T{t}-{g}" for t, g in LENGTHS])
@pytest.mark.parametrize("impl", IMPLS_UNDER_TEST)
def test_lengths(rng, impl, t, gate):
    check_against_reference(rng, impl, jnp.float32, t=t, gate=gate, b=1, e=16)


@pytest.mark.parametrize("gate", ["gdn", "kda"])
@pytest.mark.parametrize("impl", IMPLS_UNDER_TEST)
def test_strong_decay_and_extreme_beta(rng, impl, gate):
    """log decays near −10 (the state forgets within a token) and β near 0 or 1: finite and exact."""
    xs_kw = dict(b=1, e=16, g_range=(8.0, 12.0), init=True)
    check_against_reference(rng, impl, jnp.float32, t=100, gate=gate, beta=(0.999, 1.0), **xs_kw)
    check_against_reference(rng, impl, jnp.float32, t=100, gate=gate, beta=(0.0, 1e-3), **xs_kw)


def _documents(rng, b, t, n_docs=3):
    """Segment ids with random cuts per row (a cut may fall on a chunk edge), unsorted labels."""
    ids = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), n_docs - 1, replace=False))
        labels = rng.permutation(10)[:n_docs]
        ids[row] = labels[np.searchsorted(cuts, np.arange(t), side="right")]
    ids[0, 64:] = ids[0, 63] + 100  # a boundary exactly at the second chunk
    ids[0, 70:] = ids[0, 69] + 100
    return ids


@pytest.mark.parametrize("gate", ["gdn", "kda"])
@pytest.mark.parametrize("impl", IMPLS_UNDER_TEST)
def test_documents_match_reference(rng, impl, gate):
    check_against_reference(rng, impl, jnp.float32, t=150, gate=gate, segment_ids=_documents(rng, 2, 150))


@functools.cache
def _forward_fn(impl):
    """jit: ``(o, final_state)`` of the op (one compile per shape)."""
    return fast_jit(
        lambda xs, s0, ids: gated_delta_rule(
            **xs, initial_state=s0, segment_ids=ids, output_final_state=True, impl=impl
        )
    )


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("impl", IMPLS_UNDER_TEST)
def test_packed_documents_equal_each_document_alone(rng, impl, gate):
    """Packed rows against every document run alone (by the float64 oracle, which compiles cheaply
    per document length); the initial state reaches only each row's first document."""
    skip_unavailable(impl)
    b, t = 2, 150
    ids = _documents(rng, b, t)
    xs = make_inputs(rng, b=b, t=t, gate=gate)
    s0 = xs.pop("initial_state")
    o, final = _forward_fn(impl)(as_dtype(xs, jnp.float32), jnp.asarray(s0, jnp.float32), jnp.asarray(ids))
    for row in range(b):
        starts = [0, *np.flatnonzero(ids[row, 1:] != ids[row, :-1]) + 1, t]
        for n, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
            with x64():
                alone = {name: jnp.asarray(x[row : row + 1, lo:hi]) for name, x in xs.items()}
                init = jnp.asarray(s0[row : row + 1]) if n == 0 else None
                o_doc, s_doc = gated_delta_rule(**alone, initial_state=init, output_final_state=True, impl="reference")
            assert rel_err(o[row : row + 1, lo:hi], o_doc) < 1e-5, (row, lo, hi)
        assert rel_err(final[row : row + 1], s_doc) < 1e-5, row


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("impl", IMPLS_UNDER_TEST)
def test_chained_halves(rng, impl, gate):
    """[0, T/2) then [T/2, T) from the first final_state equals the whole."""
    skip_unavailable(impl)
    t = 180
    xs = as_dtype(make_inputs(rng, t=t, gate=gate), jnp.float32)
    s0 = xs.pop("initial_state")
    run = _forward_fn(impl)
    o, s = run(xs, s0, None)
    o1, s1 = run({n: x[:, : t // 2] for n, x in xs.items()}, s0, None)
    o2, s2 = run({n: x[:, t // 2 :] for n, x in xs.items()}, s1, None)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o) < 1e-5
    assert rel_err(s2, s) < 1e-5


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("gate", ["gdn", "kda"])
def test_gate_lower_bound_raises_the_gates_below_it(rng, impl, gate):
    """``gate_lower_bound``: every implementation runs on ``max(g, bound)`` (the float64 recurrence on
    the raised gates, outputs and every gradient) and gives g no gradient where it was raised; the
    gates reach 2× below the bound (about half of them raised). With the Pallas kernels (interpret
    mode) and per-channel gates the bound also picks their kernels at trace time."""
    skip_unavailable(impl)
    bound = -0.75 if gate == "kda" else -2.0
    xs = make_inputs(rng, t=70, gate=gate, g_range=(0.01, -2 * bound))
    # no gate within 1e-4 of the bound: the op compares in float32, the oracle in float64
    xs["g"] = np.where(np.abs(xs["g"] - bound) < 1e-4, bound - 1e-3, xs["g"])
    b, t, hv, e = xs["v"].shape
    do, ds = rng.standard_normal((b, t, hv, e)), rng.standard_normal(xs["initial_state"].shape)
    raised = xs["g"] < bound
    assert 0.3 < raised.mean() < 0.7  # ~0.5: at least 560 gates, so this is ≥ 9 standard deviations wide

    def run(xs, do, ds, bound):
        def loss(xs):
            q, k, v, beta = (xs[n] for n in ("q", "k", "v", "beta"))
            rest = {n: x for n, x in xs.items() if n not in ("q", "k", "v", "beta")}
            o, s = gated_delta_rule(q, k, v, beta, **rest, output_final_state=True, impl=impl, gate_lower_bound=bound)
            return jnp.sum(o * do) + jnp.sum(s * ds), (o, s)

        grads, (o, s) = fast_jit(jax.grad(loss, has_aux=True))(xs)
        return {"o": o, "final_state": s} | {f"d{n}": x for n, x in grads.items()}

    got = run(as_dtype(xs, jnp.float32), jnp.asarray(do, jnp.float32), jnp.asarray(ds, jnp.float32), bound)
    assert not np.any(np.asarray(got["dg"])[raised])
    assert np.mean(np.asarray(got["dg"])[~raised] != 0) > 0.99  # (a sum can be exactly 0; rel_err checks values)
    with x64():
        f64 = {n: jnp.asarray(x, jnp.float64) for n, x in xs.items()}
        f64["g"] = jnp.maximum(f64["g"], bound)
        want = outputs_and_grads("reference", f64, jnp.asarray(do), jnp.asarray(ds))
        want = {n: np.asarray(x) for n, x in want.items()}
    want["dg"] = np.where(raised, 0.0, want["dg"])
    bound_err = tol(jnp.float32, t)
    errors = {n: rel_err(got[n], want[n]) for n in want}
    assert all(err < (4 if n == "dg" else 1) * bound_err for n, err in errors.items()), errors


def test_reference_is_the_matrix_recurrence(rng):
    """The oracle against S_t = (I − β k kᵀ) diag(exp g) S_{t-1} + β k vᵀ written with numpy matrices."""
    xs = make_inputs(rng, b=1, t=12, h=2, hv=4, d=4, e=3, gate="kda")
    scale = 0.7
    with x64():
        o, final = reference.recurrent(
            *(jnp.asarray(xs[n]) for n in ("q", "k", "v", "beta", "g")),
            scale=scale,
            initial_state=jnp.asarray(xs["initial_state"]),
        )
    for head in range(4):
        qk = head // 2  # Hv / H = 2 value heads per q/k head
        s = xs["initial_state"][0, head]
        for t in range(12):
            k_t = xs["k"][0, t, qk]
            beta_t = xs["beta"][0, t, head]
            transition = (np.eye(4) - beta_t * np.outer(k_t, k_t)) @ np.diag(np.exp(xs["g"][0, t, head]))
            s = transition @ s + beta_t * np.outer(k_t, xs["v"][0, t, head])
            np.testing.assert_allclose(o[0, t, head], scale * s.T @ xs["q"][0, t, qk], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(final[0, head], s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gate", GATES)
def test_shard_transition_and_state_cotangent(rng, gate):
    """What LASP needs: S_out = Φ S_in + M for any S_in, Φ = 0 across a document boundary, and the
    entering state's cotangent from the outputs alone equals autodiff of the op."""
    t = 150
    ids = _documents(rng, 2, t)
    ids[1] = 7  # row 1 is one document: its Φ survives
    xs = as_dtype(make_inputs(rng, t=t, gate=gate), jnp.float32)
    s0 = xs.pop("initial_state")
    do = jnp.asarray(rng.standard_normal(xs["v"].shape), jnp.float32)
    scale = 0.3

    @fast_jit
    def run(xs, s0, ids, do):
        doc = reference.document_index(ids)
        m, phi = xla.shard_transition(xs["k"], xs["v"], xs["beta"], xs.get("g"), doc_ids=doc)

        def op(s):
            return gated_delta_rule(
                **xs, scale=scale, initial_state=s, segment_ids=ids, output_final_state=True, impl="xla"
            )

        (_, final), pullback = jax.vjp(op, s0)
        (want,) = pullback((do, jnp.zeros_like(final)))
        got = xla.state_cotangent(xs["q"], xs["k"], xs["beta"], xs.get("g"), do, scale=scale, doc_ids=doc)
        return phi, jnp.einsum("bhij,bhje->bhie", phi, s0) + m, final, got, want

    phi, affine_final, final, got, want = run(xs, s0, jnp.asarray(ids), do)
    assert rel_err(affine_final, final) < 1e-5
    assert not np.any(np.asarray(phi[0])) and np.any(np.asarray(phi[1]))
    assert rel_err(got, want) < 1e-5


def test_default_scale_and_no_final_state(rng):
    xs = as_dtype(make_inputs(rng, b=1, t=10, gate="gdn", init=False), jnp.float32)
    o, s = gated_delta_rule(**xs, impl="xla")
    assert s is None and o.shape == (1, 10, 4, 32)
    o_quarter, _ = gated_delta_rule(**xs, scale=0.25, impl="xla")  # 16 ** -0.5
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_quarter))


def test_bfloat16_output_dtype_and_no_nan_with_long_strong_decay(rng):
    xs = as_dtype(make_inputs(rng, b=1, t=600, gate="kda", g_range=(8.0, 12.0), init=False), jnp.bfloat16)
    grads = fast_jit(jax.grad(lambda xs: gated_delta_rule(**xs, impl="xla")[0].astype(jnp.float32).sum()))(xs)
    for name, gr in grads.items():
        assert gr.dtype == xs[name].dtype and np.all(np.isfinite(np.asarray(gr, np.float32))), name


def test_pallas_missing_is_a_clear_error(monkeypatch):
    from pallas_kernels.gated_delta_rule import api

    monkeypatch.setattr(api, "has_pallas", lambda: False)  # a checkout without pallas_triton.py
    z = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(NotImplementedError, match="pallas_triton"):
        gated_delta_rule(z, z, z, jnp.zeros((1, 8, 2)), impl="pallas")
    assert api.resolve_impl("auto", z, z, z) == "xla"


# ---- bad input ------------------------------------------------------------------------------
_f = jnp.zeros
_QK, _V, _BETA = (2, 8, 2, 16), (2, 8, 4, 32), (2, 8, 4)


def _call(**over):
    args = {"q": _f(_QK), "k": _f(_QK), "v": _f(_V), "beta": _f(_BETA)} | over
    return gated_delta_rule(**args)


@pytest.mark.parametrize(
    "over,err,match",
    [
        ({"q": _f((2, 8, 2))}, ValueError, r"q must have rank 4 \[B, T, H, D\], got q.shape=\(2, 8, 2\)"),
        ({"v": _f((2, 8, 4, 32, 1))}, ValueError, r"v must have rank 4 \[B, T, Hv, E\]"),
        ({"k": _f((2, 8, 2, 8))}, ValueError, r"k must have q's shape .* k.shape=\(2, 8, 2, 8\)"),
        ({"v": _f((3, 8, 4, 32))}, ValueError, r"batch and time: q.shape=\(2, 8, 2, 16\), v.shape=\(3, 8, 4, 32\)"),
        ({"v": _f((2, 9, 4, 32))}, ValueError, "batch and time"),
        ({"v": _f((2, 8, 3, 32)), "beta": _f((2, 8, 3))}, ValueError, r"H=2, Hv=3 \(Hv % H != 0\)"),
        ({"beta": _f((2, 8, 2))}, ValueError, r"beta must be \[B, T, Hv\]=\(2, 8, 4\), got beta.shape=\(2, 8, 2\)"),
        ({"beta": _f((2, 8, 4, 1))}, ValueError, r"beta must have rank 3"),
        ({"g": _f((2, 8, 2))}, ValueError, r"g must be \[B, T, Hv\]=\(2, 8, 4\) .* got g.shape=\(2, 8, 2\)"),
        ({"g": _f((2, 8, 4, 32))}, ValueError, r"\[B, T, Hv, D\]=\(2, 8, 4, 16\)"),
        ({"initial_state": _f((2, 2, 16, 32))}, ValueError, r"initial_state must be \[B, Hv, D, E\]=\(2, 4, 16, 32\)"),
        ({"q": jnp.zeros(_QK, jnp.int32)}, TypeError, "q.dtype=int32"),
        ({"beta": jnp.zeros(_BETA, jnp.int32)}, TypeError, "beta.dtype=int32"),
        ({"g": jnp.zeros(_BETA, jnp.int32)}, TypeError, "g.dtype=int32"),
        ({"segment_ids": jnp.zeros((2, 8))}, TypeError, "segment_ids must be an integer array"),
        ({"segment_ids": jnp.zeros((2, 7), jnp.int32)}, ValueError, r"segment_ids.shape=\(2, 7\)"),
        ({"impl": "cuda"}, ValueError, r"impl must be one of .* impl='cuda'"),
        ({"gate_lower_bound": -5.0}, ValueError, r"gate_lower_bound=-5.0 bounds the log gates, but g is None"),
        ({"g": _f(_BETA), "gate_lower_bound": 0.0}, ValueError, r"gate_lower_bound must be None or a finite negative"),
        ({"g": _f(_BETA), "gate_lower_bound": float("nan")}, ValueError, r"negative Python or numpy number .* got nan"),
        ({"g": _f(_BETA), "gate_lower_bound": True}, ValueError, r"negative Python or numpy number .* got True"),
    ],
    ids=[
        "rank_q",
        "rank_v",
        "k_shape",
        "batch",
        "time",
        "value_heads",
        "beta_shape",
        "beta_rank",
        "g_shape",
        "g_channels",
        "initial_state",
        "q_int",
        "beta_int",
        "g_int",
        "segment_ids_float",
        "segment_ids_shape",
        "impl",
        "bound_without_gates",
        "bound_zero",
        "bound_nan",
        "bound_bool",
    ],
)
def test_bad_input(over, err, match):
    with pytest.raises(err, match=match):
        _call(**over)
