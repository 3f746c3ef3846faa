"""The command lines: ``lasp-train`` flags → ``TrainConfig``, and ``lasp-generate``.

``lasp-train`` (``models.train.main``, also ``python -m models.train``) takes every config field as
a flag, ``--section.field`` or its short form where unambiguous (``--steps 500 --lr 1e-3 --seq-len
4096 --sp 4 --fsdp true --data.seed 1 --model.d_model 256``), on top of a model preset, the
``--demo`` settings and a ``--config`` JSON file, in that order. With ``--data.source bin
--data.path DIR`` (a ``lasp-tokenize`` directory) the model's vocabulary is ``meta.json``'s unless
``--model.vocab_size`` is given.

The parser is built from the config dataclasses (``typed_parser``): each field's type gives the
conversion (``int``, ``float``, ``bool`` as true/false/1/0/yes/no/on/off or the flag alone, ``X |
None`` also accepting ``none``, comma-separated tuples) and a ``Literal[...]`` its choices; a bad
value is an error naming its flag; prefixes are not abbreviations; the comment after each field is its
``--help`` text. (tyro was tried first: it rejects the lowercase booleans and the comma-separated
``--model.layer_types`` that the README and the tests use, and cannot layer a preset's model
config under the flags.)

``lasp-generate --ckpt-dir DIR --prompt "..."`` samples from a checkpoint written by ``lasp-train``,
encoding and decoding with the checkpoint's ``tokenizer.json`` when it has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import types
import typing

import jax
import numpy as np

from models import config as model_config
from models.checkpoint import load_model, read_config
from models.config import PRESETS, ModelConfig, get_config, hybrid_layer_types
from models.dataset import TOKENIZER_FILE, read_meta, separator_from_flag
from models.generate import decode_bytes, generate
from models.layers import LaspContext
from models.profile import ProfileWindow
from models.train_config import SECTIONS, STRATEGIES, TrainConfig

# ``make demo``: the embedded corpus on a dp 2 x sp 4 mesh, two minutes at most
DEMO = dict(
    data=dict(source="text", path=None, batch_size=16, seq_len=256),
    mesh=dict(dp=2, sp=4),
    optim=dict(lr=3e-3, warmup_steps=20, weight_decay=0.01, min_lr_ratio=0.1),
    run=dict(steps=300, log_every=20, eval_batches=2, sample_tokens=300, time_limit_s=120.0),
)

# ModelConfig's fields are plain ``str``s validated against these tuples (models.config)
MODEL_CHOICES = {
    "family": model_config.FAMILIES,
    "feature_map": model_config.FEATURE_MAPS,
    "decay": model_config.DECAYS,
    "position": model_config.POSITIONS,
    "attn_output_norm": model_config.ATTN_OUTPUT_NORMS,
    "norm": model_config.NORMS,
    "mlp": model_config.MLPS,
    "dtype": model_config.DTYPES,
    "param_dtype": model_config.DTYPES,
    "layer_types": model_config.LAYER_TYPES,
}
# help for the ModelConfig fields that carry no comment in models/config.py
MODEL_HELP = {
    "family": "model family (sets the defaults of the other fields through the preset)",
    "vocab_size": "vocabulary size (bin data from lasp-tokenize: meta.json's unless given)",
    "d_model": "width of the residual stream",
    "n_layers": "number of blocks",
    "n_heads": "query heads (head_dim = d_model / n_heads)",
    "rope_theta": "RoPE base",
    "lrpe_base": "LRPE base",
    "attn_output_norm": "output of linear attention: srms_gate (TNL), denominator (causal normaliser), head_rms",
    "norm": "block norm: srms (no gain), rms, layer",
    "mlp": "channel mixer: glu, swiglu, gelu",
    "norm_eps": "epsilon of the norms",
    "tie_embeddings": "the output head is the embedding table",
    "init_std": "standard deviation of the initial weights",
}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


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


# XLA flags lasp-train sets unless XLA_FLAGS already names them. The latency-hiding scheduler (off by
# default in XLA:GPU) overlaps the gradient all-reduces with the rest of the backward: TNL-1B, 32K
# tokens per GPU on 2×H200, sp=2 411.1 ms with it against 414.7 ms without (notes/sp_overhead.md).
# XLA:CPU accepts and ignores it.
DEFAULT_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def set_default_xla_flags(environ=os.environ) -> str:
    """Add each of ``DEFAULT_XLA_FLAGS`` whose name XLA_FLAGS does not set; returns the new value.
    Takes effect only before jax starts its backend (``lasp-train`` calls it first)."""
    flags = environ.get("XLA_FLAGS", "")
    for flag in DEFAULT_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    environ["XLA_FLAGS"] = flags
    return flags


# ---------------------------------------------------------------- dataclass fields → typed flags


def field_docs(cls) -> dict[str, str]:
    """The comment after each field of a dataclass's source (``name: type = default  # text``)."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if match:
            docs[match.group(1)] = match.group(2).strip()
    return docs


