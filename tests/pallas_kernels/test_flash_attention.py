"""The flash-attention op and its Pallas Triton block kernels against float64 dense oracles.

``flash_attention`` (the public single-device op) on every implementation, with packed documents.
``block_attention_fwd`` / ``block_attention_bwd`` (pallas_kernels.flash_attention) in the Pallas
interpreter on CPU, on fresh random inputs: query blocks at offsets before, at and after the key
block (rows that see nothing, a key block wholly in the future), grouped heads, E ≠ D, lengths
that are no multiple of the blocks, bf16 and fp32; the backward's additivity over key blocks
(what ring attention relies on); the same contract as the jnp recurrence
(``pallas_kernels.flash_attention.xla``). GPU-only: the compiled kernels at a moderate shape. CPU: the
kernels go through the Pallas Triton lowering (catches what the interpreter accepts and Triton
does not, e.g. block shapes that are no power of two).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from lasp_jax.softmax import api as softmax_api
from pallas_kernels.flash_attention import BlockConfig, block_attention_bwd, block_attention_fwd, default_config, xla
from pallas_kernels.flash_attention.common import first_key_blocks, query_block_ends, single_document_blocks
from pallas_kernels.flash_attention.reference import block_attention as oracle
from tests.helpers import rel_err, tol, x64


def _inputs(rng, *, b, lq, lk, h, hk, d, e, dtype):
    """Random q, k, v rounded to ``dtype`` (float64 numpy) and a float64 output cotangent."""
    shapes = [(b, lq, h, d), (b, lk, hk, d), (b, lk, hk, e)]
    q, k, v = (np.asarray(jnp.asarray(rng.standard_normal(s), dtype), np.float64) for s in shapes)
    return q, k, v, rng.standard_normal((b, lq, h, e))


def _want(q, k, v, do, **offsets):
    """Float64 o, lse and the gradients of <o, do> (under one jit: eager, each primitive compiles apart)."""

    @jax.jit
    def run(q, k, v, do):
        (o, lse), vjp = jax.vjp(lambda q, k, v: oracle(q, k, v, **offsets), q, k, v)
        dq, dk, dv = vjp((do, jnp.zeros_like(lse)))
        return dict(o=o, lse=lse, dq=dq, dk=dk, dv=dv)

    with x64():
        want = {n: np.asarray(x) for n, x in run(*(jnp.asarray(x, jnp.float64) for x in (q, k, v, do))).items()}
    assert all(np.isfinite(x).all() for n, x in want.items() if n != "lse"), "the oracle itself is not finite"
    return want


def _got(q, k, v, do, want, *, dtype, q_start, k_start, scale, config=None, out_dtype=None):
    """Kernel o, lse and the gradients given the oracle's final o and lse (jitted, traced offsets)."""

    @jax.jit
    def run(q, k, v, o, lse, do, q_start, k_start):
        kw = dict(q_start=q_start, k_start=k_start, scale=scale, interpret=True, config=config, out_dtype=out_dtype)
        o_k, lse_k = block_attention_fwd(q, k, v, **kw)
        dq, dk, dv = block_attention_bwd(q, k, v, o, lse, do, **kw)
        return dict(o=o_k, lse=lse_k, dq=dq, dk=dk, dv=dv)

    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    out = run(
        cast(q),
        cast(k),
        cast(v),
        cast(want["o"]),
        jnp.asarray(want["lse"], jnp.float32),
        cast(do),
        jnp.int32(q_start),
        jnp.int32(k_start),
    )
    dtypes = {n: x.dtype for n, x in out.items()}
    return {n: np.asarray(x, np.float64) for n, x in out.items()} | {"dtypes": dtypes}


