"""ZeRO-1 (``MeshConfig.shard_optimizer_over_data``): AdamW's moments and update split over dp × sp.

Training with the flag equals training without it on the same mesh (the same math; only the
order of the gradient sums may differ), the moments are split over the data-like axes while the
parameters stay whole, the compiled step gathers the updated parameters (and holds half the
optimizer state per device), a checkpoint restores exactly into either layout, and parameter
shapes that do not divide keep their parameter's layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from models import checkpoint
from models.cli import config_from_args
from models.sharding import build_mesh, optimizer_spec
from models.train import Trainer
from tests.helpers import tol
from tests.models.common import replace, small_model, train_config

STEPS = 3
# sp4 is in conftest's SLOW set (the same property on another mesh, without accumulation)
CASES = {
    "dp2xsp2-accum2": dict(dp=2, sp=2, data=dict(grad_accum=2)),
    "sp4": dict(dp=1, sp=4),
}


def compiled_run(config, n_devices: int):
    """(trainer, compiled step, final state, losses) of ``STEPS`` steps through one compiled step."""
    trainer = Trainer(config, devices=jax.devices()[:n_devices], log=lambda *a: None)
    state = trainer.init_state()
    step = trainer.train_step.lower(state, *trainer.data.batch("train", 0, trainer.batch_sharding)).compile()
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, *trainer.data.batch("train", i, trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    return trainer, step, state, np.array(losses)


def local_bytes(tree) -> int:
    """Bytes one device holds of the arrays of ``tree``."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_zero1_training_equals_replicated_optimizer(case, tmp_path):
    kw = CASES[case]
    config = train_config(steps=STEPS, model=small_model(n_layers=1), **kw)
    n = kw["dp"] * kw["sp"]
    plain, plain_step, want, want_losses = compiled_run(config, n)
    zero, zero_step, got, got_losses = compiled_run(replace(config, "mesh", shard_optimizer_over_data=True), n)

    # the same training (float32 model: only the order of the gradient sums may differ)
    atol = tol(jnp.float32)
    assert want_losses[-1] < want_losses[0], want_losses
    np.testing.assert_allclose(got_losses, want_losses, rtol=0, atol=atol)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)

    # moments split over every data-like axis of size > 1, parameters whole: the state per device shrinks n-fold
    split = ("dp", "sp") if kw["dp"] > 1 else "sp"
    moments = [x for x in jax.tree.leaves(got["opt_state"]) if x.ndim == 2]
    assert moments and all(split in x.sharding.spec for x in moments), [x.sharding.spec for x in moments]
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(got["params"]))
    saved = local_bytes(want["opt_state"]) - local_bytes(got["opt_state"])
    assert local_bytes(got["opt_state"]) <= local_bytes(want["opt_state"]) / n + 64  # + the replicated step counts
    argument_bytes = [s.memory_analysis().argument_size_in_bytes for s in (plain_step, zero_step)]
    assert argument_bytes[0] - argument_bytes[1] == saved, (argument_bytes, saved)

    # the step gathers the updated parameters; without the flag nothing is gathered
    assert "all-gather" in zero_step.as_text() and "all-gather" not in plain_step.as_text()

    # a checkpoint of the split state restores exactly, into the split layout and into the replicated one
    manager = checkpoint.open_manager(str(tmp_path / "ckpt"), keep=1)
    try:
        zero.save(manager, got)
        restored = {}
        for name, trainer in (("zero", zero), ("plain", plain)):
            restored[name] = trainer.restore(manager)
            leaves = zip(
                jax.tree.leaves(restored[name]), jax.tree.leaves(got), jax.tree.leaves(trainer.state_shardings)
            )
            for a, b, sharding in leaves:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                assert a.sharding.is_equivalent_to(sharding, a.ndim), (name, a.sharding, sharding)
    finally:
        manager.close()
    # and training goes on from it exactly (the step donates its input state: the restored copy first)
    batch = zero.data.batch("train", STEPS, zero.batch_sharding)
    after_restore, _ = zero_step(restored["zero"], *batch)
    after_live, _ = zero_step(got, *batch)
    for a, b in zip(jax.tree.leaves(after_restore), jax.tree.leaves(after_live), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optimizer_spec_picks_a_divisible_dimension_or_keeps_the_parameters_layout():
    mesh = build_mesh(2, 2, jax.devices()[:8], tp=2)
    data = ("dp", "sp")
    spec = lambda axes, shape, fsdp=False: optimizer_spec(axes, shape, mesh, fsdp=fsdp)  # noqa: E731
    assert spec(("embed", "mlp"), (64, 128)) == P(data, "tp")  # embed first, tp keeps its dimension
    assert spec(("vocab", "embed"), (100, 64)) == P(None, data)
    assert spec(("vocab", "embed"), (102, 6)) == P(None, None)  # 102 % 4, 6 % 4: no dimension divides, replicated
    assert spec(("embed", "mlp"), (6, 128)) == P(None, "tp")  # the tp dimension is not reused
    assert spec(("norm",), (64,)) == P(data)
    assert spec(("norm",), (6,)) == P(None)
    # under FSDP the moments split FSDP's dimension further, else they keep the FSDP layout
    assert spec(("embed", "mlp"), (64, 128), fsdp=True) == P(data, "tp")
    assert spec(("embed", "qkv"), (6, 8), fsdp=True) == P("dp", "tp")  # 6 divides by dp = 2, not by dp·sp = 4
    # a mesh whose data-like axes have size 1: nothing to split
    single = build_mesh(1, 1, jax.devices()[:2], tp=2)
    assert optimizer_spec(("embed", "mlp"), (64, 128), single, fsdp=False) == P(None, "tp")


def test_flag_and_config():
    config = config_from_args(["--sp", "2", "--shard-optimizer-over-data", "--fsdp", "true"])
    assert config.mesh.shard_optimizer_over_data and config.mesh.fsdp
    assert not config_from_args([]).mesh.shard_optimizer_over_data
    # sp = dp = 1: the flag changes nothing (no data-like axis to split over)
    one = Trainer(replace(train_config(), "mesh", shard_optimizer_over_data=True), devices=jax.devices()[:1])
    assert one.update_shardings is None
    fsdp = replace(train_config(dp=2, sp=2, mesh=dict(fsdp=True)), "mesh", shard_optimizer_over_data=True)
    trainer = Trainer(fsdp, devices=jax.devices()[:4], log=lambda *a: None)
    table = jax.tree.leaves(trainer.state_shardings["params"]["embed"]["table"])[0]
    assert table.spec == P(None, "dp")  # parameters: FSDP over dp; moments: over dp and sp
    moments = [s for s in jax.tree.leaves(trainer.state_shardings["opt_state"]) if len(s.spec) == 2]
    assert moments and all(("dp", "sp") in s.spec for s in moments)
