"""Gated products between two row tiles of a chunk, and their cotangents: the per-channel (and
scalar) decay ``Γ[i, j] = exp(b_i − b_j)`` that the gated delta rule's chunk math (``common``) and
the per-channel linear-attention kernels put between queries or keys.

``Z[i, j] = Σ_d x_id y_jd exp(b_id − b_jd)`` on a tile pair's allowed pairs (causal inside a diagonal
tile, same document). ``b`` is a plain cumulative sum of log gates ≤ 0 inside the chunk (not reset
at document starts; padding adds zeros), so it never increases along the rows, and every factor
below is an exp of a non-positive difference except the middle-row factors of ``"channel_bounded"``
(up to ``e^DIAG_FACTOR_LIMIT``):

- scalar gates: one product, then the ``[n, m]`` decay;
- per-channel gates, two different tiles (x strictly after y): factored around the y tile's
  last row, ``(x ⊙ e^{b − r}) (y ⊙ e^{r − b})ᵀ``, both factors ≤ 1;
- per-channel gates inside one diagonal tile of n rows, gate mode ``"channel_bounded"`` (every tile's
  factors bounded: ``diag_tiles_bounded``, checked on the whole input before the kernels run):
  factored around its middle row r (the last of its first half), ``(x ⊙ e^{b − b_r}) (y ⊙ e^{b_r −
  b})ᵀ``, one product like the pairs of two tiles, with factors up to ``e^DIAG_FACTOR_LIMIT``;
- per-channel gates inside one diagonal tile, mode ``"channel"`` (exact for any gates): the products
  form the pairs directly (``[n, n, D]``), their cotangents go by levels of masked products
  (``_channel_diag_levels``).

The gradient of the log gates follows one rule: a product ``Σ_d x_id y_jd exp(b_id − b_jd)`` gives
``∂/∂b_i = x_i ⊙ dx_i`` and ``∂/∂b_j = −y_j ⊙ dy_j``, with dx, dy the cotangents returned here.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import F32, dot

GateMode = Literal["none", "scalar", "channel", "channel_bounded"]
# per-channel gates: "channel_bounded" differs only in how diagonal tiles form their products
CHANNEL_MODES = ("channel", "channel_bounded")


def _pair_mask(n: int, m: int, *, causal: str | None, doc_i, doc_j):
    """Boolean ``[n, m]`` pairs mask (None: all pairs): causal ``"strict"`` / ``"inclusive"`` for a
    diagonal tile, same document with ``doc_i`` / ``doc_j`` (``common.Docs`` of the two tiles, or None)."""
    mask = None
    if causal is not None:
        row = lax.broadcasted_iota(jnp.int32, (n, m), 0)
        col = lax.broadcasted_iota(jnp.int32, (n, m), 1)
        mask = col < row if causal == "strict" else col <= row
    if doc_i is not None:
        same = doc_i.doc[:, None] == doc_j.doc[None, :]
        mask = same if mask is None else mask & same
    return mask


def _masked_exp(diff, mask):
    if mask is None:
        return jnp.exp(diff)
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


class Pair(NamedTuple):
    """Two tiles whose gated product ``Z[i, j] = Σ_d x_id y_jd exp(b_id − b_jd)`` is formed.

    ``diag``: the same tile (pairs inside it, causal) or the x tile strictly after the y tile.
    """

    x: jax.Array
    y: jax.Array
    bx: jax.Array | None
    by: jax.Array | None
    mask: jax.Array | None
    diag: bool


def make_pair(x, y, bx, by, doc_x, doc_y, *, diag: bool, causal: str) -> Pair:
    mask = _pair_mask(x.shape[0], y.shape[0], causal=causal if diag else None, doc_i=doc_x, doc_j=doc_y)
    return Pair(x, y, bx, by, mask, diag)


def _channel_offdiag_factors(p: Pair):
    """(x ⊙ e^{bx − r}, y ⊙ e^{r − by}) around the reference r = min over the y tile (its last row
    for log gates ≤ 0), so both factors are ≤ 1."""
    ref = jnp.min(p.by, axis=0, keepdims=True)
    return jnp.exp(p.bx - ref), jnp.exp(ref - p.by)


# the largest exponent of a diagonal tile's middle-row factors: e^40 ≈ 2.4e17, so the kept pairs'
# partial sums (each bounded by a true decay ≤ 1 times the entries, or by one factor times them)
# stay far from float32's 3.4e38 for entries up to ~1e10; the pairs masked away may overflow
# (up to e^80 per term), which the select drops. Log gates ≥ −5 per token keep a 16-row tile's
# half-spans (7 and 8 steps from its middle row) at or below 40. float32 and bf16 operands hold
# such factors; fp16 operands (largest 65504 ≈ e^11) do not, so float16 inputs always take the
# exact form (``factored_diagonals_allowed``).
DIAG_FACTOR_LIMIT = 40.0
# what the check allows past the limit: float32 rounding of the chunk-local cumulative sums (gates
# just inside −5 per token give spreads of 40.00003; the sums reach a few hundred, ulp ~3e-5, so the
# error stays below n·ulp ≈ 2e-3 for 64-token chunks); e^(40 + 2^-6) is as harmless as e^40
DIAG_FACTOR_ROUNDING = 2.0**-6


def _channel_diag_mid_factors(p: Pair):
    """``(e^{bx − b_r}, e^{b_r − by})`` around the diagonal tile's middle row r (the last of its
    first half; b non-increasing, so rows before r give factors ≥ 1 and rows after it ≤ 1)."""
    n = p.x.shape[0]
    pos = lax.broadcasted_iota(jnp.int32, p.by.shape, 0)
    ref = jnp.sum(jnp.where(pos == n // 2 - 1, p.by, 0.0), axis=0, keepdims=True)
    return jnp.exp(p.bx - ref), jnp.exp(ref - p.by)


def diag_tiles_bounded(b: jax.Array, rows: int, *, axis: int = 1) -> jax.Array:
    """Whether every diagonal tile's middle-row factors (``_channel_diag_mid_factors``) stay at
    or below ``e^DIAG_FACTOR_LIMIT`` (up to their rounding, ``DIAG_FACTOR_ROUNDING``): a boolean
    scalar from the chunk-local cumulative log gates
    ``b`` (time on ``axis``, cut into tiles of ``rows``; tiles never straddle chunks). False where
    b is not finite (the comparison with NaN fails), so such input takes the exact path."""
    b = jnp.moveaxis(b, axis, 0)
    tiles = b.reshape((b.shape[0] // rows, rows) + b.shape[1:])
    spread = jnp.abs(tiles - tiles[:, rows // 2 - 1 : rows // 2])
    return jnp.max(spread) <= DIAG_FACTOR_LIMIT + DIAG_FACTOR_ROUNDING


def factored_diagonals_allowed(b: jax.Array, rows: int, dtype, *, axis: int = 1) -> jax.Array | None:
    """The choice between the two per-channel forms for inputs of ``dtype`` with cumulative log gates
    ``b``: None (the exact form, no choice at run time) for float16 inputs, whose fp16 matmul
    operands cannot hold factors up to e^40 (bf16 and float32 share float32's exponent range), else
    ``diag_tiles_bounded(b, rows, axis=axis)``."""
    if jnp.dtype(dtype) == jnp.float16:
        return None
    return diag_tiles_bounded(b, rows, axis=axis)


def check_gate_lower_bound(bound, name: str = "gate_lower_bound") -> None:
    """A log-gate floor must be None or a finite negative number (ValueError naming ``name``)."""
    if bound is None:
        return
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not -float("inf") < bound < 0:
        raise ValueError(
            f"{name} must be None or a finite negative Python or numpy number (a static floor on the log gates: "
            f"it picks the kernels), got {bound!r}"
        )


def floor_gates(g, bound):
    """``g`` with every log gate below ``bound`` raised to it (None: ``g`` unchanged), in float32 (float64
    stays): what ``gate_lower_bound`` means for every implementation. The gradient passes where g is at
    or above the bound and is zero below it."""
    if bound is None or g is None:
        return g
    g = g.astype(jnp.promote_types(g.dtype, F32))
    return jnp.where(g < bound, jnp.asarray(bound, g.dtype), g)


def _bound_allows(bound: float, rows: int) -> bool:
    """Whether log gates ≥ ``bound`` keep every ``rows``-row diagonal tile's middle-row factors within
    ``e^DIAG_FACTOR_LIMIT``: the farthest row is ``rows // 2`` tokens from the middle row (float32
    rounding of the sums adds what ``DIAG_FACTOR_ROUNDING`` allows the run-time check)."""
    return (rows // 2) * -bound <= DIAG_FACTOR_LIMIT


def _cases(statics, rows: int) -> tuple[int, int]:
    """``(lowest, highest)`` case the kernels factoring up to ``rows`` rows can take under per-channel
    gates: highest 2 where ``rows`` exceeds ``channel_rows``, else 1; lowest 0, or what the statics'
    gate floor guarantees (``gate_floor``: the delta rule's ``gate_lower_bound``, kept only for bf16 /
    float32 inputs, whose gates were raised to it): 1 where it bounds the ``channel_rows`` tiles'
    factors (≥ −5 for 16 rows), the highest where it bounds those of ``rows`` rows too."""
    cfg = statics.cfg
    top = 2 if rows > cfg.channel_rows else 1
    bound = getattr(statics, "gate_floor", None)
    if bound is None or not _bound_allows(bound, cfg.channel_rows):
        return 0, top
    return (top if _bound_allows(bound, rows) else 1), top


def static_case(statics) -> int | None:
    """The backward's case (``gate_case(..., backward=True)``) where the gate floor fixes it at trace
    time (a Python int), else None: what ``case_of`` gives back for a residual's ``kept_case``."""
    if statics.mode != "channel":
        return None
    low, top = _cases(statics, statics.cfg.factored_rows)
    return top if low == top else None


