"""Flax NNX layers: projections with logical axes, norms, channel mixers and the linear-attention token mixer.

The linear token mixer calls only ``lasp_jax.lasp_attention`` (sequence-parallel when a mesh is
given, the single-device op otherwise) for whole sequences, and the one-token recurrence
``S = exp(g)·S + kᵀv,  o = scale·q S`` (notes/design.md §1) for decoding, where a chunked kernel has
nothing to chunk. The softmax token mixer of hybrid models calls ``lasp_jax.softmax_attention``
(LASP-2H all-gather or ring under a mesh) and decodes from a key/value cache. Both share their
projections, head split and positions (``ProjectedAttention``). Every parameter carries
``logical_axes`` metadata; ``models.sharding`` maps those names to mesh axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lasp_jax import lasp_attention, softmax_attention
from models.config import ModelConfig

Array = jax.Array


@dataclass(frozen=True)
class LaspContext:
    """How token mixers run: the mesh and the strategies; not part of the model's weights.

    ``mesh=None`` runs on one device. Activations ``[B, T, ...]`` are sharded ``(batch_axis, seq_axis)``.
    ``strategy``/``impl`` go to ``lasp_attention`` (linear layers), ``softmax_strategy``
    (``"allgather"`` = LASP-2H or ``"ring"``) to ``softmax_attention`` (softmax layers of hybrids).
    """

    mesh: Mesh | None = None
    seq_axis: str = "sp"
    batch_axis: str | None = None
    strategy: str = "ring"
    impl: str = "auto"
    softmax_strategy: str = "allgather"

    def constrain(self, x: Array) -> Array:
        """Pin a ``[B, T, ...]`` activation to (batch_axis, seq_axis) sharding under a mesh."""
        if self.mesh is None:
            return x
        spec = jax.sharding.PartitionSpec(self.batch_axis, self.seq_axis, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))


SINGLE_DEVICE = LaspContext()


def dtype_of(name: str):
    return jnp.dtype(name)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """``y = x @ kernel`` with a ``[in, out]`` kernel named by two logical axes; no bias."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, std: float, config: ModelConfig, rngs):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), std, dtype_of(config.param_dtype)), logical_axes=axes)
        self.dtype = dtype_of(config.dtype)

    def __call__(self, x: Array) -> Array:
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Embed(nnx.Module):
    """Token embedding ``[vocab, d_model]``; ``attend`` is the tied output head."""

    def __init__(self, config: ModelConfig, *, rngs):
        shape = (config.vocab_size, config.d_model)
        self.table = nnx.Param(
            _normal(rngs, shape, config.init_std, dtype_of(config.param_dtype)), logical_axes=("vocab", "embed")
        )
        self.dtype = dtype_of(config.dtype)

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        return jnp.dot(x.astype(self.dtype), self.table[...].astype(self.dtype).T, preferred_element_type=jnp.float32)


def srms(x: Array, eps: float) -> Array:
    """Simple RMSNorm (no gain), computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class Norm(nnx.Module):
    """``srms`` (TNL, no parameters), ``rms`` (Llama, gain) or ``layer`` (LayerNorm, gain and bias)."""

    def __init__(self, kind: str, dim: int, *, eps: float, config: ModelConfig):
        self.kind, self.eps = kind, eps
        pdt = dtype_of(config.param_dtype)
        if kind in ("rms", "layer"):
            self.scale = nnx.Param(jnp.ones((dim,), pdt), logical_axes=("norm",))
        if kind == "layer":
            self.bias = nnx.Param(jnp.zeros((dim,), pdt), logical_axes=("norm",))

    def __call__(self, x: Array) -> Array:
        if self.kind == "srms":
            return srms(x, self.eps)
        xf = x.astype(jnp.float32)
        if self.kind == "layer":
            xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps) * self.scale[...]
        if self.kind == "layer":
            y = y + self.bias[...]
        return y.astype(x.dtype)


class Mlp(nnx.Module):
    """Channel mixer: ``glu`` W3((W1 x) ⊙ (W2 x)) (TNL's simple GLU), ``swiglu`` or ``gelu``."""

    def __init__(self, config: ModelConfig, *, rngs):
        d, f = config.d_model, config.hidden_dim
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.n_layers)
        self.kind = config.mlp
        n_in = 1 if self.kind == "gelu" else 2
        # the two input projections are one matmul: [d, n_in·f]
        self.w_in = Dense(d, n_in * f, ("embed", "mlp"), std=std, config=config, rngs=rngs)
        self.w_out = Dense(f, d, ("mlp", "embed"), std=out_std, config=config, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        h = self.w_in(x)
        if self.kind == "gelu":
            h = jax.nn.gelu(h)
        else:
            a, b = jnp.split(h, 2, axis=-1)
            h = (jax.nn.silu(a) if self.kind == "swiglu" else a) * b
        return self.w_out(h)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al. 2022), including its rule for head counts not a power of 2."""

    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_heads - closest]
    return np.asarray(slopes, np.float64)


def tnl_log_decay(n_heads: int, layer: int, n_layers: int) -> np.ndarray:
    """TNL's lightning-attention log decay ``g_gamma = −slope_h · (1 − l/(L−1) + 1e-5)``, float32 ``[H]``."""
    depth = layer / max(n_layers - 1, 1)
    return (-alibi_slopes(n_heads) * (1.0 - depth + 1e-5)).astype(np.float32)


