"""``lasp-convert``: Hugging Face Llama checkpoints (``config.json`` + ``*.safetensors``) in and out.

``import`` turns a ``LlamaForCausalLM`` checkpoint into a ``linear-llama3`` model (or one of its
hybrids: ``--softmax-every K`` or ``--layer-types``) saved as a ``lasp-train`` checkpoint at step 0
(the parameters only), the common starting point for linearising a pretrained model; ``lasp-train
--run.init_from DIR`` trains from it and ``lasp-generate --ckpt-dir DIR`` samples from it (the
folder's ``tokenizer.json`` is copied along). ``export`` writes a checkpoint's parameters back with
Hugging Face's names.

Names and layouts (torch ``Linear`` weights are ``[out, in]``, ours ``[in, out]``):

| Hugging Face | ours |
|---|---|
| ``model.embed_tokens.weight [V, d]`` | ``embed.table [V, d]`` |
| ``model.layers.i.input_layernorm.weight`` | ``blocks.i.attn_norm.scale`` |
| ``...self_attn.{q,k,v}_proj.weight`` | ``blocks.i.attn.in_proj.kernel = [qᵀ | kᵀ | vᵀ]`` (columns) |
| ``...self_attn.o_proj.weight`` | ``blocks.i.attn.out_proj.kernel`` (transposed) |
| ``...post_attention_layernorm.weight`` | ``blocks.i.mlp_norm.scale`` |
| ``...mlp.{gate,up}_proj.weight`` | ``blocks.i.mlp.w_in.kernel = [gateᵀ | upᵀ]`` (SwiGLU: silu(gate) ⊙ up) |
| ``...mlp.down_proj.weight`` | ``blocks.i.mlp.w_out.kernel`` (transposed) |
| ``model.norm.weight`` | ``final_norm.scale`` |
| ``lm_head.weight [V, d]`` (untied) | ``head.kernel [d, V]`` |

A linear-attention layer also has a per-head RMS norm of its output (``head_norm.scale``, ones on
import), exported as ``model.layers.i.self_attn.head_norm.weight`` with ``lasp_layer_types`` in
``config.json`` so that an import restores the model; ``LlamaForCausalLM`` ignores both (it would run
such a layer as softmax attention).

RoPE: Hugging Face's Llama applies ``q·cos + rotate_half(q)·sin`` with ``rotate_half(x) = [−x₂, x₁]``
over the two halves of each head and ``inv_freq = θ^(−2j/D)``; ``models.layers.rope`` is the same
rotate-half form with the same frequencies (its ``a`` and ``b`` are HF's halves), so q and k need no
permutation. (Meta's original checkpoints pair interleaved channels; Hugging Face's conversion
already permuted them into halves.) ``rope_scaling`` (Llama 3.1's long-context frequencies) is not
implemented by our RoPE, so such checkpoints are refused rather than imported with other positions.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from models import checkpoint
from models.config import LAYER_TYPES, ModelConfig, get_config, hybrid_layer_types
from models.dataset import TOKENIZER_FILE
from models.model import LanguageModel
from models.train_config import TrainConfig

FAMILY = "linear_llama3"
HF_CONFIG_FILE = "hf_config.json"  # the imported config.json, kept in the checkpoint for the export
WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------- configs


def config_from_hf(hf: dict, *, layer_types: tuple[str, ...] | None = None, param_dtype: str = "float32"):
    """The ``ModelConfig`` of a Hugging Face Llama ``config.json``; ``layer_types`` default: the
    file's ``lasp_layer_types`` (a checkpoint we exported), else every layer softmax (the model itself)."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json: model_type={hf.get('model_type')!r}, expected 'llama'")
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "rope_scaling": hf.get("rope_scaling") is not None,
    }
    bad = {name: hf.get(name) for name, is_bad in unsupported.items() if is_bad}
    if bad:
        raise ValueError(f"config.json: unsupported Llama settings {bad} (our Llama block has none of them)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", d // heads) != d // heads:
        raise ValueError(f"config.json: head_dim={hf['head_dim']} must equal hidden_size / num_attention_heads")
    n_layers = hf["num_hidden_layers"]
    types = layer_types or tuple(hf.get("lasp_layer_types") or ("softmax",) * n_layers)
    return get_config("linear-llama3-tiny").replace(
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads", heads),
        ffn_dim=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", 10_000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layer_types=None if all(t == "linear" for t in types) else tuple(types),
        param_dtype=param_dtype,
    )


def hf_config(config: ModelConfig, base: dict | None = None) -> dict:
    """A Hugging Face Llama ``config.json`` for ``config`` (on top of ``base``, an imported one)."""
    if config.family != FAMILY:
        raise ValueError(f"only the {FAMILY} family has Llama weights, got family={config.family!r}")
    return (base or {}) | {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": config.param_dtype,
        "lasp_layer_types": list(config.types),
    }


def check_llama(config: ModelConfig) -> None:
    """Raise ValueError unless ``config`` is a Llama block (linear-llama3 or its hybrids, per-layer parameters)."""
    if config.family != FAMILY or config.mlp != "swiglu" or config.norm != "rms" or config.position != "rope":
        raise ValueError(
            f"Llama weights need a {FAMILY} model (SwiGLU, RMSNorm, RoPE), got family={config.family!r} "
            f"mlp={config.mlp!r} norm={config.norm!r} position={config.position!r}"
        )
    if getattr(config, "scan_layers", False):
        raise ValueError("convert a model with scan_layers=False (per-layer parameters)")


# ---------------------------------------------------------------- tensors


def _layer(i: int) -> str:
    return f"model.layers.{i}."


def params_from_hf(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[tuple, np.ndarray]:
    """Our flat parameters ``{path: array}`` from Hugging Face tensors (raises ValueError naming a missing one)."""
    check_llama(config)

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return np.asarray(tensors[name], np.float32)

    params = {("embed", "table"): get("model.embed_tokens.weight"), ("final_norm", "scale"): get("model.norm.weight")}
    if not config.tie_embeddings:
        params[("head", "kernel")] = get("lm_head.weight").T
    for i, kind in enumerate(config.types):
        pre, block = _layer(i), ("blocks", i)
        attn = [get(pre + f"self_attn.{p}_proj.weight").T for p in "qkv"]
        params[(*block, "attn", "in_proj", "kernel")] = np.concatenate(attn, axis=1)
        params[(*block, "attn", "out_proj", "kernel")] = get(pre + "self_attn.o_proj.weight").T
        params[(*block, "attn_norm", "scale")] = get(pre + "input_layernorm.weight")
        params[(*block, "mlp_norm", "scale")] = get(pre + "post_attention_layernorm.weight")
        mlp = [get(pre + f"mlp.{p}_proj.weight").T for p in ("gate", "up")]
        params[(*block, "mlp", "w_in", "kernel")] = np.concatenate(mlp, axis=1)
        params[(*block, "mlp", "w_out", "kernel")] = get(pre + "mlp.down_proj.weight").T
        if kind == "linear" and config.attn_output_norm == "head_rms":
            name = pre + "self_attn.head_norm.weight"
            params[(*block, "attn", "head_norm", "scale")] = (
                get(name) if name in tensors else np.ones(config.head_dim, np.float32)
            )
    return params


def hf_from_params(params: dict[tuple, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors from our flat parameters (the inverse of ``params_from_hf``)."""
    check_llama(config)
    q, kv = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    f = config.hidden_dim
    out = {"model.embed_tokens.weight": params[("embed", "table")]}
    out["model.norm.weight"] = params[("final_norm", "scale")]
    if not config.tie_embeddings:
        out["lm_head.weight"] = params[("head", "kernel")].T
    for i in range(config.n_layers):
        pre, block = _layer(i), ("blocks", i)
        w = params[(*block, "attn", "in_proj", "kernel")]
        out[pre + "self_attn.q_proj.weight"] = w[:, :q].T
        out[pre + "self_attn.k_proj.weight"] = w[:, q : q + kv].T
        out[pre + "self_attn.v_proj.weight"] = w[:, q + kv : q + 2 * kv].T
        out[pre + "self_attn.o_proj.weight"] = params[(*block, "attn", "out_proj", "kernel")].T
        out[pre + "input_layernorm.weight"] = params[(*block, "attn_norm", "scale")]
        out[pre + "post_attention_layernorm.weight"] = params[(*block, "mlp_norm", "scale")]
        w = params[(*block, "mlp", "w_in", "kernel")]
        out[pre + "mlp.gate_proj.weight"] = w[:, :f].T
        out[pre + "mlp.up_proj.weight"] = w[:, f:].T
        out[pre + "mlp.down_proj.weight"] = params[(*block, "mlp", "w_out", "kernel")].T
        if (*block, "attn", "head_norm", "scale") in params:
            out[pre + "self_attn.head_norm.weight"] = params[(*block, "attn", "head_norm", "scale")]
    return {name: np.ascontiguousarray(x) for name, x in out.items()}


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of the folder's ``*.safetensors`` files (sharded checkpoints too) as float32 numpy."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder!r}")
    tensors = {}
    for name in files:
        with safe_open(name, framework="flax") as fh:  # jax arrays: bfloat16 included
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = np.asarray(fh.get_tensor(key).astype(jnp.float32))
    return tensors


def params_state(flat: dict[tuple, np.ndarray], config: ModelConfig) -> nnx.State:
    """The model's ``nnx.Param`` state holding ``flat``; raises ValueError on a missing or misshapen parameter."""
    abstract = nnx.state(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))), nnx.Param)
    dtype = jnp.dtype(config.param_dtype)
    filled = []
    for path, variable in nnx.to_flat_state(abstract):
        shape = variable.get_value().shape
        if path not in flat:
            raise ValueError(f"no value for the parameter {'.'.join(map(str, path))}")
        if flat[path].shape != shape:
            raise ValueError(f"parameter {'.'.join(map(str, path))}: shape {flat[path].shape}, the model's {shape}")
        filled.append((path, variable.replace(jnp.asarray(flat[path], dtype))))
    return nnx.from_flat_state(filled)


def flat_params(state: nnx.State) -> dict[tuple, np.ndarray]:
    """``{path: float32 numpy}`` of a parameter state."""
    return {path: np.asarray(v.get_value(), np.float32) for path, v in nnx.to_flat_state(state)}


# ---------------------------------------------------------------- folders


def import_hf(hf_dir: str, out_dir: str, *, layer_types: tuple[str, ...] | None = None, param_dtype="float32"):
    """Convert a Hugging Face Llama folder into a ``lasp-train`` checkpoint (step 0, parameters only)."""
    with open(os.path.join(hf_dir, "config.json")) as fh:
        hf = json.load(fh)
    config = config_from_hf(hf, layer_types=layer_types, param_dtype=param_dtype)
    params = params_state(params_from_hf(read_safetensors(hf_dir), config), config)
    manager = checkpoint.open_manager(out_dir, keep=1)
    try:
        checkpoint.save(manager, 0, {"params": params}, TrainConfig(model=config), wait=True)
    finally:
        manager.close()
    with open(os.path.join(out_dir, HF_CONFIG_FILE), "w") as fh:
        json.dump(hf, fh, indent=2)
    if os.path.exists(os.path.join(hf_dir, TOKENIZER_FILE)):
        shutil.copyfile(os.path.join(hf_dir, TOKENIZER_FILE), os.path.join(out_dir, TOKENIZER_FILE))
    return config


def export_hf(ckpt_dir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None) -> ModelConfig:
    """Write a checkpoint's parameters as a Hugging Face Llama folder (``config.json``, ``model.safetensors``)."""
    model, train_config, _ = checkpoint.load_model(ckpt_dir, step=step)
    config = train_config.model
    tensors = hf_from_params(flat_params(nnx.state(model, nnx.Param)), config)
    base = None
    if os.path.exists(os.path.join(ckpt_dir, HF_CONFIG_FILE)):
        with open(os.path.join(ckpt_dir, HF_CONFIG_FILE)) as fh:
            base = json.load(fh)
    hf = hf_config(config, base)
    dtype = jnp.dtype(dtype or config.param_dtype)
    hf["torch_dtype"] = str(dtype)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: jnp.asarray(v, dtype) for k, v in tensors.items()}, os.path.join(out_dir, WEIGHTS_FILE))
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)
    if os.path.exists(os.path.join(ckpt_dir, TOKENIZER_FILE)):
        shutil.copyfile(os.path.join(ckpt_dir, TOKENIZER_FILE), os.path.join(out_dir, TOKENIZER_FILE))
    return config


