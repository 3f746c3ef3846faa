"""Chunk math of the gated delta rule that the forward and backward kernels share.

Plain jnp on the arrays of one chunk of one value head, so the same code runs inside the Pallas
kernels (on loaded blocks) and outside them (the kernel tests check every gradient against the
token scan). Notation of notes/design.md §6, per chunk of C tokens: ``b`` the cumulative log gate
inside the chunk (``[C]`` per head, ``[C, D]`` per key channel, None without gates),
``Γ[i, j] = exp(b_i − b_j)``, and

    A = strictly_lower(diag(β) (K Kᵀ ⊙ Γ)),   X = (I + A)⁻¹,   W = X (β e^b ⊙ K),   U = X (β ⊙ V)
    V' = U − W S,   O = scale · [(e^b ⊙ Q) S + (Q Kᵀ ⊙ Γ ⊙ causal) V'],   S ← e^{b_last} S + (e^{b_last − b} ⊙ K)ᵀ V'

Every decay factor is an exp of a non-positive difference (except the factored diagonal tiles of
mode ``"channel_bounded"``, whose factors reach ``e^40``: ``products``): b is a plain cumulative
sum of log gates ≤ 0 inside the chunk (not reset at document starts; padding adds zeros), so it
never increases along the rows. A chunk is cut into sub-tiles (16 rows by default; ``BlockConfig.wy_rows`` /
``channel_rows``): the triangular inverse is built from the diagonal blocks (doubling inside a
block, block forward substitution between blocks); the gated products between two sub-tiles and
inside one, and their cotangents, are ``products``'s. Scalar gates need no factoring: their products
use the whole chunk.

Documents (packed rows): pairs of different documents are zero, rows outside the document of the
state entering the chunk do not see it (``keep_prev``), rows outside the chunk's last document do
not reach the state leaving it (``keep_last``), and the carried state is zero across a boundary.

The gradient of the log gates follows one rule: a product ``Σ_d x_id y_jd exp(b_id − b_jd)`` gives
``∂/∂b_i = x_i ⊙ dx_i`` and ``∂/∂b_j = −y_j ⊙ dy_j`` (summed over d for scalar gates), with dx, dy
the cotangents of the raw operands through that product; factors ``exp(±b)`` alone likewise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import F32, dot
from pallas_kernels.gated_delta_rule.products import (
    CHANNEL_MODES,
    GateMode,
    Pair,
    channel_offdiag_stacked,
    channel_offdiag_stacked_vjp,
    gated_product,
    gated_product_vjp,
    make_pair,
)


class Docs(NamedTuple):
    """Document numbers around one chunk (or sub-tile) of a packed row.

    ``doc [n]`` of each row, ``prev`` the document of the state entering the chunk, ``last`` that of
    the chunk's last token (scalars).
    """

    doc: jax.Array
    prev: jax.Array
    last: jax.Array


# ---- small helpers ----------------------------------------------------------------------------


def split_rows(x, parts: int) -> list:
    """``x`` cut into ``parts`` equal row blocks (a power of two; lowers to Triton splits), or ``x``
    itself when it is already a list of ``parts`` row tiles (kernels load tiles from their refs)."""
    if isinstance(x, (list, tuple)):
        if len(x) != parts:
            raise ValueError(f"expected {parts} row tiles, got {len(x)}")
        return list(x)
    if x is None:
        return [None] * parts
    return jnp.split(x, parts, axis=0) if parts > 1 else [x]


def split_docs(docs: Docs | None, parts: int) -> list:
    if docs is None:
        return [None] * parts
    return [Docs(d, docs.prev, docs.last) for d in split_rows(docs.doc, parts)]


def num_tiles(x) -> int | None:
    """The number of row tiles of a list (None for a whole array)."""
    return len(x) if isinstance(x, (list, tuple)) else None


def last_row(x):
    """The last row of ``x`` (``[n]`` → scalar, ``[n, D]`` → ``[D]``) without slicing a value."""
    pos = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(pos == x.shape[0] - 1, x, 0), axis=0)


def keep_rows(docs: Docs | None, which: str):
    """Rows in the document of the entering state (``"prev"``) or of the last token (``"last"``)."""
    return None if docs is None else docs.doc == getattr(docs, which)


def row_scale(x, factor, keep=None):
    """``factor ⊙ x`` in float32: ``factor`` ``[n]`` (a per-row scalar; boolean: a row mask) or
    ``[n, D]``; rows where ``keep`` is False zeroed. x itself (cast) when both are None."""
    x = x.astype(F32)
    if factor is not None and factor.dtype == jnp.bool_:
        x = jnp.where(factor[:, None], x, 0.0)
    elif factor is not None:
        x = x * (factor[:, None] if factor.ndim == 1 else factor)
    return x if keep is None else jnp.where(keep[:, None], x, 0.0)


def reduce_gate(x_dx, mode: GateMode):
    """``x ⊙ dx`` reduced to the shape of the log gate: row sums for scalar gates."""
    return jnp.sum(x_dx, axis=1) if mode == "scalar" else x_dx


def to_row_factor(b, docs: Docs | None):
    """``e^b`` on each row (the decay from the chunk start), zero on rows outside the document of
    the entering state; the "same document" mask (boolean) or None without gates."""
    keep_prev = keep_rows(docs, "prev")
    if b is None:
        return keep_prev
    to_row = jnp.exp(b)
    if docs is None:
        return to_row
    return jnp.where(keep_prev if b.ndim == 1 else keep_prev[:, None], to_row, 0.0)


def gate_factors(b, docs: Docs | None, b_last=None):
    """``(e^b, e^{b_last − b}, γ)`` of a chunk (or of a row tile of it, given the chunk's
    ``b_last``): the decay from the chunk start to each row, from each row to the chunk end, and
    across the chunk (zero across a document boundary); the row factors are zero on rows that do
    not see the entering state / reach the leaving one. Without gates they are the "same
    document" masks and γ "no boundary in the chunk" (booleans), or None."""
    to_row, keep_last = to_row_factor(b, docs), keep_rows(docs, "last")
    if b is None:
        return to_row, keep_last, None if docs is None else docs.last == docs.prev
    b_last = last_row(b) if b_last is None else b_last
    to_end, gamma = jnp.exp(b_last - b), jnp.exp(b_last)
    if docs is not None:
        to_end = jnp.where(keep_last if b.ndim == 1 else keep_last[:, None], to_end, 0.0)
        gamma = jnp.where(docs.last == docs.prev, gamma, 0.0)
    return to_row, to_end, gamma