def feature_map(kind: str, x: Array) -> Array:
    if kind == "silu":
        return jax.nn.silu(x)
    if kind == "elu1":
        return jax.nn.elu(x) + 1.0
    return x


def lrpe(x: Array, positions: Array, base: float) -> Array:
    """TNL's LRPE (cos form): ``[x cos(θp), x sin(θp)]``, so ``q'·k' = Σ q_i k_i cos(θ_i (p_q − p_k))``.

    x ``[B, T, H, D]``, positions ``[T]`` or ``[B, T]`` global token indices; doubles the head dim.
    """
    d = x.shape[-1]
    theta = base ** (-2.0 / d * jnp.arange(d, dtype=jnp.float32))
    angle = _positions(positions, x)[..., None, None] * theta  # [B|1, T, 1, D]
    xf = x.astype(jnp.float32)
    return jnp.concatenate([xf * jnp.cos(angle), xf * jnp.sin(angle)], axis=-1).astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding (rotate-half form) at global ``positions``; x ``[B, T, H, D]``."""
    d = x.shape[-1]
    freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle = _positions(positions, x)[..., None, None] * freq  # [B|1, T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    a, b = xf[..., : d // 2], xf[..., d // 2 :]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


def _positions(positions: Array, x: Array) -> Array:
    p = jnp.asarray(positions, jnp.float32)
    return p[None] if p.ndim == 1 else p


def recurrent_step(q, k, v, state, *, log_decay=None, scale: float):
    """One token of the recurrence: ``S = exp(g)·S + kᵀv``, ``o = scale · q S``.

    q ``[B, H, D]``, k ``[B, Hk, D]``, v ``[B, Hk, E]``, state float32 ``[B, H, D, E]``,
    log_decay ``[H]`` or None. Returns (o ``[B, H, E]`` float32, new state).
    """
    group = q.shape[1] // k.shape[1]
    k = jnp.repeat(k.astype(jnp.float32), group, axis=1)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=1)
    if log_decay is not None:
        state = jnp.exp(log_decay)[None, :, None, None] * state
    state = state + k[..., :, None] * v[..., None, :]
    o = scale * jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32), state)
    return o, state


class ProjectedAttention(nnx.Module):
    """What both token mixers share: the fused input projection of q, k, v (and the gate u with
    ``srms_gate``), its split into heads, the family's positions, and the gated output projection.

    ``LinearAttention`` and ``SoftmaxAttention`` differ in what runs between the two projections
    (and in their decoding state), so each adds its own ``__call__``, ``step`` and state shapes.
    """

    def __init__(self, config: ModelConfig, *, rngs):
        self.config = c = config
        h, hk, dh = c.n_heads, c.kv_heads, c.head_dim
        self.widths = (h * dh, hk * dh, hk * dh) + ((c.d_model,) if c.attn_output_norm == "srms_gate" else ())
        std, out_std = c.init_std, c.init_std / math.sqrt(2 * c.n_layers)
        self.in_proj = Dense(c.d_model, sum(self.widths), ("embed", "qkv"), std=std, config=c, rngs=rngs)
        self.out_proj = Dense(h * dh, c.d_model, ("qkv", "embed"), std=out_std, config=c, rngs=rngs)

    def _split_qkv(self, x: Array):
        """q ``[B, T, H, dh]``, k, v ``[B, T, Hk, dh]`` and the gate u (or None) from the fused projection."""
        c = self.config
        b, t = x.shape[:2]
        parts = jnp.split(self.in_proj(x), np.cumsum(self.widths)[:-1], axis=-1)
        q = parts[0].reshape(b, t, c.n_heads, c.head_dim)
        k = parts[1].reshape(b, t, c.kv_heads, c.head_dim)
        v = parts[2].reshape(b, t, c.kv_heads, c.head_dim)
        return q, k, v, (parts[3] if len(parts) == 4 else None)

    def _positional(self, q: Array, k: Array, positions: Array):
        """q and k with the family's positions (LRPE or RoPE at global ``positions``; else as they are)."""
        c = self.config
        if c.position == "lrpe":
            return lrpe(q, positions, c.lrpe_base), lrpe(k, positions, c.lrpe_base)
        if c.position == "rope":
            return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        return q, k

    def _output(self, o: Array, u: Array | None) -> Array:
        """Heads ``[B, T, H, dh]`` → ``[B, T, d_model]``: merged, gated (``srms_gate``: SRMSNorm(o) ⊙ u), W_o."""
        c = self.config
        b, t = o.shape[:2]
        o = o.reshape(b, t, c.n_heads * c.head_dim).astype(dtype_of(c.dtype))
        if c.attn_output_norm == "srms_gate":
            o = srms(o, c.norm_eps) * u
        return self.out_proj(o)

    @property
    def key_dim(self) -> int:
        """D' of q and k after positions: LRPE doubles the head dim."""
        return 2 * self.config.head_dim if self.config.position == "lrpe" else self.config.head_dim


