"""The cuDNN block functions (``impl="cudnn_blocks"``): a block pair at global offsets as a prefix
call and a causal band call, merged by log-sum-exp, against the jnp flash recurrence.

On the CPU the two calls run on the dense jnp twin (``XLA_DENSE``), whose own forward and backward
are checked against autodiff of the dense reference; on a GPU (``-m gpu``) cuDNN's calls are
checked against the twin and the block functions against the jnp recurrence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import block_functions, cudnn_blocks, xla
from pallas_kernels.flash_attention.reference import block_attention
from tests.helpers import rel_err, tol

F32 = jnp.float32


def _inputs(rng, *, b=2, lq=16, lk=48, h=4, hk=2, d=8, e=8, dtype=F32):
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((b, lq, h, d), (b, lk, hk, d), (b, lk, hk, e)))
    do = jnp.asarray(rng.standard_normal((b, lq, h, e)), dtype)
    return q, k, v, do


def _close(got, want, bound, name):
    err = rel_err(got, want) if np.linalg.norm(np.asarray(want, np.float64)) > 1e-12 else float(np.abs(got).max())
    assert err < bound, f"{name}: err {err:.2e} >= {bound:.2e}"


def _recurrence(q, k, v, do, *, q_start, k_start, scale):
    """The jnp recurrence's (o, lse) and, given them as final, its (dq, dk, dv)."""
    kw = dict(q_start=q_start, k_start=k_start, scale=scale, block=8)
    o, lse = xla.block_attention_fwd(q, k, v, **kw)
    return (o, lse), xla.block_attention_bwd(q, k, v, o, lse, do.astype(F32), **kw)


# offsets (q_start, k_start) of every class the strategies form, for Lq = 16 queries and Tk = 48 keys
OFFSETS = {
    "diagonal": (32, 32),  # d = 0: the band only
    "prefix-and-band": (16, 0),  # 0 < d < Tk − Lq
    "band-at-the-end": (64, 32),  # d = Tk − Lq
    "all-visible": (80, 32),  # d = Tk
    "far-past": (200, 0),  # d > Tk
    "future": (0, 16),  # d = −Lq: nothing visible
}


@pytest.mark.parametrize("case", list(OFFSETS))
def test_blocks_equal_the_recurrence(rng, case):
    q_start, k_start = OFFSETS[case]
    q, k, v, do = _inputs(rng)
    scale = 0.3
    (o_w, lse_w), _ = _recurrence(q, k, v, do, q_start=q_start, k_start=k_start, scale=scale)
    kw = dict(q_start=jnp.int32(q_start), k_start=jnp.int32(k_start), scale=scale, dense=cudnn_blocks.XLA_DENSE)
    o, lse = jax.jit(functools.partial(cudnn_blocks.block_attention_fwd, **kw))(q, k, v)
    assert o.dtype == F32 and lse.dtype == F32 and lse.shape == lse_w.shape
    bound = tol(F32, 48)
    if case == "future":  # nothing visible: zero output, −inf log-sum-exp, zero gradients
        assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))
    else:
        _close(o, o_w, bound, "o")
        _close(lse, lse_w, bound, "lse")
    bwd = jax.jit(functools.partial(cudnn_blocks.block_attention_bwd, **kw))
    o_in, lse_in = (o, lse) if case != "future" else (jnp.zeros_like(o), jnp.zeros_like(lse))
    grads = bwd(q, k, v, o_in, lse_in, do)
    want = xla.block_attention_bwd(
        q, k, v, o_in, lse_in, do.astype(F32), q_start=q_start, k_start=k_start, scale=scale, block=8
    )
    for name, g, w in zip(("dq", "dk", "dv"), grads, want, strict=True):
        assert g.dtype == F32 and g.shape == w.shape
        _close(g, w, bound, name)


def test_backward_uses_the_given_statistics(rng):
    """Gradients of a part given another part's merged (o, lse): equal to the recurrence's with the
    same (o, lse), and different from the part's own (so the given statistics are really used)."""
    q, k, v, do = _inputs(rng)
    kw = dict(q_start=16, k_start=0, scale=0.5)
    o, lse = xla.block_attention_fwd(q, k, v, block=8, **kw)
    o2, lse2 = o * 0.5, lse + 0.7  # as if other keys were merged in
    got = cudnn_blocks.block_attention_bwd(q, k, v, o2, lse2, do, dense=cudnn_blocks.XLA_DENSE, **kw)
    want = xla.block_attention_bwd(q, k, v, o2, lse2, do.astype(F32), block=8, **kw)
    own = xla.block_attention_bwd(q, k, v, o, lse, do.astype(F32), block=8, **kw)
    for name, g, w, u in zip(("dq", "dk", "dv"), got, want, own, strict=True):
        _close(g, w, tol(F32, 48), name)
        assert rel_err(g, u) > 1e-2, name


