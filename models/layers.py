"""Flax NNX layers: projections with logical axes, norms, channel mixers and the linear-attention token mixer.

The linear token mixer calls only ``lasp_jax.lasp_attention`` (sequence-parallel when a mesh is
given, the single-device op otherwise) for whole sequences, and the one-token recurrence
``S = exp(g)·S + kᵀv,  o = scale·q S`` (notes/design.md §1) for decoding, where a chunked kernel has
nothing to chunk. The softmax token mixer of hybrid models calls ``lasp_jax.softmax_attention``
(LASP-2H all-gather or ring under a mesh) and decodes from a key/value cache. Both share their
projections, head split and positions (``ProjectedAttention``). Every parameter carries
``logical_axes`` metadata; ``models.sharding`` maps those names to mesh axes.

The token mixers are standalone (notes/design.md §3): their constructors take their own small
arguments (``d_model``, ``n_heads``, ``head_dim``, ..., dtypes, ``rngs``), ``from_config`` builds
them from a ``ModelConfig``, and ``__call__(x, ctx=None, *, segment_ids=None, cache=None)`` returns
``(y, cache)``; ``models.standalone`` is their public home, with the Linen wrappers. Under a
``LaspContext`` with a ``head_axis`` (tensor parallelism, Megatron-style) the q/k/v/gate/up
projections are column-parallel (``project``), the token mixer's ``shard_map`` is manual over the
head axis, and the output/down projections are row-parallel (the partitioner reduces their partial sums).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lasp_jax import lasp_attention, softmax_attention
from models.config import ModelConfig
from models.context import SINGLE_DEVICE, LaspContext
from models.mixer_math import alibi_slopes as alibi_slopes
from models.mixer_math import cached_attention, feature_map, lrpe, recurrent_step, rope, srms, tnl_log_decay
from models.tokenwise import map_token_chunks, rms_normalize
from pallas_kernels.common import resolve_scale

Array = jax.Array


class Dtypes(Protocol):
    """What ``Dense`` and ``Norm`` read of a config: a ``ModelConfig`` or a token mixer's spec (``MixerSpec``)."""

    dtype: str
    param_dtype: str
    split_projections: bool  # Dense.project: one product per column block


