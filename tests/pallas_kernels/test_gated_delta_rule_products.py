"""The per-channel diagonal tile of ``pallas_kernels.gated_delta_rule.products`` (levels of masked
products in its cotangents) against its definition ``Z[i, j] = Σ_d x_id y_jd exp(b_id − b_jd)`` on the masked pairs,
and its cotangents against ``jax.vjp`` of the definition: tiles of 16, 32 and 64 rows, strict and
inclusive causal masks, documents, and log gates whose span inside the tile reaches ~1900 (every
factor of the levels stays ≤ 1; no inf or NaN). Also the chunk math built on them: ``common.gated_dot``
(per-row factors moved onto the product) and ``common.wy_backward`` against autodiff of
``common.wy_forward``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import F32
from pallas_kernels.gated_delta_rule import common, products


def _definition(x, y, b, mask):
    diff = b[:, None, :] - b[None, :, :]
    decay = jnp.where(mask[:, :, None], jnp.exp(jnp.where(mask[:, :, None], diff, 0.0)), 0.0)
    return jnp.sum(x[:, None, :] * y[None, :, :] * decay, axis=-1)


def _tile(rng, n, d, g_max, docs):
    x = jnp.asarray(rng.standard_normal((n, d)), F32)
    y = jnp.asarray(rng.standard_normal((n, d)), F32)
    b = jnp.asarray(np.cumsum(-rng.uniform(0.0, g_max, (n, d)), axis=0), F32)
    doc = None
    if docs:
        ids = np.cumsum(np.isin(np.arange(n), [n // 3, n // 3 + 1, 3 * n // 4]))
        doc = common.Docs(jnp.asarray(ids, jnp.int32), None, None)
    return x, y, b, doc


def _diagonal_against_definition(rng, x, y, b, doc, *, causal, mode, mxu):
    """``(got, want)`` pairs for a diagonal tile: its gated product, then the cotangents of x and y
    for a random dz, against the definition (float32 copies of the operands) and ``jax.vjp`` of it."""
    pair = products.make_pair(x, y, b, b, doc, doc, diag=True, causal=causal)
    x32, y32 = x.astype(F32), y.astype(F32)
    out = [(products.gated_product(pair, mode, mxu), _definition(x32, y32, b, pair.mask))]
    dz = jnp.asarray(rng.standard_normal((x.shape[0],) * 2), F32)
    want = jax.vjp(lambda x, y: _definition(x, y, b, pair.mask), x32, y32)[1](dz)
    return out + list(zip(products.gated_product_vjp(pair, dz, mode, mxu), want, strict=True))


def _assert_close_f32(pairs):
    for got, want in pairs:
        assert np.all(np.isfinite(np.asarray(got)))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))


def _assert_close_bf16(pairs):
    for got, want in pairs:
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        assert err < 1e-2, err


@pytest.mark.parametrize("n", [16, 32, 64])
@pytest.mark.parametrize("causal", ["strict", "inclusive"])
@pytest.mark.parametrize("g_max,docs", [(0.5, False), (30.0, True)])
def test_channel_diagonal_tile_by_levels(rng, n, causal, g_max, docs):
    x, y, b, doc = _tile(rng, n, 24, g_max, docs)
    _assert_close_f32(_diagonal_against_definition(rng, x, y, b, doc, causal=causal, mode="channel", mxu=F32))


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("g_max,docs,mxu", [(0.5, False, F32), (30.0, True, F32), (2.0, True, jnp.bfloat16)])
def test_channel_offdiag_stacked_equals_the_pairs(rng, parts, g_max, docs, mxu):
    """The off-diagonal per-channel blocks of a chunk by one whole-chunk product per key tile
    (``BlockConfig.stacked_pairs``) against the pairwise products and against the definition; log
    gates up to ~30 per row (the rows before each key tile would overflow unmasked)."""
    n = 16
    x, y, b, doc = _tile(rng, parts * n, 32, g_max, docs)
    split = lambda a: list(jnp.split(a, parts, axis=0))  # noqa: E731
    xt, yt, bt = split(x), split(y), split(b)
    dt = [None] * parts if doc is None else [common.Docs(d, None, None) for d in split(doc.doc)]
    got = products.channel_offdiag_stacked(x, yt, b, bt, dt, dt, mxu)
    assert sorted(got) == [(i, j) for i in range(parts) for j in range(i)]
    pos = np.arange(parts * n)
    whole_mask = jnp.asarray(pos[:, None] > pos[None, :])  # the definition only where it is finite
    if doc is not None:
        whole_mask &= doc.doc[:, None] == doc.doc[None, :]
    want_all = _definition(x.astype(mxu).astype(F32), y.astype(mxu).astype(F32), b, whole_mask)
    for (i, j), block in got.items():
        pair = products.make_pair(xt[i], yt[j], bt[i], bt[j], dt[i], dt[j], diag=False, causal="strict")
        pairwise = products.gated_product(pair, "channel", mxu)
        want = want_all[i * n : (i + 1) * n, j * n : (j + 1) * n]
        assert np.all(np.isfinite(np.asarray(block)))
        np.testing.assert_allclose(block, pairwise, rtol=1e-6, atol=1e-6 * float(jnp.abs(pairwise).max() + 1e-30))
        tol = 2e-5 if mxu == F32 else 2e-2  # bf16: the factored operands are rounded
        np.testing.assert_allclose(block, want, rtol=tol, atol=tol * float(jnp.abs(want_all).max()))


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("g_max,docs,mxu", [(0.5, False, F32), (30.0, True, F32), (2.0, True, jnp.bfloat16)])
def test_channel_offdiag_stacked_vjp_equals_the_pairs(rng, parts, g_max, docs, mxu):
    """The cotangents of the off-diagonal per-channel blocks by 64-row products (the output backward
    with ``BlockConfig.stacked_pairs``) against the pairwise ``gated_product_vjp`` summed over the
    pairs, and against ``jax.vjp`` of the definition on the off-diagonal pairs."""
    n, c = 16, 16 * parts
    x, y, b, doc = _tile(rng, c, 32, g_max, docs)
    dz = jnp.asarray(rng.standard_normal((c, c)), F32)
    split = lambda a, axis=0: list(jnp.split(a, parts, axis=axis))  # noqa: E731
    xt, yt, bt = split(x), split(y), split(b)
    dt = [None] * parts if doc is None else [common.Docs(d, None, None) for d in split(doc.doc)]
    cols, rows = split(dz, axis=1), split(dz, axis=0)
    dx, dy = products.channel_offdiag_stacked_vjp(
        b, xt, yt, bt, cols[:-1], [None] + [r.T for r in rows[1:]], None if doc is None else doc.doc, mxu
    )
    want_dx, want_dy = [jnp.zeros((n, 32), F32) for _ in range(parts)], [jnp.zeros((n, 32), F32) for _ in range(parts)]
    for i in range(parts):
        for j in range(i):
            pair = products.make_pair(xt[i], yt[j], bt[i], bt[j], dt[i], dt[j], diag=False, causal="strict")
            dxi, dyj = products.gated_product_vjp(pair, dz[i * n : (i + 1) * n, j * n : (j + 1) * n], "channel", mxu)
            want_dx[i], want_dy[j] = want_dx[i] + dxi, want_dy[j] + dyj
    tile_of = np.arange(c) // n
    mask = jnp.asarray(tile_of[:, None] > tile_of[None, :])  # the off-diagonal blocks only
    if doc is not None:
        mask &= doc.doc[:, None] == doc.doc[None, :]
    def_dx, def_dy = jax.vjp(lambda x, y: _definition(x, y, b, mask), x, y)[1](dz)
    tol = 2e-5 if mxu == F32 else 2e-2
    for got, pairwise, definition in ((dx, want_dx, def_dx), (dy, want_dy, def_dy)):
        assert np.all(np.isfinite(np.asarray(got)))
        pairwise = jnp.concatenate(pairwise)
        scale = float(jnp.abs(definition).max())
        np.testing.assert_allclose(got, pairwise, rtol=tol, atol=tol * scale)
        np.testing.assert_allclose(got, definition, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("g_max,docs,mxu", [(0.5, False, F32), (30.0, True, F32), (2.0, True, jnp.bfloat16)])
def test_output_backward_stacked_equals_the_pairs(rng, parts, g_max, docs, mxu):
    """The output backward's q/k/gate cotangents with the stacked score cotangent
    (``output_dz_stacked``, ``output_backward(whole=...)``) against the pairwise path."""
    n, w, e = 16, 32, 16
    c_rows = parts * n
    q, k, b, doc = _tile(rng, c_rows, w, g_max, docs)
    docs_whole = None if doc is None else common.Docs(doc.doc, doc.doc[0], doc.doc[-1])
    h = jnp.asarray(rng.standard_normal((w, e)), F32)
    v_new = jnp.asarray(rng.standard_normal((c_rows, e)), F32)
    do = jnp.asarray(rng.standard_normal((c_rows, e)), F32)
    kw = dict(scale=0.7, mode="channel", mxu=mxu, parts=parts)
    dz = common.output_dz(v_new, do, scale=0.7, mxu=mxu, parts=parts)
    want = common.output_backward(q, k, b, docs_whole, h, dz, do, **kw)
    dz_stacked = common.output_dz_stacked(v_new, do, scale=0.7, mxu=mxu, parts=parts)
    whole = (b, None if doc is None else doc.doc)
    got = common.output_backward(q, k, b, docs_whole, h, dz_stacked, do, whole=whole, **kw)
    tol = 2e-5 if mxu == F32 else 2e-2
    for name, g_tiles, w_tiles in zip(("dq", "dk", "db"), got, want, strict=True):
        g, r = jnp.concatenate(g_tiles), jnp.concatenate(w_tiles)
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * float(jnp.abs(r).max()), err_msg=name)


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("g_max,docs,mxu", [(0.5, False, F32), (30.0, True, F32), (2.0, True, jnp.bfloat16)])
def test_key_grads_stacked_equals_the_blocks(rng, parts, g_max, docs, mxu):
    """The WY backward's key cotangents from whole-chunk arrays (``key_grads_stacked``,
    ``inverse_backward_whole``: ``BlockConfig.stacked_pairs``) against the 16-row block path
    (``key_grads``, ``inverse_backward``) on the same X, dX and dW: 2 and 4 tiles, strong gates,
    documents, X in the matmul dtype as the kernels store it."""
    n, w = 16, 32
    c_rows = parts * n
    k, _, b, doc = _tile(rng, c_rows, w, g_max, docs)
    k = k / jnp.linalg.norm(k, axis=1, keepdims=True)
    beta = jnp.asarray(rng.uniform(0.1, 1.0, c_rows), F32)
    whole_docs = None if doc is None else common.Docs(doc.doc, doc.doc[0], doc.doc[-1])
    chunk = common.make_chunk(k, None, beta, b, whole_docs, sub=n)
    x_blocks = common.inverse_blocks(common.gram_blocks(chunk, mode="channel", mxu=F32), chunk.beta)
    x_whole = jnp.zeros((c_rows, c_rows), F32)
    for (i, j), block in x_blocks.items():
        x_whole = x_whole.at[i * n : (i + 1) * n, j * n : (j + 1) * n].set(block)
    x_blocks = {ij: block.astype(mxu) for ij, block in x_blocks.items()}  # stored in the operand dtype
    x_whole = x_whole.astype(mxu)
    dx_whole = jnp.asarray(rng.standard_normal((c_rows, c_rows)), F32)
    dx_blocks = {(i, j): dx_whole[i * n : (i + 1) * n, j * n : (j + 1) * n] for (i, j) in x_blocks}
    da_blocks = common.inverse_backward(x_blocks, dx_blocks, mxu)
    da_whole = common.inverse_backward_whole(x_whole, dx_whole, mxu)
    tol = 2e-5 if mxu == F32 else 2e-2
    for (i, j), block in da_blocks.items():
        strict = np.tril(np.ones((n, n)), -1) if i == j else np.ones((n, n))
        got = da_whole[i * n : (i + 1) * n, j * n : (j + 1) * n]
        np.testing.assert_allclose(got, block * strict, rtol=tol, atol=tol * float(jnp.abs(block).max()))
    dw = jnp.asarray(rng.standard_normal((c_rows, w)), F32)
    want = common.key_grads(chunk, x_blocks, jnp.split(dw, parts), da_blocks, mode="channel", mxu=mxu)
    got = common.key_grads_stacked(k, b, beta, whole_docs, x_whole, dw, da_whole, parts=parts, mxu=mxu)
    for name, g_tiles, w_tiles in zip(("dk", "dbeta", "db"), got, want, strict=True):
        g, r = jnp.concatenate(g_tiles), jnp.concatenate(w_tiles)
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * float(jnp.abs(r).max()), err_msg=name)


@pytest.mark.parametrize("n", [16, 64])
@pytest.mark.parametrize("causal", ["strict", "inclusive"])
@pytest.mark.parametrize("docs", [False, True])
def test_channel_diagonal_tile_factored_at_the_bound(rng, n, causal, docs):
    """Mode ``"channel_bounded"``: the diagonal tile as one product around its middle row, against
    the definition and ``jax.vjp`` of it, with log gates that put the largest factor at exactly
    ``e^DIAG_FACTOR_LIMIT`` and entries up to ~30 (the masked pairs overflow; nothing leaks)."""
    x, y, _, doc = _tile(rng, n, 24, 0.0, docs)
    x, y = 10 * x, 10 * y
    steps = rng.uniform(0.2, 1.0, (n, 24))
    steps[0] = 0.0
    b = np.cumsum(-steps, axis=0)
    mid = n // 2 - 1
    top = products.DIAG_FACTOR_LIMIT - 1e-3  # each column at the bound (less float32 rounding)
    b = (b - b[mid]) * top / np.abs(b - b[mid]).max(axis=0)
    b = jnp.asarray(b - b[0], F32)
    assert bool(products.diag_tiles_bounded(b, n, axis=0))
    _assert_close_f32(_diagonal_against_definition(rng, x, y, b, doc, causal=causal, mode="channel_bounded", mxu=F32))


def test_channel_diagonal_tile_factored_bf16_operands(rng):
    """The factored diagonal tile with bf16 operands (gates down to −5 per token, 16 rows): the
    product and its cotangents carry the operands' rounding only."""
    x, y, b, doc = _tile(rng, 16, 32, 5.0, True)
    assert bool(products.diag_tiles_bounded(b, 16, axis=0))
    x, y = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    kw = dict(causal="inclusive", mode="channel_bounded", mxu=jnp.bfloat16)
    _assert_close_bf16(_diagonal_against_definition(rng, x, y, b, doc, **kw))