@pytest.mark.parametrize("q_start,k_start", [(40, 0), (0, 8)], ids=["past-the-band", "partly-future"])
def test_misaligned_offsets_give_nan(rng, q_start, k_start):
    """A partial overlap is outside the contract: NaN outputs, statistics and dq, never a
    silently wrong block (d = 40 lies between Tk − Lq = 32 and Tk = 48; d = −8 between −Lq and 0)."""
    q, k, v, do = _inputs(rng)
    kw = dict(q_start=q_start, k_start=k_start, scale=1.0, dense=cudnn_blocks.XLA_DENSE)
    o, lse = cudnn_blocks.block_attention_fwd(q, k, v, **kw)
    assert np.all(np.isnan(np.asarray(o))) and np.all(np.isnan(np.asarray(lse)))
    o, lse = jnp.zeros(o.shape), jnp.zeros(lse.shape)
    dq = cudnn_blocks.block_attention_bwd(q, k, v, o, lse, do, **kw)[0]
    assert np.all(np.isnan(np.asarray(dq)))


def _document_ids(case, q_start, k_start, lq=16, lk=48):
    """Global non-decreasing document numbers of the query and key blocks ``[B, L]`` (batch rows
    that differ): a boundary inside the query block or not, documents crossing the block edges.
    "mixed-prefixes" (three rows, placed by the offsets): a document starting exactly at the
    queries (empty prefix), one starting 5 keys into the key block, and one document throughout."""
    cuts = {
        "one-document-queries": ([5, 100], [30, 200]),  # queries all in the last document of row 0 / 1
        "boundary-in-queries": ([21, 40], [3, 26]),
        "many-documents": ([1, 9, 12, 19, 22, 27, 29, 35, 40, 47, 70], [2, 4, 8, 16, 33, 34, 36, 90]),
        "mixed-prefixes": ([q_start], [k_start + 5] if k_start + 5 < q_start else [], []),
    }[case]
    n = max(q_start + lq, k_start + lk)
    ids = np.zeros((len(cuts), n), np.int32)
    for row, row_cuts in enumerate(cuts):
        for c in row_cuts:
            ids[row, c:] += 1
    return jnp.asarray(ids[:, q_start : q_start + lq]), jnp.asarray(ids[:, k_start : k_start + lk])


XLA_FALLBACK = (
    functools.partial(xla.block_attention_fwd, block=8),
    functools.partial(xla.block_attention_bwd, block=8),
)


def _nan_block(*args, **kwargs):
    """A fallback that must not run: NaN outputs of the block functions' shapes."""
    q, k, v = args[:3]
    b, lq, h, _ = q.shape
    if len(args) == 3:
        return jnp.full((b, lq, h, v.shape[-1]), jnp.nan), jnp.full((b, h, lq), jnp.nan)
    return tuple(jnp.full(x.shape, jnp.nan) for x in (q, k, v))


@pytest.mark.parametrize("docs", ["one-document-queries", "boundary-in-queries", "many-documents", "mixed-prefixes"])
@pytest.mark.parametrize(
    "case", ["diagonal", "prefix-and-band", "band-at-the-end", "all-visible", "far-past", "future"]
)
def test_blocks_with_documents_equal_the_recurrence(rng, case, docs):
    """Packed documents: the first document's rows see its run of earlier keys (rotated to the
    front), the band runs cuDNN's causal mask, and a pair whose queries hold a boundary the
    fallback; o, lse and the gradients given them. "mixed-prefixes" must take the cuDNN pair (its
    fallback gives NaN), with a batch row whose prefix is empty beside rows whose prefix is not."""
    q_start, k_start = OFFSETS[case]
    q_ids, k_ids = _document_ids(docs, q_start, k_start)
    q, k, v, do = _inputs(rng, b=q_ids.shape[0])
    scale = 0.3
    ids = dict(q_segment_ids=q_ids, k_segment_ids=k_ids)
    want = xla.block_attention_fwd(q, k, v, q_start=q_start, k_start=k_start, scale=scale, block=8, **ids)
    kw = dict(q_start=jnp.int32(q_start), k_start=jnp.int32(k_start), scale=scale, **ids)
    kw |= dict(dense=cudnn_blocks.XLA_DENSE, fallback=(_nan_block,) * 2 if docs == "mixed-prefixes" else XLA_FALLBACK)
    o, lse = jax.jit(functools.partial(cudnn_blocks.block_attention_fwd, **kw))(q, k, v)
    bound = tol(F32, 48)
    seen = np.isfinite(np.asarray(want[1]))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
    _close(o, want[0], bound, "o")
    _close(np.where(seen, lse, 0.0), np.where(seen, want[1], 0.0), bound, "lse")
    o_in, lse_in = o + 0.05, jnp.where(jnp.isfinite(lse), lse, 0.0) + 0.1  # any final statistics
    grads = jax.jit(functools.partial(cudnn_blocks.block_attention_bwd, **kw))(q, k, v, o_in, lse_in, do)
    want = xla.block_attention_bwd(
        q, k, v, o_in, lse_in, do.astype(F32), q_start=q_start, k_start=k_start, scale=scale, block=8, **ids
    )
    for name, g, w in zip(("dq", "dk", "dv"), grads, want, strict=True):
        _close(g, w, bound, name)


