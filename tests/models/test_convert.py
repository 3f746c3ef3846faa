"""lasp-convert: Hugging Face Llama tensors in and out, checked against a numpy LlamaForCausalLM.

The checkpoint is written by the test with Hugging Face's tensor names and ``config.json`` fields;
the reference below is Hugging Face's Llama forward (rotate-half RoPE, grouped-query attention,
SwiGLU, RMSNorm) in numpy, independent of ``models``, so a q/k layout or RoPE convention that
differed from Hugging Face's would show in the logits.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from models.checkpoint import load_model
from models.cli import config_from_args, generate_main
from models.convert import HF_CONFIG_FILE, flat_params, import_hf, main
from models.train import Trainer
from tests.helpers import rel_err, tol

HF = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=10_000.0,
    rope_scaling=None,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def hf_tensors(rng, hf: dict) -> dict[str, np.ndarray]:
    d, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    dh = d // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * dh, hf["num_key_value_heads"] * dh

    def w(*shape, std=0.2):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    out = {"model.embed_tokens.weight": w(v, d, std=1.0), "model.norm.weight": 1 + w(d)}
    if not hf["tie_word_embeddings"]:
        out["lm_head.weight"] = w(v, d)
    for i in range(hf["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        out |= {
            pre + "self_attn.q_proj.weight": w(q, d),
            pre + "self_attn.k_proj.weight": w(kv, d),
            pre + "self_attn.v_proj.weight": w(kv, d),
            pre + "self_attn.o_proj.weight": w(d, q),
            pre + "mlp.gate_proj.weight": w(f, d),
            pre + "mlp.up_proj.weight": w(f, d),
            pre + "mlp.down_proj.weight": w(d, f),
            pre + "input_layernorm.weight": 1 + w(d),
            pre + "post_attention_layernorm.weight": 1 + w(d),
        }
    return out


def write_hf(folder, rng, hf: dict) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(rng, hf)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf))
    return tensors


def llama_logits(t: dict[str, np.ndarray], hf: dict, tokens: np.ndarray) -> np.ndarray:
    """Hugging Face's LlamaForCausalLM forward for one row of tokens, float64 numpy."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    h, hk = hf["num_attention_heads"], hf["num_key_value_heads"]
    dh = hf["hidden_size"] // h
    eps, n = hf["rms_norm_eps"], len(tokens)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

    def rotate_half(x):
        return np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1)

    inv_freq = 1.0 / hf["rope_theta"] ** (np.arange(0, dh, 2) / dh)
    emb = np.concatenate([np.outer(np.arange(n), inv_freq)] * 2, -1)[:, None]  # [T, 1, dh]
    cos, sin = np.cos(emb), np.sin(emb)
    x = t["model.embed_tokens.weight"][tokens]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, t[p + "input_layernorm.weight"])
        q = (a @ t[p + "self_attn.q_proj.weight"].T).reshape(n, h, dh)
        k = (a @ t[p + "self_attn.k_proj.weight"].T).reshape(n, hk, dh)
        v = (a @ t[p + "self_attn.v_proj.weight"].T).reshape(n, hk, dh)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, h // hk, 1), np.repeat(v, h // hk, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh) + np.triu(np.full((n, n), -np.inf), 1)
        pr = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hqk,khd->qhd", pr / pr.sum(-1, keepdims=True), v).reshape(n, h * dh)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        m = rms(x, t[p + "post_attention_layernorm.weight"])
        gate = m @ t[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (m @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    head = t["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else t["lm_head.weight"]
    return rms(x, t["model.norm.weight"]) @ head.T


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_imported_llama_logits_equal_huggingface_llama(tmp_path, rng, tied):
    """All-softmax linear-llama3 from HF tensors = HF's Llama forward (RoPE halves, GQA, SwiGLU, norms)."""
    hf = HF | {"tie_word_embeddings": tied}
    tensors = write_hf(tmp_path / "hf", rng, hf)
    config = import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert config.types == ("softmax", "softmax") and config.tie_embeddings == tied
    model, _, _ = load_model(str(tmp_path / "ckpt"))
    tokens = rng.integers(0, hf["vocab_size"], size=(1, 13))
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32))[0])
    assert rel_err(ours, llama_logits(tensors, hf, tokens[0])) < tol(jnp.float32, 32)
    # the same weights with the interleaved (Meta) RoPE pairing give other logits: the check can fail
    swapped = dict(tensors)
    for i in range(hf["num_hidden_layers"]):
        for name in ("q_proj", "k_proj"):
            w = tensors[f"model.layers.{i}.self_attn.{name}.weight"]
            dh = hf["hidden_size"] // hf["num_attention_heads"]
            heads = w.reshape(-1, dh, w.shape[1])
            swapped[f"model.layers.{i}.self_attn.{name}.weight"] = np.concatenate(
                [heads[:, 0::2], heads[:, 1::2]], 1
            ).reshape(w.shape)
    assert rel_err(ours, llama_logits(swapped, hf, tokens[0])) > 1e-2


