"""Softmax attention under sequence parallelism (LASP-2H allgather, ring, zig-zag ring, TokenRing) against one GPU.

    python benchmarks/hybrid.py                      # GPUs: sp=2, 32K tokens per GPU, bf16
    python benchmarks/hybrid.py --smoke              # CPU, 8 fake devices, tiny shapes, checks the outputs agree
    python benchmarks/hybrid.py --sp 2 4 --json out.json
    python benchmarks/hybrid.py --strategies allgather zigzag_ring tokenring tokenring_contiguous
    python benchmarks/hybrid.py --impl cudnn         # the softmax layer's block compute (default auto: Pallas
                                                     # kernels on a GPU, cuDNN for the one-device rows)
    python benchmarks/hybrid.py --impl cudnn_blocks  # cuDNN's fused kernels as every strategy's block pairs

For each sequence-parallel size and strategy it times one jit-compiled step (median of --reps
after a warm-up) and compares it with one device running the same step at the local shape (the
tokens one GPU holds under sp) and at the global shape (the whole sequence; may not fit). For
causal softmax attention the last rank attends to every key, so even perfect scaling costs
``(2·sp − 1)`` times the local-shape single-device time; the global-shape ratio is the speed-up.

Workloads. A workload is ``make(cfg, mesh, strategy) -> (step, args)``: ``step`` is jit-compiled
and ``step(*args)`` runs one forward+backward; ``mesh`` is None on one device. ``softmax`` (the
default) is one softmax-attention layer, fwd+bwd of ``<o, do>``. Hybrid model steps register here
later (``WORKLOADS["tnl-hybrid"] = ...``) and get the same table. Besides time, each row has the
compiled program's collectives (op counts and bytes of their results; ops inside a loop body,
as the ring's, are counted once) and its temporary memory from XLA's memory analysis.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable

if "--smoke" in sys.argv:  # before jax initialises
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_ms  # noqa: E402
from lasp_jax import softmax_attention  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 1
    tokens_per_device: int = 32768
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    impl: str = "auto"
    block_size: int = 1024


SMOKE = Config(batch=1, tokens_per_device=64, heads=4, kv_heads=2, head_dim=16, dtype="float32", block_size=32)

Step = tuple[Callable, tuple]
Workload = Callable[[Config, Mesh | None, str, int], Step]


def softmax_workload(cfg: Config, mesh: Mesh | None, strategy: str, tokens: int) -> Step:
    """One causal softmax-attention layer, fwd+bwd of <o, do> w.r.t. q, k, v."""
    dtype = jnp.dtype(cfg.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    b, h, hk, d = cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim
    q = jax.random.normal(keys[0], (b, tokens, h, d), dtype)
    k = jax.random.normal(keys[1], (b, tokens, hk, d), dtype)
    v = jax.random.normal(keys[2], (b, tokens, hk, d), dtype)
    do = jax.random.normal(keys[3], (b, tokens, h, d), dtype)
    # --impl auto|pallas|cudnn_blocks|xla|cudnn|dpa_xla; the rings and TokenRing have no dense-mask
    # cuDNN path (they merge float32 block log-sum-exps), so "cudnn"/"dpa_xla" fall back to auto there
    # (the Pallas kernels on a GPU); one device keeps auto (cuDNN's own causal mask) under
    # "cudnn_blocks", so the one-GPU rows stay the cuDNN baseline
    ring_family = not strategy.startswith("allgather")
    impl = "auto" if ring_family and cfg.impl in ("cudnn", "dpa_xla") else cfg.impl
    impl = "auto" if mesh is None and impl == "cudnn_blocks" else impl
    # "<strategy>_contiguous": without the causal load balancing (balance=False)
    balance = False if strategy.endswith("_contiguous") else None
    strategy = "allgather" if mesh is None else strategy.removesuffix("_contiguous")  # ignored on one device
    if mesh is not None:
        sharding = NamedSharding(mesh, PartitionSpec(None, "sp"))
        q, k, v, do = (jax.device_put(x, sharding) for x in (q, k, v, do))

    def loss(q, k, v, do):
        o = softmax_attention(
            q, k, v, mesh=mesh, strategy=strategy, impl=impl, block_size=cfg.block_size, balance=balance
        )
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

    @jax.jit
    def step(q, k, v, do):
        grads, o = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, do)
        return o, grads

    return step, (q, k, v, do)


def hybrid_train_workload(family: str) -> Workload:
    """A hybrid model's train step (models/): forward, backward and an AdamW update of every parameter.

    The model is one hybrid group of 4 layers (3 linear, the 4th softmax) of the ``family`` with
    ``d_model = heads · head_dim`` (TNL: ``heads`` key/value heads; Linear-Llama3: ``kv_heads``),
    GLU width 8/3·d, byte vocabulary 256 (so the step measures the layers, not the head), float32
    parameters and ``cfg.dtype`` compute. ``strategy`` picks both the linear layers' LASP strategy
    and the softmax layers' one (``allgather`` = LASP-2 / LASP-2H, ``ring`` = LASP / RingAttention);
    ``zigzag_ring`` and ``tokenring`` are softmax strategies only, their linear layers run allgather.
    The step's first output is the per-token loss ``[B, T]``, compared with one device's.
    """

    def make(cfg: Config, mesh: Mesh | None, strategy: str, tokens: int) -> Step:
        if strategy.endswith("_contiguous"):
            raise ValueError(f"{strategy} is a softmax-workload strategy; models balance their softmax layers")
        import optax
        from flax import nnx

        from models.config import get_config
        from models.layers import LaspContext
        from models.model import LanguageModel

        d = cfg.heads * cfg.head_dim
        kv = cfg.heads if family == "tnl" else cfg.kv_heads
        model_cfg = get_config(
            f"{family}-hybrid-tiny",
            d_model=d,
            n_heads=cfg.heads,
            n_kv_heads=kv,
            n_layers=4,
            softmax_every=4,
            ffn_dim=-(-(8 * d // 3) // 256) * 256,
            dtype=cfg.dtype,
        )
        assert model_cfg.types == ("linear", "linear", "linear", "softmax")
        ctx = LaspContext(
            mesh=mesh,
            seq_axis="sp",
            strategy="allgather" if mesh is None or strategy not in ("allgather", "ring") else strategy,
            softmax_strategy="allgather" if mesh is None else strategy,
        )
        graphdef, params = nnx.split(LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
        optimizer = optax.adamw(1e-4)
        opt_state = optimizer.init(params)
        ids = jax.random.randint(jax.random.key(1), (cfg.batch, tokens + 1), 0, model_cfg.vocab_size)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        if mesh is not None:
            inputs, targets = (
                jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "sp"))) for x in (inputs, targets)
            )
            replicated = NamedSharding(mesh, PartitionSpec())
            params, opt_state = jax.device_put((params, opt_state), replicated)

        def loss(params, inputs, targets):
            model = nnx.merge(graphdef, params)
            logits = model.logits(model.hidden(inputs, ctx)[0])
            nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
            return jnp.mean(nll), nll

        @jax.jit
        def step(params, opt_state, inputs, targets):
            grads, nll = jax.grad(loss, has_aux=True)(params, inputs, targets)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return nll, optax.apply_updates(params, updates), opt_state

        return step, (params, opt_state, inputs, targets)

    return make


WORKLOADS: dict[str, Workload] = {
    "softmax": softmax_workload,
    "tnl-hybrid": hybrid_train_workload("tnl"),
    "linear-llama3-hybrid": hybrid_train_workload("linear_llama3"),
}

_COLLECTIVE = re.compile(
    r"=\s*(\(?[a-z0-9\[\],{}:\s/#TS()]*?\)?)\s+(all-gather|reduce-scatter|collective-permute|all-reduce|all-to-all)"
    r"(?:-start)?\("
)
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Collective ops in compiled HLO text: count and bytes of their results (loop bodies once)."""
    out: dict[str, dict[str, int]] = {}
    for shapes, op in _COLLECTIVE.findall(hlo):
        nbytes = sum(
            _BYTES.get(t, 8) * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
            for t, dims in _SHAPE.findall(shapes)
        )
        entry = out.setdefault(op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    return out


def measure(
    workload: Workload, cfg: Config, mesh: Mesh | None, strategy: str, tokens: int, reps: int, profile_dir=None
) -> dict:
    """One row: compile, memory, collectives, median time, sampled outputs; with ``profile_dir`` also
    the device time of three traced steps by kernel (``models.profile``), printed and in the row."""
    row: dict = {"strategy": strategy, "tokens": tokens}
    try:
        step, args = workload(cfg, mesh, strategy, tokens)
        compiled = step.lower(*args).compile()
        memory = compiled.memory_analysis()
        row["temp_mib"] = None if memory is None else round(memory.temp_size_in_bytes / 2**20, 1)
        row["collectives"] = collectives(compiled.as_text())
        row["ms"] = median_ms(step, *args, reps=reps)
        if profile_dir:
            from models.profile import profile_into

            title = f"{strategy}, {tokens} tokens"
            profile_into(row, lambda _: step(*args), None, calls=3, logdir=profile_dir, title=title)
        out = step(*args)[0]  # 256 tokens spread over every rank's block, to compare with one device
        row["out"] = np.asarray(jax.device_get(out[:, :: max(1, tokens // 256)].astype(jnp.float32)))
    except Exception as err:  # noqa: BLE001 (an OOM at the global shape is a result, not a crash)
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, 8 fake devices, tiny shapes")
    parser.add_argument("--workload", default="softmax", choices=sorted(WORKLOADS))
    parser.add_argument("--sp", type=int, nargs="+", default=[2], help="sequence-parallel sizes")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["allgather", "ring", "zigzag_ring", "tokenring"],
        choices=[
            "allgather",
            "allgather_contiguous",
            "ring",
            "ring_contiguous",
            "zigzag_ring",
            "tokenring",
            "tokenring_contiguous",
        ],
        help="*_contiguous (softmax workload only): without causal load balancing",
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--profile", metavar="DIR", help="trace three steps of every row, print device time by kernel")
    for field in dataclasses.fields(Config):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None)
    args = parser.parse_args()
    base = SMOKE if args.smoke else Config()
    cfg = dataclasses.replace(
        base, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    )
    if args.smoke:
        args.sp, args.reps = sorted(set(args.sp) | {2, 4}), min(args.reps, 2)
    workload = WORKLOADS[args.workload]
    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} x {devices[0].device_kind}, {cfg}")

    rows = []

    def add(row):  # echoed at once, so a run cut short by a time limit still shows its finished rows
        rows.append(row)
        print(
            f"  sp={row['sp']} {row['strategy']} {row['shape']}: "
            + (f"{row['ms']:.2f} ms" if "ms" in row else row.get("error", "?")),
            flush=True,
        )

    local = cfg.tokens_per_device
    prof = lambda name: args.profile and os.path.join(args.profile, name)  # noqa: E731
    single_local = measure(workload, cfg, None, "single", local, args.reps, prof("single_local"))
    add(single_local | {"sp": 1, "shape": "local"})
    for sp in args.sp:
        if sp > len(devices):
            print(f"skipping sp={sp}: only {len(devices)} devices")
            continue
        mesh = Mesh(np.array(devices[:sp]), ("sp",))
        single_global = measure(workload, cfg, None, "single", local * sp, args.reps, prof(f"single_x{sp}"))
        add(single_global | {"sp": 1, "shape": f"global (sp={sp})"})
        for strategy in args.strategies:
            row = measure(workload, cfg, mesh, strategy, local * sp, args.reps, prof(f"{strategy}_sp{sp}"))
            row |= {"sp": sp, "shape": "sharded"}
            if "ms" in row:
                row["x_single_local"] = row["ms"] / single_local["ms"] if "ms" in single_local else None
                row["x_single_global"] = row["ms"] / single_global["ms"] if "ms" in single_global else None
                if "out" in single_global:  # the sharded step must compute what one device computes
                    row["max_abs_diff_vs_single"] = float(np.abs(row["out"] - single_global["out"]).max())
            add(row)

    print(
        f"\n{'sp':>3} {'strategy':>20} {'tokens':>8} {'ms':>10} {'÷1dev local':>12} {'÷1dev global':>13} "
        f"{'temp MiB':>9}  collectives (count, MiB; loop bodies once)"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['sp']:>3} {r['strategy']:>20} {r['tokens']:>8} {'—':>10}  {r['error']}")
            continue
        coll = ", ".join(f"{op} {c['count']}×/{c['bytes'] / 2**20:.1f}" for op, c in r["collectives"].items())
        ratio = lambda key, r=r: f"{r[key]:.2f}" if r.get(key) is not None else "—"
        print(
            f"{r['sp']:>3} {r['strategy']:>20} {r['tokens']:>8} {r['ms']:10.2f} {ratio('x_single_local'):>12} "
            f"{ratio('x_single_global'):>13} {r['temp_mib']!s:>9}  {coll}"
        )
    for r in rows:
        r.pop("out", None)
    if args.smoke:
        diffs = [r["max_abs_diff_vs_single"] for r in rows if "max_abs_diff_vs_single" in r]
        assert diffs and max(diffs) < 1e-4, f"sharded output differs from one device: {diffs}"
        print(f"smoke: every strategy matches one device (max |diff| {max(diffs):.1e})")
    if args.json:
        meta = {"jax": jax.__version__, "devices": f"{len(devices)} x {devices[0].device_kind}"}
        with open(args.json, "w") as f:
            json.dump(
                {"config": dataclasses.asdict(cfg), "workload": args.workload} | meta | {"rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
