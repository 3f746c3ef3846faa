"""Kernel-specific tests of the Pallas Triton gated-delta-rule kernels (``pallas_triton``).

On the CPU the kernels run in the Pallas interpreter (``interpret=True``) against the float64 token
recurrence (``reference.recurrent``): the output, the final state and every gradient (q, k, v,
beta, g, initial_state) for each gate form (DeltaNet, Gated DeltaNet, KDA), lengths that are no
multiple of the chunk (1, 63, 130), grouped value heads, packed documents, an initial state, bf16
and fp32, 32-token chunks (two 16-row sub-tiles: the block solve and the per-channel factoring
between sub-tiles) under strong decays, the WY kernels' loops over column blocks, rows cut into
splits inside one call, and two calls chained through the split entry points (what sequence
parallelism does). Each case is one compile of the forward and backward (with XLA's cheap
optimisation level: the interpreter's programs are large and run once). The kernels also go
through the Triton lowering (catches what the interpreter accepts and Triton does not).
GPU-only: the compiled kernels at D = 128, bf16, T = 4096.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from pallas_kernels.gated_delta_rule import layout, pallas_triton, pallas_triton_split, pallas_triton_vjp, reference
from pallas_kernels.gated_delta_rule.config import BlockConfig, default_config
from tests.helpers import rel_err, tol, x64

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
GATE_SHAPES = {"deltanet": None, "gdn": "bth", "kda": "bthd"}


def make_inputs(rng, *, b, t, h, hv, d, e, gate, init=True, g_max=1.0, docs=None):
    """float64 numpy inputs (q, k L2-normalised as layers feed the op), cotangents, segment ids.

    ``docs``: token positions where a new document starts (ids alternate 0, 1, 0, …).
    """

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    xs = {
        "q": unit(rng.standard_normal((b, t, h, d))),
        "k": unit(rng.standard_normal((b, t, h, d))),
        "v": rng.standard_normal((b, t, hv, e)),
        "beta": rng.uniform(0.0, 1.0, (b, t, hv)),
    }
    if gate == "gdn":
        xs["g"] = -rng.uniform(0.01, g_max, (b, t, hv))
    elif gate == "kda":
        xs["g"] = -rng.uniform(0.01, g_max, (b, t, hv, d))
    if init:
        xs["initial_state"] = rng.standard_normal((b, hv, d, e)) / np.sqrt(d)
    seg = None
    if docs is not None:
        starts = np.zeros((b, t), np.int32)
        starts[:, list(docs)] = 1
        seg = np.cumsum(starts, axis=1) % 2
    cot = {"o": rng.standard_normal((b, t, hv, e)), "final_state": rng.standard_normal((b, hv, d, e))}
    return xs, cot, seg


def _loss(fn, xs, cot):
    o, s = fn(xs)
    loss = jnp.sum(o.astype(cot["o"].dtype) * cot["o"]) + jnp.sum(s.astype(cot["o"].dtype) * cot["final_state"])
    return loss, (o, s)


def _value_and_grads(fn, xs, cot, *, compile_options=None):
    grad_fn = jax.value_and_grad(lambda xs: _loss(fn, xs, cot), has_aux=True)
    compiled = jax.jit(grad_fn).lower(xs).compile(compiler_options=compile_options)
    (_, (o, s)), grads = compiled(xs)
    return {"o": o, "final_state": s} | {f"d{n}": x for n, x in grads.items()}


def _error(got, want) -> float:
    """Relative error, or the largest absolute one where the reference is exactly zero (a gate's
    gradient with nothing before it: the kernel's sums cancel to rounding)."""
    if not np.any(np.asarray(want)):
        return float(np.abs(np.asarray(got, np.float64)).max())
    return rel_err(got, want)


def check_kernels(rng, *, dtype, config=None, g_max=1.0, docs=None, **shape):
    """pallas_triton.gated_delta_rule (outputs, every gradient) against the float64 recurrence."""
    xs, cot, seg = make_inputs(rng, g_max=g_max, docs=docs, **shape)
    low = ("q", "k", "v")  # cast to the dtype under test; beta, g and initial_state stay float32
    xs = {n: np.asarray(jnp.asarray(x, dtype if n in low else jnp.float32), np.float64) for n, x in xs.items()}
    seg_j = None if seg is None else jnp.asarray(seg)

    def kernel(xs):
        xs = dict(xs)
        q, k, v, beta = (xs.pop(n) for n in ("q", "k", "v", "beta"))
        return pallas_triton.gated_delta_rule(
            q, k, v, beta, **xs, scale=0.7, segment_ids=seg_j, interpret=True, config=config
        )

    kernel_xs = {n: jnp.asarray(x, dtype if n in low else jnp.float32) for n, x in xs.items()}
    got = _value_and_grads(
        kernel, kernel_xs, {n: jnp.asarray(c, jnp.float32) for n, c in cot.items()}, compile_options=FAST_COMPILE
    )
    with x64():
        doc_ids = None if seg is None else reference.document_index(jnp.asarray(seg))

        def oracle(xs):
            xs = dict(xs)
            q, k, v, beta = (xs.pop(n) for n in ("q", "k", "v", "beta"))
            return reference.recurrent(q, k, v, beta, xs.pop("g", None), scale=0.7, doc_ids=doc_ids, **xs)

        want = _value_and_grads(
            oracle, {n: jnp.asarray(x) for n, x in xs.items()}, {n: jnp.asarray(c) for n, c in cot.items()}
        )
        want = {n: np.asarray(x) for n, x in want.items()}
    assert set(got) == set(want)
    assert got["o"].dtype == dtype and got["final_state"].dtype == jnp.float32
    bound = tol(dtype, shape["t"])
    for name in want:
        assert _error(got[name], want[name]) < bound, (name, _error(got[name], want[name]), bound)


@pytest.mark.parametrize(
    "g_max,dtype,bounded", [(1.0, jnp.bfloat16, True), (30.0, jnp.float32, False), (1.0, jnp.float16, None)]
)
def test_per_channel_gates_pick_the_kernels_the_gates_allow(rng, g_max, dtype, bounded):
    """Per-channel gates run the kernels with factored diagonal tiles (``"channel_bounded"``) only
    when every tile allows it, and never for float16 inputs (fp16 operands cannot hold the factors):
    the op's o and final state equal, bit for bit, those of the kernels forced to that form. The
    weak-gate KDA cases below test the factored kernels, the strong-gate ones (log gates down to −8
    per token in some tiles) and fp16 the exact ones."""
    xs, _, _ = make_inputs(rng, b=1, t=70, h=1, hv=2, d=16, e=16, gate="kda", g_max=g_max)
    low = ("q", "k", "v")
    xs = {n: jnp.asarray(x, dtype if n in low else jnp.float32) for n, x in xs.items()}
    args, docs, statics = pallas_triton.prepare(
        xs["q"], xs["k"], xs["v"], xs["beta"], xs["g"], xs["initial_state"], None, 0.7, True, None
    )
    assert statics.mode == "channel"
    found = pallas_triton.gate_case(args[4], statics, args[0].dtype)
    assert (None if found is None else bool(found)) is bounded
    got = jax.jit(lambda a: pallas_triton._gated_delta_rule(*a, docs, statics=statics))(args)
    for mode, same in (("channel_bounded", bounded is True), ("channel", bounded is not True)):
        forced = dataclasses.replace(statics, mode=mode)
        want = jax.jit(lambda a, st=forced: pallas_triton._forward(*a, docs, st, keep_residuals=False)[:2])(args)
        equal = all(bool(jnp.array_equal(x, y)) for x, y in zip(got, want, strict=True))
        assert equal is same, (mode, equal)


@functools.partial(jax.jit, static_argnames=("statics", "no_grad"))
def _op_outputs(args, cot, statics, no_grad=False):
    """The op's ``(o, final state)`` and its gradients of the padded inputs (``no_grad``: the call
    without gradient, whose switch checks the forward's tiles alone; no gradients)."""
    if no_grad:
        return pallas_triton._gated_delta_rule(*args, None, statics=statics), None
    outs, pull = jax.vjp(lambda a: pallas_triton._gated_delta_rule(*a, None, statics=statics), args)
    return outs, pull(cot)[0]


@functools.partial(jax.jit, static_argnames=("statics",))
def _form_outputs(args, cot, statics):
    """``_op_outputs`` of one kernel form, forced (no switch)."""
    o, final, residuals = pallas_triton._forward(*args, None, statics)
    return (o, final), pallas_triton._backward(statics, residuals, *cot)


def test_gate_check_takes_the_largest_factored_tile(rng):
    """Three cases under per-channel gates when some kernels factor larger sub-tiles (``output_rows``,
    ``wy_bwd_rows``): log gates of 2.6–4 per token pass on 16-row tiles (half-spans ≤ 8 tokens, ≤ 32)
    and fail on 32-row ones (16 tokens, ≥ 41.6 > 40), so they take the factored kernels on 16-row tiles
    (case 1); log gates of at most 2.4 per token pass both (case 2: the larger tiles); 6–8 per token
    fail both (case 0: the exact kernels). A call without gradient checks the forward's tiles alone.
    With both larger tiles, the op's outputs and every gradient (forward and backward each behind its
    switch) equal, bit for bit, those of the kernels its case names and differ from the other forms'
    (so each case runs its own kernels both ways), and so does the output of a call without gradient."""
    xs, _, _ = make_inputs(rng, b=1, t=64, h=1, hv=2, d=16, e=16, gate="kda")
    both = BlockConfig(output_rows=32, wy_bwd_rows=32)
    for low, high, config, want, want_forward in (
        (2.6, 4.0, BlockConfig(), 1, 1),
        (2.6, 4.0, BlockConfig(output_rows=32), 1, 1),
        (2.6, 4.0, BlockConfig(wy_bwd_rows=32), 1, 1),
        (2.6, 4.0, both, 1, 1),
        (0.5, 2.4, BlockConfig(wy_bwd_rows=32), 2, 1),
        (0.5, 2.4, both, 2, 2),
        (6.0, 8.0, both, 0, 0),
    ):
        xs["g"] = -rng.uniform(low, high, xs["g"].shape)
        ys = {n: jnp.asarray(x, jnp.float32) for n, x in xs.items()}
        args, docs, statics = pallas_triton.prepare(
            ys["q"], ys["k"], ys["v"], ys["beta"], ys["g"], ys["initial_state"], None, 0.7, True, config
        )
        assert docs is None
        assert int(pallas_triton.gate_case(args[4], statics, args[0].dtype)) == want, (low, config)
        assert int(pallas_triton.gate_case(args[4], statics, args[0].dtype, backward=False)) == want_forward
        if config is not both:
            continue
        args = tuple(args)
        shapes = jax.eval_shape(lambda a, st=statics: pallas_triton._gated_delta_rule(*a, None, statics=st), args)
        cot = tuple(jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in shapes)
        got = _op_outputs(args, cot, statics)
        got_primal, _ = _op_outputs(args, cot, statics, no_grad=True)
        small = dataclasses.replace(config, output_rows=None, wy_bwd_rows=None)
        forms = [
            dataclasses.replace(statics, cfg=small),
            dataclasses.replace(statics, cfg=small, mode="channel_bounded"),
            dataclasses.replace(statics, mode="channel_bounded"),
        ]
        for case, forced in enumerate(forms):
            outs, grads = _form_outputs(args, cot, forced)
            same_outs = all(bool(jnp.array_equal(x, y)) for x, y in zip(got[0], outs, strict=True))
            same_grads = [bool(jnp.array_equal(x, y)) for x, y in zip(got[1], grads, strict=True)]
            assert same_outs is (case == want), (low, case, same_outs)
            # each gradient equal to its own form's; dq and dβ may not change between the factored
            # forms, but some gradient must differ from every other form
            assert all(same_grads) is (case == want), (low, case, same_grads)
            if case == want:
                assert all(bool(jnp.array_equal(x, y)) for x, y in zip(got_primal, outs, strict=True))


def test_gate_lower_bound_builds_only_the_forms_it_allows(rng):
    """A gate floor (``gate_lower_bound``) drops the kernel forms it rules out: ≥ −5 bounds 16-row
    tiles' factors (8 tokens × 5 ≤ 40), ≥ −2.5 the 32-row ones (16 × 2.5). Where one form is left the
    case is a Python int (no check over the gates, no ``lax.switch``), and the op's outputs and every
    gradient equal, bit for bit, that form's; where two are left (−5 with 32-row tiles) the switch is
    between those two and the check is on the 32-row tiles alone. Below −5 all three forms stay;
    float16 keeps the exact kernels (no floor in its statics)."""
    xs, _, _ = make_inputs(rng, b=1, t=64, h=1, hv=2, d=16, e=16, gate="kda", g_max=2.4)
    ys = {n: jnp.asarray(x, jnp.float32) for n, x in xs.items()}
    both = BlockConfig(output_rows=32, wy_bwd_rows=32)
    forms = {"exact": ("channel", 16), "16": ("channel_bounded", 16), "32": ("channel_bounded", 32)}
    for bound, config, built, static in (
        (-5.0, BlockConfig(), ["16"], 1),
        (-5.0, both, ["16", "32"], None),
        (-2.5, BlockConfig(), ["16"], 1),
        (-2.5, both, ["32"], 2),
        (-5.5, both, ["exact", "16", "32"], None),
    ):
        args, _, statics = pallas_triton.prepare(
            *(ys[n] for n in ("q", "k", "v", "beta", "g", "initial_state")),
            None,
            0.7,
            True,
            config,
            gate_lower_bound=bound,
        )
        assert statics.gate_floor == bound
        case = pallas_triton.gate_case(args[4], statics, args[0].dtype)
        if static is not None:
            assert isinstance(case, int) and case == static, (bound, config, case)
        else:  # the gates (≤ 2.4 per token) pass the check on 32-row tiles
            assert not isinstance(case, int) and int(case) == 2, (bound, config)
        traced = []

        def form(st, traced=traced):
            traced.append((st.mode, st.cfg.factored_rows))
            return jnp.zeros(())

        text = str(jax.make_jaxpr(lambda c, st=statics: pallas_triton.by_gates(c, st, form))(case))
        assert traced == [forms[name] for name in built], (bound, config, traced)
        assert ("branches=" in text) is (len(built) > 1)
        for fixed, name in ((0, "exact"), (1, "16"), (2, "32")):  # a Python int case: that form alone
            if name in built:
                traced.clear()
                pallas_triton.by_gates(fixed, statics, form)
                assert traced == [forms[name]], (bound, fixed, traced)
        if static is None:
            continue
        args = tuple(args)
        shapes = jax.eval_shape(lambda a, st=statics: pallas_triton._gated_delta_rule(*a, None, statics=st), args)
        cot = tuple(jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in shapes)
        jaxpr = str(jax.make_jaxpr(lambda a, c, st=statics: _op_outputs(a, c, st))(args, cot))
        assert "branches=" not in jaxpr, bound
        small = dataclasses.replace(config, output_rows=None, wy_bwd_rows=None)
        forced = dataclasses.replace(statics, cfg=small if static == 1 else config, mode="channel_bounded")
        got, want = _op_outputs(args, cot, statics), _form_outputs(args, cot, forced)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert bool(jnp.array_equal(x, y)), (bound, config)
    fp16 = [ys[n].astype(jnp.float16) for n in ("q", "k", "v")]
    _, _, statics = pallas_triton.prepare(
        *fp16, ys["beta"], ys["g"], None, None, 0.7, True, None, gate_lower_bound=-5.0
    )
    assert statics.gate_floor is None and pallas_triton.gate_case(None, statics, jnp.float16) is None
    for bad in (1.0, float("nan")):  # the kernels' own entry checks it too (a positive floor passes the bounds)
        with pytest.raises(ValueError, match="gate_lower_bound must be None or a finite negative Python or numpy"):
            pallas_triton.prepare(*fp16, ys["beta"], ys["g"], None, None, 0.7, True, None, gate_lower_bound=bad)


CASES = {
    # name: dtype, shape, extras (the interpret config has 16-token chunks: one sub-tile)
    # (two key-column blocks: the output kernels sum the scalar gate's db over them, scores stored)
    "gdn-f32-T63-gva-docs-2splits": (
        jnp.float32,
        dict(b=2, t=63, h=1, hv=2, d=32, e=32, gate="gdn"),
        dict(
            docs=(5, 20, 21, 40),
            config=BlockConfig(chunk=16, block_e=16, block_cols=16, splits=2, store_scores=True),
        ),
    ),
    "kda-f32-T130-gva-docs-strong-chunk32": (
        jnp.float32,
        dict(b=1, t=130, h=1, hv=2, d=32, e=32, gate="kda"),
        dict(docs=(30, 64, 100), g_max=8.0, config=BlockConfig(chunk=32, block_e=16, block_cols=16)),
    ),
    # per-channel gates on whole 32-token chunks: the diagonal tile is five masked products by levels
    # (spans of the log gate up to 256 inside a chunk), the WY backward from the stored inverse
    "kda-f32-T100-whole-chunk-levels-stored-inverse-docs-strong": (
        jnp.float32,
        dict(b=1, t=100, h=1, hv=2, d=32, e=16, gate="kda"),
        dict(
            docs=(30, 64),
            g_max=8.0,
            config=BlockConfig(chunk=32, block_e=16, block_cols=16, channel_rows=32, store_inverse=True),
        ),
    ),
    # the stored inverse read as 16-row blocks by the WY backward (per-channel gates keep sub-tiles)
    "kda-bf16-T70-stored-inverse-sub-tiles-docs": (
        jnp.bfloat16,
        dict(b=1, t=70, h=1, hv=2, d=32, e=16, gate="kda"),
        dict(docs=(9, 40), config=BlockConfig(chunk=32, block_e=16, block_cols=16, store_inverse=True)),
    ),
    "kda-f32-T70-stored-inverse-sub-tiles-docs-strong": (
        jnp.float32,
        dict(b=1, t=70, h=1, hv=1, d=32, e=16, gate="kda"),
        dict(docs=(9, 40), g_max=8.0, config=BlockConfig(chunk=32, block_e=16, block_cols=16, store_inverse=True)),
    ),
    "kda-bf16-T70-whole-chunk-stored-scores": (
        jnp.bfloat16,
        dict(b=1, t=70, h=1, hv=1, d=32, e=16, gate="kda"),
        dict(config=BlockConfig(chunk=32, block_e=16, block_cols=32, channel_rows=32, store_scores=True)),
    ),
    # the off-diagonal per-channel blocks of the forward kernels by whole-chunk products per key tile
    # (BlockConfig.stacked_pairs): 4 sub-tiles of a 64-token chunk, strong gates, documents, the
    # default's stored inverse and scores; bf16 on 32-token chunks
    "kda-f32-T130-stacked-pairs-docs-strong-chunk64": (
        jnp.float32,
        dict(b=1, t=130, h=1, hv=1, d=32, e=16, gate="kda"),
        dict(
            docs=(30, 64, 100),
            g_max=8.0,
            config=BlockConfig(
                chunk=64, block_e=16, block_cols=16, store_inverse=True, store_scores=True, stacked_pairs=True
            ),
        ),
    ),
    # 32-row sub-tiles in the forward output kernel and the WY backward alone (BlockConfig.output_rows,
    # wy_bwd_rows), 16 elsewhere: the output backward reads the stored scores and the WY backward the
    # stored inverse as blocks of their own sizes; gates within the 32-row check (factored kernels)
    "kda-f32-T130-32-row-output-and-wy-bwd-docs-chunk64": (
        jnp.float32,
        dict(b=1, t=130, h=1, hv=2, d=32, e=16, gate="kda"),
        dict(
            docs=(30, 64, 100),
            g_max=0.5,
            config=BlockConfig(
                chunk=64,
                block_e=16,
                block_cols=16,
                store_inverse=True,
                store_scores=True,
                output_rows=32,
                wy_bwd_rows=32,
            ),
        ),
    ),
    "kda-bf16-T70-stacked-pairs-docs": (
        jnp.bfloat16,
        dict(b=1, t=70, h=1, hv=2, d=32, e=16, gate="kda"),
        dict(
            docs=(9, 40),
            config=BlockConfig(chunk=32, block_e=16, block_cols=16, store_inverse=True, stacked_pairs=True),
        ),
    ),
    # the output backward reads the forward's stored score blocks (per-channel pairs not formed again)
    "kda-bf16-T40-stored-scores-docs": (
        jnp.bfloat16,
        dict(b=1, t=40, h=1, hv=1, d=32, e=16, gate="kda"),
        dict(docs=(7, 30), config=BlockConfig(chunk=32, block_e=16, block_cols=16, store_scores=True)),
    ),
    # the state passes read gated keys / queries and each chunk's decay formed once in XLA
    # (BlockConfig.pregated_state): two splits (the transition and the local reverse pass), grouped
    # value heads, documents, strong gates in float32; bf16 with weak gates
    "kda-f32-T130-pregated-gva-docs-strong-2splits": (
        jnp.float32,
        dict(b=2, t=130, h=2, hv=4, d=32, e=32, gate="kda"),
        dict(
            docs=(30, 64, 65, 100),
            g_max=8.0,
            config=BlockConfig(chunk=16, block_e=16, block_cols=16, splits=2, pregated_state=True),
        ),
    ),
    "kda-bf16-T70-pregated-gva-docs-stored-scores": (
        jnp.bfloat16,
        dict(b=1, t=70, h=1, hv=2, d=32, e=16, gate="kda"),
        dict(
            docs=(9, 40),
            config=BlockConfig(chunk=32, block_e=16, block_cols=16, store_scores=True, pregated_state=True),
        ),
    ),
    "deltanet-bf16-T130-column-blocks": (
        jnp.bfloat16,
        dict(b=1, t=130, h=2, hv=2, d=32, e=16, gate="deltanet"),
        dict(config=BlockConfig(chunk=16, block_e=16, block_cols=16)),
    ),
    # the WY kernels on whole 32-token chunks (one tile: the inverse by doubling), documents
    "gdn-f32-T70-whole-chunk-wy-docs": (
        jnp.float32,
        dict(b=1, t=70, h=1, hv=1, d=16, e=16, gate="gdn"),
        dict(docs=(9, 40), config=BlockConfig(chunk=32, block_e=16, block_cols=16, wy_rows=32)),
    ),
    # the split WY backward (the state step's gradients in a kernel of their own; the default is fused)
    "gdn-f32-T40-split-wy-bwd": (
        jnp.float32,
        dict(b=1, t=40, h=1, hv=1, d=32, e=16, gate="gdn"),
        dict(config=BlockConfig(chunk=16, block_e=16, block_cols=16, wy_bwd_split=True)),
    ),
    # the forward stores X; the WY backward reads it and runs on whole 32-token chunks (bf16
    # products for dA), documents; and without gates
    "gdn-bf16-T70-stored-inverse-docs": (
        jnp.bfloat16,
        dict(b=1, t=70, h=1, hv=2, d=32, e=16, gate="gdn"),
        dict(docs=(9, 40), config=BlockConfig(chunk=32, block_e=16, block_cols=16, store_inverse=True)),
    ),
    # the inverse's products on bf16 operands (``inverse_precision="bf16"``): whole 32-token chunks
    # (the inverse by doubling) under scalar gates, 16-row blocks under per-channel ones
    "gdn-bf16-T70-bf16-inverse-whole-chunk-docs": (
        jnp.bfloat16,
        dict(b=1, t=70, h=1, hv=2, d=32, e=16, gate="gdn"),
        dict(
            docs=(9, 40),
            config=BlockConfig(
                chunk=32, block_e=16, block_cols=16, wy_rows=32, store_inverse=True, inverse_precision="bf16"
            ),
        ),
    ),
    "kda-bf16-T70-bf16-inverse-docs": (
        jnp.bfloat16,
        dict(b=1, t=70, h=1, hv=2, d=32, e=16, gate="kda"),
        dict(
            docs=(9, 40),
            config=BlockConfig(chunk=32, block_e=16, block_cols=16, store_inverse=True, inverse_precision="bf16"),
        ),
    ),
    "deltanet-f32-T50-stored-inverse": (
        jnp.float32,
        dict(b=1, t=50, h=1, hv=1, d=16, e=16, gate="deltanet"),
        dict(config=BlockConfig(chunk=32, block_e=16, block_cols=16, store_inverse=True)),
    ),
    # the output written by the state pass (BlockConfig.fuse_output): documents, two splits, bf16; and
    # without gates on 32-token chunks with 16-wide value blocks
    "gdn-bf16-T100-fused-output-docs-2splits": (
        jnp.bfloat16,
        dict(b=2, t=100, h=1, hv=2, d=32, e=32, gate="gdn"),
        dict(docs=(9, 40, 41), config=BlockConfig(chunk=16, block_e=16, splits=2, fuse_output=True)),
    ),
    "deltanet-f32-T70-fused-output-chunk32": (
        jnp.float32,
        dict(b=1, t=70, h=1, hv=1, d=16, e=32, gate="deltanet"),
        dict(docs=(30,), config=BlockConfig(chunk=32, block_e=16, block_cols=16, fuse_output=True)),
    ),
    # one token: o, dq and dβ are each a single dot product (q·k, v·dO) times a vector, whose relative
    # error blows up when the dot nears 0 (bf16 stored intermediates would exceed a norm-wise bound, and
    # float32 does in about 1 draw of 3000 with one row and one head); two rows of two heads make four
    # such dots, all four small together is negligible
    "gdn-f32-T1-no-init": (jnp.float32, dict(b=2, t=1, h=2, hv=2, d=16, e=16, gate="gdn", init=False), {}),
}

# the chunk-local cumulative gates and their reverse sums (dg) by the Pallas kernels
# (BlockConfig.cumsum_kernel): the float32 pregated case (two splits, grouped value heads, documents, strong
# gates, T padded) again with it
CASES["kda-f32-T130-cumsum-kernel-gva-docs-strong-2splits"] = (
    *CASES["kda-f32-T130-pregated-gva-docs-strong-2splits"][:2],
    CASES["kda-f32-T130-pregated-gva-docs-strong-2splits"][2]
    | {
        "config": dataclasses.replace(
            CASES["kda-f32-T130-pregated-gva-docs-strong-2splits"][2]["config"], cumsum_kernel=True
        )
    },
)


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference(rng, case, monkeypatch):
    dtype, shape, extras = CASES[case]
    calls = []
    pregated = extras.get("config") is not None and extras["config"].pregated_state
    if pregated:  # the passes on pregated operands do run, forward and reverse

        def counted(*args, _real=pallas_triton.pregated_operands, **kwargs):
            calls.append(kwargs.get("q") is not None)  # the reverse pass takes the gated queries too
            return _real(*args, **kwargs)

        monkeypatch.setattr(pallas_triton, "pregated_operands", counted)
        monkeypatch.setattr(pallas_triton_vjp, "pregated_operands", counted)
    cfg = extras.get("config")
    parts = {}
    if cfg is not None and (cfg.output_rows or cfg.wy_bwd_rows):  # the kernels run on the sub-tiles asked
        kernels = [(pallas_triton, "_output_kernel"), (pallas_triton, "_wy_kernel")]
        kernels += [(pallas_triton_vjp, "_output_bwd_kernel"), (pallas_triton_vjp, "_wy_bwd_kernel")]
        for mod, name in kernels:
            real = getattr(mod, name)

            def recorded(*args, _real=real, _name=name, **kwargs):
                parts.setdefault(_name, set()).add(kwargs["parts"])
                return _real(*args, **kwargs)

            monkeypatch.setattr(mod, name, recorded)
    check_kernels(rng, dtype=dtype, **shape, **extras)
    if pregated:
        assert True in calls and False in calls, calls
    if parts:  # traced: the larger tiles in the factored branch, channel_rows in the others
        rows = {"_output_kernel": cfg.output_rows, "_wy_bwd_kernel": cfg.wy_bwd_rows}
        small = cfg.chunk // cfg.channel_rows
        want = {name: {small, cfg.chunk // (rows.get(name) or cfg.channel_rows)} for name in parts}
        assert parts == want and len(parts) == 4, parts


@pytest.mark.parametrize(
    "gate,config",
    [
        ("gdn", BlockConfig(chunk=16, block_e=16, store_inverse=True)),
        ("gdn", BlockConfig(chunk=16, block_e=16, splits=2, store_inverse=True, fuse_output=True)),
        ("kda", BlockConfig(chunk=32, block_e=16, block_cols=16, store_inverse=True, store_scores=True)),
    ],
    ids=["gdn-stored-inverse", "gdn-fused-output-2splits", "kda-stored-inverse-and-scores"],
)
def test_forward_only_call_writes_no_residuals_and_matches(rng, gate, config):
    """A call that takes no gradient runs the ``custom_vjp``'s primal, which writes nothing only the
    backward reads (no stored inverse or scores; with the fused output no h, V' or output kernel):
    its o and final state equal those of the differentiated call, and its kernels have only those
    outputs."""
    xs, _, seg = make_inputs(rng, b=1, t=70, h=1, hv=2, d=32, e=32, gate=gate, docs=(9, 40))
    xs = {n: jnp.asarray(x, jnp.float32) for n, x in xs.items()}
    seg = jnp.asarray(seg)

    def op(xs):
        xs = dict(xs)
        q, k, v, beta = (xs.pop(n) for n in ("q", "k", "v", "beta"))
        return pallas_triton.gated_delta_rule(
            q, k, v, beta, **xs, scale=0.7, segment_ids=seg, interpret=True, config=config
        )

    primal = jax.jit(op)(xs)
    differentiated, _ = jax.jit(lambda xs: jax.vjp(op, xs))(xs)
    for got, want in zip(primal, differentiated, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    outputs = _pallas_outputs(jax.make_jaxpr(op)(xs).jaxpr)
    assert outputs["gated_delta_rule_wy"] == 2  # W and U, no stored inverse
    if config.fuse_output:  # o and the final state: no h, V' or output kernel
        assert outputs["gated_delta_rule_state"] == 2 and "gated_delta_rule_output" not in outputs
    else:  # o alone: no stored scores
        assert outputs["gated_delta_rule_output"] == 1


def _pallas_outputs(jaxpr) -> dict:
    """``{pallas_call name: number of outputs}`` of every kernel call in a jaxpr, nested ones too."""
    found = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found[eqn.params["name"]] = len(eqn.outvars)
        for sub in jax_core.jaxprs_in_params(eqn.params):
            found |= _pallas_outputs(sub)
    return found


def test_long_inputs_run_in_pieces(rng, monkeypatch):
    """Past int32 element offsets the kernels run pieces with the state chained: with the limit made
    small (pieces of 32 tokens), outputs and every gradient equal the recurrence, with a document
    starting at a cut and one crossing a cut."""
    monkeypatch.setattr(pallas_triton, "MAX_ELEMENTS", 32 * (32 + 2048))
    shape = dict(b=1, t=70, h=1, hv=1, d=16, e=16, gate="gdn")
    assert pallas_triton.piece_len(jnp.zeros((1, 70, 1, 16)), jnp.zeros((1, 70, 1, 16))) == 32
    check_kernels(rng, dtype=jnp.float32, docs=(32, 50), **shape)


def test_split_call_layout_takes_the_branch_config():
    """``SplitCall.layout(statics)`` builds the layout from the branch's own config: the 16-row
    branches of a config with 32-row output tiles lay the output kernel out on 16-row tiles (it took the
    call's config, so those branches would have run 32-row output tiles on gates that fail their
    check)."""
    cfg = BlockConfig(chunk=32, block_e=16, output_rows=32, wy_bwd_rows=32, store_inverse=True, store_scores=True)
    x = jnp.zeros((1, 64, 1, 16))
    _, _, call = pallas_triton_split.split_forward(
        x, x, x, jnp.full((1, 64, 1), 0.5), g=jnp.full((1, 64, 1, 16), -0.1), interpret=True, config=cfg
    )
    small = dataclasses.replace(call.statics, cfg=dataclasses.replace(cfg, output_rows=None, wy_bwd_rows=None))
    assert call.layout().output_parts == 1 and call.layout(small).output_parts == 2
    assert call.layout().wy_bwd_parts == 1 and call.layout(small).wy_bwd_parts == 2


@pytest.mark.parametrize(
    "gate, fused, pregated, rows",
    [("gdn", False, False, None), ("gdn", True, False, None), ("kda", False, True, None), ("kda", False, True, 32)],
    ids=["output-kernel", "fused-output", "kda-pregated-state", "kda-32-row-output-wy-bwd"],
)
def test_split_entry_points_chain_two_calls(rng, gate, fused, pregated, rows):
    """Two calls chained through ``split_forward`` / ``finish_forward`` (entering state
    ``Φ₀ S₀ + M₀``) and ``split_backward`` / ``finish_backward`` (leaving cotangent ``Φ₁ᵀ dS + dS_in``
    of the second) equal the whole sequence, a document crossing the cut: what LASP does per rank.
    The forward stores the WY inverse (the GPU default under scalar gates): it travels in the call.
    Each call cuts its rows into two splits of one chunk. Row 0 is one document: each call composes
    two non-zero transitions and the second call's entering cotangent takes Φ_0ᵀ dS_out(0) from its
    first split (a wrong order or a dropped term fails the test); in row 1 documents start inside
    the second call's first split and at its split boundary. ``fused``: the stored pass writes the
    output (``BlockConfig.fuse_output``) from each split's entering state; ``pregated``: KDA's state
    passes (the transition, the stored and the local reverse pass) on gated keys / queries formed once
    (``BlockConfig.pregated_state``); ``rows``: 32-row output / WY-backward tiles on 32-token chunks
    (one chunk per split; gates of ≤ 0.1 per token take the 32-row branch)."""
    xs, cot, seg = make_inputs(rng, b=2, t=64, h=1, hv=2, d=16, e=16, gate=gate, g_max=0.1, docs=(40, 48))
    seg[0] = seg[0, 0]
    x32 = {n: jnp.asarray(x, jnp.float32) for n, x in xs.items()}
    do, d_final = jnp.asarray(cot["o"], jnp.float32), jnp.asarray(cot["final_state"], jnp.float32)
    cut = 32

    def halves(x):
        return x[:, :cut], x[:, cut:]

    def chained(x32, seg):
        parts = [
            dict(zip(("q", "k", "v", "beta", "g", "seg"), p, strict=True))
            for p in zip(*(halves(x32[n]) for n in ("q", "k", "v", "beta", "g")), halves(seg), strict=True)
        ]
        calls = []
        for p in parts:
            phi, m, call = pallas_triton_split.split_forward(
                p["q"],
                p["k"],
                p["v"],
                p["beta"],
                g=p["g"],
                scale=0.7,
                segment_ids=p["seg"],
                interpret=True,
                config=BlockConfig(
                    chunk=rows or 16,
                    block_e=16,
                    splits=2,
                    store_inverse=True,
                    store_scores=not fused,
                    fuse_output=fused,
                    pregated_state=pregated,
                    output_rows=rows,
                    wy_bwd_rows=rows,
                ),
            )
            calls.append((phi, m, call))
        (phi0, m0, call0), (phi1, _, call1) = calls
        s_in1 = jnp.einsum("bhij,bhje->bhie", phi0, x32["initial_state"]) + m0
        o0, final0, res0 = pallas_triton_split.finish_forward(call0, x32["initial_state"])
        o1, final1, res1 = pallas_triton_split.finish_forward(call1, s_in1)
        do0, do1 = halves(do)
        call0, call1 = call0.for_backward(), call1.for_backward()  # what the layer keeps: no U, W, X
        assert call1.u is None and call1.w is None
        local1, stage1 = pallas_triton_split.split_backward(call1, res1, do1)
        _, stage0 = pallas_triton_split.split_backward(call0, res0, do0)
        d_out0 = jnp.einsum("bhji,bhje->bhie", phi1, d_final) + local1
        grads1 = pallas_triton_split.finish_backward(call1, res1, stage1, d_final)
        grads0 = pallas_triton_split.finish_backward(call0, res0, stage0, d_out0)
        names = ("dq", "dk", "dv", "dbeta", "dg")
        got = {n: jnp.concatenate([a, b], axis=1) for n, a, b in zip(names, grads0, grads1, strict=False)}
        got |= {"o": jnp.concatenate([o0, o1], axis=1), "final_state": final1, "dinitial_state": grads0[-1]}
        return got, (final0, s_in1, grads1[-1], d_out0)

    compiled = jax.jit(chained).lower(x32, jnp.asarray(seg)).compile(compiler_options=FAST_COMPILE)
    got, (final0, s_in1, d_in1, d_out0) = compiled(x32, jnp.asarray(seg))
    assert rel_err(final0, s_in1) < 1e-5  # Φ₀ S₀ + M₀ is the first call's final state
    assert rel_err(d_in1, d_out0) < 1e-5  # and dS_in_local + Φ₁ᵀ dS the second's initial-state cotangent
    with x64():
        doc_ids = reference.document_index(jnp.asarray(seg))

        def oracle(xs):
            xs = dict(xs)
            q, k, v, beta = (xs.pop(n) for n in ("q", "k", "v", "beta"))
            return reference.recurrent(q, k, v, beta, xs.pop("g"), scale=0.7, doc_ids=doc_ids, **xs)

        want = _value_and_grads(
            oracle, {n: jnp.asarray(x) for n, x in xs.items()}, {n: jnp.asarray(c) for n, c in cot.items()}
        )
        want = {n: np.asarray(x) for n, x in want.items()}
    for name in want:
        assert rel_err(got[name], want[name]) < tol(jnp.float32, 64), name


@pytest.mark.parametrize("chunk", [16, 64])
def test_channel_chunk_cumsum_and_its_gradient_match_xla(rng, chunk):
    """``layout.channel_chunk_cumsum`` (the Pallas kernels of ``BlockConfig.cumsum_kernel``) against
    ``chunk_cumsum`` on fresh inputs, and its gradient, the chunk-local reverse sums (a kernel of
    exact tile products plus later tiles' totals), against float64 and against autodiff of
    ``chunk_cumsum``: every sum within float32 rounding of its own terms, also for the small sums
    near a chunk's end when its early rows are 1e5 times larger (a total-minus-prefix form was off
    by more than 100% there)."""
    t = 3 * chunk
    g = jnp.asarray(rng.standard_normal((2, t, 3, 32)), jnp.float32)
    got, got_vjp = jax.vjp(lambda g: layout.channel_chunk_cumsum(g, chunk=chunk, interpret=True), g)
    want, want_vjp = jax.vjp(lambda g: layout.chunk_cumsum(g, chunk, axis=1), g)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(g))) * chunk)
    rows = np.arange(t) % chunk
    skew = np.where(rows < 4, 1e3, 1e-2)[None, :, None, None]
    db = jnp.asarray(rng.standard_normal(g.shape) * skew, jnp.float32)
    (dg,), (dg_xla,) = got_vjp(db), want_vjp(db)

    def reverse_sums(x):  # float64 chunk-local sums Σ_{u ≥ t} x_u
        blocks = np.flip(np.asarray(x, np.float64).reshape(2, 3, chunk, 3, 32), 2)
        return np.flip(np.cumsum(blocks, 2), 2).reshape(x.shape)

    # each sum within float32 rounding of its own terms' magnitudes (a sum that cancels may have a
    # large relative error; one formed from the whole chunk's prefix has an error of its magnitude)
    bound = 1e-6 * chunk * reverse_sums(np.abs(db))
    for name, x in (("kernel", dg), ("xla", dg_xla)):
        err = np.abs(np.asarray(x, np.float64) - reverse_sums(db))
        assert np.all(err <= bound), (name, float(np.max(err / bound)))
    assert float(np.max(np.abs(reverse_sums(db)[:, rows >= 4]))) < 1  # the small sums were checked
    with pytest.raises(ValueError, match=r"T=40 of g\(2, 40, 3, 32\) is not a multiple of chunk=16"):
        layout.channel_chunk_cumsum(g[:, :40], chunk=16, interpret=True)
    with pytest.raises(ValueError, match=r"chunk=24 must be a multiple of 16"):
        jax.vjp(lambda g: layout.channel_chunk_cumsum(g, chunk=24, interpret=True), g[:, :48])[1](db[:, :48])


@pytest.mark.parametrize("docs", [False, True])
def test_pregated_operands_are_each_chunks_gate_factors(rng, docs):
    """``layout.pregated_operands`` (XLA broadcasts over the whole input) against
    ``common.gate_factors`` applied to each chunk of each head with its ``Docs``, as the kernels
    form them: the gated keys and queries (value heads from grouped key heads) and every chunk's
    decay, bit for bit; documents starting mid-chunk, at a chunk's first row and running through."""
    from pallas_kernels.gated_delta_rule import common

    bsz, nc, c, h, hv, d = 2, 3, 16, 2, 4, 32
    t = nc * c
    b = jnp.asarray(np.cumsum(-rng.uniform(0, 0.3, (bsz, nc, c, hv, d)), axis=2).reshape(bsz, t, hv, d), jnp.float32)
    k, q = (jnp.asarray(rng.standard_normal((bsz, t, h, d)), jnp.bfloat16) for _ in range(2))
    doc_rows = None
    if docs:
        doc = np.zeros((bsz, t), np.int32)
        doc[0, 5:] += 1
        doc[0, 16:] += 1  # a chunk's first row
        doc[1, 40:] += 1
        prev = np.concatenate([doc[:, :1], doc[:, :-1]], axis=1)  # the document before each token
        doc_rows = (jnp.asarray(doc), jnp.asarray(prev))
    lay = type("Lay", (), {"chunk": c, "mxu": jnp.bfloat16})()
    keys, gamma, queries = layout.pregated_operands(k, b, doc_rows, lay, q=q)
    assert keys.shape == queries.shape == (bsz, t, hv, d) and gamma.shape == (bsz, hv, nc, d)
    for i in range(bsz):
        for n in range(nc):
            rows = slice(n * c, (n + 1) * c)
            chunk_docs = None
            if docs:
                dc, pv = (np.asarray(x)[i, rows] for x in doc_rows)
                chunk_docs = common.Docs(jnp.asarray(dc), jnp.asarray(pv[0]), jnp.asarray(dc[-1]))
            for j in range(hv):
                to_row, to_end, gam = common.gate_factors(b[i, rows, j], chunk_docs)
                kk, qq = (x[i, rows, j // (hv // h)].astype(jnp.float32) for x in (k, q))
                np.testing.assert_array_equal(keys[i, rows, j], (kk * to_end).astype(jnp.bfloat16))
                np.testing.assert_array_equal(queries[i, rows, j], (qq * to_row).astype(jnp.bfloat16))
                np.testing.assert_array_equal(gamma[i, j, n], gam)
    if docs:  # a boundary inside a chunk or at its first row zeroes its decay, and only there
        crossed = np.array([[1, 1, 0], [0, 0, 1]], bool)
        np.testing.assert_array_equal(np.asarray(jnp.max(gamma, axis=(1, 3)) == 0), crossed)


def test_supports_and_rejects():
    ok = jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16)
    assert pallas_triton.supports(ok, ok, ok)
    with x64():
        f64 = jnp.zeros((1, 16, 1, 16), jnp.float64)
        assert not pallas_triton.supports(f64, f64, f64)
        with pytest.raises(TypeError, match=r"bf16, fp16 or fp32.*q.dtype=float64"):
            pallas_triton.gated_delta_rule(f64, f64, f64, jnp.zeros((1, 16, 1)), interpret=True)
    huge = jax.ShapeDtypeStruct((64, 2**17, 32, 128), jnp.bfloat16)
    assert not pallas_triton.supports(huge, huge, huge)
    with pytest.raises(ValueError, match="power of two"):
        BlockConfig(chunk=48)
    with pytest.raises(ValueError, match="splits"):
        BlockConfig(splits=0)
    with pytest.raises(ValueError, match=r"num_warps_output_bwd=6 must be a power of two"):
        BlockConfig(num_warps_output_bwd=6)
    with pytest.raises(ValueError, match=r"num_stages_state=0 must be positive"):
        BlockConfig(num_stages_state=0)
    with pytest.raises(ValueError, match="fuse_output.*stores no scores"):
        BlockConfig(fuse_output=True, store_scores=True)
    for bad in (dict(output_rows=24), dict(wy_bwd_rows=16, channel_rows=32, chunk=64), dict(output_rows=128)):
        with pytest.raises(ValueError, match=r"_rows=\d+ must be a power of two from channel_rows=\d+ to chunk=64"):
            BlockConfig(**bad)
    assert BlockConfig(output_rows=32).factored_rows == 32 and BlockConfig().factored_rows == 16
    per_channel = jnp.zeros((1, 16, 1, 16))
    with pytest.raises(ValueError, match="fuse_output needs scalar or no gates"):
        pallas_triton.gated_delta_rule(
            per_channel,
            per_channel,
            per_channel,
            jnp.ones((1, 16, 1)),
            g=per_channel,
            interpret=True,
            config=BlockConfig(chunk=16, block_e=16, fuse_output=True),
        )


def test_default_config_fills_the_gpu_with_splits():
    """Splits until the state passes have ~2 programs per SM under per-channel gates, a quarter of
    the SMs under scalar or no gates (half in the split entry points of sequence parallelism); many
    rows and heads: one. 16-wide value blocks on one device where 32-wide ones give a quarter to half
    of the SMs programs."""
    few = default_config(batch=1, value_heads=16, seq_len=32768, value_dim=128, interpret=False)
    assert (few.chunk, few.block_e, few.splits) == (64, 16, 1)  # 64 programs of 32 columns → 128 of 16
    fewer = default_config(batch=1, value_heads=4, seq_len=32768, value_dim=128, interpret=False)
    assert (fewer.block_e, fewer.splits) == (32, 4)  # 16 programs → 64
    heads32 = default_config(batch=1, value_heads=32, seq_len=32768, value_dim=128, interpret=False)
    assert (heads32.block_e, heads32.splits) == (32, 1)  # 128 programs: 16-wide blocks measured slower
    sp = dict(batch=1, value_dim=128, interpret=False, sequence_parallel=True)
    sharded = default_config(value_heads=16, seq_len=32768, dtype=jnp.bfloat16, **sp)
    # the split entry points: runs until half the SMs (16-wide blocks measured slower), and where the shard
    # is cut, 64-wide blocks and twice the runs (bf16/fp16, where it was measured): 64 programs of 32
    # columns → 2 runs; 32 of 64 → 4 runs
    assert (sharded.block_e, sharded.splits) == (64, 4)
    sharded32 = default_config(value_heads=32, seq_len=32768, dtype=jnp.bfloat16, **sp)
    assert (sharded32.block_e, sharded32.splits) == (32, 1)  # 128 programs: one run (M alone at two ranks)
    f32 = default_config(value_heads=16, seq_len=32768, dtype=jnp.float32, **sp)
    assert (f32.block_e, f32.splits) == (32, 2)  # float32: not measured wider
    short = default_config(value_heads=16, seq_len=2048, dtype=jnp.bfloat16, **sp)
    assert (short.block_e, short.splits) == (32, 2)  # 32 chunks: the runs cannot double, so 32 wide
    sharded_kda = default_config(
        batch=1, value_heads=16, seq_len=32768, value_dim=128, interpret=False, sequence_parallel=True, per_channel=True
    )
    assert sharded_kda.splits == 8  # per-channel gates: two programs per SM
    per_channel = default_config(
        batch=1, value_heads=16, seq_len=32768, value_dim=128, interpret=False, per_channel=True
    )
    assert per_channel.splits == 8  # 64 programs → 512
    many = default_config(batch=8, value_heads=32, seq_len=4096, value_dim=128, interpret=False)
    assert many.splits == 1
    short = default_config(batch=1, value_heads=1, seq_len=1024, value_dim=128, interpret=False)
    assert short.splits == 1  # 16 chunks: no split would keep 16 of them
    # bf16 under scalar gates: the whole-chunk WY kernel; the inverse on bf16 operands in bf16 (session
    # 24), tf32 in fp16 (under scalar gates), exact in float32 and fp16 KDA
    low = default_config(batch=1, value_heads=16, seq_len=32768, value_dim=128, interpret=False, dtype=jnp.bfloat16)
    assert (low.wy_rows, low.inverse_precision, low.num_warps, low.num_warps_output_bwd) == (64, "bf16", 4, 4)
    assert (few.wy_rows, few.inverse_precision, few.num_warps, few.num_warps_output_bwd) == (16, "highest", 8, None)
    half = default_config(batch=1, value_heads=16, seq_len=32768, value_dim=128, interpret=False, dtype=jnp.float16)
    assert (half.wy_rows, half.inverse_precision) == (64, "tf32")
    kda = default_config(
        batch=1, value_heads=16, seq_len=32768, value_dim=128, interpret=False, dtype=jnp.bfloat16, per_channel=True
    )
    kda_half = default_config(
        batch=1, value_heads=16, seq_len=32768, value_dim=128, interpret=False, dtype=jnp.float16, per_channel=True
    )
    assert kda.inverse_precision == "bf16" and kda_half.inverse_precision == "highest"
    assert kda.store_scores and not low.store_scores
    assert kda.store_inverse and low.store_inverse  # the WY backward forms no Gram block
    assert kda.num_warps_bwd == 4 and low.num_warps_bwd == 8  # per-channel cotangents by levels: 4 warps
    # bf16/fp16 KDA since its diagonal tiles are one product where the gates allow it (session 18): 4
    # forward warps, 2 backward stages for the factored kernels and 1 for the exact ones, and the state
    # passes by the scalar gates' rule (one run of 16-wide blocks here); float32 keeps the former rule
    assert (kda.num_warps, kda.num_stages_bwd, kda.num_stages_bwd_exact) == (4, 2, 1)
    assert (kda.block_e, kda.splits) == (16, 1)
    # bf16 KDA with heads up to 128: 32-row output / WY-backward sub-tiles where the gates allow them
    # (session 23); fp16 (exact kernels), float32 and wider heads keep channel_rows
    assert (kda.output_rows, kda.wy_bwd_rows, kda.channel_rows) == (32, 32, 16)
    fp16_kda = default_config(
        batch=1, value_heads=16, seq_len=32768, value_dim=128, interpret=False, dtype=jnp.float16, per_channel=True
    )
    assert (fp16_kda.output_rows, fp16_kda.wy_bwd_rows, per_channel.output_rows) == (None, None, None)
    # and the state passes on gated keys / queries formed once (session 19), also under sp and in
    # float32 (whose in-kernel form asks an H200 for more shared memory than it has)
    assert kda.pregated_state and per_channel.pregated_state and not low.pregated_state and not few.pregated_state
    # and the chunk-local cumulative gates by the Pallas kernel (session 21), per-channel gates only
    assert kda.cumsum_kernel and per_channel.cumsum_kernel and not low.cumsum_kernel and not few.cumsum_kernel
    # the split entry points keep the per-channel run rule (8 runs of 32-wide blocks) with those launches
    sharded_bf16 = default_config(value_heads=16, seq_len=32768, dtype=jnp.bfloat16, per_channel=True, **sp)
    assert (sharded_bf16.block_e, sharded_bf16.splits, sharded_bf16.num_warps) == (32, 8, 4)
    assert (sharded_bf16.num_stages_bwd, sharded_bf16.num_stages_bwd_exact) == (2, 1)
    assert sharded_bf16.pregated_state
    # head dims past 128: fewer state-pass stages (offline: 306 KB of shared memory with 3 at 256, bf16);
    # float32 (and no dtype given): 2 at 128, since GDN's float32 reverse pass asked an H200 for 249344 B
    # with 3 (session 20), and past head dim 128 column blocks of 64 under scalar gates (whole rows asked
    # 344064 B, 128 columns 262144 B); bf16 at 256 launched with whole rows (session 20)
    assert low.num_stages_state == 3 and few.num_stages_state == 2
    for per_ch in (False, True):
        for dtype, stages, cols in ((jnp.bfloat16, 2, 256), (jnp.float32, 1, 64)):
            wide = default_config(
                batch=1,
                value_heads=8,
                seq_len=8192,
                value_dim=256,
                key_dim=256,
                interpret=False,
                per_channel=per_ch,
                dtype=dtype,
            )
            assert wide.num_stages_state == stages
            assert wide.block_cols == (32 if per_ch else cols)
            assert wide.factored_rows == 16  # 32-row tiles were not launched at head dim 256
    assert (per_channel.num_warps, per_channel.num_stages_bwd, per_channel.num_stages_bwd_exact) == (8, 1, None)


def test_compiler_params_of_each_kernel_kind():
    """Launch parameters per kernel kind, for the delta rule's BlockConfig and for the per-channel
    linear attention's ChannelConfig, which shares the function but has no output-backward warps."""
    from pallas_kernels.gated_delta_rule.layout import compiler_params
    from pallas_kernels.linear_attention.config import ChannelConfig

    def launch(cfg, kind):
        params = compiler_params(cfg, kind)
        return params.num_warps, params.num_stages

    cfg = BlockConfig(num_warps=4, num_stages=2, num_warps_state=2, num_stages_state=3, num_warps_bwd=8)
    assert launch(cfg, "chunk") == (4, 2) and launch(cfg, "state") == (2, 3)
    assert launch(cfg, "backward") == (8, 1) and launch(cfg, "output_backward") == (8, 1)  # None: the backward's
    assert launch(BlockConfig(num_warps_output_bwd=4, num_stages_bwd=2), "output_backward") == (4, 2)
    # the exact per-channel diagonal tiles take their own backward stages where they are set
    staged = BlockConfig(num_warps_bwd=4, num_stages_bwd=2, num_stages_bwd_exact=1)
    for kind in ("backward", "output_backward"):
        assert compiler_params(staged, kind, "channel").num_stages == 1
        assert compiler_params(staged, kind, "channel_bounded").num_stages == 2
        assert compiler_params(staged, kind, "scalar").num_stages == 2
    assert compiler_params(staged, "chunk", "channel").num_stages == staged.num_stages
    assert compiler_params(BlockConfig(num_stages_bwd=2), "backward", "channel").num_stages == 2  # None: the same
    with pytest.raises(ValueError, match="num_stages_bwd_exact=0 must be positive"):
        BlockConfig(num_stages_bwd_exact=0)
    channel = ChannelConfig()
    assert (
        launch(channel, "output_backward")
        == launch(channel, "backward")
        == (channel.num_warps_bwd, channel.num_stages_bwd)
    )
    assert launch(channel, "state") == (channel.num_warps_state, channel.num_stages_state)
    with pytest.raises(ValueError, match="unknown kernel kind 'forward'"):
        compiler_params(cfg, "forward")


# ---- the Triton lowering on CPU, compiled kernels on a GPU ------------------------------------


def test_exact_tiles_lower_with_their_own_backward_stages(triton_lowering_h100):
    """bf16 KDA's default: the backward chunk kernels behind the switch lower with 2 stages in the two
    factored branches (16-row tiles; 32-row output / WY-backward tiles) and 1 in the exact one
    (``num_stages_bwd_exact``); the state passes with theirs."""
    spec = jax.ShapeDtypeStruct
    b, t, h, d = 1, 256, 2, 128
    q, beta = spec((b, t, h, d), jnp.bfloat16), spec((b, t, h), jnp.float32)
    g, s0 = spec((b, t, h, d), jnp.float32), spec((b, h, d, d), jnp.float32)

    def fwd_bwd(q, k, v, beta, g, s0):
        def loss(*xs):
            o, s = pallas_triton.gated_delta_rule(*xs[:4], g=xs[4], initial_state=xs[5])
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, beta, g, s0)

    text = jax.jit(fwd_bwd).trace(q, q, q, beta, g, s0).lower(lowering_platforms=("cuda",)).as_text()
    stages = {}
    for line in text.splitlines():
        if "__gpu$xla.gpu.triton" in line:
            name = re.search(r'name = \\?"(gated_delta_rule_[a-z_]+)', line).group(1)
            stages.setdefault(name, []).append(int(re.search(r"num_stages = (\d+)", line).group(1)))
    cfg = default_config(
        batch=b, value_heads=h, seq_len=t, value_dim=d, interpret=False, per_channel=True, dtype=jnp.bfloat16
    )
    assert (cfg.num_stages_bwd, cfg.num_stages_bwd_exact) == (2, 1)
    for name in ("gated_delta_rule_output_bwd", "gated_delta_rule_wy_bwd"):
        assert sorted(stages[name]) == [1, 2, 2], (name, stages)
    assert stages["gated_delta_rule_state_bwd"] == [cfg.num_stages_state] * 3, stages
    assert sorted(stages["gated_delta_rule_wy"]) == [cfg.num_stages] * 3, stages


def test_kernels_lower_to_triton(triton_lowering_h100):
    """Lower (not compile) forward and backward for CUDA here: the Triton lowering's own checks run."""
    spec = jax.ShapeDtypeStruct
    for gate, (b, t, h, hv, d, e), dtype, docs, splits, whole, fused, stacked, *pregated in [
        ("gdn", (1, 256, 2, 4, 128, 128), jnp.bfloat16, False, 2, False, False, False),
        ("kda", (2, 100, 2, 2, 40, 24), jnp.float32, True, 1, False, False, False),
        ("deltanet", (1, 70, 1, 1, 64, 64), jnp.float16, True, 1, False, False, False),
        ("kda", (1, 200, 2, 2, 128, 128), jnp.bfloat16, True, 2, True, False, False),
        ("gdn", (1, 256, 2, 2, 128, 128), jnp.bfloat16, True, 1, False, True, False),
        ("kda", (1, 130, 2, 2, 128, 128), jnp.bfloat16, True, 1, False, False, True),
        ("kda", (1, 256, 2, 4, 128, 128), jnp.bfloat16, True, 2, False, False, False, True),
    ]:
        # deltanet lowers the fused WY backward, kda its two-kernel split, gdn the whole-chunk one
        # that reads the stored inverse (and 16-wide value blocks in the state passes); kda on
        # whole chunks (``whole``: the diagonal tile by levels) reads the stored inverse too; the
        # last gdn row writes its output in the state pass (``fused``: no output kernel); the last
        # kda row runs the whole-chunk (``stacked``) products in the forward, the output backward
        # and the WY backward (which needs the stored inverse and the fused state step); ``pregated``:
        # the state passes read gated keys / queries and each chunk's decay (grouped value heads),
        # and the chunk-local cumulative gates and their reverse sums are kernels too (outside the cond);
        # its output kernel and WY backward on 32-row sub-tiles (``output_rows``, ``wy_bwd_rows``)
        config = BlockConfig(
            splits=splits,
            block_e=16 if gate == "gdn" else 32,
            wy_bwd_split=gate == "kda" and not (whole or stacked),
            store_inverse=gate == "gdn" or whole or stacked,
            inverse_precision={"gdn": "tf32x3", "deltanet": "tf32", "kda": "tf32" if whole else "highest"}[gate],
            store_scores=gate == "kda",
            channel_rows=64 if whole else 16,
            wy_rows=64 if whole else 16,
            fuse_output=fused,
            stacked_pairs=stacked,
            pregated_state=bool(pregated),
            cumsum_kernel=bool(pregated),
            output_rows=32 if pregated else None,
            wy_bwd_rows=32 if pregated else None,
        )
        q, v = spec((b, t, h, d), dtype), spec((b, t, hv, e), dtype)
        beta, s0 = spec((b, t, hv), jnp.float32), spec((b, hv, d, e), jnp.float32)
        g = {"deltanet": None, "gdn": spec((b, t, hv), jnp.float32), "kda": spec((b, t, hv, d), jnp.float32)}[gate]
        seg = spec((b, t), jnp.int32) if docs else None

        def fwd_bwd(q, k, v, beta, g, s0, seg, config=config):
            def loss(q, k, v, beta, g, s0):
                o, s = pallas_triton.gated_delta_rule(
                    q, k, v, beta, g=g, initial_state=s0, segment_ids=seg, config=config
                )
                return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

            return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, beta, g, s0)

        text = jax.jit(fwd_bwd).trace(q, q, v, beta, g, s0, seg).lower(lowering_platforms=("cuda",)).as_text()
        kernels = ["wy", "state", *([] if fused else ["output"]), "output_bwd", "state_bwd", "wy_bwd"]
        kernels += ["transition", "state_bwd_local"] if splits > 1 else []
        kernels += ["state_step_bwd"] if config.wy_bwd_split else []
        # per-channel gates: every kernel twice, the factored-diagonal and the exact form, one
        # lax.switch on the gates choosing in the forward and again in the backward; three times
        # with 32-row output / WY-backward tiles (the factored form on them and on 16-row tiles)
        copies = (3 if config.factored_rows > config.channel_rows else 2) if gate == "kda" else 1
        sums = 2 if config.cumsum_kernel else 0
        assert text.count("__gpu$xla.gpu.triton") == copies * len(kernels) + sums, f"expected the {kernels} kernels"
        for name in ("chunk_cumsum", "chunk_suffix_sum"):
            assert (f"gated_delta_rule_{name}" in text) == bool(sums), name
        assert text.count("stablehlo.case") == (2 if gate == "kda" else 0)


