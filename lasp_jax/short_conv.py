"""The causal depthwise short convolution with the sequence sharded (notes/design.md §6).

Per channel c, with a ``[W, C]`` weight whose last row multiplies the current token:

    y_t[c] = Σ_{i<W} w[i, c] · x_{t−W+1+i}[c]

Gated DeltaNet and KDA layers run it (width 4, then SiLU) over q, k and v before the delta rule.
Rank r of the sequence axis holds tokens ``[r·L, (r+1)·L)``; its first ``W − 1`` outputs read the
``W − 1`` inputs before its shard, which it receives from rank r − 1 by one non-cyclic
``ppermute`` of ``[B, W−1, C]`` (from the ``⌈(W−1)/L⌉`` ranks before it when a shard is shorter
than ``W − 1``). Rank 0 has nothing before it: the inputs before global token 0 are
``initial_state`` (a decoding cache) or zeros. Packed documents (``segment_ids``): an input of
another document than the output's counts as zero (a second small ``ppermute`` brings the previous
ids); ``initial_state`` belongs to each row's first document, as in the delta rule.

``final_state`` is the last ``W − 1`` inputs of the whole sequence (those of the last document
only), the cache a token-by-token decoder continues from with ``short_conv_step``. Everything is
jnp and collectives. With a cache, or shards shorter than ``W − 1``, it differentiates by autodiff
(the ``ppermute``'s transpose sends the borrowed inputs' cotangents back to the rank that owns
them); training's case, shards of at least ``W − 1`` tokens without a cache, is one ``custom_vjp``
(``_halo_conv``) whose backward does that by hand without shard-sized zero pads or copies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from lasp_jax.mesh import axes_tuple, check_mesh, mesh_size
from lasp_jax.state_passing import broadcast_from, varying_axes
from pallas_kernels.common import acc_dtype


def _check(x, weight, segment_ids, initial_state):
    if x.ndim != 3:
        raise ValueError(f"x must have rank 3 [B, T, C], got x.shape={tuple(x.shape)}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[2] or weight.shape[0] < 1:
        raise ValueError(f"weight must be [W, C] with C={x.shape[2]}, got weight.shape={tuple(weight.shape)}")
    b, t, c = x.shape
    if segment_ids is not None:
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be an integer array, got segment_ids.dtype={segment_ids.dtype}")
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [B, T]={(b, t)}, got segment_ids.shape={tuple(segment_ids.shape)}")
    want = (b, weight.shape[0] - 1, c)
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"initial_state must be [B, W-1, C]={want}, got initial_state.shape={initial_state.shape}")


def _tap_masks(ids, width: int, length: int):
    """For ``ids`` ``[B, W−1+L]`` (the inputs before the shard, then the shard's), ``[W, B, L]`` bool:
    tap i of output t reads an input of the output's own document (no id change between them)."""
    starts = ids[:, 1:] != ids[:, :-1]  # starts[:, e − 1]: input e opens a new document
    ok = jnp.ones((ids.shape[0], length), bool)
    masks = [ok]
    for i in range(width - 2, -1, -1):
        ok = ok & ~starts[:, i : i + length]  # input t+i+1 (extended index) must not open a document
        masks.append(ok)
    return jnp.stack(masks[::-1])


def _convolve(extended, weight, masks):
    """``extended`` ``[B, W−1+L, C]`` → ``[B, L, C]`` (float32 sums, the input's dtype out)."""
    width = weight.shape[0]
    length = extended.shape[1] - (width - 1)
    acc = acc_dtype(extended.dtype, weight.dtype)
    xf, wf = extended.astype(acc), weight.astype(acc)
    y = jnp.zeros((extended.shape[0], length, extended.shape[2]), acc)
    for i in range(width):
        tap = xf[:, i : i + length] * wf[i]
        y = y + (tap if masks is None else jnp.where(masks[i][..., None], tap, 0.0))
    return y.astype(extended.dtype)


def _last_inputs(extended, ext_ids, width: int):
    """The last ``W − 1`` inputs, zero where they belong to an earlier document than the last token."""
    last = extended[:, extended.shape[1] - (width - 1) :]
    if ext_ids is None:
        return last
    # taps 0 … W−2 of the output after the sequence read exactly these inputs; the next token is
    # the last document's (its id repeated), so the masks say which inputs share its document
    ids = jnp.concatenate([ext_ids[:, ext_ids.shape[1] - (width - 1) :], ext_ids[:, -1:]], axis=1)
    masks = _tap_masks(ids, width, 1)[:-1, :, 0]  # [W−1, B]
    return jnp.where(jnp.moveaxis(masks, 0, 1)[..., None], last, jnp.zeros_like(last))


def short_conv_local(x, weight, *, segment_ids=None, initial_state=None, output_final_state=False):
    """The convolution of a whole sequence on one device: x ``[B, T, C]``, weight ``[W, C]``.

    Returns ``(y [B, T, C], final_state [B, W−1, C] or None)``; see the module docstring.
    """
    _check(x, weight, segment_ids, initial_state)
    n = weight.shape[0] - 1
    if initial_state is None:  # zeros before token 0: a pad, which XLA fuses into the taps' reads
        extended = jnp.pad(x, ((0, 0), (n, 0), (0, 0)))
    else:
        extended = jnp.concatenate([initial_state.astype(x.dtype), x], axis=1)
    ext_ids = None
    if segment_ids is not None:  # the inputs before token 0 are the first document's
        ext_ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], n, axis=1), segment_ids], axis=1)
    masks = None if ext_ids is None else _tap_masks(ext_ids, n + 1, x.shape[1])
    y = _convolve(extended, weight, masks)
    return y, (_last_inputs(extended, ext_ids, n + 1) if output_final_state else None)


