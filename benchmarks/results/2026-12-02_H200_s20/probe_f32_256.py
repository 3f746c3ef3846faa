"""Session 20, call C: which float32 GDN configs at head dim 256 fit an H200's shared memory.
Forward alone, then forward+backward, per candidate override of the default config; prints the
requested bytes of a failing launch and, for those that run, the error against the XLA path."""

import dataclasses
import re
import sys

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import pallas_triton, xla
from pallas_kernels.gated_delta_rule.config import default_config

b, t, h, d = 1, 512, 2, 256
keys = jax.random.split(jax.random.PRNGKey(0), 6)
q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32) / 16
k = jax.random.normal(keys[1], (b, t, h, d), jnp.float32)
k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
v = jax.random.normal(keys[2], (b, t, h, d), jnp.float32)
beta = jax.nn.sigmoid(jax.random.normal(keys[3], (b, t, h)))
g = -0.1 * jax.nn.softplus(jax.random.normal(keys[4], (b, t, h)))
cot = jax.random.normal(keys[5], (b, t, h, d), jnp.float32)
base = default_config(batch=b, value_heads=h, seq_len=t, value_dim=d, key_dim=d, interpret=False, dtype=jnp.float32)
print("default", base, flush=True)


def loss(fn):
    def f(q, k, v, beta, g):
        o, _ = fn(q, k, v, beta, g)
        return jnp.sum(o * cot)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))


with jax.default_matmul_precision("highest"):
    ref = loss(lambda q, k, v, beta, g: xla.gated_delta_rule(q, k, v, beta, g, scale=d**-0.5))
for spec in sys.argv[1:]:
    over = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in spec.split(",") if kv}
    cfg = dataclasses.replace(base, **over)

    def fn(q, k, v, beta, g, cfg=cfg):
        return pallas_triton.gated_delta_rule(q, k, v, beta, g=g, config=cfg)

    for what, call in (("fwd", jax.jit(fn)), ("fwd+bwd", loss(fn))):
        try:
            out = jax.block_until_ready(call(q, k, v, beta, g))
            msg = "ok"
            if what == "fwd+bwd":
                with jax.default_matmul_precision("highest"):
                    want = ref(q, k, v, beta, g)
                errs = [
                    float(jnp.linalg.norm(a - w) / (jnp.linalg.norm(w) + 1e-30))
                    for a, w in zip(jax.tree.leaves(out), jax.tree.leaves(want))
                ]
                msg += f" max rel err vs xla {max(errs):.2e}"
        except Exception as e:  # noqa: BLE001
            m = re.search(r"requested (\d+)", str(e))
            msg = f"FAIL requested {m.group(1)}" if m else f"FAIL {str(e)[:200]}"
        print(f"{spec or 'default'} | {what} | {msg}", flush=True)