def test_documents_need_sorted_numbers_and_a_fallback(rng):
    q, k, v, _ = _inputs(rng)
    ids = jnp.zeros(q.shape[:2], jnp.int32)
    with pytest.raises(ValueError, match="non-decreasing global document numbers"):
        cudnn_blocks.block_attention_fwd(q, k, v, q_start=0, k_start=0, scale=1.0, q_segment_ids=ids, k_segment_ids=ids)
    with pytest.raises(ValueError, match="go together"):
        cudnn_blocks.block_attention_fwd(q, k, v, q_start=0, k_start=0, scale=1.0, q_segment_ids=ids)


@pytest.mark.parametrize("causal,kv_len", [(True, None), (False, None), (False, 20)], ids=["causal", "full", "padded"])
def test_dense_twin_equals_autodiff(rng, causal, kv_len):
    """The jnp twin of cuDNN's two calls: forward against the dense reference, backward (given its
    own o and lse) against autodiff of it."""
    q, k, v, do = _inputs(rng, lq=24, lk=24)
    scale = 0.4
    kw = dict(scale=scale, causal=causal, kv_len=None if kv_len is None else jnp.full((2,), kv_len, jnp.int32))
    o, lse = cudnn_blocks.xla_dense_fwd(q, k, v, **kw)
    k_used, v_used = (k, v) if kv_len is None else (k[:, :kv_len], v[:, :kv_len])
    q_start = 0 if causal else 10**6  # no mask: queries far in the keys' future
    ref = functools.partial(block_attention, q_start=q_start, k_start=0, scale=scale)
    o_w, vjp = jax.vjp(lambda *x: ref(*x)[0], q, k_used, v_used)
    _close(o, o_w, tol(F32, 24), "o")
    _close(lse, ref(q, k_used, v_used)[1], tol(F32, 24), "lse")
    dq, dk, dv = cudnn_blocks.xla_dense_bwd(q, k, v, o, lse, do, **kw)
    dq_w, dk_w, dv_w = vjp(do)
    if kv_len is not None:  # keys past the length get nothing
        assert np.all(np.asarray(dk[:, kv_len:]) == 0) and np.all(np.asarray(dv[:, kv_len:]) == 0)
        dk, dv = dk[:, :kv_len], dv[:, :kv_len]
    for name, g, w in (("dq", dq, dq_w), ("dk", dk, dk_w), ("dv", dv, dv_w)):
        _close(g, w, tol(F32, 24), name)


# ---- on a GPU: cuDNN itself ---------------------------------------------------------------------

