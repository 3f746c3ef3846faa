"""Training-step throughput and MFU of 1B-class models, and the longest sequence that trains per GPU.

Workloads are model presets (``--preset``, one or more): ``tnl-1b`` (the default), and the delta-rule
models ``gdn-1.3b`` (Gated DeltaNet), ``kda-1.3b`` (Kimi Delta Attention) and ``gdn-hybrid-1.3b``
(3 Gated DeltaNet : 1 softmax layer); any preset of ``models.config.PRESETS`` works. For each
preset and each sequence-parallel size in ``--sp`` (e.g. ``--sp 1 2``: one GPU, then two GPUs sharing each
sequence), a full jitted training step (forward, backward, AdamW update; bf16 compute, float32
params and optimizer state) runs on one row of ``--tokens-per-device × sp`` tokens per data-parallel
group, so every GPU holds ``--tokens-per-device`` tokens. It measures:

- the median step time over ``--iters`` steps (after compile and ``--warmup`` steps) on a fixed batch,
  each step waited for; and ``pipelined ms``: the mean of ``--iters`` steps dispatched back to back
  and waited for once (what a training loop that reads the loss only now and then sees);
- tokens/s per GPU and MFU: model FLOPs per token (``models.flops.model_flops_per_token``: 6·N for
  the weight matmuls incl. the head, plus 3× each token mixer's forward work: 4·H·D·E per linear-
  attention layer, 6·Hv·D·E + the short convolution per delta-rule layer, the causal T/2 keys per
  softmax layer; remat not counted) × tokens/s per GPU / the GPU's dense bf16 peak (989 TFLOP/s for
  H100/H200 SXM; ``--peak-tflops``);
- for sp > 1, per-GPU throughput as a fraction of the same preset's sp = 1 row;
- peak device memory (``memory_stats``) where the backend reports it.

``--search-longest`` then finds the longest sequence per GPU whose step runs: doubling from
``--tokens-per-device`` until a step fails with out-of-memory, then bisecting to ``--granularity``
tokens (remat ``full`` and chunked logits, the memory-lean settings, unless overridden).

``--scan-layers`` runs the blocks under one ``lax.scan`` over stacked parameters
(``ModelConfig.scan_layers``); the ``compile s`` column shows what that saves (compile time vs depth:
``benchmarks/compile_time.py``).

``--split-projections`` computes every fused input projection (q|k|v|gate, the MLP's gate|up) as one
product per block (``ModelConfig.split_projections``: the same parameters; the backward concatenates
no activation cotangents before the weight-gradient products).

``--profile DIR`` traces ``--profile-iters`` more steps of each throughput row with jax.profiler
(under ``DIR/sp<n>``) and prints their device time by category (matmuls, Pallas kernels, fusions,
collectives) and the top kernels (``models.profile``; also in the JSON).

Prints a table and writes JSON with ``--json PATH``. ``--smoke`` runs a tiny model on fake CPU
devices (a check that the script works, not a measurement).

    python benchmarks/train_step.py                                   # 1 GPU, TNL-1B, 32K tokens
    python benchmarks/train_step.py --sp 1 2 --json train_step.json   # 2 GPUs: sp=1 row and sp=2 row
    python benchmarks/train_step.py --preset gdn-1.3b kda-1.3b --sp 1 2 --json delta.json  # delta-rule models
    python benchmarks/train_step.py --search-longest                  # + longest trainable sequence
    python benchmarks/train_step.py --profile profile                 # + device time by kernel
    python benchmarks/train_step.py --scan-layers --remat offload     # layers under a scan, host offload
    python benchmarks/train_step.py --split-projections --json split.json  # one product per projection block
    python benchmarks/train_step.py --tokens-per-device 1048576 --remat offload --mlp-chunk 65536 --iters 1  # 1M tokens
    python benchmarks/train_step.py --smoke --sp 1 2 --search-longest --max-tokens 2048
    python benchmarks/train_step.py --preset tnl-1b --scan-layers --search-longest --search-only \
        --search-remat offload --mlp-chunk 65536 --tokens-per-device 1048576 --max-tokens 1048576  # 1M search
    python benchmarks/train_step.py --smoke --preset gdn-1.3b kda-1.3b --sp 1 2   # runs gdn-tiny, kda-tiny
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=["tnl-1b"], help="one or more model presets (workloads)")
    p.add_argument("--tokens-per-device", type=int, default=32768)
    p.add_argument("--sp", type=int, nargs="+", default=[1], help="sequence-parallel sizes, one row each")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size (one row of tokens per dp group)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (heads and MLP hidden split; same tokens)")
    p.add_argument("--strategy", default="ring")
    p.add_argument("--impl", default="auto")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument(
        "--shard-optimizer-over-data",
        action="store_true",
        help="ZeRO-1: AdamW state and update split over dp x sp (MeshConfig.shard_optimizer_over_data)",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="dots", help="none | dots | full | offload (throughput rows)")
    p.add_argument("--scan-layers", action="store_true", help="blocks under a lax.scan (ModelConfig.scan_layers)")
    p.add_argument("--mlp-chunk", type=int, default=0, help="ModelConfig.mlp_chunk: MLP in chunks of this many tokens")
    p.add_argument(
        "--split-projections",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one product per fused projection block (ModelConfig; default: the preset's, on for TNL, GDN, KDA)",
    )
    p.add_argument(
        "--gate-lower-bound",
        type=float,
        default=None,
        help="KDA: log decays b·sigmoid(...) in [b, 0) (ModelConfig.gate_lower_bound; default none)",
    )
    p.add_argument("--loss-chunks", default="auto", help="int, or auto: about 8K tokens of logits per device at once")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--search-longest", action="store_true")
    p.add_argument(
        "--search-only",
        action="store_true",
        help="with --search-longest: skip the throughput rows (they run at --tokens-per-device with --remat)",
    )
    p.add_argument("--search-remat", default="full")
    p.add_argument("--max-tokens", type=int, default=4 * 1024 * 1024, help="per device, upper end of the search")
    p.add_argument("--granularity", type=int, default=16384, help="per-device resolution of the search")
    p.add_argument(
        "--delta-sp-splits",
        type=int,
        default=None,
        help="sweeps: runs per shard of the sharded delta rule's split kernels (default: the config's)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--profile", default=None, metavar="DIR", help="trace steps of each row and print device time")
    p.add_argument("--profile-iters", type=int, default=3, help="steps traced per row with --profile")
    p.add_argument("--smoke", action="store_true", help="tiny model on fake CPU devices")
    args = p.parse_args(argv)
    if args.smoke:
        n = max(args.sp) * args.dp * args.tp
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        # the same family's tiny preset: tnl-1b -> tnl-tiny, gdn-1.3b -> gdn-tiny, gdn-hybrid-1.3b -> gdn-hybrid-tiny
        args.preset = [p if p.endswith("tiny") else p.rsplit("-", 1)[0] + "-tiny" for p in args.preset]
        if args.tokens_per_device == 32768:
            args.tokens_per_device = 256
        args.granularity = min(args.granularity, 128)
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
        args.dtype = "float32"
    return args


def loss_chunks_for(args, local_tokens: int, sp: int) -> int:
    if args.loss_chunks != "auto":
        return int(args.loss_chunks)
    chunks = 1
    while local_tokens // chunks > 8192 and (local_tokens // (2 * chunks)) * 2 * chunks == local_tokens:
        chunks *= 2
    return chunks


HEAD = (
    f"{'preset':>16} {'params':>7} {'sp':>3} {'seq_len':>9} {'tok/dev':>8} {'step ms':>9} {'tok/s/dev':>10} "
    f"{'TFLOP/s':>8} {'MFU':>6} {'vs sp1':>7} {'mem GB':>7} {'compile s':>9} {'pipelined ms':>12}"
)


def format_row(r: dict) -> str:
    """One table line (the columns of ``HEAD``)."""
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    vs = f"{r['per_device_vs_sp1']:.3f}" if r.get("per_device_vs_sp1") is not None else "n/a"
    mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] else "n/a"
    return (
        f"{r['preset']:>16} {r['params'] / 1e9:>6.3f}B {r['sp']:>3} {r['seq_len']:>9} {r['tokens_per_device']:>8} "
        f"{r['step_ms']:>9.1f} "
        f"{r['tokens_per_s_per_device']:>10.0f} {r['model_tflops_per_s_per_device']:>8.1f} {mfu:>6} {vs:>7} "
        f"{mem:>7} {r['compile_s']:>9.1f} {r['step_ms_pipelined']:>12.1f}"
    )


def is_oom(err: Exception) -> bool:
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM", "Allocator"))


def build_trainer(args, *, preset: str, sp: int, local_tokens: int, remat: str, **model_overrides):
    """The ``Trainer`` of one row (nothing initialised or compiled): the step every row times.

    ``model_overrides`` go to ``get_config`` after the flags' own fields (e.g. ``n_layers``;
    ``benchmarks/memory_report.py`` compiles shallower models with it).
    """
    import jax

    from models.config import get_config
    from models.dataset import DataConfig
    from models.train import MeshConfig, OptimConfig, RunConfig, TrainConfig, Trainer

    n = sp * args.dp * args.tp
    devices = jax.devices()[:n]
    if len(devices) < n:
        raise SystemExit(f"need {n} devices for sp={sp} dp={args.dp} tp={args.tp}, have {len(jax.devices())}")
    chunks = loss_chunks_for(args, local_tokens, sp)
    flags = ("dtype", "scan_layers", "mlp_chunk", "split_projections", "gate_lower_bound")  # ModelConfig fields
    model_fields = {name: getattr(args, name, None) for name in flags if getattr(args, name, None) is not None}
    model_fields |= model_overrides
    config = TrainConfig(
        model=get_config(preset, **model_fields),
        mesh=MeshConfig(
            dp=args.dp,
            sp=sp,
            tp=args.tp,
            fsdp=args.fsdp,
            shard_optimizer_over_data=args.shard_optimizer_over_data,
            strategy=args.strategy,
            impl=args.impl,
        ),
        optim=OptimConfig(lr=1e-4, warmup_steps=10),
        data=DataConfig(source="synthetic", batch_size=args.dp, seq_len=local_tokens * sp),
        run=RunConfig(steps=1000, remat=remat, loss_chunks=chunks, progress=False, peak_tflops=args.peak_tflops),
    )
    return Trainer(config, devices=devices, log=lambda *a: None)


def run_config(
    args, *, preset: str, sp: int, local_tokens: int, remat: str, iters: int, warmup: int, profile_dir=None
) -> dict:
    """Build, compile and time one training step; returns a result row (raises on failure)."""
    import jax

    trainer = build_trainer(args, preset=preset, sp=sp, local_tokens=local_tokens, remat=remat)
    n, seq_len, chunks = trainer.n_devices, local_tokens * sp, trainer.config.run.loss_chunks
    devices = jax.devices()[:n]
    state = trainer.init_state()
    batch = trainer.data.batch("train", 0, trainer.batch_sharding)
    t0 = time.perf_counter()
    step = trainer.train_step.lower(state, *batch).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        state, metrics = step(state, *batch)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    # the same steps back to back, blocking once at the end, as a training loop that does not read
    # the loss every step runs them (host dispatch of step n+1 overlaps step n on the device)
    t0 = time.perf_counter()
    for _ in range(iters):
        state, metrics = step(state, *batch)
    jax.block_until_ready(metrics["loss"])
    pipelined_s = (time.perf_counter() - t0) / iters
    loss = float(metrics["loss"])
    if loss != loss:
        raise FloatingPointError("the step produced a NaN loss")
    step_s = statistics.median(times)
    tok_s_dev = args.dp * seq_len / step_s / n
    peak = trainer.peak_flops
    mem = None
    try:
        stats = devices[0].memory_stats() or {}
        mem = stats.get("peak_bytes_in_use")
    except Exception:  # not every backend reports memory
        mem = None
    row = {
        "preset": preset,
        "sp": sp,
        "dp": args.dp,
        "tp": args.tp,
        "devices": n,
        "seq_len": seq_len,
        "tokens_per_device": local_tokens,
        "remat": remat,
        "scan_layers": args.scan_layers,
        "mlp_chunk": args.mlp_chunk,
        "split_projections": trainer.config.model.split_projections,
        "gate_lower_bound": trainer.config.model.gate_lower_bound,
        "loss_chunks": chunks,
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "step_ms_all": [1e3 * t for t in times],
        "step_ms_pipelined": 1e3 * pipelined_s,
        "tokens_per_s_per_device": tok_s_dev,
        "model_tflops_per_s_per_device": tok_s_dev * trainer.flops_per_token / 1e12,
        "mfu": tok_s_dev * trainer.flops_per_token / peak if peak else None,
        "peak_memory_gb": mem / 2**30 if mem else None,
        "params": trainer.n_params,
        "loss": loss,
    }
    if profile_dir:
        from models.profile import profile_into

        run = functools.partial(next_state, step, batch)
        title = f"sp={sp}, {seq_len} tokens, remat {remat}"
        state = profile_into(row, run, state, calls=args.profile_iters, logdir=profile_dir, title=title)
    del trainer, state, step, batch, metrics
    return row


def next_state(step, batch, state):
    """The train state after one call of the compiled step."""
    return step(state, *batch)[0]


def try_config(args, **kw) -> tuple[bool, dict | str]:
    import jax

    try:
        return True, run_config(args, **kw)
    except Exception as e:  # out of memory shows up as different exception types across versions
        if not is_oom(e):
            raise
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        gc.collect()
        jax.clear_caches()


def search_longest(args, preset: str, sp: int) -> dict:
    """Largest per-device token count (a multiple of ``granularity``) whose training step runs."""
    good, bad, tried = None, None, []
    n = args.tokens_per_device
    while n <= args.max_tokens:
        ok, res = try_config(args, preset=preset, sp=sp, local_tokens=n, remat=args.search_remat, iters=1, warmup=1)
        tried.append({"tokens_per_device": n, "ok": ok, "step_ms": res["step_ms"] if ok else None})
        print(f"  {preset} sp={sp} {n:>9} tokens/device: {'ok' if ok else 'out of memory'}", flush=True)
        if not ok:
            bad = n
            break
        good = res
        n *= 2
    if good is None:
        return {"preset": preset, "sp": sp, "longest_tokens_per_device": None, "tried": tried}
    lo, hi = good["tokens_per_device"], bad
    while hi is not None and hi - lo > args.granularity:
        mid = (lo + hi) // 2 // args.granularity * args.granularity
        if mid <= lo:
            break
        ok, res = try_config(args, preset=preset, sp=sp, local_tokens=mid, remat=args.search_remat, iters=1, warmup=1)
        tried.append({"tokens_per_device": mid, "ok": ok, "step_ms": res["step_ms"] if ok else None})
        print(f"  {preset} sp={sp} {mid:>9} tokens/device: {'ok' if ok else 'out of memory'}", flush=True)
        if ok:
            lo, good = mid, res
        else:
            hi = mid
    return {
        "preset": preset,
        "sp": sp,
        "longest_tokens_per_device": lo,
        "longest_seq_len": lo * sp,
        "capped_by_max_tokens": bad is None,
        "remat": args.search_remat,
        "step_ms": good["step_ms"],
        "peak_memory_gb": good["peak_memory_gb"],
        "tried": tried,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from models.cli import set_default_xla_flags

    set_default_xla_flags()  # the XLA flags lasp-train runs with (the latency-hiding scheduler), before jax starts
    from benchmarks.delta_rule_sp import sp_splits

    with sp_splits(args.delta_sp_splits):  # active while the steps are traced
        return _main(args)


def _main(args) -> int:
    import jax

    dev = jax.devices()[0]
    header = {
        "device": dev.device_kind,
        "platform": dev.platform,
        "n_devices_available": len(jax.devices()),
        "jax": jax.__version__,
        "preset": args.preset,
        "dtype": args.dtype,
        "strategy": args.strategy,
        "fsdp": args.fsdp,
        "shard_optimizer_over_data": args.shard_optimizer_over_data,
        "scan_layers": args.scan_layers,
        "split_projections": args.split_projections,
        "delta_sp_splits": args.delta_sp_splits,
        "smoke": args.smoke,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # e.g. the latency-hiding scheduler (notes/sp_overhead.md)
    }
    try:
        import flax

        header["flax"] = flax.__version__
    except ImportError:
        pass
    n_avail = header["n_devices_available"]
    print(f"# train step: {' '.join(args.preset)} on {dev.device_kind} ({n_avail} devices), jax {jax.__version__}")
    rows = []

    def save(longest=()):
        if args.json:  # rewritten after every row: a run cut short by a time limit keeps what finished
            with open(args.json, "w") as fh:
                json.dump({**header, "rows": rows, "longest": list(longest)}, fh, indent=2)

    throughput_rows = not (args.search_longest and args.search_only)
    for preset in args.preset if throughput_rows else ():
        for sp in args.sp:
            row = run_config(
                args,
                preset=preset,
                sp=sp,
                local_tokens=args.tokens_per_device,
                remat=args.remat,
                iters=args.iters,
                warmup=args.warmup,
                profile_dir=args.profile and os.path.join(args.profile, f"{preset}_sp{sp}"),
            )
            base = next((b for b in rows if b["preset"] == preset and b["sp"] == 1), None)
            if base:
                row["per_device_vs_sp1"] = row["tokens_per_s_per_device"] / base["tokens_per_s_per_device"]
            rows.append(row)
            print("row: " + format_row(row), flush=True)  # as it finishes, before the next one compiles
            save()
            gc.collect()
            jax.clear_caches()
    for r in rows:  # an sp = 1 row listed after the sp > 1 rows of its preset
        base = next((b for b in rows if b["preset"] == r["preset"] and b["sp"] == 1), None)
        r["per_device_vs_sp1"] = r["tokens_per_s_per_device"] / base["tokens_per_s_per_device"] if base else None

    if rows:
        layers = "scanned" if args.scan_layers else "unrolled"
        print(f"\nremat {args.remat}, dp {args.dp}, tp {args.tp}, layers {layers}")
        print(HEAD)
        print("-" * len(HEAD))
        for r in rows:
            print(format_row(r))
    longest = []
    if args.search_longest:
        print(f"\nlongest sequence per device (remat {args.search_remat}):")
        for preset in args.preset:
            for sp in args.sp:
                res = search_longest(args, preset, sp)
                longest.append(res)
                capped = " (cap reached)" if res.get("capped_by_max_tokens") else ""
                longest_local, longest_seq = res["longest_tokens_per_device"], res.get("longest_seq_len")
                line = f"{preset} sp={sp}: {longest_local} tokens per device, sequence {longest_seq}{capped}"
                print(line, flush=True)
                save(longest)
    save(longest)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
