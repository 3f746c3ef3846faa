"""linear_attention with per-key-channel gates (GLA, ``g [B, T, H, D]``) against the float64 token recurrence.

The reference against a direct numpy loop; the XLA path (secondary chunking) against the reference,
outputs, final state and every gradient (q, k, v, g, initial_state), on fresh random inputs each run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention
from tests.helpers import rel_err, tol, x64


def channel_inputs(rng, *, b=1, t=37, h=4, hk=None, d=16, e=None, g_range=(0.01, 1.0), init=True):
    """Random q, k, v (numpy float64) and kw with a per-channel log decay g ``[B, T, H, D]`` in ``-g_range``."""
    hk, e = hk or h, e or d
    q = rng.standard_normal((b, t, h, d))
    k = rng.standard_normal((b, t, hk, d)) / np.sqrt(d)
    v = rng.standard_normal((b, t, hk, e))
    kw = {"g": -rng.uniform(*g_range, (b, t, h, d))}
    if init:
        kw["initial_state"] = rng.standard_normal((b, h, d, e)) / np.sqrt(d)
    return q, k, v, kw


def loop_oracle(q, k, v, g, scale, s0, segment_ids):
    """The recurrence ``S_t = diag(exp g_t) S_{t-1} + k_tᵀ v_t`` token by token in numpy float64."""
    b, t, h, d = q.shape
    grp = h // k.shape[2]
    o = np.zeros((b, t, h, v.shape[-1]))
    s = s0.copy()
    for bb in range(b):
        for tt in range(t):
            if tt and segment_ids[bb, tt] != segment_ids[bb, tt - 1]:
                s[bb] = 0.0
            for hh in range(h):
                kk, vv = k[bb, tt, hh // grp], v[bb, tt, hh // grp]
                s[bb, hh] = np.exp(g[bb, tt, hh])[:, None] * s[bb, hh] + np.outer(kk, vv)
                o[bb, tt, hh] = scale * q[bb, tt, hh] @ s[bb, hh]
    return o, s


def test_reference_equals_a_direct_loop(rng):
    q, k, v, kw = channel_inputs(rng, b=2, t=23, h=4, hk=2, d=4, e=3)
    seg = np.sort(rng.integers(0, 3, (2, 23)), axis=1)
    want = loop_oracle(q, k, v, kw["g"], 0.7, kw["initial_state"], seg)
    with x64():
        for impl in ("reference", "reference_quadratic"):
            run = jax.jit(functools.partial(linear_attention, scale=0.7, output_final_state=True, impl=impl))
            got = run(q, k, v, **kw, segment_ids=jnp.asarray(seg))
            assert got[0].dtype == jnp.float64 and got[1].dtype == jnp.float64
            assert rel_err(got[0], want[0]) < 1e-12 and rel_err(got[1], want[1]) < 1e-12, impl


def _loss_and_grads(impl, q, k, v, kw, do, ds, segment_ids):
    def loss(q, k, v, kw):
        o, s = linear_attention(q, k, v, **kw, segment_ids=segment_ids, output_final_state=True, impl=impl)
        return jnp.sum(o.astype(do.dtype) * do) + jnp.sum(s.astype(ds.dtype) * ds), (o, s)

    grads, (o, s) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, kw)
    named = {"o": o, "final_state": s, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    return named | {f"d{n}": x for n, x in grads[3].items()}


def check_xla(rng, dtype, *, t, docs=False, g_range=(0.01, 1.0), dg_factor=4.0, **shape):
    """The XLA path's outputs and every gradient against the float64 reference."""
    q, k, v, kw = channel_inputs(rng, t=t, g_range=g_range, **shape)
    q, k, v = (np.asarray(jnp.asarray(x, dtype)) for x in (q, k, v))
    do = rng.standard_normal(q.shape[:3] + v.shape[3:])
    ds = rng.standard_normal(q.shape[:1] + (q.shape[2], q.shape[3], v.shape[3]))
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (q.shape[0], t)), axis=1)) if docs else None
    got = _loss_and_grads(
        "xla",
        *(jnp.asarray(x, dtype) for x in (q, k, v)),
        {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()},
        jnp.asarray(do, jnp.float32),
        jnp.asarray(ds, jnp.float32),
        seg,
    )
    with x64():
        f64 = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
        want = _loss_and_grads("reference", *f64, {n: jnp.asarray(x) for n, x in kw.items()}, do, ds, seg)
        want = {n: np.asarray(x) for n, x in want.items()}
    assert got["o"].dtype == dtype and got["final_state"].dtype == jnp.float32
    assert set(got) == set(want) and got["dg"].shape == kw["g"].shape
    bound = tol(dtype, t)
    errors = {n: rel_err(got[n], want[n]) for n in want}
    bad = {n: e for n, e in errors.items() if e > (dg_factor * bound if n == "dg" else bound)}
    assert not bad, f"xla {jnp.dtype(dtype).name} T={t}: errors over tolerance {bound:.1e}: {bad}"


