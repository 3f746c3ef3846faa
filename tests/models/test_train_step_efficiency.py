"""What makes the training step fast: the head's products in bf16 with float32 accumulation (forward
and both gradient products, tied or untied), the chunked loss against a float64 reference, and the
device-time profile of a step (``models.profile``) on a real CPU trace."""

from __future__ import annotations

import gzip
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import checkpoint, train
from models.cli import profile_window_from_args
from models.loss import cross_entropy_sum
from models.model import LanguageModel, lm_loss
from models.profile import ProfileWindow, categorize, format_table, summarize
from models.train import Trainer
from tests.helpers import rel_err, tol
from tests.models.common import small_model, train_config

VOCAB = 320  # a size no other dimension of the small model has: it marks the head's products
_DOT = re.compile(r"stablehlo\.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)")


def head_dots(stablehlo: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) tensor types of every dot_general with a vocabulary-sized dimension."""
    dots = [m.groups() for m in map(_DOT.search, stablehlo.splitlines()) if m]
    return [d for d in dots if any(re.search(rf"[<x]{VOCAB}x", t) for t in d)]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_head_products_take_bf16_and_accumulate_in_float32(tied):
    """Lowered HLO (abstract parameters, no compile) of a bf16 model's loss gradient (chunked loss)
    and of its logits' gradient: the head's forward, d hidden and d weight products take bf16
    operands and give float32; the parameters' gradients stay float32."""
    config = small_model(n_layers=1, vocab_size=VOCAB, tie_embeddings=tied, dtype="bfloat16")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)

    def loss(params, tokens):
        return lm_loss(nnx.merge(graphdef, params), tokens, tokens, loss_chunks=2)[0]

    def logits(params, tokens):
        return jnp.sum(jax.nn.logsumexp(nnx.merge(graphdef, params)(tokens), axis=-1))

    for fn in (loss, logits):
        traced = jax.jit(jax.grad(fn)).trace(params, tokens)
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(traced.out_info))
        dots = head_dots(traced.lower().as_text())
        assert len(dots) >= 3, dots  # forward, d hidden, d weight
        for lhs, rhs, out in dots:
            assert lhs.endswith("xbf16>") and rhs.endswith("xbf16>") and out.endswith("xf32>"), (lhs, rhs, out)


def _reference(h, w, y, weight, tied):
    """float64 loss sum and its gradients in h and w."""
    wd = w.T if tied else w
    z = h @ wd
    z = z - z.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    picked = np.take_along_axis(z, y[..., None], -1)[..., 0]
    p = np.exp(z - lse[..., None])
    dz = p * weight[..., None]
    np.put_along_axis(dz, y[..., None], np.take_along_axis(dz, y[..., None], -1) - weight[..., None], -1)
    dh = dz @ wd.T
    dw = np.einsum("btd,btv->dv", h, dz)
    return ((lse - picked) * weight).sum(), dh, (dw.T if tied else dw)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_loss_matches_float64(rng, tied, chunks):
    b, t, d = 2, 24, 32
    h = np.asarray(jnp.asarray(rng.standard_normal((b, t, d)), jnp.bfloat16), np.float64)
    w_shape = (VOCAB, d) if tied else (d, VOCAB)
    w = rng.standard_normal(w_shape) / np.sqrt(d)
    y = rng.integers(0, VOCAB, (b, t))
    weight = (rng.random((b, t)) > 0.2).astype(np.float64)
    want = _reference(h, np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64), y, weight, tied)

    def loss(h, w):
        return cross_entropy_sum(
            h, w, jnp.asarray(y), jnp.asarray(weight), tied=tied, dtype=jnp.bfloat16, chunks=chunks
        )

    got, (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.float32)
    )
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert abs(float(got) - want[0]) < 1e-3 * abs(want[0])
    assert rel_err(dh, want[1]) < tol(jnp.bfloat16)
    assert rel_err(dw, want[2]) < tol(jnp.bfloat16)
    # without differentiation the loss runs alone (no gradient products) and agrees
    assert float(jax.jit(loss)(jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.float32))) == pytest.approx(float(got))


# ---- the device-time profile (models.profile) ------------------------------------------------


def test_categories_from_kernel_and_op_names():
    cases = {
        ("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x128x32", ""): "matmuls",
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", ""): "matmuls",
        ("dot.30", "dot.30"): "matmuls",
        ("ynn_fusion.9", "ynn_fusion.9"): "matmuls",
        ("linear_attention_chunk_output", "pallas_call.12"): "pallas",
        ("gated_delta_rule_wy_bwd", ""): "pallas",
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "all-reduce.3"): "collectives",
        ("wrapped_concatenate", "wrapped_concatenate.7"): "fusions",
        ("loop_add_fusion", "add_fusion.2"): "fusions",
        ("MemcpyD2D", ""): "fusions",
        ("rng-bit-generator", "rng-bit-generator.1"): "other",
    }
    assert {k: categorize(*k) for k in cases} == cases


