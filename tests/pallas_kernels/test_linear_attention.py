"""Every implementation of pallas_kernels.linear_attention against the float64 token recurrence.

Outputs, the final state and every gradient (q, k, v, g / g_gamma, initial_state) on fresh
random inputs each run, with tolerances per dtype (tests/helpers.py).
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention
from tests.helpers import dg_gamma_error, make_inputs, rel_err, tol, x64

IMPLS = ["xla", "reference_quadratic"]
if importlib.util.find_spec("pallas_kernels.linear_attention.pallas_triton") is not None:
    IMPLS.append("pallas")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


@functools.cache
def _grads_fn(impl):
    """jit: o, final_state and the gradients of <o, do> + <final_state, ds> w.r.t. every input (one
    jit per impl for the module, so equal shapes compile once; eager, each primitive compiled apart)."""

    def loss(q, k, v, kw, do, ds):
        o, s = linear_attention(q, k, v, **kw, output_final_state=True, impl=impl)
        return jnp.sum(o.astype(do.dtype) * do) + jnp.sum(s.astype(ds.dtype) * ds), (o, s)

    @jax.jit
    def run(q, k, v, kw, do, ds):
        grads, (o, s) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, kw, do, ds)
        return {"o": o, "final_state": s, "dq": grads[0], "dk": grads[1], "dv": grads[2]} | {
            f"d{name}": gr for name, gr in grads[3].items()
        }

    return run


def _loss_and_grads(impl, q, k, v, kw, do, ds):
    return _grads_fn(impl)(q, k, v, kw, do, ds)


def check_against_reference(rng, impl, dtype, *, t, dg_factor=4.0, **shape):
    q, k, v, kw = make_inputs(rng, t=t, dtype=dtype, **shape)
    # round the inputs to the dtype under test first, so the reference sees the same values
    q, k, v = (np.asarray(jnp.asarray(x, dtype)) for x in (q, k, v))
    do = rng.standard_normal(q.shape[:3] + v.shape[3:])
    ds = rng.standard_normal((q.shape[0], q.shape[2], q.shape[3], v.shape[3]))
    got = _loss_and_grads(
        impl,
        *(jnp.asarray(x, dtype) for x in (q, k, v)),
        {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()},
        jnp.asarray(do, jnp.float32),
        jnp.asarray(ds, jnp.float32),
    )
    with x64():
        want = _loss_and_grads(
            "reference",
            *(jnp.asarray(x, jnp.float64) for x in (q, k, v)),
            {n: jnp.asarray(x, jnp.float64) for n, x in kw.items()},
            jnp.asarray(do, jnp.float64),
            jnp.asarray(ds, jnp.float64),
        )
        want = {n: np.asarray(x) for n, x in want.items()}
    assert got["o"].dtype == dtype and got["final_state"].dtype == jnp.float32
    assert set(got) == set(want)
    errors = {n: rel_err(got[n], want[n]) for n in want}
    if "g_gamma" in kw:  # a sum over all tokens: measured at the scale of its terms
        errors["dg_gamma"] = dg_gamma_error(got["dg_gamma"], want["dg_gamma"], q, k, v, kw, do, ds)
    bound = tol(dtype, t)
    # gradients of the log decays sum over many terms: give them a looser bound
    bad = {n: e for n, e in errors.items() if e > (dg_factor * bound if n in ("dg", "dg_gamma") else bound)}
    assert not bad, f"{impl} {dtype.__name__} T={t}: errors over tolerance {bound:.1e}: {bad}"


@pytest.mark.parametrize("decay", [None, "g_gamma", "g"], ids=["nodecay", "g_gamma", "g"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(rng, impl, dtype, decay):
    check_against_reference(rng, impl, dtype, t=45, b=2, h=4, d=16, decay=decay)


@pytest.mark.parametrize("t", [1, 63, 100, 130], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("impl", IMPLS)
def test_odd_lengths(rng, impl, t):
    check_against_reference(rng, impl, jnp.float32, t=t, b=1, h=2, d=16, decay="g")


@pytest.mark.parametrize("hk", [1, 2], ids=lambda n: f"Hk{n}")
@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_heads(rng, impl, hk):
    check_against_reference(rng, impl, jnp.float32, t=40, b=2, h=4, hk=hk, d=16, decay="g")


@pytest.mark.parametrize("d,e", [(16, 32), (32, 8), (12, 20)], ids=lambda x: str(x))
@pytest.mark.parametrize("impl", IMPLS)
def test_value_dim_differs(rng, impl, d, e):
    check_against_reference(rng, impl, jnp.float32, t=33, b=1, h=2, d=d, e=e, decay="g_gamma")


@pytest.mark.parametrize("g_scale", [10.0, 1e-6], ids=["strong", "near_one"])
@pytest.mark.parametrize("decay", ["g", "g_gamma"])
@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_decay(rng, impl, decay, g_scale):
    # g in [-10, -0.1] decays to exp(-1000) over 100 tokens; g ~ -1e-6 hardly decays at all
    if impl == "reference_quadratic" and g_scale > 1:
        pytest.skip("the quadratic oracle subtracts global cumulative sums (|Σg| ~ 500): float32 loses digits")
    # the XLA path's decay gradient under strong decay: up to 2.1e-3 of Σ|dg_t| in 100 seeds (float32
    # cancellation between q·dq and k·dk terms; the Pallas kernels stay at ~1e-5): 32× the bound there
    dg_factor = 32.0 if impl == "xla" and g_scale > 1 else 4.0
    check_against_reference(
        rng, impl, jnp.float32, t=100, b=1, h=2, d=16, decay=decay, g_scale=g_scale, dg_factor=dg_factor
    )


def test_strong_decay_long_sequence_finite(rng):
    q, k, v, kw = make_inputs(rng, b=1, t=2000, h=2, d=16, decay="g", g_scale=10.0)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    kw = {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}
    grads = jax.grad(lambda *a: linear_attention(*a[:3], **a[3], impl="xla")[0].sum(), argnums=(0, 1, 2, 3))(*args, kw)
    for x in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize("decay", [None, "g_gamma", "g"], ids=["nodecay", "g_gamma", "g"])
@pytest.mark.parametrize("impl", IMPLS)
def test_chained_halves(rng, impl, decay):
    """[0, T/2) then [T/2, T) with the first final_state as the second initial_state equals the whole."""
    t = 90
    q, k, v, kw = make_inputs(rng, b=2, t=t, h=2, d=16, decay=decay)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    kw = {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}

    def half(kw, sl, init):
        part = {n: (x[:, sl] if n == "g" else x) for n, x in kw.items() if n != "initial_state"}
        return linear_attention(
            q[:, sl], k[:, sl], v[:, sl], **part, initial_state=init, output_final_state=True, impl=impl
        )

    @jax.jit  # the whole and both halves as one program (eager, each primitive compiles apart)
    def run(kw):
        o1, s1 = half(kw, slice(0, t // 2), kw["initial_state"])
        return linear_attention(q, k, v, **kw, output_final_state=True, impl=impl), o1, half(kw, slice(t // 2, t), s1)

    (o, s), o1, (o2, s2) = run(kw)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o) < 1e-5
    assert rel_err(s2, s) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_vmap_grad_compose(rng, impl):
    q, k, v, kw = make_inputs(rng, b=3, t=20, h=2, d=8, decay="g", init=False)
    q, k, v, g = (jnp.asarray(x, jnp.float32) for x in (q, k, v, kw["g"]))

    def one_row(q, k, v, g):
        o, _ = linear_attention(q[None], k[None], v[None], g=g[None], impl=impl)
        return o[0]

    batched = jax.jit(jax.vmap(one_row))(q, k, v, g)
    direct, _ = linear_attention(q, k, v, g=g, impl="reference")
    assert rel_err(batched, direct) < 1e-5
    grad_v = jax.jit(jax.grad(lambda q: jax.vmap(one_row)(q, k, v, g).sum()))(q)
    grad_d = jax.grad(lambda q: linear_attention(q, k, v, g=g, impl="reference")[0].sum())(q)
    assert rel_err(grad_v, grad_d) < 1e-5


def test_default_scale_and_no_final_state(rng):
    q, k, v, _ = make_inputs(rng, b=1, t=10, h=2, d=16, decay=None, init=False)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    o, s = linear_attention(q, k, v, impl="xla")
    assert s is None
    o1, _ = linear_attention(q, k, v, scale=0.25, impl="xla")  # 16 ** -0.5 == 0.25
    o2, _ = linear_attention(q, k, v, scale=1.0, impl="xla")
    np.testing.assert_allclose(o, o1)
    np.testing.assert_allclose(4 * o, o2, rtol=1e-5, atol=1e-5)


# ---- bad input ------------------------------------------------------------------------------

_f = jnp.zeros


@pytest.mark.parametrize(
    "args,kw,err,match",
    [
        ((_f((2, 8, 4, 16)), _f((3, 8, 4, 16)), _f((3, 8, 4, 16))), {}, ValueError, "batch and time"),
        ((_f((2, 8, 4, 16)), _f((2, 9, 4, 16)), _f((2, 9, 4, 16))), {}, ValueError, "batch and time"),
        ((_f((2, 8, 4, 16)), _f((2, 8, 3, 16)), _f((2, 8, 3, 16))), {}, ValueError, "H % Hk"),
        ((_f((2, 8, 4)), _f((2, 8, 4, 16)), _f((2, 8, 4, 16))), {}, ValueError, r"q must have rank 4"),
        ((_f((2, 8, 4, 16)), _f((2, 8, 4, 16)), _f((2, 8, 4, 16, 1))), {}, ValueError, r"v must have rank 4"),
        ((_f((2, 8, 4, 16)), _f((2, 8, 4, 8)), _f((2, 8, 4, 16))), {}, ValueError, "head dim"),
        ((_f((2, 8, 4, 16)), _f((2, 8, 2, 16)), _f((2, 8, 4, 16))), {}, ValueError, "same heads"),
        ((jnp.zeros((2, 8, 4, 16), jnp.int32), _f((2, 8, 4, 16)), _f((2, 8, 4, 16))), {}, TypeError, "q.dtype=int32"),
        (
            (_f((2, 8, 4, 16)), _f((2, 8, 4, 16)), _f((2, 8, 4, 16))),
            {"g": _f((2, 8, 4)), "g_gamma": _f((4,))},
            ValueError,
            "not both",
        ),
        ((_f((2, 8, 4, 16)), _f((2, 8, 4, 16)), _f((2, 8, 4, 16))), {"g": _f((2, 8, 2))}, ValueError, r"g\.shape"),
        (
            (_f((2, 8, 4, 16)), _f((2, 8, 4, 16)), _f((2, 8, 4, 16))),
            {"g": jnp.zeros((2, 8, 4), jnp.int32)},
            TypeError,
            "g.dtype",
        ),
        ((_f((2, 8, 4, 16)), _f((2, 8, 4, 16)), _f((2, 8, 4, 16))), {"g_gamma": _f((3,))}, ValueError, "g_gamma.shape"),
        (
            (_f((2, 8, 4, 16)), _f((2, 8, 4, 16)), _f((2, 8, 4, 32))),
            {"initial_state": _f((2, 4, 16, 16))},
            ValueError,
            r"initial_state.shape=\(2, 4, 16, 16\)",
        ),
        ((_f((2, 8, 4, 16)), _f((2, 8, 4, 16)), _f((2, 8, 4, 16))), {"impl": "cuda"}, ValueError, "impl"),
    ],
    ids=[
        "batch",
        "time",
        "heads_not_divisible",
        "rank_q",
        "rank_v",
        "head_dim",
        "kv_heads",
        "int_dtype",
        "g_and_g_gamma",
        "g_shape",
        "g_int",
        "g_gamma_shape",
        "initial_state_shape",
        "unknown_impl",
    ],
)
def test_bad_input(args, kw, err, match):
    with pytest.raises(err, match=match):
        linear_attention(*args, **kw)


@pytest.mark.skipif("pallas" not in IMPLS, reason="no Pallas Triton kernels")
def test_pallas_runs_long_inputs_in_pieces(rng, monkeypatch):
    """Past int32 element offsets the kernels run pieces with the state chained: with the limit made
    small (pieces of 128 tokens here), outputs, final state and gradients equal the token recurrence,
    documents crossing a cut and starting at one included."""
    from pallas_kernels.linear_attention import pallas_triton

    b, t, h, d = 2, 150, 2, 16
    monkeypatch.setattr(pallas_triton, "MAX_ELEMENTS", b * (128 + 64) * h * d)
    assert pallas_triton.piece_len(jnp.zeros((b, t, h, d)), jnp.zeros((b, t, h, d))) == 128
    q, k, v, kw = make_inputs(rng, b=b, t=t, h=h, d=d, decay="g_gamma")
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    kw = {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}
    seg = jnp.asarray(np.stack([np.repeat([0, 1, 2], [40, 50, 60]), np.repeat([0, 1], [128, 22])]), jnp.int32)

    def run(impl, q, k, v, kw):
        o, s = linear_attention(q, k, v, **kw, segment_ids=seg, output_final_state=True, impl=impl)
        return jnp.sum(o * o) + jnp.sum(s), (o, s)

    # under jit (traced while the limit is patched): eager, each primitive of the pieces compiles apart
    value_and_grads = jax.jit(jax.value_and_grad(run, argnums=(1, 2, 3, 4), has_aux=True), static_argnums=0)
    (_, (o, s)), grads = value_and_grads("pallas", q, k, v, kw)
    (_, (o_r, s_r)), grads_r = value_and_grads("reference", q, k, v, kw)
    assert rel_err(o, o_r) < 1e-4 and rel_err(s, s_r) < 1e-4
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        assert rel_err(got, want) < 1e-3
