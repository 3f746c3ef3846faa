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


# Long CPU tests whose property another CI test already covers (another family, mesh or entry point of
# the same check): marked `slow`, left out of `make test` (CI, 30-minute budget), run by `make test-slow`.
SLOW = {
    "tests/lasp_jax/test_communication.py::test_benchmark_smoke_run",
    "tests/models/test_multihost.py::test_two_process_training_equals_one_process",
    "tests/models/test_train.py::test_lasp_train_cli_sigterm_then_resume",
    "tests/models/test_convert.py::test_imported_llama_logits_equal_huggingface_llama[tied]",
    "tests/models/test_parallel_training.py::test_sequence_parallel_loss_curve_equals_single_device[linear_transformer-sp2-ring]",
    "tests/models/test_parallel_training.py::test_sequence_parallel_loss_curve_equals_single_device[linear_transformer-dp2xsp4]",
    "tests/models/test_parallel_training.py::test_sequence_parallel_loss_curve_equals_single_device[linear_transformer-dp2xsp2-fsdp-accum2]",
    "tests/models/test_packing.py::test_packed_loss_and_grads_equal_documents_alone[tnl-lrpe-sp2]",
    "tests/models/test_packing.py::test_packed_loss_and_grads_equal_documents_alone[tnl-lrpe]",
    "tests/models/test_packing.py::test_packed_loss_and_grads_equal_documents_alone[tnl-hybrid-sp4-ring]",
    "tests/models/test_packing.py::test_packed_training_sp2_equals_one_device[tnl]",
    "tests/models/test_hybrid.py::test_hybrid_sequence_parallel_loss_curve_equals_single_device[tnl-sp2-softmax-ring]",
    "tests/models/test_hybrid.py::test_hybrid_sequence_parallel_loss_curve_equals_single_device[linear_llama3-sp4-softmax-ring]",
    "tests/models/test_packing.py::test_packed_loss_and_grads_equal_documents_alone[linear_llama3-hybrid-sp2-allgather]",
    "tests/models/test_packing.py::test_packed_loss_and_grads_equal_documents_alone[linear_transformer]",
    "tests/models/test_parallel_training.py::test_sequence_parallel_loss_curve_equals_single_device[linear_transformer-sp4-allgather]",
    "tests/models/test_tensor_parallel.py::test_tensor_parallel_training_equals_one_device[tnl-hybrid-dp1xsp2xtp2]",
    "tests/models/test_tensor_parallel.py::test_tensor_parallel_training_equals_one_device[tnl-dp2xsp2xtp2-allgather]",
    "tests/models/test_tensor_parallel.py::test_tensor_parallel_training_equals_one_device[kda-dp2xsp2xtp2-fsdp]",
    "tests/lasp_jax/test_softmax_attention.py::test_tokenring_and_zigzag_ring_every_shard[tokenring-contiguous-xla-dp1xsp4]",
    "tests/lasp_jax/test_softmax_attention.py::test_tokenring_and_zigzag_ring_every_shard[zigzag_ring-balanced-xla-dp2xsp2]",
    "tests/lasp_jax/test_softmax_attention.py::test_tokenring_and_zigzag_ring_every_shard[tokenring-balanced-pallas-dp1xsp2]",
    "tests/lasp_jax/test_softmax_attention.py::test_tokenring_and_zigzag_ring_every_shard[zigzag_ring-balanced-pallas-dp1xsp2]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
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
