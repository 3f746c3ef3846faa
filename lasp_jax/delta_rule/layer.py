"""The sequence-parallel gated delta rule on one shard (ring, allgather, scan): one ``jax.custom_vjp``.

Forward, on rank r of the sequence axis (notes/design.md §6, LASP-2 for affine recurrences):

1. ``(M_r, Φ_r)`` = ``xla.shard_transition(k, v, β, g)``: the shard's final state from zero and its
   composed transition (one state pass over k, v, β, g on ``E + D`` columns);
2. ``S_in(r)`` from the other ranks (``affine``: ring or allgather; ``scan``: the log-depth scan;
   float32);
3. the local op ``pallas_kernels.gated_delta_rule(..., initial_state=S_in(r))`` under ``jax.vjp``:
   the true output and the state leaving the shard; its residuals are the layer's.

Backward, with ``dO`` (and ``d final_state`` when asked for):

1. ``dS_in^loc(r)`` = ``xla.state_cotangent(q, k, β, g, dO)``, the cotangent rank r's own outputs put
   on its entering state (one reverse pass over q, k, β, g, dO);
2. ``dS_out(r) = Φ_{r+1}ᵀ dS_out(r+1) + dS_in^loc(r+1)`` from the ranks to the right, the last
   rank's being ``d final_state`` (the backward's only communication);
3. the local op's pullback with ``(dO, dS_out(r))`` gives dq, dk, dv, dβ, dg and ``dS_in`` (which is
   ``d initial_state`` on rank 0).

Why Φ_r and M_r need no cotangents of their own: the loss depends on rank r's inputs through its
outputs and through ``S_out(r)``, which the later ranks read as their entering state. ``S_out(r)``
is the local op's own final state, so the pullback at ``(inputs, S_in(r))`` with cotangent
``dS_out(r)`` on it (the total derivative of the loss by ``S_out(r)``, step 2) already carries
every path through the later ranks; ``Φ_r S_in + M_r`` is only another formula for the same
value, used to move S between ranks before the local op runs. ``S_in(r)`` itself depends on the
earlier ranks' inputs only through their ``S_out``, which their own pullbacks account for.

On the Pallas path (a GPU, or ``impl="pallas"``) the kernel is split at its entering state
(``pallas_triton_split``): its first stage (the WY form and the transition pass) gives
``(Φ_r, M_r)``, the remaining stages finish from ``S_in(r)`` without redoing the WY form, and the
backward's local reverse pass gives ``dS_in^loc(r)`` before the state cotangents travel. The XLA
and reference paths use ``xla.shard_transition`` / ``xla.state_cotangent`` beside the whole op.

Packed documents (``segment_ids``): ``lasp_jax.lasp.Segments`` (the previous rank's last id
says whether a document starts exactly at the shard's first token). Inside the shard the XLA
passes reset the state at every boundary, so ``M_r`` counts the last document only and ``Φ_r = 0``
in a row with a boundary inside; a boundary at the first token zeroes ``Φ_r``, the entering state
and its cotangent.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lasp_jax import scan
from lasp_jax.delta_rule import affine
from lasp_jax.lasp import Segments, shard_segments
from lasp_jax.state_passing import broadcast_from, varying_axes
from pallas_kernels import gated_delta_rule
from pallas_kernels.common import on_gpu
from pallas_kernels.gated_delta_rule import pallas_triton_split, xla
from pallas_kernels.gated_delta_rule.api import resolve_impl


@dataclasses.dataclass(frozen=True)
class DeltaRuleConfig:
    """Static parameters of one layer call (hashable: the custom_vjp's nondiff argument)."""

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
    gate_lower_bound: float | None = None  # the log gates' floor (already applied): a hint to the kernels


class SplitResiduals(NamedTuple):
    """Residuals of the Pallas path (the kernel split at its entering state)."""

    call: pallas_triton_split.SplitCall
    kernel: Any  # the kernel's own residuals from S_in(r)
    phis: jax.Array | None  # Φ_r (ring, scan) or every rank's Φ [P, B, Hv, D, D] (allgather); None: unused
    segments: Segments | None


class Residuals(NamedTuple):
    """Residuals of the other local ops: the op's pullback and what the local reverse pass reads."""

    pullback: Any  # the local op's pullback at (inputs, S_in(r))
    q: jax.Array
    k: jax.Array
    beta: jax.Array
    g: jax.Array | None
    phis: jax.Array  # Φ_r (ring, scan) or every rank's Φ [P, B, Hv, D, D] (allgather)
    segments: Segments | None


def _doc(segments: Segments | None):
    return None if segments is None else segments.doc


def _local_op(cfg: DeltaRuleConfig, inputs, segments: Segments | None):
    s_in = inputs["s_in"]
    if segments is not None:  # a boundary at the shard's first token: nothing enters
        s_in = segments.unless_starts_new(s_in)
    return gated_delta_rule(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs["beta"],
        g=inputs.get("g"),
        scale=cfg.scale,
        initial_state=s_in,
        output_final_state=True,
        segment_ids=_doc(segments),
        impl=cfg.impl,
        gate_lower_bound=cfg.gate_lower_bound,
    )


def _entering_state(cfg: DeltaRuleConfig, phi, m, s0):
    """``(S_in(r), final state or None, what the reverse pass needs)``; the ring's and the scan's
    final state comes from the last rank's local op instead."""
    if cfg.strategy == "scan":
        s_in, _ = scan.prefix(scan.MatrixTransition(), phi, m, s0, axis_name=cfg.axis_name, size=cfg.size)
        return s_in, None, phi
    if cfg.strategy == "ring":
        return affine.ring_prefix(phi, m, s0, axis_name=cfg.axis_name, size=cfg.size), None, phi
    return affine.allgather_prefix(
        phi,
        m,
        s0,
        axis_name=cfg.axis_name,
        size=cfg.size,
        want_final=cfg.output_final_state,
        invariant_final=cfg.vma_checked,
    )


def _final_from_last_rank(cfg: DeltaRuleConfig, final, s_out):
    """The ring's (and scan's) final state: the last rank's leaving state, on every rank (allgather
    has it already)."""
    if cfg.strategy in ("ring", "scan") and cfg.output_final_state:
        return broadcast_from(s_out, cfg.size - 1, cfg.axis_name)
    return final


def _forward_split(cfg: DeltaRuleConfig, inputs, segments: Segments | None):
    # two ranks, no initial or final state (the training path on two GPUs): no rank applies Φ, so
    # under scalar or no gates the split kernel forms only M, over the E value columns in one run
    # (half the transition pass's columns), where the shard's default is one run anyway; where it
    # cuts the shard into runs (few heads: their parallelism pays more than the D columns, 2×H200
    # GDN 16 heads 5.50 against 7.30 ms) and under per-channel gates the runs need Φ to compose
    per_channel = "g" in inputs and inputs["g"].ndim == 4
    config = pallas_triton_split.shard_config(
        inputs["q"], inputs["k"], inputs["v"], inputs.get("g"), interpret=not on_gpu()
    )
    with_phi = (
        cfg.strategy == "scan"
        or per_channel
        or config.splits > 1
        or affine.needs_phi(cfg.size, initial_state="initial_state" in inputs, final_state=cfg.output_final_state)
    )
    phi, m, call = pallas_triton_split.split_forward(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs["beta"],
        g=inputs.get("g"),
        scale=cfg.scale,
        segment_ids=_doc(segments),
        interpret=not on_gpu(),
        config=config,
        with_phi=with_phi,
        gate_lower_bound=cfg.gate_lower_bound,
    )
    if segments is not None and phi is not None:
        phi = segments.unless_starts_new(phi)
    s_in, final, phis = _entering_state(cfg, phi, m, inputs.get("initial_state"))
    if segments is not None:  # a boundary at the shard's first token: nothing enters
        s_in = segments.unless_starts_new(s_in)
    o, s_out, kernel = pallas_triton_split.finish_forward(call, s_in)
    residuals = SplitResiduals(call.for_backward(), kernel, phis, segments)
    return (o, _final_from_last_rank(cfg, final, s_out)), residuals


def _backward_split(cfg: DeltaRuleConfig, residuals: SplitResiduals, cotangents):
    call, kernel, phis, segments = residuals
    do, d_final = cotangents
    ds_local, stage = pallas_triton_split.split_backward(call, kernel, do)
    ds_out = _pass_back(cfg, phis, ds_local, d_final, segments)
    dq, dk, dv, dbeta, dg, ds_in = pallas_triton_split.finish_backward(call, kernel, stage, ds_out)
    if segments is not None:
        ds_in = segments.unless_starts_new(ds_in)
    return _input_cotangents(cfg, {"q": dq, "k": dk, "v": dv, "beta": dbeta, "g": dg, "s_in": ds_in})


def _forward(cfg: DeltaRuleConfig, inputs, segments: Segments | None, *, keep_residuals):
    if resolve_impl(cfg.impl, inputs["q"], inputs["k"], inputs["v"]) == "pallas":
        out, residuals = _forward_split(cfg, inputs, segments)
        return out, (residuals if keep_residuals else None)
    q, k, beta, g = inputs["q"], inputs["k"], inputs["beta"], inputs.get("g")
    m, phi = xla.shard_transition(k, inputs["v"], beta, g, doc_ids=_doc(segments))
    if segments is not None:
        phi = segments.unless_starts_new(phi)
    s_in, final, phis = _entering_state(cfg, phi, m, inputs.get("initial_state"))
    kernel_inputs = {n: x for n, x in inputs.items() if n != "initial_state"} | {"s_in": s_in}
    residuals = None
    if keep_residuals:
        (o, s_out), pullback = jax.vjp(lambda xs: _local_op(cfg, xs, segments), kernel_inputs)
        residuals = Residuals(pullback, q, k, beta, g, phis, segments)
    else:
        o, s_out = _local_op(cfg, kernel_inputs, segments)
    return (o, _final_from_last_rank(cfg, final, s_out)), residuals


def _pass_back(cfg: DeltaRuleConfig, phis, ds_local, d_final, segments: Segments | None):
    """``dS_out(r)`` from the local ``dS_in^loc`` of every rank to the right (the backward's only
    communication)."""
    if segments is not None:  # the shard starts a document: the entering state reaches nothing
        ds_local = segments.unless_starts_new(ds_local)
    if d_final is not None and not cfg.vma_checked:
        # unchecked shard_map treats every rank's copy of final_state as its own output: sum them
        d_final = jax.lax.psum(d_final, cfg.axis_name)
    if cfg.strategy == "scan":
        return scan.suffix(scan.MatrixTransition(), phis, ds_local, d_final, axis_name=cfg.axis_name, size=cfg.size)
    passing = affine.ring_suffix if cfg.strategy == "ring" else affine.allgather_suffix
    return passing(phis, ds_local, d_final, axis_name=cfg.axis_name, size=cfg.size)


def _reduce_to_vma(cfg: DeltaRuleConfig, name, ct):
    """Sum a cotangent over the manual axes its primal is invariant along (only when vma is checked)."""
    if not cfg.vma_checked:
        return ct
    primal_vma = {n: axes for n, _, axes in cfg.inputs}[name]
    extra = varying_axes(ct) - primal_vma
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _backward(cfg: DeltaRuleConfig, residuals: SplitResiduals | Residuals, cotangents):
    if isinstance(residuals, SplitResiduals):
        return _backward_split(cfg, residuals, cotangents)
    pullback, q, k, beta, g, phis, segments = residuals
    do, d_final = cotangents
    ds_local = xla.state_cotangent(q, k, beta, g, do, scale=cfg.scale, doc_ids=_doc(segments))
    ds_out = _pass_back(cfg, phis, ds_local, d_final, segments)
    (grads,) = pullback((do, ds_out))
    return _input_cotangents(cfg, grads)


def _input_cotangents(cfg: DeltaRuleConfig, grads):
    out = {}
    for name, dtype, _ in cfg.inputs:
        if name == "initial_state":  # the local op saw the float32 entering state; rank 0's is S_0
            rank = jax.lax.axis_index(cfg.axis_name)
            ct = jnp.where(rank == 0, grads["s_in"], jnp.zeros_like(grads["s_in"])).astype(dtype)
        else:
            ct = grads[name]
        out[name] = _reduce_to_vma(cfg, name, ct)
    return out


def _layer(cfg: DeltaRuleConfig, inputs, segments):
    return _forward(cfg, inputs, segments, keep_residuals=False)[0]


def _layer_fwd(cfg: DeltaRuleConfig, inputs, segments):
    return _forward(cfg, inputs, segments, keep_residuals=True)


def _layer_bwd(cfg: DeltaRuleConfig, residuals, cotangents):
    return _backward(cfg, residuals, cotangents), None  # segments: integers, no cotangent


_layer = jax.custom_vjp(_layer, nondiff_argnames=("cfg",))
_layer.defvjp(_layer_fwd, _layer_bwd)


def delta_rule_layer(
    q,
    k,
    v,
    beta,
    *,
    axis_name,
    size,
    strategy,
    g=None,
    scale,
    initial_state=None,
    output_final_state,
    segment_ids=None,
    impl,
    gate_lower_bound=None,
):
    """The ring (LASP), allgather (LASP-2) or log-depth scan gated delta rule on one shard; see the
    module docstring."""
    inputs = {"q": q, "k": k, "v": v, "beta": beta}
    for name, x in (("g", g), ("initial_state", initial_state)):
        if x is not None:
            inputs[name] = x
    cfg = DeltaRuleConfig(
        axis_name=axis_name,
        size=size,
        strategy=strategy,
        scale=float(scale),
        impl=impl,
        output_final_state=output_final_state,
        inputs=tuple((n, x.dtype, varying_axes(x)) for n, x in sorted(inputs.items())),
        vma_checked=axis_name in varying_axes(q),
        gate_lower_bound=gate_lower_bound,
    )
    segments = None if segment_ids is None else shard_segments(segment_ids, axis_name=axis_name, size=size)
    return _layer(cfg, inputs, segments)