GPU_SHAPES = {  # b, lq, lk, h, hk, d, dtype
    "gqa-d128-bf16": (2, 256, 768, 8, 2, 128, jnp.bfloat16),
    "mha-d64-bf16": (1, 512, 1024, 4, 4, 64, jnp.bfloat16),
    "mqa-d128-fp16": (1, 256, 512, 8, 1, 128, jnp.float16),
}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "causal,lengths",
    [(True, None), (False, None), (False, (300, None)), (False, (300, 100))],
    ids=["causal", "full", "padded-keys", "padded-rows"],
)
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_cudnn_calls_equal_the_twin(rng, shape, causal, lengths):
    """cuDNN's forward (o, lse: natural log of the scaled logits) and its backward given o and lse,
    against the jnp twin; with per-row key and query lengths (the padding mask), rows past the
    query length compared as the block functions use them (masked)."""
    b, lq, lk, h, hk, d, dtype = GPU_SHAPES[shape]
    lk = lq if causal else lk
    q, k, v, do = _inputs(rng, b=b, lq=lq, lk=lk, h=h, hk=hk, d=d, e=d, dtype=dtype)
    kv_len, q_len = lengths or (None, None)
    per_row = lambda n: None if n is None else jnp.asarray([n - 7 * i for i in range(b)], jnp.int32)  # noqa: E731
    kw = dict(scale=d**-0.5, causal=causal, kv_len=per_row(kv_len), q_len=per_row(q_len))
    o, lse = jax.jit(functools.partial(cudnn_blocks.cudnn_fwd, **kw))(q, k, v)
    o_w, lse_w = cudnn_blocks.xla_dense_fwd(q, k, v, **kw)
    rows = np.ones((b, lq), bool) if q_len is None else np.arange(lq)[None] < np.asarray(kw["q_len"])[:, None]
    _close(np.asarray(o.astype(F32))[rows], np.asarray(o_w.astype(F32))[rows], 2e-2, "o")
    _close(np.asarray(lse).transpose(0, 2, 1)[rows], np.asarray(lse_w).transpose(0, 2, 1)[rows], 1e-3, "lse")
    lse_in = jnp.where(jnp.isfinite(lse_w), lse_w, 0.0)
    grads = jax.jit(functools.partial(cudnn_blocks.cudnn_bwd, **kw))(q, k, v, o_w, lse_in, do)
    want = cudnn_blocks.xla_dense_bwd(q, k, v, o_w, lse_in, do, **kw)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want, strict=True):
        g, w = np.asarray(g.astype(F32)), np.asarray(w.astype(F32))
        if name == "dq":
            g, w = g[rows], w[rows]
        elif kv_len is not None:
            keys = np.arange(lk)[None] < np.asarray(kw["kv_len"])[:, None]
            g, w = g[keys], w[keys]
        _close(g, w, 3e-2, name)


@pytest.mark.gpu
@pytest.mark.parametrize("docs", [None, "boundary", "long-document"])
@pytest.mark.parametrize("case", ["diagonal", "prefix-and-band", "all-visible"])
def test_cudnn_blocks_equal_the_recurrence(rng, case, docs):
    """The block functions as ``block_functions("cudnn_blocks", documents_sorted=True)`` gives them
    (cuDNN, the Pallas kernels for bands with a document boundary), bf16, against the jnp recurrence."""
    q_start, k_start = {"diagonal": (512, 512), "prefix-and-band": (1024, 0), "all-visible": (4096, 0)}[case]
    lk = 2048 if case != "diagonal" else 512
    q, k, v, do = _inputs(rng, b=2, lq=512, lk=lk, h=8, hk=2, d=128, e=128)
    q, k, v, do = (x.astype(jnp.bfloat16) for x in (q, k, v, do))
    ids = {}
    if docs is not None:  # row 0: boundaries before and inside the queries; row 1: one long document
        cuts = {"boundary": ([300, 1100, 1300], [700, 4300]), "long-document": ([100], [50, 2000])}[docs]
        full = np.zeros((2, 4608), np.int32)
        for row, row_cuts in enumerate(cuts):
            for c in row_cuts:
                full[row, c:] += 1
        ids = dict(
            q_segment_ids=jnp.asarray(full[:, q_start : q_start + 512]),
            k_segment_ids=jnp.asarray(full[:, k_start : k_start + lk]),
        )
    scale = 128**-0.5
    kw = dict(q_start=jnp.int32(q_start), k_start=jnp.int32(k_start), scale=scale, **ids)
    o_w, lse_w = xla.block_attention_fwd(q, k, v, block=256, **kw)
    fwd, bwd = block_functions("cudnn_blocks", documents_sorted=True)
    o, lse = jax.jit(functools.partial(fwd, **kw))(q, k, v)
    _close(o, o_w, 2e-2, "o")
    seen = np.isfinite(np.asarray(lse_w))  # rows whose document starts after these keys see none
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
    _close(np.where(seen, lse, 0.0), np.where(seen, lse_w, 0.0), 1e-3, "lse")
    lse_in = jnp.where(seen, lse_w, 0.0)  # the final statistics of a causal layer are finite
    grads = jax.jit(functools.partial(bwd, **kw))(q, k, v, o_w, lse_in, do)
    want = xla.block_attention_bwd(q, k, v, o_w, lse_in, do.astype(F32), block=256, **kw)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want, strict=True):
        _close(g, w, 3e-2, name)
