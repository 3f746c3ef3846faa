"""The LASP layer on one shard: one ``jax.custom_vjp`` around local kernels and state passing.

Forward, on rank r of the sequence axis (notes/design.md §2):

1. ``M_r = Σ_j exp(b_{L-1} − b_j) k_jᵀ v_j`` (one pass over k and v, float32 accumulation) and
   the shard decay ``log Γ_r = b_{L-1}``, with ``b`` the cumulative log decay inside the shard;
2. the entering state ``S_in(r)`` from the other ranks (``state_passing``: ring or allgather;
   ``scan``: the log-depth scan);
3. the local kernel ``pallas_kernels.linear_attention(..., initial_state=S_in(r))``, which
   returns the true output and the state leaving the shard.

Backward, with ``dO`` given:

1. ``dM_r = scale · Σ_i exp(b_i) q_iᵀ dO_i`` (one pass over q and dO);
2. the cotangent of the leaving state ``dS_out(r)`` from the ranks to the right (reverse
   direction, the only communication of the backward);
3. the local kernel's backward at the saved ``S_in(r)`` with cotangents ``(dO, dS_out(r))``,
   which yields dq, dk, dv, dg / dg_gamma and the cotangent of ``S_in`` (d initial_state on rank 0).

The forward keeps the local kernel's residuals and ``S_in(r)`` (LASP's KV-state cache), so
nothing but the state cotangents crosses devices in the backward.

Packed documents (``segment_ids``): a boundary is wherever the id changes along the GLOBAL
sequence, so each rank first receives the last id of rank r − 1 (one ``ppermute`` of ``[B]``
integers) to know whether a boundary falls exactly at its first token. Then, per row:

- ``M_r`` counts only the shard's last document (the state leaving the shard);
- ``Γ_r = 0`` when a boundary lies inside the shard or at its start (the entering state does not
  survive the shard); the state passes carry it as a log decay of ``-1e30``, whose exp is exactly 0;
- ``S_in(r)`` reaches only the tokens before the shard's first boundary: it is the local kernel's
  ``initial_state`` with the local segment ids (the kernel applies it to the first local document),
  zeroed when a boundary sits at the shard's first token;
- backward mirrors it: ``dM_r`` counts only the tokens before the first boundary (none when the
  shard starts a document), and the reverse pass uses the same ``Γ``.

Per-key-channel gates (GLA, ``g [B, L, H, D]``, notes/design.md §6) change only the shape of the
decays: ``log Γ_r`` is ``[B, H, D]`` (the sum of g over the shard per channel) and scales the rows
of the states it meets, ``M_r`` weighs each key channel by its own ``exp(b_{L-1} − b_j)`` and ``dM_r``
each query channel by ``exp(b_i)``; every strategy runs the same code on either shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lasp_jax import scan, state_passing
from pallas_kernels import linear_attention
from pallas_kernels.common import acc_dtype
from pallas_kernels.linear_attention import pallas_triton, pallas_triton_channel, reference
from pallas_kernels.linear_attention.api import interpret_pallas, resolve_impl


@dataclasses.dataclass(frozen=True)
class LaspConfig:
    """Static parameters of one LASP layer call (hashable: the custom_vjp's nondiff argument)."""

    axis_name: Any
    size: int
    strategy: str
    scale: float
    impl: str
    output_final_state: bool
    # each differentiable input's name, dtype and the manual axes it varies along (empty when the
    # enclosing shard_map does not check varying axes)
    inputs: tuple[tuple[str, Any, frozenset], ...] = ()
    vma_checked: bool = False
    # the same Γ on every rank (g_gamma or no decay, no documents): the scan need not send it
    shared_decay: bool = False
    # g [B, L, H, D]: a log decay per key channel (the Pallas path runs the per-channel kernels)
    per_channel: bool = False


# log Γ of a shard whose entering state does not reach its end (a document boundary inside or at
# its start): exp gives exactly 0, and sums of P of them stay finite in float32 (no inf − inf)
RESET_LOG_DECAY = -1e30


@dataclasses.dataclass(frozen=True)
class Segments:
    """Document structure of one shard's rows (packed documents; not differentiable).

    ``doc`` ``[B, L]`` int32: local document index (0 for the document the shard starts in, +1
    wherever the id changes inside the shard); ``starts_new`` ``[B]`` bool: a boundary falls exactly
    at the shard's first token (the previous rank's last id differs; never on rank 0).
    """

    doc: jax.Array
    starts_new: jax.Array

    def reaches_state_in(self, dtype):
        """``[B, L]``: 1 for tokens that see the entering state (before the first boundary)."""
        return ((self.doc == 0) & ~self.starts_new[:, None]).astype(dtype)

    def feeds_state_out(self, dtype):
        """``[B, L]``: 1 for tokens of the shard's last document (they make the leaving state)."""
        return (self.doc == self.doc[:, -1:]).astype(dtype)

    def resets(self):
        """``[B]``: the entering state does not survive the shard (Γ = 0)."""
        return (self.doc[:, -1] != 0) | self.starts_new

    def shard_log_gamma(self, log_gamma):
        """``log Γ`` ``[B, H(, D)]`` with ``RESET_LOG_DECAY`` for the rows whose entering state does not survive."""
        resets = self.resets().reshape((-1,) + (1,) * (log_gamma.ndim - 1))
        return jnp.where(resets, RESET_LOG_DECAY, log_gamma)

    def unless_starts_new(self, state):
        """A ``[B, H, D, E]`` entering state (or its cotangent), zero in the rows that start a new
        document at the shard's first token (nothing enters them)."""
        return jnp.where(self.starts_new[:, None, None, None], jnp.zeros_like(state), state)


jax.tree_util.register_dataclass(Segments, data_fields=["doc", "starts_new"], meta_fields=[])


def shard_segments(segment_ids, *, axis_name, size) -> Segments:
    """The shard's ``Segments`` from its local ids and the last id of the previous rank."""
    doc = reference.document_index(segment_ids)
    prev_last = state_passing.from_previous_rank(segment_ids[:, -1], axis_name=axis_name, size=size)
    rank = jax.lax.axis_index(axis_name)
    return Segments(doc, (rank > 0) & (segment_ids[:, 0] != prev_last))


@dataclasses.dataclass(frozen=True)
class ShardDecay:
    """Log decays of one shard, each summed directly so it is accurate where its exp matters.

    ``from_start`` ``[B, L, H]``: ``b_i = Σ_{t≤i} g_t`` (weights of the entering state);
    ``to_end`` ``[B, L, H]``: ``b_{L-1} − b_j = Σ_{t>j} g_t`` (weights into the leaving state),
    a suffix sum, not a difference of two long prefix sums, which would lose float32 digits
    near the shard's end exactly where the weights are large; ``total`` ``[B, H]``: log Γ.
    Per key channel (g ``[B, L, H, D]``) each has a trailing D axis.
    """

    from_start: jax.Array
    to_end: jax.Array
    total: jax.Array


def suffix_sums(g):
    """``(Σ_{t≥j} g_t, Σ_{t>j} g_t)`` along axis 1: suffix sums, accurate near the end, where the
    weights ``exp(Σ_{t>j} g_t)`` into the state leaving the block are large."""
    suffix = jnp.flip(jnp.cumsum(jnp.flip(g, 1), axis=1), 1)
    return suffix, jnp.concatenate([suffix[:, 1:], jnp.zeros_like(suffix[:, :1])], axis=1)


def shard_decay(q, g, g_gamma) -> ShardDecay | None:
    """The shard's log decays in float32 (None without decay)."""
    b, length, h, _ = q.shape
    if g is not None:
        g = g.astype(acc_dtype(g.dtype))
        from_start = jnp.cumsum(g, axis=1)
        suffix, to_end = suffix_sums(g)
        return ShardDecay(from_start, to_end, suffix[:, 0])
    if g_gamma is not None:
        gamma = g_gamma.astype(acc_dtype(g_gamma.dtype))
        steps = jnp.arange(length, dtype=gamma.dtype)[None, :, None]
        full = (b, length, h)
        return ShardDecay(
            jnp.broadcast_to((steps + 1) * gamma, full),
            jnp.broadcast_to((length - 1 - steps) * gamma, full),
            jnp.broadcast_to(length * gamma, (b, h)),
        )
    return None


jax.tree_util.register_dataclass(ShardDecay, data_fields=["from_start", "to_end", "total"], meta_fields=[])


# a contraction over the whole shard (tens of thousands of tokens) into a few D×E tiles leaves
# most of a GPU idle; contracting splits of about this many tokens into partial states first,
# then summing the partials in float32, keeps every SM busy whatever the GEMM heuristics do
_SPLIT_TOKENS = 1024
_MAX_SPLITS = 64


def _num_splits(length: int) -> int:
    target = min(_MAX_SPLITS, length // _SPLIT_TOKENS)
    return max((s for s in range(1, target + 1) if length % s == 0), default=1)


def _token_contraction(a, b, acc):
    """``Σ_t aᵀ_t b_t`` over axis 1: a ``[B, L, *heads, D]``, b ``[B, L, *heads', E]`` -> ``[B, *heads, D, E]``."""
    bsz, length = a.shape[:2]
    n = _num_splits(length)
    a = a.reshape((bsz, n, length // n) + a.shape[2:])
    b = b.reshape((bsz, n, length // n) + b.shape[2:])
    if a.ndim == 6:  # a [B, S, l, Hk, G, D], b [B, S, l, Hk, E]
        partial = jnp.einsum("bslkgd,bslke->bskgde", a, b, preferred_element_type=acc)
    else:  # a [B, S, l, H, D], b [B, S, l, H, E]
        partial = jnp.einsum("bslhd,bslhe->bshde", a, b, preferred_element_type=acc)
    return jnp.sum(partial, axis=1)


def _per_token(weight, token_mask):
    """``weight`` ``[B, L, H(, D)]`` times the ``[B, L]`` 0/1 ``token_mask`` (unchanged when None)."""
    if token_mask is None:
        return weight
    return weight * token_mask.reshape(token_mask.shape + (1,) * (weight.ndim - 2)).astype(weight.dtype)


def local_state(k, v, decay: ShardDecay | None, num_heads, token_mask=None):
    """``M = Σ_j exp(b_{L-1} − b_j) k_jᵀ v_j`` ``[B, H, D, E]`` in float32 (grouped heads by indexing;
    per key channel ``exp(b_{L-1} − b_j)`` scales each channel of ``k_j``).

    ``token_mask`` ``[B, L]`` (0/1), when given, keeps only the masked tokens j (the last document).
    """
    b, length, hk, d = k.shape
    e = v.shape[-1]
    grp = num_heads // hk
    acc = acc_dtype(k.dtype, v.dtype)
    if decay is None:
        if token_mask is not None:
            k = (k.astype(acc) * token_mask[:, :, None, None]).astype(k.dtype)
        m = _token_contraction(k, v, acc)
        return jnp.broadcast_to(m[:, :, None], (b, hk, grp, d, e)).reshape(b, num_heads, d, e)
    to_end = _per_token(jnp.exp(decay.to_end), token_mask)
    to_end = to_end.reshape(b, length, hk, grp, -1)  # [..., 1] per token, [..., D] per key channel
    k_weighted = (k[:, :, :, None].astype(acc) * to_end).astype(k.dtype)
    return _token_contraction(k_weighted, v, acc).reshape(b, num_heads, d, e)


def local_state_cotangent(q, do, decay: ShardDecay | None, scale, token_mask=None):
    """``dM = scale · Σ_i exp(b_i) q_iᵀ dO_i`` ``[B, H, D, E]`` in float32 (only masked i when
    ``token_mask`` ``[B, L]`` is given: the tokens before the first boundary)."""
    acc = acc_dtype(q.dtype, do.dtype)
    if decay is not None or token_mask is not None:
        weight = jnp.ones(q.shape[:3], acc) if decay is None else jnp.exp(decay.from_start)
        weight = _per_token(weight, token_mask)
        q = (q.astype(acc) * weight.reshape(q.shape[:3] + (-1,))).astype(q.dtype)
    return scale * _token_contraction(q, do.astype(q.dtype), acc)


def _shard_log_gamma(q, decay: ShardDecay | None):
    b, _, h, _ = q.shape
    if decay is None:
        return jnp.zeros((b, h), jnp.float32)
    return decay.total


def _entering_state(cfg: LaspConfig, m, log_gamma, s0, gather_gamma):
    """(S_in(r), final state or None, what the backward needs to run the reverse pass)."""
    if cfg.strategy == "scan":
        kind = scan.ScalarDecay(shared=cfg.shared_decay)
        s_in, final = scan.prefix(
            kind, log_gamma, m, s0, axis_name=cfg.axis_name, size=cfg.size, want_final=cfg.output_final_state
        )
        return s_in, final, log_gamma
    if cfg.strategy == "ring":
        s_in, final = state_passing.ring_prefix(
            m, log_gamma, s0, axis_name=cfg.axis_name, size=cfg.size, want_final=cfg.output_final_state
        )
        return s_in, final, log_gamma
    s_in, final, log_gammas = state_passing.allgather_prefix(
        m,
        log_gamma,
        s0,
        axis_name=cfg.axis_name,
        size=cfg.size,
        want_final=cfg.output_final_state,
        gather_gamma=gather_gamma,
        invariant_final=cfg.vma_checked,
    )
    return s_in, final, log_gammas


def _local_kernel(cfg: LaspConfig, inputs, segments: Segments | None):
    s_in, segment_ids = inputs["s_in"], None
    if segments is not None:  # a boundary at the shard's first token: nothing enters
        s_in = segments.unless_starts_new(s_in)
        segment_ids = segments.doc
    o, s_out = linear_attention(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        g=inputs.get("g"),
        g_gamma=inputs.get("g_gamma"),
        scale=cfg.scale,
        initial_state=s_in,
        output_final_state=True,
        segment_ids=segment_ids,
        impl=cfg.impl,
    )
    return o, s_out


class SplitResiduals(NamedTuple):
    """Residuals of the Pallas path (the kernel split at its entering state)."""

    call: pallas_triton.SplitCall | pallas_triton_channel.SplitCall
    states: jax.Array  # the kernel's split entering states, from S_in(r)
    gamma_res: jax.Array  # what the reverse state pass needs: log Γ_r (ring) or every rank's (allgather)
    segments: Segments | None


class VjpResiduals(NamedTuple):
    """Residuals of the other local kernels: the kernel's pullback and what ``dM_r`` needs."""

    pullback: Any
    q: jax.Array
    decay: ShardDecay | None
    gamma_res: jax.Array
    segments: Segments | None


def _split_kernel(cfg: LaspConfig, inputs) -> bool:
    """Whether the local work runs as the Pallas kernel split at its entering state."""
    return resolve_impl(cfg.impl, inputs["q"], inputs["k"], inputs["v"], g=inputs.get("g")) == "pallas"


def _pallas_kernels(cfg: LaspConfig):
    """The Pallas module whose ``split_forward`` / ``finish_*`` run the local work (same calling convention)."""
    return pallas_triton_channel if cfg.per_channel else pallas_triton


def _forward_split(cfg: LaspConfig, inputs, segments: Segments | None):
    """The Pallas path: the kernel's first stage gives ``M_r`` (no extra pass over k, v), the
    state travels, the remaining stages finish from ``S_in(r)``."""
    q, g, g_gamma = inputs["q"], inputs.get("g"), inputs.get("g_gamma")
    kernels = _pallas_kernels(cfg)
    m, call, local = kernels.split_forward(
        q,
        inputs["k"],
        inputs["v"],
        g=g,
        g_gamma=g_gamma,
        scale=cfg.scale,
        segment_ids=None if segments is None else segments.doc,
        interpret=interpret_pallas(),
    )
    log_gamma = _shard_log_gamma(q, shard_decay(q, g, g_gamma))  # (XLA drops the unused per-token decays)
    if segments is not None:
        log_gamma = segments.shard_log_gamma(log_gamma)
    s_in, final, gamma_res = _entering_state(
        cfg, m, log_gamma, inputs.get("initial_state"), gather_gamma=g is not None or segments is not None
    )
    if segments is not None:  # a boundary at the shard's first token: nothing enters
        s_in = segments.unless_starts_new(s_in)
    o, states = kernels.finish_forward(call, local, s_in)
    return (o, final), SplitResiduals(call, states, gamma_res, segments)


def _backward_split(cfg: LaspConfig, residuals: SplitResiduals, cotangents):
    call, states, gamma_res, segments = residuals
    do, d_final = cotangents
    kernels = _pallas_kernels(cfg)
    dm, pending = kernels.split_backward(call, states, do)
    if segments is not None:  # the shard starts a document: the entering state reaches nothing
        dm = segments.unless_starts_new(dm)
    ds_out = _state_cotangent_leaving(cfg, dm, gamma_res, d_final)
    dq, dk, dv, dg, dg_gamma, ds_in = kernels.finish_backward(call, states, pending, ds_out)
    if segments is not None:
        ds_in = segments.unless_starts_new(ds_in)
    return _input_cotangents(cfg, {"q": dq, "k": dk, "v": dv, "g": dg, "g_gamma": dg_gamma, "s_in": ds_in})


def _forward(cfg: LaspConfig, inputs, segments: Segments | None, *, keep_residuals):
    if _split_kernel(cfg, inputs):
        out, residuals = _forward_split(cfg, inputs, segments)
        return out, (residuals if keep_residuals else None)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    g, g_gamma, s0 = inputs.get("g"), inputs.get("g_gamma"), inputs.get("initial_state")
    decay = shard_decay(q, g, g_gamma)
    log_gamma = _shard_log_gamma(q, decay)
    last_doc = None
    if segments is not None:
        log_gamma = segments.shard_log_gamma(log_gamma)
        last_doc = segments.feeds_state_out(log_gamma.dtype)
    m = local_state(k, v, decay, q.shape[2], token_mask=last_doc)
    # with segments Γ differs per rank even under g_gamma: gather it with the states
    gather_gamma = g is not None or segments is not None
    s_in, final, gamma_res = _entering_state(cfg, m, log_gamma, s0, gather_gamma=gather_gamma)
    kernel_inputs = {n: x for n, x in inputs.items() if n != "initial_state"} | {"s_in": s_in}
    if not keep_residuals:
        o, _ = _local_kernel(cfg, kernel_inputs, segments)
        return (o, final), None

    # the local state in the entering state's dtype: the state cotangent arrives in it (float64 under x64,
    # where the XLA path's own state is float32)
    def local(xs):
        o, state = _local_kernel(cfg, xs, segments)
        return o, state.astype(xs["s_in"].dtype)

    (o, _), pullback = jax.vjp(local, kernel_inputs)
    return (o, final), VjpResiduals(pullback, q, decay, gamma_res, segments)


def _reduce_to_vma(cfg: LaspConfig, name, ct):
    """Sum a cotangent over the manual axes its primal is invariant along (only when vma is checked)."""
    if not cfg.vma_checked:
        return ct
    primal_vma = {n: axes for n, _, axes in cfg.inputs}[name]
    extra = state_passing.varying_axes(ct) - primal_vma
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _state_cotangent_leaving(cfg: LaspConfig, dm, gamma_res, d_final):
    """``dS_out(r)`` from the ranks to the right (the backward's only communication)."""
    if d_final is not None and not cfg.vma_checked:
        # unchecked shard_map treats every rank's copy of final_state as its own output: sum them
        d_final = jax.lax.psum(d_final, cfg.axis_name)
    if cfg.strategy == "scan":
        kind = scan.ScalarDecay(shared=cfg.shared_decay)
        return scan.suffix(kind, gamma_res, dm, d_final, axis_name=cfg.axis_name, size=cfg.size)
    if cfg.strategy == "ring":
        return state_passing.ring_suffix(dm, gamma_res, d_final, axis_name=cfg.axis_name, size=cfg.size)
    return state_passing.allgather_suffix(dm, gamma_res, d_final, axis_name=cfg.axis_name, size=cfg.size)


def _backward(cfg: LaspConfig, residuals: SplitResiduals | VjpResiduals, cotangents):
    if isinstance(residuals, SplitResiduals):
        return _backward_split(cfg, residuals, cotangents)
    return _backward_vjp(cfg, residuals, cotangents)


def _backward_vjp(cfg: LaspConfig, residuals: VjpResiduals, cotangents):
    pullback, q, decay, gamma_res, segments = residuals
    do, d_final = cotangents
    first_doc = None if segments is None else segments.reaches_state_in(acc_dtype(q.dtype, do.dtype))
    dm = local_state_cotangent(q, do, decay, cfg.scale, token_mask=first_doc)
    ds_out = _state_cotangent_leaving(cfg, dm, gamma_res, d_final)
    (grads,) = pullback((do, ds_out))
    return _input_cotangents(cfg, grads)


def _input_cotangents(cfg: LaspConfig, grads):
    out = {}
    for name, dtype, _ in cfg.inputs:
        if name == "initial_state":  # the kernel saw the float32 entering state; rank 0's is S_0
            rank = jax.lax.axis_index(cfg.axis_name)
            ct = jnp.where(rank == 0, grads["s_in"], jnp.zeros_like(grads["s_in"])).astype(dtype)
        else:
            ct = grads[name]
        out[name] = _reduce_to_vma(cfg, name, ct)
    return out


def _lasp_layer(cfg: LaspConfig, inputs, segments):
    return _forward(cfg, inputs, segments, keep_residuals=False)[0]


def _lasp_layer_fwd(cfg: LaspConfig, inputs, segments):
    return _forward(cfg, inputs, segments, keep_residuals=True)


def _lasp_layer_bwd(cfg: LaspConfig, residuals, cotangents):
    return _backward(cfg, residuals, cotangents), None  # segments: integers, no cotangent


_lasp_layer = jax.custom_vjp(_lasp_layer, nondiff_argnums=(0,))
_lasp_layer.defvjp(_lasp_layer_fwd, _lasp_layer_bwd)


def lasp_layer(
    q,
    k,
    v,
    *,
    axis_name,
    size,
    strategy,
    g=None,
    g_gamma=None,
    scale,
    initial_state=None,
    output_final_state,
    segment_ids=None,
    impl,
):
    """LASP (``strategy="ring"``), LASP-2 (``"allgather"``) or the log-depth ``"scan"`` on one shard;
    see the module docstring."""
    inputs = {"q": q, "k": k, "v": v}
    for name, x in (("g", g), ("g_gamma", g_gamma), ("initial_state", initial_state)):
        if x is not None:
            inputs[name] = x
    described = tuple((n, x.dtype, state_passing.varying_axes(x)) for n, x in sorted(inputs.items()))
    checked = axis_name in state_passing.varying_axes(q)
    cfg = LaspConfig(
        axis_name=axis_name,
        size=size,
        strategy=strategy,
        scale=float(scale),
        impl=impl,
        output_final_state=output_final_state,
        inputs=described,
        vma_checked=checked,
        shared_decay=g is None and segment_ids is None,
        per_channel=g is not None and g.ndim == 4,
    )
    segments = None if segment_ids is None else shard_segments(segment_ids, axis_name=axis_name, size=size)
    return _lasp_layer(cfg, inputs, segments)