GPU_CASES = {
    # name: gate, documents (new-document positions), config (None: the default: 2 splits here, KDA
    # 4), optionally the largest log gate magnitude (0.5 otherwise)
    "gdn": ("gdn", None, None),
    "gdn-one-split-docs": ("gdn", (1000, 1001, 2500), BlockConfig(splits=1)),
    "kda-docs": ("kda", (700, 3000), None),
    "kda-stored-scores-docs": ("kda", (700, 3000), BlockConfig(splits=4, block_cols=32, store_scores=True)),
    # log gates down to −7 per token: some 16-row diagonal tiles' middle-row factors exceed e^40,
    # so the whole input runs the exact kernels behind the cond (session 17)
    "kda-strong-gates-docs": ("kda", (700, 3000), None, 7.0),
    # per-channel gates on whole chunks (the diagonal tile by levels), the stored inverse
    "kda-whole-chunk-docs": (
        "kda",
        (700, 3000),
        BlockConfig(splits=4, block_cols=64, channel_rows=64, store_scores=True, store_inverse=True),
    ),
    # the state passes on gated keys / queries formed once (BlockConfig.pregated_state), with session
    # 18's bf16 KDA launch parameters
    "kda-pregated-docs": (
        "kda",
        (700, 3000),
        BlockConfig(
            block_e=16,
            store_inverse=True,
            store_scores=True,
            num_warps=4,
            num_warps_bwd=4,
            num_stages_bwd=2,
            num_stages_bwd_exact=1,
            pregated_state=True,
        ),
    ),
    "deltanet": ("deltanet", None, None),
    # the forward's off-diagonal per-channel blocks by whole-chunk products (BlockConfig.stacked_pairs)
    "kda-stacked-pairs-docs": (
        "kda",
        (700, 3000),
        BlockConfig(splits=4, store_scores=True, store_inverse=True, num_warps_bwd=4, stacked_pairs=True),
    ),
    "gdn-stored-inverse-docs": ("gdn", (1000, 1001, 2500), BlockConfig(splits=2, store_inverse=True)),
    # the inverse's float32 products as one tf32 product each, on 16-row tiles and on whole chunks
    "gdn-tf32-inverse": ("gdn", None, BlockConfig(splits=4, store_inverse=True, inverse_precision="tf32")),
    "gdn-whole-chunk-tf32-docs": (
        "gdn",
        (1000, 1001, 2500),
        BlockConfig(splits=4, store_inverse=True, wy_rows=64, inverse_precision="tf32"),
    ),
    # 16-wide value blocks of the state passes (the default where 32-wide ones leave half the SMs idle)
    "gdn-block-e-16-docs": (
        "gdn",
        (1000, 1001, 2500),
        BlockConfig(block_e=16, store_inverse=True, wy_rows=64, inverse_precision="tf32"),
    ),
    "gdn-block-e-16-splits": ("gdn", None, BlockConfig(block_e=16, splits=4, store_inverse=True)),
    # the split entry points' default where they cut the shard: 64-wide value blocks, 4 runs
    "gdn-block-e-64-splits-docs": (
        "gdn",
        (1000, 1001, 2500),
        BlockConfig(block_e=64, splits=4, store_inverse=True, wy_rows=64, inverse_precision="tf32", num_warps=4),
    ),
    # the bf16 default's launch parameters (4 warps in the forward chunk kernels and the output
    # backward) with documents
    "gdn-four-warps-docs": (
        "gdn",
        (1000, 1001, 2500),
        BlockConfig(
            block_e=16, store_inverse=True, wy_rows=64, inverse_precision="tf32", num_warps=4, num_warps_output_bwd=4
        ),
    ),
    # the output written by the state pass (BlockConfig.fuse_output), as the default's other fields
    "gdn-fused-output-docs": (
        "gdn",
        (1000, 1001, 2500),
        BlockConfig(block_e=16, store_inverse=True, wy_rows=64, inverse_precision="tf32", fuse_output=True),
    ),
}