def kept_case(case):
    """What a residual keeps of ``gate_case``'s case: None for a trace-time int (a residual would
    turn it into an array, and the backward would switch again); ``case_of(kept, statics)`` undoes it."""
    return None if isinstance(case, int) else case


def case_of(kept, statics):
    """The case a residual's ``kept_case`` stands for (the backward's: ``backward=True``)."""
    return static_case(statics) if kept is None else kept


def gate_case(b, statics, dtype, *, backward: bool = True):
    """Under per-channel gates, which kernels the chunk-local cumulative log gates ``b`` (``[B, T',
    Hv, D]``) allow, as an int32 scalar: 0 the exact kernels, 1 diagonal tiles factored around their
    middle row on ``channel_rows`` sub-tiles, 2 factored on the larger sub-tiles the config asks of
    some kernels (``BlockConfig.output_rows`` / ``wy_bwd_rows``: ``factored_rows``, or without
    ``backward`` the forward kernels' ``forward_factored_rows``); case 2 exists only where those are
    larger than ``channel_rows``. None (the exact kernels, no switch) for other gates and for float16
    inputs (``products.factored_diagonals_allowed``). Every tile of a size is checked over the whole
    input; a tile of 32 rows that passes implies its two 16-row halves pass (b is non-increasing
    inside a chunk), but case 2 asks both anyway. A gate floor (``_cases``) skips the checks it
    settles: where it leaves one case, that case as a Python int (no check at all).
    ``statics``: the delta rule's, or the per-channel linear attention's (``b`` ``[R, T', H, D]``;
    ``by_gates`` says what their configs share)."""
    if statics.mode != "channel" or jnp.dtype(dtype) == jnp.float16:
        return None
    cfg = statics.cfg
    rows = cfg.factored_rows if backward else cfg.forward_factored_rows
    low, top = _cases(statics, rows)
    if low == top:
        return top
    small = factored_diagonals_allowed(b, cfg.channel_rows, dtype, axis=1) if low == 0 else jnp.bool_(True)
    case = small.astype(jnp.int32)
    if top == 2:
        case = case + (small & factored_diagonals_allowed(b, rows, dtype, axis=1)).astype(jnp.int32)
    return case


