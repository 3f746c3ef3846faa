"""Generation edge cases a helper's review found (session 26): a prompt prefilled in pieces keeps
its positions, the MLP's token chunks and a width-1 short convolution decode, sampling arguments
are checked, a missing checkpoint step is named, and repeated calls do not compile again."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import generate as gen
from models.checkpoint import read_config
from models.generate import generate
from models.model import LanguageModel
from models.train import Trainer
from tests.models.common import large_weights, small_model, train_config


def _model(family="tnl", **overrides):
    return large_weights(LanguageModel(small_model(family, **overrides), rngs=nnx.Rngs(0)))


def _tokens(rng, b=2, t=11, vocab=256):
    return jnp.asarray(rng.integers(0, vocab, size=(b, t)), jnp.int32)


@pytest.mark.parametrize("family,position", [("tnl", "lrpe"), ("linear_llama3", "rope")])
def test_prefill_in_pieces_keeps_the_positions(family, position, rng):
    """The second piece restarted at position 0: 0.62 / 0.23 relative error in its logits."""
    model = _model(family, position=position)
    tokens = _tokens(rng)
    whole, _ = model.prefill(tokens)
    _, states = model.prefill(tokens[:, :5])
    with pytest.raises(ValueError, match=rf"position='{position}' needs start="):
        model.prefill(tokens[:, 5:], initial_states=states)
    pieces, _ = model.prefill(tokens[:, 5:], initial_states=states, start=5)
    np.testing.assert_allclose(pieces, whole, rtol=2e-5, atol=2e-5 * float(jnp.abs(whole).max()))


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("tnl", dict(mlp_chunk=4)),
        ("gdn", dict(conv_size=1, split_projections=False)),
        ("gdn", dict(conv_size=1, split_projections=True)),
    ],
    ids=["mlp-chunk-below-d-model", "gdn-conv-1-fused", "gdn-conv-1-split"],
)
def test_decoding_equals_the_full_pass(family, overrides, rng):
    """mlp_chunk < d_model cut the decode step's [B, d] as tokens; conv_size=1 divided by zero."""
    model = _model(family, **overrides)
    tokens = _tokens(rng, t=6)
    out, used, _ = generate(model, tokens, max_new_tokens=4, return_logits=True)
    full = model(out[:, :-1])
    np.testing.assert_allclose(used, full[:, 5:], rtol=1e-4, atol=1e-4 * float(jnp.abs(full).max()))


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number >= 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be a finite number >= 0"),
        (dict(top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens and top_k must be integers"),
        (dict(top_k=1.5), TypeError, "max_new_tokens and top_k must be integers"),
    ],
    ids=["nan-temperature", "negative-temperature", "negative-top-k", "float-tokens", "float-top-k"],
)
def test_bad_sampling_arguments_raise(kwargs, err, match, rng):
    kwargs = dict(max_new_tokens=2) | kwargs
    with pytest.raises(err, match=match):
        generate(_model(), _tokens(rng), **kwargs)


def test_top_k_past_the_vocabulary_is_all_of_it_and_empty_batch_raises(rng):
    model, tokens = _model(), _tokens(rng)
    kw = dict(max_new_tokens=3, temperature=1.0, seed=int(rng.integers(1 << 30)))
    np.testing.assert_array_equal(generate(model, tokens, top_k=10**6, **kw), generate(model, tokens, **kw))
    with pytest.raises(ValueError, match=r"B, P >= 1, got shape=\(0, 4\)"):
        generate(model, np.zeros((0, 4), np.int32), max_new_tokens=1)


def test_repeated_calls_do_not_compile_again(rng):
    model, tokens = _model(), _tokens(rng)
    generate(model, tokens, max_new_tokens=2)
    sizes = [f._cache_size() for f in (gen._prefill, gen._feed_jit, gen._decode_jit)]
    generate(model, tokens + 1, max_new_tokens=2)
    assert [f._cache_size() for f in (gen._prefill, gen._feed_jit, gen._decode_jit)] == sizes


def test_missing_checkpoint_step_is_named(tmp_path):
    config = train_config(steps=1, model=small_model(n_layers=1), run=dict(ckpt_dir=str(tmp_path / "ck")))
    Trainer(config, devices=jax.devices()[:1], log=lambda *a: None).fit()
    with pytest.raises(ValueError, match=r"no step 7 in ckpt_dir=.*ck'; its steps: \[1\]"):
        read_config(str(tmp_path / "ck"), step=7)
