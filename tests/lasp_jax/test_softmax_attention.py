"""lasp_jax.softmax_attention against float64 single-device causal attention, shard by shard.

Every (data, sequence) shard of the output and of dq, dk, dv, on fresh random inputs each run, for
both strategies on dp×sp meshes of the 8 fake CPU devices, through jit and grad; the collectives
each strategy is built on, read from the lowered program; and each bad input.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from lasp_jax import softmax_attention
from lasp_jax.softmax import api as softmax_api
from lasp_jax.softmax import causal_attention, softmax_attention_shard
from lasp_jax.softmax.deal import Deal
from pallas_kernels.flash_attention.reference import causal_attention as reference_causal_attention
from tests.helpers import rel_err, tol, x64

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f64": jnp.float64}


def _mesh(dp: int, sp: int, names=("dp", "sp")) -> Mesh:
    if len(jax.devices()) < dp * sp:
        pytest.skip(f"needs {dp * sp} devices")
    return Mesh(np.array(jax.devices()[: dp * sp]).reshape(dp, sp), names)


def _inputs(rng, *, b, t, h, hk, d, e=None):
    e = e or d
    q = rng.standard_normal((b, t, h, d))
    k = rng.standard_normal((b, t, hk, d))
    v = rng.standard_normal((b, t, hk, e))
    do = rng.standard_normal((b, t, h, e))
    return q, k, v, do


def _value_and_grads(attn, q, k, v, do):
    """o and the gradients of <o, do> w.r.t. q, k, v, all under one jit."""

    def loss(q, k, v):
        o = attn(q, k, v)
        return jnp.sum(o.astype(do.dtype) * do), o

    @jax.jit
    def run(q, k, v):
        (dq, dk, dv), o = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return {"o": o, "dq": dq, "dk": dk, "dv": dv}

    return run(q, k, v)


def _reference_grads(q, k, v, do, segment_ids, *, scale):
    o, vjp = jax.vjp(functools.partial(reference_causal_attention, scale=scale, segment_ids=segment_ids), q, k, v)
    dq, dk, dv = vjp(do)
    return {"o": o, "dq": dq, "dk": dk, "dv": dv}


_reference_grads_jit = jax.jit(_reference_grads, static_argnames="scale")


def _reference(q, k, v, do, scale=None, segment_ids=None, *, jit=False):
    """Float64 oracle, eager: its primitives compile once per shape and serve every test of that shape.
    ``jit``: one program instead, cheaper for shapes seen once (each document alone)."""
    fn = _reference_grads_jit if jit else _reference_grads
    with x64():
        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v, do)]
        ids = None if segment_ids is None else jnp.asarray(segment_ids)
        return {n: np.asarray(x) for n, x in fn(*args, ids, scale=scale).items()}


def _check(rng, attn, *, dtype=jnp.float32, dp=1, sp=1, b=2, t=32, h=4, hk=2, d=8, e=None, segment_ids=None):
    """attn(q, k, v) in ``dtype`` against the float64 oracle on every (batch, sequence) shard
    (with ``segment_ids`` ``[B, T]``: passed to ``attn`` and to the oracle's document mask).

    ``attn`` must use the oracle's default scale unless the caller passes the same one to both.
    """
    q, k, v, do = _inputs(rng, b=b, t=t, h=h, hk=hk, d=d, e=e)
    if dtype != jnp.float64:  # round to the dtype under test first so the reference sees the same inputs
        q, k, v = (np.asarray(jnp.asarray(x, dtype)).astype(np.float64) for x in (q, k, v))
    want = _reference(q, k, v, do, getattr(attn, "keywords", {}).get("scale"), segment_ids)
    if segment_ids is not None:
        attn = functools.partial(attn, segment_ids=jnp.asarray(segment_ids))
    with x64() if dtype == jnp.float64 else contextlib.nullcontext():
        cot = jnp.float64 if dtype == jnp.float64 else jnp.float32
        got = _value_and_grads(attn, *(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(do, cot))
        got = {n: (x.dtype, np.asarray(x.astype(cot))) for n, x in got.items()}
    bound = tol(dtype, t)
    for name in want:
        assert got[name][0] == dtype, (name, got[name][0])
        for bi in range(dp):
            for r in range(sp):
                rows = slice(bi * b // dp, (bi + 1) * b // dp)
                cols = slice(r * t // sp, (r + 1) * t // sp)
                a, w = got[name][1][rows, cols], want[name][rows, cols]
                # a reference of exactly zero (dk when every row sees one key): absolute error
                err = float(np.abs(a).max()) if np.linalg.norm(w) < 1e-12 else rel_err(a, w)
                assert err < bound, f"{name} on shard (dp={bi}, sp={r}): err {err:.2e} >= {bound:.2e}"


# --- sequence-parallel strategies on dp×sp meshes -----------------------------------------------

MESHES = [(1, 2), (1, 4), (1, 8), (2, 4), (4, 2)]


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
@pytest.mark.parametrize("dp,sp", MESHES, ids=[f"dp{a}xsp{b}" for a, b in MESHES])
def test_strategies_match_single_device(rng, strategy, dp, sp):
    mesh = _mesh(dp, sp)
    # block_size 4 splits each shard into several query/key blocks (t/sp = 16, 8 or 4 tokens)
    attn = functools.partial(softmax_attention, mesh=mesh, batch_axis="dp", strategy=strategy, impl="xla", block_size=4)
    _check(rng, attn, dp=dp, sp=sp, b=4, t=32, h=4, hk=2)


PALLAS_MESHES = [(1, 2), (1, 4)]


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
@pytest.mark.parametrize("dp,sp", PALLAS_MESHES, ids=[f"dp{a}xsp{b}" for a, b in PALLAS_MESHES])
def test_pallas_block_compute(rng, strategy, dp, sp):
    """impl="pallas": the Pallas Triton flash-attention kernels (interpreted on CPU) as every block's compute.

    24 tokens per shard pad to two 16-row kernel blocks, so each shard has diagonal, fully visible,
    padded and (allgather: gathered keys of later ranks) future key blocks; grouped heads, E != D."""
    mesh = _mesh(dp, sp)
    attn = functools.partial(softmax_attention, mesh=mesh, batch_axis="dp", strategy=strategy, impl="pallas")
    _check(rng, attn, dp=dp, sp=sp, b=dp, t=24 * sp, h=4, hk=2, d=16, e=8)


def test_pallas_bf16_ring(rng):
    """bf16 through the kernels, MQA, a scale of the caller's; 21 tokens per shard (masked tail keys)."""
    mesh = _mesh(1, 2)
    attn = functools.partial(softmax_attention, mesh=mesh, strategy="ring", impl="pallas", scale=0.3)
    _check(rng, attn, dtype=jnp.bfloat16, sp=2, b=1, t=42, h=2, hk=1, d=16)


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
@pytest.mark.parametrize("h,hk,d,e", [(4, 1, 8, 8), (6, 2, 8, 4)], ids=["mqa", "gqa3-e4"])
def test_heads_and_value_dims(rng, strategy, h, hk, d, e):
    mesh = _mesh(1, 4)
    attn = functools.partial(softmax_attention, mesh=mesh, strategy=strategy, impl="xla", scale=0.7)
    _check(rng, attn, sp=4, b=1, t=24, h=h, hk=hk, d=d, e=e)


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
@pytest.mark.parametrize("dtype", ["bf16", "f64"])
def test_dtypes(rng, strategy, dtype):
    mesh = _mesh(2, 2)
    attn = functools.partial(softmax_attention, mesh=mesh, batch_axis="dp", strategy=strategy, block_size=4)
    _check(rng, attn, dtype=DTYPES[dtype], dp=2, sp=2, b=2, t=16, h=4, hk=2, d=16)


@pytest.mark.parametrize("dp,sp", [(1, 8), (2, 2)], ids=["dp1xsp8", "dp2xsp2"])
def test_allgather_dot_product_attention_path(rng, dp, sp):
    """The cuDNN code path (global-position mask, re-gather + recompute backward) with XLA's kernel."""
    mesh = _mesh(dp, sp)
    attn = functools.partial(softmax_attention, mesh=mesh, batch_axis="dp", strategy="allgather", impl="dpa_xla")
    _check(rng, attn, dp=dp, sp=sp, b=2, t=32, h=4, hk=2)


SINGLE = [
    ("xla", 37, 8, 2),
    ("xla", 48, 16, 4),
    ("xla", 1, 4, 2),
    ("dpa_xla", 37, 8, 2),
    ("dpa_xla", 1, 4, 4),
    ("pallas", 37, 8, 2),
]


@pytest.mark.parametrize("impl,t,block,hk", SINGLE, ids=[f"{i}-t{t}-block{b}-hk{hk}" for i, t, b, hk in SINGLE])
def test_single_device(rng, impl, t, block, hk):
    """mesh=None and causal_attention: odd lengths (37 is no multiple of the block: one block), several blocks."""
    fn = softmax_attention if hk == 2 else causal_attention
    kwargs = {"mesh": None} if fn is softmax_attention else {}
    _check(rng, functools.partial(fn, impl=impl, block_size=block, **kwargs), b=2, t=t, h=4, hk=hk)


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_shard_function_inside_user_shard_map(rng, strategy):
    """The per-shard function knows only an axis name; here the user's mesh names it "seq"."""
    mesh = _mesh(2, 4, names=("data", "seq"))
    spec = PartitionSpec("data", "seq")
    shard_fn = functools.partial(softmax_attention_shard, axis_name="seq", strategy=strategy, block_size=2)
    attn = jax.shard_map(shard_fn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    _check(rng, attn, dp=2, sp=4, b=2, t=16, h=4, hk=2)


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu-backend", "gpu-backend"])
def test_auto_picks_the_block_compute(monkeypatch, on_gpu):
    """impl="auto": on a GPU, cuDNN per block pair under a mesh (every strategy, with or without
    documents) and cuDNN's own causal mask on one device without documents, where cuDNN takes the
    input; the Pallas kernels on one device with documents or where cuDNN does not take it; the jnp
    recurrence on CPU and for float64."""
    monkeypatch.setattr(softmax_api, "on_gpu", lambda: on_gpu)
    resolve = softmax_api.resolve_impl
    q, k, v = _arrays(dtype=jnp.bfloat16)
    kernel = "pallas" if on_gpu else "xla"
    assert resolve("auto", q, k, v, n_keys=None) == ("cudnn_blocks" if on_gpu else "xla")  # under a mesh
    assert resolve("auto", q, k, v, n_keys=None, documents=True) == ("cudnn_blocks" if on_gpu else "xla")
    assert resolve("auto", q, k, v[..., :4], n_keys=None) == kernel  # E != D: no cuDNN
    assert resolve("auto", q.astype(jnp.float32), k, v, n_keys=None) == kernel  # float32: no cuDNN
    assert resolve("auto", q, k, v, n_keys=16) == ("cudnn" if on_gpu else "xla")
    assert resolve("auto", q, k, v, n_keys=16, documents=True) == kernel  # one device, documents
    assert resolve("auto", q, k, v[..., :4], n_keys=16) == kernel  # E != D: no cuDNN
    with x64():
        assert resolve("auto", *_arrays(dtype=jnp.float64), n_keys=None) == "xla"


def test_auto_with_documents_on_one_gpu(monkeypatch):
    """One device, ``impl="auto"`` and packed documents on a GPU: the Pallas kernels (cuDNN's block
    calls take no documents), not an error; checked through the public function's own choice."""
    monkeypatch.setattr(softmax_api, "on_gpu", lambda: True)
    chosen = []
    monkeypatch.setattr(softmax_api.flash_pallas, "flash_attention", lambda *a, **kw: chosen.append("pallas"))
    q, k, v = _arrays(dtype=jnp.bfloat16)
    causal_attention(q, k, v, impl="auto", segment_ids=jnp.zeros(q.shape[:2], jnp.int32))
    assert chosen == ["pallas"]


# --- packed documents (segment_ids) ---------------------------------------------------------------


def _documents(rng, b, t, sp):
    """``[B, T]`` ids with boundaries at a shard edge, a half-shard edge (where the balanced
    allgather splits), mid-shard, a one-token document and a random place; even rows count up,
    odd rows alternate 0/1 (equal ids in separate runs are separate documents)."""
    length = t // sp
    cuts = [
        {length, length + length // 2, 2 * length + 1, 2 * length + 2},  # shard edge, half edge, 1-token doc
        {1, length // 2, t - 1, int(rng.integers(2, t - 1))},  # 1-token first and last documents
    ]
    ids = np.zeros((b, t), np.int32)
    for row in range(b):
        for c in cuts[row % 2]:
            if 0 < c < t:
                ids[row, c:] += 1
        if row % 2:
            ids[row] %= 2
    return ids


def _runs(ids_row):
    """Document number of each token of one row: +1 wherever the id changes."""
    return np.concatenate([[0], np.cumsum(ids_row[1:] != ids_row[:-1])])


def test_document_oracle_equals_documents_alone(rng):
    """The oracle's document mask is each document run alone (outputs and gradients)."""
    b, t = 2, 24
    q, k, v, do = _inputs(rng, b=b, t=t, h=4, hk=2, d=8)
    ids = _documents(rng, b, t, sp=2)
    packed = _reference(q, k, v, do, segment_ids=ids, jit=True)
    assert len(np.unique(ids[1])) < len(np.unique(_runs(ids[1])))  # a repeated id in separate runs
    for row in range(b):
        runs = _runs(ids[row])
        for doc in np.unique(runs):
            sel = np.flatnonzero(runs == doc)
            part = [x[row : row + 1, sel] for x in (q, k, v, do)]
            alone = _reference(*part, jit=True)
            for name in alone:
                np.testing.assert_allclose(packed[name][row : row + 1, sel], alone[name], rtol=1e-12, atol=1e-12)


DOC_STRATEGIES = [("allgather", None), ("allgather", False), ("ring", None), ("ring", False)]
DOC_MESHES = [("xla", 1, 8), ("xla", 2, 4), ("pallas", 1, 4)]


@pytest.mark.parametrize("impl,dp,sp", DOC_MESHES, ids=[f"{i}-dp{a}xsp{b}" for i, a, b in DOC_MESHES])
@pytest.mark.parametrize(
    "strategy,balance",
    DOC_STRATEGIES,
    ids=["allgather-balanced", "allgather-contiguous", "ring-balanced", "ring-contiguous"],
)
def test_packed_documents_every_shard(rng, strategy, balance, impl, dp, sp):
    """Packed rows under sp: every shard's o, dq, dk, dv equal the oracle that masks documents,
    with boundaries at shard and half-shard edges, mid-shard, and one-token documents."""
    mesh = _mesh(dp, sp)
    t = 8 * sp if impl == "xla" else 16 * sp
    attn = functools.partial(
        softmax_attention, mesh=mesh, batch_axis="dp", strategy=strategy, impl=impl, balance=balance, block_size=4
    )
    b = 2 * dp
    _check(rng, attn, dp=dp, sp=sp, b=b, t=t, h=4, hk=2, d=16, e=8, segment_ids=_documents(rng, b, t, sp))


@pytest.mark.parametrize("impl", ["xla", "pallas", "dpa_xla"])
def test_packed_documents_single_device(rng, impl):
    attn = functools.partial(causal_attention, impl=impl, block_size=4)
    _check(rng, attn, b=2, t=24, h=4, hk=2, d=16, segment_ids=_documents(rng, 2, 24, sp=2))


def test_packed_documents_cudnn_allgather_path(rng):
    """The dense-mask path (impl="dpa_xla", cuDNN's code path) with documents under sp=4."""
    mesh = _mesh(1, 4)
    attn = functools.partial(softmax_attention, mesh=mesh, strategy="allgather", impl="dpa_xla")
    _check(rng, attn, sp=4, b=2, t=32, h=4, hk=2, d=8, segment_ids=_documents(rng, 2, 32, sp=4))


def test_bad_segment_ids():
    q, k, v = _arrays()
    with pytest.raises(TypeError, match=r"segment_ids must be an integer array"):
        softmax_attention(q, k, v, mesh=None, segment_ids=jnp.zeros(q.shape[:2], jnp.float32))
    with pytest.raises(ValueError, match=r"segment_ids"):
        softmax_attention(q, k, v, mesh=None, segment_ids=jnp.zeros((2, 8), jnp.int32))


# --- the collectives each strategy is built on ---------------------------------------------------


def _collectives(strategy, mesh, t=16, **kwargs):
    """Collective and loop ops in the lowered forward and forward+backward programs."""
    attn = functools.partial(softmax_attention, mesh=mesh, strategy=strategy, impl="xla", **kwargs)
    x = jnp.zeros((1, t, 4, 8), jnp.float32)
    kv = jnp.zeros((1, t, 2, 8), jnp.float32)
    grad = jax.grad(lambda q, k, v: attn(q, k, v).sum(), argnums=(0, 1, 2))
    ops = r'"?stablehlo\.(all_gather|reduce_scatter|collective_permute|all_reduce|all_to_all)"?'
    return [collections.Counter(re.findall(ops, jax.jit(f).lower(x, kv, kv).as_text())) for f in (attn, grad)]


def _sp_mesh(sp):
    """A mesh with the sequence axis only (no other axis for shard_map to reduce cotangents over)."""
    return Mesh(np.array(jax.devices()[:sp]), ("sp",))


def test_allgather_backward_reduce_scatters():
    fwd, grad = _collectives("allgather", _sp_mesh(4), balance=False)
    assert fwd == {"all_gather": 2}  # K and V
    # backward: K and V gathered again (only the local K/V are kept), dK and dV reduce-scattered
    assert grad == {"all_gather": 4, "reduce_scatter": 2}


def test_balanced_allgather_deals_queries():
    """The default: the same gathers, plus the query halves dealt out and the outputs dealt back
    (forward), dO dealt out and dq dealt back (backward): two ``ppermute``s each (the grad-only
    program drops the outputs' return trip: 6)."""
    fwd, grad = _collectives("allgather", _sp_mesh(4))
    assert fwd == {"all_gather": 2, "collective_permute": 4}
    assert grad == {"all_gather": 4, "reduce_scatter": 2, "collective_permute": 6}


@pytest.mark.parametrize("sp", [2, 4, 8])
def test_balanced_deal_is_a_permutation_with_equal_work(sp):
    """Every chunk computed exactly once; every rank attends 2P chunk pairs (contiguous: 4r + 2)."""
    mesh = _sp_mesh(sp)

    def chunks(x):
        plan = Deal.of("sp")
        sent = sorted(t for _, t in plan.to_lo) + sorted(t for _, t in plan.to_hi)
        assert sent == list(range(sp)) * 2  # each perm reaches every rank once
        return jnp.stack([plan.c_lo, plan.c_hi])[None]

    got = np.asarray(
        jax.shard_map(chunks, mesh=mesh, in_specs=PartitionSpec("sp"), out_specs=PartitionSpec("sp"))(jnp.zeros(sp))
    )
    assert sorted(got.ravel().tolist()) == list(range(2 * sp))
    assert got[:, 0].tolist() == [c if c % 2 == 0 else 2 * sp - 1 - c for c in range(sp)]
    pairs = [(a + 0.5) + (b + 0.5) for a, b in got]  # chunk c attends c full chunks and half of itself
    assert pairs == [2 * sp] * sp


@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_balanced_and_contiguous(rng, strategy, impl, balance):
    """Both query layouts of both strategies, every shard against the oracle (sp=4, grouped heads)."""
    mesh = _mesh(1, 4)
    attn = functools.partial(softmax_attention, mesh=mesh, strategy=strategy, impl=impl, balance=balance, block_size=4)
    _check(rng, attn, sp=4, b=1, t=64, h=4, hk=2, d=16, e=8)


def test_allgather_odd_local_length_stays_contiguous(rng):
    """balance=None with an odd local length (7 tokens per shard) runs the contiguous layout."""
    mesh = _mesh(1, 2)
    assert _collectives("allgather", _sp_mesh(2), t=14)[1] == {"all_gather": 4, "reduce_scatter": 2}  # nothing dealt
    attn = functools.partial(softmax_attention, mesh=mesh, strategy="allgather", impl="xla")
    _check(rng, attn, sp=2, b=1, t=14, h=2, hk=1, d=8)


def test_ring_passes_blocks_and_accumulators():
    fwd, grad = _collectives("ring", _sp_mesh(4), balance=False)
    assert fwd == {"collective_permute": 2}  # K and V, in the loop body (P-1 hops)
    # forward (2) + backward loop body: K, V, dK, dV (4) + the P-th hop of dK, dV (2)
    assert grad == {"collective_permute": 8}
    # balanced (the default): + the query halves dealt and the outputs dealt back (forward: 4), + dO
    # dealt and dq dealt back (backward; the grad-only program drops the outputs' return trip)
    fwd, grad = _collectives("ring", _sp_mesh(4))
    assert fwd == {"collective_permute": 6}
    assert grad == {"collective_permute": 14}


# --- zig-zag ring and TokenRing -------------------------------------------------------------------

# strategy, balance, impl, dp, sp: every shard of o, dq, dk, dv against the oracle, with packed documents
# (the long ones, covering no code path the others miss, are in tests/conftest.py's SLOW set)
RING_FAMILY = [
    ("tokenring", None, "xla", 2, 4),
    ("tokenring", False, "xla", 1, 2),
    ("zigzag_ring", None, "xla", 1, 4),
    ("tokenring", False, "xla", 1, 4),
    ("zigzag_ring", None, "xla", 2, 2),
    ("tokenring", None, "pallas", 1, 2),
    ("zigzag_ring", None, "pallas", 1, 2),
]


@pytest.mark.parametrize(
    "strategy,balance,impl,dp,sp",
    RING_FAMILY,
    ids=[f"{s}-{'contiguous' if b is False else 'balanced'}-{i}-dp{a}xsp{p}" for s, b, i, a, p in RING_FAMILY],
)
def test_tokenring_and_zigzag_ring_every_shard(rng, strategy, balance, impl, dp, sp):
    """TokenRing (queries out, partial outputs back) and the zig-zag ring (K/V dealt as half-shards)
    against the float64 oracle on every shard, balanced and contiguous, grouped heads, E != D, with
    packed documents (boundaries at shard and half-shard edges, one-token documents)."""
    mesh = _mesh(dp, sp)
    t = (8 if impl == "xla" else 16) * sp
    attn = functools.partial(
        softmax_attention, mesh=mesh, batch_axis="dp", strategy=strategy, impl=impl, balance=balance, block_size=4
    )
    b = 2 * dp
    _check(rng, attn, dp=dp, sp=sp, b=b, t=t, h=4, hk=2, d=16, e=8, segment_ids=_documents(rng, b, t, sp))


def test_tokenring_with_heads_over_a_tp_axis(rng):
    """``head_axis`` as for the other strategies: heads split over "tp" (one query group of 2 with its
    KV head per tp rank), TokenRing over "sp" only; every shard against the oracle."""
    _mesh(1, 4)  # skips without 4 devices
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("sp", "tp"))
    attn = functools.partial(softmax_attention, mesh=mesh, head_axis="tp", strategy="tokenring", impl="xla")
    _check(rng, attn, sp=2, b=1, t=16, h=4, hk=2, d=8)


@pytest.mark.parametrize("sp", [2, 4, 8])
def test_dealt_keys_give_every_ring_step_equal_work(sp):
    """With queries and K/V both dealt (zig-zag ring, balanced TokenRing), at every step every rank
    meets the same number of visible chunk pairs (a diagonal pair counts ½): 2, where the plain
    ring's contiguous K/V blocks give steps of 0 to 4 chunk pairs."""
    from lasp_jax.softmax.deal import dealt_chunks

    def pairs(q_chunks, k_chunks):
        return sum(1.0 if a > c else 0.5 if a == c else 0.0 for a in q_chunks for c in k_chunks)

    chunks = [tuple(map(int, dealt_chunks(r, sp))) for r in range(sp)]
    for step in range(sp):
        dealt = [pairs(chunks[r], chunks[(r - step) % sp]) for r in range(sp)]
        assert dealt == [2.0] * sp, (step, dealt)
    plain = {pairs(chunks[r], (2 * s, 2 * s + 1)) for r in range(sp) for s in range(sp)}
    assert len(plain) > 1  # the plain ring's (balanced queries, contiguous K/V) steps are unequal


@pytest.mark.parametrize("sp", [2, 4, 8])
def test_zigzag_ring_slots_hold_the_same_work_on_every_rank(sp):
    """The zig-zag ring's (query part, key part) slots, as its code forms them on each rank
    (``query_parts`` → ``ring.ascending``, ``ring.held_parts``): at step 0 every slot holds the same
    kind of pair on every rank (diagonal, skipped, full, diagonal), and at every step the
    (lo, hi) slot is skipped and the (hi, lo) one full everywhere, so a hand-over between slots
    waits for nobody (the deal's own order gave odd ranks their halves reversed: ~30 ms per step on
    2×H200)."""
    from lasp_jax.softmax import ring
    from lasp_jax.softmax.deal import query_parts

    half = 4
    x = jnp.zeros((1, 2 * half * sp, 1, 1))

    def kinds(x):  # [1, steps, 4]: 0 skipped, 1 diagonal, 2 full per slot
        rank = jax.lax.axis_index("sp")
        _, parts = query_parts(x, None, "sp", True)
        parts = ring.ascending(parts, rank)
        rows = []
        for step in range(sp):
            keys = ring.held_parts(step, ring.HeldBlock(x, x, None), True, "sp")
            row = []
            for q in parts:
                for k in keys:
                    row.append(jnp.where(k.start > q.start, 0, jnp.where(k.start == q.start, 1, 2)))
            rows.append(jnp.stack(row))
        return jnp.stack(rows)[None]

    spec = PartitionSpec(None, "sp")
    got = np.asarray(jax.shard_map(kinds, mesh=_sp_mesh(sp), in_specs=spec, out_specs=PartitionSpec("sp"))(x))
    assert (got[:, 0] == [1, 0, 2, 1]).all(), got[:, 0]
    assert (got[:, :, 1] == 0).all() and (got[:, 1:, 2] == 2).all()
    assert (got.sum(axis=2) == 4).all()  # two full pairs' worth per rank and step (diagonal: half)


def test_tokenring_and_zigzag_ring_collectives():
    """One ``collective_permute`` per array sent. TokenRing at P = 4, unrolled: per step the queries
    forward and the partial (o, lse) back; K/V never move except to be dealt. The zig-zag ring: the
    balanced ring's, plus K and V dealt, its dK/dV accumulators as two halves, dK and dV dealt back."""
    fwd, grad = _collectives("tokenring", _sp_mesh(4), balance=False)
    assert fwd == {"collective_permute": 3 + 3 * 2}  # q forward 3 times, (o, lse) back from 3 ranks
    # + backward: (q, o, lse, dO) forward 3 times, the dq partials back 3 times
    assert grad == {"collective_permute": 9 + 3 * 4 + 3}
    fwd, grad = _collectives("tokenring", _sp_mesh(4))
    # balanced: q halves dealt (2), K and V dealt (4), two halves travel (6) and come back with
    # their lse (12), outputs dealt back (2)
    assert fwd == {"collective_permute": 2 + 4 + 6 + 12 + 2}
    # + backward: dO dealt (2), two halves of (q, o, lse, dO) travel (24), dq back (6), dq, dK and dV
    # dealt back (6); the grad-only program drops the outputs' return trip (2)
    assert grad == {"collective_permute": 26 + 2 + 24 + 6 + 6 - 2}
    fwd, grad = _collectives("zigzag_ring", _sp_mesh(4))
    assert fwd == {"collective_permute": 6 + 4}  # the balanced ring's, and the K, V halves dealt
    # the balanced ring's 14, K and V dealt (4), dK/dV halves in the loop and the last hop (+4), dealt back (4)
    assert grad == {"collective_permute": 14 + 4 + 4 + 4}


# --- bad input ------------------------------------------------------------------------------------


def _arrays(b=2, t=16, h=4, hk=2, d=8, dtype=jnp.float32):
    return jnp.zeros((b, t, h, d), dtype), jnp.zeros((b, t, hk, d), dtype), jnp.zeros((b, t, hk, d), dtype)


@pytest.mark.parametrize(
    "kwargs,arrays,error,match",
    [
        ({"mesh": "1x8"}, {"t": 12}, ValueError, r"T=12, mesh.shape\['sp'\]=8"),
        ({"mesh": "1x8", "seq_axis": "seq"}, {}, ValueError, r"seq_axis='seq' is not an axis of the mesh"),
        ({"mesh": "1x8", "batch_axis": "data"}, {}, ValueError, r"batch_axis='data' is not an axis"),
        ({"mesh": "4x2", "batch_axis": "dp"}, {"b": 2}, ValueError, r"B=2, 'dp' has 4 devices"),
        ({"mesh": None}, {"h": 4, "hk": 3}, ValueError, r"H=4, Hk=3"),
        ({"mesh": None, "strategy": "zigzag"}, {}, ValueError, r"strategy must be one of"),
        ({"mesh": None, "impl": "flash"}, {}, ValueError, r"impl must be one of"),
        ({"mesh": "1x2", "strategy": "ring", "impl": "cudnn"}, {}, ValueError, r"strategy='ring'.*impl='cudnn'"),
        ({"mesh": "1x2", "strategy": "tokenring", "impl": "dpa_xla"}, {}, ValueError, r"'tokenring'.*impl='dpa_xla'"),
        ({"mesh": "1x2", "strategy": "zigzag_ring", "balance": False}, {}, ValueError, r"zigzag_ring.*balance=False"),
        ({"mesh": "1x2", "strategy": "zigzag_ring"}, {"t": 14}, ValueError, r"zigzag_ring.*even.*\(2, 7, 4, 8\)"),
        ({"mesh": None, "impl": "pallas"}, {"dtype": jnp.float64}, TypeError, r"impl='pallas' takes bf16.*float64"),
        ({"mesh": None, "block_size": 0}, {}, ValueError, r"block_size must be a positive int"),
        ({"mesh": None}, {"dtype": jnp.int32}, TypeError, r"q.dtype=int32"),
        ({"mesh": "1x2", "balance": True}, {"t": 14}, ValueError, r"local length must be even.*\(2, 7, 4, 8\)"),
        ({"mesh": "1x2", "balance": True, "impl": "dpa_xla"}, {}, ValueError, r"balance=True needs impl"),
        ({"mesh": None, "balance": "yes"}, {}, ValueError, r"balance must be None, True or False"),
    ],
    ids=[
        "t-not-div-sp",
        "missing-seq-axis",
        "missing-batch-axis",
        "b-not-div-dp",
        "h-not-div-hk",
        "strategy",
        "impl",
        "ring-cudnn",
        "tokenring-dpa",
        "zigzag-unbalanced",
        "zigzag-odd",
        "pallas-f64",
        "block",
        "int",
        "balance-odd",
        "balance-dpa",
        "balance-type",
    ],
)
def test_bad_input(kwargs, arrays, error, match):
    kwargs = dict(kwargs)
    if isinstance(kwargs["mesh"], str):
        dp, sp = map(int, kwargs["mesh"].split("x"))
        kwargs["mesh"] = _mesh(dp, sp)
    with x64() if arrays.get("dtype") == jnp.float64 else contextlib.nullcontext(), pytest.raises(error, match=match):
        softmax_attention(*_arrays(**arrays), **kwargs)


def test_bad_shapes():
    q, k, v = _arrays()
    with pytest.raises(ValueError, match=r"rank 4"):
        softmax_attention(q[0], k, v, mesh=None)
    with pytest.raises(ValueError, match=r"agree in batch and time"):
        softmax_attention(q, k[:, :8], v, mesh=None)
    with pytest.raises(ValueError, match=r"same heads"):
        softmax_attention(q, k, v[:, :, :1], mesh=None)
    with pytest.raises(ValueError, match=r"head dim must equal"):
        softmax_attention(q, k[..., :4], v, mesh=None)
    with pytest.raises(ValueError, match=r"impl='dpa_xla' needs equal"):
        softmax_attention(q, k, v[..., :4], mesh=None, impl="dpa_xla")
