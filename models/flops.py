"""Model FLOPs per token, the peak FLOP/s of a device and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import jax
import numpy as np

from models.config import ModelConfig

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
    embedding lookup) plus ``3 · 4·H·D'·E'`` per linear layer for the recurrence (state update
    ``kᵀv`` and readout ``q S``, 2·D'·E' multiply-adds each, ×3 for the backward), and per softmax
    layer ``3 · 2·H·(D'+E)·T/2``: logits and weighted values over the T/2 keys a causal query sees
    on average. Only softmax layers make the cost per token depend on ``seq_len``.
    """
    d, f, h = config.d_model, config.hidden_dim, config.n_heads
    dh, hk = config.head_dim, config.kv_heads
    proj = d * (h * dh + 2 * hk * dh + (d if config.attn_output_norm == "srms_gate" else 0)) + h * dh * d
    mlp = d * f * (1 if config.mlp == "gelu" else 2) + f * d
    head = d * config.vocab_size
    d_state = 2 * dh if config.position == "lrpe" else dh
    e_state = dh + 1 if config.attn_output_norm == "denominator" else dh
    recurrence = 4 * h * d_state * e_state
    n_softmax = config.types.count("softmax")
    attention = 2 * h * (d_state + dh) * seq_len / 2  # softmax layers project like linear ones
    return (
        6.0 * (config.n_layers * (proj + mlp) + head)
        + 3.0 * (config.n_layers - n_softmax) * recurrence
        + 3.0 * n_softmax * attention
    )


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
