"""The prefix of entering states over the ranks of the sequence axis as a log-depth scan.

Communication and float32 prefix arithmetic only, shared by both layer families. Over rank r's
shard the recurrence is affine (notes/design.md §2, §6): ``S_out(r) = Φ_r S_in(r) + M_r``, with
``Φ_r = Γ_r · I`` a per-(row, head) scalar for linear attention (``ScalarDecay``, carried as
``log Γ_r`` ``[B, H]``; per key channel ``Φ_r = diag(Γ_r)``, ``log Γ_r`` ``[B, H, D]``) and a
``[B, Hv, D, D]`` matrix for the delta rule (``MatrixTransition``).
A run of ranks ``[a, b]`` composes to one such pair ("window"): applying ``[a, c]`` then
``[c+1, b]`` gives ``(Φ_b' Φ_a', Φ_b' M_a' + M_b')``.

Forward, Hillis–Steele over the ranks (``⌈log2 P⌉`` rounds, any P): at the start of round k rank r
holds the window ``E_r`` of ranks ``[r − 2^k + 1, r − 1]`` that enter it (empty at first; on rank 0
it is ``initial_state``, the state before the sequence). Rank r sends its own pair after that
window, ``x_r = (Φ_r Φ_E, Φ_r M_E + M_r)``, to rank ``r + 2^k`` (one non-cyclic ``ppermute``), and
a rank ``r ≥ 2^k`` puts what it receives (ranks ``[r − 2^{k+1} + 1, r − 2^k]``) in front of its
window. After the last round ``E_r`` covers every rank before r and ``S_in(r) = M_E``. Windows that
reach rank 0 carry ``initial_state`` in their M; their Φ is never read (nothing precedes rank 0),
so the last round sends M alone, and with ``g_gamma`` (the same Γ on every rank, no documents)
no round sends Φ: a window of n ranks has ``log Φ = n · log Γ``.

Backward, the same scan from the right with transposes: the cotangent of the state leaving rank r
is ``dS_out(r) = Φ_{r+1}ᵀ dS_out(r+1) + dS_in^loc(r+1)`` with ``dS_out(P−1) = d final_state``, i.e.
the scan above over the pairs ``(Φ_rᵀ, dS_in^loc(r))`` with ranks mirrored (offsets go r → r − 2^k).

Per layer and direction each rank sends at most ``⌈log2 P⌉`` pairs (one per round) and waits on
``⌈log2 P⌉`` dependent hops, against ``P − 1`` hops for the ring and ``P − 1`` received states
for the all-gather (``lasp_jax.state_passing``, ``lasp_jax.delta_rule.affine``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lasp_jax.state_passing import broadcast_from, state_decay


def num_rounds(size: int) -> int:
    """``⌈log2 P⌉``: the rounds (and dependent hops) of the scan over P ranks."""
    return (size - 1).bit_length()


def offsets(size: int) -> tuple[int, ...]:
    """The ``ppermute`` offsets of the rounds: 1, 2, 4, … below P."""
    return tuple(2**k for k in range(num_rounds(size)))


@dataclasses.dataclass(frozen=True)
class ScalarDecay:
    """``Φ = Γ · I`` per (row, head), carried as ``log Γ`` ``[B, H]`` (linear attention, notes/design.md §2),
    or ``Φ = diag(Γ)`` per key channel, ``log Γ`` ``[B, H, D]`` (GLA gates, §6): diagonal either way.

    Composition adds log decays (no differences, no ratios: stays finite for any gates; the reset
    decay of a document boundary, ``-1e30``, sums to at most ``-P·1e30``). ``shared``: the same Γ
    on every rank (``g_gamma`` or no decay, no documents), so a window of n ranks has
    ``n · log Γ`` and no round sends it.
    """

    shared: bool = False

    def identity(self, phi):
        return jnp.zeros_like(phi)

    def then(self, first, second):
        """The transition of applying ``first``, then ``second``."""
        return first + second

    def apply(self, phi, state):
        return state_decay(phi, state) * state

    def transpose(self, phi):
        return phi

    def repeated(self, phi, n: int):
        """``Φ^n`` (a window of n ranks with equal decay)."""
        return n * phi


@dataclasses.dataclass(frozen=True)
class MatrixTransition:
    """``Φ`` a ``[B, Hv, D, D]`` matrix per (row, value head) (the delta rule, notes/design.md §6)."""

    shared = False  # Φ differs per rank (it depends on k, β, g): every round but the last sends it

    def identity(self, phi):
        return jnp.zeros_like(phi) + jnp.eye(phi.shape[-1], dtype=phi.dtype)

    def then(self, first, second):
        return jnp.matmul(second, first)

    def apply(self, phi, state):
        return jnp.matmul(phi, state)

    def transpose(self, phi):
        return jnp.swapaxes(phi, -1, -2)


Transition = ScalarDecay | MatrixTransition


def _send(phi, m, *, axis_name, pairs):
    """One ``ppermute`` of ``(Φ, M)`` packed along the last axis (``phi=None``: M alone)."""
    if phi is None:
        return None, jax.lax.ppermute(m, axis_name, perm=pairs)
    lead = m.shape[:2]
    packed = jnp.concatenate([phi.astype(m.dtype).reshape(lead + (-1,)), m.reshape(lead + (-1,))], axis=-1)
    received = jax.lax.ppermute(packed, axis_name, perm=pairs)
    n_phi = math.prod(phi.shape[2:])
    return received[..., :n_phi].reshape(phi.shape).astype(phi.dtype), received[..., n_phi:].reshape(m.shape)


def _start(x, like):
    """``x`` (or zeros) as a float32 state varying like ``like`` (a checked ``shard_map`` needs it typed so)."""
    return jnp.zeros_like(like) if x is None else x.astype(like.dtype) + jnp.zeros_like(like)


def _exclusive_scan(kind: Transition, phi, m, start, *, axis_name, size, reverse):
    """``M`` of the window of every rank before r (after r when ``reverse``), applied to ``start``.

    ``start`` (or zeros) is the state before rank 0 (after rank P − 1 when ``reverse``).
    """
    rank = jax.lax.axis_index(axis_name)
    first = size - 1 if reverse else 0
    window_phi = kind.identity(phi)
    window_m = jnp.where(rank == first, _start(start, m), jnp.zeros_like(m))
    steps = offsets(size)
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        sent_m = kind.apply(phi, window_m) + m
        sent_phi = None if last or kind.shared else kind.then(window_phi, phi)
        pairs = [(r, r - step) for r in range(step, size)] if reverse else [(r, r + step) for r in range(size - step)]
        got_phi, got_m = _send(sent_phi, sent_m, axis_name=axis_name, pairs=pairs)
        receives = (rank < size - step) if reverse else (rank >= step)
        window_m = jnp.where(receives, kind.apply(window_phi, got_m) + window_m, window_m)
        if not last:
            got_phi = kind.repeated(phi, step) if kind.shared else got_phi
            window_phi = jnp.where(receives, kind.then(got_phi, window_phi), window_phi)
    return window_m


def prefix(kind: Transition, phi, m, s0, *, axis_name, size, want_final=False):
    """``(S_in(r), final state or None)``: the state entering rank r in ``⌈log2 P⌉`` rounds.

    ``phi``: this rank's ``Φ_r`` (``log Γ_r`` ``[B, H]`` or ``[B, H, D]`` for ``ScalarDecay``); ``m``: its ``M_r``
    ``[B, H, D, E]`` float32; ``s0``: ``initial_state`` or None. The final state (after the last
    rank) is one masked ``psum`` from rank P − 1, the same on every rank (invariant when checked).
    """
    s_in = _exclusive_scan(kind, phi, m, s0, axis_name=axis_name, size=size, reverse=False)
    final = None
    if want_final:
        final = broadcast_from(kind.apply(phi, s_in) + m, size - 1, axis_name)
    return s_in, final


def suffix(kind: Transition, phi, ds_local, d_final, *, axis_name, size):
    """``dS_out(r)``: the cotangent of the state leaving rank r, the scan from the right with ``Φᵀ``.

    ``ds_local``: ``dS_in^loc(r)``, the cotangent rank r's own outputs put on its entering state
    (``dM_r`` for linear attention); ``d_final``: the cotangent of the final state or None.
    """
    return _exclusive_scan(kind, kind.transpose(phi), ds_local, d_final, axis_name=axis_name, size=size, reverse=True)
