"""What the linear-attention op keeps for its backward (benchmarks/memory_report.py, notes/memory_1m.md).

The XLA path stores the state entering each group of chunks (not each chunk) past ``GROUP_FROM``
chunks and keeps bf16 inputs' chunks in bf16, both with the plain scan's values bit for bit; the
Pallas kernels take TNL-1B's million tokens (2³¹ elements per tensor) in one call, without pieces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import linear_attention
from pallas_kernels.linear_attention import pallas_triton, xla
from tests.helpers import make_inputs, rel_err, tol, x64


def test_a_million_tokens_of_tnl_1b_are_one_pallas_call():
    """``B·T·H·D = 2³¹`` elements: the largest element offset, 2³¹ − 1, fits int32, so no pieces."""
    million = jax.ShapeDtypeStruct((1, 1 << 20, 16, 128), jnp.bfloat16)
    assert pallas_triton.piece_len(million, million) == 1 << 20
    longer = jax.ShapeDtypeStruct((1, (1 << 20) + 1, 16, 128), jnp.bfloat16)
    assert pallas_triton.piece_len(longer, longer) == 1 << 20  # one token more: two pieces


def _loss(q, k, v, kw, seg):
    o, s = linear_attention(q, k, v, **kw, segment_ids=seg, output_final_state=True, impl="xla")
    return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(s * s), (o, s)


def test_grouped_chunk_scan_keeps_one_state_per_group(rng, monkeypatch):
    """Groups of 4 chunks (5 chunks padded to 8): 2 stored states instead of one per chunk, the
    chunks in bf16, and the output, final state and every gradient equal to the plain scan's bit for
    bit (and to the float64 recurrence to bf16 rounding), per-token decay, documents and grouped heads."""
    b, t, h, hk, d = 1, 300, 2, 1, 16  # 5 chunks of 64
    q, k, v, kw = make_inputs(rng, b=b, t=t, h=h, hk=hk, d=d, decay="g")
    seg = jnp.asarray(np.repeat([0, 1], [100, 200])[None], jnp.int32)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    kw = {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()}
    state_shape = (b, hk, h // hk, d, d)

    def run(group_from):
        monkeypatch.setattr(xla, "GROUP_FROM", group_from)
        _, vjp, out = jax.vjp(jax.jit(lambda *a: _loss(*a, seg)), q, k, v, kw, has_aux=True)
        return out, vjp(jnp.ones((), jnp.float32)), jax.tree.leaves(vjp)

    plain = xla.GROUP_FROM  # 5 chunks are far below it
    (o, s), grads, stored = run(2)
    (o_plain, s_plain), grads_plain, stored_plain = run(plain)
    # the stored float32 states: one entering each group of 4 (8 chunks) against one per chunk
    assert [x.shape[0] for x in stored if x.shape[1:] == state_shape] == [2]
    assert [x.shape[0] for x in stored_plain if x.shape[1:] == state_shape] == [5]
    # the stored q, k, v chunks (as many elements as the padded inputs) are bf16
    padded = {8 * 64 * b * h * d, 8 * 64 * b * hk * d}
    assert {x.dtype for x in stored if x.size in padded} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_plain, np.float32))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_plain))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_plain), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with x64():
        f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
        o_ref, s_ref = linear_attention(
            f64(q), f64(k), f64(v), **{n: f64(x) for n, x in kw.items()}, segment_ids=seg,
            output_final_state=True, impl="reference",
        )  # fmt: skip
    assert rel_err(np.asarray(o, np.float32), o_ref) < tol(jnp.bfloat16, t)
    assert rel_err(s, s_ref) < tol(jnp.float32, t)


def test_bf16_chunks_give_the_float32_chunks_values(rng):
    """bf16 q, k, v stay bf16 in the scan (half the stored chunks and cotangents) and each step
    computes in float32: the output and gradients are the float32 path's on the same values, rounded
    once to bf16."""
    q, k, v, kw = make_inputs(rng, b=1, t=150, h=2, d=16, decay="g_gamma", init=False)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    gamma = jnp.asarray(kw["g_gamma"], jnp.float32)

    def loss(q, k, v):
        o = linear_attention(q, k, v, g_gamma=gamma, impl="xla")[0]
        return jnp.sum(jnp.sin(o.astype(jnp.bfloat16).astype(jnp.float32))), o

    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, o32), grads32 = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        *(x.astype(jnp.float32) for x in (q, k, v))
    )
    assert o.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o32.astype(jnp.bfloat16), np.float32))
    for got, want in zip(grads, grads32, strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32))
