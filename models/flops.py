"""Model FLOPs per token, the peak FLOP/s of a device and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import jax
import numpy as np

from models.config import ModelConfig
from models.gla_layers import GATE_RANK

# dense bf16 peak TFLOP/s per device, matched against a substring of ``device_kind``
PEAK_TFLOPS = {
    "h100": 989.0,
    "h200": 989.0,
    "h800": 989.0,
    "gh200": 989.0,
    "a100": 312.0,
    "l40s": 362.0,
    "b200": 2250.0,
}


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward, no recomputation counted).

    ``6·N`` for the weight matmuls (N counts every matrix, the output head included, not the
    embedding lookup), plus 3× the forward work of each token mixer beyond its weights:

    - linear attention: ``4·H·D'·E'`` for the recurrence (state update ``kᵀv`` and readout
      ``q S``, ``2·D'·E'`` multiply-adds each);
    - softmax attention: ``2·H·(D'+E)·T/2``, logits and weighted values over the T/2 keys a causal
      query sees on average (only these make the cost per token depend on ``seq_len``);
    - the gated delta rule (Gated DeltaNet, KDA): ``6·Hv·D·E`` for the recurrence, per value head
      ``S'ᵀk`` (D·E multiply-adds), the rank-one write ``k ⊗ β(v − S'ᵀk)`` (D·E multiplies and D·E
      adds) and the readout ``Sᵀq`` (D·E multiply-adds), plus ``2·W·C`` for the depthwise short
      convolution over the C = 2·H·D + Hv·E channels of q, k, v. This is the token recurrence
      (what ``step`` computes); the chunked kernels spend more (the intra-chunk C×C products and
      the WY solve), which model FLOPs leave out like remat;
    - gated linear attention (GLA, per-channel gates): ``4·H·D·E`` for the recurrence as linear
      attention. The per-channel term is the gate's rank-R projection, ``R·(d_model + H·D)``
      weights (``gla_weights``, R = 16) counted in N; the per-channel decay of the state,
      ``diag(exp g) S`` (D·E multiplies per head), is elementwise like a scalar decay.

    Decays, gates, norms and other elementwise work are not counted anywhere.
    """
    d, f = config.d_model, config.hidden_dim
    mlp = d * f * (1 if config.mlp == "gelu" else 2) + f * d
    weights = config.n_layers * mlp + d * config.vocab_size
    mixers = 0.0
    for layer_type in config.types:
        if layer_type == "softmax":
            weights += projected_attention_weights(config)
            mixers += softmax_attention_flops(config, seq_len)
        elif config.is_delta_rule:
            weights += delta_rule_weights(config)
            mixers += delta_rule_flops(config)
        elif config.family == "gla":
            weights += gla_weights(config)
            mixers += 4.0 * config.n_heads * config.head_dim * config.head_dim
        else:
            weights += projected_attention_weights(config)
            mixers += linear_attention_flops(config)
    return 6.0 * weights + 3.0 * mixers


def _state_dims(config: ModelConfig) -> tuple[int, int]:
    """D' and E' of linear attention: LRPE doubles D, the causal normaliser adds a column to E."""
    dh = config.head_dim
    d_state = 2 * dh if config.position == "lrpe" else dh
    e_state = dh + 1 if config.attn_output_norm == "denominator" else dh
    return d_state, e_state


def projected_attention_weights(config: ModelConfig) -> int:
    """Weights of ``models.layers.ProjectedAttention``: q, k, v (and TNL's gate u), W_o."""
    d, h, dh, hk = config.d_model, config.n_heads, config.head_dim, config.kv_heads
    return d * (h * dh + 2 * hk * dh + (d if config.attn_output_norm == "srms_gate" else 0)) + h * dh * d


def linear_attention_flops(config: ModelConfig) -> float:
    d_state, e_state = _state_dims(config)
    return 4.0 * config.n_heads * d_state * e_state


def softmax_attention_flops(config: ModelConfig, seq_len: int) -> float:
    d_state = _state_dims(config)[0]  # softmax layers project (and place) q, k like linear ones
    return 2.0 * config.n_heads * (d_state + config.head_dim) * seq_len / 2


def delta_rule_weights(config: ModelConfig) -> int:
    """Matrix weights of ``models.delta_layers``: the fused input projection (q, k, v and the gate
    inputs), KDA's two rank-D up-projections, W_o (the short convolution is counted as a mixer)."""
    d, h, hv, dh = config.d_model, config.n_heads, config.v_heads, config.head_dim
    qkv = 2 * h * dh + hv * dh
    if config.family == "kda":  # decay and output-gate down-projections (rank dh) and β per q/k head
        gates, up = 2 * dh + h, dh * (h * dh) + dh * (hv * dh)
    else:  # output gate z, decay input a and β input b per value head
        gates, up = hv * dh + 2 * hv, 0
    return d * (qkv + gates) + up + hv * dh * d


def delta_rule_flops(config: ModelConfig) -> float:
    """Forward FLOPs per token of one delta-rule mixer beyond its weights (see model_flops_per_token)."""
    h, hv, dh = config.n_heads, config.v_heads, config.head_dim
    conv = 2.0 * config.conv_size * (2 * h * dh + hv * dh)
    return conv + 6.0 * hv * dh * dh


def gla_weights(config: ModelConfig) -> int:
    """Matrix weights of ``models.gla_layers``: the fused input projection (q, k, v, the output gate
    r and the gate's rank-R down projection), the gate's up projection ``R × H·D``, W_o."""
    d, h, hk, dh = config.d_model, config.n_heads, config.kv_heads, config.head_dim
    return d * (2 * h * dh + 2 * hk * dh + GATE_RANK) + GATE_RANK * h * dh + h * dh * d


def peak_flops_per_device(override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, from ``override_tflops`` or the device kind; None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak; None when the peak is unknown."""
    return tokens_per_s_per_device * flops_per_token / peak_flops if peak_flops else None


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