# ---- the WY form: A, its unit-lower inverse, W and U ------------------------------------------


# ``BlockConfig.inverse_precision="bf16"``: the inverse's products on bf16 operands (float32 sums)
BF16_PRODUCTS = "bf16"


def _inverse_dot(a, b, precision):
    """``a @ b`` of float32 tiles for the inverse: ``precision`` a ``lax.Precision`` / algorithm, or
    ``BF16_PRODUCTS`` (operands rounded to bf16, as X itself is before it meets W's and U's operands)."""
    if isinstance(precision, str) and precision == BF16_PRODUCTS:
        return dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    return dot(a, b, precision=precision)


def unit_lower_inverse(a, precision=lax.Precision.HIGHEST):
    """``(I + a)⁻¹`` for a strictly lower-triangular ``[s, s]`` ``a`` (s a power of two), float32.

    Doubling: from the inverses of the diagonal blocks of size ``n`` those of size ``2n`` are
    ``X − X L X``, L the entries of ``a`` below the diagonal blocks inside each ``2n`` block (the
    block formula ``X₂₁ = −X₂₂ A₂₁ X₁₁``): log2(s) steps of two s×s products, no division, except
    the first (``X = I``: the 2×2 blocks' inverse is ``I − L``); ``precision`` of the float32
    products (``pallas_kernels.common.dot``), or ``BF16_PRODUCTS`` (bf16 operands, float32 sums).
    """
    s = a.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (s, s), 0)
    col = lax.broadcasted_iota(jnp.int32, (s, s), 1)
    x = None
    step, shift = 1, 0
    while step < s:
        same_block = (row >> (shift + 1)) == (col >> (shift + 1))
        lower_half = ((row & step) != 0) & ((col & step) == 0)
        below = jnp.where(same_block & lower_half, a, 0.0)
        if x is None:
            x = jnp.where(row == col, 1.0, 0.0).astype(F32) - below
        else:
            x = x - _inverse_dot(_inverse_dot(x, below, precision), x, precision)
        step, shift = 2 * step, shift + 1
    return jnp.ones((1, 1), F32) if x is None else x


