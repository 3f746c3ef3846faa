"""Multi-host training: two CPU processes (2 devices each) joined by jax.distributed, dp=2 x sp=2.

Each process builds only its own shards of every batch; the loss curve must equal the same
training run in one process on 4 devices, and the orbax checkpoint is written jointly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from models.train import Trainer
from tests.models.common import small_model, train_config

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_equals_one_process(tmp_path):
    args = [sys.executable, "-m", "models.train", "--preset", "tiny", "--model.d_model", "32", "--model.n_layers", "1"]
    args += ["--model.n_heads", "2", "--model.ffn_dim", "64", "--model.position", "lrpe", "--steps", str(STEPS)]
    args += ["--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "3", "--weight-decay", "0.01"]
    args += ["--dp", "2", "--sp", "2", "--log-every", "1", "--eval-batches", "1", "--progress", "false"]
    args += ["--metrics", str(tmp_path / "metrics.jsonl"), "--ckpt-dir", str(tmp_path / "ckpt")]
    port = _free_port()
    base = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            args,
            env=base
            | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    assert "mesh dp=2 sp=2" in outs[0], outs[0]
    assert "mesh dp=2" not in outs[1], outs[1]  # only process 0 logs
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    got = np.array([r["loss"] for r in records if "loss" in r])
    assert os.path.isdir(tmp_path / "ckpt" / str(STEPS))

    config = train_config(dp=2, sp=2, steps=STEPS, model=small_model(n_layers=1), run=dict(eval_batches=1))
    want = Trainer(config, devices=jax.devices()[:4], log=lambda *a: None).fit()
    np.testing.assert_allclose(got, [want["losses"][s] for s in range(1, STEPS + 1)], rtol=0, atol=2e-5)
    (ev,) = [r for r in records if "eval_loss" in r]
    assert abs(ev["eval_loss"] - want["eval"][0]["eval_loss"]) < 2e-5
