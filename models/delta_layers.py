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

Both are standalone layers (``models.standalone``): ``GatedDeltaNet(d_model, n_heads, n_v_heads=...,
rngs=...)``, ``__call__(x, ctx=None, *, segment_ids=None, cache=None) -> (y, cache)``; ``from_config``
builds a language model's layer. Under ``ctx.head_axis`` (tensor parallelism) the projections of q,
k, v, the gates and the output gate are column-parallel, the short convolution runs on each device's
own channels (``rank_major``), the delta rule's ``shard_map`` is manual over the head axis, and W_o is
row-parallel.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lasp_jax import lasp_gated_delta_rule, short_conv, short_conv_step
from models.config import ModelConfig, check_gate_lower_bound
from models.layers import SINGLE_DEVICE, Dense, LaspContext, MixerSpec, default_head_dim, dtype_of

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


@dataclasses.dataclass(frozen=True)
class DeltaRuleSpec(MixerSpec):
    """A delta-rule layer's constructor arguments (static, not weights)."""

    d_model: int
    n_heads: int
    head_dim: int
    n_v_heads: int
    conv_size: int = 4

    def __post_init__(self):
        self.check_positive("d_model", "n_heads", "head_dim", "n_v_heads", "conv_size")
        if self.n_v_heads % self.n_heads:
            raise ValueError(f"n_v_heads must be a multiple of n_heads: {self.n_heads=}, {self.n_v_heads=}")