def block_inverse(a: dict, n: int, precision=lax.Precision.HIGHEST) -> dict:
    """``(I + A)⁻¹`` by blocks from A's lower blocks ``a[(I, J)]``, ``J ≤ I < n`` (diagonal blocks
    strictly lower): ``X_II = unit_lower_inverse(A_II)``, ``X_IJ = −X_II Σ_{J ≤ M < I} A_IM X_MJ``."""
    x = {}
    for i in range(n):
        x[i, i] = unit_lower_inverse(a[i, i], precision)
        for j in range(i - 1, -1, -1):
            acc = sum(_inverse_dot(a[i, m], x[m, j], precision) for m in range(j, i))
            x[i, j] = -_inverse_dot(x[i, i], acc, precision)
    return x


class Chunk(NamedTuple):
    """The tiles of one chunk of one value head (lists of ``C / sub`` row blocks).

    ``k`` ``[sub, D]``, ``v`` ``[sub, E]`` (input dtype), ``beta`` ``[sub]``, ``b`` ``[sub]`` /
    ``[sub, D]`` / None, ``docs`` Docs / None, and the whole-chunk gate factors (``gate_factors``)
    cut the same way (None entries when absent).
    """

    k: list
    v: list
    beta: list
    b: list
    docs: list
    to_row: list


def make_chunk(k, v, beta, b, docs: Docs | None, *, sub: int) -> Chunk:
    """The ``Chunk`` of whole-chunk arrays (cut into tiles of ``sub`` rows) or of row tiles."""
    parts = num_tiles(k) or k.shape[0] // sub
    bt, dt = split_rows(b, parts), split_docs(docs, parts)
    to_row = [to_row_factor(x, d) for x, d in zip(bt, dt, strict=True)]
    return Chunk(split_rows(k, parts), split_rows(v, parts), split_rows(beta, parts), bt, dt, to_row)


def _gram_pair(c: Chunk, i: int, j: int, *, beta_rows: bool = False) -> Pair:
    """Tiles i ≥ j of ``G = K Kᵀ ⊙ Γ``, or of ``A = (β ⊙ K) Kᵀ ⊙ Γ`` with ``beta_rows``."""
    rows = c.beta[i][:, None] * c.k[i].astype(F32) if beta_rows else c.k[i]
    return make_pair(rows, c.k[j], c.b[i], c.b[j], c.docs[i], c.docs[j], diag=i == j, causal="strict")


def gram_blocks(c: Chunk, *, mode: GateMode, mxu, whole=None) -> dict:
    """The lower blocks of ``G = K Kᵀ ⊙ Γ`` (strictly lower inside the diagonal blocks); a sum over
    key channels, so the blocks of a chunk restricted to some columns add up to G. ``whole``: the
    chunk's ``(K, b)`` as whole ``[C, w]`` arrays, for per-channel gates' off-diagonal blocks by
    ``products.channel_offdiag_stacked`` (``BlockConfig.stacked_pairs``)."""
    n = len(c.k)
    if whole is not None and mode in CHANNEL_MODES and n > 1:
        k, b = whole
        out = channel_offdiag_stacked(k, c.k, b, c.b, c.docs, c.docs, mxu)
        out.update({(i, i): gated_product(_gram_pair(c, i, i), mode, mxu) for i in range(n)})
        return out
    return {(i, j): gated_product(_gram_pair(c, i, j), mode, mxu) for i in range(n) for j in range(i + 1)}


def inverse_blocks(gram: dict, beta: list, precision=lax.Precision.HIGHEST) -> dict:
    """The lower blocks of ``X = (I + A)⁻¹``, ``A = diag(β) G``."""
    return block_inverse({(i, j): beta[i][:, None] * g for (i, j), g in gram.items()}, len(beta), precision)


def key_rhs(c: Chunk, mxu) -> list:
    """The right-hand side ``β e^b ⊙ K`` per tile, as matmul operands (``mxu``)."""
    return [
        (row_scale(k, f, None) * beta[:, None]).astype(mxu) for k, f, beta in zip(c.k, c.to_row, c.beta, strict=True)
    ]


