"""The gated-delta-rule kernels split at the entering state, for sequence parallelism.

A rank of a sequence-parallel layer holds a run of the sequence whose entering state comes from the
ranks before it. ``split_forward`` does what needs no entering state: the padding, the WY form and
the call's transition ``(Φ, M)`` (the state after the call is ``Φ S + M``, notes/design.md §6);
``finish_forward`` runs the state pass and the output from the entering state. The backward splits
the same way: ``split_backward`` gives the entering state's cotangent from ``dO`` alone (and the
output's gradients), ``finish_backward`` the rest once the leaving state's cotangent is known
(``Φ_{r+1}ᵀ dS_out(r + 1) + dS_in_local(r + 1)`` from the rank after). Beyond a single call this
costs one state pass each way (the transition over E + D columns, and the local reverse pass),
neither storing anything per chunk.

Since those two passes run anyway, the call cuts its rows into ``cfg.splits`` runs as the
single-call kernels do (LASP inside one GPU, ``pallas_triton``): the transition pass walks the runs
in parallel and a float32 scan composes them into the call's ``(Φ, M)``; the stored pass starts
each run from its own entering state, and the backward's local pass gives each run's. The default
config (``default_config(sequence_parallel=True)``) splits until half the SMs have programs under
scalar or no gates (two per SM under per-channel gates), where the single call, which need not run
the transition, splits only below a quarter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import F32, pad_dim
from pallas_kernels.gated_delta_rule import pallas_triton_vjp
from pallas_kernels.gated_delta_rule.config import default_config
from pallas_kernels.gated_delta_rule.layout import (
    Layout,
    Residuals,
    Statics,
    compose_transitions,
    entering_states,
    from_splits,
    leaving_cotangents,
    to_splits,
)
from pallas_kernels.gated_delta_rule.pallas_triton import (
    document_rows,
    join_split_grads,
    prepare,
    split_rows,
    states_and_output,
    transition,
    wy_representation,
)
from pallas_kernels.gated_delta_rule.products import by_gates, case_of, gate_case, kept_case


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["args", "docs", "w", "u", "unpad", "x", "phi", "m", "gate_case"],
    meta_fields=["statics", "shape"],
)
@dataclasses.dataclass(frozen=True)
class SplitCall:
    """One call whose initial state comes later (``split_forward``): the padded inputs
    ``(q, k, v, beta, b)`` and the document rows cut into ``cfg.splits`` rows each, W and U, the
    pullback of the padding, the statics, the unpadded ``(T, D, E)``, and with more than one split
    each split's transition ``(Φ_s, M_s)``."""

    args: tuple
    docs: tuple | None
    w: jax.Array | None  # None in the backward's copy (``for_backward``)
    u: jax.Array | None
    unpad: object
    statics: Statics
    shape: tuple
    x: jax.Array | None = None  # the stored inverse (``BlockConfig.store_inverse``)
    phi: jax.Array | None = None  # [B·S, Hv, D, D]: each split's Φ_s (None: one split)
    m: jax.Array | None = None  # [B·S, Hv, D, E]: each split's M_s
    # per-channel gates: which kernels the gates allow (``products.gate_case``), the same for
    # every entry point of the call, so the forward and the backward pick the same kernels (None
    # also where the gate floor picked them at trace time: ``products.kept_case``)
    gate_case: jax.Array | None = None

    @property
    def splits(self) -> int:
        return self.statics.cfg.splits

    def for_backward(self) -> SplitCall:
        """What ``split_backward`` / ``finish_backward`` read besides ``finish_forward``'s residuals:
        without U (``[B, T, Hv, E]``, read only by the stored pass), W and X (the residuals hold them)."""
        return dataclasses.replace(self, u=None, w=None, x=None, m=None)

    def layout(self, statics: Statics | None = None) -> Layout:
        statics = statics or self.statics
        return Layout(self.args[0], self.args[2], statics.cfg, statics.mode)

    def by_gates(self, fn):
        """``fn(statics)`` with the kernels the gates allow (``products.by_gates``)."""
        return by_gates(case_of(self.gate_case, self.statics), self.statics, fn)

    def padded_state(self, state):
        _, d, e = self.shape
        dp, ep = self.args[0].shape[-1], self.args[2].shape[-1]
        return jnp.pad(state.astype(F32), ((0, 0), (0, 0), (0, dp - d), (0, ep - e)))


def shard_config(q, k, v, g=None, *, interpret=False):
    """The block config the split entry points use by default for these inputs (``splits``: the
    runs per shard; ``default_config(sequence_parallel=True)``)."""
    b, t, _, d = q.shape
    hv, e = v.shape[2:]
    return default_config(
        batch=b,
        value_heads=hv,
        seq_len=t,
        value_dim=pad_dim(e),
        key_dim=pad_dim(d),
        per_channel=g is not None and g.ndim == 4,
        interpret=interpret,
        dtype=jnp.result_type(q.dtype, k.dtype, v.dtype),
        sequence_parallel=True,
    )


