"""Small train configs shared by the model tests (sizes chosen for CPU compile time)."""

from __future__ import annotations

import dataclasses
import math

from models.config import get_config
from models.dataset import DataConfig
from models.train_config import MeshConfig, OptimConfig, RunConfig, TrainConfig

FAMILIES = {
    # TNL with LRPE: positions must be global under sequence parallelism for the curves to agree
    "tnl": dict(position="lrpe"),
    "linear_transformer": {},
    "linear_llama3": dict(n_kv_heads=1),
    # delta-rule families: two value heads per q/k head (grouped value heads), one KV head in softmax layers
    "gdn": dict(n_v_heads=4, n_kv_heads=1),
    "kda": dict(n_v_heads=4, n_kv_heads=1),
    # GLA: two query heads sharing one key/value head; one layer (the layer is all there is to check)
    "gla": dict(n_kv_heads=1, n_layers=1),
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


def large_weights(model):
    """The model with its matrices ×4: logits vary enough (beyond float32 noise) for a wrong
    state, a leaked document or a misplaced token to show."""
    import jax
    from flax import nnx

    graphdef, params = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, params))


def check_generation_equals_full_forward(model, prompt, ctx, *, new_tokens: int, fed: list[int]):
    """Prefill + token-by-token decode against one causal forward over prompt + generated tokens.

    ``fed``: the prompt positions whose logits come from the recurrence (and the prefill's last).
    """
    import jax.numpy as jnp
    import numpy as np

    from models.generate import generate

    b, p = prompt.shape
    out, new_logits, prompt_logits = generate(model, prompt, max_new_tokens=new_tokens, ctx=ctx, return_logits=True)
    assert out.shape == (b, p + new_tokens)
    np.testing.assert_array_equal(out[:, :p], prompt)
    full = np.asarray(model(jnp.asarray(out)))
    scale = np.abs(full).max()
    assert scale > 1.0
    # each new token was drawn (greedily) from logits equal to the full pass at the previous position
    np.testing.assert_allclose(np.asarray(new_logits), full[:, p - 1 : -1], atol=2e-5 * scale, rtol=0)
    # the token is the argmax of the logits it was drawn from, and a near-max of the full pass's (a top-2
    # near-tie there can flip its argmax within the tolerance above)
    np.testing.assert_array_equal(out[:, p:], np.asarray(new_logits).argmax(-1))
    chosen = np.take_along_axis(full[:, p - 1 : -1], out[:, p:, None], axis=-1)[..., 0]
    assert np.all(chosen >= full[:, p - 1 : -1].max(-1) - 4e-5 * scale)
    np.testing.assert_allclose(np.asarray(prompt_logits)[:, fed], full[:, fed], atol=2e-5 * scale, rtol=0)


def dot_flops(jaxpr) -> int:
    """2 · (output size) · (contracted size) summed over every dot_general, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        assert eqn.primitive.name not in ("scan", "while"), "a loop would need its trip count"
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracting)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += dot_flops(inner)
    return total