@pytest.mark.parametrize(
    "dtype,t,docs", [(jnp.float32, 63, True), (jnp.bfloat16, 45, False)], ids=["f32-T63-docs", "bf16-T45"]
)
def test_xla_matches_reference_grouped_heads(rng, dtype, t, docs):
    check_xla(rng, dtype, t=t, docs=docs, b=2, h=4, hk=2, d=16, e=8)


def test_xla_strong_decay(rng):
    # g ≈ −20 per channel: every factor across a few tokens underflows; nothing may become inf or NaN, and
    # the usual bounds hold (dg within ~3e-5 of the float64 one in 4 seeds); T = 100: the second chunk cut short
    check_xla(rng, jnp.float32, t=100, g_range=(18.0, 22.0), b=1, h=2, d=16)


def test_xla_single_token(rng):
    t = 1
    q, k, v, kw = channel_inputs(rng, b=2, t=t, h=2, hk=1, d=8)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (2, t)), axis=1))
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    run = jax.jit(functools.partial(linear_attention, output_final_state=True, impl="xla"))
    got = run(*args, **{n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}, segment_ids=seg)
    with x64():
        want = linear_attention(q, k, v, **kw, segment_ids=seg, output_final_state=True, impl="reference")
    assert rel_err(got[0], want[0]) < tol(jnp.float32, t) and rel_err(got[1], want[1]) < tol(jnp.float32, t)


def test_chained_halves_equal_the_whole(rng):
    q, k, v, kw = channel_inputs(rng, b=2, t=80, h=2, d=16)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, kw["g"])]
    s0 = jnp.asarray(kw["initial_state"], jnp.float32)

    @jax.jit
    def run(q, k, v, g, s):
        return linear_attention(q, k, v, g=g, initial_state=s, output_final_state=True, impl="xla")

    whole, final = run(*args, s0)
    cut = 40  # not a multiple of the chunk (64) or the sub-block (16)
    first, mid = run(*(x[:, :cut] for x in args), s0)
    second, end = run(*(x[:, cut:] for x in args), mid)
    assert rel_err(jnp.concatenate([first, second], axis=1), whole) < 1e-5
    assert rel_err(end, final) < 1e-5


def test_packed_documents_equal_each_document_alone(rng):
    n, docs = 21, 3
    q, k, v, kw = channel_inputs(rng, b=1, t=n * docs, h=2, d=16, init=False)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, kw["g"])]
    seg = jnp.asarray(np.repeat(np.arange(docs), n)[None])
    run = jax.jit(functools.partial(linear_attention, output_final_state=True, impl="xla"))
    packed, final = run(*args[:3], g=args[3], segment_ids=seg)
    for start in range(0, n * docs, n):
        piece = [x[:, start : start + n] for x in args]
        alone, last = run(*piece[:3], g=piece[3])
        assert rel_err(packed[:, start : start + n], alone) < 1e-5
    assert rel_err(final, last) < 1e-5


def _f(shape):
    return jnp.zeros(shape, jnp.float32)


@pytest.mark.parametrize(
    "g_shape",
    [(2, 8, 4, 8), (2, 8, 2, 16), (2, 8, 4, 16, 1), (2, 7, 4, 16)],
    ids=["channels", "key-heads", "rank5", "time"],
)
def test_bad_channel_gate_shapes_raise(g_shape):
    q, k, v = _f((2, 8, 4, 16)), _f((2, 8, 2, 16)), _f((2, 8, 2, 8))
    match = r"g must be \[B, T, H\]=\(2, 8, 4\) .* or \[B, T, H, D\]=\(2, 8, 4, 16\) .* got g.shape="
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, g=_f(g_shape))
