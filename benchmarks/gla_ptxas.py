"""Registers, spills and shared memory of the per-channel Pallas kernels (GLA, or KDA with
``--op kda``; Gated DeltaNet's with ``--op gdn``), without a GPU.

    # 1. the project's env: lower forward+backward for CUDA on the CPU, write each kernel's Triton IR
    JAX_PLATFORMS=cpu PYTHONPATH=$PWD .venv/bin/python benchmarks/gla_ptxas.py dump /tmp/gla_ir default
    JAX_PLATFORMS=cpu PYTHONPATH=$PWD .venv/bin/python benchmarks/gla_ptxas.py dump /tmp/gla_ir split \\
        '{"split_grads": true, "recompute_dz": true}'
    # 2. a throwaway env with pip's triton 3.6 (it brings ptxas): compile each for sm_90a, ptxas -v
    python3 -m venv /tmp/tritonvenv && /tmp/tritonvenv/bin/pip install triton==3.6.0
    /tmp/tritonvenv/bin/python benchmarks/gla_ptxas.py compile /tmp/gla_ir/*.ttir

``dump`` traces ``value_and_grad`` of ``pallas_triton_channel.linear_attention`` at ``--shape`` (default
the benchmark's (1, 32768, 16, 128), bf16 q/k/v (``--dtype``), float32 g) with the shape's ``default_channel_config``
and the JSON overrides, the Triton lowering pointed at an abstract H100 (as
``tests/pallas_kernels/test_gla_pallas.py``'s lowering test), and writes (``--op kda``: the gated delta
rule's kernels with per-channel gates, ``gated_delta_rule.config.default_config`` and its
``BlockConfig`` overrides, β float32) ``<tag>__<kernel>.ttir`` with
its launch parameters beside it (``.json``). ``compile`` runs triton's own pipeline from that IR for
sm_90a with those warps and stages and prints one JSON row per kernel: registers per thread, spill
stores / loads (bytes per thread), stack frame, shared memory (bytes per program; ``over_limit``: more
than sm_90's 227 KB, so the launch fails) and the count of
``wgmma`` / ``mma.sync`` instructions in the PTX. Nothing runs on a GPU: occupancy follows from
registers × threads and shared memory, time does not (``benchmarks/gla_sweep.py`` times configs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

SM90_SHARED_LIMIT = 232448  # bytes of shared memory one program may use on sm_90 (227 KB)


def dump(out: str, tag: str, overrides: dict, shape, op: str = "gla", dtype: str = "bfloat16") -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import gpu_info
    from jax._src.pallas.triton import pallas_call_registration as registration

    from pallas_kernels.linear_attention import pallas_triton_channel
    from pallas_kernels.linear_attention.config import default_channel_config

    info = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    registration.gpu_info_lib.get_gpu_info = lambda: info
    texts, metas = [], []
    lower, custom_call = registration.lowering.lower_jaxpr_to_triton_module, registration.mlir.custom_call

    def lower_and_keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    def call_and_keep(*args, **kwargs):
        config = kwargs.get("backend_config")
        if isinstance(config, dict) and "num_warps" in config:
            value = lambda name: int(str(config[name]).split(":")[0])  # noqa: E731 - "8 : i32" attributes
            name = str(config["name"]).strip('"')
            metas.append({"name": name, "num_warps": value("num_warps"), "num_stages": value("num_stages")})
        return custom_call(*args, **kwargs)

    registration.lowering.lower_jaxpr_to_triton_module = lower_and_keep
    registration.mlir.custom_call = call_and_keep
    b, t, h, d = shape
    x, g = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)), jax.ShapeDtypeStruct(shape, jnp.float32)
    if op in ("kda", "gdn"):
        from pallas_kernels.gated_delta_rule import pallas_triton
        from pallas_kernels.gated_delta_rule.config import default_config

        per_channel = op == "kda"
        cfg = default_config(
            batch=b,
            value_heads=h,
            seq_len=t,
            value_dim=d,
            key_dim=d,
            interpret=False,
            per_channel=per_channel,
            dtype=x.dtype,
        )
        g = g if per_channel else jax.ShapeDtypeStruct((b, t, h), jnp.float32)  # GDN: one log gate per token
        op_fn, args = pallas_triton.gated_delta_rule, (x, x, x, jax.ShapeDtypeStruct((b, t, h), jnp.float32))
    else:
        cfg = default_channel_config(
            batch=b, heads=h, seq_len=t, value_dim=d, interpret=False, dtype=x.dtype, key_dim=d
        )
        op_fn, args = pallas_triton_channel.linear_attention, (x, x, x)
    cfg = dataclasses.replace(cfg, **overrides)

    def loss(*inputs):
        o, s = op_fn(*inputs[:-1], g=inputs[-1], config=cfg)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    argnums = tuple(range(len(args) + 1))
    jax.jit(jax.value_and_grad(loss, argnums=argnums)).trace(*args, g).lower(lowering_platforms=("cuda",))
    os.makedirs(out, exist_ok=True)
    seen: dict[str, int] = {}
    for text, meta in zip(texts, metas, strict=True):
        # a kernel lowered twice (the two branches of the gates' cond) keeps both: the second as name_2
        seen[meta["name"]] = seen.get(meta["name"], 0) + 1
        suffix = "" if seen[meta["name"]] == 1 else f"_{seen[meta['name']]}"
        path = os.path.join(out, f"{tag}__{meta['name']}{suffix}")
        with open(path + ".ttir", "w") as f:
            f.write(text)
        with open(path + ".json", "w") as f:
            json.dump({**meta, "config": dataclasses.asdict(cfg), "shape": list(shape)}, f)
        print(path + ".ttir", meta)


def compile_report(paths: list[str]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for path in sorted(paths):
        with open(path[: -len(".ttir")] + ".json") as f:
            meta = json.load(f)
        options = {"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}
        kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=options)
        ptx = kernel.asm["ptx"]
        ptx_path = path[: -len(".ttir")] + ".ptx"
        with open(ptx_path, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", os.devnull], capture_output=True, text=True)
        report = run.stderr + run.stdout

        def number(pattern, group=1, text=report):
            found = re.search(pattern, text)
            return int(found.group(group)) if found else None

        spills = r"(\d+) bytes spill stores, (\d+) bytes spill loads"
        row = {
            "kernel": os.path.basename(path)[: -len(".ttir")],
            **options,
            "registers": number(r"Used (\d+) registers"),
            "spill_stores": number(spills, 1),
            "spill_loads": number(spills, 2),
            "stack": number(r"(\d+) bytes stack frame"),
            "shared": kernel.metadata.shared,
            # past the opt-in limit the launch fails (H200, session 19: float32 KDA's former forward
            # state pass, "requested 253952, available: 232448", the number this script gave)
            "over_limit": kernel.metadata.shared > SM90_SHARED_LIMIT,
            "wgmma": ptx.count("wgmma.mma_async"),
            "mma": ptx.count("mma.sync"),
        }
        print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="Triton IR of the six (or seven) kernels, lowered for CUDA on the CPU")
    d.add_argument("out")
    d.add_argument("tag")
    d.add_argument("overrides", nargs="?", default="{}", help="JSON ChannelConfig (BlockConfig for kda) overrides")
    d.add_argument("--op", default="gla", choices=["gla", "kda", "gdn"], help="the GLA kernels, KDA's or GDN's")
    d.add_argument("--shape", default="1,32768,16,128", help="B,T,H,D")
    d.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="q, k, v")
    c = sub.add_parser("compile", help="triton 3.6 + ptxas -v on dumped .ttir files")
    c.add_argument("paths", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "dump":
        shape = tuple(map(int, args.shape.split(",")))
        dump(args.out, args.tag, json.loads(args.overrides), shape, args.op, args.dtype)
    else:
        compile_report(args.paths)


if __name__ == "__main__":
    main()
