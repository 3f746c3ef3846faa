"""Kernel-specific tests of the per-channel (GLA) Pallas Triton kernels (``pallas_triton_channel``).

On the CPU the kernels run in the Pallas interpreter (``interpret=True``) against the float64 token
recurrence (``reference.recurrent`` with ``g [B, T, H, D]``): the output, the final state and every
gradient (q, k, v, g, initial_state), in float32 (odd length, grouped heads, packed documents, one
starting at a run's first token, strong decays up to g = −20, 32-token chunks: the factoring between
sub-tiles, two column blocks, two runs per row) and bfloat16 through the public entry point
(``impl="pallas"``, E ≠ D); the state passes on gated operands formed in XLA (``pregated_state``,
the GPU default in bf16/fp16, and the interpret default); two calls chained through the split entry
points (what sequence parallelism does) against the whole sequence; long inputs run as chained
pieces; the kernels through the Triton lowering. Each case is one compile of the forward and backward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention
from pallas_kernels.common import pad_dim
from pallas_kernels.linear_attention import pallas_triton_channel, reference
from pallas_kernels.linear_attention.config import ChannelConfig, default_channel_config
from tests.helpers import rel_err, tol, x64

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def make_inputs(rng, *, b, t, h, hk, d, e, g_max=1.0, init=True, docs=None):
    """float64 numpy inputs, cotangents and segment ids (``docs``: positions where a document starts)."""
    xs = {
        "q": rng.standard_normal((b, t, h, d)),
        "k": rng.standard_normal((b, t, hk, d)) / np.sqrt(d),
        "v": rng.standard_normal((b, t, hk, e)),
        "g": -rng.uniform(0.01, g_max, (b, t, h, d)),
    }
    if init:
        xs["initial_state"] = rng.standard_normal((b, h, d, e)) / np.sqrt(d)
    seg = None
    if docs is not None:
        starts = np.zeros((b, t), np.int32)
        starts[:, list(docs)] = 1
        seg = np.cumsum(starts, axis=1) % 2
    cot = {"o": rng.standard_normal((b, t, h, e)), "final_state": rng.standard_normal((b, h, d, e))}
    return xs, cot, seg


def _value_and_grads(fn, xs, cot, *, compile_options=None):
    def loss(xs):
        o, s = fn(xs)
        dt = cot["o"].dtype
        return jnp.sum(o.astype(dt) * cot["o"]) + jnp.sum(s.astype(dt) * cot["final_state"]), (o, s)

    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(xs).compile(compiler_options=compile_options)
    (_, (o, s)), grads = compiled(xs)
    return {"o": o, "final_state": s} | {f"d{n}": x for n, x in grads.items()}


def _oracle(xs, cot, seg, scale):
    """Outputs and gradients of the float64 token recurrence."""
    with x64():
        doc_ids = None if seg is None else reference.document_index(jnp.asarray(seg))

        def fn(xs):
            xs = dict(xs)
            q, k, v, g = (xs.pop(n) for n in ("q", "k", "v", "g"))
            return reference.recurrent(q, k, v, g, scale=scale, doc_ids=doc_ids, **xs)

        want = _value_and_grads(
            fn, {n: jnp.asarray(x) for n, x in xs.items()}, {n: jnp.asarray(c) for n, c in cot.items()}
        )
        return {n: np.asarray(x) for n, x in want.items()}


def _low(xs, dtype):
    """The inputs the kernels get: q, k, v in ``dtype``, g and the initial state float32."""
    return {n: jnp.asarray(x, dtype if n in ("q", "k", "v") else jnp.float32) for n, x in xs.items()}


def _interpret_kernel(config, segment_ids):
    """The interpret-mode kernels as a function of the input dict (q, k, v, g, initial_state), scale 0.7."""

    def kernel(xs):
        xs = dict(xs)
        q, k, v = (xs.pop(n) for n in ("q", "k", "v"))
        return pallas_triton_channel.linear_attention(
            q, k, v, **xs, scale=0.7, segment_ids=segment_ids, interpret=True, config=config
        )

    return kernel


def _assert_close(got, want, bound):
    assert set(got) == set(want)
    for name in want:
        err = rel_err(got[name], want[name])
        assert err < bound, (name, err, bound)


@pytest.mark.parametrize(
    "g_max,dtype,bounded", [(1.0, jnp.bfloat16, True), (20.0, jnp.float32, False), (1.0, jnp.float16, None)]
)
def test_gates_pick_the_kernels_they_allow(rng, g_max, dtype, bounded):
    """The output and gradient kernels take factored diagonal sub-tiles (mode "channel_bounded")
    only when every sub-tile allows it, never for float16: the op's o and final state equal, bit
    for bit, those of the kernels forced to that form. The usual decays below test the factored
    kernels, the strong-decay case (down to −20) and fp16 the exact ones."""
    import dataclasses

    from pallas_kernels.linear_attention import pallas_triton_channel as ptc

    xs, _, _ = make_inputs(rng, b=1, t=64, h=2, hk=2, d=16, e=16, g_max=g_max)
    q, k, v = (jnp.asarray(xs[n], dtype) for n in ("q", "k", "v"))
    g = jnp.asarray(xs["g"], jnp.float32)
    statics = ptc._statics(q, k, v, scale=None, interpret=True, config=None)
    qp, kp, vp, gp = ptc._prepare(q, k, v, g, statics)
    s0 = ptc._padded_state(jnp.asarray(xs["initial_state"], jnp.float32), qp, vp, 1)
    found = ptc.gate_case(ptc.cumulative_gates(gp, statics), statics, qp.dtype)
    assert (None if found is None else bool(found)) is bounded
    got = jax.jit(lambda *a: ptc._linear_attention(*a, None, statics=statics))(qp, kp, vp, gp, s0)
    for mode, same in (("channel_bounded", bounded is True), ("channel", bounded is not True)):
        forced = dataclasses.replace(statics, mode=mode)

        def run(q, k, v, g, s0, st=forced):
            return ptc.forward_finish(q, k, v, g, None, ptc.forward_local(q, k, v, g, None, st), s0, st)[:2]

        want = jax.jit(run)(qp, kp, vp, gp, s0)
        equal = all(bool(jnp.array_equal(x, y)) for x, y in zip(got, want, strict=True))
        assert equal is same, (mode, equal)


@functools.partial(jax.jit, static_argnames=("statics",))
def _op_vjp(qp, kp, vp, gp, s0, do, d_final, statics):
    """o, the final state and the gradients of the padded inputs of ``_linear_attention``."""
    fn = functools.partial(pallas_triton_channel._linear_attention, docs=None, statics=statics)
    (o, final), pull = jax.vjp(fn, qp, kp, vp, gp, s0)
    return [o, final, *pull((do.astype(o.dtype), d_final))]


def test_output_rows_take_each_gate_case(rng, monkeypatch):
    """``ChannelConfig.output_rows=32``: the output kernel on 32-row sub-tiles where every 32-row
    tile's factors stay below e^40 (case 2: log decays ≤ 2.4 per token), the 16-row factored kernels
    where only the 16-row tiles pass (case 1: 2.6–4 per token), the exact ones past both (case 0: 6–8).
    The op's o, final state and every gradient equal, bit for bit, those of the op forced into the form
    its case names (the exact form: its gate check off) and differ from the other two forms'; the forms
    trace their output kernel on 4, 4 and 2 sub-tiles, the op on both; case 2 matches the float64
    recurrence."""
    ptc = pallas_triton_channel
    config = ChannelConfig(chunk=64, block_cols=16, block_e=16, pregated_state=True, output_rows=32)
    parts, label = {}, [None]
    real_output, real_case = ptc._output_kernel, ptc.gate_case

    def recorded(*args, **kwargs):  # at trace time: once per form (``_op_vjp`` caches by statics)
        parts.setdefault(label[0], set()).add(kwargs["parts"])
        return real_output(*args, **kwargs)

    monkeypatch.setattr(ptc, "_output_kernel", recorded)
    xs, cot, _ = make_inputs(rng, b=1, t=64, h=2, hk=1, d=16, e=16)
    q, k, v = (jnp.asarray(xs[n], jnp.float32) for n in ("q", "k", "v"))
    statics = ptc._statics(q, k, v, scale=None, interpret=True, config=config)
    small = dataclasses.replace(statics, cfg=config.small_tiles())
    bounded = "channel_bounded"
    forms = [small, dataclasses.replace(small, mode=bounded), dataclasses.replace(statics, mode=bounded)]
    do, d_final = (jnp.asarray(cot[n], jnp.float32) for n in ("o", "final_state"))

    def outputs(g, st, name, *, check=True):
        label[0] = name
        monkeypatch.setattr(ptc, "gate_case", real_case if check else (lambda *a: None))
        qp, kp, vp, gp = ptc._prepare(q, k, v, g, st)
        s0 = ptc._padded_state(jnp.asarray(xs["initial_state"], jnp.float32), qp, vp, 1)
        out = _op_vjp(qp, kp, vp, gp, s0, do, d_final, st)
        monkeypatch.setattr(ptc, "gate_case", real_case)
        return out

    for low, high, want in ((0.5, 2.4, 2), (2.6, 4.0, 1), (6.0, 8.0, 0)):
        xs["g"] = -rng.uniform(low, high, xs["g"].shape)
        g = jnp.asarray(xs["g"], jnp.float32)
        gp = ptc._prepare(q, k, v, g, statics)[3]
        assert int(ptc.gate_case(ptc.cumulative_gates(gp, statics), statics, jnp.float32)) == want, low
        got = outputs(g, statics, "op")
        for case, form in enumerate(forms):
            forced = outputs(g, form, case, check=case != 0)
            same = [bool(jnp.array_equal(x, y)) for x, y in zip(got, forced, strict=True)]
            assert all(same) is (case == want), (low, case, same)
        if want == 2:
            label[0] = "public"  # the public entry point, its own switch
            ys = {n: np.asarray(x, np.float64) for n, x in _low(xs, jnp.float32).items()}
            cot32 = {n: jnp.asarray(c, jnp.float32) for n, c in cot.items()}
            got_ref = _value_and_grads(_interpret_kernel(config, None), _low(ys, jnp.float32), cot32)
            _assert_close(got_ref, _oracle(ys, cot, None, 0.7), tol(jnp.float32, 64))
    assert parts == {"op": {2, 4}, 0: {4}, 1: {4}, 2: {2}, "public": {2, 4}}, parts


@pytest.mark.parametrize("split_grads,stacked", [(False, False), (True, False), (False, True), (True, True)])
def test_kernels_f32_gqa_documents_strong_decay_runs(rng, split_grads, stacked):
    """32-token chunks (two sub-tiles; 64 with ``stacked``), two key-column blocks, two runs per row,
    grouped heads, an odd length, documents (one starting at the second run's first token), log decays down to −20; the
    chunk gradients in one kernel or two (``split_grads``, with the scores' cotangent formed again in
    each key-column step: ``recompute_dz``); the off-diagonal pairs by whole-chunk products
    (``stacked``, with 64-token chunks: four sub-tiles)."""
    config = ChannelConfig(
        chunk=64 if stacked else 32,
        block_cols=16,
        block_e=16,
        splits=2,
        split_grads=split_grads,
        recompute_dz=split_grads,
        stacked_pairs=stacked,
    )
    xs, cot, seg = make_inputs(rng, b=1, t=70, h=2, hk=1, d=32, e=16, g_max=20.0, docs=(9, 33, 64))
    xs = {n: np.asarray(x, np.float64) for n, x in _low(xs, jnp.float32).items()}
    seg_j = jnp.asarray(seg)

    kernel = _interpret_kernel(config, seg_j)
    cot32 = {n: jnp.asarray(c, jnp.float32) for n, c in cot.items()}
    got = _value_and_grads(kernel, _low(xs, jnp.float32), cot32, compile_options=FAST_COMPILE)
    assert got["o"].dtype == jnp.float32 and got["final_state"].dtype == jnp.float32
    _assert_close(got, _oracle(xs, cot, seg, 0.7), tol(jnp.float32, 70))


@pytest.mark.parametrize("split_grads,recompute_dz", [(False, False), (True, True), (False, True), (True, False)])
def test_stacked_pairs_equal_the_pairs(rng, split_grads, recompute_dz):
    """``ChannelConfig.stacked_pairs`` against the pairwise kernels on the same inputs: 64-token
    chunks (four sub-tiles), mild decay so that every sub-tile pair (not only adjacent ones)
    contributes, grouped heads, documents, each gradient layout."""
    xs, cot, seg = make_inputs(rng, b=1, t=130, h=2, hk=1, d=32, e=16, g_max=1.0, docs=(9, 70, 100))
    seg_j = jnp.asarray(seg)
    cot32 = {n: jnp.asarray(c, jnp.float32) for n, c in cot.items()}
    got = {}
    for stacked in (False, True):
        config = ChannelConfig(
            chunk=64,
            block_cols=16,
            block_e=16,
            split_grads=split_grads,
            recompute_dz=recompute_dz,
            stacked_pairs=stacked,
        )

        got[stacked] = _value_and_grads(
            _interpret_kernel(config, seg_j), _low(xs, jnp.float32), cot32, compile_options=FAST_COMPILE
        )
    for name in got[False]:
        assert rel_err(got[True][name], got[False][name]) < 1e-5, name


@pytest.mark.parametrize("dtype,g_max", [(jnp.float32, 0.1), (jnp.bfloat16, 20.0)])
def test_pregated_state_passes(rng, monkeypatch, dtype, g_max):
    """``ChannelConfig.pregated_state``: the state passes on gated keys / queries formed once in XLA,
    against the float64 recurrence: 2 key/value heads of 2 query heads each (so a key head's repeat order
    matters), documents (one at a chunk's first token, and chunks with none, which carry the state),
    two runs (the scan over runs and the log decays from ``pregated_inputs``); mild log decays (down
    to −0.1, so states carry across chunks and runs: a chunk decay one token short fails) and strong
    ones (down to −20); both passes counted."""
    from pallas_kernels.linear_attention import channel_common

    calls = []
    real = channel_common.pregated_inputs

    def counted(*args, **kw):
        calls.append(kw["queries"])
        return real(*args, **kw)

    monkeypatch.setattr(pallas_triton_channel, "pregated_inputs", counted)
    monkeypatch.setattr(pallas_triton_channel.vjp, "pregated_inputs", counted)
    config = ChannelConfig(chunk=32, block_cols=16, block_e=16, splits=2, pregated_state=True)
    xs, cot, seg = make_inputs(rng, b=1, t=130, h=4, hk=2, d=32, e=16, g_max=g_max, docs=(9, 64))
    xs = {n: np.asarray(x, np.float64) for n, x in _low(xs, dtype).items()}
    cot_low = {n: jnp.asarray(c, jnp.float32) for n, c in cot.items()}
    got = _value_and_grads(_interpret_kernel(config, jnp.asarray(seg)), _low(xs, dtype), cot_low)
    assert sorted(calls) == [False, True]  # the forward pass's keys, the reverse pass's queries
    _assert_close(got, _oracle(xs, cot, seg, 0.7), tol(dtype, 130))


def test_public_entry_point_bf16_in_pieces(rng, monkeypatch):
    """``linear_attention(..., g=[B, T, H, D], impl="pallas")`` in bf16 (grouped heads, E ≠ D, an odd
    length, the default interpret tiling) with the int32 limit made small, so the call runs as pieces
    of 32 tokens with the state chained: a document starting at the cut, another inside a piece."""
    monkeypatch.setattr(pallas_triton_channel, "MAX_ELEMENTS", 2 * 32 * (32 + 16))
    xs, cot, seg = make_inputs(rng, b=1, t=63, h=2, hk=1, d=16, e=32, docs=(32, 50))
    low = _low(xs, jnp.bfloat16)
    assert (
        pallas_triton_channel.piece_len(
            low["q"], low["v"], default_channel_config(batch=1, heads=2, seq_len=63, value_dim=32, interpret=True)
        )
        == 32
    )
    seg_j = jnp.asarray(seg)

    def kernel(xs):
        xs = dict(xs)
        q, k, v = (xs.pop(n) for n in ("q", "k", "v"))
        return linear_attention(q, k, v, **xs, segment_ids=seg_j, output_final_state=True, impl="pallas")

    cot32 = {n: jnp.asarray(c, jnp.float32) for n, c in cot.items()}
    got = _value_and_grads(kernel, low, cot32, compile_options=FAST_COMPILE)
    assert got["o"].dtype == jnp.bfloat16 and got["final_state"].dtype == jnp.float32
    want = _oracle({n: np.asarray(x, np.float64) for n, x in low.items()}, cot, seg, 16**-0.5)
    _assert_close(got, want, tol(jnp.bfloat16, 63))


def _survives(seg):
    """``[B, 1, 1, 1]``: the state entering a call reaches its end (no document starts inside it)."""
    return jnp.all(seg == seg[:, :1], axis=1)[:, None, None, None]


@pytest.mark.parametrize("pregated,rows", [(False, None), (True, None), (True, 32)])
def test_split_entry_points_chain_two_calls(rng, pregated, rows):
    """Two calls chained through ``split_forward`` / ``finish_forward`` (entering state ``Γ₀ ⊙ S₀ +
    M₀``, ``Γ = e^{Σ g}`` per key channel, zero across a document start) and ``split_backward`` /
    ``finish_backward`` (leaving cotangent ``Γ₁ ⊙ dS + dM₁``) equal the whole sequence, with a
    document crossing the cut: what LASP does per rank (and with ``pregated_state``; ``rows``: the
    output kernel on 32-row sub-tiles of 32-token chunks, which these mild decays allow)."""
    # (with ``rows``, the GPU default's two gradient kernels too: ``split_grads``, ``recompute_dz``)
    config = ChannelConfig(
        chunk=rows or 16,
        block_cols=16,
        block_e=16,
        splits=2,
        pregated_state=pregated,
        output_rows=rows,
        split_grads=rows is not None,
        recompute_dz=rows is not None,
    )
    # 2 key/value heads of 2 query heads; a boundary inside the second chunk of the first call's first
    # run (the state carried into it must stop), another near the second call's end; mild decays (down
    # to −0.1 per token), so states reach across chunks and calls
    xs, cot, seg = make_inputs(rng, b=1, t=100, h=4, hk=2, d=16, e=16, g_max=0.1, docs=(20, 90))
    x32 = _low(xs, jnp.float32)
    xs = {n: np.asarray(x, np.float64) for n, x in x32.items()}
    do, d_final = jnp.asarray(cot["o"], jnp.float32), jnp.asarray(cot["final_state"], jnp.float32)
    cut = 60

    def halves(x):
        return x[:, :cut], x[:, cut:]

    def chained(x32, seg):
        calls = []
        for q, k, v, g, s in zip(*(halves(x32[n]) for n in ("q", "k", "v", "g")), halves(seg), strict=True):
            m, call, local = pallas_triton_channel.split_forward(
                q, k, v, g=g, scale=0.7, segment_ids=s, interpret=True, config=config
            )
            calls.append((m, call, local, jnp.where(_survives(s), jnp.exp(g.sum(1))[..., None], 0.0)))
        (m0, call0, local0, gamma0), (m1, call1, local1, gamma1) = calls
        carried = (seg[:, cut - 1] == seg[:, cut])[:, None, None, None]  # a document crosses the cut
        s_in1 = jnp.where(carried, gamma0 * x32["initial_state"] + m0, 0.0)
        o0, states0 = pallas_triton_channel.finish_forward(call0, local0, x32["initial_state"])
        o1, states1 = pallas_triton_channel.finish_forward(call1, local1, s_in1)
        do0, do1 = halves(do)
        dm1, pending1 = pallas_triton_channel.split_backward(call1, states1, do1)
        _, pending0 = pallas_triton_channel.split_backward(call0, states0, do0)
        grads1 = pallas_triton_channel.finish_backward(call1, states1, pending1, d_final)
        d_out0 = jnp.where(carried, gamma1 * d_final + dm1, 0.0)
        grads0 = pallas_triton_channel.finish_backward(call0, states0, pending0, d_out0)
        assert grads0[4] is None  # the place of g_gamma's cotangent in the scalar kernels' order
        got = {n: jnp.concatenate([a, b], axis=1) for n, a, b in zip(("dq", "dk", "dv", "dg"), grads0, grads1)}
        final = gamma1 * s_in1 + m1
        return got | {"o": jnp.concatenate([o0, o1], axis=1), "final_state": final, "dinitial_state": grads0[-1]}

    compiled = jax.jit(chained).lower(x32, jnp.asarray(seg)).compile(compiler_options=FAST_COMPILE)
    _assert_close(compiled(x32, jnp.asarray(seg)), _oracle(xs, cot, seg, 0.7), tol(jnp.float32, 100))


def test_supports_and_rejects():
    ok = jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16)
    assert pallas_triton_channel.supports(ok, ok, ok)
    many_rows = jax.ShapeDtypeStruct((8, 4096, 32, 128), jnp.bfloat16)  # one run per row: one piece
    assert pallas_triton_channel.supports(many_rows, many_rows, many_rows)
    long = jax.ShapeDtypeStruct((64, 2**17, 32, 128), jnp.bfloat16)  # runs as pieces
    assert pallas_triton_channel.supports(long, long, long)
    huge = jax.ShapeDtypeStruct((4096, 64, 64, 128), jnp.bfloat16)  # not one chunk under int32 offsets
    assert not pallas_triton_channel.supports(huge, huge, huge)
    with pytest.raises(ValueError, match="power of two"):
        ChannelConfig(block_cols=24)
    with pytest.raises(ValueError, match="splits"):
        ChannelConfig(splits=0)
    for bad in (dict(output_rows=24), dict(output_rows=8), dict(output_rows=64, chunk=32)):
        with pytest.raises(ValueError, match=r"output_rows=\d+ must be a power of two from 16 to chunk=\d+"):
            ChannelConfig(**bad)
    rows32 = ChannelConfig(output_rows=32)
    assert (rows32.factored_rows, rows32.small_tiles().factored_rows, rows32.channel_rows) == (32, 16, 16)
    few = default_channel_config(batch=1, heads=16, seq_len=32768, value_dim=128, interpret=False)
    assert (few.chunk, few.block_e, few.splits) == (64, 32, 8)  # 512 programs per state pass, 64 chunks each
    assert few.split_grads and few.recompute_dz  # the two-kernel gradients (faster on the H200)
    assert default_channel_config(batch=8, heads=32, seq_len=4096, value_dim=128, interpret=False).splits == 1
    # bf16/fp16: 4 warps in the output and gradient kernels, 2 state stages (session 18); the rest as
    # float32; bf16 up to head dim 128 the output kernel on 32-row sub-tiles (session 24)
    for dtype, rows in ((jnp.bfloat16, 32), (jnp.float16, None)):
        low = default_channel_config(batch=1, heads=16, seq_len=32768, value_dim=128, interpret=False, dtype=dtype)
        assert (low.num_warps, low.num_warps_bwd, low.num_stages_state) == (4, 4, 2)
        want = dataclasses.replace(few, num_warps=4, num_warps_bwd=4, num_stages_state=2, pregated_state=True)
        assert low == dataclasses.replace(want, output_rows=rows)
    f32 = default_channel_config(batch=1, heads=16, seq_len=32768, value_dim=128, interpret=False, dtype=jnp.float32)
    assert f32 == few and (few.num_warps, few.num_warps_bwd, few.num_stages_state) == (8, 8, 3)
    # head dims past 128: fewer state-pass stages (offline: float32 at 128 already asks 176 KB with 3)
    for key_dim, value_dim in ((256, 128), (128, 256)):
        for dtype, stages in ((jnp.float32, 1), (jnp.bfloat16, 2)):
            wide = default_channel_config(
                batch=1, heads=8, seq_len=8192, value_dim=value_dim, key_dim=key_dim, interpret=False, dtype=dtype
            )
            assert wide.num_stages_state == stages and wide.output_rows is None
    assert default_channel_config(batch=1, heads=1, seq_len=64, value_dim=16, interpret=True).pregated_state


def test_kernels_lower_to_triton(triton_lowering_h100):
    """Lower (not compile) forward and backward for CUDA here: the Triton lowering's own checks run
    (D = E = 128 bf16 with two runs; padded head dims, grouped heads and documents in float32)."""
    spec = jax.ShapeDtypeStruct
    for (b, t, h, hk, d, e), dtype, docs, config in [
        ((1, 256, 2, 2, 128, 128), jnp.bfloat16, False, ChannelConfig(splits=2)),
        ((1, 256, 2, 2, 128, 128), jnp.bfloat16, False, ChannelConfig(splits=2, split_grads=True, recompute_dz=True)),
        ((2, 100, 4, 2, 40, 24), jnp.float32, True, None),
        ((1, 256, 2, 2, 128, 128), jnp.bfloat16, True, ChannelConfig(splits=2, stacked_pairs=True)),
        ((1, 256, 4, 2, 128, 128), jnp.bfloat16, True, ChannelConfig(splits=2, pregated_state=True)),
        ((1, 256, 4, 2, 128, 128), jnp.bfloat16, True, ChannelConfig(splits=2, pregated_state=True, output_rows=32)),
    ]:
        q, k, v = spec((b, t, h, d), dtype), spec((b, t, hk, d), dtype), spec((b, t, hk, e), dtype)
        g, s0 = spec((b, t, h, d), jnp.float32), spec((b, h, d, e), jnp.float32)
        seg = spec((b, t), jnp.int32) if docs else None

        def fwd_bwd(q, k, v, g, s0, seg, config=config):
            def loss(q, k, v, g, s0):
                o, s = pallas_triton_channel.linear_attention(
                    q, k, v, g=g, initial_state=s0, segment_ids=seg, config=config
                )
                return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

            return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)

        text = jax.jit(fwd_bwd).trace(q, k, v, g, s0, seg).lower(lowering_platforms=("cuda",)).as_text()
        names = ["state", "scan", "output", "state_bwd", "scan_reverse", "grads"]
        effective = config or default_channel_config(batch=b, heads=h, seq_len=t, value_dim=pad_dim(e), interpret=False)
        names += ["grads_state"] if effective.split_grads else []
        # the output and gradient kernels twice: the factored-diagonal and the exact form, one
        # lax.switch on the gates choosing in the forward and again in the backward; the output kernel
        # three times with 32-row output tiles (factored on them, factored on 16 rows, exact)
        twice = {"output", "grads", "grads_state"}
        count = sum(2 if name in twice else 1 for name in names) + (1 if effective.output_rows else 0)
        # the chunk-local cumulative gates by the delta rule's kernel: once in the forward (the
        # whole-input gate check, and the pregated forward pass reads the same sums), and with
        # pregated state passes once more before the reverse pass
        sums = 1 + (1 if effective.pregated_state else 0)
        assert text.count("__gpu$xla.gpu.triton") == count + sums, f"expected the {names} kernels"
        assert "gated_delta_rule_chunk_cumsum" in text
        assert text.count("stablehlo.case") == 2
        for name in names:
            assert f"linear_attention_channel_{name}" in text, name


GPU_CASES = {
    # name: documents (new-document positions), config (None: the default, 2 runs per row here)
    "default": (None, None),
    "one-run-docs": ((1000, 1001, 2500), ChannelConfig(splits=1)),
    "split-grads-docs": ((1000, 2500), ChannelConfig(split_grads=True, recompute_dz=True)),
    "stacked-pairs-docs": ((1000, 2500), ChannelConfig(stacked_pairs=True)),
    "pregated-docs": ((1000, 2500), ChannelConfig(splits=2, pregated_state=True)),
    # the output kernel on 32-row sub-tiles (``output_rows``; log decays down to −1 pass its check) with
    # the bf16 default's other fields (two gradient kernels, 4 warps, 2 state stages, pregated passes)
    "32-row-output-docs": (
        (1000, 2500),
        ChannelConfig(
            splits=2,
            split_grads=True,
            recompute_dz=True,
            num_warps=4,
            num_warps_bwd=4,
            num_stages_state=2,
            pregated_state=True,
            output_rows=32,
        ),
    ),
    # log decays down to −7 per token: some 16-row diagonal tiles' middle-row factors exceed e^40, so
    # the whole input runs the exact kernels behind the switch (the cases above take the factored ones)
    "strong-gates-docs": ((1000, 2500), None, 7.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_compiled_kernels_match_reference(rng, case):
    """The compiled kernels at D = E = 128, bf16, T = 4096 (grouped heads, an initial state, log
    decays down to −1 unless the case says) against the float32 token recurrence at HIGHEST precision."""
    docs, config, *g_max = GPU_CASES[case]
    _check_compiled(rng, docs, config, g_max[0] if g_max else 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", [(jnp.float32, 128), (jnp.bfloat16, 256), (jnp.float32, 256)])
def test_compiled_defaults_launch_per_dtype_and_head_dim(rng, dtype, d):
    """The default configs where shared memory is tightest (offline Triton 3.6: float32 state passes
    at D = 128 ask 176 KB with 3 stages, the limit is 227 KB), compiled and run, T = 1024, documents."""
    _check_compiled(rng, (300,), None, 1.0, d=d, dtype=dtype, t=1024)


def _check_compiled(rng, docs, config, g_max, *, d=128, dtype=jnp.bfloat16, t=4096):
    xs, cot, seg = make_inputs(rng, b=2, t=t, h=4, hk=2, d=d, e=d, g_max=g_max, docs=docs)
    xs, cot = _low(xs, dtype), {n: jnp.asarray(c, jnp.float32) for n, c in cot.items()}
    seg = None if seg is None else jnp.asarray(seg)

    def kernel(xs):
        xs = dict(xs)
        q, k, v = (xs.pop(n) for n in ("q", "k", "v"))
        return pallas_triton_channel.linear_attention(q, k, v, **xs, segment_ids=seg, config=config)

    def oracle(xs):
        xs = {n: x.astype(jnp.float32) for n, x in xs.items()}
        q, k, v, g = (xs.pop(n) for n in ("q", "k", "v", "g"))
        doc_ids = None if seg is None else reference.document_index(seg)
        return reference.recurrent(q, k, v, g, scale=d**-0.5, doc_ids=doc_ids, **xs)

    got = _value_and_grads(kernel, xs, cot)
    with jax.default_matmul_precision("highest"):
        want = _value_and_grads(oracle, xs, cot)
    _assert_close(got, want, tol(dtype, t))