# ---------------------------------------------------------------- the command


def layer_types_arg(text: str) -> tuple[str, ...]:
    types = tuple(t for t in text.split(",") if t)
    if not types or set(types) - set(LAYER_TYPES):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {LAYER_TYPES}, got {text!r}")
    return types


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lasp-convert", description="Hugging Face Llama checkpoints in and out.", allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF Llama folder -> lasp-train checkpoint", allow_abbrev=False)
    imp.add_argument("hf_dir", help="folder with config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="checkpoint folder to write")
    which = imp.add_mutually_exclusive_group()
    which.add_argument("--softmax-every", type=int, help="every k-th layer softmax, the rest linear attention")
    which.add_argument("--layer-types", type=layer_types_arg, help="per layer: linear or softmax, comma-separated")
    which.add_argument("--all-linear", action="store_true", help="every layer linear attention")
    imp.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"), help="stored dtype")
    exp = sub.add_parser("export", help="lasp-train checkpoint -> HF Llama folder", allow_abbrev=False)
    exp.add_argument("ckpt_dir", help="a lasp-train or lasp-convert checkpoint folder")
    exp.add_argument("--out", required=True, help="folder to write config.json and model.safetensors to")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default: the parameters'")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "import":
            with open(os.path.join(args.hf_dir, "config.json")) as fh:
                n_layers = json.load(fh)["num_hidden_layers"]
            types = args.layer_types
            if args.softmax_every:
                types = hybrid_layer_types(n_layers, args.softmax_every)
            elif args.all_linear:
                types = ("linear",) * n_layers
            config = import_hf(args.hf_dir, args.out, layer_types=types, param_dtype=args.param_dtype)
            print(f"imported {args.hf_dir} -> {args.out}: {config.n_layers} layers {config.types}")
        else:
            config = export_hf(args.ckpt_dir, args.out, step=args.step, dtype=args.dtype)
            if "linear" in config.types:
                print(
                    "note: the linear-attention layers are exported with Llama's names; LlamaForCausalLM runs "
                    "them as softmax attention (lasp-convert import restores them from lasp_layer_types)",
                    file=sys.stderr,
                )
            print(f"exported {args.ckpt_dir} -> {args.out}")
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"lasp-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