def _compare(got, want, *, dtype, length, out_dtype=jnp.float32):
    """Every output in ``out_dtype`` (lse float32) and within tolerance; lse −inf exactly where the
    oracle's is, no NaN."""
    assert got["dtypes"] == dict(o=out_dtype, lse=jnp.float32, dq=out_dtype, dk=out_dtype, dv=out_dtype), got["dtypes"]
    lse, lse_want = got["lse"], want["lse"]
    assert not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_want))
    finite = np.isfinite(lse_want)
    errors = {"lse": float(np.abs(lse[finite] - lse_want[finite]).max(initial=0.0))}
    for name in ("o", "dq", "dk", "dv"):
        scale = np.linalg.norm(want[name])
        # an all-zero reference (nothing visible): absolute error
        errors[name] = rel_err(got[name], want[name]) if scale > 1e-12 else float(np.abs(got[name]).max())
    bound = tol(dtype, length)
    bad = {n: e for n, e in errors.items() if e > (4 * bound if n == "lse" else bound)}
    assert not bad, f"errors over tolerance {bound:.1e}: {bad}"


CASES = {
    # name: b, lq, lk, h, hk, d, e, q_start, k_start
    "diagonal-odd": (1, 37, 37, 4, 2, 16, 16, 0, 0),  # 3 query/key blocks of 16, a padded tail
    "past-gqa3-e12": (2, 24, 40, 6, 2, 8, 12, 40, 8),  # q_start > k_start; D padded to 16, E != D
    "partly-future-mqa": (1, 20, 48, 4, 1, 16, 16, 10, 25),  # first rows see nothing; key blocks in the future;
    # a negative scale (the forward negates q to keep its row maxima of raw products maxima)
    "all-future": (1, 20, 33, 2, 2, 16, 16, 0, 40),  # nothing visible: o = 0, lse = -inf, grads 0
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_oracle_fp32(rng, case):
    b, lq, lk, h, hk, d, e, q_start, k_start = CASES[case]
    q, k, v, do = _inputs(rng, b=b, lq=lq, lk=lk, h=h, hk=hk, d=d, e=e, dtype=jnp.float32)
    scale = (-0.7 if case == "partly-future-mqa" else 0.7) * d**-0.5
    offsets = dict(q_start=q_start, k_start=k_start, scale=scale)
    want = _want(q, k, v, do, **offsets)
    got = _got(q, k, v, do, want, dtype=jnp.float32, **offsets)
    _compare(got, want, dtype=jnp.float32, length=lk)
    if case == "past-gqa3-e12":  # the contract of the jnp recurrence the kernels replace: shapes, dtypes, values
        args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, want["o"], want["lse"], do)]
        o, lse = xla.block_attention_fwd(*args[:3], **offsets, block=8)
        grads = xla.block_attention_bwd(*args, **offsets, block=8)
        for name, x in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), strict=True):
            assert x.shape == got[name].shape and x.dtype == got["dtypes"][name], name
            assert rel_err(got[name], x) < 1e-5, name
    if case == "all-future":
        assert np.isneginf(got["lse"]).all() and not np.any(got["o"]) and not np.any(got["dq"])


def test_kernels_match_oracle_bf16(rng):
    """bf16 inputs, 32-wide heads, several 16-blocks on both sides of the diagonal; o and the
    gradients written in bf16 (``out_dtype``, as the single-device op has them)."""
    q, k, v, do = _inputs(rng, b=1, lq=48, lk=64, h=4, hk=2, d=32, e=32, dtype=jnp.bfloat16)
    offsets = dict(q_start=16, k_start=0, scale=32**-0.5)
    want = _want(q, k, v, do, **offsets)
    got = _got(q, k, v, do, want, dtype=jnp.bfloat16, out_dtype=jnp.bfloat16, **offsets)
    _compare(got, want, dtype=jnp.bfloat16, length=64, out_dtype=jnp.bfloat16)


def documents_kwargs(rng, b, lq, lk, n_docs=16, q_start=None):
    """Offsets and segment ids of ``n_docs`` documents per row (random cuts of the span the queries
    and keys cover, non-decreasing ids); the queries start at ``q_start`` (default: they are the
    last ``lq`` keys), the keys at 0."""
    q_start = lk - lq if q_start is None else q_start
    total = max(lk, q_start + lq)
    cuts = [np.sort(rng.choice(np.arange(1, total), n_docs - 1, replace=False)) for _ in range(b)]
    ids = jnp.asarray(np.stack([np.searchsorted(c, np.arange(total), side="right") for c in cuts]), jnp.int32)
    return dict(
        q_start=jnp.int32(q_start),
        k_start=jnp.int32(0),
        q_segment_ids=ids[:, q_start : q_start + lq],
        k_segment_ids=ids[:, :lk],
    )