def split_forward(
    q,
    k,
    v,
    beta,
    *,
    g=None,
    scale=None,
    segment_ids=None,
    interpret=False,
    config=None,
    with_phi=True,
    gate_lower_bound=None,
):
    """The part of a call that needs no initial state: ``(Φ [B, Hv, D, D], M [B, Hv, D, E], call)``.

    The state after the call from an entering state S is ``Φ S + M`` (notes/design.md §6; Φ = 0 when
    a document boundary lies inside the call). Sequence parallelism all-gathers ``(Φ, M)``, forms
    each rank's entering state, and ``finish_forward(call, S)`` gives the output. Against a single
    call with one split this costs the transition pass (over E + D columns, storing nothing per
    chunk), which a single call with more splits runs too.

    ``with_phi=False`` (a caller that never applies Φ: two ranks, no initial or final state): Φ is
    None, the call is one split (its runs would need their own Φ to compose) and M comes from a pass
    over the E value columns alone, half the transition pass's columns. ``gate_lower_bound``: as in
    ``pallas_triton.gated_delta_rule``.
    """
    t, d = q.shape[1], q.shape[3]
    e = v.shape[3]
    scale = float(d**-0.5 if scale is None else scale)
    config = config or shard_config(q, k, v, g, interpret=interpret)
    if not with_phi:
        config = dataclasses.replace(config, splits=1)
    found = {}

    def pad(q, k, v, beta, g):
        args, _, statics = prepare(
            q, k, v, beta, g, None, None, scale, interpret, config, gate_lower_bound=gate_lower_bound
        )
        found["statics"] = statics
        return args[:5]

    args, unpad = jax.vjp(pad, q, k, v, beta, g)
    statics = found["statics"]
    splits = statics.cfg.splits
    *args, docs = split_rows(*args, document_rows(segment_ids, args[0].shape[1]), splits)
    qp, kp, vp, betap, bp = args
    case = gate_case(bp, statics, qp.dtype)

    w, u, x = by_gates(
        case, statics, lambda st: wy_representation(kp, vp, betap, bp, docs, Layout(qp, vp, st.cfg, st.mode), st)
    )
    # the transition forms no diagonal-tile products: one form, outside the switch
    phi, m = transition(w, u, kp, bp, docs, Layout(qp, vp, statics.cfg, statics.mode), statics, with_phi=with_phi)
    call = SplitCall(tuple(args), docs, w, u, unpad, statics, (t, d, e), x, gate_case=kept_case(case))
    if splits > 1:
        call = dataclasses.replace(call, phi=phi, m=m)
        phi, m = compose_transitions(phi, m, splits)
    return (None if phi is None else phi[:, :, :d, :d]), m[:, :, :d, :e], call


def finish_forward(call: SplitCall, initial_state):
    """``(o [B, T, Hv, E], final_state [B, Hv, D, E], residuals)`` of ``split_forward``'s call from
    its entering state; the residuals are what ``split_backward`` / ``finish_backward`` read."""
    t, d, e = call.shape
    q, k, v, beta, b = call.args
    s0 = call.padded_state(initial_state)
    if call.splits > 1:
        s0 = entering_states(call.phi, call.m, s0, call.splits)
    h, v_new, final, o, z = call.by_gates(
        lambda st: states_and_output(q, k, call.w, call.u, b, call.docs, s0, call.layout(st), st)
    )
    o = from_splits(o, call.splits)
    final = final.reshape((-1, call.splits) + final.shape[1:])[:, -1]
    return o[:, :t, :, :e], final[:, :, :d, :e], Residuals(q, k, v, beta, b, call.docs, call.w, h, v_new, call.x, z)


def split_backward(call: SplitCall, residuals: Residuals, do):
    """The part of the backward that needs no final-state cotangent: ``(dS_in_local, stage)``.

    ``dS_in_local`` ``[B, Hv, D, E]`` is the entering state's cotangent from ``do`` alone; given the
    cotangent dS of the state leaving the call, the whole one is ``dS_in_local + Φᵀ dS``.
    """
    t, d, e = call.shape
    tp, ep = call.args[0].shape[1] * call.splits, call.args[2].shape[-1]
    do = jnp.pad(do, ((0, 0), (0, tp - t), (0, 0), (0, ep - e)))
    do = to_splits(do, call.splits)
    local, stage = call.by_gates(lambda st: pallas_triton_vjp.backward_local(residuals, do, statics=st))
    if call.splits == 1:
        return local[:, :, :d, :e], (local, stage)
    # the first split's entering cotangent with nothing leaving the call
    _, ds0 = leaving_cotangents(call.phi, local, jnp.zeros_like(local[:: call.splits]), call.splits)
    return ds0[:, :, :d, :e], (local, stage)


def finish_backward(call: SplitCall, residuals: Residuals, stage, d_final):
    """Cotangents ``(dq, dk, dv, dbeta, dg, d initial_state)`` given the leaving state's cotangent
    (dg is None without gates)."""
    _, d, e = call.shape
    local, stage = stage
    d_out = call.padded_state(d_final)
    if call.splits > 1:
        d_out, _ = leaving_cotangents(call.phi, local, d_out, call.splits)
    grads = call.by_gates(lambda st: pallas_triton_vjp.backward_finish(residuals, stage, d_out, statics=st))
    *input_grads, ds0 = join_split_grads(grads, call.splits)
    return (*call.unpad(tuple(input_grads)), ds0[:, :, :d, :e])
