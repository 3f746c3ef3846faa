"""The command lines: ``lasp-train`` flags → ``TrainConfig``, and ``lasp-generate``.

``lasp-train`` (``models.train.main``, also ``python -m models.train``) takes every config field as
a flag, ``--section.field`` or its short form where unambiguous (``--steps 500 --lr 1e-3 --seq-len
4096 --sp 4 --fsdp true --data.seed 1 --model.d_model 256``), on top of a model preset, the
``--demo`` settings and a ``--config`` JSON file, in that order.

``lasp-generate --ckpt-dir DIR --prompt "..."`` samples from a checkpoint written by ``lasp-train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

from models.checkpoint import load_model
from models.config import ModelConfig, get_config
from models.generate import decode_bytes, generate
from models.layers import LaspContext
from models.profile import ProfileWindow
from models.train_config import SECTIONS, TrainConfig

# ``make demo``: the embedded corpus on a dp 2 x sp 4 mesh, two minutes at most
DEMO = dict(
    data=dict(source="text", path=None, batch_size=16, seq_len=256),
    mesh=dict(dp=2, sp=4),
    optim=dict(lr=3e-3, warmup_steps=20, weight_decay=0.01, min_lr_ratio=0.1),
    run=dict(steps=300, log_every=20, eval_batches=2, sample_tokens=300, time_limit_s=120.0),
)


def initialize_distributed(force: bool = False) -> None:
    """``jax.distributed.initialize`` from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.

    With ``force`` and none of them set, jax's own cluster detection (SLURM, Open MPI, ...) is used.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif force:
        jax.distributed.initialize()


def _parse_value(text: str, annotation: str):
    """A flag's text as the type its field's annotation (a string, e.g. ``"int | None"``) names."""
    if text.lower() in ("none", "null") and "None" in annotation:
        return None
    if "tuple" in annotation:
        return tuple(x for x in text.split(",") if x)
    if "bool" in annotation:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if annotation.startswith("int"):
        return int(text)
    if annotation.startswith("float"):
        return float(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lasp-train",
        description="Train a linear-attention or delta-rule LM (TNL, Linear Transformer, Linear-Llama3, Gated "
        "DeltaNet, KDA, hybrids) with LASP on a dp x sp mesh.",
        epilog="Every config field is a flag, --section.field or its short form where unambiguous: --steps 500 "
        "--lr 1e-3 --seq-len 4096 --sp 4 --fsdp true --data.seed 1 --model.d_model 256. "
        "Model presets: see models.config.PRESETS.",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help="model preset, e.g. tiny, tnl-1b, linear-llama3-0.4b, gdn-1.3b, kda-tiny, gdn-hybrid-0.4b",
    )
    p.add_argument("--demo", action="store_true", help="the make-demo settings: embedded corpus, dp 2 x sp 4")
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() by cluster detection")
    p.add_argument("--config", help="a JSON file of overrides {section: {field: value}}")
    p.add_argument(
        "--softmax-every",
        type=int,
        default=None,
        help="hybrid model: every k-th layer softmax attention (0: all linear); hybrid presets default to 4",
    )
    p.add_argument(
        "--profile-steps",
        default=None,
        metavar="A:B",
        help="trace the steps of 0-based index A <= i < B with jax.profiler and print their device time "
        "by category (matmuls, Pallas kernels, fusions, collectives) and the top kernels",
    )
    p.add_argument("--profile-dir", default="profile", help="where --profile-steps writes its trace")
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            flags = [f"--{section}.{f.name}"]
            if names.count(f.name) == 1:  # short form when unambiguous: --seq-len, --sp, --lr
                flags.insert(0, f"--{f.name.replace('_', '-')}")
            p.add_argument(*flags, dest=f"{section}.{f.name}", default=None, metavar=f.type)
    for f in dataclasses.fields(ModelConfig):
        if f.name != "family":
            p.add_argument(f"--model.{f.name}", dest=f"model.{f.name}", default=None, metavar=f.type)
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """The ``TrainConfig`` of a ``lasp-train`` command line (``argv`` without the program name)."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, dict] = {s: {} for s in ("model", *SECTIONS)}
    if args.demo:
        for section, values in DEMO.items():
            overrides[section].update(values)
    if args.config:
        with open(args.config) as fh:
            for section, values in json.load(fh).items():
                overrides[section].update(values)
    types = {f"{s}.{f.name}": f.type for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    types |= {f"model.{f.name}": f.type for f in dataclasses.fields(ModelConfig)}
    for dest, text in vars(args).items():
        if "." in dest and text is not None:
            section, name = dest.split(".", 1)
            overrides[section][name] = _parse_value(text, str(types[dest]))
    model = get_config(args.preset, softmax_every=args.softmax_every, **overrides["model"])
    sections = {s: cls(**overrides[s]) for s, cls in SECTIONS.items()}
    return TrainConfig(model=model, **sections)


def profile_window_from_args(argv: list[str] | None = None) -> ProfileWindow | None:
    """The ``--profile-steps A:B`` window of a ``lasp-train`` command line (None without the flag)."""
    args = build_parser().parse_args(argv)
    return None if args.profile_steps is None else ProfileWindow.parse(args.profile_steps, args.profile_dir)


def text_prompt(text: str) -> np.ndarray:
    """A byte-level prompt ``[1, len(text.encode())]`` int32."""
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)[None]


def generate_main(argv: list[str] | None = None) -> int:
    """``lasp-generate``: sample from a ``lasp-train`` checkpoint; prints text (byte-level data) or token ids."""
    p = argparse.ArgumentParser(prog="lasp-generate", description="Sample from a lasp-train checkpoint.")
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--prompt", default="The ", help="text prompt (byte-level models)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids (models trained on .bin data)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sp", type=int, default=1, help="devices for the sequence-parallel prefill")
    p.add_argument("--strategy", default="ring")
    args = p.parse_args(argv)
    try:
        model, config, mesh = load_model(args.ckpt_dir, step=args.step, sp=args.sp)
        if args.prompt_ids:
            prompt = np.asarray([[int(x) for x in args.prompt_ids.split(",")]], np.int32)
        else:
            prompt = text_prompt(args.prompt)
        out = generate(
            model,
            prompt,
            max_new_tokens=args.max_new_tokens,
            ctx=LaspContext(mesh=mesh, strategy=args.strategy),
            temperature=args.temperature,
            top_k=args.top_k or None,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"lasp-generate: error: {e}", file=sys.stderr)
        return 2
    if config.data.source == "text":
        print(decode_bytes(out[0]))
    else:
        print(",".join(str(int(t)) for t in np.asarray(out[0])))
    return 0
