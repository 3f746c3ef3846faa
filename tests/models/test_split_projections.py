"""``ModelConfig.split_projections``: the fused input projections as one product per column block.

The same parameters (paths and shapes: a checkpoint loads either way) give the same loss and gradients
as the fused product, and the training step's backward no longer concatenates the blocks' activation
cotangents (the lowered HLO of the TNL step, which without the flag has such a concatenate).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers import LaspContext
from models.model import LanguageModel, lm_loss
from models.train import Trainer
from tests.helpers import rel_err
from tests.models.common import small_model, train_config

SEQ_LEN = 40  # no dimension of the small models' weights is 40: an operand with it is an activation
TOKEN_SCAN = LaspContext(impl="reference")  # the token mixers' recurrence as a scan: the fastest to compile
_CONCAT = re.compile(r"stablehlo\.concatenate .*: \(([^)]*)\)")


def tnl_model(**overrides):
    return small_model("tnl", position="none", **overrides)  # TNL-1B's positions (none): no LRPE concatenates


def loss_and_grads(config, params, tokens):
    """The mean next-token loss of ``config``'s model with ``params`` and its gradients in them."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))

    def loss(params):
        return lm_loss(nnx.merge(graphdef, params), tokens[:, :-1], tokens[:, 1:], TOKEN_SCAN)[0]

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("family", ["tnl", "gdn"])
def test_split_projections_same_params_loss_and_grads(rng, family):
    fused = {"split_projections": False}  # the TNL presets split by default
    config = tnl_model(n_layers=1, **fused) if family == "tnl" else small_model("gdn", n_layers=1, **fused)
    split = config.replace(split_projections=True)
    params = nnx.state(LanguageModel(config, rngs=nnx.Rngs(int(rng.integers(2**31)))), nnx.Param)
    split_params = nnx.state(nnx.eval_shape(lambda: LanguageModel(split, rngs=nnx.Rngs(0))), nnx.Param)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), split_params)  # checkpoints load either way

    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, SEQ_LEN + 1)), jnp.int32)
    loss, grads = loss_and_grads(config, params, tokens)
    split_loss, split_grads = loss_and_grads(split, params, tokens)
    assert abs(float(split_loss) - float(loss)) <= 1e-6 * abs(float(loss))
    flat, split_flat = nnx.to_flat_state(grads), nnx.to_flat_state(split_grads)
    assert [path for path, _ in flat] == [path for path, _ in split_flat]
    for (path, g), (_, split_g) in zip(flat, split_flat, strict=True):
        assert float(jnp.abs(g[...]).max()) > 0, path  # every parameter takes part
        assert rel_err(split_g[...], g[...]) <= 5e-6, path  # float32: the gradient sums in another order


def activation_concatenates(config) -> list[str]:
    """The operand types of every concatenate with a token-count dimension in the lowered training step
    (forward, backward and update; abstract state, no compile)."""
    config = train_config(model=config, batch=2, seq_len=SEQ_LEN, steps=1)
    trainer = Trainer(config, devices=jax.devices()[:1], log=lambda *a: None)
    batch = jax.ShapeDtypeStruct((1, 2, SEQ_LEN), jnp.int32)  # (micro-batches, rows, tokens)
    text = trainer.train_step.lower(trainer.abstract_state, batch, batch).as_text()
    operands = [m.group(1) for m in map(_CONCAT.search, text.splitlines()) if m]
    return [types for types in operands if re.search(rf"[<x]{SEQ_LEN}x", types)]


def test_split_projections_leave_no_activation_concatenate():
    fused = activation_concatenates(tnl_model(dtype="bfloat16", split_projections=False))
    # the fused q|k|v|u and gate|up products concatenate their blocks' cotangents in the backward
    assert len(fused) >= 2, fused
    assert activation_concatenates(tnl_model(dtype="bfloat16", split_projections=True)) == []


def test_gated_deltanet_convolves_the_blocks_alone_under_sp(rng):
    """With split projections Gated DeltaNet convolves q, k and v one by one (no q|k|v block): the
    same output and the same state (convolution cache and recurrent state) as the fused layer, under
    sp = 2 with a document boundary inside a shard and an entering state."""
    from models.delta_layers import DeltaRuleState, GatedDeltaNet
    from models.sharding import build_mesh

    def layer(split):
        return GatedDeltaNet(32, 2, head_dim=8, n_v_heads=4, split_projections=split, rngs=nnx.Rngs(0))

    fused, split = layer(False), layer(True)
    params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), nnx.state(fused, nnx.Param))
    nnx.update(fused, params)
    nnx.update(split, params)
    b, t = 2, 16
    x = jnp.asarray(rng.standard_normal((b, t, 32)), jnp.float32)
    segment_ids = jnp.asarray(np.repeat([[0] * 6 + [1] * 10], b, axis=0), jnp.int32)
    entering = DeltaRuleState(
        jnp.asarray(rng.standard_normal((b, 3, fused.conv_channels)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, 4, 8, 8)), jnp.float32),
    )
    ctx = LaspContext(mesh=build_mesh(1, 2, jax.devices()[:2]), strategy="allgather", impl="reference")

    @nnx.jit
    def run(model):
        return model(x, ctx, segment_ids=segment_ids, initial_state=entering, return_state=True)

    want, got = run(fused), run(split)
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(a, w) <= 1e-5
