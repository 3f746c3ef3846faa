"""Kernel-specific tests of the Pallas Triton linear-attention kernels.

The shared suite (test_linear_attention.py) runs ``impl="pallas"`` through the public function.
Here: the paths it does not reach (the constant-decay kernel mode, which needs T to be a whole
number of chunks; tiled and split backward kernels; many splits), the tiling helpers, and
GPU-only checks (compiled kernels against the reference, a million-token call) that skip
without a GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import pallas_triton
from pallas_kernels.linear_attention.config import INTERPRET_CONFIG, BlockConfig, default_config, splits
from tests.helpers import dg_gamma_error, make_inputs, rel_err, tol, x64

ON_GPU = jax.default_backend() == "gpu"


def _grads(fn, q, k, v, kw, do, ds):
    """o, final_state and the gradients of <o, do> + <final_state, ds>, under one jit (eager, each
    primitive would compile apart)."""

    def loss(q, k, v, kw, do, ds):
        o, s = fn(q, k, v, kw)
        return jnp.sum(o.astype(do.dtype) * do) + jnp.sum(s.astype(ds.dtype) * ds), (o, s)

    @jax.jit
    def run(q, k, v, kw, do, ds):
        grads, (o, s) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, kw, do, ds)
        return {"o": o, "final_state": s, "dq": grads[0], "dk": grads[1], "dv": grads[2]} | {
            f"d{n}": x for n, x in grads[3].items()
        }

    return run(q, k, v, kw, do, ds)


def check_kernels(rng, *, dtype=jnp.float32, config=None, interpret=True, dg_factor=4.0, boundaries=None, **shape):
    """pallas_triton.linear_attention (outputs, every gradient) against the float64 recurrence.

    ``boundaries``: token positions where a new document starts (packed rows, ``segment_ids``).
    """
    q, k, v, kw = make_inputs(rng, dtype=dtype, **shape)
    seg = None
    if boundaries is not None:
        starts = np.zeros(shape["t"], np.int32)
        starts[list(boundaries)] = 1
        seg = jnp.asarray(np.tile(np.cumsum(starts) % 2, (q.shape[0], 1)))  # ids alternate 0, 1, 0, ...
    q, k, v = (np.asarray(jnp.asarray(x, dtype)) for x in (q, k, v))
    do = rng.standard_normal(q.shape[:3] + v.shape[3:])
    ds = rng.standard_normal((q.shape[0], q.shape[2], q.shape[3], v.shape[3]))

    def kernel(q, k, v, kw):
        return pallas_triton.linear_attention(q, k, v, **kw, segment_ids=seg, interpret=interpret, config=config)

    got = _grads(
        kernel,
        *(jnp.asarray(x, dtype) for x in (q, k, v)),
        {n: jnp.asarray(x, jnp.float32) for n, x in kw.items()},
        jnp.asarray(do, jnp.float32),
        jnp.asarray(ds, jnp.float32),
    )
    with x64():
        from pallas_kernels.linear_attention import reference

        def oracle(q, k, v, kw):
            kw = dict(kw)
            gate = kw.pop("g", None)
            if "g_gamma" in kw:
                gate = jnp.broadcast_to(kw.pop("g_gamma"), q.shape[:3])
            doc_ids = None if seg is None else reference.document_index(seg)
            return reference.recurrent(q, k, v, gate, scale=q.shape[-1] ** -0.5, doc_ids=doc_ids, **kw)

        want = _grads(
            oracle,
            *(jnp.asarray(x, jnp.float64) for x in (q, k, v)),
            {n: jnp.asarray(x, jnp.float64) for n, x in kw.items()},
            jnp.asarray(do, jnp.float64),
            jnp.asarray(ds, jnp.float64),
        )
        want = {n: np.asarray(x) for n, x in want.items()}
    assert got["o"].dtype == dtype and got["final_state"].dtype == jnp.float32
    bound = tol(dtype, shape["t"])
    errors = {n: rel_err(got[n], want[n]) for n in want}
    if "g_gamma" in kw:  # a sum over all tokens: measured at the scale of its terms
        errors["dg_gamma"] = dg_gamma_error(got["dg_gamma"], want["dg_gamma"], q, k, v, kw, do, ds, seg)
    bad = {n: e for n, e in errors.items() if e > (dg_factor * bound if n in ("dg", "dg_gamma") else bound)}
    assert not bad, f"errors over tolerance {bound:.1e}: {bad}"


# ---- interpret mode (CPU) -------------------------------------------------------------------


@pytest.mark.parametrize("decay", ["g_gamma", "g"])
def test_whole_chunks_strong_decay(rng, decay):
    """T a multiple of the chunk runs the constant-decay kernel mode; strong decay stresses dg."""
    # the decay gradient leaves out pairs that cancel exactly, so it stays accurate here
    check_kernels(rng, b=1, t=64, h=2, d=16, decay=decay, g_scale=10.0, dg_factor=1.0)


@pytest.mark.parametrize("split", [False, True], ids=["fused_dkdv", "split_dkdv"])
def test_tiled_blocks_and_splits(rng, split):
    """Value/key dims tiled in every kernel, many uneven splits, grouped heads."""
    cfg = dataclasses.replace(INTERPRET_CONFIG, min_programs=20, split_dkdv=split)
    # E=32, D=32 with 16-wide blocks; 7 chunks in 4 splits per row (2, 2, 2, 1 chunks)
    check_kernels(rng, b=1, t=7 * 16, h=4, hk=2, d=32, e=32, decay="g", config=cfg)


@pytest.mark.parametrize("split", [False, True], ids=["fused_dkdv", "split_dkdv"])
def test_packed_documents_tiled_and_split(rng, split):
    """segment_ids through tiled/split kernels: boundaries at a chunk edge (16), a split edge (32),
    one token later (a one-token document), mid-chunk (71) and on the last token."""
    cfg = dataclasses.replace(INTERPRET_CONFIG, min_programs=20, split_dkdv=split)
    check_kernels(rng, b=1, t=7 * 16, h=4, hk=2, d=32, e=32, decay="g", config=cfg, boundaries=[16, 32, 33, 71, 111])


def test_constant_decay_no_initial_state_half_precision(rng):
    check_kernels(rng, dtype=jnp.bfloat16, b=2, t=48, h=2, d=16, e=32, decay="g_gamma", init=False)


def test_splits_cover_every_chunk():
    for num_chunks in range(1, 40):
        for rows in (1, 3, 16):
            for min_programs in (1, 7, 64):
                n_split, per = splits(num_chunks, rows, min_programs)
                assert (n_split - 1) * per < num_chunks <= n_split * per
                assert n_split <= num_chunks
    assert splits(512, 16, 528) == (32, 16)


def test_config_validation_and_defaults():
    with pytest.raises(ValueError, match="chunk=48"):
        BlockConfig(chunk=48)
    with pytest.raises(ValueError, match="min_programs"):
        BlockConfig(min_programs=0)
    assert default_config(batch=2, heads=3, seq_len=100, interpret=True).chunk == INTERPRET_CONFIG.chunk
    assert default_config(batch=1, heads=16, seq_len=32768, interpret=False) == BlockConfig()
    # three backward stages overflow an H200's shared memory at D = 128 without a decay
    shape = dict(batch=1, heads=16, seq_len=32768, interpret=False)
    grouped = default_config(**shape, grouped=True, head_dim=128)
    no_decay = default_config(**shape, decay=False, head_dim=128)
    assert grouped.num_stages_bwd == no_decay.num_stages_bwd == 2
    assert default_config(**shape, decay=False, head_dim=64) == BlockConfig()  # three fit at 64
    # past 128 (padded to 256): dk and dv apart, 2 backward stages in bf16/fp16 and 1 in float32; the
    # dtype changes nothing up to 128
    assert default_config(**shape, head_dim=128, dtype=jnp.bfloat16) == BlockConfig()
    for dtype, stages in ((jnp.bfloat16, 2), (jnp.float16, 2), (jnp.float32, 1), (None, 1)):
        for head_dim, grouped, decay in ((256, False, True), (129, True, False)):
            cfg = default_config(**shape, head_dim=head_dim, grouped=grouped, decay=decay, dtype=dtype)
            assert cfg == BlockConfig(split_dkdv=True, num_stages_bwd=stages), (dtype, head_dim)


def test_rejects_what_it_cannot_run():
    with x64():
        q = jnp.zeros((1, 8, 2, 16), jnp.float64)
        with pytest.raises(TypeError, match="q.dtype=float64"):
            pallas_triton.linear_attention(q, q, q, interpret=True)
    huge = jax.ShapeDtypeStruct((1, 1 << 22, 16, 128), jnp.bfloat16)  # 2^33 elements: int32 offsets overflow
    # taken, as pieces of whole chunks short enough for int32 offsets (the state chained between them)
    assert pallas_triton.supports(huge, huge, huge)
    piece = pallas_triton.piece_len(huge, huge)
    assert 0 < piece < 1 << 22 and piece % 128 == 0 and piece * 16 * 128 - 1 <= 2**31 - 1
    ok = jax.ShapeDtypeStruct((1, 1 << 20, 4, 128), jnp.bfloat16)
    assert pallas_triton.supports(ok, ok, ok)


# ---- GPU (compiled Triton kernels) ----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("decay", [None, "g_gamma", "g"], ids=["nodecay", "g_gamma", "g"])
def test_gpu_kernels_match_reference(rng, dtype, decay):
    check_kernels(rng, dtype=dtype, interpret=False, b=2, t=1000, h=4, hk=2, d=64, decay=decay)


@pytest.mark.gpu
@pytest.mark.parametrize("d,e", [(128, 128), (12, 20)], ids=["D128E128", "D12E20"])
@pytest.mark.parametrize("split", [False, True], ids=["fused_dkdv", "split_dkdv"])
def test_gpu_head_dims_and_split(rng, d, e, split):
    cfg = dataclasses.replace(BlockConfig(), split_dkdv=split, min_programs=16)
    check_kernels(rng, dtype=jnp.bfloat16, interpret=False, config=cfg, b=1, t=777, h=2, d=d, e=e, decay="g")


@pytest.mark.gpu
@pytest.mark.parametrize("decay", [None, "g_gamma"], ids=["nodecay", "g_gamma"])
@pytest.mark.parametrize("hk", [2, 4], ids=["grouped", "ungrouped"])
def test_gpu_d128_default_config(rng, decay, hk):
    """D = 128 with the default tiling, grouped heads (linear-llama3's layer: the backward writes
    float32 dk, dv per query head) or not, with no decay (three backward stages overflowed shared
    memory there) and with one."""
    check_kernels(rng, dtype=jnp.bfloat16, interpret=False, b=1, t=777, h=4, hk=hk, d=128, e=128, decay=decay)


@pytest.mark.gpu
@pytest.mark.parametrize("decay", [None, "g_gamma", "g"], ids=["nodecay", "g_gamma", "g"])
def test_gpu_float32_d128_default_launches(rng, decay):
    """float32 at D = 128, the widest default the compiled kernels take, where shared memory is
    tightest (the delta rule's float32 default did not launch there, session 20), grouped heads,
    documents, against the float64 recurrence (passed on an H200, session 20, call E, as 3 cases of a
    test that also tried 256-wide heads)."""
    shape = dict(b=1, t=1000, h=4, hk=2, d=128, e=128)
    check_kernels(rng, dtype=jnp.float32, interpret=False, decay=decay, boundaries=[300, 301, 700], **shape)


def test_compiled_kernels_refuse_heads_wider_than_256(monkeypatch):
    """The default tiles launch up to 256-wide heads (session 21; 256 needs ``split_dkdv``): wider ones
    get a clear error from the compiled kernels (the interpreter and a given config do not refuse), and
    ``impl="auto"`` takes the XLA path for them on a GPU, and for float32 past 128 (launches, but 11.6×
    slower than the XLA path there)."""
    from pallas_kernels.linear_attention import api

    def x(d, e, t=64, dtype=jnp.bfloat16):
        return tuple(jnp.zeros((1, t, 2, n), dtype) for n in (d, d, e))

    wide, widest = x(512, 64), x(256, 256)
    with pytest.raises(ValueError, match=r"heads up to 256 wide.*\(1, 64, 2, 512\)"):
        pallas_triton.linear_attention(*wide, interpret=False)
    with pytest.raises(ValueError, match="heads up to 256 wide"):  # v's width counts, padded: 260 → 512
        pallas_triton.split_forward(*x(64, 260), interpret=False)
    statics = pallas_triton._statics(*widest, None, None, scale=None, interpret=False, config=None)
    assert statics.cfg.split_dkdv and statics.cfg.num_stages_bwd == 2
    # a given config is the caller's choice (benchmarks/wide_heads_probe.py), and the interpreter has
    # no shared-memory limit
    statics = pallas_triton._statics(*wide, None, None, scale=None, interpret=False, config=BlockConfig(chunk=32))
    assert statics.cfg.chunk == 32
    q, k, v = x(512, 16, t=16)
    o, _ = pallas_triton.linear_attention(q, k, v + 1, interpret=True)
    assert o.shape == (1, 16, 2, 16) and bool(jnp.all(jnp.isfinite(o)))
    monkeypatch.setattr(api, "on_gpu", lambda: True)
    assert api.resolve_impl("auto", *wide) == "xla"
    assert api.resolve_impl("auto", *widest) == "pallas"
    assert api.resolve_impl("auto", *x(192, 64, dtype=jnp.float16)) == "pallas"
    assert api.resolve_impl("auto", *x(256, 256, dtype=jnp.float32)) == "xla"
    assert api.resolve_impl("auto", *x(128, 128, dtype=jnp.float32)) == "pallas"
    assert api.resolve_impl("auto", *wide, g=jnp.zeros((1, 64, 2, 512))) == "pallas"  # GLA has its own rule


@pytest.mark.slow  # 17 s of interpreter compiles on 2 cores for a GPU-session script: `make test-slow`
def test_wide_heads_probe_runs_and_checks():
    """``benchmarks/wide_heads_probe.py`` (the GPU search for tiles that fit wide heads) in the
    interpreter: a config runs fwd and fwd+bwd and matches the XLA path; a bad config is reported,
    not raised; the timing helper runs the XLA path and a config."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "wide_heads_probe.py"
    spec = importlib.util.spec_from_file_location("wide_heads_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    qkv, gates, cot = probe.inputs(1, 32, 1, 16, jnp.float32, "g")
    small = {"chunk": 16, "block_e": 16, "block_d": 16, "block_dkdv": 16, "min_programs": 2}
    row = probe.probe(small, qkv, gates, cot, interpret=True)
    assert (row["fwd"], row["fwd_bwd"]) == ("ok", "ok") and row["max_rel_err"] < 1e-4, row
    bad = probe.probe({"chunk": 12}, qkv, gates, cot, interpret=True)
    assert bad["fwd"].startswith("fails") and "power of two" in bad["fwd"], bad
    for overrides in (None, small):
        assert probe.time_fwd_bwd(overrides, (1, 32, 1, 16), jnp.float32, "g", interpret=True, reps=1) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("decay", [None, "g_gamma", "g"], ids=["nodecay", "g_gamma", "g"])
@pytest.mark.parametrize("hk,d,e", [(2, 256, 256), (4, 192, 256), (4, 64, 200)], ids=["grouped256", "d192", "e200"])
def test_gpu_wide_heads_default_launches(rng, decay, hk, d, e):
    """Heads padded to 256 with the default tiles (``split_dkdv``, 2 backward stages in bf16; the
    former default asked 264192 B of shared memory), grouped or not, with documents, against the
    float64 recurrence."""
    shape = dict(b=1, t=1000, h=4, hk=hk, d=d, e=e)
    check_kernels(rng, dtype=jnp.bfloat16, interpret=False, decay=decay, boundaries=[300, 301, 700], **shape)


@pytest.mark.gpu
@pytest.mark.slow  # Triton takes minutes to compile the float32 kernels at 256
def test_gpu_float32_wide_heads_default_launches(rng):
    """float32 at 256 with the default tiles (1 backward stage); ``impl="auto"`` takes the XLA path
    here (faster), so this runs only where a caller asks for the kernels."""
    shape = dict(b=1, t=300, h=2, hk=1, d=256, e=256)
    check_kernels(rng, dtype=jnp.float32, interpret=False, decay="g", boundaries=[100], **shape)


@pytest.mark.gpu
@pytest.mark.parametrize("decay", [None, "g_gamma", "g"], ids=["nodecay", "g_gamma", "g"])
def test_gpu_packed_documents(rng, decay):
    """Compiled kernels with 16 documents per row (boundaries at chunk edges, mid-chunk, length 1)."""
    boundaries = sorted({64, 128, 129, 500, 1023} | set(rng.choice(np.arange(1, 2048), 11, replace=False).tolist()))
    shape = dict(b=2, t=2048, h=4, hk=2, d=64)
    check_kernels(rng, dtype=jnp.bfloat16, interpret=False, decay=decay, boundaries=boundaries, **shape)


@pytest.mark.gpu
def test_gpu_million_tokens_equal_chained_halves():
    """T = 1,048,576 (B=1, H=4, D=128, bf16): fwd+bwd finite and equal to two chained halves."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "long_sequence.py"
    spec = importlib.util.spec_from_file_location("long_sequence", path)
    long_sequence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(long_sequence)
    inputs = long_sequence.make_inputs(1, 1 << 20, 4, 128)
    (grads_w, (o_w, s_w)), (grads_c, (o_c, s_c)) = long_sequence.whole_and_halves(*inputs)
    for whole, chain in zip([o_w, s_w, *grads_w], [o_c, s_c, *grads_c]):
        err, finite = long_sequence.rel_err(whole, chain)
        assert finite and err < 1e-2, (err, finite)
