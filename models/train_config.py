"""Frozen configs of a training run, one per concern: mesh, optimizer, run; ``TrainConfig`` bundles them
with the model (``models.config``) and data (``models.dataset``) configs.

``lasp-train`` (``models.cli``) exposes every field as a flag; ``models.checkpoint`` stores the
whole ``TrainConfig`` as JSON beside each checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.config import ModelConfig
from models.dataset import DataConfig


@dataclass(frozen=True)
class MeshConfig:
    dp: int | None = None  # None: every device not used by sp
    sp: int = 1
    tp: int = 1  # tensor parallelism: heads and MLP hidden sharded over a "tp" mesh axis
    fsdp: bool = False  # shard parameters and optimizer state over dp
    strategy: str = "ring"  # lasp_attention strategy (linear layers)
    impl: str = "auto"  # single-device kernel: "auto" | "pallas" | "xla"
    softmax_strategy: str = "allgather"  # softmax layers of hybrid models: "allgather" (LASP-2H) | "ring"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (ndim ≥ 2)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off


@dataclass(frozen=True)
class RunConfig:
    steps: int = 1000
    seed: int = 0
    remat: str = "none"  # "none" | "full" | "dots"
    loss_chunks: int = 1  # >1: the [B, T, V] logits are computed in this many strided chunks
    ckpt_dir: str | None = None
    ckpt_every: int = 0  # 0: only at the end and on SIGTERM
    keep: int = 3
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4  # 0: no evaluation
    metrics: str | None = None  # JSONL file
    progress: bool = True
    peak_tflops: float | None = None  # per device, for MFU; default: looked up from the device kind
    time_limit_s: float | None = None  # stop (and checkpoint) after this much training time
    sample_tokens: int = 0  # print a sample of this many tokens at the end
    sample_prompt: str = "The "


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)


# the sections besides ``model``, by name: what the command line and the JSON file are made of
SECTIONS = {"mesh": MeshConfig, "optim": OptimConfig, "data": DataConfig, "run": RunConfig}
