"""Packed documents through lasp_jax (segment_ids) on 8 fake CPU devices.

The oracle runs every document of every packed row ALONE through the single-device float64 token
recurrence: documents are stacked as rows of their own, zero-padded at the end (k = v = 0 and
g = 0 leave the state unchanged, and do = 0 there, so padding changes no output, gradient or final
state), the first document of each packed row gets its initial_state, the others none, and the last
one the final state's cotangent. The sequence-parallel layer on the packed rows must give the same
outputs, every gradient (q, k, v, g, g_gamma, initial_state) and the final state, shard by shard.

Layouts put boundaries exactly at shard edges, one token either side of them, mid-chunk, at
chunk edges inside a shard, documents of length 1 (also as a row's first and last document), and
ids that come back after another document (a boundary is wherever the id changes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lasp_jax import STRATEGIES, lasp_attention, lasp_attention_shard, make_mesh
from pallas_kernels import linear_attention
from tests.helpers import x64
from tests.lasp_jax.test_lasp_attention import assert_matches, grads_fn

IMPLS = ("xla", "pallas")


def mesh_of(dp: int, sp: int):
    return make_mesh(dp, sp, devices=jax.devices()[: dp * sp])


def layout(t: int, sp: int, kind: str) -> list[int]:
    """Start of every document but the first in a row of t tokens split over sp shards."""
    length = t // sp
    if kind == "shard_edges":  # at every shard edge, mid-chunk inside shards, a length-1 document
        starts = {r * length for r in range(1, sp)} | {3, 4} | {r * length + length // 2 + 1 for r in range(sp)}
    elif kind == "edges_only":  # shards that start a document with no boundary inside, and ones continuing it
        starts = {r * length for r in range(1, sp) if r % 3 != 2}
    elif kind == "around_edges":  # first and last documents of length 1, one token either side of edge 1
        starts = {1, length - 1, length + 1, t // 2 + 3, t - 1}
    elif kind == "chunk_edges":  # the XLA path's 64-token chunk edges inside a shard, and the shard edge
        starts = {64, length, length + 64, length + 65}
    elif kind == "single":
        starts = set()
    else:
        raise ValueError(kind)
    return sorted(s for s in starts if 0 < s < t)


def segment_ids_for(rng, t: int, starts: list[int]) -> np.ndarray:
    """Random ids in [0, 3) changing exactly at ``starts`` (so ids recur across documents)."""
    ids, current = np.empty(t, np.int32), int(rng.integers(3))
    bounds = [0, *starts, t]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo:
            current = (current + 1 + int(rng.integers(2))) % 3
        ids[lo:hi] = current
    return ids


def make_case(rng, *, t, sp, kinds, h=8, hk=2, d=8, e=12, decay="g", init=True):
    b = len(kinds)
    q = rng.standard_normal((b, t, h, d))
    k = rng.standard_normal((b, t, hk, d)) / np.sqrt(d)
    v = rng.standard_normal((b, t, hk, e)) + 1.0  # an offset, so a leaked state shows
    kw = {}
    if decay == "g":
        kw["g"] = -rng.uniform(0.005, 0.05, (b, t, h))  # weak: a leaked state survives a shard
    elif decay == "g_gamma":
        kw["g_gamma"] = -rng.uniform(0.005, 0.05, (h,))
    if init:
        kw["initial_state"] = rng.standard_normal((b, h, d, e)) / np.sqrt(d)
    ids = np.stack([segment_ids_for(rng, t, layout(t, sp, kind)) for kind in kinds])
    do = rng.standard_normal((b, t, h, e))
    ds = rng.standard_normal((b, h, d, e))
    return q, k, v, kw, ids, do, ds


@functools.cache
def _oracle_fn():
    return grads_fn(lambda *a, **kws: linear_attention(*a, **kws, impl="reference"), final=True)


def documents_alone(q, k, v, kw, ids, do, ds, *, final=True):
    """Outputs and gradients of the packed loss, computed document by document (see module doc)."""
    b, t = ids.shape
    docs = []  # (row, start, end)
    for row in range(b):
        cuts = [0, *(np.flatnonzero(ids[row, 1:] != ids[row, :-1]) + 1), t]
        docs += [(row, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
    n, longest = len(docs), max(hi - lo for _, lo, hi in docs)

    def stack(x, fill=0.0):
        out = np.full((n, longest) + x.shape[2:], fill)
        for i, (row, lo, hi) in enumerate(docs):
            out[i, : hi - lo] = x[row, lo:hi]
        return out

    first = [i for i, (_, lo, _) in enumerate(docs) if lo == 0]
    last = [i for i, (_, _, hi) in enumerate(docs) if hi == t]
    state_shape = (n, q.shape[2], q.shape[3], v.shape[3])
    s0, ds_docs = np.zeros(state_shape), np.zeros(state_shape)
    if "initial_state" in kw:
        s0[first] = kw["initial_state"]
    if final:
        ds_docs[last] = ds
    # a constant decay becomes per-token g, so the padding (g = 0 there) does not decay the state
    g = np.broadcast_to(kw["g_gamma"], q.shape[:3]) if "g_gamma" in kw else kw.get("g")
    kw_docs = {"initial_state": s0} | ({"g": stack(g)} if g is not None else {})
    with x64():
        f64 = lambda x: jnp.asarray(x, jnp.float64)
        out = _oracle_fn()(
            f64(stack(q)),
            f64(stack(k)),
            f64(stack(v)),
            {n: f64(x) for n, x in kw_docs.items()},
            f64(stack(do)),
            f64(ds_docs),
        )
        out = {name: np.asarray(x, np.float64) for name, x in out.items()}

    want = {}
    for name in ("o", "dq", "dk", "dv") + (("dg",) if g is not None else ()):
        packed = np.zeros((b, t) + out[name].shape[2:])
        for i, (row, lo, hi) in enumerate(docs):
            packed[row, lo:hi] = out[name][i, : hi - lo]
        want[name] = packed
    if "g_gamma" in kw:  # shared by every token of every document: the sum over the real tokens
        want["dg_gamma"] = want.pop("dg").sum(axis=(0, 1))
    if "initial_state" in kw:
        want["dinitial_state"] = out["dinitial_state"][first]
    if final:
        want["final_state"] = out["final_state"][last]
    return want


def run_packed(
    rng,
    *,
    strategy,
    sp,
    dp=1,
    t=64,
    kinds=("shard_edges", "around_edges", "edges_only"),
    impl="xla",
    final=True,
    **shape,
):
    q, k, v, kw, ids, do, ds = make_case(rng, t=t, sp=sp, kinds=kinds, **shape)
    want = documents_alone(q, k, v, kw, ids, do, ds, final=final)
    mesh = mesh_of(dp, sp)
    batch_axis = "dp" if dp > 1 else None
    seg = jnp.asarray(ids)

    def fn(*a, **kws):
        return lasp_attention(
            *a, **kws, segment_ids=seg, mesh=mesh, batch_axis=batch_axis, strategy=strategy, impl=impl
        )

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = grads_fn(fn, final=final)(f32(q), f32(k), f32(v), {n: f32(x) for n, x in kw.items()}, f32(do), f32(ds))
    got = {n: np.asarray(x, np.float64) for n, x in got.items()}
    if not final:
        want.pop("final_state", None)
    assert_matches(got, want, sp=sp, label=f"packed {strategy} dp={dp} sp={sp} {kinds} impl={impl}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sp", [2, 4, 8], ids=lambda sp: f"sp{sp}")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_packed_rows_equal_documents_alone(rng, strategy, sp, impl):
    """Per-token g, initial and final state: boundaries at and around shard edges, length-1 documents.

    With sp=2 the shards are 128 tokens, two 64-token chunks of the XLA path, and one row puts
    boundaries at those chunk edges inside the shards.
    """
    if sp == 2:
        run_packed(
            rng, strategy=strategy, sp=sp, impl=impl, t=256, kinds=("shard_edges", "chunk_edges", "edges_only"), h=4
        )
    else:
        run_packed(rng, strategy=strategy, sp=sp, impl=impl)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_constant_decay_on_a_data_by_sequence_mesh(rng, strategy):
    """g_gamma on dp=2 × sp=4 with the batch split, one row holding a single document (no boundary)."""
    kinds = ("shard_edges", "edges_only", "single", "around_edges")
    run_packed(rng, strategy=strategy, sp=4, dp=2, kinds=kinds, decay="g_gamma")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_path_without_decay_or_states(rng, strategy):
    """No decay, no initial state, no final state requested (a packed language-model batch)."""
    run_packed(rng, strategy=strategy, sp=8, decay=None, init=False, final=False)


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_per_shard_function_in_checked_shard_map(rng, strategy):
    """lasp_attention_shard in the caller's own checked shard_map: the neighbour exchange happens there."""
    sp = 4
    q, k, v, kw, ids, do, ds = make_case(rng, t=32, sp=sp, kinds=("edges_only", "around_edges"), decay="g")
    want = documents_alone(q, k, v, kw, ids, do, ds)
    mesh = mesh_of(1, sp)
    seg = jnp.asarray(ids)

    def fn(q, k, v, *, g, initial_state, output_final_state):
        def body(q, k, v, g, s0, seg):
            return lasp_attention_shard(
                q,
                k,
                v,
                axis_name="sp",
                strategy=strategy,
                g=g,
                initial_state=s0,
                output_final_state=output_final_state,
                segment_ids=seg,
                impl="xla",
            )

        tokens = P(None, "sp")
        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(tokens, tokens, tokens, tokens, P(), tokens),
            out_specs=(tokens, P()),
        )(q, k, v, g, initial_state, seg)

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = grads_fn(fn)(f32(q), f32(k), f32(v), {n: f32(x) for n, x in kw.items()}, f32(do), f32(ds))
    assert_matches(got, want, sp=sp, label=f"checked shard_map {strategy}")