def rank_major(parts: list[Array], tp: int) -> Array:
    """Concatenate ``[..., w_i]`` blocks, each split over ``tp`` devices, so that every device's
    slice of the result holds its own slices of all blocks (the identity order for ``tp = 1``)."""
    lead = parts[0].shape[:-1]
    blocks = [p.reshape(*lead, tp, p.shape[-1] // tp) for p in parts]
    # explicit widths: a zero-width state (conv_size=1) has no -1 to infer
    return jnp.concatenate(blocks, axis=-1).reshape(*lead, sum(p.shape[-1] for p in parts))


def from_rank_major(x: Array, widths: tuple[int, ...], tp: int) -> list[Array]:
    """The blocks of ``widths`` back from ``rank_major``'s order."""
    lead = x.shape[:-1]
    cuts = np.cumsum([w // tp for w in widths])[:-1]
    pieces = jnp.split(x.reshape(*lead, tp, x.shape[-1] // tp), cuts, axis=-1)
    return [p.reshape(*lead, w) for p, w in zip(pieces, widths, strict=True)]


class DeltaRuleMixer(nnx.Module):
    """What Gated DeltaNet and KDA share: the fused input projection (its first ``conv_channels``
    columns are q, k, v), the short convolution, the delta rule, the gated output norm, W_o.

    Subclasses name the remaining projection columns (``gate_widths``, column-parallel where
    ``gate_split`` says so) and turn them into ``(beta, g, output gate)`` (``_gates``), with
    ``output_activation`` on the gate.
    """

    output_activation = staticmethod(jax.nn.silu)
    gate_split: tuple[bool, ...] = ()
    gate_lower_bound: float | None = None  # the log gates' floor, passed to the op (KDA's bounded gates)

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        head_dim: int | None = None,
        n_v_heads: int | None = None,
        conv_size: int = 4,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        out_std: float = 0.02,
        dtype: str = "float32",
        param_dtype: str = "float32",
        split_projections: bool = False,
        rngs: nnx.Rngs,
    ):
        head_dim = default_head_dim(d_model, n_heads, head_dim, layer=type(self).__name__)
        n_v_heads = n_heads if n_v_heads is None else n_v_heads
        self.spec = s = DeltaRuleSpec(
            d_model,
            n_heads,
            head_dim,
            n_v_heads,
            conv_size,
            norm_eps=norm_eps,
            init_std=init_std,
            out_std=out_std,
            dtype=dtype,
            param_dtype=param_dtype,
            split_projections=split_projections,
        )
        self.key_width, self.value_width = s.n_heads * s.head_dim, s.n_v_heads * s.head_dim
        self.conv_channels = 2 * self.key_width + self.value_width
        self.conv_widths = (self.key_width, self.key_width, self.value_width)
        self.widths = (*self.conv_widths, *self.gate_widths())
        pdt = dtype_of(s.param_dtype)
        self.in_proj = Dense(s.d_model, sum(self.widths), ("embed", "qkv"), std=s.init_std, config=s, rngs=rngs)
        bound = 1.0 / math.sqrt(s.conv_size)  # PyTorch's Conv1d default for a depthwise width-W kernel
        self.conv_weight = nnx.Param(
            _uniform(rngs, (s.conv_size, self.conv_channels), -bound, bound).astype(pdt), logical_axes=(None, "qkv")
        )
        self.norm_scale = nnx.Param(jnp.ones((s.head_dim,), pdt), logical_axes=("norm",))
        self.out_proj = Dense(self.value_width, s.d_model, ("qkv", "embed"), std=s.out_std, config=s, rngs=rngs)
        self.scale = s.head_dim**-0.5
        self._init_gates(rngs)

    @classmethod
    def from_config(cls, config: ModelConfig, layer: int, *, rngs):
        """The token mixer of ``layer`` of a language model with ``config`` (no per-layer constants)."""
        del layer
        c = config
        return cls(
            c.d_model,
            c.n_heads,
            head_dim=c.head_dim,
            n_v_heads=c.v_heads,
            conv_size=c.conv_size,
            **c.mixer_options(),
            **cls._config_options(c),
            rngs=rngs,
        )

    @classmethod
    def _config_options(cls, config: ModelConfig) -> dict:
        """A subclass's own constructor arguments from the model config."""
        del config
        return {}

    def gate_widths(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _init_gates(self, rngs) -> None:
        """The gates' own parameters (after the shared ones, so initialisation order is fixed)."""
        raise NotImplementedError

    def _gates(self, parts: list[Array], ctx: LaspContext) -> tuple[Array, Array, Array]:
        """``(beta [..., Hv], g [..., Hv(, D)], output gate [..., Hv·E])`` from the gate columns."""
        raise NotImplementedError

    def _split(self, x: Array, ctx: LaspContext):
        """The conv inputs q, k, v ``[..., ·]`` and the gates of x ``[..., d_model]``."""
        split = (True,) * len(self.conv_widths) + self.gate_split
        parts = self.in_proj.project(x, self.widths, ctx, split)
        return parts[:3], self._gates(parts[3:], ctx)

    def _conv(self, qkv: list[Array], ctx: LaspContext, segment_ids, initial_state, return_state: bool):
        """The short convolution of q, k, v under the mesh; each device convolves its own channels.
        With ``split_projections`` (one device per head group) each block is convolved alone, so the
        blocks, like the projection's products, are never concatenated (nor their cotangents)."""
        tp = ctx.tensor_parallel

        def blocks(x):  # q | k | v columns → the three blocks
            return jnp.split(x, np.cumsum(self.conv_widths)[:-1], axis=-1)

        def conv(x, weight, init):
            return short_conv(
                x,
                weight,
                mesh=ctx.mesh,
                seq_axis=ctx.seq_axis,
                batch_axis=ctx.batch_axis,
                segment_ids=segment_ids,
                initial_state=init,
                output_final_state=return_state,
            )

        weight = blocks(self.conv_weight[...])
        if tp == 1 and self.spec.split_projections:  # one convolution per block: q|k|v is never formed
            init = [None] * 3 if initial_state is None else blocks(initial_state)
            outs = [conv(x, w, s0) for x, w, s0 in zip(qkv, weight, init, strict=True)]
            final = jnp.concatenate([f for _, f in outs], axis=-1) if return_state else None
            return [y for y, _ in outs], final
        weight = rank_major([ctx.constrain_columns(w, split=True) for w in weight], tp)
        if initial_state is not None:
            initial_state = rank_major(blocks(initial_state), tp)
        y, final = conv(rank_major(qkv, tp), weight, initial_state)
        final = None if final is None else jnp.concatenate(from_rank_major(final, self.conv_widths, tp), axis=-1)
        return from_rank_major(y, self.conv_widths, tp), final

    def _heads(self, qkv: list[Array], ctx: LaspContext):
        """SiLU'd conv outputs → unit q, k ``[..., H, D]`` and v ``[..., Hv, E]``."""
        s = self.spec
        q, k, v = (jax.nn.silu(x) for x in qkv)
        lead = q.shape[:-1]
        q = l2_normalize(q.reshape(*lead, s.n_heads, s.head_dim))
        k = l2_normalize(k.reshape(*lead, s.n_heads, s.head_dim))
        v = v.reshape(*lead, s.n_v_heads, s.head_dim)
        return tuple(ctx.constrain(x, split_dim=-2) for x in (q, k, v))

    def _output(self, o: Array, gate: Array) -> Array:
        """o ``[..., Hv, E]``: per-head RMSNorm times gain, times act(gate), merged heads, W_o (row-parallel)."""
        s = self.spec
        of = o.astype(jnp.float32)
        of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + s.norm_eps) * self.norm_scale[...]
        of = of * self.output_activation(gate.astype(jnp.float32)).reshape(of.shape)
        return self.out_proj(of.reshape(*o.shape[:-2], self.value_width).astype(dtype_of(s.dtype)))

    def __call__(
        self,
        x: Array,
        ctx: LaspContext | None = None,
        positions: Array | None = None,
        *,
        segment_ids: Array | None = None,
        cache: DeltaRuleState | None = None,
        initial_state: DeltaRuleState | None = None,
        return_state: bool = False,
    ) -> tuple[Array, DeltaRuleState | None]:
        """x ``[B, T, d_model]`` → ``(y, cache)``.

        ``ctx``: the mesh and strategies (None: one device). ``positions`` are unused (the
        convolution and the decays order the tokens). ``segment_ids`` ``[B, T]``: neither the
        convolution nor the state crosses a document boundary. ``cache`` (``init_cache``): continue
        from it and return the state after x. The language model's form: ``initial_state`` and
        ``return_state``.
        """
        del positions
        ctx = ctx or SINGLE_DEVICE
        ctx.check_tokens(x, self.spec.d_model, layer=type(self).__name__)
        if cache is not None:
            initial_state, return_state = cache, True
        qkv, (beta, g, gate) = self._split(x, ctx)
        conv_init = None if initial_state is None else initial_state.conv
        qkv, conv_state = self._conv(qkv, ctx, segment_ids, conv_init, return_state)
        q, k, v = self._heads(qkv, ctx)
        o, recurrent = lasp_gated_delta_rule(
            q,
            k,
            v,
            beta.astype(q.dtype),
            g=g,
            segment_ids=segment_ids,
            scale=self.scale,
            initial_state=None if initial_state is None else initial_state.recurrent,
            output_final_state=return_state,
            gate_lower_bound=self.gate_lower_bound,
            **ctx.op_options(),
        )
        state = DeltaRuleState(conv_state, recurrent) if return_state else None
        return self._output(o, gate), state

    def step(self, x: Array, state: DeltaRuleState, position: Array) -> tuple[Array, DeltaRuleState]:
        """One token: x ``[B, d_model]`` → (output ``[B, d_model]``, the state after it)."""
        del position
        qkv, (beta, g, gate) = self._split(x, SINGLE_DEVICE)
        qkv, conv = short_conv_step(jnp.concatenate(qkv, axis=-1), state.conv, self.conv_weight[...])
        q, k, v = self._heads(jnp.split(qkv, np.cumsum(self.conv_widths)[:-1], axis=-1), SINGLE_DEVICE)
        o, recurrent = delta_rule_step(q, k, v, beta, g, state.recurrent, scale=self.scale)
        return self._output(o.astype(q.dtype), gate), DeltaRuleState(conv.astype(state.conv.dtype), recurrent)

    def init_state(self, batch: int) -> DeltaRuleState:
        """The state before the first token: zero convolution inputs and a zero delta-rule state."""
        s = self.spec
        return DeltaRuleState(
            jnp.zeros((batch, s.conv_size - 1, self.conv_channels), dtype_of(s.dtype)),
            jnp.zeros((batch, s.n_v_heads, s.head_dim, s.head_dim), jnp.float32),
        )

    init_cache = init_state  # the standalone layers' name: the cache before the first token


class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet: scalar decay and β per value head, output gate ``SiLU(W_z x)`` (see the module)."""

    gate_split = (True, True, True)

    def _init_gates(self, rngs) -> None:
        hv = self.spec.n_v_heads
        self.a_log = nnx.Param(jnp.log(_uniform(rngs, (hv,), 1.0, 16.0)), logical_axes=("heads",))
        dt = jnp.exp(_uniform(rngs, (hv,), math.log(1e-3), math.log(0.1)))
        self.dt_bias = nnx.Param(_inverse_softplus(jnp.maximum(dt, 1e-4)), logical_axes=("heads",))

    def gate_widths(self) -> tuple[int, ...]:
        hv = self.spec.n_v_heads
        return (self.value_width, hv, hv)  # output gate z, decay input a, β input b

    def _gates(self, parts, ctx):
        z, a, b = parts
        g = -jnp.exp(self.a_log[...]) * jax.nn.softplus(a.astype(jnp.float32) + self.dt_bias[...])
        return jax.nn.sigmoid(b.astype(jnp.float32)), g, z


class KDA(DeltaRuleMixer):
    """Kimi Delta Attention: one decay per key channel from a rank-D projection, β per q/k head,
    output gate ``sigmoid(W_up' W_down' x + b)`` (see the module)."""

    output_activation = staticmethod(jax.nn.sigmoid)
    gate_split = (False, False, True)  # the rank-D down projections are not split by heads

    def __init__(self, d_model: int, n_heads: int, *, gate_lower_bound: float | None = None, **kwargs):
        """``gate_lower_bound``: None, the decays ``g = −exp(A_log) · softplus(f + dt_bias)``; a negative
        number b, ``g = b · sigmoid(exp(A_log) · (f + dt_bias))`` in [b, 0) (flash-linear-attention's
        ``lower_bound``, Kimi Linear's safe gate). The op is told the bound (its ``gate_lower_bound``):
        with b ≥ −5 the Pallas kernels never build their exact form (the bf16 default still picks
        between its 16- and 32-row factored forms at run time); b ≥ −2.5 leaves the 32-row form alone."""
        check_gate_lower_bound(gate_lower_bound)
        self.gate_lower_bound = None if gate_lower_bound is None else float(gate_lower_bound)
        super().__init__(d_model, n_heads, **kwargs)

    @classmethod
    def _config_options(cls, config: ModelConfig) -> dict:
        return {"gate_lower_bound": config.gate_lower_bound}

    def _init_gates(self, rngs) -> None:
        s = self.spec
        rank, pdt = s.head_dim, dtype_of(s.param_dtype)
        self.decay_up = Dense(rank, self.key_width, ("lowrank", "qkv"), std=s.init_std, config=s, rngs=rngs)
        self.gate_up = Dense(rank, self.value_width, ("lowrank", "qkv"), std=s.init_std, config=s, rngs=rngs)
        self.gate_bias = nnx.Param(jnp.zeros((self.value_width,), pdt), logical_axes=("qkv",))
        self.a_log = nnx.Param(jnp.log(_uniform(rngs, (s.n_heads,), 1.0, 16.0)), logical_axes=("heads",))
        self.dt_bias = nnx.Param(jnp.zeros((self.key_width,), jnp.float32), logical_axes=("qkv",))

    def gate_widths(self) -> tuple[int, ...]:
        rank = self.spec.head_dim
        return (rank, rank, self.spec.n_heads)  # decay down, output-gate down, β input

    def _gates(self, parts, ctx):
        s = self.spec
        decay_down, gate_down, b = parts
        lead = b.shape[:-1]
        f = self.decay_up.project(decay_down, (self.key_width,), ctx, (True,))[0].astype(jnp.float32)
        f = (f + self.dt_bias[...]).reshape(*lead, s.n_heads, s.head_dim)
        rate = jnp.exp(self.a_log[...])[:, None]
        if self.gate_lower_bound is None:
            g = -rate * jax.nn.softplus(f)
        else:
            g = self.gate_lower_bound * jax.nn.sigmoid(rate * f)
        group = s.n_v_heads // s.n_heads  # q/k head h's gates and β serve its value heads
        g = jnp.repeat(g, group, axis=-2)
        beta = jnp.repeat(jax.nn.sigmoid(b.astype(jnp.float32)), group, axis=-1)
        gate = self.gate_up.project(gate_down, (self.value_width,), ctx, (True,))[0].astype(jnp.float32)
        return beta, g, gate + self.gate_bias[...]


DELTA_MIXERS = {"gdn": GatedDeltaNet, "kda": KDA}
