"""How states travel between the shards of the sequence axis for an affine recurrence.

Communication and the float32 prefix arithmetic only. Rank r holds tokens ``[r·L, (r+1)·L)`` and,
over its shard, the recurrence is affine (notes/design.md §6): ``S_out(r) = Φ_r S_in(r) + M_r``
with ``Φ_r`` ``[B, Hv, D, D]`` the composed transition and ``M_r`` ``[B, Hv, D, E]`` the state built
from zero. Then

    forward   S_in(r)   = Φ_{r−1} S_in(r−1) + M_{r−1},            S_in(0) = initial_state
    backward  dS_out(r) = Φ_{r+1}ᵀ dS_out(r+1) + dS_in^loc(r+1),   dS_out(P−1) = d final_state

where ``dS_in^loc(r)`` is the cotangent rank r's own outputs put on its entering state. Two ways
to run each, as for linear attention (``lasp_jax.state_passing``, where Φ is a scalar decay):

- ``ring`` (LASP): P−1 chained non-cyclic ``ppermute``s of one ``[B, Hv, D, E]`` state; hop i
  goes from rank i to i+1 (backward: i to i−1). Sequential in P, one state's bytes per hop.
- ``allgather`` (LASP-2): one ``all_gather`` of ``[Φ_r | M_r]`` (``B·Hv·D·(D+E)`` floats, whatever
  the sequence length) and the fold above on every rank in float32 (P small matrix products);
  backward: one ``all_gather`` of ``dS_in^loc`` and the fold from the right with ``Φᵀ``.

Φ may be None where no rank applies it: on two ranks with no initial state and no final state
(forward ``S_in(1) = M_0``, backward ``dS_out(0) = dS_in^loc(1)``); ``needs_phi`` says when.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp_jax.state_passing import broadcast_from


def apply(phi, state):
    """``Φ S``: phi ``[..., D, D]``, state ``[..., D, E]``."""
    return jnp.einsum("...ij,...je->...ie", phi, state)


def apply_transposed(phi, state):
    """``Φᵀ S``."""
    return jnp.einsum("...ji,...je->...ie", phi, state)


def needs_phi(size: int, *, initial_state: bool, final_state: bool) -> bool:
    """Whether some rank applies Φ: rank r uses Φ_r on a state entering it (r > 0, or an initial
    state) that leaves towards a later rank or the final state (r < P − 1, or a final state asked
    for); in the backward the same Φ_r meets the cotangent leaving rank r."""
    return size > 2 or initial_state or final_state


def _check_no_phi(size: int, *, initial_state: bool = False, final_state: bool = False):
    """Called with Φ None: raise where ``needs_phi`` says some rank would apply it."""
    if needs_phi(size, initial_state=initial_state, final_state=final_state):
        raise ValueError("Φ is needed with more than two ranks, an initial state or a final state")


def _start(x, like):
    """``x`` (or zeros) as a float32 state varying like ``like`` (a checked ``shard_map`` needs it typed so)."""
    return jnp.zeros_like(like) if x is None else x.astype(like.dtype) + jnp.zeros_like(like)


# ---------------------------------------------------------------------------------------- ring
def ring_prefix(phi, m, s0, *, axis_name, size):
    """S_in(r) by P−1 non-cyclic hops (only rank ``hop`` holds a complete entering state at hop ``hop``)."""
    if phi is None:  # two ranks, nothing entering rank 0: S_in(1) = M_0
        _check_no_phi(size, initial_state=s0 is not None)
    rank = jax.lax.axis_index(axis_name)
    s_in = _start(s0, m)
    for hop in range(size - 1):
        leaving = m if phi is None else apply(phi, s_in) + m
        received = jax.lax.ppermute(leaving, axis_name, perm=[(hop, hop + 1)])
        s_in = jnp.where(rank == hop + 1, received, s_in)
    return s_in


def ring_suffix(phi, ds_local, d_final, *, axis_name, size):
    """dS_out(r) by P−1 hops from the last rank towards rank 0."""
    if phi is None:  # two ranks, nothing leaving the last: dS_out(0) = dS_in^loc(1)
        _check_no_phi(size, final_state=d_final is not None)
    rank = jax.lax.axis_index(axis_name)
    ds_out = _start(d_final, ds_local)
    for hop in range(size - 1, 0, -1):
        # the whole cotangent of S_in(hop)
        entering = ds_local if phi is None else apply_transposed(phi, ds_out) + ds_local
        received = jax.lax.ppermute(entering, axis_name, perm=[(hop, hop - 1)])
        ds_out = jnp.where(rank == hop - 1, received, ds_out)
    return ds_out


# ----------------------------------------------------------------------------------- allgather
def allgather_prefix(phi, m, s0, *, axis_name, size, want_final, invariant_final=False):
    """``(S_in(r), final state or None, Φ of every rank [P, B, Hv, D, D])`` from one ``all_gather``."""
    if phi is None:  # two ranks, no initial or final state: S_in = (0, M_0)
        _check_no_phi(size, initial_state=s0 is not None, final_state=want_final)
        ms = jax.lax.all_gather(m, axis_name)
        return jnp.stack([_start(None, m), ms[0]])[jax.lax.axis_index(axis_name)], None, None
    d = phi.shape[-1]
    gathered = jax.lax.all_gather(jnp.concatenate([phi, m], axis=-1), axis_name)
    phis, ms = gathered[..., :d], gathered[..., d:]
    state = _start(s0, m)
    entering = []
    for r in range(size):
        entering.append(state)
        state = apply(phis[r], state) + ms[r]
    s_in = jnp.stack(entering)[jax.lax.axis_index(axis_name)]
    final = None
    if want_final:
        final = broadcast_from(state, 0, axis_name) if invariant_final else state
    return s_in, final, phis


def allgather_suffix(phis, ds_local, d_final, *, axis_name, size):
    """dS_out(r) from one ``all_gather`` of every rank's ``dS_in^loc``."""
    if phis is None:  # two ranks, nothing leaving the last: dS_out = (dS_in^loc(1), 0)
        _check_no_phi(size, final_state=d_final is not None)
    ds_locals = jax.lax.all_gather(ds_local, axis_name)
    ds_out = _start(d_final, ds_local)
    leaving = [ds_out]
    for r in range(size - 2, -1, -1):
        carried = 0.0 if phis is None else apply_transposed(phis[r + 1], ds_out)
        ds_out = carried + ds_locals[r + 1]
        leaving.append(ds_out)
    return jnp.stack(leaving[::-1])[jax.lax.axis_index(axis_name)]