def test_one_document_per_row_is_the_unsegmented_layer(rng):
    """Constant ids (any value) change nothing: equal to the call without segment_ids."""
    q, k, v, kw, _, _, _ = make_case(rng, t=32, sp=4, kinds=("single", "single"))
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    kw = {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}
    mesh = mesh_of(1, 4)
    run = jax.jit(
        lambda seg: lasp_attention(
            *args, **kw, segment_ids=seg, mesh=mesh, strategy="allgather", output_final_state=True, impl="xla"
        )
    )
    plain = jax.jit(
        lambda: lasp_attention(*args, **kw, mesh=mesh, strategy="allgather", output_final_state=True, impl="xla")
    )()
    for packed in (run(jnp.full((2, 32), 7, jnp.int32)), run(jnp.full((2, 32), -3, jnp.int32))):
        for a, b in zip(plain, packed):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_no_mesh_is_the_single_device_op(rng):
    q, k, v, kw, ids, _, _ = make_case(rng, t=32, sp=4, kinds=("shard_edges", "around_edges"))
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    kw = {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}
    seg = jnp.asarray(ids)
    want = linear_attention(*args, **kw, segment_ids=seg, output_final_state=True, impl="xla")
    got = lasp_attention(*args, **kw, segment_ids=seg, mesh=None, output_final_state=True, impl="xla")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------- bad input