def _varying_like(weight, x):
    """The weight typed varying along the manual axes x varies along (a checked ``shard_map``; else
    the weight itself), cast once: autodiff then sums its gradient over them in one ``psum`` of
    ``[W, C]`` instead of one per tap (the implicit cast would come at each tap's product)."""
    axes = tuple(sorted(varying_axes(x) - varying_axes(weight)))
    return jax.lax.pcast(weight, axes, to="varying") if axes else weight


def _from_ranks_before(tail, n: int, *, axis_name, size):
    """``[B, hops·m, ·]``: the tails (last m inputs) of the ``hops`` ranks before this one, oldest
    first, zeros where there is no such rank; ``hops·m ≥ n``."""
    m = tail.shape[1]
    hops = -(-n // m)
    parts = []
    for h in range(hops, 0, -1):
        if h >= size:
            parts.append(jnp.zeros_like(tail))
        else:
            parts.append(jax.lax.ppermute(tail, axis_name, perm=[(r, r + h) for r in range(size - h)]))
    return jnp.concatenate(parts, axis=1)


# ------------------------------------------------------------------ shards of at least W − 1 tokens
# Autodiff of the form above (the local convolution with its first W − 1 outputs overwritten, the last
# W − 1 inputs sliced off for the next rank) transposes each small slice or update into a zero pad, a
# zeroed copy or an add as long as the shard: about 2 GB per gdn-1.3b layer at 32K tokens, in the
# lowered program. The functions below give the same values with the borrowed inputs' contribution
# added to the first W − 1 outputs as a zero-padded [B, W − 1, C] term, and a backward written out:
# the transposed taps over dy (zero-padded reads), the borrowed inputs' cotangent (a [B, W − 1, C]
# window) sent back by one ppermute and added to the last W − 1 rows of dx in the same pass.


def _shifted(a, shift: int):
    """``a[:, t − shift]`` along axis 1, zeros where ``t − shift`` falls outside (shift may be < 0)."""
    length = a.shape[1]
    if shift >= 0:
        return jnp.pad(a[:, : length - shift], ((0, 0), (shift, 0), (0, 0)))
    return jnp.pad(a[:, -shift:], ((0, 0), (0, -shift), (0, 0)))


def _halo_conv_fwd(x, weight, ext_ids, axis_name):
    n, length = weight.shape[0] - 1, x.shape[1]
    size = int(jax.lax.axis_size(axis_name))
    acc = acc_dtype(x.dtype, weight.dtype)
    before = jax.lax.ppermute(x[:, length - n :], axis_name, perm=[(r, r + 1) for r in range(size - 1)])
    masks = None if ext_ids is None else _tap_masks(ext_ids, n + 1, length)
    # float32 sums: the shard's own taps over zeros before it, and the borrowed inputs' term on the
    # first n outputs (the window [before, 0] through the taps)
    local = _convolve(jnp.pad(x.astype(acc), ((0, 0), (n, 0), (0, 0))), weight, masks)
    window = jnp.concatenate([before.astype(acc), jnp.zeros_like(before, acc)], axis=1)
    head = _convolve(window, weight, None if masks is None else masks[:, :, :n])
    y = local + jnp.pad(head, ((0, 0), (0, length - n), (0, 0)))
    return y.astype(x.dtype), (x, weight, window, ext_ids)


@functools.partial(jax.custom_vjp, nondiff_argnames=("axis_name",))
def _halo_conv(x, weight, ext_ids, axis_name):
    """The convolution of a shard of at least n = W − 1 tokens, the n inputs before it from the
    previous rank (zeros on rank 0), ``ext_ids`` ``[B, n + L]`` their document ids and the shard's."""
    return _halo_conv_fwd(x, weight, ext_ids, axis_name)[0]


def _halo_conv_bwd(axis_name, residuals, dy):
    x, weight, window, ext_ids = residuals  # window: [before, 0] in float32
    n, length = weight.shape[0] - 1, x.shape[1]
    acc = window.dtype
    masks = None if ext_ids is None else _tap_masks(ext_ids, n + 1, length)
    wf, xf, dyf = weight.astype(acc), x.astype(acc), dy.astype(acc)
    dx = jnp.zeros(x.shape, acc)
    d_before = jnp.zeros((x.shape[0], n, x.shape[2]), acc)
    dw = []
    for i in range(n + 1):  # tap i: input t − (n − i) feeds output t
        dyi = dyf if masks is None else jnp.where(masks[i][..., None], dyf, 0.0)  # tap i's share of dy
        dx = dx + _shifted(dyi, -(n - i)) * wf[i]
        d_before = d_before + _shifted(dyi[:, :n], i) * wf[i]  # borrowed input j feeds output j − i
        dw.append(
            jnp.sum(_shifted(xf, n - i) * dyi, axis=(0, 1)) + jnp.sum(window[:, i : i + n] * dyi[:, :n], axis=(0, 1))
        )
    # the borrowed inputs' cotangent goes back to the rank they came from: its last n rows
    size = int(jax.lax.axis_size(axis_name))
    d_tail = jax.lax.ppermute(d_before, axis_name, perm=[(r + 1, r) for r in range(size - 1)])
    dx = dx + jnp.pad(d_tail, ((0, 0), (length - n, 0), (0, 0)))
    return dx.astype(x.dtype), jnp.stack(dw).astype(weight.dtype), None


_halo_conv.defvjp(_halo_conv_fwd, _halo_conv_bwd)


def short_conv_shard(
    x: jax.Array,
    weight: jax.Array,
    *,
    axis_name: str = "sp",
    segment_ids: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """The short convolution on one shard; call it inside ``jax.shard_map``.

    x ``[B, L, C]`` and ``segment_ids`` ``[B, L]``: this rank's block of the global arrays (rank r
    holds global tokens ``[r·L, (r+1)·L)``); weight ``[W, C]`` and ``initial_state`` ``[B, W−1, C]``
    (the inputs before global token 0) are the same on every rank. Returns ``(y [B, L, C],
    final_state)``; ``final_state`` (the last ``W − 1`` inputs of the whole sequence) is the same on
    every rank, None unless ``output_final_state``.
    """
    _check(x, weight, segment_ids, initial_state)
    weight = _varying_like(weight, x)
    size = int(jax.lax.axis_size(axis_name))
    rank = jax.lax.axis_index(axis_name)
    b, length, c = x.shape
    n = weight.shape[0] - 1
    if n == 0:
        return _convolve(x, weight, None), (jnp.zeros((b, 0, c), x.dtype) if output_final_state else None)
    m = min(length, n)
    ext_ids = None
    if segment_ids is not None:
        ids_before = _from_ranks_before(segment_ids[:, length - m :], n, axis_name=axis_name, size=size)[:, -n:]
        ext_ids = jnp.concatenate([ids_before, segment_ids], axis=1)
        # inputs before global token 0 belong to its document; its extended index is n − rank·L
        first = jnp.clip(n - rank * length, 0, n)
        first_id = jax.lax.dynamic_slice_in_dim(ext_ids, first, 1, axis=1)
        ext_ids = jnp.where(jnp.arange(n + length)[None, :] < first, first_id, ext_ids)
    window = None
    if length >= n and initial_state is None:  # training: a backward with no shard-sized glue
        y = _halo_conv(x, weight, ext_ids, axis_name=axis_name)
    else:
        # global position of each borrowed input: rank·L − n … rank·L − 1 (negative: before token 0)
        before = _from_ranks_before(x[:, length - m :], n, axis_name=axis_name, size=size)[:, -n:]
        position = rank * length - n + jnp.arange(n)
        if initial_state is not None:
            cached = jnp.take(initial_state.astype(x.dtype), jnp.clip(position + n, 0, n - 1), axis=1)
            before = jnp.where((position < 0)[None, :, None], cached, before)
        window = jnp.concatenate([before, x if length < n else x[:, :n]], axis=1)  # [B, n + min(L, n), C]
        if length < n:  # the borrowed inputs reach every output: one window over all of them
            masks = None if ext_ids is None else _tap_masks(ext_ids, n + 1, length)
            y = _convolve(window, weight, masks)
        else:
            # the shard's own taps as one zero-padded convolution (XLA fuses the padding into its
            # reads; a concatenate of the borrowed inputs before x costs a copy of x, ~2.4 ms per
            # gdn-1.3b layer at 32K tokens); the borrowed inputs reach only the first n outputs,
            # recomputed from a [B, 2n, C] window and written over them
            y = short_conv_local(x, weight, segment_ids=segment_ids)[0]
            head_masks = None if ext_ids is None else _tap_masks(ext_ids[:, : 2 * n], n + 1, n)
            head = _convolve(window, weight, head_masks)
            y = jax.lax.dynamic_update_slice_in_dim(y, head, 0, axis=1)
    final = None
    if output_final_state:
        last = x[:, length - n :] if length >= n else window  # ends with the shard's last n inputs
        final = broadcast_from(_last_inputs(last, ext_ids, n + 1), size - 1, axis_name)
    return y, final


def short_conv(
    x: jax.Array,
    weight: jax.Array,
    *,
    mesh: Mesh | None,
    seq_axis: str = "sp",
    batch_axis: str | tuple[str, ...] | None = None,
    segment_ids: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """The causal depthwise convolution of global arrays, the sequence sharded over ``mesh[seq_axis]``.

    x ``[B, T, C]``, weight ``[W, C]`` (row ``W − 1`` multiplies the current token), segment_ids
    ``[B, T]`` integer document ids, initial_state ``[B, W−1, C]`` (the inputs before token 0).
    Returns ``(y [B, T, C] in x's dtype, final_state [B, W−1, C] or None)``, equal on every mesh to
    the single-device ``short_conv_local`` (``mesh=None``). Reverse-mode autodiff only on a sharded
    sequence without ``initial_state`` (a ``custom_vjp``): ``jax.jvp`` / ``jacfwd`` there fail.
    """
    _check(x, weight, segment_ids, initial_state)
    kwargs = dict(segment_ids=segment_ids, initial_state=initial_state, output_final_state=output_final_state)
    if mesh is None:
        return short_conv_local(x, weight, **kwargs)
    check_mesh(mesh, x.shape, seq_axis=seq_axis, batch_axis=batch_axis)
    used = (seq_axis, *axes_tuple(batch_axis))
    if mesh_size(mesh, used) == 1:
        return short_conv_local(x, weight, **kwargs)
    batch = axes_tuple(batch_axis) or None
    if batch is not None and len(batch) == 1:
        batch = batch[0]
    named = {"x": x, "segment_ids": segment_ids, "initial_state": initial_state}
    arrays = {name: a for name, a in named.items() if a is not None}
    specs = {
        "x": PartitionSpec(batch, seq_axis),
        "segment_ids": PartitionSpec(batch, seq_axis),
        "initial_state": PartitionSpec(batch),
    }

    def per_shard(xs, w):
        return short_conv_shard(
            xs["x"],
            w,
            axis_name=seq_axis,
            segment_ids=xs.get("segment_ids"),
            initial_state=xs.get("initial_state"),
            output_final_state=output_final_state,
        )

    others_split = any(s > 1 for name, s in mesh.shape.items() if name not in used)
    partial_manual = {"axis_names": frozenset(used)} if others_split else {}
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=({name: specs[name] for name in arrays}, PartitionSpec()),
        out_specs=(PartitionSpec(batch, seq_axis), PartitionSpec(batch) if output_final_state else None),
        **partial_manual,
    )(arrays, weight)


def short_conv_step(x: jax.Array, cache: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decoding step: x ``[B, C]`` (the new input), cache ``[B, W−1, C]`` (the previous inputs,
    oldest first). Returns (the output ``[B, C]``, the cache moved on by one token)."""
    window = jnp.concatenate([cache.astype(x.dtype), x[:, None]], axis=1)
    acc = acc_dtype(x.dtype, weight.dtype)
    y = jnp.einsum("bwc,wc->bc", window.astype(acc), weight.astype(acc))
    return y.astype(x.dtype), window[:, 1:]
