"""Delta-rule token mixers: Gated DeltaNet and KDA (Kimi Delta Attention), Flax NNX.

Both run, per layer (notes/design.md §6; q/k heads H of dim D, value heads Hv of dim E = D):

1. one fused input projection of x: q, k ``[H·D]``, v ``[Hv·E]`` and the gate inputs;
2. a causal depthwise convolution of width ``conv_size`` over q, k, v, then SiLU
   (``lasp_jax.short_conv``: under sp rank r borrows the last ``W − 1`` inputs of rank r − 1);
3. L2-normalised q and k, ``β = sigmoid(W_β x)``, a log decay ``g ≤ 0``;
4. ``lasp_jax.lasp_gated_delta_rule`` (sequence-parallel under a mesh, the single-device op
   otherwise): ``S_t = (I − β_t k_t k_tᵀ) diag(exp g_t) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = D^-½ S_tᵀ q_t``;
5. per value head ``RMSNorm(o) ⊙ act(gate)`` (one gain vector of size E shared by the heads), then
   the output projection.

The two differ in the gates (both as flash-linear-attention's layers, fla-org/flash-linear-attention
``fla/layers/gated_deltanet.py`` and ``fla/layers/kda.py``):

- ``GatedDeltaNet``: one scalar gate per value head, ``g = −exp(A_log) · softplus(W_a x + dt_bias)``
  (Mamba-2's parametrisation, ``A ~ U(1, 16)``, ``dt_bias`` the inverse softplus of
  ``dt ~ logU(1e-3, 0.1)``); β per value head; output gate ``SiLU(W_z x)``.
- ``KDA``: one gate per key channel from a rank-D projection,
  ``g = −exp(A_log_h) · softplus(W_up W_down x + dt_bias)`` with ``A_log`` per q/k head and
  ``dt_bias`` per channel (zeros at init; fla's KDA form, as Kimi Linear); β per q/k head (shared
  by its value heads); output gate ``sigmoid(W_up' W_down' x + b)``, also of rank D.

Decoding (``step``) carries ``DeltaRuleState``: the last ``W − 1`` convolution inputs and the float32
delta-rule state ``[B, Hv, D, E]``, advanced one token with the recurrence written out in jnp.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lasp_jax import lasp_gated_delta_rule, short_conv, short_conv_step
from models.config import ModelConfig
from models.layers import Dense, LaspContext, dtype_of

Array = jax.Array
_L2_EPS = 1e-6  # q / sqrt(Σq² + eps), as fla's l2norm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaRuleState:
    """Decoding state of one delta-rule layer: ``conv`` ``[B, W−1, C]`` (the last convolution inputs,
    oldest first, C = q, k and v channels) and ``recurrent`` float32 ``[B, Hv, D, E]``."""

    conv: Array
    recurrent: Array


def l2_normalize(x: Array) -> Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + _L2_EPS)).astype(x.dtype)


def delta_rule_step(q, k, v, beta, g, state, *, scale: float):
    """One token of the gated delta rule (the op's recurrence, notes/design.md §6).

    q, k ``[B, H, D]``, v ``[B, Hv, E]``, beta ``[B, Hv]``, g ``[B, Hv]`` or ``[B, Hv, D]`` (log
    decay), state float32 ``[B, Hv, D, E]``. Returns (o ``[B, Hv, E]`` float32, the new state).
    """
    group = v.shape[1] // q.shape[1]
    q, k = (jnp.repeat(x.astype(jnp.float32), group, axis=1) for x in (q, k))
    decay = jnp.exp(g.astype(jnp.float32))
    state = state * (decay[..., None, None] if decay.ndim == 2 else decay[..., None])
    error = v.astype(jnp.float32) - jnp.einsum("bhd,bhde->bhe", k, state)  # what the state misses of v
    state = state + jnp.einsum("bhd,bhe->bhde", k, beta.astype(jnp.float32)[..., None] * error)
    return scale * jnp.einsum("bhd,bhde->bhe", q, state), state


def _uniform(rngs: nnx.Rngs, shape, low: float, high: float) -> Array:
    return jax.random.uniform(rngs.params(), shape, jnp.float32, low, high)


def _inverse_softplus(y):
    return y + jnp.log(-jnp.expm1(-y))


class DeltaRuleMixer(nnx.Module):
    """What Gated DeltaNet and KDA share: the fused input projection (its first ``conv_channels``
    columns are q, k, v), the short convolution, the delta rule, the gated output norm, W_o.

    Subclasses name the remaining projection columns (``gate_widths``) and turn them into
    ``(beta, g, output gate)`` (``_gates``), with ``output_activation`` on the gate.
    """

    output_activation = staticmethod(jax.nn.silu)

    def __init__(self, config: ModelConfig, layer: int, *, rngs):
        del layer  # no per-layer constants: the decays are learned
        self.config = c = config
        self.key_width, self.value_width = c.n_heads * c.head_dim, c.v_heads * c.head_dim
        self.conv_channels = 2 * self.key_width + self.value_width
        self.widths = (self.conv_channels, *self.gate_widths())
        std, out_std = c.init_std, c.init_std / math.sqrt(2 * c.n_layers)
        pdt = dtype_of(c.param_dtype)
        self.in_proj = Dense(c.d_model, sum(self.widths), ("embed", "qkv"), std=std, config=c, rngs=rngs)
        bound = 1.0 / math.sqrt(c.conv_size)  # PyTorch's Conv1d default for a depthwise width-W kernel
        self.conv_weight = nnx.Param(
            _uniform(rngs, (c.conv_size, self.conv_channels), -bound, bound).astype(pdt), logical_axes=(None, "qkv")
        )
        self.norm_scale = nnx.Param(jnp.ones((c.head_dim,), pdt), logical_axes=("norm",))
        self.out_proj = Dense(self.value_width, c.d_model, ("qkv", "embed"), std=out_std, config=c, rngs=rngs)
        self.scale = c.head_dim**-0.5

    def gate_widths(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _gates(self, parts: list[Array]) -> tuple[Array, Array, Array]:
        """``(beta [..., Hv], g [..., Hv(, D)], output gate [..., Hv·E])`` from the gate columns."""
        raise NotImplementedError

    def _split(self, x: Array):
        """The conv inputs ``[..., C]`` and the gates of x ``[..., d_model]``."""
        parts = jnp.split(self.in_proj(x), np.cumsum(self.widths)[:-1], axis=-1)
        return parts[0], self._gates(parts[1:])

    def _heads(self, qkv: Array):
        """SiLU'd conv outputs → unit q, k ``[..., H, D]`` and v ``[..., Hv, E]``."""
        c = self.config
        qkv = jax.nn.silu(qkv)
        q, k, v = jnp.split(qkv, (self.key_width, 2 * self.key_width), axis=-1)
        lead = qkv.shape[:-1]
        q = l2_normalize(q.reshape(*lead, c.n_heads, c.head_dim))
        k = l2_normalize(k.reshape(*lead, c.n_heads, c.head_dim))
        return q, k, v.reshape(*lead, c.v_heads, c.head_dim)

    def _output(self, o: Array, gate: Array) -> Array:
        """o ``[..., Hv, E]``: per-head RMSNorm times gain, times act(gate), merged heads, W_o."""
        c = self.config
        of = o.astype(jnp.float32)
        of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + c.norm_eps) * self.norm_scale[...]
        of = of * self.output_activation(gate.astype(jnp.float32)).reshape(of.shape)
        return self.out_proj(of.reshape(*o.shape[:-2], self.value_width).astype(dtype_of(c.dtype)))

    def __call__(
        self,
        x: Array,
        ctx: LaspContext,
        positions: Array,
        *,
        initial_state: DeltaRuleState | None = None,
        return_state: bool = False,
        segment_ids: Array | None = None,
    ) -> tuple[Array, DeltaRuleState | None]:
        """x ``[B, T, d_model]`` → the block output (and the decoding state after the last token).

        ``positions`` are unused (the convolution and the decays order the tokens); ``segment_ids``
        ``[B, T]``: neither the convolution nor the state crosses a document boundary.
        """
        del positions
        qkv, (beta, g, gate) = self._split(x)
        placement = dict(mesh=ctx.mesh, seq_axis=ctx.seq_axis, batch_axis=ctx.batch_axis, segment_ids=segment_ids)
        qkv, conv_state = short_conv(
            qkv,
            self.conv_weight[...],
            initial_state=None if initial_state is None else initial_state.conv,
            output_final_state=return_state,
            **placement,
        )
        q, k, v = self._heads(qkv)
        o, recurrent = lasp_gated_delta_rule(
            q,
            k,
            v,
            beta.astype(q.dtype),
            g=g,
            strategy=ctx.strategy,
            scale=self.scale,
            initial_state=None if initial_state is None else initial_state.recurrent,
            output_final_state=return_state,
            impl=ctx.impl,
            **placement,
        )
        state = DeltaRuleState(conv_state, recurrent) if return_state else None
        return self._output(o, gate), state

    def step(self, x: Array, state: DeltaRuleState, position: Array) -> tuple[Array, DeltaRuleState]:
        """One token: x ``[B, d_model]`` → (output ``[B, d_model]``, the state after it)."""
        del position
        qkv, (beta, g, gate) = self._split(x)
        qkv, conv = short_conv_step(qkv, state.conv, self.conv_weight[...])
        q, k, v = self._heads(qkv)
        o, recurrent = delta_rule_step(q, k, v, beta, g, state.recurrent, scale=self.scale)
        return self._output(o.astype(q.dtype), gate), DeltaRuleState(conv.astype(state.conv.dtype), recurrent)

    def init_state(self, batch: int) -> DeltaRuleState:
        """The state before the first token: zero convolution inputs and a zero delta-rule state."""
        c = self.config
        return DeltaRuleState(
            jnp.zeros((batch, c.conv_size - 1, self.conv_channels), dtype_of(c.dtype)),
            jnp.zeros((batch, c.v_heads, c.head_dim, c.head_dim), jnp.float32),
        )


