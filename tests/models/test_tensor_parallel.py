"""Tensor parallelism in the trainer: a ``(dp, sp, tp)`` mesh with Megatron-style rules.

Heads and MLP hidden units split over ``tp``: q/k/v/gate/up projections column-parallel, output
and down projections row-parallel, the token mixers' ``shard_map`` manual over ``tp``
(``LaspContext.head_axis``). Training a few AdamW steps under dp × sp × tp on the 8 fake CPU
devices gives the loss curve and the final parameters of one device: in CI a Gated DeltaNet
hybrid (delta rule with its short convolution, softmax attention, SwiGLU); in ``make test-slow``
a TNL hybrid (lightning attention, softmax), TNL alone with LASP-2 and KDA with FSDP over dp. The
compiled step moves no activation across ``tp`` except Megatron's reductions (all-reduces of the
row-parallel partial sums, and of SRMSNorm's sum of squares): no all-gather or all-to-all of
q/k/v; what else crosses tp carries weights (blocks of the fused projections moved into place, and
their gradients back).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import numpy as np
import pytest

from models.train import Trainer, check_config
from tests.lasp_jax.test_head_axis import collectives_across
from tests.models.common import replace, small_hybrid, small_model, train_config

STEPS = 5
ATOL = 5e-5  # float32 reduction order differs between meshes (as the sp tests)
SEQ_LEN = 38  # 19 tokens per sp rank: no weight size is a multiple of 19, so an activation shows in the HLO

MODELS = {
    # layer 0 Gated DeltaNet (2 q/k heads, 4 value heads: one q/k head and its 2 value heads per tp
    # rank; short convolution), layer 1 softmax attention (Llama-3's: RoPE, 2 KV heads)
    "gdn-hybrid": lambda: small_hybrid("gdn", n_kv_heads=2),
    "tnl-hybrid": lambda: small_hybrid("tnl"),  # layer 0 lightning attention with LRPE, layer 1 softmax
    "tnl": lambda: small_model("tnl"),
    "kda": lambda: small_model("kda"),
}
IMPL = {"gdn-hybrid": "reference", "kda": "reference"}  # the delta rule's token scan compiles fastest (as its tests)
# CI runs the first (delta rule, softmax layers, MLP); the others are in conftest's SLOW set
CASES = {
    "gdn-hybrid-dp2xsp2xtp2": ("gdn-hybrid", dict(dp=2, sp=2, mesh=dict(tp=2))),
    "tnl-hybrid-dp1xsp2xtp2": ("tnl-hybrid", dict(dp=1, sp=2, mesh=dict(tp=2, softmax_strategy="ring"))),
    "tnl-dp2xsp2xtp2-allgather": ("tnl", dict(dp=2, sp=2, mesh=dict(tp=2, strategy="allgather"))),
    "kda-dp2xsp2xtp2-fsdp": ("kda", dict(dp=2, sp=2, mesh=dict(tp=2, fsdp=True))),
}


def config_of(name: str, *, dp=1, sp=1, mesh=None):
    mesh = dict(mesh or {}) | ({"impl": IMPL[name]} if name in IMPL else {})
    return train_config(steps=STEPS, model=MODELS[name](), seq_len=SEQ_LEN, dp=dp, sp=sp, mesh=mesh)


def run(config, n_devices: int, *, hlo: bool = False):
    """(losses, final params as numpy, the compiled step's HLO text or None)."""
    trainer = Trainer(config, devices=jax.devices()[:n_devices], log=lambda *a: None)
    text = None
    if hlo:  # the same program fit() runs: compiled once, the jit cache serves the call
        state = trainer.init_state()
        text = trainer.train_step.lower(state, *trainer.data.batch("train", 0, trainer.batch_sharding)).compile()
        text = text.as_text()
    result = trainer.fit()
    losses = np.array([result["losses"][s] for s in range(1, STEPS + 1)])
    params = jax.tree.map(np.asarray, jax.tree.leaves(result["state"]["params"]))
    return losses, params, trainer, text


@functools.cache
def reference(name: str):
    losses, params, _, _ = run(config_of(name), 1)
    return losses, params


def moves_activations(line: str, local_tokens: int) -> bool:
    """A collective whose result has as many elements as a multiple of the local token count
    carries activations (no weight size of the small models is a multiple of 19; flattening cannot hide it)."""
    result = re.search(r"=\s*(.*?)\s*(all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)", line)
    result = result.group(1) if result else line
    shapes = [[int(d) for d in shape.split(",") if d] for shape in re.findall(r"\[([\d,]*)\]", result)]
    return any(shape and math.prod(shape) % local_tokens == 0 for shape in shapes)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tensor_parallel_training_equals_one_device(case):
    name, kw = CASES[case]
    config = config_of(name, **kw)
    n = kw["dp"] * kw["sp"] * kw["mesh"]["tp"]
    check_hlo = not kw["mesh"].get("fsdp")  # FSDP gathers the embedding table's output over its own groups
    got, got_params, trainer, text = run(config, n, hlo=check_hlo)
    want, want_params = reference(name)
    assert want[-1] < want[0] - 0.1, f"the reference run did not learn: {want}"
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=case)
    assert len(got_params) == len(want_params)
    for g, w in zip(got_params, want_params, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=ATOL, err_msg=f"{case}: final parameters")
    # the rules split the heads and the MLP: q/k/v/u columns, W_o and W_down rows over tp
    specs = {str(s.spec) for s in jax.tree.leaves(trainer.state_shardings["params"])}
    assert any("tp" in s for s in specs), specs
    if check_hlo:
        across = collectives_across(text, trainer.mesh, "tp")
        assert any("all-reduce" in line for line in across), "no row-parallel reduction over tp: is tp on?"
        local_tokens = SEQ_LEN // kw["sp"]
        bad = [line for line in across if "all-reduce" not in line and moves_activations(line, local_tokens)]
        assert not bad, "activations gathered or moved across tp:\n" + "\n".join(bad)


