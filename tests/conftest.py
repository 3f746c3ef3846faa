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
    # benchmarks/kernels.py --decay channel end to end on the CPU (two processes, ~25 s)
    "tests/models/test_gla_benchmark.py::test_kernels_benchmark_channel_rows_on_cpu",
    # the GLA model on packed rows under sp=2 (per-channel documents across shards run in CI in the lasp tests,
    # the model's document ids and loss mask in the other families' packed cases)
    "tests/models/test_packing.py::test_packed_loss_and_grads_equal_documents_alone[gla-sp2]",
    "tests/models/test_multihost.py::test_two_process_training_equals_one_process",
    "tests/models/test_train.py::test_lasp_train_cli_sigterm_then_resume",
    # ZeRO-1 equality on a second mesh (test_zero1.py's dp2xsp2-accum2 case runs in CI)
    "tests/models/test_zero1.py::test_zero1_training_equals_replicated_optimizer[sp4]",
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
    "tests/models/test_standalone.py::test_cache_continues_the_sequence[gdn]",
    "tests/models/test_standalone.py::test_linen_wrapper_equals_the_layer[gdn]",
    "tests/lasp_jax/test_softmax_attention.py::test_tokenring_and_zigzag_ring_every_shard[tokenring-contiguous-xla-dp1xsp4]",
    "tests/lasp_jax/test_softmax_attention.py::test_tokenring_and_zigzag_ring_every_shard[zigzag_ring-balanced-xla-dp2xsp2]",
    "tests/lasp_jax/test_softmax_attention.py::test_tokenring_and_zigzag_ring_every_shard[tokenring-balanced-pallas-dp1xsp2]",
    "tests/lasp_jax/test_softmax_attention.py::test_tokenring_and_zigzag_ring_every_shard[zigzag_ring-balanced-pallas-dp1xsp2]",
    "tests/lasp_jax/test_softmax_attention.py::test_tokenring_with_heads_over_a_tp_axis",
    # cuDNN block pairs (cudnn_blocks): CI keeps the document layouts that take each branch (boundary in the
    # queries: the fallback; mixed prefixes: the cuDNN pair with an empty prefix beside others) and one
    # contiguous strategy with documents; these repeat them
    *(
        f"tests/pallas_kernels/test_flash_attention_cudnn_blocks.py::test_blocks_with_documents_equal_the_recurrence[{c}-{d}]"
        for c in ("diagonal", "prefix-and-band", "band-at-the-end", "all-visible", "far-past", "future")
        for d in ("one-document-queries", "many-documents")
    ),
    "tests/lasp_jax/test_softmax_cudnn_blocks.py::test_packed_documents_every_shard[allgather-contiguous-dp2xsp2]",
    "tests/lasp_jax/test_softmax_cudnn_blocks.py::test_odd_local_length_and_eight_ranks[8]",
    # strategy="scan" where it joins the other strategies' parametrisations (its CI cases: test_scan*.py,
    # and the checked shard_map case), and the longer scan checks; test_scan.py covers the same properties
    *(
        f"tests/lasp_jax/test_lasp_attention.py::{name}"
        for name in (
            "test_every_shard_matches_reference_xla[dp1xsp8-scan]",
            "test_every_shard_matches_reference_xla[dp2xsp4-scan]",
            "test_every_shard_matches_reference_xla[dp4xsp2-scan]",
            "test_every_shard_matches_reference_xla[dp8xsp1-scan]",
            "test_constant_and_no_decay_xla[scan-g_gamma]",
            "test_constant_and_no_decay_xla[scan-nodecay]",
            "test_every_shard_matches_reference_pallas[scan]",
            "test_training_path_without_state[scan]",
            "test_per_shard_function_in_user_shard_map[scan-unchecked]",
        )
    ),
    *(
        f"tests/lasp_jax/test_segments.py::{name}"
        for name in (
            *(
                f"test_packed_rows_equal_documents_alone[scan-sp{sp}-{impl}]"
                for sp in (2, 4, 8)
                for impl in ("xla", "pallas")
            ),
            "test_constant_decay_on_a_data_by_sequence_mesh[scan]",
            "test_training_path_without_decay_or_states[scan]",
        )
    ),
    *(
        f"tests/lasp_jax/test_lasp_gated_delta_rule.py::{name}"
        for name in (
            "test_every_shard_matches_reference[scan-sp2]",
            "test_every_shard_matches_reference[scan-dp2xsp4]",
            "test_documents_cross_shards[scan]",
            "test_kda_with_documents[scan]",
        )
    ),
    "tests/lasp_jax/test_scan.py::test_linear_attention_every_shard[dp2xsp3-g]",
    "tests/lasp_jax/test_scan.py::test_linear_attention_scan_equals_ring",
    "tests/lasp_jax/test_scan.py::test_linear_attention_head_axis",
    "tests/lasp_jax/test_scan.py::test_delta_rule_every_shard[dp2xsp3-deltanet-docs]",
    "tests/lasp_jax/test_scan.py::test_delta_rule_pallas_split",
    "tests/lasp_jax/test_scan.py::test_delta_rule_in_user_shard_map[checked]",
    "tests/lasp_jax/test_scan.py::test_delta_rule_in_user_shard_map[unchecked]",
    "tests/lasp_jax/test_scan_scaling.py::test_every_strategy_hlo_on_64_devices",
    # per-channel (GLA) gates under sp: CI runs every strategy with documents and the Pallas split kernels;
    # strong decays (the op's test_xla_strong_decay covers the chunk math), tp heads and a checked shard_map here
    "tests/lasp_jax/test_lasp_channel.py::test_strong_channel_decay",
    "tests/lasp_jax/test_lasp_channel.py::test_heads_over_a_tp_axis",
    "tests/lasp_jax/test_lasp_channel.py::test_per_shard_function_in_a_checked_shard_map",
    # layers under a scan: the CI cases tnl-offload and gdn-alternating-full cover TNL, a hybrid and Gated DeltaNet
    "tests/models/test_layer_scan.py::test_scanned_loss_and_grads_equal_unscanned[gdn-hybrid-dots]",
    "tests/models/test_layer_scan.py::test_scanned_loss_and_grads_equal_unscanned[tnl-hybrid-dots]",
    "tests/models/test_layer_scan.py::test_scanned_loss_and_grads_equal_unscanned[gdn-none]",
    # session 16 (CI at 25.5 of 30 min): repeats of a property another CI case checks
    # the zig-zag ring's equal work per slot: sp=2 in CI, 4 and 8 ranks here
    "tests/lasp_jax/test_softmax_attention.py::test_zigzag_ring_slots_hold_the_same_work_on_every_rank[4]",
    "tests/lasp_jax/test_softmax_attention.py::test_zigzag_ring_slots_hold_the_same_work_on_every_rank[8]",
    # stacked pairs (an option, off by default: slower on an H200): one layout each in CI
    "tests/pallas_kernels/test_gla_pallas.py::test_stacked_pairs_equal_the_pairs[False-False]",
    "tests/pallas_kernels/test_gla_pallas.py::test_stacked_pairs_equal_the_pairs[False-True]",
    "tests/pallas_kernels/test_gla_pallas.py::test_stacked_pairs_equal_the_pairs[True-False]",
    "tests/pallas_kernels/test_gla_pallas.py::test_kernels_f32_gqa_documents_strong_decay_runs[False-True]",
    "tests/pallas_kernels/test_gla_pallas.py::test_kernels_f32_gqa_documents_strong_decay_runs[True-True]",
    "tests/pallas_kernels/test_gated_delta_rule_pallas.py::test_kernels_match_reference[kda-f32-T130-stacked-pairs-docs-strong-chunk64]",
    # the fused output (an option) keeps its chained-calls and forward-only CI cases; the f32 twin of a bf16 layout
    "tests/pallas_kernels/test_gated_delta_rule_pallas.py::test_kernels_match_reference[gdn-bf16-T100-fused-output-docs-2splits]",
    "tests/pallas_kernels/test_gated_delta_rule_pallas.py::test_kernels_match_reference[kda-f32-T70-stored-inverse-sub-tiles-docs-strong]",
    # document masks without block skipping: one shape in CI (the skipping path runs at all three)
    "tests/pallas_kernels/test_flash_attention.py::test_documents_match_jnp_recurrence[72-136-64-9-masks-only]",
    "tests/pallas_kernels/test_flash_attention.py::test_documents_match_jnp_recurrence[40-100-60-3-masks-only]",
    # cudnn_blocks: documents are handled inside the block functions (their own tests); CI keeps allgather and
    # the ring with documents, and tokenring without
    "tests/lasp_jax/test_softmax_cudnn_blocks.py::test_packed_documents_every_shard[tokenring-balanced-dp1xsp2]",
    "tests/lasp_jax/test_softmax_cudnn_blocks.py::test_packed_documents_every_shard[zigzag_ring-balanced-dp1xsp4]",
    "tests/lasp_jax/test_softmax_cudnn_blocks.py::test_every_strategy_every_shard[tokenring-balanced-dp1xsp4]",
    # the far past takes all-visible's branch (the prefix call alone)
    "tests/pallas_kernels/test_flash_attention_cudnn_blocks.py::test_blocks_equal_the_recurrence[far-past]",
    # packed rows per strategy: 2 and 8 ranks in CI, 4 here
    *(
        f"tests/lasp_jax/test_segments.py::test_packed_rows_equal_documents_alone[{strategy}-sp4-{impl}]"
        for strategy in ("ring", "allgather", "ulysses", "gather_kv")
        for impl in ("xla", "pallas")
    ),
    # models: the same property on another mesh of the same family
    "tests/models/test_hybrid.py::test_hybrid_sequence_parallel_loss_curve_equals_single_device[tnl-sp4-softmax-allgather]",
    "tests/models/test_parallel_training.py::test_sequence_parallel_loss_curve_equals_single_device[tnl-dp2xsp4]",
    "tests/models/test_parallel_training.py::test_sequence_parallel_loss_curve_equals_single_device[tnl-sp4-allgather]",
    "tests/models/test_parallel_training.py::test_sequence_parallel_loss_curve_equals_single_device[tnl-sp2-ring]",
    # (a model trained over the ring stays in CI: test_delta_models' gdn-hybrid-sp2-ring)
    "tests/models/test_gla.py::test_sequence_parallel_training_equals_one_device[sp2-ring]",  # dp2xsp4 in CI
    "tests/lasp_jax/test_softmax_attention.py::test_tokenring_and_zigzag_ring_every_shard[tokenring-balanced-xla-dp2xsp4]",
    *(  # packed rows at 8 ranks: the Pallas blocks in CI, the XLA path here (both at 2 ranks in CI)
        f"tests/lasp_jax/test_segments.py::test_packed_rows_equal_documents_alone[{strategy}-sp8-xla]"
        for strategy in ("ring", "allgather", "ulysses", "gather_kv")
    ),
    # the train-step benchmark's length search (a benchmark option; two compiles with remat offload)
    "tests/models/test_train_step_search.py::test_search_only_doubles_to_the_cap_without_throughput_rows",
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


@pytest.fixture
def triton_lowering_h100(monkeypatch):
    """Point the Pallas Triton lowering at an abstract H100, so a test can lower (not compile) kernels
    for CUDA on this machine and the lowering's own checks run; skips on a GPU (its tests compile)
    and on a jax whose lowering reads the GPU another way."""
    if jax.default_backend() == "gpu":
        pytest.skip("the GPU tests compile the kernels")
    _point_triton_lowering_at_h100(monkeypatch)


@pytest.fixture
def triton_lowering_cuda(monkeypatch):
    """Kernels lower for CUDA here and on a GPU: the GPU's own lowering there, an abstract H100
    elsewhere (``triton_lowering_h100`` without its skip on a GPU)."""
    if jax.default_backend() != "gpu":
        _point_triton_lowering_at_h100(monkeypatch)


def _point_triton_lowering_at_h100(monkeypatch):
    try:
        from jax._src.pallas.triton import gpu_info, pallas_call_registration
    except ImportError:
        pytest.skip("this jax has no Triton lowering hook to point at an abstract GPU")
    if not hasattr(pallas_call_registration, "gpu_info_lib"):
        pytest.skip("this jax's Triton lowering reads the GPU another way")
    info = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)
