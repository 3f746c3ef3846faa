"""Packed documents: segment_ids reset the state at every boundary, on every implementation.

A packed row must equal each document run alone (outputs, final state and every gradient), with
boundaries at chunk edges, mid-chunk, and documents of length 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention
from pallas_kernels.linear_attention import reference
from tests.helpers import make_inputs, rel_err

IMPLS = ["xla", "pallas", "reference", "reference_quadratic"]

# the XLA path uses 64-token chunks: boundaries at 64 and 128 fall on chunk edges, the rest mid-chunk.
# The Pallas kernels in interpret mode use 16-token chunks and two splits of 7 chunks per row
# (T=200 → 13 chunks): "split_edges" puts boundaries at a chunk edge (16), at the split edge
# (112) and one token after it (a one-token document opening the second split).
DOC_LENGTHS = {
    "chunk_edges": [64, 1, 30, 33, 1, 71],
    "mid_chunk": [10, 50, 1, 1, 77, 61],
    "single_doc": [200],
    "ones_first": [1, 1, 1, 197],
    "split_edges": [16, 96, 1, 87],
}


def _doc_ids_that_change(lengths, batch):
    # alternate two ids so that equal ids reappear after other documents
    ids = np.concatenate([np.full(n, 3 if i % 2 else 8) for i, n in enumerate(lengths)])
    return np.tile(ids, (batch, 1)).astype(np.int32)


@functools.cache
def _packed_grads(impl):
    """jit: the gradients of <o, do> + <final_state, ds> over the packed row, and (o, final_state).

    Under one jit (eager, each primitive compiles apart) taking the segment ids as an argument: every
    layout has T=200, so one compile per impl and decay serves all five layouts.
    """

    def loss(q, k, v, kw, seg, do, ds):
        o, s = linear_attention(q, k, v, **kw, segment_ids=seg, output_final_state=True, impl=impl)
        return jnp.sum(o * do) + jnp.sum(s * ds), (o, s)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@functools.cache
def _alone_grads(lengths: tuple[int, ...]):
    """jit: the same loss and outputs with every document run alone by the reference (the first
    from the initial state), one compile per layout and decay for all the impls."""
    starts = np.cumsum((0, *lengths))

    def loss(q, k, v, kw, do, ds):
        outs, total, s = [], 0.0, None
        for i, (a, z) in enumerate(zip(starts[:-1], starts[1:])):
            part = {"g": kw["g"][:, a:z]} if "g" in kw else {}
            if "g_gamma" in kw:
                part["g_gamma"] = kw["g_gamma"]
            if i == 0:
                part["initial_state"] = kw["initial_state"]
            o, s = linear_attention(q[:, a:z], k[:, a:z], v[:, a:z], **part, output_final_state=True, impl="reference")
            outs.append(o)
            total = total + jnp.sum(o * do[:, a:z])
        return total + jnp.sum(s * ds), (jnp.concatenate(outs, axis=1), s)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize("decay", [None, "g_gamma", "g"], ids=["nodecay", "g_gamma", "g"])
@pytest.mark.parametrize("layout", list(DOC_LENGTHS))
@pytest.mark.parametrize("impl", IMPLS)
def test_packed_equals_documents_alone(rng, impl, layout, decay):
    lengths = DOC_LENGTHS[layout]
    t = sum(lengths)
    q, k, v, kw = make_inputs(rng, b=2, t=t, h=4, hk=2, d=16, decay=decay)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    kw = {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}
    seg = jnp.asarray(_doc_ids_that_change(lengths, 2))
    do = jnp.asarray(rng.standard_normal((2, t, 4, 16)), jnp.float32)
    ds = jnp.asarray(rng.standard_normal((2, 4, 16, 16)), jnp.float32)

    got_grads, (got_o, got_s) = _packed_grads(impl)(q, k, v, kw, seg, do, ds)
    want_grads, (want_o, want_s) = _alone_grads(tuple(lengths))(q, k, v, kw, do, ds)
    assert rel_err(got_o, want_o) < 1e-4
    assert rel_err(got_s, want_s) < 1e-4
    names = ["dq", "dk", "dv"] + [f"d{n}" for n in want_grads[3]]
    for name, got, want in zip(names, jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert rel_err(got, want) < (1e-3 if name in ("dg", "dg_gamma") else 1e-4), name


def test_same_id_after_another_document_is_a_new_document(rng):
    # ids [1, 1, 2, 2, 1, 1]: the third run of 1s must not see the first
    q, k, v, _ = make_inputs(rng, b=1, t=6, h=1, d=4, decay=None, init=False)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    seg = jnp.asarray([[1, 1, 2, 2, 1, 1]])
    o, _ = linear_attention(q, k, v, segment_ids=seg, impl="xla")
    o_last, _ = linear_attention(q[:, 4:], k[:, 4:], v[:, 4:], impl="reference")
    assert rel_err(o[:, 4:], o_last) < 1e-5


def test_document_index():
    seg = jnp.asarray([[4, 4, 0, 0, 0, 4, 9], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(reference.document_index(seg), [[0, 0, 1, 1, 1, 2, 3], [0] * 7])


@pytest.mark.parametrize(
    "seg,err,match",
    [
        (jnp.zeros((2, 9), jnp.int32), ValueError, r"segment_ids.shape=\(2, 9\)"),
        (jnp.zeros((2,), jnp.int32), ValueError, "segment_ids.shape"),
        (jnp.zeros((2, 8), jnp.float32), TypeError, "segment_ids.dtype=float32"),
    ],
    ids=["wrong_length", "wrong_rank", "float"],
)
def test_bad_segment_ids(seg, err, match):
    x = jnp.zeros((2, 8, 2, 4))
    with pytest.raises(err, match=match):
        linear_attention(x, x, x, segment_ids=seg)