def test_diag_tiles_bounded():
    """The check that picks the factored diagonal tiles: every tile's largest distance from its
    middle row's log gate at most the limit (up to float32 rounding of the cumulative sums); a tile
    past it, NaN or -inf anywhere: False."""
    n = 16
    rows = -5.0 * (np.arange(4 * n) % n) - 20.0 * (np.arange(4 * n) // n)  # −5 per token inside a tile
    b = np.broadcast_to(rows[None, :, None, None], (2, 4 * n, 3, 8)).astype(np.float32)  # [B, T, Hv, D]
    assert bool(products.diag_tiles_bounded(jnp.asarray(b), n))  # -5 per token: half-spans 35 and 40
    worse = b.copy()
    worse[1, 3 * n + 15, 2, 5] -= 0.05  # one entry of one tile past the bound and its rounding margin
    assert not bool(products.diag_tiles_bounded(jnp.asarray(worse), n))
    worse[1, 3 * n + 15, 2, 5] += 0.05 - products.DIAG_FACTOR_ROUNDING / 2  # within the margin
    assert bool(products.diag_tiles_bounded(jnp.asarray(worse), n))
    # gates just inside -5 per token (a saturated -5·sigmoid), summed in float32 within 64-token chunks
    # as the kernels' inputs are: spreads round to 40.00003 here, which must not send the call to the
    # exact kernels
    x = np.random.default_rng(0).uniform(6, 20, (1, 4096, 2, 128))  # fixed: a seed whose sums round up
    g = -5.0 * jax.nn.sigmoid(jnp.asarray(x, jnp.float32))
    cum = jnp.cumsum(g.reshape(1, 64, 64, 2, 128), axis=2).reshape(g.shape)
    tiles = jnp.moveaxis(cum, 1, 0).reshape(-1, n, 2, 128)
    assert float(jnp.max(jnp.abs(tiles - tiles[:, n // 2 - 1 : n // 2]))) > products.DIAG_FACTOR_LIMIT
    assert bool(products.diag_tiles_bounded(cum, n))
    for bad in (np.nan, -np.inf):
        odd = b.copy()
        odd[0, 5, 0, 0] = bad
        assert not bool(products.diag_tiles_bounded(jnp.asarray(odd), n))


def test_channel_diagonal_tile_bf16_operands(rng):
    """bf16 operands (the kernels' matmul dtype for bf16 inputs): the product and its cotangents
    carry the operands' rounding only."""
    x, y, b, doc = _tile(rng, 64, 32, 2.0, True)
    x, y = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    kw = dict(causal="inclusive", mode="channel", mxu=jnp.bfloat16)
    _assert_close_bf16(_diagonal_against_definition(rng, x, y, b, doc, **kw))


def test_channel_diagonal_tile_needs_power_of_two_rows(rng):
    """A reference row past the tile would select nothing; the levels refuse such tiles."""
    x, y, b, _ = _tile(rng, 20, 8, 1.0, False)
    pair = products.make_pair(x, y, b, b, None, None, diag=True, causal="strict")
    with pytest.raises(ValueError, match="power-of-two row count, got 20"):
        products.gated_product_vjp(pair, jnp.ones((20, 20), F32), "channel", F32)


@pytest.mark.parametrize("kind", ["none", "rows", "mask", "channel"])
@pytest.mark.parametrize("trans_a", [False, True])
def test_gated_dot_equals_scaling_x_first(rng, kind, trans_a):
    """``common.gated_dot`` moves a per-row factor onto the product (or, with x transposed, onto y's
    rows): the same as scaling x's rows before the product, for every factor kind (a square y would
    hide a factor applied to the wrong axis: n ≠ m here)."""
    n, d, m = 16, 24, 8
    x = jnp.asarray(rng.standard_normal((n, d)), F32)
    factor = {
        "none": None,
        "rows": jnp.asarray(rng.uniform(0.0, 1.0, n), F32),
        "mask": jnp.asarray(rng.uniform(size=n) < 0.5),
        "channel": jnp.asarray(rng.uniform(0.0, 1.0, (n, d)), F32),
    }[kind]
    y = jnp.asarray(rng.standard_normal((n if trans_a else d, m)), F32)  # shares x's rows or columns
    want = common.dot(common.row_scale(x, factor), y, trans_a=trans_a)
    got = common.gated_dot(x, factor, y, F32, trans_a=trans_a)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["none", "scalar", "channel"])
@pytest.mark.parametrize("docs", [False, True])
def test_wy_backward_matches_autodiff_of_wy_forward(rng, mode, docs):
    """The WY form's hand-written backward (``common.wy_backward``: β's share through A from the row
    operand of ``(β ⊙ K) Kᵀ ⊙ Γ``, no Gram matrix) against ``jax.vjp`` of ``common.wy_forward`` on a
    64-token chunk of four 16-row tiles: dk, dv, dβ and db, float32, strong per-channel gates and
    documents (rows outside the entering state's document see no decay from the chunk start)."""
    c, d, e = 64, 32, 16
    k = jnp.asarray(rng.standard_normal((c, d)) / np.sqrt(d), F32)
    v = jnp.asarray(rng.standard_normal((c, e)), F32)
    beta = jnp.asarray(rng.uniform(0.05, 1.0, c), F32)
    shape = {"none": None, "scalar": (c,), "channel": (c, d)}[mode]
    b = None if shape is None else jnp.asarray(np.cumsum(-rng.uniform(0.0, 2.0, shape), axis=0), F32)
    doc = None
    if docs:
        ids = jnp.asarray(np.cumsum(np.isin(np.arange(c), [10, 11, 40])), jnp.int32)
        doc = common.Docs(ids, ids[0], ids[-1])
    dw = [jnp.asarray(rng.standard_normal((16, d)), F32) for _ in range(4)]
    du = [jnp.asarray(rng.standard_normal((16, e)), F32) for _ in range(4)]

    def forward(k, v, beta, b):
        w, u = common.wy_forward(common.make_chunk(k, v, beta, b, doc, sub=16), mode=mode, mxu=F32)
        return jnp.concatenate(w), jnp.concatenate(u)

    want = jax.vjp(forward, k, v, beta, b)[1]((jnp.concatenate(dw), jnp.concatenate(du)))
    grads = common.wy_backward(common.make_chunk(k, v, beta, b, doc, sub=16), dw, du, mode=mode, mxu=F32)
    got = [jnp.concatenate(grads.dk), jnp.concatenate(grads.dv), jnp.concatenate(grads.dbeta)]
    if b is not None:
        db = jnp.concatenate([x[:, None] if x.ndim == 1 else x for x in grads.db]).reshape(b.shape)
        got.append(db)
    for name, g, w in zip(("dk", "dv", "dbeta", "db"), got, want, strict=False):
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()), err_msg=name)


@pytest.mark.parametrize("n", [16, 64])
def test_unit_lower_inverse_on_bf16_operands(rng, n):
    """``inverse_precision="bf16"``: the doubling's products on bf16 operands stay within 2e-2 of the
    exact inverse (relative to its largest entry) for unit keys with β ≤ 1, where X rounded to bf16 is
    already 4e-3 off; the float32 products are exact to 1e-5. The two differ (the option is used)."""
    k = rng.standard_normal((n, 64))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    a = np.tril(rng.uniform(0, 1, (n, 1)) * (k @ k.T), -1)
    want = np.linalg.inv(np.eye(n) + a)
    a32 = jnp.asarray(a, jnp.float32)
    exact = np.asarray(common.unit_lower_inverse(a32), np.float64)
    low = np.asarray(common.unit_lower_inverse(a32, common.BF16_PRODUCTS), np.float64)
    scale = np.abs(want).max()
    assert np.abs(exact - want).max() < 1e-5 * scale
    assert 0 < np.abs(low - want).max() < 2e-2 * scale
    blocks = {(i, j): a32[16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)] for i in range(n // 16) for j in range(i + 1)}
    by_blocks = common.block_inverse(blocks, n // 16, common.BF16_PRODUCTS)
    for (i, j), x in by_blocks.items():
        ref = want[16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)]
        assert np.abs(np.asarray(x, np.float64) - ref).max() < 2e-2 * scale, (i, j)