def test_import_export_round_trip_hybrid(tmp_path, rng):
    """HF → linear-llama3 hybrid → HF keeps every tensor bit for bit; the export imports back to the same
    parameters (its linear layers' head norms included); the converted checkpoint generates."""
    tensors = write_hf(tmp_path / "hf", rng, HF)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--softmax-every", "2"]) == 0
    assert (tmp_path / "ckpt" / HF_CONFIG_FILE).exists()
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    back = {}
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="numpy") as fh:
        for key in fh.keys():  # noqa: SIM118
            back[key] = fh.get_tensor(key)
    assert set(back) == set(tensors) | {"model.layers.0.self_attn.head_norm.weight"}  # layer 0 is linear
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    np.testing.assert_array_equal(back["model.layers.0.self_attn.head_norm.weight"], np.ones(8, np.float32))
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["lasp_layer_types"] == ["linear", "softmax"] and exported["max_position_embeddings"] == 128
    assert {k: exported[k] for k in HF} == HF | {"rope_scaling": None}

    # a trained-looking head norm survives export → import
    back["model.layers.0.self_attn.head_norm.weight"] = rng.standard_normal(8).astype(np.float32)
    save_file(back, str(tmp_path / "out" / "model.safetensors"))
    config = import_hf(str(tmp_path / "out"), str(tmp_path / "again"))
    assert config.types == ("linear", "softmax")
    first = flat_params(nnx.state(load_model(str(tmp_path / "ckpt"))[0], nnx.Param))
    again = flat_params(nnx.state(load_model(str(tmp_path / "again"))[0], nnx.Param))
    norm = ("blocks", 0, "attn", "head_norm", "scale")
    np.testing.assert_array_equal(again.pop(norm), back["model.layers.0.self_attn.head_norm.weight"])
    first.pop(norm)
    jax.tree.map(np.testing.assert_array_equal, first, again)

    assert generate_main(["--ckpt-dir", str(tmp_path / "ckpt"), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0

    # lasp-train --run.init_from: the converted model and parameters, a fresh optimizer, on a dp 2 x sp 2 mesh
    args = ["--run.init_from", str(tmp_path / "ckpt"), "--sp", "2", "--seq-len", "16", "--data.source", "synthetic"]
    config = config_from_args(args)
    assert config.model.types == ("linear", "softmax") and config.model.vocab_size == HF["vocab_size"]
    state = Trainer(config, devices=jax.devices()[:4]).init_state()
    assert int(state["step"]) == 0
    jax.tree.map(np.testing.assert_array_equal, flat_params(state["params"]), first | {norm: np.ones(8, np.float32)})


def test_convert_errors(tmp_path, rng, capsys):
    write_hf(tmp_path / "hf", rng, HF | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    assert "rope_scaling" in capsys.readouterr().err
    tensors = write_hf(tmp_path / "hf2", rng, HF)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "hf2" / "model.safetensors"))
    assert main(["import", str(tmp_path / "hf2"), "--out", str(tmp_path / "ckpt2")]) == 2
    assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err


def test_logits_equal_transformers_llama(tmp_path, rng):
    """Optional (needs ``transformers`` and ``torch``, the ``hf`` extra; not in CI): LlamaForCausalLM itself."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf = HF | {"num_hidden_layers": 2}
    llama_config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    model = transformers.LlamaForCausalLM(llama_config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    ours, _, _ = load_model(str(tmp_path / "ckpt"))
    tokens = rng.integers(0, hf["vocab_size"], size=(1, 13))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.float().numpy()
    assert rel_err(np.asarray(ours(jnp.asarray(tokens, jnp.int32))), theirs) < tol(jnp.float32, 32)