def value_parser(annotation, choices: tuple | None = None):
    """A function text → value of the type ``annotation`` names (raising ``ArgumentTypeError``), and
    a metavar. ``Literal`` types (or ``choices``) take only their values; ``X | None`` also ``none``."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else annotation
    if typing.get_origin(base) is typing.Literal:
        choices = typing.get_args(base)
        base = type(choices[0])
    tuple_of = typing.get_origin(base) is tuple

    def one(text: str):
        if base is bool:
            if text.lower() in TRUE + FALSE:
                return text.lower() in TRUE
            raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")
        try:
            value = base(text) if base in (int, float) else text
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(map(str, choices))})")
        return value

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if tuple_of:
            return tuple(one(x) for x in text.split(",") if x)
        return one(text)

    if choices is not None:
        metavar = "{" + ",".join(map(str, choices)) + "}" + (",..." if tuple_of else "")
    else:
        metavar = "BOOL" if base is bool else ("A,B,..." if tuple_of else getattr(base, "__name__", "VALUE").upper())
    return parse, metavar + ("|none" if optional else "")


def add_dataclass_flags(parser: argparse.ArgumentParser, section: str, cls, *, short: set[str], defaults: str | None):
    """A flag ``--section.field`` (and ``--field-name`` for names in ``short``) per field of ``cls``;
    each parses into ``dest="section.field"`` with no default (given flags only)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls) | (MODEL_HELP if cls is ModelConfig else {})
    group = parser.add_argument_group(f"{section} ({cls.__name__})", (cls.__doc__ or "").strip().split("\n")[0])
    for f in dataclasses.fields(cls):
        parse, metavar = value_parser(hints[f.name], MODEL_CHOICES.get(f.name) if cls is ModelConfig else None)
        flags = [f"--{section}.{f.name}"]
        if f.name in short:
            flags.append(f"--{f.name.replace('_', '-')}")
        default = defaults or f"default: {f.default!r}" if f.default is not dataclasses.MISSING else defaults
        help_text = docs.get(f.name, "") + (f" ({default})" if default else "")
        bare = dict(nargs="?", const=True) if hints[f.name] is bool else {}  # a bool flag alone means true
        group.add_argument(*flags, dest=f"{section}.{f.name}", type=parse, metavar=metavar, help=help_text, **bare)


def preset_name(text: str) -> str:
    if text.replace("_", "-").lower() not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r} (presets: {', '.join(sorted(PRESETS))})")
    return text


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lasp-train",
        usage="lasp-train [--preset NAME] [--demo] [--config FILE] [--section.field VALUE | --field VALUE ...]",
        description="Train a linear-attention or delta-rule LM (TNL, Linear Transformer, Linear-Llama3, Gated "
        "DeltaNet, KDA, hybrids) with LASP on a dp x sp mesh.",
        epilog="Every config field is a flag, --section.field or its short form where unambiguous: --steps 500 "
        "--lr 1e-3 --seq-len 4096 --sp 4 --fsdp true --data.seed 1 --model.d_model 256. Layers, lowest first: "
        "the --preset, --demo, --config, the flags.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--preset",
        default="tiny",
        type=preset_name,
        help="model preset, e.g. tiny, tnl-1b, linear-llama3-0.4b, gdn-1.3b, kda-tiny, gdn-hybrid-0.4b (default: tiny)",
    )
    p.add_argument("--demo", action="store_true", help="the make-demo settings: embedded corpus, dp 2 x sp 4")
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() by cluster detection")
    p.add_argument("--config", metavar="FILE", help="a JSON file of overrides {section: {field: value}}")
    p.add_argument(
        "--softmax-every",
        type=nonnegative_int,
        default=None,
        metavar="K",
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
    short = {n for n in names if names.count(n) == 1}  # short forms when unambiguous: --seq-len, --sp, --lr
    for section, cls in SECTIONS.items():
        add_dataclass_flags(p, section, cls, short=short, defaults=None)
    # model fields are --model.<name> only, but for a performance choice that leaves the parameters as they are
    add_dataclass_flags(p, "model", ModelConfig, short={"split_projections"}, defaults="default: the preset's")
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """The ``TrainConfig`` of a ``lasp-train`` command line (``argv`` without the program name).

    A bad flag or value exits (status 2) with a message naming the flag.
    """
    args = build_parser().parse_args(argv)
    overrides: dict[str, dict] = {s: {} for s in ("model", *SECTIONS)}
    if args.demo:
        for section, values in DEMO.items():
            overrides[section].update(values)
    if args.config:
        for section, values in _json_config(args.config).items():
            overrides[section].update(values)
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, name = dest.split(".", 1)
            overrides[section][name] = separator_from_flag(value) if dest == "data.doc_separator" else value
    data = overrides["data"]
    if data.get("source") == "bin" and data.get("path") and os.path.isdir(data["path"]):
        overrides["model"].setdefault("vocab_size", read_meta(data["path"])["vocab_size"])
    init_from = overrides["run"].get("init_from")
    if init_from:  # the checkpoint's model (lasp-convert import), the model flags on top
        base = read_config(init_from)[0].model
        model = base.replace(**overrides["model"]) if overrides["model"] else base
        if args.softmax_every is not None:
            every = args.softmax_every
            model = model.replace(layer_types=hybrid_layer_types(model.n_layers, every) if every else None)
    else:
        model = get_config(args.preset, softmax_every=args.softmax_every, **overrides["model"])
    sections = {s: cls(**overrides[s]) for s, cls in SECTIONS.items()}
    return TrainConfig(model=model, **sections)


def _json_config(path: str) -> dict[str, dict]:
    """The ``--config`` file's ``{section: {field: value}}``; unknown sections or fields raise naming them."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r}: no such file")
    with open(path) as fh:
        try:
            config = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path!r} is not JSON: {err}") from None
    classes = {"model": ModelConfig, **SECTIONS}
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise ValueError(f"--config {path!r} must hold {{section: {{field: value}}}} objects")
    for section, values in config.items():
        if section not in classes:
            raise ValueError(f"--config {path!r}: unknown section {section!r} (sections: {', '.join(classes)})")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(classes[section])})
        if unknown:
            raise ValueError(f"--config {path!r}: unknown {section} fields {unknown}")
        hints = typing.get_type_hints(classes[section])
        choices = MODEL_CHOICES if section == "model" else {}
        for name, value in values.items():
            values[name] = _json_value(value, hints[name], choices.get(name), f"--config {path!r}: {section}.{name}")
    return config


def _json_value(value, annotation, choices, where: str):
    """A ``--config`` value of the field's type: strings are parsed as the flag would parse them
    ("false" is False, not a true string), ints stand for floats; any other mismatch raises."""
    parse, _ = value_parser(annotation, choices)
    if isinstance(value, str):
        try:
            return parse(value)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"{where}: {err}") from None
    if value is None or isinstance(value, list):
        return tuple(value) if isinstance(value, list) else value
    expected = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
    kinds = {typing.get_origin(a) or a for a in expected}
    ok = (isinstance(value, bool) and bool in kinds) or (
        not isinstance(value, bool) and (type(value) in kinds or (type(value) is int and float in kinds))
    )
    if not ok and not (typing.Literal in kinds and value in typing.get_args(expected[0])):
        raise ValueError(f"{where} must be {' or '.join(getattr(k, '__name__', str(k)) for k in kinds)}, got {value!r}")
    return float(value) if type(value) is int and float in kinds and int not in kinds else value


def profile_window_from_args(argv: list[str] | None = None) -> ProfileWindow | None:
    """The ``--profile-steps A:B`` window of a ``lasp-train`` command line (None without the flag)."""
    args = build_parser().parse_args(argv)
    return None if args.profile_steps is None else ProfileWindow.parse(args.profile_steps, args.profile_dir)


# ---------------------------------------------------------------- lasp-generate


def text_prompt(text: str, tokenizer=None) -> np.ndarray:
    """A prompt ``[1, P]`` int32: the tokenizer's ids, or the UTF-8 bytes without one."""
    if tokenizer is not None:
        return np.asarray([tokenizer.encode(text, add_special_tokens=False).ids], np.int32)
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)[None]


