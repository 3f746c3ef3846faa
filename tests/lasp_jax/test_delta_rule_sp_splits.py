"""``benchmarks/delta_rule_sp.sp_splits``: the sweep knob of the sharded delta rule's runs per shard
(``--sp-splits`` there, ``--delta-sp-splits`` in benchmarks/train_step.py) takes effect and undoes itself."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.delta_rule_sp import sp_splits
from pallas_kernels.gated_delta_rule import pallas_triton_split


def _split_count():
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (1, 64, 2, 16), jnp.float32)
    k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    v = jax.random.normal(ks[1], (1, 64, 2, 16), jnp.float32)
    beta = jax.nn.sigmoid(jax.random.normal(ks[2], (1, 64, 2)))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (1, 64, 2)))
    phi, m, call = pallas_triton_split.split_forward(q, k, v, beta, g=g, interpret=True)
    return call.splits, phi, m


def test_sp_splits_sets_the_runs_per_shard_and_restores_the_default():
    default, phi1, m1 = _split_count()
    with sp_splits(2):
        patched, phi2, m2 = _split_count()
    assert (default, patched) == (1, 2)
    assert _split_count()[0] == default
    # the same transition either way (two runs composed by the float32 scan)
    np.testing.assert_allclose(phi2, phi1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m2, m1, rtol=1e-4, atol=1e-5)
    with sp_splits(None):
        assert _split_count()[0] == default


def test_rank_work_benchmark_smoke_run(tmp_path):
    """``benchmarks/delta_rule_rank_work.py`` end to end in interpret mode on a tiny GDN shard (the
    split entry points chained as a rank runs them), so its GPU run does not fail on a typo."""
    import json

    from benchmarks import delta_rule_rank_work

    out = tmp_path / "rank.json"
    assert delta_rule_rank_work.main(["--smoke", "--ops", "gdn", "--runs", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["what"] for r in rows] == [
        "single-device op",
        "shard default",
        "runs 2, block_e 16",
        "M only, block_e 16",
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["ms"] > 0