def _small(b=2, t=16, h=4, d=8):
    return jnp.ones((b, t, h, d)), jnp.ones((b, t, h, d)), jnp.ones((b, t, h, d))


@pytest.mark.parametrize(
    "segment_ids, error, match",
    [
        (
            jnp.zeros((2, 15), jnp.int32),
            ValueError,
            r"segment_ids must be \[B, T\]=\(2, 16\), got segment_ids.shape=\(2, 15\)",
        ),
        (jnp.zeros((2, 16, 1), jnp.int32), ValueError, r"segment_ids.shape=\(2, 16, 1\)"),
        (jnp.zeros((16,), jnp.int32), ValueError, r"segment_ids.shape=\(16,\)"),
        (
            jnp.zeros((2, 16), jnp.float32),
            TypeError,
            r"segment_ids must be an integer array, got segment_ids.dtype=float32",
        ),
        (jnp.zeros((2, 16), bool), TypeError, r"segment_ids.dtype=bool"),
    ],
    ids=["short", "rank3", "rank1", "float", "bool"],
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bad_segment_ids(strategy, segment_ids, error, match):
    with pytest.raises(error, match=match):
        lasp_attention(*_small(), segment_ids=segment_ids, mesh=mesh_of(1, 4), strategy=strategy)


def test_bad_segment_ids_in_the_per_shard_function():
    mesh = mesh_of(1, 4)
    tokens = P(None, "sp")

    def call(seg):
        body = lambda q, seg: lasp_attention_shard(q, q, q, axis_name="sp", segment_ids=seg, impl="xla")[0]
        return jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens), out_specs=tokens)(_small()[0], seg)

    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\]=\(2, 4\), got segment_ids.shape=\(2, 2\)"):
        call(jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(TypeError, match=r"segment_ids.dtype=float32"):
        call(jnp.zeros((2, 16), jnp.float32))