def by_gates(case, statics, fn, *, rows: int | None = None):
    """``fn(statics)``, under per-channel gates as one ``lax.switch`` on ``gate_case``'s ``case``:
    the exact kernels (mode ``"channel"``), the kernels with factored diagonal tiles (mode
    ``"channel_bounded"``) on ``channel_rows`` sub-tiles, and (where the kernels ``fn`` runs factor
    larger tiles: ``rows``, default ``cfg.factored_rows``, above ``channel_rows``) the factored kernels
    on those (where they do not, case 2 runs the ``channel_rows`` factored form, whose check case 2
    passed too). The larger sub-tiles are only for the factored form: the exact kernels always take
    ``channel_rows`` (``cfg.small_tiles()``). Forms below the gate floor's lowest case (``_cases``)
    are not built; one form left (or a Python int case) runs without a switch. ``statics``: the delta
    rule's or the per-channel linear attention's (``linear_attention.channel_common.ChannelStatics``;
    their configs share ``channel_rows``, ``factored_rows``, ``forward_factored_rows`` and
    ``small_tiles``).
    H200, KDA (1, 32K, 16, 128) bf16 fwd+bwd: 24.6 → 15.3–15.7 ms (session 17, factored against
    exact); a branch per tile inside the kernels instead measured 19.58 ms (both forms' registers in
    every kernel); 32-row output / WY-backward tiles 9.62 → 8.88 ms of device time (session 23).
    The delta rule's callers: ``pallas_triton`` and ``pallas_triton_split``; the per-channel linear
    attention's: ``linear_attention.pallas_triton_channel`` and its ``_vjp``."""
    if statics.mode != "channel":
        return fn(statics)
    cfg = statics.cfg
    small = dataclasses.replace(statics, cfg=cfg.small_tiles())
    if case is None:
        return fn(small)
    low, top = _cases(statics, cfg.factored_rows if rows is None else rows)
    bounded = "channel_bounded"
    forms = [small, dataclasses.replace(small, mode=bounded), dataclasses.replace(statics, mode=bounded)]
    branches = [functools.partial(fn, st) for st in forms[low : top + 1]]
    if len(branches) == 1:
        return branches[0]()
    if isinstance(case, int):
        return branches[min(max(case, low), top) - low]()
    return lax.switch(jnp.clip(case, low, top) - low, branches)