class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet: scalar decay and β per value head, output gate ``SiLU(W_z x)`` (see the module)."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs):
        super().__init__(config, layer, rngs=rngs)
        hv = config.v_heads
        self.a_log = nnx.Param(jnp.log(_uniform(rngs, (hv,), 1.0, 16.0)), logical_axes=("heads",))
        dt = jnp.exp(_uniform(rngs, (hv,), math.log(1e-3), math.log(0.1)))
        self.dt_bias = nnx.Param(_inverse_softplus(jnp.maximum(dt, 1e-4)), logical_axes=("heads",))

    def gate_widths(self) -> tuple[int, ...]:
        hv = self.config.v_heads
        return (self.value_width, hv, hv)  # output gate z, decay input a, β input b

    def _gates(self, parts):
        z, a, b = parts
        g = -jnp.exp(self.a_log[...]) * jax.nn.softplus(a.astype(jnp.float32) + self.dt_bias[...])
        return jax.nn.sigmoid(b.astype(jnp.float32)), g, z


class KDA(DeltaRuleMixer):
    """Kimi Delta Attention: one decay per key channel from a rank-D projection, β per q/k head,
    output gate ``sigmoid(W_up' W_down' x + b)`` (see the module)."""

    output_activation = staticmethod(jax.nn.sigmoid)

    def __init__(self, config: ModelConfig, layer: int, *, rngs):
        super().__init__(config, layer, rngs=rngs)
        c = config
        rank, pdt = c.head_dim, dtype_of(c.param_dtype)
        self.decay_up = Dense(rank, self.key_width, ("lowrank", "qkv"), std=c.init_std, config=c, rngs=rngs)
        self.gate_up = Dense(rank, self.value_width, ("lowrank", "qkv"), std=c.init_std, config=c, rngs=rngs)
        self.gate_bias = nnx.Param(jnp.zeros((self.value_width,), pdt), logical_axes=("qkv",))
        self.a_log = nnx.Param(jnp.log(_uniform(rngs, (c.n_heads,), 1.0, 16.0)), logical_axes=("heads",))
        self.dt_bias = nnx.Param(jnp.zeros((self.key_width,), jnp.float32), logical_axes=("qkv",))

    def gate_widths(self) -> tuple[int, ...]:
        rank = self.config.head_dim
        return (rank, rank, self.config.n_heads)  # decay down, output-gate down, β input

    def _gates(self, parts):
        c = self.config
        decay_down, gate_down, b = parts
        lead = b.shape[:-1]
        f = self.decay_up(decay_down).astype(jnp.float32) + self.dt_bias[...]
        g = -jnp.exp(self.a_log[...])[:, None] * jax.nn.softplus(f.reshape(*lead, c.n_heads, c.head_dim))
        group = c.v_heads // c.n_heads  # q/k head h's gates and β serve its value heads
        g = jnp.repeat(g, group, axis=-2)
        beta = jnp.repeat(jax.nn.sigmoid(b.astype(jnp.float32)), group, axis=-1)
        gate = self.gate_up(gate_down).astype(jnp.float32) + self.gate_bias[...]
        return beta, g, gate


DELTA_MIXERS = {"gdn": GatedDeltaNet, "kda": KDA}