def dtype_of(name: str):
    return jnp.dtype(name)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """``y = x @ kernel`` with a ``[in, out]`` kernel named by two logical axes; no bias."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, std: float, config: Dtypes, rngs):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), std, dtype_of(config.param_dtype)), logical_axes=axes)
        self.dtype, self.split_projections = dtype_of(config.dtype), config.split_projections

    def __call__(self, x: Array) -> Array:
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))

    def project(self, x: Array, widths: tuple[int, ...], ctx: LaspContext, split: tuple[bool, ...]) -> list[Array]:
        """``self(x)`` cut into column blocks of ``widths``: one product then a split, or (``split_projections``,
        or under a head axis) one product per block, whose backward takes each block's cotangent as it is (one
        product's backward first concatenates them: an activation-sized copy). Under a head axis (tensor
        parallelism) a block is column-parallel where ``split`` says so (Megatron's q, k, v, gate and up
        projections: each device computes its heads' columns, no activation crosses the axis), else replicated;
        the fused kernel is stored split contiguously over the axis, so its blocks move: weights, not activations.
        """
        x, kernel, cuts = x.astype(self.dtype), self.kernel[...].astype(self.dtype), np.cumsum(widths)[:-1]
        if ctx.tensor_parallel == 1 and not self.split_projections:
            return jnp.split(jnp.dot(x, kernel), cuts, axis=-1)
        blocks = list(zip(jnp.split(kernel, cuts, axis=-1), split, strict=True))
        if ctx.tensor_parallel > 1:  # without a head axis the blocks keep the kernel's (FSDP) sharding
            blocks = [(ctx.constrain_columns(block, split=cut), cut) for block, cut in blocks]
        return [ctx.constrain(jnp.dot(x, block), split_dim=-1 if cut else None) for block, cut in blocks]


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


class Norm(nnx.Module):
    """``srms`` (TNL, no parameters), ``rms`` (Llama, gain) or ``layer`` (LayerNorm, gain and bias)."""

    def __init__(self, kind: str, dim: int, *, eps: float, config: Dtypes):
        self.kind, self.eps = kind, eps
        pdt = dtype_of(config.param_dtype)
        if kind in ("rms", "layer"):
            self.scale = nnx.Param(jnp.ones((dim,), pdt), logical_axes=("norm",))
        if kind == "layer":
            self.bias = nnx.Param(jnp.zeros((dim,), pdt), logical_axes=("norm",))

    def __call__(self, x: Array) -> Array:
        """float32 math in x's dtype; the backward keeps no float32 copy of x (``models.tokenwise``)."""
        scale = None if self.kind == "srms" else self.scale[...]
        bias = self.bias[...] if self.kind == "layer" else None
        return rms_normalize(x, scale, bias, eps=self.eps, center=self.kind == "layer")


class Mlp(nnx.Module):
    """Channel mixer: ``glu`` W3((W1 x) ⊙ (W2 x)) (TNL's simple GLU), ``swiglu`` or ``gelu``."""

    def __init__(self, config: ModelConfig, *, rngs):
        d, f = config.d_model, config.hidden_dim
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.n_layers)
        self.kind, self.chunk = config.mlp, config.mlp_chunk
        n_in = 1 if self.kind == "gelu" else 2
        # the two input projections are one matmul: [d, n_in·f]
        self.w_in = Dense(d, n_in * f, ("embed", "mlp"), std=std, config=config, rngs=rngs)
        self.w_out = Dense(f, d, ("mlp", "embed"), std=out_std, config=config, rngs=rngs)

    def __call__(self, x: Array, ctx: LaspContext | None = None) -> Array:
        """Under ``ctx.head_axis`` the hidden units split over it: ``w_in`` column-, ``w_out`` row-parallel.
        With ``chunk`` (``ModelConfig.mlp_chunk``) tokens run in checkpointed chunks (``models.tokenwise``),
        strided when the sequence is sharded."""
        ctx = ctx or SINGLE_DEVICE
        strided = ctx.mesh is not None and ctx.mesh.shape.get(ctx.seq_axis, 1) > 1
        return map_token_chunks(lambda xc: self._apply(xc, ctx), x, self.chunk, strided=strided)

    def _apply(self, x: Array, ctx: LaspContext) -> Array:
        f = self.w_out.kernel.shape[0]
        if self.kind == "gelu":
            h = jax.nn.gelu(self.w_in.project(x, (f,), ctx, (True,))[0])
        else:
            a, b = self.w_in.project(x, (f, f), ctx, (True, True))
            h = (jax.nn.silu(a) if self.kind == "swiglu" else a) * b
        return self.w_out(h)


@dataclass(frozen=True, kw_only=True)
class MixerSpec:
    """What every token mixer's arguments share: initialisation, norm epsilon and dtypes."""

    norm_eps: float = 1e-6
    init_std: float = 0.02
    out_std: float = 0.02  # the output projection's (models: init_std / sqrt(2 · n_layers))
    dtype: str = "float32"
    param_dtype: str = "float32"
    split_projections: bool = False  # the fused input projection as one product per block (Dense.project)

    def check_positive(self, *names: str) -> None:
        for name in names:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {name}={getattr(self, name)!r}")


