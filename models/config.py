"""Frozen model configs and named presets for the three linear-attention families.

One ``ModelConfig`` spells out every architectural choice; a family is a set of defaults for it:

- ``tnl`` — TransNormerLLM (Qin et al. 2023, arXiv 2307.14995): SRMSNorm without gain, simple GLU
  ``W3((W1 x) ⊙ (W2 x))``, NormLinearAttention (silu on q and k, lightning attention with the
  per-head, per-layer decay ``s_{h,l} = slope_h · (1 − l/(L−1) + 1e-5)``, scale 1, SRMSNorm of the
  output times a gate u), optional LRPE.
- ``linear_transformer`` — Katharopoulos et al. 2020: elu+1 feature maps, the causal normaliser
  ``φ(q_t)·Σ φ(k_s)``, no decay; pre-LayerNorm blocks with a GELU MLP.
- ``linear_llama3`` — a Llama-3 block (RMSNorm with gain, SwiGLU, grouped-query heads, RoPE) with
  causal linear attention in place of softmax (silu features, per-head RMS output norm), as the
  LASP-2 paper (arXiv 2502.07563) evaluates.

- ``gdn`` — Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464) in Qwen3-Next's head
  layout: q, k with ``n_heads`` heads, ``n_v_heads`` (≥ n_heads) value heads, a short convolution
  (``conv_size``) and SiLU on q, k, v, scalar gates per value head; RMSNorm, SwiGLU blocks.
- ``kda`` — Kimi Delta Attention (Kimi Linear, 2025): the same with one gate per key channel from a
  low-rank projection (``models.delta_layers``).
- ``gla`` — Gated Linear Attention (Yang et al. 2023, arXiv 2312.06635): linear attention with a log
  decay per key channel, ``logsigmoid(W_up W_down x + b) / 16`` from a rank-16 projection, and the
  output gate ``RMSNorm(o) ⊙ SiLU(W_r x)`` (``models.gla_layers``); RMSNorm, SwiGLU blocks.

Presets: ``<family>-{tiny,0.4b,1b,7b}`` for the three linear-attention families, e.g. ``tnl-1b``
(16 layers, d 2048, 16 heads); ``gdn-{tiny,0.4b,1.3b}``, ``kda-{tiny,0.4b,1.3b}`` and
``gla-{tiny,0.4b,1.3b}``; ``tiny`` alone means ``tnl-tiny``. Family names accept ``-`` or ``_``.

Hybrid presets (LASP-2H): ``tnl-hybrid-<size>`` and ``linear-llama3-hybrid-<size>`` make every k-th
layer a causal softmax-attention layer (layers k−1, 2k−1, ...; k = 4 by default, k = 2 for ``tiny``,
which has only two layers); ``get_config(name, softmax_every=k)`` picks another k for any preset.
``gdn-hybrid-<size>`` is Qwen3-Next's pattern, three Gated DeltaNet layers to one softmax layer
(Llama-3 attention: RoPE, grouped KV heads), ``tiny`` included (4 layers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

FEATURE_MAPS = ("silu", "elu1", "identity")
DECAYS = ("none", "tnl")
POSITIONS = ("none", "lrpe", "rope")
ATTN_OUTPUT_NORMS = ("srms_gate", "denominator", "head_rms")
NORMS = ("srms", "rms", "layer")
MLPS = ("glu", "swiglu", "gelu")
DTYPES = ("float32", "bfloat16", "float16")
LAYER_TYPES = ("linear", "softmax")
LINEAR_ATTENTION_FAMILIES = ("tnl", "linear_transformer", "linear_llama3")
DELTA_RULE_FAMILIES = ("gdn", "kda")  # token mixers: models.delta_layers
GATED_LINEAR_FAMILIES = ("gla",)  # per-channel gated linear attention: models.gla_layers
FAMILIES = LINEAR_ATTENTION_FAMILIES + DELTA_RULE_FAMILIES + GATED_LINEAR_FAMILIES


@dataclass(frozen=True)
class ModelConfig:
    """Every architectural choice of a decoder-only linear-attention language model."""

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # grouped-query heads; None means n_heads
    ffn_dim: int | None = None  # None: 4·d_model (gelu) or 8/3·d_model rounded up to 256 (glu, swiglu)
    feature_map: str = "silu"  # applied to q and k
    decay: str = "tnl"  # "tnl": g_gamma = −slope_h·(1 − l/(L−1) + 1e-5); "none": plain causal linear attention
    position: str = "none"  # "lrpe" (TNL's cos/sin relative encoding), "rope", or none
    rope_theta: float = 500_000.0
    lrpe_base: float = 10_000.0
    attn_output_norm: str = "srms_gate"
    norm: str = "srms"
    mlp: str = "glu"
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype of activations and matmuls (params stay param_dtype)
    param_dtype: str = "float32"
    layer_types: tuple[str, ...] | None = None  # per layer; None: all "linear" (the family's recurrent mixer)
    n_v_heads: int | None = None  # delta-rule families: value heads (a multiple of n_heads); None means n_heads
    conv_size: int = 4  # delta-rule families: width of the causal short convolution on q, k, v
    # run the blocks under a lax.scan over stacked parameters (one step per period of layer_types;
    # models.layer_scan): compile time flat in depth; parameter paths differ, so off by default
    scan_layers: bool = False
    mlp_chunk: int = 0  # >0: the MLP runs over checkpointed chunks of this many tokens (models.tokenwise); 0: whole
    # the fused input projections (q|k|v|gate of the token mixers, the MLP's gate|up) computed as under tensor
    # parallelism, so the backward concatenates no activation cotangents (models.layers.Dense.project)
    split_projections: bool = False  # one matmul per block of each fused input projection; same parameters
    # kda: g = gate_lower_bound · sigmoid(exp(A_log) · (f + dt_bias)) (flash-linear-attention's lower_bound,
    # Kimi Linear's safe gate: log decays in [bound, 0)); None: g = −exp(A_log) · softplus(f + dt_bias).
    # A bound of −5 or weaker keeps KDA's Pallas kernels on their factored diagonal tiles (README)
    gate_lower_bound: float | None = None

    def __post_init__(self):
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {name}={value!r}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            positive(name)
        positive("conv_size")
        for name in ("n_kv_heads", "ffn_dim", "n_v_heads"):
            if getattr(self, name) is not None:
                positive(name)
        for name in ("norm_eps", "init_std", "rope_theta", "lrpe_base"):  # norm_eps <= 0 made the loss NaN
            if not (isinstance(getattr(self, name), int | float) and 0 < getattr(self, name) < float("inf")):
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {name}={getattr(self, name)!r}")
        if not isinstance(self.mlp_chunk, int) or self.mlp_chunk < 0:
            raise ValueError(f"ModelConfig.mlp_chunk must be an int >= 0 (0: off), got mlp_chunk={self.mlp_chunk!r}")
        for name in ("scan_layers", "split_projections"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {name}={getattr(self, name)!r}")
        bound = self.gate_lower_bound
        check_gate_lower_bound(bound, "ModelConfig.gate_lower_bound")
        if bound is not None and self.family != "kda":
            raise ValueError(f"ModelConfig.gate_lower_bound bounds KDA's gates; family={self.family!r} has none")
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got family={self.family!r}")
        for name, allowed in (
            ("feature_map", FEATURE_MAPS),
            ("decay", DECAYS),
            ("position", POSITIONS),
            ("attn_output_norm", ATTN_OUTPUT_NORMS),
            ("norm", NORMS),
            ("mlp", MLPS),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {name}={getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model must be a multiple of n_heads: d_model={self.d_model}, n_heads={self.n_heads} "
                f"(d_model % n_heads = {self.d_model % self.n_heads})"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_heads must be a multiple of n_kv_heads: n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"
            )
        if self.v_heads % self.n_heads:
            raise ValueError(
                f"n_v_heads must be a multiple of n_heads: n_heads={self.n_heads}, n_v_heads={self.n_v_heads}"
            )
        if self.position in ("lrpe", "rope") and self.head_dim % 2:
            raise ValueError(f"position={self.position!r} needs an even head_dim, got head_dim={self.head_dim}")
        if self.attn_output_norm == "srms_gate" and self.kv_heads != self.n_heads:
            raise ValueError("attn_output_norm='srms_gate' (TNL) needs n_kv_heads == n_heads")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(
                    f"layer_types must name one type per layer: len(layer_types)={len(self.layer_types)}, "
                    f"n_layers={self.n_layers}"
                )
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ValueError(f"layer_types may hold only {LAYER_TYPES}, got {unknown}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def v_heads(self) -> int:
        """Value heads of the delta-rule layers (q/k head h serves ``v_heads / n_heads`` of them)."""
        return self.n_heads if self.n_v_heads is None else self.n_v_heads

    @property
    def is_delta_rule(self) -> bool:
        """The family's recurrent layers are delta-rule mixers (Gated DeltaNet, KDA)."""
        return self.family in DELTA_RULE_FAMILIES

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        if self.mlp == "gelu":
            return 4 * self.d_model
        return -(-(8 * self.d_model // 3) // 256) * 256

    @property
    def types(self) -> tuple[str, ...]:
        return self.layer_types or ("linear",) * self.n_layers

    def mixer_options(self) -> dict:
        """What every token mixer's arguments take from the model (``models.layers.MixerSpec``): the
        norm epsilon, the dtypes, the initialisation (W_o's std scaled by depth), the projections' form."""
        return dict(
            norm_eps=self.norm_eps,
            init_std=self.init_std,
            out_std=self.init_std / math.sqrt(2 * self.n_layers),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            split_projections=self.split_projections,
        )

    def replace(self, **changes) -> ModelConfig:
        """A copy with ``changes`` applied (and validated)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        return dataclasses.replace(self, **changes)


def check_gate_lower_bound(bound, name: str = "gate_lower_bound") -> None:
    """KDA's gate bound: None or a finite negative number (above -1e4: -inf times a sigmoid that
    reaches 0 would be NaN)."""
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float) or not -1e4 < bound < 0):
        raise ValueError(f"{name} must be a negative number above -1e4 or None, got {bound!r}")


_FAMILY_DEFAULTS = {
    # split projections: TNL-1B at 32K tokens on an H200, 400.8 → 393.0 ms per step (51.0 → 52.0% MFU)
    "tnl": dict(
        feature_map="silu",
        decay="tnl",
        position="none",
        attn_output_norm="srms_gate",
        norm="srms",
        mlp="glu",
        split_projections=True,
    ),
    "linear_transformer": dict(
        feature_map="elu1", decay="none", position="none", attn_output_norm="denominator", norm="layer", mlp="gelu"
    ),
    "linear_llama3": dict(
        feature_map="silu",
        decay="none",
        position="rope",
        attn_output_norm="head_rms",
        norm="rms",
        mlp="swiglu",
        norm_eps=1e-5,
    ),
}
# the delta-rule layers normalise q and k themselves and gate their own output; position, head
# norm and GQA below serve the softmax layers of hybrids (Llama-3 attention with RoPE)
_DELTA_DEFAULTS = dict(
    feature_map="identity", decay="none", position="rope", attn_output_norm="head_rms", norm="rms", mlp="swiglu"
)
# split projections: gdn-1.3b at 32K tokens on an H200, 682.3 → 659.7 ms per step (38.6 → 39.9% MFU,
# one run each, 2026-11-30): the fused q|k|v|… product's cotangent concatenate (~20 ms) is gone
_FAMILY_DEFAULTS["gdn"] = dict(_DELTA_DEFAULTS, split_projections=True)
_FAMILY_DEFAULTS["kda"] = dict(_DELTA_DEFAULTS, split_projections=True)
_FAMILY_DEFAULTS["gla"] = _DELTA_DEFAULTS  # GLA gates its own output too; q and k as they are

# (d_model, n_layers, n_heads, TNL glu dim); TransNormerLLM's published 385M, 1B and 7B shapes.
_SIZES = {
    "tiny": (128, 2, 4, 384),
    "0.4b": (1024, 24, 8, 2816),
    "1b": (2048, 16, 16, 5632),
    "7b": (4096, 30, 32, 11008),
}
_VOCAB = {"tnl": 64_000, "linear_transformer": 50_304, "linear_llama3": 128_256}


# delta-rule presets: (d_model, n_layers, n_heads, SwiGLU dim, value heads, KV heads of softmax layers).
# Head dim 128 (tiny: 32). Gated DeltaNet has two value heads per q/k head (Qwen3-Next), so its
# mixer holds 8·d² weights (KDA's 4·d² plus the low-rank gates) and gdn-1.3b has fewer layers.
_DELTA_SIZES = {
    "gdn": {
        "tiny": (128, 2, 4, 384, 8, 2),
        "0.4b": (1024, 24, 8, 2816, 16, 2),
        "1.3b": (2048, 18, 16, 5632, 32, 4),
    },
    "kda": {
        "tiny": (128, 2, 4, 384, 4, 2),
        "0.4b": (1024, 24, 8, 2816, 8, 2),
        "1.3b": (2048, 24, 16, 5632, 16, 4),
    },
}
_DELTA_VOCAB = 32_000  # the Llama-2 tokenizer of the Gated DeltaNet and fla baselines
# gla presets: the gdn/kda shapes (head dim 128, tiny 32), no grouped heads. A GLA mixer holds 5·d²
# weights (q, k, v, the output gate, W_o), so gla-1.3b has 22 layers (1.35B parameters).
_GLA_SIZES = {"tiny": (128, 2, 4, 384), "0.4b": (1024, 24, 8, 2816), "1.3b": (2048, 22, 16, 5632)}
# gdn-hybrid layers (3 Gated DeltaNet : 1 softmax): tiny gets 4 layers so the pattern fits
_GDN_HYBRID_LAYERS = {"tiny": 4, "0.4b": 24, "1.3b": 20}


def _delta_preset(family: str, size: str, n_layers: int | None = None) -> ModelConfig:
    d, layers, heads, ffn, v_heads, kv_heads = _DELTA_SIZES[family][size]
    kw = dict(_FAMILY_DEFAULTS[family])
    kw.update(
        family=family,
        vocab_size=256 if size == "tiny" else _DELTA_VOCAB,
        d_model=d,
        n_layers=n_layers or layers,
        n_heads=heads,
        n_v_heads=v_heads,
        n_kv_heads=kv_heads,
        ffn_dim=ffn,
    )
    return ModelConfig(**kw)


def _gla_preset(size: str) -> ModelConfig:
    d, layers, heads, ffn = _GLA_SIZES[size]
    kw = dict(_FAMILY_DEFAULTS["gla"])
    vocab = 256 if size == "tiny" else _DELTA_VOCAB
    kw.update(family="gla", vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, ffn_dim=ffn)
    return ModelConfig(**kw)


def _preset(family: str, size: str) -> ModelConfig:
    d, layers, heads, glu = _SIZES[size]
    tiny = size == "tiny"
    kw = dict(_FAMILY_DEFAULTS[family])
    kw.update(family=family, vocab_size=256 if tiny else _VOCAB[family], d_model=d, n_layers=layers, n_heads=heads)
    if family == "tnl":
        kw["ffn_dim"] = glu
    elif family == "linear_llama3":
        kw["ffn_dim"] = glu
        kw["n_kv_heads"] = max(1, heads // 4) if not tiny else 2
        kw["tie_embeddings"] = size in ("tiny", "0.4b", "1b")
    return ModelConfig(**kw)


def hybrid_layer_types(n_layers: int, softmax_every: int) -> tuple[str, ...]:
    """Layer l is ``"softmax"`` when ``(l + 1) % softmax_every == 0``, else ``"linear"`` (1 in k softmax)."""
    if not isinstance(softmax_every, int) or isinstance(softmax_every, bool) or softmax_every <= 0:
        raise ValueError(f"softmax_every must be a positive int, got softmax_every={softmax_every!r}")
    if softmax_every > n_layers:
        raise ValueError(
            f"softmax_every={softmax_every} exceeds n_layers={n_layers}: the model would have no softmax layer"
        )
    return tuple("softmax" if (layer + 1) % softmax_every == 0 else "linear" for layer in range(n_layers))


HYBRID_FAMILIES = ("tnl", "linear_llama3")
DEFAULT_SOFTMAX_EVERY = 4

PRESETS: dict[str, ModelConfig] = {
    f"{family.replace('_', '-')}-{size}": _preset(family, size)
    for family in LINEAR_ATTENTION_FAMILIES
    for size in _SIZES
}
for _family, _sizes in _DELTA_SIZES.items():
    for _size in _sizes:
        PRESETS[f"{_family}-{_size}"] = _delta_preset(_family, _size)
for _size in _GLA_SIZES:
    PRESETS[f"gla-{_size}"] = _gla_preset(_size)
for _size, _layers in _GDN_HYBRID_LAYERS.items():
    PRESETS[f"gdn-hybrid-{_size}"] = _delta_preset("gdn", _size, _layers).replace(
        layer_types=hybrid_layer_types(_layers, DEFAULT_SOFTMAX_EVERY)
    )
for _family in HYBRID_FAMILIES:
    for _size in _SIZES:
        _base = _preset(_family, _size)
        _every = 2 if _size == "tiny" else DEFAULT_SOFTMAX_EVERY
        PRESETS[f"{_family.replace('_', '-')}-hybrid-{_size}"] = _base.replace(
            layer_types=hybrid_layer_types(_base.n_layers, _every)
        )
PRESETS["tiny"] = PRESETS["tnl-tiny"]


def get_config(name: str, *, softmax_every: int | None = None, **overrides) -> ModelConfig:
    """The preset ``name`` (e.g. ``"tnl-1b"``, ``"tnl-hybrid-1b"``, ``"tiny"``) with ``overrides``.

    ``softmax_every=k`` makes every k-th layer softmax attention (after ``overrides``, so it follows
    an overridden ``n_layers``); ``softmax_every=0`` makes every layer linear again.
    """
    key = name.replace("_", "-").lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    config = PRESETS[key]
    if "n_layers" in overrides and "layer_types" not in overrides and config.layer_types is not None:
        # a hybrid preset keeps its 1-in-k pattern over the new depth
        k = next(i + 1 for i, t in enumerate(config.layer_types) if t == "softmax")
        overrides["layer_types"] = hybrid_layer_types(overrides["n_layers"], min(k, overrides["n_layers"]))
    config = config.replace(**overrides) if overrides else config
    if softmax_every is not None:
        types = None if softmax_every == 0 else hybrid_layer_types(config.n_layers, softmax_every)
        config = config.replace(layer_types=types)
    return config
