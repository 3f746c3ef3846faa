"""The per-channel WY backward on whole chunks (``BlockConfig.stacked_pairs``): the body that
``pallas_triton_vjp._wy_bwd_kernel`` runs under per-channel gates with the stored inverse.

The 16-row-tile kernel forms dX, dA and the A-pair cotangents as ``[16, 16]`` blocks and pairs
(``mma.sync``-sized); here dX and ``dA = −Xᵀ dX Xᵀ`` are ``C × C`` products of the whole chunk, the
off-diagonal pairs' cotangents come from ``common.key_grads_stacked`` (``[C, n]`` columns and
transposed rows of dA against the tiles: 64-row products at C = 64), and ``Xᵀ dW``, ``Xᵀ dU`` are one
product each. The same cotangents as the tile path (tests: ``test_key_grads_stacked_equals_the_blocks``
and the interpret-mode kernels against the reference).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, dot
from pallas_kernels.gated_delta_rule import common
from pallas_kernels.gated_delta_rule.layout import load_col_tiles, store_col_tiles, store_tiles


def wy_bwd_stacked(
    k_ref,
    v_ref,
    beta_ref,
    h_ref,
    dh_ref,
    v_new_ref,
    dv_new_ref,
    dk_out_ref,
    x_ref,
    gate_ref,
    db_out_ref,
    dk_ref,
    dv_ref,
    dbeta_ref,
    db_ref,
    *,
    docs,
    mxu,
    kw,
    vw,
    parts,
):
    """``_wy_bwd_kernel`` under per-channel gates with ``BlockConfig.stacked_pairs`` and the stored
    inverse: dX summed over column blocks and ``dA = −Xᵀ dX Xᵀ`` as whole-chunk ``C × C`` products,
    the key cotangents by ``common.key_grads_stacked``, ``Xᵀ dU`` as one product."""
    c_rows, beta, x = k_ref.shape[0], beta_ref[...], x_ref[...]

    def keys(j):  # dV' (all of E) reloaded at each step rather than kept live across the loops
        cols = pl.ds(pl.multiple_of(j * kw, kw), kw)
        k, b = k_ref[:, cols], gate_ref[:, cols]
        return cols, k, b, common.state_dw(h_ref[cols, :], dv_new_ref[...], mxu=mxu)[0]

    def dx_keys(j, dx):
        _, k, b, dw = keys(j)
        rhs = common.key_rhs(common.make_chunk(k, None, beta, b, docs, sub=c_rows), mxu)[0]
        return dx + dot(dw.astype(mxu), rhs, trans_b=True)

    def dx_values(j, dx):
        cols = pl.ds(pl.multiple_of(j * vw, vw), vw)
        rhs = (v_ref[:, cols].astype(F32) * beta[:, None]).astype(mxu)
        return dx + dot(dv_new_ref[:, cols].astype(mxu), rhs, trans_b=True)

    dx = lax.fori_loop(0, k_ref.shape[1] // kw, dx_keys, jnp.zeros((c_rows, c_rows), F32))
    da = common.inverse_backward_whole(x, lax.fori_loop(0, v_ref.shape[1] // vw, dx_values, dx), mxu)
    da = da.astype(mxu)  # only feeds products from here (half the registers), as the tile path's blocks

    def key_step(j, dbeta):
        cols, k, b, dw = keys(j)
        dk, dbeta_k, db = common.key_grads_stacked(k, b, beta, docs, x, dw, da, parts=parts, mxu=mxu)
        dk_state, db_state = common.state_backward(
            k, b, docs, h_ref[cols, :], dh_ref[cols, :], v_new_ref[...], mode="channel", mxu=mxu
        )
        start = j * kw
        dk_out, db_out = load_col_tiles(dk_out_ref, parts, start, kw), load_col_tiles(db_out_ref, parts, start, kw)
        dk_s, db_s = common.split_rows(dk_state[0], parts), common.split_rows(db_state[0], parts)
        store_col_tiles(dk_ref, [a.astype(F32) + b_ + c for a, b_, c in zip(dk_out, dk, dk_s, strict=True)], start)
        store_col_tiles(db_ref, [a + b_ + c for a, b_, c in zip(db_out, db, db_s, strict=True)], start)
        return [a + b_ for a, b_ in zip(dbeta, dbeta_k, strict=True)]

    def value_step(j, dbeta):
        cols = pl.ds(pl.multiple_of(j * vw, vw), vw)
        dvb = dot(x.astype(mxu), dv_new_ref[:, cols].astype(mxu), trans_a=True)
        dv_ref[:, cols] = (beta[:, None] * dvb).astype(dv_ref.dtype)
        dbeta_v = common.split_rows(jnp.sum(v_ref[:, cols].astype(F32) * dvb, axis=1), parts)
        return [a + b_ for a, b_ in zip(dbeta, dbeta_v, strict=True)]

    zeros = [jnp.zeros((c_rows // parts,), F32) for _ in range(parts)]
    dbeta = lax.fori_loop(0, k_ref.shape[1] // kw, key_step, zeros)
    store_tiles(dbeta_ref, lax.fori_loop(0, v_ref.shape[1] // vw, value_step, dbeta))
