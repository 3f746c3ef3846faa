"""How the float32 ``[B, H, D, E]`` states travel between the shards of the sequence axis.

Only communication and the float32 prefix arithmetic live here; the local kernels do not.
Rank r of the axis holds tokens ``[r·L, (r+1)·L)``. With ``M_r`` the state rank r builds from a
zero entering state and ``Γ_r = exp(log_gamma_r)`` its decay across the shard (notes/design.md §2),
``log_gamma`` ``[B, H]`` (one factor per state) or ``[B, H, D]`` (per key channel, GLA: one factor
per row of the ``D × E`` state, notes/design.md §6; ``state_decay`` applies either):

    forward   S_in(r)  = Γ_{r-1} S_in(r-1) + M_{r-1},      S_in(0) = initial_state
    backward  dS_out(r) = Γ_{r+1} dS_out(r+1) + dM_{r+1},  dS_out(P-1) = d final_state

where ``dS_out(r)`` is the cotangent of the state leaving rank r (= entering rank r+1) and
``dM_r`` the cotangent rank r's own outputs put on its entering state. Two ways to run each:

- ``ring`` (LASP): P−1 chained ``ppermute``s; hop i carries one state from rank i to i+1
  (backward: from i to i−1). Sequential in P, one state's bytes per hop.
- ``allgather`` (LASP-2): one ``all_gather`` of ``(M_r, log Γ_r)`` and a local float32 scan,
  written as a weighted sum whose log weights are masked sums of the shard log decays (never
  differences of long prefix sums, which lose float32 digits when decays are strong).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def varying_axes(x) -> frozenset:
    """Manual mesh axes along which ``x`` varies, as a checked ``shard_map`` types it (else empty).

    The attribute moved between jax releases (``aval.vma``, then ``aval.mat.varying``).
    """
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def broadcast_from(x, src, axis_name):
    """The value of ``x`` on rank ``src``, on every rank (a masked psum: invariant when checked)."""
    rank = jax.lax.axis_index(axis_name)
    return jax.lax.psum(jnp.where(rank == src, x, jnp.zeros_like(x)), axis_name)


def from_previous_rank(x, *, axis_name, size):
    """``x`` of rank r − 1 on rank r (one non-cyclic ``ppermute``; rank 0 receives zeros)."""
    return jax.lax.ppermute(x, axis_name, perm=[(r, r + 1) for r in range(size - 1)])


def state_decay(log_gamma, state):
    """``exp(log_gamma)`` shaped to scale ``state``: a ``[..., B, H]`` log decay scales each whole
    ``[D, E]`` state, a ``[..., B, H, D]`` one (per key channel) each of its rows."""
    return jnp.exp(log_gamma).reshape(log_gamma.shape + (1,) * (state.ndim - log_gamma.ndim))


# ---------------------------------------------------------------------------------------- ring
def ring_prefix(m, log_gamma, s0, *, axis_name, size, want_final):
    """S_in(r) by P−1 non-cyclic hops; also the state after the last shard (on every rank) if asked."""
    rank = jax.lax.axis_index(axis_name)
    gamma = state_decay(log_gamma, m)
    s_in = jnp.zeros_like(m) if s0 is None else s0.astype(m.dtype) + jnp.zeros_like(m)
    for hop in range(size - 1):
        # only rank `hop` holds a complete entering state here; it sends its leaving state on
        leaving = gamma * s_in + m
        received = jax.lax.ppermute(leaving, axis_name, perm=[(hop, hop + 1)])
        s_in = jnp.where(rank == hop + 1, received, s_in)
    final = broadcast_from(gamma * s_in + m, size - 1, axis_name) if want_final else None
    return s_in, final


def ring_suffix(dm, log_gamma, d_final, *, axis_name, size):
    """dS_out(r) by P−1 hops from the last rank towards rank 0."""
    rank = jax.lax.axis_index(axis_name)
    gamma = state_decay(log_gamma, dm)
    ds_out = jnp.zeros_like(dm) if d_final is None else d_final.astype(dm.dtype) + jnp.zeros_like(dm)
    for hop in range(size - 1, 0, -1):
        entering = gamma * ds_out + dm  # cotangent of rank hop's entering state
        received = jax.lax.ppermute(entering, axis_name, perm=[(hop, hop - 1)])
        ds_out = jnp.where(rank == hop - 1, received, ds_out)
    return ds_out


# ----------------------------------------------------------------------------------- allgather
def _decay_between(log_gammas, lo, hi):
    """``[P, B, H(, D)]``: for each j, ``Σ log Γ_i`` over ``lo(j) < i < hi(j)`` as a masked sum (no
    differences of long prefix sums, so float32 keeps its digits); ``lo``/``hi`` give ``[P]``."""
    size = log_gammas.shape[0]
    i = jnp.arange(size)
    inside = (lo[:, None] < i[None, :]) & (i[None, :] < hi[:, None])  # [j, i]
    return jnp.einsum("ji,i...->j...", inside.astype(log_gammas.dtype), log_gammas)


def _per_rank(mask, like):
    """A ``[P]`` mask shaped to broadcast against ``like`` ``[P, B, H(, D)]``."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def _weighted_sum(log_weights, mask, states):
    """Σ_j exp(log_weights[j]) states[j] over the masked j."""
    w = jnp.where(mask, jnp.exp(jnp.where(mask, log_weights, 0.0)), 0.0)
    return jnp.sum(w.reshape(w.shape + (1,) * (states.ndim - w.ndim)) * states, axis=0)


