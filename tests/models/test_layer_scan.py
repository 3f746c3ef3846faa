"""Layers under a scan (``ModelConfig.scan_layers``, ``models.layer_scan``) equal the unscanned model.

The scanned model built from a seed holds exactly the unscanned model's weights, stacked; its loss
and every gradient equal the unscanned model's under each remat policy (TNL with its per-layer
decay, a hybrid whose pattern leaves a layer outside the scan, Gated DeltaNet); training under
sequence parallelism equals one device; generation equals the full forward; and the lowered train
step does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layer_scan import layer_period, matrix_mask, stack_layer_params, unstack_layer_params
from models.layers import LaspContext
from models.model import LanguageModel, lm_loss
from models.sharding import build_mesh
from models.train import Trainer
from tests.helpers import rel_err
from tests.models.common import (
    check_generation_equals_full_forward,
    large_weights,
    replace,
    small_hybrid,
    small_model,
    train_config,
)

MODELS = {
    # TNL's decay depends on the layer index: the per-layer constants scan along; LRPE positions
    "tnl": lambda: small_model("tnl", n_layers=3),
    # linear, softmax, linear, softmax, linear: period 2 scanned twice, the last layer after the scan
    "tnl-hybrid": lambda: small_hybrid("tnl", n_layers=5),
    "gdn": lambda: small_model("gdn", n_layers=2),
    # Gated DeltaNet and softmax alternating: period 2 scanned twice
    "gdn-alternating": lambda: small_model("gdn", n_layers=4, layer_types=("linear", "softmax") * 2),
    # 3 Gated DeltaNet : 1 softmax, 6 layers: one scan step of 4 layers, 2 after it
    "gdn-hybrid": lambda: small_model("gdn", n_layers=6).replace(
        layer_types=("linear",) * 3 + ("softmax",) + ("linear",) * 2
    ),
}


def models(name: str, seed: int) -> tuple[LanguageModel, LanguageModel]:
    config = MODELS[name]()
    plain = LanguageModel(config, rngs=nnx.Rngs(seed))
    return plain, LanguageModel(config.replace(scan_layers=True), rngs=nnx.Rngs(seed))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_layer_period():
    assert layer_period(("linear",) * 5) == 1
    assert layer_period(("linear", "softmax") * 2 + ("linear",)) == 2
    assert layer_period(("linear",) * 3 + ("softmax",) + ("linear",) * 2) == 4
    assert layer_period(("softmax", "linear", "linear")) == 3  # no repetition: one step of every layer


@pytest.mark.parametrize("name", ["tnl", "tnl-hybrid", "gdn-hybrid"])
def test_scanned_layout_holds_the_same_weights(name, rng):
    plain, scanned = models(name, int(rng.integers(1 << 30)))
    # the same weights, stacked: stack/unstack convert between the layouts bit for bit
    assert_trees_equal(stack_layer_params(nnx.state(plain), scanned.config), nnx.state(scanned))
    assert_trees_equal(unstack_layer_params(nnx.state(scanned), scanned.config), nnx.state(plain))
    # the unstacked layers are the original blocks (per-layer decays restored)
    assert [nnx.graphdef(b) for b in scanned.layers()] == [nnx.graphdef(b) for b in plain.layers()]
    if name == "tnl":
        decays = [b.attn.log_decay for b in scanned.layers()]
        assert len(set(decays)) == 3, decays

    # weight decay sees the per-layer rank, not the stacked one (norm gains, gate biases stay undecayed)
    def decayed(model):  # leaf path below the layer (blocks/l, tail_blocks/k, layer_scan/stacks/j) → decayed
        flat = nnx.to_flat_state(matrix_mask(nnx.state(model, nnx.Param)))
        below = {"blocks": 2, "tail_blocks": 2, "layer_scan": 3}
        return {path[below.get(path[0], 0) :]: bool(v.get_value()) for path, v in flat}

    assert decayed(scanned) == decayed(plain)
    assert name != "gdn-hybrid" or not all(decayed(plain).values())


# (model, remat policy of the scanned model); each against the unscanned model without remat
CASES = [
    ("tnl", "offload"),
    ("gdn-alternating", "full"),
    ("gdn-hybrid", "dots"),  # make test-slow, as the two below
    ("tnl-hybrid", "dots"),
    ("gdn", "none"),
]


@pytest.mark.parametrize("name,remat", CASES, ids=[f"{n}-{r}" for n, r in CASES])
def test_scanned_loss_and_grads_equal_unscanned(name, remat, rng):
    plain, scanned = models(name, int(rng.integers(1 << 30)))
    plain = large_weights(plain)
    scanned = nnx.merge(nnx.graphdef(scanned), stack_layer_params(nnx.state(plain), scanned.config))
    tokens = jnp.asarray(rng.integers(0, 256, (2, 16)), jnp.int32)
    targets = jnp.asarray(rng.integers(-1, 256, (2, 16)), jnp.int32)

    def loss_and_grads(model, remat):
        graphdef, params = nnx.split(model)
        loss = jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p), tokens, targets, remat=remat)[0])
        return jax.jit(loss)(params)

    want, want_grads = loss_and_grads(plain, "none")
    got, grads = loss_and_grads(scanned, remat)
    grads = unstack_layer_params(grads, scanned.config)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads), strict=True):
        # float32 sums in another order (remat, the scan): a leaf's small entries that are sums with
        # cancellation (e.g. a_log's gradient) differ at ~1e-5 of the leaf's largest entry, so the bound is
        # norm-wise per leaf (an elementwise one failed on one cancelling entry)
        assert rel_err(a, b) < 2e-5, (str(path), rel_err(a, b))


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_offload_policy_saves_block_inputs_on_the_host(scan, rng):
    """``remat="offload"`` puts the saved block inputs in host memory (``MemorySpace.Host`` transfers
    in the traced program). On the CPU backend host and device memory are one, so XLA drops the
    copies: the values are checked above, the memory saving only on a GPU."""
    config = small_model("tnl", n_layers=1, scan_layers=scan)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))
    tokens = jnp.asarray(rng.integers(0, 256, (1, 16)), jnp.int32)

    def traced(remat):
        loss = jax.grad(lambda p: lm_loss(nnx.merge(graphdef, p), tokens, tokens, remat=remat)[0])
        return str(jax.make_jaxpr(loss)(params))

    assert "MemorySpace.Host" in traced("offload")
    assert "MemorySpace.Host" not in traced("dots")


def lowered_size(config, depth: int) -> int:
    """Lines of the lowered (StableHLO) train loss-and-grad of a ``depth``-layer model."""
    model = nnx.eval_shape(lambda: LanguageModel(config.replace(n_layers=depth), rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    loss = jax.grad(lambda p, t: lm_loss(nnx.merge(graphdef, p), t, t, remat="dots")[0])
    return len(jax.jit(loss).lower(params, tokens).as_text().splitlines())


def test_scanned_program_does_not_grow_with_depth():
    """What XLA compiles is one period of layers, whatever the depth (compile times: benchmarks/compile_time.py)."""
    config = small_model("tnl")
    scanned = [lowered_size(config.replace(scan_layers=True), depth) for depth in (2, 8)]
    plain = [lowered_size(config, depth) for depth in (2, 4)]
    assert scanned[0] == scanned[1], scanned
    assert plain[1] > 3 * plain[0] // 2, plain  # the unscanned program grows with every layer


def test_scanned_generation_equals_full_forward(rng):
    """Prefill, recurrent states and key/value caches of a scanned hybrid: generation equals the full forward."""
    _, scanned = models("tnl-hybrid", int(rng.integers(1 << 30)))
    scanned = large_weights(scanned)
    prompt = rng.integers(0, 256, (2, 5))  # sp=2: 4 tokens by the parallel prefill, 1 fed through the recurrence
    ctx = LaspContext(mesh=build_mesh(1, 2, jax.devices()[:2]))
    check_generation_equals_full_forward(scanned, prompt, ctx, new_tokens=4, fed=[3, 4])


def test_scanned_training_under_sp_equals_unscanned_one_device():
    """Linear-Llama3 (RMS gains: weight decay must see per-layer ranks), FSDP dp 2 × sp 2, scanned,
    against the unscanned model on one device: the same loss curve."""
    config = train_config("linear_llama3", steps=STEPS)
    want = losses(config, 1)
    scanned = replace(replace(config, "model", scan_layers=True), "mesh", dp=2, sp=2, fsdp=True)
    got = losses(scanned, 4)
    assert want[-1] < want[0] - 0.3, f"the reference run did not learn: {want}"
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)


STEPS = 6


def losses(config, n_devices):
    result = Trainer(config, devices=jax.devices()[:n_devices], log=lambda *a: None).fit()
    return np.array([result["losses"][s] for s in range(1, config.run.steps + 1)])
