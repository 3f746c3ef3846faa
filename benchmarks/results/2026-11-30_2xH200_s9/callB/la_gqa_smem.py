"""Which linear-attention kernel config compiles (and how fast) under grouped heads at D = 128
(linear-llama3-1b's layer: B=1, T=32768, H=16, Hk=4, no decay, bf16): fwd+bwd ms per config."""

import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
from benchmarks import timing  # noqa: E402
from pallas_kernels.linear_attention import pallas_triton  # noqa: E402
from pallas_kernels.linear_attention.config import BlockConfig  # noqa: E402

b, t, h, hk, d = 1, 32768, 16, 4, 128
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16) * 0.1
k = jax.random.normal(keys[1], (b, t, hk, d), jnp.bfloat16) * 0.1
v = jax.random.normal(keys[2], (b, t, hk, d), jnp.bfloat16)
do = jax.random.normal(keys[3], (b, t, h, d), jnp.bfloat16)
for groups in (hk, h):
    kk, vv = (k, v) if groups == hk else (jnp.repeat(k, h // hk, 2), jnp.repeat(v, h // hk, 2))
    for name, cfg in [
        ("default", None),
        ("stages_bwd2", BlockConfig(num_stages_bwd=2)),
        ("split_dkdv", BlockConfig(split_dkdv=True)),
        ("stages_bwd1", BlockConfig(num_stages_bwd=1)),
    ]:

        def fwd_bwd(q, k, v, do, cfg=cfg):
            return jax.vjp(lambda *a: pallas_triton.linear_attention(*a, config=cfg)[0], q, k, v)[1](do)

        f = jax.jit(fwd_bwd)
        try:
            ms = timing.median_ms(f, q, kk, vv, do, reps=10, warmup=2)
            print(f"Hk={groups} {name}: {ms:.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"Hk={groups} {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
