"""Test set-up: 8 fake CPU devices for the mesh tests, set before jax initialises."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", os.environ.get("LASP_TEST_PLATFORMS", ""))
if not os.environ["JAX_PLATFORMS"]:
    del os.environ["JAX_PLATFORMS"]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running CPU test")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh seed every run, printed on failure so a failing draw can be replayed."""
    seed = int(os.environ.get("LASP_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    print(f"LASP_TEST_SEED={seed}")
    return np.random.default_rng(seed)
