"""Frozen configs of a training run, one per concern: mesh, optimizer, run; ``TrainConfig`` bundles them
with the model (``models.config``) and data (``models.dataset``) configs.

``lasp-train`` (``models.cli``) exposes every field as a flag; ``models.checkpoint`` stores the
whole ``TrainConfig`` as JSON beside each checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from models.config import ModelConfig
from models.dataset import DataConfig

# the choices of the command line; the layers check them again (lasp_jax, models.model), so a
# strategy or policy listed here before its implementation lands fails with the layer's message
Strategy = Literal["ring", "allgather", "ulysses", "gather_kv", "scan"]
Impl = Literal["auto", "pallas", "xla", "reference"]
SoftmaxStrategy = Literal["allgather", "ring", "zigzag_ring", "tokenring"]
RematPolicy = Literal["none", "dots", "full", "offload"]
STRATEGIES, IMPLS = get_args(Strategy), get_args(Impl)


@dataclass(frozen=True)
class MeshConfig:
    """The device mesh (dp x sp x tp) and how the token mixers cross it."""

    dp: int | None = None  # data-parallel groups; None: every device not used by sp
    sp: int = 1  # sequence-parallel group size: each row's tokens split over sp devices
    tp: int = 1  # tensor parallelism: heads and MLP hidden sharded over a "tp" mesh axis
    fsdp: bool = False  # shard parameters and optimizer state over dp
    # MaxText's name; Megatron's --use-distributed-optimizer. models.sharding.optimizer_spec: the layout
    shard_optimizer_over_data: bool = False  # ZeRO-1: AdamW state and update split over dp x sp (not tp), params whole
    strategy: Strategy = "ring"  # lasp_attention / lasp_gated_delta_rule strategy (linear layers)
    impl: Impl = "auto"  # single-device kernel: auto (Pallas on a GPU, XLA elsewhere), pallas, xla, reference
    softmax_strategy: SoftmaxStrategy = "allgather"  # softmax layers of hybrids: allgather (LASP-2H) or a ring


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and cosine decay, global-norm clipping."""

    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio at the last step
    warmup_steps: int = 100  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # on matrices only (ndim ≥ 2)
    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.95  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's epsilon
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off

    def __post_init__(self):
        checks = {
            "lr": self.lr > 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "b1": 0 <= self.b1 < 1,
            "b2": 0 <= self.b2 < 1,
            "eps": self.eps > 0,
            "clip_norm": self.clip_norm >= 0,
        }
        wanted = {"lr": "> 0", "min_lr_ratio": "in [0, 1]", "b1": "in [0, 1)", "b2": "in [0, 1)", "eps": "> 0"}
        for name, ok in checks.items():
            value = getattr(self, name)
            if not (ok and math.isfinite(value)):
                raise ValueError(f"optim.{name} must be finite and {wanted.get(name, '>= 0')}, got {name}={value}")


@dataclass(frozen=True)
class RunConfig:
    """Steps, checkpoints, evaluation and reporting of a run."""

    steps: int = 1000  # optimizer steps in all (a resumed run continues to this step)
    seed: int = 0  # parameter initialisation seed
    init_from: str | None = None  # start from this checkpoint's parameters (lasp-convert import), fresh optimizer
    remat: RematPolicy = "none"  # recompute in the backward: none, dots (keep matmul outputs), full, offload
    loss_chunks: int = 1  # >1: the [B, T, V] logits are computed in this many strided chunks
    ckpt_dir: str | None = None  # orbax checkpoints (resumed from when it holds one)
    ckpt_every: int = 0  # 0: only at the end and on SIGTERM
    keep: int = 3  # checkpoints kept
    log_every: int = 10  # steps between reports (progress bar, metrics)
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4  # 0: no evaluation
    metrics: str | None = None  # JSONL file
    tensorboard: str | None = None  # TensorBoard event directory (tensorboardX), beside the JSONL metrics
    progress: bool = True  # the progress bar
    peak_tflops: float | None = None  # per device, for MFU; default: looked up from the device kind
    time_limit_s: float | None = None  # stop (and checkpoint) after this much training time
    sample_tokens: int = 0  # print a sample of this many tokens at the end
    sample_prompt: str = "The "  # prompt of that sample

    def __post_init__(self):
        at_least = {"steps": 1, "keep": 1, "log_every": 1, "loss_chunks": 1}
        at_least |= {"ckpt_every": 0, "eval_every": 0, "eval_batches": 0, "sample_tokens": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"run.{name} must be >= {low}, got {name}={getattr(self, name)}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"run.peak_tflops must be positive (or None), got peak_tflops={self.peak_tflops}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"run.time_limit_s must be positive (or None), got time_limit_s={self.time_limit_s}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs: the model and one config per concern."""

    model: ModelConfig
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)


# the sections besides ``model``, by name: what the command line and the JSON file are made of
SECTIONS = {"mesh": MeshConfig, "optim": OptimConfig, "data": DataConfig, "run": RunConfig}
