"""Gated Linear Attention (GLA; Yang, Wang, Shen, Panda, Kim 2023, arXiv 2312.06635), Flax NNX.

One layer, as flash-linear-attention's ``GatedLinearAttention`` (fla-org/flash-linear-attention
``fla/layers/gla.py``) with its defaults (no feature map, no short convolution, key dim = value dim):

1. one fused input projection of x: q ``[H·D]``, k, v ``[Hk·D]`` (grouped heads: query head h reads
   key/value head ``h // (H / Hk)``), the output gate r ``[H·D]`` and the gate's rank-``R`` down
   projection (``R = 16``);
2. a log decay per query head and key channel, ``g = logsigmoid(W_up W_down x + b) / 16`` (the
   paper's low-rank gate and its logit normaliser; ``g ∈ (−∞, 0)``, ``exp g ≈ 0.96`` at init);
3. ``lasp_jax.lasp_attention(q, k, v, g=g)`` (sequence-parallel under a mesh with the context's
   strategy, the single-device op otherwise): ``S_t = diag(exp g_t) S_{t−1} + k_tᵀ v_t``,
   ``o_t = D^-½ q_t S_t`` (notes/design.md §6, per-channel gates);
4. per head ``RMSNorm(o) ⊙ SiLU(r)`` (one gain vector of size D shared by the heads), then W_o.

Decoding (``step``) advances the float32 state ``[B, H, D, D]`` one token with the recurrence
written out in jnp. The layer is standalone (``models.standalone``): ``GatedLinearAttention(d_model,
n_heads, n_kv_heads=..., rngs=...)``, ``__call__(x, ctx=None, *, segment_ids=None, cache=None) ->
(y, cache)`` with a ``LinearCache``; ``from_config`` builds a language model's layer (family
``gla``). Under ``ctx.head_axis`` (tensor parallelism) q, k, v, r and the gate's up projection
are column-parallel, the rank-R down projection is replicated and W_o is row-parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from lasp_jax import lasp_attention
from models.config import ModelConfig
from models.layers import SINGLE_DEVICE, Dense, LaspContext, LinearCache, MixerSpec, default_head_dim, dtype_of
from models.mixer_math import srms

Array = jax.Array

GATE_RANK = 16  # the GLA paper's low-rank gate projection
GATE_NORMALIZER = 16.0  # its logit normaliser: g = logsigmoid(·) / 16


@dataclass(frozen=True)
class GLASpec(MixerSpec):
    """A GLA layer's constructor arguments (static, not weights), checked once."""

    d_model: int
    n_heads: int
    head_dim: int
    n_kv_heads: int
    gate_rank: int = GATE_RANK
    gate_normalizer: float = GATE_NORMALIZER

    def __post_init__(self):
        self.check_positive("d_model", "n_heads", "head_dim", "n_kv_heads", "gate_rank")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads must be a multiple of n_kv_heads: {self.n_heads=}, {self.n_kv_heads=}")
        if not self.gate_normalizer > 0:
            raise ValueError(f"gate_normalizer must be positive, got gate_normalizer={self.gate_normalizer!r}")


def gla_step(q: Array, k: Array, v: Array, g: Array, state: Array, *, scale: float) -> tuple[Array, Array]:
    """One token of GLA: ``S = diag(exp g) S + kᵀv``, ``o = scale · q S`` (notes/design.md §6).

    q ``[B, H, D]``, k ``[B, Hk, D]``, v ``[B, Hk, E]``, g ``[B, H, D]`` (log decay per key channel),
    state float32 ``[B, H, D, E]``. Returns (o ``[B, H, E]`` float32, the new state).
    """
    group = q.shape[1] // k.shape[1]
    k, v = (jnp.repeat(x.astype(jnp.float32), group, axis=1) for x in (k, v))
    state = jnp.exp(g.astype(jnp.float32))[..., None] * state + jnp.einsum("bhd,bhe->bhde", k, v)
    return scale * jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32), state), state