SMALL_BLOCKS = BlockConfig(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_k_dkv=16, block_q_dkv=16)


@pytest.mark.parametrize("sorted_ids", [False, True], ids=["masks-only", "sorted-skip"])
@pytest.mark.parametrize("lq,lk,q_start,n_docs", [(72, 136, 64, 9), (64, 64, 0, 12), (40, 100, 60, 5)])
def test_documents_match_jnp_recurrence(rng, sorted_ids, lq, lk, q_start, n_docs):
    """Packed documents (non-decreasing ids, 16-row blocks): the kernels with only the masks and
    with document block skipping (``documents_sorted``) against the jnp recurrence; the skip
    bounds must skip something, so both code paths run (with 3 documents in the short case no cut fell
    in [16, 92] in about 1 draw of 400: it has 5, about 4e-6)."""
    b, h, hk, d = 2, 4, 2, 16
    q, k, v, do = (
        jnp.asarray(x, jnp.float32) for x in _inputs(rng, b=b, lq=lq, lk=lk, h=h, hk=hk, d=d, e=d, dtype=jnp.float32)
    )
    kw = documents_kwargs(rng, b, lq, lk, n_docs, q_start)

    @jax.jit  # one program (eager, each primitive compiles apart); offsets and ids traced, as in the layers
    def run(q, k, v, do, kw):
        kw = kw | dict(scale=0.25)
        o_want, lse_want = xla.block_attention_fwd(q, k, v, block=8, **kw)
        grads_want = xla.block_attention_bwd(q, k, v, o_want, lse_want, do, block=8, **kw)
        sorted_kw = dict(documents_sorted=sorted_ids, config=SMALL_BLOCKS)
        o, lse = block_attention_fwd(q, k, v, **sorted_kw, **kw)
        grads = block_attention_bwd(q, k, v, o_want, lse_want, do, **sorted_kw, **kw)
        return (o_want, lse_want, grads_want), (o, lse, grads)

    (o_want, lse_want, grads_want), (o, lse, grads) = run(q, k, v, do, kw)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_want))
    finite = np.isfinite(np.asarray(lse_want))
    assert float(np.abs(np.asarray(lse)[finite] - np.asarray(lse_want)[finite]).max()) < 1e-5
    for name, x, y in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_want, *grads_want), strict=True):
        assert rel_err(x, y) < 1e-5, name
    ids_kw = dict(q_ids=kw["q_segment_ids"], k_ids=kw["k_segment_ids"], block_q=16, block_k=16)
    assert int(first_key_blocks(**ids_kw, num_q_blocks=-(-lq // 16)).max()) > 0
    ends = query_block_ends(**ids_kw, num_k_blocks=-(-lk // 16), num_q_blocks=-(-lq // 16))
    assert int(ends.min()) < -(-lq // 16)


def test_single_document_blocks():
    """The column blocks a row block attends without the document mask lie wholly inside the one
    document of all its real rows: documents 0 on [0, 40) and 1 on [40, 100), 16-row blocks; a block
    spanning both, and one of padding only, get none."""
    ids = jnp.asarray([[0] * 40 + [1] * 60], jnp.int32)
    lo, hi = single_document_blocks(ids, ids, block_rows=16, block_cols=16, num_row_blocks=8)
    np.testing.assert_array_equal(lo, [[0, 0, 0, 3, 3, 3, 3, 0]])
    np.testing.assert_array_equal(hi, [[2, 2, 0, 6, 6, 6, 6, 0]])


def test_backward_adds_up_over_key_blocks(rng):
    """Ring attention's contract: the gradients of two key halves, each given the *global* o and
    lse, add up to the whole (dq summed, dk/dv side by side); blocks of 32 rows, keys at 2 offsets."""
    b, lq, lk, h, hk, d = 1, 32, 64, 4, 2, 16
    q, k, v, do = _inputs(rng, b=b, lq=lq, lk=lk, h=h, hk=hk, d=d, e=d, dtype=jnp.float32)
    want = _want(q, k, v, do, q_start=32, k_start=0, scale=d**-0.5)
    cfg = BlockConfig(block_q=16, block_k=32, block_q_dq=32, block_k_dq=16, block_k_dkv=16, block_q_dkv=16)
    halves = [
        _got(q, k[:, s], v[:, s], do, want, dtype=jnp.float32, q_start=32, k_start=s.start, scale=d**-0.5, config=cfg)
        for s in (slice(0, 32), slice(32, 64))
    ]
    got = {
        "dq": halves[0]["dq"] + halves[1]["dq"],
        "dk": np.concatenate([x["dk"] for x in halves], 1),
        "dv": np.concatenate([x["dv"] for x in halves], 1),
    }
    for name, x in got.items():
        assert rel_err(x, want[name]) < tol(jnp.float32, lk), name
    # the halves' own lse merge to the whole (online-softmax merge of disjoint key sets)
    merged = np.logaddexp(halves[0]["lse"], halves[1]["lse"])
    np.testing.assert_allclose(merged, want["lse"], rtol=1e-5, atol=1e-5)


FUSED = dataclasses.replace(SMALL_BLOCKS, backward="fused")


def test_fused_backward_matches_jnp_recurrence(rng):
    """``BlockConfig.backward="fused"`` (dq by atomic adds from the dk/dv kernel) against the jnp
    recurrence: queries after the keys' start with rows past the keys' end, grouped heads, E ≠ D,
    padded tails, packed documents with block skipping (the causal-only path shares every line but
    the document mask; the split backward's tests cover both)."""
    b, lq, lk, h, hk, d, e = 1, 40, 56, 4, 2, 16, 8
    q, k, v, do = (
        jnp.asarray(x, jnp.float32) for x in _inputs(rng, b=b, lq=lq, lk=lk, h=h, hk=hk, d=d, e=e, dtype=jnp.float32)
    )
    kw = documents_kwargs(rng, b, lq, lk, 4, q_start=40) | dict(scale=0.3)
    o, lse = xla.block_attention_fwd(q, k, v, block=8, **kw)
    want = xla.block_attention_bwd(q, k, v, o, lse, do, block=8, **kw)
    got = jax.jit(lambda *a: block_attention_bwd(*a, **kw, documents_sorted=True, config=FUSED))(q, k, v, o, lse, do)
    for name, x, y in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert x.dtype == jnp.float32 and x.shape == y.shape, name
        assert rel_err(x, y) < 1e-5, name


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_flash_attention_matches_reference(rng, impl):
    """The public op (``from pallas_kernels import flash_attention``): o and the gradients of q, k,
    v against the float64 dense oracle, grouped heads, E ≠ D, T = 21 (a padded tail for the kernels,
    one block for the jnp recurrence), two packed documents per row."""
    flash_attention = pallas_kernels.flash_attention
    b, t, h, hk, d, e = 2, 21, 2, 1, 16, 8
    q, k, v, do = _inputs(rng, b=b, lq=t, lk=t, h=h, hk=hk, d=d, e=e, dtype=jnp.float32)
    ids = (np.arange(t)[None, :] >= rng.integers(1, t, (b, 1))).astype(np.int32)

    def grads(impl, dtype):
        attend = functools.partial(flash_attention, scale=0.3, impl=impl)

        @jax.jit
        def run(q, k, v, ids, do):
            o, vjp = jax.vjp(lambda *a: attend(*a, segment_ids=ids), q, k, v)
            return (o, *vjp(do))

        out = run(*[jnp.asarray(x, dtype) for x in (q, k, v)], jnp.asarray(ids), jnp.asarray(do, dtype))
        return [np.asarray(x) for x in out] + [out[0].dtype]

    with x64():
        want = grads("reference", jnp.float64)
    got = grads(impl, jnp.float32)
    assert got.pop() == jnp.float32
    for name, x, y in zip(("o", "dq", "dk", "dv"), got, want[:4], strict=True):
        assert rel_err(x, y) < tol(jnp.float32, t), name
    with pytest.raises(ValueError, match=r"impl must be one of"):
        flash_attention(*[jnp.asarray(x, jnp.float32) for x in (q, k, v)], impl="cudnn")


def test_wide_heads_refused_by_the_compiled_kernels(monkeypatch):
    """Heads wider than 128 are not known to fit an H200's shared memory at the default tiles (float32
    256-wide asked 279 KB, session 16; bf16 never ran): the compiled kernels refuse them with a clear
    error, ``impl="auto"`` on a GPU runs cuDNN or the jnp recurrence instead, and the interpreter (no
    such limit) still takes them."""
    from pallas_kernels.flash_attention import api, common

    for dtype in (jnp.float32, jnp.bfloat16):
        q = jnp.zeros((1, 32, 2, 256), dtype)
        with pytest.raises(ValueError, match=r"heads up to 128 wide"):
            common.resolve(q, q, q, interpret=False, config=None)
        assert common.resolve(q, q, q, interpret=True, config=None)[0] is True
    narrow = jnp.zeros((1, 32, 2, 128), jnp.float32)
    assert common.resolve(narrow, narrow, narrow, interpret=False, config=None)[1].block_k == 64
    monkeypatch.setattr(api, "on_gpu", lambda: True)
    monkeypatch.setattr(softmax_api, "on_gpu", lambda: True)
    wide, wide_bf16 = jnp.zeros((1, 32, 2, 256), jnp.float32), jnp.zeros((1, 32, 2, 256), jnp.bfloat16)
    assert api.resolve_impl("auto", wide, wide, wide) == "xla"
    assert softmax_api.resolve_impl("auto", wide, wide, wide, n_keys=None) == "xla"
    assert softmax_api.resolve_impl("auto", narrow, narrow, narrow, n_keys=None) == "pallas"
    # bf16 256-wide under a mesh where cuDNN takes it (Hopper): cuDNN block pairs, but with documents
    # (whose fallback pairs run the Pallas kernels) the recurrence
    monkeypatch.setattr(softmax_api, "cudnn_supports", lambda *a, **kw: True)
    assert softmax_api.resolve_impl("auto", wide_bf16, wide_bf16, wide_bf16, n_keys=None) == "cudnn_blocks"
    assert softmax_api.resolve_impl("auto", wide_bf16, wide_bf16, wide_bf16, n_keys=None, documents=True) == "xla"


def test_default_config():
    assert default_config(head_dim=128, interpret=False).num_warps == 8
    assert default_config(head_dim=64, interpret=False).num_warps == 4
    assert default_config(head_dim=128, interpret=False, dtype=jnp.bfloat16).block_k == 128
    # float32: 128-row K/V tiles in 3 stages would ask 384 KiB of shared memory (an H200 has 227)
    f32 = default_config(head_dim=128, interpret=False, dtype=jnp.float32)
    assert (f32.block_k, f32.block_q_dkv, f32.block_k_dq) == (64, 64, 64)
    wide = default_config(head_dim=256, interpret=False, dtype=jnp.float32)
    assert (wide.block_k, wide.block_q_dkv, wide.block_k_dq) == (32, 32, 32)
    for d in (16, 64, 96, 128, 256):
        for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
            cfg = default_config(head_dim=d, interpret=False, dtype=dtype)
            size = jnp.dtype(dtype).itemsize
            assert 2 * cfg.block_k * d * size * cfg.num_stages <= 232448, (d, dtype, cfg)
            assert 2 * cfg.block_q_dkv * d * size * cfg.num_stages_bwd <= 232448, (d, dtype, cfg)
    with pytest.raises(ValueError, match=r"block_q=48 must be a power of two"):
        BlockConfig(block_q=48)
    with pytest.raises(ValueError, match=r"backward='dq' must be one of"):
        BlockConfig(backward="dq")


@pytest.mark.slow
def test_flash_sweep_quick_run(tmp_path):
    """``benchmarks/flash_sweep.py --quick`` end to end on the CPU (worker process, interpreter, tiny
    shape), so the lead's one GPU run does not fail on a typo: the rows are timed and match XLA's
    attention, the fastest forward tiling and backward are combined into a ``best`` row."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, str(root / "benchmarks" / "flash_sweep.py"), "--quick", "--out", str(out)]
    cmd += ["--configs", "fused", "fwd-32x16"]
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = [r["name"] for r in rows]  # "best" when the faster forward and backward come from different rows
    assert names in (["xla-dpa", "fused", "fwd-32x16"], ["xla-dpa", "fused", "fwd-32x16", "best"]), rows
    for row in rows:
        assert "error" not in row and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
        assert row["max_rel_err"] < tol(jnp.bfloat16, 64), row
    assert "fastest forward+backward" in proc.stdout

    from benchmarks.flash_sweep import best_combination

    timed = [
        {"name": "a", "fields": {"backward": "fused", "block_k_dkv": 32}, "fwd_ms": 2.0, "bwd_ms": 1.0},
        {"name": "b", "fields": {"block_q": 32, "num_warps": 8}, "fwd_ms": 1.0, "bwd_ms": 3.0},
    ]
    want = {"backward": "fused", "block_k_dkv": 32, "block_q": 32, "num_warps": 8}
    assert best_combination(timed) == {"name": "best", "fields": want}
    assert best_combination(timed[:1]) is None  # one row has both


def test_rejects_float64():
    with x64():
        x = jnp.zeros((1, 16, 2, 16), jnp.float64)
        with pytest.raises(TypeError, match=r"bf16, fp16 or fp32.*q.dtype=float64"):
            block_attention_fwd(x, x, x, q_start=0, k_start=0, scale=1.0, interpret=True)


# ---- the Triton lowering on CPU, compiled kernels on a GPU ------------------------------------


def test_kernels_lower_to_triton(triton_lowering_h100):
    """Lower (not compile) for CUDA on this machine: the Triton lowering's own checks run."""
    for b, lq, lk, h, hk, d, e, dtype in [
        (1, 256, 512, 8, 2, 128, 128, jnp.bfloat16),
        (2, 100, 77, 6, 2, 8, 40, jnp.float32),
    ]:
        cfg = default_config(head_dim=max(d, e), interpret=False)
        q, do = jax.ShapeDtypeStruct((b, lq, h, d), dtype), jax.ShapeDtypeStruct((b, lq, h, e), dtype)
        k, v = jax.ShapeDtypeStruct((b, lk, hk, d), dtype), jax.ShapeDtypeStruct((b, lk, hk, e), dtype)
        lse, pos = jax.ShapeDtypeStruct((b, h, lq), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)
        kw = dict(scale=0.1, interpret=False, config=cfg)

        def fwd_bwd(q, k, v, do, lse, q_start, k_start, kw=kw):
            o, _ = block_attention_fwd(q, k, v, q_start=q_start, k_start=k_start, **kw)
            return block_attention_bwd(q, k, v, o, lse, do, q_start=q_start, k_start=k_start, **kw)

        text = jax.jit(fwd_bwd).trace(q, k, v, do, lse, pos, pos).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3, "expected the forward, dq and dk/dv kernels"
        fused = dict(kw, config=dataclasses.replace(cfg, backward="fused"))
        traced = jax.jit(functools.partial(fwd_bwd, kw=fused)).trace(q, k, v, do, lse, pos, pos)
        assert traced.lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton") == 2

        def with_documents(q, k, v, do, lse, q_start, k_start, q_ids, k_ids, kw=kw):
            docs = dict(q_segment_ids=q_ids, k_segment_ids=k_ids, documents_sorted=True)
            o, _ = block_attention_fwd(q, k, v, q_start=q_start, k_start=k_start, **docs, **kw)
            return block_attention_bwd(q, k, v, o, lse, do, q_start=q_start, k_start=k_start, **docs, **kw)

        ids = jax.ShapeDtypeStruct((b, lq), jnp.int32), jax.ShapeDtypeStruct((b, lk), jnp.int32)
        own_dq = dict(kw, config=dataclasses.replace(cfg, num_warps_dq=2))  # the dq kernel's own launch parameter
        traced = jax.jit(functools.partial(with_documents, kw=own_dq)).trace(q, k, v, do, lse, pos, pos, *ids)
        calls = [x for x in traced.lower(lowering_platforms=("cuda",)).as_text().splitlines() if "xla.gpu.triton" in x]
        assert len(calls) == 3
        warps = {name: "num_warps = 2 :" in x for x in calls for name in re.findall(r"flash_attention_\w+", x)[:1]}
        assert warps == {
            "flash_attention_forward": False,
            "flash_attention_backward_dkv": False,
            "flash_attention_backward_dq": True,
        }


GPU_CASES = {
    # name: b, lq, lk, h, hk, d, dtype, q_start, k_start
    "allgather-rank1-d128-bf16": (1, 1024, 2048, 8, 2, 128, jnp.bfloat16, 1024, 0),
    "ring-past-d64-fp16": (2, 512, 512, 4, 4, 64, jnp.float16, 1536, 1024),
    "diagonal-odd-d96-fp32": (1, 700, 700, 4, 1, 96, jnp.float32, 0, 0),
}


def _check_compiled(q, k, v, do, *, dtype, documents_sorted=False, **kw):
    """The kernels (compiled on a GPU) against the jnp recurrence in float32 at HIGHEST precision."""
    kernel_kw = kw | dict(documents_sorted=documents_sorted)
    with jax.default_matmul_precision("highest"):
        f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, do)]
        o_want, lse_want = jax.jit(lambda q, k, v: xla.block_attention_fwd(q, k, v, **kw, block=256))(*f32[:3])
        grads_want = jax.jit(lambda *a: xla.block_attention_bwd(*a, **kw, block=256))(
            *f32[:3], o_want, lse_want, f32[3]
        )
    args = [jnp.asarray(x, dtype) for x in (q, k, v)]
    o, lse = jax.jit(lambda q, k, v: block_attention_fwd(q, k, v, **kernel_kw))(*args)
    grads = jax.jit(lambda *a: block_attention_bwd(*a, **kernel_kw))(
        *args, o_want.astype(dtype), lse_want, jnp.asarray(do, dtype)
    )
    bound = tol(dtype, k.shape[1])
    assert rel_err(o, o_want) < bound
    assert float(jnp.abs(lse - lse_want).max()) < 4 * bound
    for name, x, y in zip(("dq", "dk", "dv"), grads, grads_want, strict=True):
        assert rel_err(x, y) < bound, name


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_compiled_kernels_match_jnp_recurrence(rng, case):
    b, lq, lk, h, hk, d, dtype, q_start, k_start = GPU_CASES[case]
    q, k, v, do = _inputs(rng, b=b, lq=lq, lk=lk, h=h, hk=hk, d=d, e=d, dtype=dtype)
    _check_compiled(q, k, v, do, dtype=dtype, q_start=jnp.int32(q_start), k_start=jnp.int32(k_start), scale=d**-0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("sorted_ids", [False, True], ids=["masks-only", "sorted-skip"])
def test_compiled_kernels_with_documents(rng, sorted_ids):
    """Compiled kernels with packed documents (segment ids) against the jnp recurrence."""
    b, lq, lk, h, hk, d, dtype = 2, 1024, 2048, 8, 2, 128, jnp.bfloat16
    q, k, v, do = _inputs(rng, b=b, lq=lq, lk=lk, h=h, hk=hk, d=d, e=d, dtype=dtype)
    kw = documents_kwargs(rng, b, lq, lk)
    _check_compiled(q, k, v, do, dtype=dtype, scale=d**-0.5, documents_sorted=sorted_ids, **kw)