@dataclass(frozen=True)
class AttentionSpec(MixerSpec):
    """The constructor arguments of a token mixer (static, not weights), checked once.

    ``output_norm``: ``"srms_gate"`` (TNL: SRMSNorm(o) ⊙ u with a gate projection u), ``"denominator"``
    (linear attention's causal normaliser), ``"head_rms"`` (per-head RMSNorm) or ``"none"``.
    ``g_gamma``: a constant per-head log decay (lightning attention) or None.
    """

    d_model: int
    n_heads: int
    head_dim: int
    n_kv_heads: int
    feature_map: str = "identity"
    g_gamma: tuple[float, ...] | None = None
    position: str = "none"
    rope_theta: float = 500_000.0
    lrpe_base: float = 10_000.0
    output_norm: str = "none"
    scale: float | None = None

    def __post_init__(self):
        self.check_positive("d_model", "n_heads", "head_dim", "n_kv_heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads must be a multiple of n_kv_heads: {self.n_heads=}, {self.n_kv_heads=}")
        for name, allowed in (
            ("feature_map", ("silu", "elu1", "identity")),
            ("position", ("none", "lrpe", "rope")),
            ("output_norm", ("srms_gate", "denominator", "head_rms", "none")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {name}={getattr(self, name)!r}")
        if self.position != "none" and self.head_dim % 2:
            raise ValueError(f"position={self.position!r} needs an even head_dim, got head_dim={self.head_dim}")
        if self.output_norm == "srms_gate" and self.n_kv_heads != self.n_heads:
            raise ValueError("output_norm='srms_gate' (TNL) needs n_kv_heads == n_heads")
        if self.g_gamma is not None and len(self.g_gamma) != self.n_heads:
            raise ValueError(f"g_gamma needs one log decay per head: len(g_gamma)={len(self.g_gamma)}, {self.n_heads=}")


def attention_spec(config: ModelConfig, *, linear: bool, layer: int) -> AttentionSpec:
    """The token-mixer arguments a ``ModelConfig`` implies for ``layer`` (softmax layers: ``linear=False``)."""
    c = config
    decay = linear and c.decay == "tnl"
    return AttentionSpec(
        d_model=c.d_model,
        n_heads=c.n_heads,
        head_dim=c.head_dim,
        n_kv_heads=c.kv_heads,
        feature_map=c.feature_map if linear else "identity",
        g_gamma=tuple(float(x) for x in tnl_log_decay(c.n_heads, layer, c.n_layers)) if decay else None,
        position=c.position,
        rope_theta=c.rope_theta,
        lrpe_base=c.lrpe_base,
        # softmax normalises by itself: no causal-normaliser column and no per-head RMS norm
        output_norm=c.attn_output_norm if linear or c.attn_output_norm == "srms_gate" else "none",
        **c.mixer_options(),
    )


def default_head_dim(d_model: int, n_heads: int, head_dim: int | None, *, layer: str) -> int:
    """``head_dim``, or ``d_model // n_heads`` when None; an error where that would drop channels."""
    if head_dim is not None:
        return head_dim
    if n_heads <= 0:
        raise ValueError(f"{layer}: n_heads must be positive, got {n_heads=}")
    if d_model % n_heads:
        raise ValueError(f"{layer}: d_model={d_model} is not a multiple of n_heads={n_heads}: pass head_dim")
    return d_model // n_heads


def _spec(d_model, n_heads, *, head_dim, n_kv_heads, layer: str, **kwargs) -> AttentionSpec:
    head_dim = default_head_dim(d_model, n_heads, head_dim, layer=layer)
    return AttentionSpec(d_model, n_heads, head_dim, n_heads if n_kv_heads is None else n_kv_heads, **kwargs)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LinearCache:
    """Decoding cache of a linear-attention layer: the float32 state ``[B, H, D', E']`` and the
    number of tokens it has seen (the position of the next one)."""

    state: Array
    length: Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Decoding cache of a softmax-attention layer: keys ``[B, S, Hk, D']`` and values ``[B, S, Hk, E]``
    of a fixed capacity S, of which the first ``length`` positions are filled."""

    k: Array
    v: Array
    length: Array


class ProjectedAttention(nnx.Module):
    """What both token mixers share: the fused input projection of q, k, v (and the gate u with
    ``srms_gate``), its split into heads, the positions, and the gated output projection.

    ``LinearAttention`` and ``SoftmaxAttention`` differ in what runs between the two projections
    (and in their decoding state), so each adds its own ``__call__``, ``step`` and state shapes.
    """

    recurrent = True  # a linear-attention (recurrent) mixer; softmax attention is not

    def __init__(self, spec: AttentionSpec, *, rngs):
        self.spec = s = spec
        h, hk, dh = s.n_heads, s.n_kv_heads, s.head_dim
        self.widths = (h * dh, hk * dh, hk * dh) + ((h * dh,) if s.output_norm == "srms_gate" else ())
        self.in_proj = Dense(s.d_model, sum(self.widths), ("embed", "qkv"), std=s.init_std, config=s, rngs=rngs)
        self.out_proj = Dense(h * dh, s.d_model, ("qkv", "embed"), std=s.out_std, config=s, rngs=rngs)

    @classmethod
    def from_config(cls, config: ModelConfig, layer: int, *, rngs):
        """The token mixer of ``layer`` of a language model with ``config``."""
        spec = dataclasses.asdict(attention_spec(config, linear=cls.recurrent, layer=layer))
        if not cls.recurrent:
            del spec["feature_map"], spec["g_gamma"]
        return cls(**spec, rngs=rngs)

    def _split_qkv(self, x: Array, ctx: LaspContext):
        """q ``[B, T, H, dh]``, k, v ``[B, T, Hk, dh]`` and the gate u (or None) from the fused projection
        (column-parallel over ``ctx.head_axis``: every part is split by heads)."""
        s = self.spec
        b, t = x.shape[:2]
        parts = self.in_proj.project(x, self.widths, ctx, (True,) * len(self.widths))
        q = ctx.constrain(parts[0].reshape(b, t, s.n_heads, s.head_dim), split_dim=2)
        k = ctx.constrain(parts[1].reshape(b, t, s.n_kv_heads, s.head_dim), split_dim=2)
        v = ctx.constrain(parts[2].reshape(b, t, s.n_kv_heads, s.head_dim), split_dim=2)
        return q, k, v, (parts[3] if len(parts) == 4 else None)

    def _positional(self, q: Array, k: Array, positions: Array):
        """q and k with the positions (LRPE or RoPE at global ``positions``; else as they are)."""
        s = self.spec
        if s.position == "lrpe":
            return lrpe(q, positions, s.lrpe_base), lrpe(k, positions, s.lrpe_base)
        if s.position == "rope":
            return rope(q, positions, s.rope_theta), rope(k, positions, s.rope_theta)
        return q, k

    def _output(self, o: Array, u: Array | None) -> Array:
        """Heads ``[B, T, H, dh]`` → ``[B, T, d_model]``: merged, gated (``srms_gate``: SRMSNorm(o) ⊙ u), W_o
        (row-parallel over a head axis: the partitioner reduces the partial sums)."""
        s = self.spec
        b, t = o.shape[:2]
        o = o.reshape(b, t, s.n_heads * s.head_dim).astype(dtype_of(s.dtype))
        if s.output_norm == "srms_gate":
            o = srms(o, s.norm_eps) * u
        return self.out_proj(o)

    @property
    def key_dim(self) -> int:
        """D' of q and k after positions: LRPE doubles the head dim."""
        return 2 * self.spec.head_dim if self.spec.position == "lrpe" else self.spec.head_dim


def _check_cache_room(size: int, length, tokens: int) -> Array:
    """Whether ``tokens`` written after ``length`` overflow a cache of ``size`` positions: a ValueError when
    that is known at trace time; under ``jit`` (a traced length) the overflowing call's outputs are
    NaN rather than silently wrong (``dynamic_update_slice`` would clamp the write over earlier keys)."""
    if not isinstance(length, jax.core.Tracer) and int(length) + tokens > size:
        raise ValueError(f"the cache holds {size} positions: {int(length)} filled + {tokens} new tokens overflow it")
    return length + tokens > size


def _cache_positions(x: Array, positions: Array | None, cache) -> Array:
    """Global positions of x's tokens: given, else ``[0, T)`` after the cache's tokens."""
    if positions is not None:
        return positions
    start = 0 if cache is None else cache.length
    return start + jnp.arange(x.shape[1])


class LinearAttention(ProjectedAttention):
    """Causal linear-attention token mixer (lightning attention with ``g_gamma``); the three
    linear-attention families of ``models.config`` are choices of its arguments.

    ``__call__`` runs a whole sequence through ``lasp_jax.lasp_attention``; ``step`` decodes one token
    from the float32 recurrent state ``[B, H, D', E']`` (``D' = 2·head_dim`` with LRPE, ``E' =
    head_dim + 1`` with the causal normaliser, whose denominator rides in v's extra ones column).
    ``scale`` defaults to 1 with ``srms_gate`` or ``denominator`` outputs, else ``head_dim^-0.5``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        head_dim: int | None = None,
        n_kv_heads: int | None = None,
        feature_map: str = "silu",
        g_gamma: tuple[float, ...] | None = None,
        position: str = "none",
        rope_theta: float = 500_000.0,
        lrpe_base: float = 10_000.0,
        output_norm: str = "head_rms",
        scale: float | None = None,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        out_std: float = 0.02,
        dtype: str = "float32",
        param_dtype: str = "float32",
        split_projections: bool = False,
        rngs: nnx.Rngs,
    ):
        g_gamma = None if g_gamma is None else tuple(float(x) for x in g_gamma)
        # the arguments above, checked once (AttentionSpec), are the layer's static description
        spec = _spec(
            layer=type(self).__name__, **{k: v for k, v in locals().items() if k not in ("self", "rngs", "__class__")}
        )
        super().__init__(spec, rngs=rngs)
        if spec.output_norm == "head_rms":
            self.head_norm = Norm("rms", spec.head_dim, eps=spec.norm_eps, config=spec)
        # a constant (static tuple), not a Param: neither trained nor checkpointed
        self.log_decay = spec.g_gamma
        default = 1.0 if spec.output_norm in ("srms_gate", "denominator") else spec.head_dim**-0.5
        self.scale = default if scale is None else resolve_scale(scale, spec.head_dim)  # step() runs no op check

    def _project(self, x: Array, positions: Array, ctx: LaspContext):
        """q, k, v ``[B, T, ·, ·]`` ready for the recurrence, and the gate u (or None)."""
        s = self.spec
        q, k, v, u = self._split_qkv(x, ctx)
        q, k = self._positional(feature_map(s.feature_map, q), feature_map(s.feature_map, k), positions)
        if s.output_norm == "denominator":
            v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        return q, k, v, u

    def _finish(self, o: Array, u: Array | None) -> Array:
        """o ``[B, T, H, E']`` → the block output ``[B, T, d_model]``."""
        s = self.spec
        if s.output_norm == "denominator":
            of = o.astype(jnp.float32)
            o = (of[..., :-1] / (of[..., -1:] + 1e-6)).astype(o.dtype)
        elif s.output_norm == "head_rms":
            o = self.head_norm(o)
        return self._output(o, u)

    def _g_gamma(self):
        return None if self.log_decay is None else jnp.asarray(self.log_decay, jnp.float32)

    def __call__(
        self,
        x: Array,
        ctx: LaspContext | None = None,
        positions: Array | None = None,
        *,
        segment_ids: Array | None = None,
        cache: LinearCache | None = None,
        initial_state: Array | None = None,
        return_state: bool = False,
    ) -> tuple[Array, LinearCache | Array | None]:
        """x ``[B, T, d_model]`` → ``(y, cache)``.

        ``ctx``: the mesh and strategies (None: one device). ``positions``: global token indices
        (default: ``[0, T)`` after the cache's tokens). ``segment_ids`` ``[B, T]`` (packed documents):
        the state resets wherever the id changes. ``cache`` (``init_cache``): continue from it and
        return the cache after x (else None). The language model's form: ``initial_state`` (the
        float32 state) and ``return_state`` (return the final state instead of a cache).
        """
        ctx = ctx or SINGLE_DEVICE
        ctx.check_tokens(x, self.spec.d_model, layer=type(self).__name__)
        if cache is not None:
            initial_state, return_state = cache.state, True
        q, k, v, u = self._project(x, _cache_positions(x, positions, cache), ctx)
        o, state = lasp_attention(
            q,
            k,
            v,
            g_gamma=self._g_gamma(),
            scale=self.scale,
            initial_state=initial_state,
            output_final_state=return_state,
            segment_ids=segment_ids,
            **ctx.op_options(),
        )
        y = self._finish(o, u)
        return y, (state if cache is None else LinearCache(state, cache.length + x.shape[1]))

    def step(self, x: Array, state: Array, position: Array) -> tuple[Array, Array]:
        """One token: x ``[B, d_model]``, state ``[B, H, D', E']``, position scalar or ``[B]``."""
        pos = jnp.broadcast_to(jnp.asarray(position), x.shape[:1])[:, None]  # [B, 1]
        q, k, v, u = self._project(x[:, None], pos, SINGLE_DEVICE)
        o, state = recurrent_step(q[:, 0], k[:, 0], v[:, 0], state, log_decay=self._g_gamma(), scale=self.scale)
        return self._finish(o[:, None].astype(q.dtype), u)[:, 0], state

    def state_shape(self, batch: int) -> tuple[int, int, int, int]:
        """Shape of the recurrent state ``[B, H, D', E']``."""
        s = self.spec
        e = s.head_dim + 1 if s.output_norm == "denominator" else s.head_dim
        return (batch, s.n_heads, self.key_dim, e)

    def init_cache(self, batch: int) -> LinearCache:
        """The cache before the first token: a zero state."""
        return LinearCache(jnp.zeros(self.state_shape(batch), jnp.float32), jnp.zeros((), jnp.int32))


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

    recurrent = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        head_dim: int | None = None,
        n_kv_heads: int | None = None,
        position: str = "rope",
        rope_theta: float = 500_000.0,
        lrpe_base: float = 10_000.0,
        output_norm: str = "none",
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        out_std: float = 0.02,
        dtype: str = "float32",
        param_dtype: str = "float32",
        split_projections: bool = False,
        scale: float | None = None,
        rngs: nnx.Rngs,
    ):
        if output_norm not in ("none", "srms_gate"):
            raise ValueError(f"softmax attention's output_norm is 'none' or 'srms_gate', got {output_norm=}")
        spec = _spec(
            layer=type(self).__name__, **{k: v for k, v in locals().items() if k not in ("self", "rngs", "__class__")}
        )
        super().__init__(spec, rngs=rngs)
        self.scale = resolve_scale(scale, self.key_dim)  # also the cache's and step's (no op checks it there)

    def _project(self, x: Array, positions: Array, ctx: LaspContext):
        q, k, v, u = self._split_qkv(x, ctx)
        return (*self._positional(q, k, positions), v, u)

    def __call__(
        self,
        x: Array,
        ctx: LaspContext | None = None,
        positions: Array | None = None,
        *,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        initial_state=None,
        return_state: bool = False,
    ) -> tuple[Array, KVCache | tuple[Array, Array] | None]:
        """x ``[B, T, d_model]`` → ``(y, cache)``; arguments as ``LinearAttention.__call__``.

        With a ``cache`` (``init_cache``) x's keys and values are written after its ``length``
        tokens and the queries attend the cache (a dense masked product: for decoding and short
        continuations, not sequence-parallel). ``return_state`` (the language model's prefill)
        returns x's keys and values ``[B, T, Hk, ·]``.
        """
        ctx = ctx or SINGLE_DEVICE
        ctx.check_tokens(x, self.spec.d_model, layer=type(self).__name__, sharded=cache is None)
        if initial_state is not None:
            raise ValueError(
                "a softmax-attention layer cannot continue from an initial state: run the whole prefix "
                "(prefill) in one call, then decode with step() or a cache"
            )
        q, k, v, u = self._project(x, _cache_positions(x, positions, cache), ctx)
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) are for whole sequences, not with a cache")
            full = _check_cache_room(cache.k.shape[1], cache.length, x.shape[1])
            k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), cache.length, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache.length, axis=1)
            o = cached_attention(q, k_all, v_all, cache.length, scale=self.scale)
            o = jnp.where(full, jnp.nan, o).astype(q.dtype)
            return self._output(o, u), KVCache(k_all, v_all, cache.length + x.shape[1])
        o = softmax_attention(
            q,
            k,
            v,
            mesh=ctx.mesh,
            seq_axis=ctx.seq_axis,
            batch_axis=ctx.batch_axis,
            head_axis=ctx.head_axis,
            strategy=ctx.softmax_strategy,
            scale=self.scale,
            segment_ids=segment_ids,
        )
        return self._output(o, u), ((k, v) if return_state else None)

    def step(self, x: Array, state: tuple[Array, Array], position: Array) -> tuple[Array, tuple[Array, Array]]:
        """One token at scalar ``position`` against the cache ``state = (k, v)`` ``[B, S, Hk, ·]``."""
        k_cache, v_cache = state
        pos = jnp.asarray(position, jnp.int32)
        q, k, v, u = self._project(x[:, None], jnp.broadcast_to(pos, x.shape[:1])[:, None], SINGLE_DEVICE)
        full = _check_cache_room(k_cache.shape[1], pos, 1)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), pos, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), pos, axis=1)
        o = jnp.where(full, jnp.nan, cached_attention(q, k_cache, v_cache, pos, scale=self.scale)).astype(q.dtype)
        return self._output(o, u)[:, 0], (k_cache, v_cache)

    def cache_shapes(self, batch: int, size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the key and value caches for ``size`` positions."""
        s = self.spec
        return (batch, size, s.n_kv_heads, self.key_dim), (batch, size, s.n_kv_heads, s.head_dim)

    def init_cache(self, batch: int, size: int) -> KVCache:
        """An empty cache of ``size`` positions (in the compute dtype)."""
        k, v = (jnp.zeros(shape, dtype_of(self.spec.dtype)) for shape in self.cache_shapes(batch, size))
        return KVCache(k, v, jnp.zeros((), jnp.int32))