class GatedLinearAttention(nnx.Module):
    """The GLA token mixer (see the module): per-channel decays from a low-rank gate, output gate."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        head_dim: int | None = None,
        n_kv_heads: int | None = None,
        gate_rank: int = GATE_RANK,
        gate_normalizer: float = GATE_NORMALIZER,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        out_std: float = 0.02,
        dtype: str = "float32",
        param_dtype: str = "float32",
        split_projections: bool = False,
        rngs: nnx.Rngs,
    ):
        head_dim = default_head_dim(d_model, n_heads, head_dim, layer=type(self).__name__)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.spec = s = GLASpec(
            d_model,
            n_heads,
            head_dim,
            n_kv_heads,
            gate_rank,
            float(gate_normalizer),
            norm_eps=norm_eps,
            init_std=init_std,
            out_std=out_std,
            dtype=dtype,
            param_dtype=param_dtype,
            split_projections=split_projections,
        )
        self.query_width, self.kv_width = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        # q, k, v, the output gate r, the gate's down projection
        self.widths = (self.query_width, self.kv_width, self.kv_width, self.query_width, s.gate_rank)
        self.in_proj = Dense(s.d_model, sum(self.widths), ("embed", "qkv"), std=s.init_std, config=s, rngs=rngs)
        self.gate_up = Dense(s.gate_rank, self.query_width, ("lowrank", "qkv"), std=s.init_std, config=s, rngs=rngs)
        pdt = dtype_of(s.param_dtype)
        self.gate_bias = nnx.Param(jnp.zeros((self.query_width,), pdt), logical_axes=("qkv",))
        self.norm_scale = nnx.Param(jnp.ones((s.head_dim,), pdt), logical_axes=("norm",))
        self.out_proj = Dense(self.query_width, s.d_model, ("qkv", "embed"), std=s.out_std, config=s, rngs=rngs)
        self.scale = s.head_dim**-0.5

    @classmethod
    def from_config(cls, config: ModelConfig, layer: int, *, rngs):
        """The token mixer of ``layer`` of a language model with ``config`` (no per-layer constants)."""
        del layer
        c = config
        return cls(c.d_model, c.n_heads, head_dim=c.head_dim, n_kv_heads=c.kv_heads, **c.mixer_options(), rngs=rngs)

    def _project(self, x: Array, ctx: LaspContext):
        """q ``[..., H, D]``, k, v ``[..., Hk, D]``, the float32 log decay g ``[..., H, D]`` and r ``[..., H·D]``."""
        s = self.spec
        lead = x.shape[:-1]
        q, k, v, r, down = self.in_proj.project(x, self.widths, ctx, (True, True, True, True, False))
        up = self.gate_up.project(down, (self.query_width,), ctx, (True,))[0]
        g = jax.nn.log_sigmoid(up.astype(jnp.float32) + self.gate_bias[...]) / s.gate_normalizer
        q, g = (z.reshape(*lead, s.n_heads, s.head_dim) for z in (q, g))
        k, v = (z.reshape(*lead, s.n_kv_heads, s.head_dim) for z in (k, v))
        q, k, v, g = (ctx.constrain(z, split_dim=-2) for z in (q, k, v, g))
        return q, k, v, g, r

    def _output(self, o: Array, r: Array) -> Array:
        """o ``[..., H, D]``: per-head RMSNorm times gain, times SiLU(r), merged heads, W_o (row-parallel)."""
        s = self.spec
        of = srms(o.astype(jnp.float32), s.norm_eps) * self.norm_scale[...]
        of = of * jax.nn.silu(r.astype(jnp.float32)).reshape(of.shape)
        return self.out_proj(of.reshape(*o.shape[:-2], self.query_width).astype(dtype_of(s.dtype)))

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

        ``ctx``: the mesh and strategies (None: one device). ``positions`` are unused (the decays
        order the tokens). ``segment_ids`` ``[B, T]`` (packed documents): the state resets wherever
        the id changes. ``cache`` (``init_cache``): continue from it and return the cache after x
        (else None). The language model's form: ``initial_state`` (the float32 state ``[B, H, D, D]``)
        and ``return_state`` (return the final state instead of a cache).
        """
        del positions
        ctx = ctx or SINGLE_DEVICE
        ctx.check_tokens(x, self.spec.d_model, layer=type(self).__name__)
        if cache is not None:
            initial_state, return_state = cache.state, True
        q, k, v, g, r = self._project(x, ctx)
        o, state = lasp_attention(
            q,
            k,
            v,
            g=g,
            scale=self.scale,
            initial_state=initial_state,
            output_final_state=return_state,
            segment_ids=segment_ids,
            **ctx.op_options(),
        )
        y = self._output(o, r)
        return y, (state if cache is None else LinearCache(state, cache.length + x.shape[1]))

    def step(self, x: Array, state: Array, position: Array) -> tuple[Array, Array]:
        """One token: x ``[B, d_model]``, state float32 ``[B, H, D, D]`` → (output ``[B, d_model]``, new state)."""
        del position
        q, k, v, g, r = self._project(x, SINGLE_DEVICE)
        o, state = gla_step(q, k, v, g, state, scale=self.scale)
        return self._output(o.astype(q.dtype), r), state

    def state_shape(self, batch: int) -> tuple[int, int, int, int]:
        """Shape of the recurrent state ``[B, H, D, D]``."""
        s = self.spec
        return (batch, s.n_heads, s.head_dim, s.head_dim)

    def init_cache(self, batch: int) -> LinearCache:
        """The cache before the first token: a zero state."""
        return LinearCache(jnp.zeros(self.state_shape(batch), jnp.float32), jnp.zeros((), jnp.int32))


GLA_MIXERS = {"gla": GatedLinearAttention}