class LinearAttention(ProjectedAttention):
    """Causal linear-attention token mixer; one class for the three families (see ``models.config``).

    ``__call__`` runs a whole sequence through ``lasp_jax.lasp_attention``; ``step`` decodes one token
    from the float32 recurrent state ``[B, H, D', E']`` (``D' = 2·head_dim`` with LRPE, ``E' =
    head_dim + 1`` with the causal normaliser, whose denominator rides in v's extra ones column).
    """

    def __init__(self, config: ModelConfig, layer: int, *, rngs):
        super().__init__(config, rngs=rngs)
        c = config
        if c.attn_output_norm == "head_rms":
            self.head_norm = Norm("rms", c.head_dim, eps=c.norm_eps, config=c)
        # a constant (static tuple), not a Param: neither trained nor checkpointed
        self.log_decay = (
            tuple(float(x) for x in tnl_log_decay(c.n_heads, layer, c.n_layers)) if c.decay == "tnl" else None
        )
        self.scale = 1.0 if c.attn_output_norm in ("srms_gate", "denominator") else c.head_dim**-0.5

    def _project(self, x: Array, positions: Array):
        """q, k, v ``[B, T, ·, ·]`` ready for the recurrence, and the gate u (or None)."""
        c = self.config
        q, k, v, u = self._split_qkv(x)
        q, k = self._positional(feature_map(c.feature_map, q), feature_map(c.feature_map, k), positions)
        if c.attn_output_norm == "denominator":
            v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        return q, k, v, u

    def _finish(self, o: Array, u: Array | None) -> Array:
        """o ``[B, T, H, E']`` → the block output ``[B, T, d_model]``."""
        c = self.config
        if c.attn_output_norm == "denominator":
            of = o.astype(jnp.float32)
            o = (of[..., :-1] / (of[..., -1:] + 1e-6)).astype(o.dtype)
        elif c.attn_output_norm == "head_rms":
            o = self.head_norm(o)
        return self._output(o, u)

    def _g_gamma(self):
        return None if self.log_decay is None else jnp.asarray(self.log_decay, jnp.float32)

    def __call__(
        self,
        x: Array,
        ctx: LaspContext,
        positions: Array,
        *,
        initial_state: Array | None = None,
        return_state: bool = False,
        segment_ids: Array | None = None,
    ) -> tuple[Array, Array | None]:
        """``segment_ids`` ``[B, T]`` (packed documents): the state resets wherever the id changes."""
        q, k, v, u = self._project(x, positions)
        o, state = lasp_attention(
            q,
            k,
            v,
            mesh=ctx.mesh,
            seq_axis=ctx.seq_axis,
            batch_axis=ctx.batch_axis,
            strategy=ctx.strategy,
            g_gamma=self._g_gamma(),
            scale=self.scale,
            initial_state=initial_state,
            output_final_state=return_state,
            segment_ids=segment_ids,
            impl=ctx.impl,
        )
        return self._finish(o, u), state

    def step(self, x: Array, state: Array, position: Array) -> tuple[Array, Array]:
        """One token: x ``[B, d_model]``, state ``[B, H, D', E']``, position scalar or ``[B]``."""
        pos = jnp.broadcast_to(jnp.asarray(position), x.shape[:1])[:, None]  # [B, 1]
        q, k, v, u = self._project(x[:, None], pos)
        o, state = recurrent_step(q[:, 0], k[:, 0], v[:, 0], state, log_decay=self._g_gamma(), scale=self.scale)
        return self._finish(o[:, None].astype(q.dtype), u)[:, 0], state

    def state_shape(self, batch: int) -> tuple[int, int, int, int]:
        """Shape of the recurrent state ``[B, H, D', E']``."""
        c = self.config
        e = c.head_dim + 1 if c.attn_output_norm == "denominator" else c.head_dim
        return (batch, c.n_heads, self.key_dim, e)