def decode_text(tokens, tokenizer=None) -> str:
    """Token ids as text: the tokenizer's decoding, or bytes (ids ≥ 256 dropped) without one."""
    if tokenizer is not None:
        return tokenizer.decode([int(t) for t in np.asarray(tokens).reshape(-1)], skip_special_tokens=False)
    return decode_bytes(tokens)


def folder_tokenizer(folder: str | None):
    """The ``tokenizer.json`` in a folder (lasp-tokenize output, a lasp-train checkpoint), or None."""
    if not folder or not os.path.exists(os.path.join(folder, TOKENIZER_FILE)):
        return None
    from models.tokenizer import load_tokenizer  # the tokenizers package, only when there is one

    return load_tokenizer(folder)


def build_generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lasp-generate", description="Sample from a lasp-train checkpoint.", allow_abbrev=False
    )
    p.add_argument("--ckpt-dir", required=True, help="a lasp-train (or lasp-convert import) checkpoint directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--prompt", default="The ", help="text prompt (byte-level or the checkpoint's tokenizer)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the checkpoint's, if any)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--sp", type=int, default=1, help="devices for the sequence-parallel prefill")
    p.add_argument("--strategy", default="ring", choices=STRATEGIES, help="lasp_attention strategy of the prefill")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    """``lasp-generate``: sample from a checkpoint; prints text (its tokenizer, or bytes) or token ids."""
    args = build_generate_parser().parse_args(argv)
    try:
        model, config, mesh = load_model(args.ckpt_dir, step=args.step, sp=args.sp)
        tokenizer = folder_tokenizer(args.ckpt_dir)
        if args.tokenizer is not None:
            from models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        if args.prompt_ids:
            prompt = np.asarray([[int(x) for x in args.prompt_ids.split(",")]], np.int32)
        elif tokenizer is not None or config.data.source == "text":
            prompt = text_prompt(args.prompt, tokenizer)
        else:
            raise ValueError("this checkpoint has no tokenizer.json and was not trained on text: pass --prompt-ids")
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
    if tokenizer is not None or config.data.source == "text":
        print(decode_text(out[0], tokenizer))
    else:
        print(",".join(str(int(t)) for t in np.asarray(out[0])))
    return 0