def value_rhs(c: Chunk, mxu) -> list:
    """The right-hand side ``β ⊙ V`` per tile, as matmul operands (``mxu``)."""
    return [(v.astype(F32) * beta[:, None]).astype(mxu) for v, beta in zip(c.v, c.beta, strict=True)]


def solve_blocks(x: dict, rhs: list, mxu) -> list:
    """Tiles of ``X R`` for lower-triangular X (blocks) and the tiles of R (float32 result)."""
    n = len(rhs)
    return [sum(dot(x[i, j].astype(mxu), rhs[j].astype(mxu)) for j in range(i + 1)) for i in range(n)]


def wy_forward(c: Chunk, *, mode: GateMode, mxu):
    """``(W, U)`` per tile (float32): ``W = X (β e^b ⊙ K)``, ``U = X (β ⊙ V)``."""
    x = inverse_blocks(gram_blocks(c, mode=mode, mxu=mxu), c.beta)
    return solve_blocks(x, key_rhs(c, mxu), mxu), solve_blocks(x, value_rhs(c, mxu), mxu)


def dx_blocks(rhs: list, d_solved: list, mxu) -> dict:
    """The lower blocks of ``dX = dS Rᵀ`` for ``S = X R`` (one right-hand side's share, a sum over
    its columns)."""
    n = len(rhs)
    return {
        (i, j): dot(d_solved[i].astype(mxu), rhs[j].astype(mxu), trans_b=True) for i in range(n) for j in range(i + 1)
    }


def add_blocks(a: dict | None, b: dict) -> dict:
    return b if a is None else {ij: a[ij] + b[ij] for ij in a}


def transpose_solve(x: dict, d_solved: list, mxu) -> list:
    """Tiles of ``Xᵀ dS``: the cotangent of R in ``S = X R``."""
    n = len(d_solved)
    return [sum(dot(x[i, j].astype(mxu), d_solved[i].astype(mxu), trans_a=True) for i in range(j, n)) for j in range(n)]


def inverse_backward(x: dict, dx: dict, mxu=F32) -> dict:
    """The lower blocks of ``dA = −Xᵀ dX Xᵀ`` (only A's strictly lower part is used); the products'
    operands in ``mxu`` (float32 by default)."""
    n = max(i for i, _ in x) + 1
    x = {ij: block.astype(mxu) for ij, block in x.items()}
    dx = {ij: block.astype(mxu) for ij, block in dx.items()}
    lower = [(i, j) for i in range(n) for j in range(i + 1)]
    # Y = Xᵀ dX on the blocks (i, m) with m ≤ i, then dA = −Y Xᵀ
    y = {(i, m): sum(dot(x[r, i], dx[r, m], trans_a=True) for r in range(i, n)) for i, m in lower}
    y = {im: block.astype(mxu) for im, block in y.items()}
    return {(i, j): -sum(dot(y[i, m], x[j, m], trans_b=True) for m in range(j + 1)) for i, j in lower}


def inverse_backward_whole(x, dx, mxu):
    """``dA = −Xᵀ dX Xᵀ`` (strictly lower, float32) of a whole chunk: X ``[C, C]`` (lower, unit
    diagonal), dX ``[C, C]`` (its lower blocks are ``inverse_backward``'s); two C×C products, the
    middle one's operand rounded to ``mxu`` as the blocks' are."""
    x = x.astype(mxu)
    y = dot(x, dx.astype(mxu), trans_a=True).astype(mxu)
    row = lax.broadcasted_iota(jnp.int32, dx.shape, 0)
    col = lax.broadcasted_iota(jnp.int32, dx.shape, 1)
    return jnp.where(row > col, -dot(y, x, trans_b=True), 0.0)


def _w_grads(c: Chunk, dkb: list, mode: GateMode):
    """Tiles ``(dk, dβ, db)`` through ``W = X (β e^b ⊙ K)`` given ``d(β e^b ⊙ K) = Xᵀ dW``."""
    dk, dbeta, db = [], [], []
    for j in range(len(c.k)):
        k_rhs = row_scale(c.k[j], c.to_row[j], None)  # e^b ⊙ k
        dk.append(row_scale(c.beta[j][:, None] * dkb[j], c.to_row[j], None))
        dbeta.append(jnp.sum(k_rhs * dkb[j], axis=1))
        db.append(None if c.b[j] is None else reduce_gate(c.k[j].astype(F32) * dk[j], mode))
    return dk, dbeta, db


