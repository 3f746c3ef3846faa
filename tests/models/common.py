"""Small train configs shared by the model tests (sizes chosen for CPU compile time)."""

from __future__ import annotations

import dataclasses

from models.config import get_config
from models.dataset import DataConfig
from models.train import MeshConfig, OptimConfig, RunConfig, TrainConfig

FAMILIES = {
    # TNL with LRPE: positions must be global under sequence parallelism for the curves to agree
    "tnl": dict(position="lrpe"),
    "linear_transformer": {},
    "linear_llama3": dict(n_kv_heads=1),
}


def small_model(family: str = "tnl", **overrides):
    kw = dict(d_model=32, n_layers=2, n_heads=2, ffn_dim=64) | FAMILIES[family] | overrides
    return get_config(f"{family}-tiny", **kw)


def small_hybrid(family: str = "tnl", **overrides):
    """The small model of ``family`` with its second (last) layer softmax attention."""
    kw = dict(d_model=32, n_layers=2, n_heads=2, ffn_dim=64) | FAMILIES[family] | overrides
    return get_config(f"{family}-hybrid-tiny", **kw)


def train_config(
    family: str = "tnl", *, dp=1, sp=1, steps=20, batch=4, seq_len=32, model=None, mesh=None, data=None, run=None
) -> TrainConfig:
    return TrainConfig(
        model=model or small_model(family),
        mesh=MeshConfig(dp=dp, sp=sp, **(mesh or {})),
        optim=OptimConfig(lr=1e-2, warmup_steps=3, weight_decay=0.01),
        data=DataConfig(**(dict(source="text", batch_size=batch, seq_len=seq_len) | (data or {}))),
        run=RunConfig(**(dict(steps=steps, log_every=10, eval_batches=0, progress=False) | (run or {}))),
    )


def replace(config: TrainConfig, section: str, **changes) -> TrainConfig:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})