def test_gpu_trace_counts_stream_kernels_once(tmp_path):
    """On a GPU trace only the stream lines count (the XLA Ops line repeats their time)."""
    gpu, host = 7, 1
    events = [
        {"ph": "M", "pid": gpu, "name": "process_name", "args": {"name": "/device:GPU:0 (NVIDIA H200)"}},
        {"ph": "M", "pid": host, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": gpu, "tid": 1, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": gpu, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]
    kernels = [("sm90_xmma_gemm_bf16", 0, 300), ("linear_attention_dq", 300, 50), ("loop_add_fusion", 350, 20)]
    for step in range(2):
        for name, ts, dur in kernels:
            for tid in (1, 2):
                ts_step = 1000 * step + ts
                events.append({"ph": "X", "pid": gpu, "tid": tid, "ts": ts_step, "dur": dur, "name": name, "args": {}})
    events.append({"ph": "X", "pid": host, "tid": 5, "ts": 0, "dur": 999, "name": "dot.1", "args": {"hlo_op": "dot.1"}})
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    summary = summarize(str(path), steps=2)
    assert summary.total_us == 2 * 370
    assert (summary.by_category["matmuls"], summary.by_category["pallas"], summary.by_category["fusions"]) == (
        600,
        100,
        40,
    )
    assert [(k.name, k.calls) for k in summary.kernels] == [(n, 2) for n, _, _ in kernels]
    assert "0.300" in format_table(summary)  # the GEMM: 0.3 ms per step


def test_profile_steps_of_a_training_run(tmp_path, capsys):
    """A real CPU trace of two tiny training steps: a table with time in it, by category and kernel."""
    assert profile_window_from_args(["--profile-steps", "1:3", "--profile-dir", str(tmp_path)]) == ProfileWindow(
        1, 3, str(tmp_path)
    )
    for bad in ("3", "3:1", "a:b"):
        with pytest.raises(ValueError, match="--profile-steps"):
            ProfileWindow.parse(bad)
    config = train_config(steps=4, model=small_model(n_layers=1))
    result = Trainer(config, devices=jax.devices()[:1], log=lambda *a: None).fit(
        profile=ProfileWindow(1, 3, str(tmp_path))
    )
    summary = result["profile"]
    assert summary.steps == 2 and summary.total_us > 0
    assert summary.by_category["matmuls"] > 0 and summary.by_category["fusions"] > 0
    assert all(k.us >= 0 for k in summary.kernels) and summary.kernels[0].us > 0
    assert sum(summary.by_category.values()) == pytest.approx(summary.total_us)
    table = capsys.readouterr().out  # printed without the progress bar
    assert "steps 1:3" in table and "matmuls" in table and "top kernels" in table
    assert summary.kernels[0].name in table
    assert str(tmp_path) in summary.trace_path


# ---- checkpoints and stop requests without stalls (models.train, models.checkpoint) -----------


def test_background_checkpoints_and_stop_agreement_at_sync_steps(tmp_path, monkeypatch):
    """Periodic checkpoints return before the write ends, the last one waits; with several
    processes the stop flag is all-gathered only at the steps whose metrics are fetched."""
    saves, agreed = [], []
    real_save = checkpoint.save

    def save(manager, step, state, config, *, wait=True):
        real_save(manager, step, state, config, wait=wait)
        saves.append((step, wait, manager.is_saving_in_progress()))

    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(train, "_agree", lambda stop: agreed.append(stop) or stop)
    run = dict(ckpt_dir=str(tmp_path / "ckpt"), ckpt_every=1, log_every=2)
    config = train_config(steps=5, model=small_model(n_layers=1), run=run)
    trainer = Trainer(config, devices=jax.devices()[:1], log=lambda *a: None)
    trainer.multi_process = True  # as under jax.distributed, without a second process

    def sigterm_at_3(step, trainer):
        if step == 3:
            trainer.request_stop("sigterm")

    result = trainer.fit(on_step=sigterm_at_3)
    # the request at step 3 is agreed on at step 4 (a metrics step), which is saved and waited for
    assert result["stopped"] == "sigterm" and sorted(result["losses"]) == [1, 2, 3, 4]
    assert agreed == [None, "sigterm"]
    assert [(step, wait) for step, wait, _ in saves] == [(1, False), (2, False), (3, False), (4, True)]
    assert not saves[-1][2]  # nothing left in flight after the last save
    assert sorted(int(p) for p in os.listdir(tmp_path / "ckpt") if p.isdigit()) == [2, 3, 4]  # keep=3
    manager = checkpoint.open_manager(str(tmp_path / "ckpt"), keep=3)
    try:
        assert int(trainer.restore(manager)["step"]) == 4
    finally:
        manager.close()