# the bf16 pregated case with the chunk-local cumulative gates by the Pallas kernel (session 21: the
# per-channel default)
GPU_CASES["kda-cumsum-kernel-docs"] = (
    *GPU_CASES["kda-pregated-docs"][:2],
    dataclasses.replace(GPU_CASES["kda-pregated-docs"][2], cumsum_kernel=True),
)
# and with 32-row tiles in the forward output kernel and the WY backward (session 22; gates of at most
# 0.5 per token pass the 32-row check, so the factored kernels run)
GPU_CASES["kda-32-row-output-wy-bwd-docs"] = (
    *GPU_CASES["kda-cumsum-kernel-docs"][:2],
    dataclasses.replace(GPU_CASES["kda-cumsum-kernel-docs"][2], output_rows=32, wy_bwd_rows=32),
)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_compiled_kernels_match_reference(rng, case):
    """The compiled kernels at D = 128, bf16, T = 4096 (grouped value heads, an initial state)
    against the float32 token recurrence at HIGHEST precision."""
    gate, docs, config, *g_max = GPU_CASES[case]
    _check_compiled(rng, gate, docs, config, g_max[0] if g_max else 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["gdn", "kda"])
@pytest.mark.parametrize("dtype,d", [(jnp.float32, 128), (jnp.bfloat16, 256), (jnp.float32, 256)])
def test_compiled_defaults_launch_per_dtype_and_head_dim(rng, gate, dtype, d):
    """The default configs where shared memory is tightest (session 19: float32 KDA's former default
    asked 248 KB, past the 227 KB limit; an offline build puts head dim 256 at 306 KB with 3 state
    stages), compiled and run, T = 1024, documents, against the token recurrence."""
    _check_compiled(rng, gate, (300,), None, 0.5, d=d, dtype=dtype, t=1024)