class SoftmaxAttention(ProjectedAttention):
    """Causal softmax-attention token mixer for the softmax layers of hybrid models (LASP-2H).

    The family's own projections without the linear-attention feature map: Linear-Llama3 gets
    Llama-3 attention (q, k, v with grouped heads, RoPE, ``D^-0.5``, W_o; no head norm); TNL keeps
    its q, k, v, u projections, the SRMSNorm-and-gate output and its positions (LRPE, relative, or
    none), and scales the logits by ``D'^-0.5``. Whole sequences go through
    ``lasp_jax.softmax_attention`` with ``ctx.softmax_strategy``; ``step`` decodes one token
    against a fixed-capacity key/value cache ``(k [B, S, Hk, D'], v [B, S, Hk, E])`` written at
    ``position`` (entries after it are masked).
    """

    def __init__(self, config: ModelConfig, layer: int, *, rngs):
        del layer  # no per-layer constants: softmax layers have no decay
        # softmax normalises by itself: no causal-normaliser column and no per-head RMS norm
        super().__init__(config, rngs=rngs)
        self.scale = self.key_dim**-0.5

    def _project(self, x: Array, positions: Array):
        q, k, v, u = self._split_qkv(x)
        return (*self._positional(q, k, positions), v, u)

    def __call__(
        self,
        x: Array,
        ctx: LaspContext,
        positions: Array,
        *,
        initial_state=None,
        return_state: bool = False,
        segment_ids: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """Returns the block output and, with ``return_state``, the keys and values ``[B, T, Hk, ·]``."""
        if initial_state is not None:
            raise ValueError(
                "a softmax-attention layer cannot continue from an initial state: run the whole prefix "
                "(prefill) in one call, then decode with step()"
            )
        q, k, v, u = self._project(x, positions)
        o = softmax_attention(
            q,
            k,
            v,
            mesh=ctx.mesh,
            seq_axis=ctx.seq_axis,
            batch_axis=ctx.batch_axis,
            strategy=ctx.softmax_strategy,
            scale=self.scale,
            segment_ids=segment_ids,
        )
        return self._output(o, u), ((k, v) if return_state else None)

    def step(self, x: Array, state: tuple[Array, Array], position: Array) -> tuple[Array, tuple[Array, Array]]:
        """One token at scalar ``position`` against the cache ``state = (k, v)`` ``[B, S, Hk, ·]``."""
        c = self.config
        k_cache, v_cache = state
        pos = jnp.asarray(position, jnp.int32)
        q, k, v, u = self._project(x[:, None], jnp.broadcast_to(pos, x.shape[:1])[:, None])
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), pos, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), pos, axis=1)
        b, s = k_cache.shape[:2]
        group = c.n_heads // c.kv_heads
        qg = q[:, 0].astype(jnp.float32).reshape(b, c.kv_heads, group, -1)
        logits = jnp.einsum("bhgd,bshd->bhgs", qg, k_cache.astype(jnp.float32)) * self.scale
        logits = jnp.where(jnp.arange(s) <= pos, logits, -jnp.inf)
        o = jnp.einsum("bhgs,bshe->bhge", jax.nn.softmax(logits, axis=-1), v_cache.astype(jnp.float32))
        o = o.reshape(b, 1, c.n_heads, -1).astype(q.dtype)
        return self._output(o, u)[:, 0], (k_cache, v_cache)

    def cache_shapes(self, batch: int, size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the key and value caches for ``size`` positions."""
        c = self.config
        return (batch, size, c.kv_heads, self.key_dim), (batch, size, c.kv_heads, c.head_dim)