def test_moves_activations_reads_the_result_shape():
    """The HLO check can fail: a [1, 20, 32] or flattened activation is seen, a [32, 16] weight block is not."""
    line = "%cp = f32[1,20,32]{2,1,0} collective-permute(f32[1,20,32] %x), source_target_pairs={{0,1}}"
    assert moves_activations(line, 20)
    assert moves_activations("%ag = (f32[2,640]{1,0}, f32[]) all-gather(%q), dimensions={0}", 20)
    assert not moves_activations("%a = (f32[1,2,32]{2,1,0}, f32[1,2,32]{2,1,0}) all-to-all(%x, f32[1,20] %y)", 20)
    assert not moves_activations("%cp = f32[32,16]{1,0} collective-permute(%w), source_target_pairs={{0,1}}", 20)


def test_tensor_parallel_config_errors():
    base = config_of("kda", dp=1, sp=2, mesh=dict(tp=2))
    assert check_config(base, 4) == (1, 2)
    with pytest.raises(ValueError, match="dp \\* sp must equal the number of devices / tp"):
        check_config(base, 8)
    odd = dataclasses.replace(base, model=MODELS["kda"]().replace(n_heads=1, n_v_heads=2))
    with pytest.raises(ValueError, match="n_heads"):
        check_config(odd, 4)
    grouped = replace(config_of("tnl-hybrid", sp=2), "mesh", tp=2)
    grouped = dataclasses.replace(grouped, model=small_hybrid("linear_llama3"))  # n_kv_heads=1
    with pytest.raises(ValueError, match="n_kv_heads"):
        check_config(grouped, 4)
    with pytest.raises(ValueError, match="hidden_dim"):
        check_config(dataclasses.replace(base, model=base.model.replace(ffn_dim=63)), 4)
    with pytest.raises(ValueError, match="ulysses"):
        check_config(replace(base, "mesh", strategy="ulysses", sp=2), 4)