def _channel_diag_levels(p: Pair, mxu):
    """The pairs of a diagonal tile (n rows, a power of two) by levels, each one masked product.

    A strictly lower pair (i, j) belongs to level t, the highest bit in which i and j differ: i is
    in the second half, j in the first half of the same block of 2^(t+1) rows. Around that block's
    reference row r (the last row of its first half) the decay factors as
    ``exp(b_i − b_r) · exp(b_r − b_j)``, both ≤ 1 for log gates ≤ 0, so level t is one product of
    ``x ⊙ e^{b − b_r}`` (rows in a second half, else 0) and ``y ⊙ e^{b_r − b}`` (rows in a first
    half, else 0), masked to its pairs. This needs b non-increasing along the tile's rows (log
    gates ≤ 0, no reset at document starts: the kernels' cumulative sums), else a factor can
    exceed 1 and overflow where the pair tensor would have masked the pair away. The cotangents
    use it (log2(n) products in place of two ``[n, D, n]`` pair tensors: H200, KDA (1, 32K, 16,
    128) bf16 fwd+bwd 40.55 → 33.55 ms at 8 warps, 26.89 ms at 4); the forward products keep the
    pair tensor (levels there: 10.02 vs 9.17 ms).
    Yields ``(level mask [n, n], x operand, y operand, x factor, y factor)``; the operands are in
    ``mxu``, the factors float32 ``[n, D]``. The tile's own b (bx and by are the same rows) gives
    the reference rows, picked by an exact one-hot product.
    """
    n, d = p.x.shape
    if n & (n - 1):  # a reference row past the tile would select nothing (b_ref = 0: overflow)
        raise ValueError(f"per-channel diagonal tiles need a power-of-two row count, got {n}")
    row = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    col = lax.broadcasted_iota(jnp.int32, (n, n), 1)
    pos = lax.broadcasted_iota(jnp.int32, (n, d), 0)
    x, y = p.x.astype(F32), p.y.astype(F32)
    t = 0
    while (1 << t) < n:
        ref = ((row >> (t + 1)) << (t + 1)) + (1 << t) - 1
        b_ref = dot(jnp.where(col == ref, 1.0, 0.0).astype(F32), p.by.astype(F32))  # [n, D]: b at each row's reference
        second = ((pos >> t) & 1) == 1
        fx = _masked_exp(p.bx - b_ref, second)
        fy = _masked_exp(b_ref - p.by, ~second)
        level = (row > col) & ((row ^ col) >> t == 1)
        yield level, (x * fx).astype(mxu), (y * fy).astype(mxu), fx, fy
        t += 1


