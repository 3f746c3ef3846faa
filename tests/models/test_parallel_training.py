"""Sequence-parallel training equals single-device training: same data and seed, same loss curve.

Twenty AdamW steps of a small model on the embedded corpus, on a 1-device mesh and on dp×sp
meshes of the 8 fake CPU devices (ring and allgather strategies, FSDP with gradient
accumulation). TNL runs with LRPE, so a shard that used local instead of global positions, a
misordered shard or a wrong state hand-off changes the curve far beyond float32 rounding.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from models.train import Trainer
from tests.models.common import replace, train_config

STEPS = 20
# float32 rounding differs between meshes (reduction order); 20 Adam steps at lr 1e-2 keep it < 1e-5
ATOL = 5e-5


def losses(config, n_devices):
    result = Trainer(config, devices=jax.devices()[:n_devices], log=lambda *a: None).fit()
    return np.array([result["losses"][s] for s in range(1, config.run.steps + 1)])


@functools.cache
def reference(family: str) -> np.ndarray:
    return losses(train_config(family, steps=STEPS), 1)


CASES = {
    "sp2-ring": dict(dp=1, sp=2),
    "sp4-allgather": dict(dp=1, sp=4, mesh=dict(strategy="allgather")),
    "dp2xsp2-fsdp-accum2": dict(dp=2, sp=2, mesh=dict(fsdp=True), data=dict(grad_accum=2)),
    "dp2xsp4": dict(dp=2, sp=4),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("family", ["tnl", "linear_transformer"])
def test_sequence_parallel_loss_curve_equals_single_device(family, case):
    kw = CASES[case]
    config = train_config(family, steps=STEPS, **kw)
    got = losses(config, kw["dp"] * kw["sp"])
    want = reference(family)
    assert want[-1] < want[0] - 0.5, f"the reference run did not learn: {want}"
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{family} {case}")


def test_grouped_query_llama_sequence_parallel():
    config = train_config("linear_llama3", steps=10, dp=2, sp=2)
    got = losses(config, 4)
    want = losses(replace(config, "mesh", dp=1, sp=1), 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
