"""What crosses devices, read from the compiled HLO of forward+backward (benchmarks/sequence_parallel.py's parser).

LASP's claim: only ``[B, H, D, E]`` float32 states travel (P−1 hops each way for the ring, one
all-gather each way for allgather), whatever the sequence length; the baselines move activations
that grow with it.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lasp_jax import lasp_attention, make_mesh

_PATH = pathlib.Path(__file__).parents[2] / "benchmarks" / "sequence_parallel.py"
_spec = importlib.util.spec_from_file_location("sequence_parallel_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

B, H, D, E = 1, 4, 8, 16
STATE_BYTES = B * H * D * E * 4


def collectives(strategy, *, t, sp=8, decay="g_gamma"):
    mesh = make_mesh(8 // sp, sp)
    tokens = NamedSharding(mesh, P(None, "sp"))
    q = jax.device_put(jnp.ones((B, t, H, D), jnp.float32), tokens)
    v = jax.device_put(jnp.ones((B, t, H, E), jnp.float32), tokens)
    g = jax.device_put(jnp.full((B, t, H), -0.1, jnp.float32), tokens) if decay == "g" else None
    g_gamma = jnp.full((H,), -0.1) if decay == "g_gamma" else None

    def fwd_bwd(q, k, v, g):
        attn = lambda q, k, v: lasp_attention(q, k, v, g=g, g_gamma=g_gamma, mesh=mesh, strategy=strategy, impl="xla")
        o, pullback = jax.vjp(lambda q, k, v: attn(q, k, v)[0], q, k, v)
        return o, pullback(jnp.ones_like(o))

    hlo = jax.jit(fwd_bwd).lower(q, q, v, g).compile().as_text()
    return bench.hlo_collectives(hlo, dict(mesh.shape))


@pytest.mark.parametrize("sp", [8, 4])
def test_ring_sends_p_minus_1_states_each_way(sp):
    got = collectives("ring", t=64, sp=sp)
    assert set(got["by_kind"]) == {"collective-permute"}, got
    permutes = got["by_kind"]["collective-permute"]
    assert permutes["count"] == 2 * (sp - 1)
    assert permutes["operand_bytes"] == 2 * (sp - 1) * STATE_BYTES
    # one source per hop: on average each device sends 2 (P−1) / P states
    assert permutes["sent_bytes_per_device"] == pytest.approx(2 * (sp - 1) * STATE_BYTES / sp)


@pytest.mark.parametrize("decay", ["g_gamma", "g"])
def test_allgather_gathers_one_state_each_way(decay):
    got = collectives("allgather", t=64, decay=decay)
    assert set(got["by_kind"]) == {"all-gather"}, got
    gathers = got["by_kind"]["all-gather"]
    assert gathers["count"] == 2
    # with per-token decay the forward's gather carries log Γ_r beside the state
    extra = B * H * 4 if decay == "g" else 0
    assert gathers["operand_bytes"] == 2 * STATE_BYTES + extra
    assert gathers["sent_bytes_per_device"] == pytest.approx(7 * (2 * STATE_BYTES + extra))


def test_lasp_bytes_do_not_grow_with_length_baselines_do():
    sent = {
        (s, t): collectives(s, t=t)["sent_bytes_per_device"]
        for s in ("ring", "allgather", "gather_kv")
        for t in (64, 128)
    }
    assert sent[("ring", 64)] == sent[("ring", 128)] > 0
    assert sent[("allgather", 64)] == sent[("allgather", 128)] > 0
    assert sent[("gather_kv", 128)] == pytest.approx(2 * sent[("gather_kv", 64)], rel=0.05)


def test_parser_reads_async_gpu_style_collectives():
    hlo = """
  %p = bf16[2,8]{1,0} parameter(0)
  %ags = (bf16[2,8]{1,0}, bf16[4,2,8]{2,1,0}) all-gather-start(bf16[2,8]{1,0} %p), replica_groups=[1,4]<=[4]
  %f = f32[3]{0} fusion(%p), kind=kLoop
  %c = f32[3]{0} custom-call(%f), custom_call_target="__gpu$xla.gpu.triton"
  %agd = bf16[4,2,8]{2,1,0} all-gather-done(%ags)
  %cps = (f32[5]{0}, f32[5]{0}) collective-permute-start(f32[5]{0} %x), source_target_pairs={{0,1},{1,2}}
  %cpd = f32[5]{0} collective-permute-done(%cps)
"""
    got = bench.hlo_collectives(hlo, {"dp": 1, "sp": 4})
    gather = got["by_kind"]["all-gather"]
    assert gather["count"] == 1 and gather["operand_bytes"] == 32 and gather["sent_bytes_per_device"] == 96
    assert gather["instructions_between_start_and_done"] == [2]
    permute = got["by_kind"]["collective-permute"]
    assert permute["operand_bytes"] == 20 and permute["sent_bytes_per_device"] == pytest.approx(2 * 20 / 4)


def test_benchmark_smoke_run(tmp_path):
    """The benchmark script end to end on tiny shapes (so the GPU run does not fail on a typo)."""
    out = tmp_path / "sp.json"
    results = bench.main(["--smoke", "--strategies", "ring,allgather", "--json", str(out)])
    assert out.exists()
    for strategy in ("ring", "allgather"):
        row = results["strategies"][strategy]
        assert "error" not in row, row
        assert row["fwd_bwd_ms"] > 0 and row["no_comm_fwd_bwd_ms"] > 0
        assert row["no_comm_collectives"] == 0
        assert row["collectives"]["count"] > 0 and row["memory_bytes"] > 0