def _channel_diag_decay(p: Pair):
    """``[n, n, D]`` ``exp(b_id − b_jd)`` on the masked pairs of a diagonal tile (zero elsewhere)."""
    diff = p.bx[:, None, :] - p.by[None, :, :]
    mask = jnp.ones(diff.shape[:2], bool) if p.mask is None else p.mask
    return _masked_exp(diff, jnp.broadcast_to(mask[:, :, None], diff.shape))


def _channel_diag_vjp(p: Pair, dz, mxu):
    """``(dx, dy)`` of a diagonal tile's per-channel product given ``dz`` (float32), level by level
    (the diagonal itself, ``Σ_d x_id y_id``, where the mask includes it)."""
    n = p.x.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    col = lax.broadcasted_iota(jnp.int32, (n, n), 1)
    dz = dz if p.mask is None else jnp.where(p.mask, dz, 0.0)
    dz_same = jnp.sum(jnp.where(row == col, dz, 0.0), axis=1)[:, None]
    dx, dy = dz_same * p.y.astype(F32), dz_same * p.x.astype(F32)
    for level, xf, yf, fx, fy in _channel_diag_levels(p, mxu):
        dz_level = jnp.where(level, dz, 0.0).astype(mxu)
        dx = dx + dot(dz_level, yf) * fx
        dy = dy + dot(dz_level, xf, trans_a=True) * fy
    return dx, dy


def channel_offdiag_stacked(x, y: list, bx, by: list, docs_x: list, docs_y: list, mxu) -> dict:
    """The per-channel gated products of every tile pair ``(i, j)``, ``i > j``, of one chunk, one
    ``[C, n]`` product per y tile j instead of one ``[n, n]`` product per pair.

    ``x``, ``bx``: whole ``[C, w]`` (C = parts · n rows); ``y``, ``by``, and the documents of both
    sides: lists of n-row tiles. For tile j the reference ``r_j`` is its last row (the minimum, as
    ``_channel_offdiag_factors``), and ``x ⊙ e^{bx − r_j}`` on the rows after tile j (the others
    zero: there the factor could exceed 1) meets ``y_j ⊙ e^{r_j − by_j}``: the same factors as the
    per-pair products, so the same blocks, from products with C rows (wgmma-sized on Hopper at C =
    64; the pairwise ones are n = 16 rows). Twice the multiply-adds (the zero rows).
    """
    parts, n = len(y), y[0].shape[0]
    row = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    x32 = x.astype(F32)
    out = {}
    for j in range(parts - 1):
        ref = jnp.min(by[j], axis=0, keepdims=True)
        fx = _masked_exp(bx - ref, row >= (j + 1) * n)
        fy = jnp.exp(ref - by[j])
        column = dot((x32 * fx).astype(mxu), (y[j] * fy).astype(mxu), trans_b=True)  # [C, n]
        for i, block in enumerate(jnp.split(column, parts, axis=0)[j + 1 :], start=j + 1):
            mask = _pair_mask(n, n, causal=None, doc_i=docs_x[i], doc_j=docs_y[j])
            out[i, j] = block if mask is None else jnp.where(mask, block, 0.0)
    return out