def allgather_prefix(m, log_gamma, s0, *, axis_name, size, want_final, gather_gamma, invariant_final=False):
    """S_in(r) from one all_gather of the local states (and local decays when they differ per rank).

    Returns ``(s_in, final, log_gammas)``; ``log_gammas`` ``[P, ...]`` is kept for the backward.
    """
    rank = jax.lax.axis_index(axis_name)
    b, h, d, e = m.shape
    if gather_gamma:  # one collective: the log decays ride along as extra columns
        packed = jnp.concatenate([m.reshape(b, h, d * e), log_gamma.reshape(b, h, -1).astype(m.dtype)], axis=-1)
        gathered = jax.lax.all_gather(packed, axis_name)
        states = gathered[..., : d * e].reshape(size, b, h, d, e)
        log_gammas = gathered[..., d * e :].reshape((size,) + log_gamma.shape)
    else:
        states = jax.lax.all_gather(m, axis_name)
        log_gammas = jnp.broadcast_to(log_gamma, (size,) + log_gamma.shape)
    j = jnp.arange(size)
    before = _per_rank(j < rank, log_gammas)
    # S_in(r) = Σ_{j<r} (Π_{j<i<r} Γ_i) M_j + (Π_{i<r} Γ_i) S_0
    s_in = _weighted_sum(_decay_between(log_gammas, j, jnp.full_like(j, rank)), before, states)
    if s0 is not None:
        s_in = s_in + state_decay(jnp.sum(jnp.where(before, log_gammas, 0.0), 0), m) * s0.astype(m.dtype)
    final = None
    if want_final:
        everyone = jnp.ones_like(before)
        final = _weighted_sum(_decay_between(log_gammas, j, jnp.full_like(j, size)), everyone, states)
        if s0 is not None:
            final = final + state_decay(jnp.sum(log_gammas, axis=0), m) * s0.astype(m.dtype)
        if invariant_final:  # equal on every rank already; a checked shard_map needs it typed so
            final = broadcast_from(final, 0, axis_name)
    return s_in, final, log_gammas


def allgather_suffix(dm, log_gammas, d_final, *, axis_name, size):
    """dS_out(r) from one all_gather of the local state cotangents ``dM``."""
    rank = jax.lax.axis_index(axis_name)
    dms = jax.lax.all_gather(dm, axis_name)
    j = jnp.arange(size)
    after = _per_rank(j > rank, log_gammas)
    # dS_out(r) = Σ_{j>r} (Π_{r<i<j} Γ_i) dM_j + (Π_{i>r} Γ_i) d_final
    ds_out = _weighted_sum(_decay_between(log_gammas, jnp.full_like(j, rank), j), after, dms)
    if d_final is not None:
        decay_after = jnp.sum(jnp.where(after, log_gammas, 0.0), axis=0)
        ds_out = ds_out + state_decay(decay_after, dm) * d_final.astype(dm.dtype)
    return ds_out
