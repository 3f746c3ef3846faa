"""Generation equals the full forward pass: SP prefill + token-by-token decode vs one causal forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.checkpoint import load_model
from models.cli import generate_main
from models.generate import decode_bytes, generate
from models.layers import LaspContext
from models.model import LanguageModel
from models.sharding import build_mesh
from models.train import Trainer
from tests.models.common import check_generation_equals_full_forward, large_weights, small_model, train_config

VARIANTS = {
    "tnl-lrpe": ("tnl", dict(position="lrpe")),
    "linear_transformer": ("linear_transformer", {}),
    "linear_llama3-gqa": ("linear_llama3", dict(n_heads=4, n_kv_heads=2)),
}


def _model(rng, variant):
    family, kw = VARIANTS[variant]
    model = LanguageModel(small_model(family, **kw), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    return large_weights(model)  # logits that vary enough for a wrong state to show


@pytest.mark.parametrize("sp", [1, 4], ids=["one-device", "sp4-prefill"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generation_equals_full_forward(rng, variant, sp):
    model = _model(rng, variant)
    prompt = rng.integers(0, 256, (2, 11)).astype(np.int32)  # 11 = 8 by the parallel prefill + 3 fed one by one
    ctx = LaspContext(mesh=build_mesh(1, sp, jax.devices()[:sp])) if sp > 1 else LaspContext()
    fed = [7, 8, 9, 10] if sp == 4 else [10]  # prompt positions computed by the recurrence (and the prefill's last)
    check_generation_equals_full_forward(model, prompt, ctx, new_tokens=6, fed=fed)


def test_decode_state_is_constant_size(rng):
    model = _model(rng, "tnl-lrpe")
    states = model.init_states(3)
    shapes = [s.shape for s in states]
    for pos in range(4):
        _, states = model.decode_step(jnp.zeros((3,), jnp.int32), states, jnp.int32(pos))
        assert [s.shape for s in states] == shapes and all(s.dtype == jnp.float32 for s in states)


def test_sampling_is_seeded_and_prompt_is_validated(rng):
    model = _model(rng, "tnl-lrpe")
    prompt = np.array([[1, 2, 3]], np.int32)
    a = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_k=5, seed=1)
    b = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_k=5, seed=1)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="prompt must be integer"):
        generate(model, np.zeros((3,), np.int32), max_new_tokens=1)
    with pytest.raises(ValueError, match="vocab_size=256"):
        generate(model, np.array([[300]]), max_new_tokens=1)
    assert decode_bytes(np.frombuffer("héllo".encode(), np.uint8)) == "héllo"


def test_lasp_generate_on_a_checkpoint(tmp_path, capsys):
    config = train_config(steps=2, model=small_model(n_layers=1), run=dict(ckpt_dir=str(tmp_path)))
    trained = Trainer(config, devices=jax.devices()[:1], log=lambda *a: None).fit()["state"]["params"]
    model, restored_config, _ = load_model(str(tmp_path), sp=2)  # the parameters alone, no optimizer state
    assert restored_config == config
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    args = ["--ckpt-dir", str(tmp_path), "--prompt", "The sea", "--max-new-tokens", "12", "--sp", "2"]
    assert generate_main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("The sea") and len(text.encode()) >= len("The sea")
    assert generate_main(["--ckpt-dir", str(tmp_path / "nothing")]) == 2