def channel_offdiag_stacked_vjp(b, xt: list, yt: list, bt: list, dz_cols: list, dz_rows_t: list, doc, mxu):
    """Cotangents ``(dx, dy)`` (whole ``[C, w]``, float32) of the off-diagonal per-channel blocks of
    one chunk (``channel_offdiag_stacked`` with x and y of the same chunk), by 64-row products.

    ``b``: whole ``[C, w]`` (the shape of dx and dy); ``xt``, ``yt``, ``bt``: x, y, b as n-row tiles; the cotangent
    of Z as ``dz_cols[j] = dZ[:, tile j]`` (``[C, n]``, j < parts − 1; rows up to tile j ignored) and
    ``dz_rows_t[i] = dZ[tile i, :]ᵀ`` (``[C, n]``, 0 < i; rows from tile i on ignored); ``doc``:
    the chunk's document numbers ``[C]`` or None (pairs across documents ignored). x's side around
    key tile j's last row (as the forward), y's side around query tile i's first row ``r_i``:
    ``(x_i ⊙ e^{b_i − r_i})`` meets ``e^{r_i − b}`` on the rows before tile i, both ≤ 1.
    """
    parts, n = len(yt), yt[0].shape[0]
    row = lax.broadcasted_iota(jnp.int32, b.shape, 0)
    col_row = lax.broadcasted_iota(jnp.int32, (b.shape[0], n), 0)
    docs_t = [None] * parts if doc is None else jnp.split(doc, parts)
    dx, dy = jnp.zeros(b.shape, F32), jnp.zeros(b.shape, F32)
    for j in range(parts - 1):  # every query row after key tile j
        mask = col_row >= (j + 1) * n
        if doc is not None:
            mask &= doc[:, None] == docs_t[j][None, :]
        ref = jnp.min(bt[j], axis=0, keepdims=True)
        y_j = (yt[j] * jnp.exp(ref - bt[j])).astype(mxu)
        dx = dx + dot(jnp.where(mask, dz_cols[j], 0.0).astype(mxu), y_j) * _masked_exp(b - ref, row >= (j + 1) * n)
    for i in range(1, parts):  # every key row before query tile i
        mask = col_row < i * n
        if doc is not None:
            mask &= doc[:, None] == docs_t[i][None, :]
        ref = jnp.max(bt[i], axis=0, keepdims=True)
        x_i = (xt[i] * jnp.exp(bt[i] - ref)).astype(mxu)
        dy = dy + dot(jnp.where(mask, dz_rows_t[i], 0.0).astype(mxu), x_i) * _masked_exp(ref - b, row < i * n)
    return dx, dy


def _factored_product(p: Pair, fx, fy, mxu):
    z = dot((p.x * fx).astype(mxu), (p.y * fy).astype(mxu), trans_b=True)
    return z if p.mask is None else jnp.where(p.mask, z, 0.0)


def _factored_vjp(p: Pair, dz, fx, fy, mxu):
    dz = (dz if p.mask is None else jnp.where(p.mask, dz, 0.0)).astype(mxu)
    dx = dot(dz, (p.y * fy).astype(mxu)) * fx
    dy = dot(dz, (p.x * fx).astype(mxu), trans_a=True) * fy
    return dx, dy


def gated_product(p: Pair, mode: GateMode, mxu):
    """``Z = (X Yᵀ ⊙ Γ)`` on the pairs of ``p`` (masked pairs zero), float32."""
    if mode in CHANNEL_MODES:
        if p.diag and mode == "channel":  # the pair tensor: faster than the levels (H200, KDA fwd 9.17 vs 10.02 ms)
            xy = p.x.astype(F32)[:, None, :] * p.y.astype(F32)[None, :, :]
            return jnp.sum(xy * _channel_diag_decay(p), axis=-1)
        factors = _channel_diag_mid_factors(p) if p.diag else _channel_offdiag_factors(p)
        return _factored_product(p, *factors, mxu)
    z = dot(p.x.astype(mxu), p.y.astype(mxu), trans_b=True)
    if mode == "scalar":
        return z * _masked_exp(p.bx[:, None] - p.by[None, :], p.mask)
    return z if p.mask is None else jnp.where(p.mask, z, 0.0)


def gated_product_vjp(p: Pair, dz, mode: GateMode, mxu):
    """Cotangents ``(dx, dy)`` of the raw tiles given ``dz`` (float32); see the module docstring for
    the log-gate gradients they give."""
    if mode in CHANNEL_MODES:
        if p.diag and mode == "channel":
            return _channel_diag_vjp(p, dz, mxu)
        factors = _channel_diag_mid_factors(p) if p.diag else _channel_offdiag_factors(p)
        return _factored_vjp(p, dz, *factors, mxu)
    if mode == "scalar":
        dz = dz * _masked_exp(p.bx[:, None] - p.by[None, :], p.mask)
    elif p.mask is not None:
        dz = jnp.where(p.mask, dz, 0.0)
    dz = dz.astype(mxu)
    return dot(dz, p.y.astype(mxu)), dot(dz, p.x.astype(mxu), trans_a=True)
