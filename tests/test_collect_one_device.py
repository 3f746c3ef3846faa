"""The suite must collect on a machine with one device: the GPU tests run on one H200 with
``pytest -m gpu tests``, which imports every test module first. A module that built a 2-device
mesh at import time (session 25's ``test_public_arguments.py``) made that run a collection error,
so no GPU test ran. Collecting with one forced CPU device reproduces that machine's view."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_suite_collects_with_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"collection failed with one device:\n{tail}"
    assert "error" not in proc.stdout.splitlines()[-1].lower(), tail
    assert " tests collected" in proc.stdout, tail