@pytest.mark.gpu
@pytest.mark.parametrize("g_max,case", [(0.5, 2), (5.0, 1), (9.0, 0)])
def test_compiled_kda_default_takes_each_gate_case(rng, g_max, case):
    """bf16 KDA's default (32-row output / WY-backward tiles where the gates allow them, session 23)
    in each branch of its switch: log gates up to 0.5 per token (the 32-row tiles), up to 5 (16-row
    tiles: every 8-token half-span ≤ 40, the 16-token ones past it) and up to 9 (the exact kernels),
    T = 4096 with documents, against the token recurrence."""
    xs, _, _ = make_inputs(np.random.default_rng(0), b=2, t=4096, h=2, hv=4, d=128, e=128, gate="kda", g_max=g_max)
    low = [jnp.asarray(xs[n], jnp.bfloat16) for n in ("q", "k", "v")]
    args, _, statics = pallas_triton.prepare(
        *low, *(jnp.asarray(xs[n]) for n in ("beta", "g")), None, None, 0.5, False, None
    )
    assert int(pallas_triton.gate_case(args[4], statics, jnp.bfloat16)) == case
    _check_compiled(rng, "kda", (700, 3000), None, g_max)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["gdn", "kda"])
def test_compiled_default_with_bf16_inverse(rng, gate):
    """The inverse's products on bf16 operands (``inverse_precision="bf16"``, the bf16 default since
    session 24; set here so the case stays if the default moves), T = 4096 with documents, against
    the token recurrence."""
    cfg = default_config(
        batch=2,
        value_heads=4,
        seq_len=4096,
        value_dim=128,
        key_dim=128,
        per_channel=gate == "kda",
        interpret=False,
        dtype=jnp.bfloat16,
    )
    _check_compiled(rng, gate, (700, 3000), dataclasses.replace(cfg, inverse_precision="bf16"), 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("bound,g_max", [(-5.0, 6.0), (-2.5, 3.0)])
def test_compiled_kda_default_with_gate_lower_bound(rng, bound, g_max):
    """bf16 KDA's default told the gates' floor: −5 builds the 16- and 32-row factored forms (a switch
    between the two), −2.5 the 32-row form alone; the gates reach past the floor (raised to it),
    against the token recurrence on the raised gates, T = 4096 with documents."""
    _check_compiled(rng, "kda", (700, 3000), None, g_max, gate_lower_bound=bound)


def _check_compiled(rng, gate, docs, config, g_max, *, d=128, dtype=jnp.bfloat16, t=4096, gate_lower_bound=None):
    xs, cot, seg = make_inputs(rng, b=2, t=t, h=2, hv=4, d=d, e=d, gate=gate, g_max=g_max, docs=docs)
    low = ("q", "k", "v")
    xs = {n: jnp.asarray(x, dtype if n in low else jnp.float32) for n, x in xs.items()}
    cot = {n: jnp.asarray(c, jnp.float32) for n, c in cot.items()}
    seg = None if seg is None else jnp.asarray(seg)

    def kernel(xs):
        xs = dict(xs)
        q, k, v, beta = (xs.pop(n) for n in ("q", "k", "v", "beta"))
        return pallas_triton.gated_delta_rule(
            q, k, v, beta, **xs, segment_ids=seg, config=config, gate_lower_bound=gate_lower_bound
        )

    def oracle(xs):
        xs = {n: x.astype(jnp.float32) for n, x in xs.items()}
        if gate_lower_bound is not None:  # raised as the op raises them (no gradient below the floor)
            xs["g"] = jnp.where(xs["g"] < gate_lower_bound, gate_lower_bound, xs["g"])
        q, k, v, beta = (xs.pop(n) for n in ("q", "k", "v", "beta"))
        doc_ids = None if seg is None else reference.document_index(seg)
        return reference.recurrent(q, k, v, beta, xs.pop("g", None), scale=d**-0.5, doc_ids=doc_ids, **xs)

    got = _value_and_grads(kernel, xs, cot)
    with jax.default_matmul_precision("highest"):
        want = _value_and_grads(oracle, xs, cot)
    bound = tol(dtype, t)
    for name in want:
        assert _error(got[name], want[name]) < bound, (name, _error(got[name], want[name]))
