"""Training loop: exact resume, non-finite step rejection, data sources, metrics, CLI and config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.cli import config_from_args
from models.dataset import DataConfig, TokenData
from models.flops import model_flops_per_token
from models.sharding import activation_sharding, build_mesh
from models.train import Trainer, check_config, main
from tests.models.common import replace, small_model, train_config

QUIET = dict(log=lambda *a: None)


def test_resume_after_sigterm_gives_the_same_losses(tmp_path):
    config = train_config(
        steps=8, sp=2, model=small_model(n_layers=1), run=dict(ckpt_dir=str(tmp_path / "ckpt"), ckpt_every=3)
    )
    uninterrupted = Trainer(replace(config, "run", ckpt_dir=None), devices=jax.devices()[:2], **QUIET).fit()

    def interrupt(step, trainer):
        if step == 5:  # a real SIGTERM where the handler is installed (the main thread), else the same request
            if trainer._stop_reason is None and _main_thread():
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                trainer.request_stop("sigterm")

    first = Trainer(config, devices=jax.devices()[:2], **QUIET).fit(on_step=interrupt)
    assert first["stopped"] == "sigterm" and sorted(first["losses"]) == [1, 2, 3, 4, 5]
    assert sorted(int(p) for p in os.listdir(tmp_path / "ckpt") if p.isdigit()) == [3, 5]
    second = Trainer(config, devices=jax.devices()[:2], **QUIET).fit()
    assert sorted(second["losses"]) == [6, 7, 8]
    resumed = first["losses"] | second["losses"]
    assert resumed == uninterrupted["losses"], (resumed, uninterrupted["losses"])  # bit-exact


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def test_non_finite_step_is_rejected():
    trainer = Trainer(train_config(steps=4, model=small_model(n_layers=1)), devices=jax.devices()[:1], **QUIET)
    state = trainer.init_state()
    inputs, targets = trainer.data.batch("train", 0, trainer.batch_sharding)
    params = state["params"]
    table = params["embed"]["table"]
    # one NaN embedding row of a token in the batch makes the loss non-finite: the step must leave
    # params and optimizer state as they were
    bad = jax.tree.map(lambda x: x, state)
    token = int(np.asarray(inputs)[0, 0, 0])
    bad["params"]["embed"]["table"] = table.replace(table[...].at[token].set(jnp.nan))
    before = jax.tree.map(np.asarray, bad)
    after, metrics = trainer.train_step(bad, inputs, targets)
    assert not bool(metrics["accepted"]) and not np.isfinite(float(metrics["loss"]))
    assert int(after["skipped"]) == 1 and int(after["step"]) == 1
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, after["params"])), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(after["opt_state"]), jax.tree.leaves(before["opt_state"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    good, metrics = trainer.train_step(trainer.init_state(), inputs, targets)
    assert bool(metrics["accepted"]) and int(good["skipped"]) == 0


def test_text_and_bin_batches(tmp_path):
    text = DataConfig(source="text", batch_size=4, seq_len=16, grad_accum=2)
    data = TokenData(text, 256)
    x, y = data.batch("train", 3)
    assert x.shape == (2, 2, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[..., 1:], y[..., :-1])  # targets are inputs shifted by one
    np.testing.assert_array_equal(data.batch("train", 3)[0], x)  # a pure function of the step
    assert not np.array_equal(data.batch("train", 4)[0], x)
    corpus = bytes(data.tokens.tolist())
    assert all(bytes(row.tolist()) in corpus for row in x.reshape(-1, 16).astype(np.uint8))

    for dtype, vocab in (("uint16", 60_000), ("uint32", 100_000)):
        tokens = (np.arange(5000) * 7 % vocab).astype(dtype)
        path = tmp_path / f"tokens_{dtype}.bin"
        tokens.tofile(path)
        cfg = DataConfig(source="bin", path=str(path), bin_dtype=dtype, batch_size=8, seq_len=32)
        data = TokenData(cfg, vocab)
        x, y = data.batch("train", 0)
        for row, target in zip(x.reshape(-1, 32), y.reshape(-1, 32)):
            start = int(np.flatnonzero(tokens == row[0])[0])
            np.testing.assert_array_equal(row, tokens[start : start + 32])
            np.testing.assert_array_equal(target, tokens[start + 1 : start + 33])
        # the sharded batch (built per shard by callbacks) equals the host batch
        mesh = build_mesh(2, 4, jax.devices()[:8])
        xs, ys = data.batch("train", 0, activation_sharding(mesh, 3, leading=1))
        np.testing.assert_array_equal(np.asarray(xs), x)
        np.testing.assert_array_equal(np.asarray(ys), y)
        ev = data.batch("eval", 0)[0]
        assert np.all(ev >= 0) and ev.shape == x.shape
    with pytest.raises(ValueError, match="vocab_size"):
        TokenData(cfg, 1000).batch("train", 0)


def test_synthetic_data_metrics_and_eval_perplexity(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    config = train_config(
        steps=12,
        data=dict(source="synthetic"),
        run=dict(metrics=str(metrics), log_every=4, eval_batches=1, peak_tflops=1.0),
    )
    config = replace(config, "model", vocab_size=64)
    result = Trainer(config, devices=jax.devices()[:1], **QUIET).fit()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [4, 8, 12]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train)
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train)
    (ev,) = [r for r in records if "eval_loss" in r]
    assert ev["eval_ppl"] == pytest.approx(np.exp(ev["eval_loss"])) and result["eval"] == [ev]


def test_model_flops_per_token():
    config = train_config().model
    d, f, v, layers, h, dh = 32, 64, 256, 2, 2, 16
    per_layer = 4 * d * d + d * d + 3 * d * f  # qkvu, output, simple GLU
    recurrence = 4 * h * (2 * dh) * dh  # LRPE doubles the key dimension of the state
    assert model_flops_per_token(config, 32) == 6 * (layers * per_layer + d * v) + 3 * layers * recurrence


@pytest.mark.parametrize(
    "section, changes, n_devices, match",
    [
        ("data", dict(seq_len=30), 4, "seq_len=30 must be a multiple of sp=4"),
        (
            "data",
            dict(batch_size=4, grad_accum=4),
            8,
            r"\(batch_size / grad_accum = 4 / 4 = 1\) must be a multiple of dp=2",
        ),
        ("mesh", dict(dp=3), 8, "dp \\* sp must equal the number of devices"),
        ("mesh", dict(strategy="zigzag"), 8, "strategy must be one of"),
        ("run", dict(remat="everything"), 8, "remat must be one of"),
        ("run", dict(loss_chunks=3), 8, "loss_chunks"),
    ],
)
def test_bad_train_configs_raise(section, changes, n_devices, match):
    config = replace(train_config(dp=2, sp=4), section, **changes)
    if n_devices == 4:
        config = replace(config, "mesh", dp=1)
    with pytest.raises(ValueError, match=match):
        check_config(config, n_devices)


def test_bad_data_configs_raise(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a multiple of grad_accum"):
        DataConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="needs path"):
        DataConfig(source="bin")
    with pytest.raises(ValueError, match="data source must be one of"):
        DataConfig(source="parquet")
    with pytest.raises(ValueError, match="needs vocab_size >= 256"):
        TokenData(DataConfig(source="text"), 100)
    with pytest.raises(ValueError, match="too few"):
        TokenData(DataConfig(source="text", seq_len=100_000), 256)
    with pytest.raises(ValueError, match="not found"):
        TokenData(DataConfig(source="bin", path=str(tmp_path / "missing.bin")), 256)


def test_command_line(capsys):
    config = config_from_args(
        ["--preset", "linear-llama3-tiny", "--sp", "4", "--seq-len", "64", "--lr", "1e-3", "--fsdp", "true"]
        + ["--data.seed", "3", "--model.n_layers", "3", "--model.layer_types", "linear,linear,linear"]
    )
    assert (config.mesh.sp, config.data.seq_len, config.optim.lr, config.mesh.fsdp) == (4, 64, 1e-3, True)
    assert (config.data.seed, config.model.n_layers, config.model.family) == (3, 3, "linear_llama3")
    assert config.model.layer_types == ("linear",) * 3
    assert config_from_args(["--demo"]).mesh.sp == 4
    assert main(["--sp", "3", "--steps", "1"]) == 2
    assert "sp=3 must divide the number of devices" in capsys.readouterr().err


def test_lasp_train_cli_sigterm_then_resume(tmp_path):
    """The console entry point: SIGTERM mid-run saves a checkpoint and exits 143; a rerun finishes the job."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    args = [sys.executable, "-m", "models.train", "--preset", "tiny", "--steps", "400", "--seq-len", "32"]
    args += ["--batch-size", "2", "--model.d_model", "32", "--model.n_layers", "1", "--log-every", "1"]
    args += ["--ckpt-dir", str(ckpt), "--metrics", str(metrics), "--eval-batches", "0", "--sp", "2", "--dp", "1"]
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 143, out
    saved = [int(p) for p in os.listdir(ckpt) if p.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 400, out
    assert "saved checkpoint" in out
    steps_logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps_logged[-1] == saved[0]
    rerun = subprocess.run(args[:6] + [str(saved[0] + 2)] + args[7:], env=env, capture_output=True)
    assert rerun.returncode == 0, rerun.stdout.decode() + rerun.stderr.decode()
    assert f"resumed from {ckpt} at step {saved[0]}" in rerun.stdout.decode()
    steps_logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps_logged[-2:] == [saved[0] + 1, saved[0] + 2]