def key_grads_stacked(k, b, beta, docs: Docs | None, x, dw, da, *, parts: int, mxu):
    """``key_grads`` under per-channel gates from whole-chunk arrays (``BlockConfig.stacked_pairs``):
    k, b, dW ``[C, w]``, β ``[C]``, ``docs`` whole, X ``[C, C]``, dA ``[C, C]``
    (``inverse_backward_whole``). ``Xᵀ dW`` is one product, A's off-diagonal tile pairs go by
    ``channel_offdiag_stacked_vjp`` (A's rows are ``β ⊙ K``), its diagonal tiles pairwise; tiles out."""
    c = make_chunk(k, None, beta, b, docs, sub=k.shape[0] // parts)
    dk, dbeta, db = _w_grads(c, split_rows(dot(x.astype(mxu), dw.astype(mxu), trans_a=True), parts), "channel")
    rows = [c.beta[i][:, None] * c.k[i].astype(F32) for i in range(parts)]
    cols, rows_t = jnp.split(da, parts, axis=1), jnp.split(da.T, parts, axis=1)
    d_rows, d_cols = channel_offdiag_stacked_vjp(
        b,
        rows,
        c.k,
        c.b,
        cols[:-1],
        [None, *rows_t[1:]],
        None if docs is None else docs.doc,
        mxu,
    )
    d_rows, d_cols = split_rows(d_rows, parts), split_rows(d_cols, parts)
    for i, da_row in enumerate(jnp.split(da, parts, axis=0)):
        dr, dc = gated_product_vjp(
            _gram_pair(c, i, i, beta_rows=True), jnp.split(da_row, parts, axis=1)[i], "channel", mxu
        )
        dki = c.beta[i][:, None] * (d_rows[i] + dr)
        dkj = d_cols[i] + dc
        dbeta[i] = dbeta[i] + jnp.sum(c.k[i].astype(F32) * (d_rows[i] + dr), axis=1)
        dk[i] = dk[i] + dki + dkj
        db[i] = db[i] + c.k[i].astype(F32) * (dki - dkj)
    return dk, dbeta, db


def key_grads(c: Chunk, x: dict, dw: list, da: dict, *, mode: GateMode, mxu):
    """Tiles ``(dk, dβ share, db share)`` through ``W = X (β e^b ⊙ K)`` given dW and through
    ``A = (β ⊙ K) Kᵀ ⊙ Γ`` given ``dA``, for the key columns of ``c`` (dβ and scalar db: partial
    row sums over those columns).

    A is taken as the gated product of ``β ⊙ K`` (rows) and K (columns), so β's share through it is
    ``Σ_d k_id · (the row operand's cotangent)_id``, a sum over key columns like the rest: the
    Gram matrix itself is never needed (with the forward's stored X the WY backward forms no Gram
    block at all)."""
    dk, dbeta, db = _w_grads(c, transpose_solve(x, dw, mxu), mode)
    for (i, j), d in da.items():
        d_rows, dkj = gated_product_vjp(_gram_pair(c, i, j, beta_rows=True), d, mode, mxu)
        dki = c.beta[i][:, None] * d_rows
        dbeta[i] = dbeta[i] + jnp.sum(c.k[i].astype(F32) * d_rows, axis=1)
        dk[i] = dk[i] + dki
        dk[j] = dk[j] + dkj  # j may equal i
        if db[i] is not None:
            db[i] = db[i] + reduce_gate(c.k[i].astype(F32) * dki, mode)
            db[j] = db[j] - reduce_gate(c.k[j].astype(F32) * dkj, mode)
    return dk, dbeta, db


def value_grads(c: Chunk, x: dict, du: list, mxu):
    """Tiles ``(dv, dβ share)`` through ``U = X (β ⊙ V)`` given dU, for the value columns of ``c``."""
    dvb = transpose_solve(x, du, mxu)
    dv = [beta[:, None] * d for beta, d in zip(c.beta, dvb, strict=True)]
    dbeta = [jnp.sum(v.astype(F32) * d, axis=1) for v, d in zip(c.v, dvb, strict=True)]
    return dv, dbeta


class WyGrads(NamedTuple):
    """Per-tile cotangents from the WY form: dk ``[sub, D]``, dv, dbeta ``[sub]``, db (gate shape)."""

    dk: list
    dv: list
    dbeta: list
    db: list


def wy_backward(c: Chunk, dw: list, du: list, *, mode: GateMode, mxu) -> WyGrads:
    """Cotangents of k, v, β and b through ``wy_forward`` given ``dW``, ``dU`` per tile (float32).

    ``dX = dW Kβᵀ + dU Vβᵀ``, ``dKβ = Xᵀ dW``, ``dVβ = Xᵀ dU``, and through the inverse
    ``dA = −Xᵀ dX Xᵀ`` (strictly lower), ``A = diag(β) G``. Every step is a sum over, or separate
    in, the key and value columns, which kernels use to walk them in blocks.
    """
    x = inverse_blocks(gram_blocks(c, mode=mode, mxu=mxu), c.beta)
    dx = add_blocks(dx_blocks(key_rhs(c, mxu), dw, mxu), dx_blocks(value_rhs(c, mxu), du, mxu))
    dk, dbeta_k, db = key_grads(c, x, dw, inverse_backward(x, dx), mode=mode, mxu=mxu)
    dv, dbeta_v = value_grads(c, x, du, mxu)
    dbeta = [a + b for a, b in zip(dbeta_k, dbeta_v, strict=True)]
    return WyGrads(dk, dv, dbeta, db)


# ---- the state pass and the output ------------------------------------------------------------


def decay_state(state, gamma):
    """``diag(γ) S`` for the ``[D, E]`` state (γ a scalar, a ``[D]`` vector, None for 1, or a boolean
    scalar: S or zero)."""
    if gamma is None:
        return state
    if gamma.dtype == jnp.bool_:
        return jnp.where(gamma, state, 0.0)
    return gamma * state if gamma.ndim == 0 else gamma[:, None] * state


def gated_dot(x, factor, y, mxu, *, trans_a=False):
    """``(factor ⊙ x) y`` (``trans_a``: ``(factor ⊙ x)ᵀ y``), float32.

    A per-row factor (``[n]``, or a boolean row mask) is applied to the product's rows, or with
    ``trans_a`` to y's rows, so x enters the product as loaded: the state passes scale a
    ``[C, block_e]`` tile per step instead of the ``[C, D]`` key or query tile (and Triton feeds x
    to the tensor cores without a round trip through registers). Per-channel factors act on x's
    columns and scale x before the product."""
    if factor is None or factor.ndim == 2:
        x = x if factor is None else row_scale(x, factor)
        return dot(x.astype(mxu), y.astype(mxu), trans_a=trans_a)
    if trans_a:  # (f ⊙ x)ᵀ y = xᵀ (f ⊙ y): x and y share their rows
        return dot(x.astype(mxu), row_scale(y, factor).astype(mxu), trans_a=True)
    return row_scale(dot(x.astype(mxu), y.astype(mxu)), factor)


def state_step(state, w, u, k, to_end, gamma, mxu):
    """One chunk of the state pass: ``(V' = U − W S, S ← diag(γ) S + (e^{b_last − b} ⊙ K)ᵀ V')``
    (float32)."""
    v_new = u.astype(F32) - dot(w.astype(mxu), state.astype(mxu))
    return v_new, decay_state(state, gamma) + gated_dot(k, to_end, v_new, mxu, trans_a=True)


def score_blocks(q, k, b, docs: Docs | None, *, mode: GateMode, mxu, parts: int, whole=None):
    """``Z = Q Kᵀ ⊙ Γ ⊙ causal`` (diagonal included) as its lower tile blocks ``{(i, j): [n, n]}``;
    ``whole``: ``(Q, b)`` as whole ``[C, w]`` arrays, for per-channel gates' off-diagonal blocks by
    ``products.channel_offdiag_stacked`` (``BlockConfig.stacked_pairs``)."""
    qt, kt, bt, dt = split_rows(q, parts), split_rows(k, parts), split_rows(b, parts), split_docs(docs, parts)
    if whole is not None and mode in CHANNEL_MODES and parts > 1:
        q_whole, b_whole = whole
        out = channel_offdiag_stacked(q_whole, kt, b_whole, bt, dt, dt, mxu)
        for i in range(parts):
            diag = make_pair(qt[i], kt[i], bt[i], bt[i], dt[i], dt[i], diag=True, causal="inclusive")
            out[i, i] = gated_product(diag, mode, mxu)
        return out
    return {
        (i, j): gated_product(
            make_pair(qt[i], kt[j], bt[i], bt[j], dt[i], dt[j], diag=i == j, causal="inclusive"), mode, mxu
        )
        for i in range(parts)
        for j in range(i + 1)
    }


def output_inter(q, b, docs: Docs | None, h, *, mxu, parts: int) -> list:
    """Tiles of ``(e^b ⊙ Q) S`` (a sum over key channels: with q, b restricted to some columns and
    ``h`` to those rows, the share of those columns)."""
    ft = [to_row_factor(x, d) for x, d in zip(split_rows(b, parts), split_docs(docs, parts), strict=True)]
    return [gated_dot(x, f, h, mxu) for x, f in zip(split_rows(q, parts), ft, strict=True)]


def output_combine(z: dict, inter: list, v_new, *, scale: float, mxu) -> list:
    """The output tiles ``scale · [inter + Z V']``."""
    vt = split_rows(v_new, len(inter))
    return [
        scale * (inter[i] + sum(dot(z[i, j].astype(mxu), vt[j].astype(mxu)) for j in range(i + 1)))
        for i in range(len(inter))
    ]


def output_forward(q, k, b, docs: Docs | None, h, v_new, *, scale: float, mode: GateMode, mxu, parts: int) -> list:
    """The chunk's output tiles ``scale · [(e^b ⊙ Q) S + Z V']`` from its entering state ``h``."""
    z = score_blocks(q, k, b, docs, mode=mode, mxu=mxu, parts=parts)
    inter = output_inter(q, b, docs, h, mxu=mxu, parts=parts)
    return output_combine(z, inter, v_new, scale=scale, mxu=mxu)


def output_dz(v_new, do, *, scale: float, mxu, parts: int) -> dict:
    """The cotangent of the scores, ``scale · dO V'ᵀ``, on the lower tile blocks."""
    vt, dot_ = split_rows(v_new, parts), split_rows(do, parts)
    return {
        (i, j): scale * dot(dot_[i].astype(mxu), vt[j].astype(mxu), trans_b=True)
        for i in range(parts)
        for j in range(i + 1)
    }


def output_dz_stacked(v_new, do, *, scale: float, mxu, parts: int):
    """The score cotangent ``scale · dO V'ᵀ`` for ``BlockConfig.stacked_pairs``: ``(diagonal blocks
    {(i, i)}, dZ[:, tile j] for j < parts − 1, [None] + dZ[tile i, :]ᵀ for i ≥ 1)``, every
    off-diagonal piece one ``[C, n]`` product of the whole chunk (``v_new``, ``do`` whole ``[C, E]``)."""
    vt, dot_ = split_rows(v_new, parts), split_rows(do, parts)
    v_mxu, do_mxu = v_new.astype(mxu), do.astype(mxu)
    diag = {(i, i): scale * dot(dot_[i].astype(mxu), vt[i].astype(mxu), trans_b=True) for i in range(parts)}
    cols = [scale * dot(do_mxu, vt[j].astype(mxu), trans_b=True) for j in range(parts - 1)]
    rows_t = [None] + [scale * dot(v_mxu, dot_[i].astype(mxu), trans_b=True) for i in range(1, parts)]
    return diag, cols, rows_t


def output_backward(
    q, k, b, docs: Docs | None, h, dz: dict, do, *, scale: float, mode: GateMode, mxu, parts: int, whole=None
):
    """Tiles ``(dq, dk, db)`` of the output's dependence on q, k, b given ``dO`` and ``dz =
    output_dz(...)`` (float32); the cotangents of ``h`` and ``V'`` are the state pass's
    (``dvn_from_scores``, the reverse pass). Separate in the key channels: q, k, b restricted to some
    columns and ``h`` to those rows give those columns. ``whole`` (per-channel gates,
    ``BlockConfig.stacked_pairs``): ``(b, doc [C] or None)`` whole, with ``dz`` from
    ``output_dz_stacked``: the off-diagonal pairs' cotangents by ``channel_offdiag_stacked_vjp``."""
    qt, kt, bt, dt = split_rows(q, parts), split_rows(k, parts), split_rows(b, parts), split_docs(docs, parts)
    ft = [to_row_factor(x, d) for x, d in zip(bt, dt, strict=True)]
    h_mxu = h.astype(mxu)
    dq = [
        scale * row_scale(dot(d.astype(mxu), h_mxu, trans_b=True), f)
        for d, f in zip(split_rows(do, parts), ft, strict=True)
    ]
    dk = [jnp.zeros(x.shape, F32) for x in kt]
    stacked = whole is not None and mode in CHANNEL_MODES and parts > 1
    if stacked:
        diag, cols, rows_t = dz
        b_whole, doc = whole
        dq_off, dk_off = channel_offdiag_stacked_vjp(b_whole, qt, kt, bt, cols, rows_t, doc, mxu)
        dq = [a + c for a, c in zip(dq, split_rows(dq_off, parts), strict=True)]
        dk = split_rows(dk_off, parts)
        dz = diag
    for i in range(parts):
        for j in range(i if stacked else 0, i + 1):
            pair = make_pair(qt[i], kt[j], bt[i], bt[j], dt[i], dt[j], diag=i == j, causal="inclusive")
            dqi, dkj = gated_product_vjp(pair, dz[i, j], mode, mxu)
            dq[i], dk[j] = dq[i] + dqi, dk[j] + dkj
    if mode == "none":
        return dq, dk, [None] * parts
    db = [
        reduce_gate(x.astype(F32) * dx, mode) - reduce_gate(y.astype(F32) * dy, mode)
        for x, dx, y, dy in zip(qt, dq, kt, dk, strict=True)
    ]
    return dq, dk, db


def dvn_from_scores(z: dict, do, *, scale: float, mxu, parts: int) -> list:
    """The output's cotangent of ``V'`` per tile, ``scale · Zᵀ dO``, from the score blocks."""
    dot_ = split_rows(do, parts)
    return [
        scale * sum(dot(z[i, j].astype(mxu), dot_[i].astype(mxu), trans_a=True) for i in range(j, parts))
        for j in range(parts)
    ]


def state_dw(h, dv_new, *, mxu, parts: int = 1) -> list:
    """Tiles of ``dW = −dV' hᵀ``: the state step's cotangent of W (``dV'`` total)."""
    h_mxu = h.astype(mxu)
    return [-dot(x.astype(mxu), h_mxu, trans_b=True) for x in split_rows(dv_new, parts)]


def state_backward(k, b, docs: Docs | None, h, dh, v_new, *, mode: GateMode, mxu, parts: int = 1):
    """Tiles ``(dk, db)`` of one chunk's state step through ``K̃`` and ``γ`` given the cotangent
    ``dh`` of the state leaving it; db includes the last row's terms."""
    kt, bt, dt, vt = split_rows(k, parts), split_rows(b, parts), split_docs(docs, parts), split_rows(v_new, parts)
    b_last = None if bt[-1] is None else last_row(bt[-1])
    dh_mxu = dh.astype(mxu)
    dk, k_dk = [], []
    for i in range(parts):
        _, to_end, gamma = gate_factors(bt[i], dt[i], b_last)
        dk.append(row_scale(dot(vt[i].astype(mxu), dh_mxu, trans_b=True), to_end))
        if mode != "none":
            k_dk.append(reduce_gate(kt[i].astype(F32) * dk[i], mode))
    if mode == "none":
        return dk, [None] * parts
    h_dh = jnp.sum(h.astype(F32) * dh.astype(F32), axis=1)  # [D]
    last = sum(jnp.sum(x, axis=0) for x in k_dk) + gamma * (jnp.sum(h_dh) if mode == "scalar" else h_dh)
    pos = lax.broadcasted_iota(jnp.int32, k_dk[-1].shape, 0)
    db = [-x for x in k_dk[:-1]] + [jnp.where(pos == k_dk[-1].shape[0] - 1, last, 0.0) - k_dk[-1]]
    return dk, db
