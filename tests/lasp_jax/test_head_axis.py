"""Tensor parallelism over heads (``head_axis=``) in every sequence-parallel layer.

On a (dp=2, sp=2, tp=2) mesh of the 8 fake CPU devices, heads sharded on ``tp``: for
``lasp_attention``, ``softmax_attention`` and ``lasp_gated_delta_rule``, each impl (XLA and
interpret-mode Pallas), the output and every gradient (q, k, v, gates, initial state) equal the
single-device float64 op block by block of heads, the output keeps its head sharding, and the
compiled forward+backward program has no collective whose devices differ only in their tp
coordinate (nothing crosses the head axis). Also: the per-shard function inside a user's checked
``shard_map`` over all three axes, and the head-axis errors.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lasp_jax import lasp_attention, lasp_attention_shard, lasp_gated_delta_rule, softmax_attention
from pallas_kernels import gated_delta_rule, linear_attention
from pallas_kernels.flash_attention.reference import causal_attention
from tests.helpers import rel_err, tol, x64

B, T, D = 2, 32, 8  # local shard: 1 row, 16 tokens
H, HK = 4, 2  # (linear, softmax) query and key/value heads: one query group of 2 per tp rank
DH, DHV = 2, 4  # (delta rule) q/k heads and value heads
# XLA's cheap optimisation level: each case is one small program run once, its compile is the cost
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOKENS, STATE, PER_HEAD = P("dp", "sp", "tp"), P("dp", "tp"), P("tp")
HEAD_DIM = {"g_gamma": 0, "initial_state": 1, "final_state": 1}  # every other array: [B, T, heads, ...]


def tp_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("dp", "sp", "tp"))


# ---- collectives in compiled HLO ----------------------------------------------------------------

_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\(")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[[^\]]*\](?:\s*device_ids=\S+)?\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_LIST_GROUPS = re.compile(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,]*\},?)*)\}")


def device_groups(line: str, n_devices: int) -> list[list[int]] | tuple[str, ...]:
    """The device groups of one collective's HLO line: a list of logical-id groups (explicit or iota
    replica groups, source-target pairs), or the grouped mesh-axis names (the mesh-axes form)."""
    if m := _MESH_GROUPS.search(line):
        return tuple(re.sub(r":.*", "", a.strip().strip("'")) for a in m.group(1).split(",") if a.strip())
    if m := _IOTA_GROUPS.search(line):
        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(n_devices).reshape([int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape).tolist()
    if m := _LIST_GROUPS.search(line):
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
        return groups or [list(range(n_devices))]  # replica_groups={}: every device
    raise AssertionError(f"no device groups recognised in {line!r}")


def collectives_across(hlo: str, mesh: Mesh, axis: str) -> list[str]:
    """The collectives of compiled ``hlo`` with two distinct devices in one group that differ only in
    their ``axis`` coordinate (logical id = position in ``mesh.devices``, row-major)."""
    dim = mesh.axis_names.index(axis)
    found = []
    for line in hlo.splitlines():
        if not _COLLECTIVE.search(line):
            continue
        groups = device_groups(line, mesh.devices.size)
        if isinstance(groups, tuple):  # mesh-axes form: grouped over these axes
            crosses = axis in groups and mesh.shape[axis] > 1
        else:
            coords = [np.delete(np.unravel_index(np.unique(g), mesh.devices.shape), dim, axis=0).T for g in groups]
            crosses = any(len({tuple(c) for c in cs}) < len(cs) for cs in coords)
        if crosses:
            found.append(line.strip()[:300])
    return found


def test_collective_parser_sees_the_head_axis():
    """The check can fail: a sum over the tp-sharded head dimension all-reduces over tp."""
    mesh = tp_mesh()
    x = jax.device_put(jnp.ones((B, T, H)), NamedSharding(mesh, TOKENS))
    over_heads = jax.jit(lambda x: jnp.sum(x, axis=2), compiler_options=FAST_COMPILE).lower(x).compile()
    over_tokens = jax.jit(lambda x: jnp.sum(x, axis=1), compiler_options=FAST_COMPILE).lower(x).compile()
    assert collectives_across(over_heads.as_text(), mesh, "tp")
    assert collectives_across(over_heads.as_text(), mesh, "sp") == []
    assert collectives_across(over_tokens.as_text(), mesh, "sp")
    assert collectives_across(over_tokens.as_text(), mesh, "tp") == []
    # the explicit and iota forms, on a (2, 2, 2) mesh: ids 0 and 1 differ only in tp
    assert device_groups("replica_groups={{0,1},{2,3}}", 8) == [[0, 1], [2, 3]]
    assert device_groups("replica_groups=[4,2]<=[2,2,2]T(0,2,1)", 8) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    line = "%ar = f32[2] all-reduce(%x), replica_groups={{0,1},{2,3},{4,5},{6,7}}"
    assert collectives_across(line, mesh, "tp") and not collectives_across(line, mesh, "sp")
    self_sends = "%cp = f32[2] collective-permute(%x), source_target_pairs={{0,0},{1,1},{2,2},{3,3}}"
    assert not collectives_across(self_sends, mesh, "tp")


# ---- values, gradients, sharding and collectives of one layer -----------------------------------


def grads_fn(layer, *, has_state):
    """One jit of: o (and the final state) and the gradients of <o, do> (+ <final, ds>) w.r.t. every
    input (``layer(**xs)`` returns ``(o, final_state or None)``)."""

    def loss(xs, do, ds):
        o, final = layer(**xs)
        total = jnp.sum(o.astype(do.dtype) * do)
        if has_state:
            total = total + jnp.sum(final * ds)
        return total, (o, final)

    def run(xs, do, ds):
        grads, (o, final) = jax.grad(loss, has_aux=True)(xs, do, ds)
        extra = {"final_state": final} if has_state else {}
        return {"o": o} | extra | {f"d{n}": x for n, x in grads.items()}

    return jax.jit(run, compiler_options=FAST_COMPILE)


def reference(op, xs, do, ds, *, has_state):
    with x64():
        f64 = {n: jnp.asarray(x, jnp.float64) for n, x in xs.items()}
        ds = None if ds is None else jnp.asarray(ds, jnp.float64)
        out = grads_fn(op, has_state=has_state)(f64, jnp.asarray(do, jnp.float64), ds)
        return {n: np.asarray(x) for n, x in out.items()}


def spec_of(name: str) -> P:
    return {"g_gamma": PER_HEAD, "initial_state": STATE}.get(name, TOKENS)


def check_layer(layer, op, xs, do, ds, *, has_state, label):
    """``layer`` on the tp mesh (inputs placed with heads on tp) against ``op`` on one device."""
    mesh = tp_mesh()
    want = reference(op, xs, do, ds, has_state=has_state)
    placed = {n: jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, spec_of(n))) for n, x in xs.items()}
    do_ = jax.device_put(jnp.asarray(do, jnp.float32), NamedSharding(mesh, TOKENS))
    ds_ = jax.device_put(jnp.asarray(ds, jnp.float32), NamedSharding(mesh, STATE)) if has_state else None
    compiled = grads_fn(layer, has_state=has_state).lower(placed, do_, ds_).compile()
    got = compiled(placed, do_, ds_)

    across = collectives_across(compiled.as_text(), mesh, "tp")
    assert not across, f"{label}: collectives over the head axis:\n" + "\n".join(across)
    for name, dim in (("o", 2), ("final_state", 1))[: 1 + has_state]:
        spec = tuple(got[name].sharding.spec) + (None,) * got[name].ndim
        assert spec[dim] == "tp", f"{label}: {name} lost its head sharding: {got[name].sharding.spec}"

    assert set(got) == set(want), (set(got), set(want))
    bound, bad = tol(jnp.float32, T), {}
    for name, ref in want.items():
        axis = HEAD_DIM.get(name.removeprefix("d"), 2)
        limit = 4 * bound if name in ("dg", "dg_gamma") else bound  # sums of many cancelling terms
        for r, (a, b) in enumerate(zip(np.split(np.asarray(got[name]), 2, axis), np.split(ref, 2, axis))):
            if (err := rel_err(a, b)) > limit:
                bad[f"{name}[tp {r}]"] = err
    assert not bad, f"{label}: errors over tolerance {bound:.1e}: {bad}"


def linear_inputs(rng, decay):
    xs = {
        "q": rng.standard_normal((B, T, H, D)),
        "k": rng.standard_normal((B, T, HK, D)) / np.sqrt(D),
        "v": rng.standard_normal((B, T, HK, D)),
        "initial_state": rng.standard_normal((B, H, D, D)) / np.sqrt(D),
    }
    # gates differ per head, so a head block that met another block's gates would show
    if decay == "g":
        xs["g"] = -rng.uniform(0.01, 0.5, (B, T, H)) * np.arange(1, H + 1)
    else:
        xs["g_gamma"] = -rng.uniform(0.01, 0.5, (H,)) * np.arange(1, H + 1)
    return xs


@pytest.mark.parametrize(
    "strategy,impl,decay",
    [
        ("ring", "xla", "g_gamma"),
        ("allgather", "xla", "g"),
        ("ring", "pallas", "g"),
        ("allgather", "pallas", "g_gamma"),
    ],
)
def test_lasp_attention(rng, strategy, impl, decay):
    xs = linear_inputs(rng, decay)
    do, ds = rng.standard_normal((B, T, H, D)), rng.standard_normal((B, H, D, D))
    layer = functools.partial(
        lasp_attention,
        mesh=tp_mesh(),
        batch_axis="dp",
        head_axis="tp",
        strategy=strategy,
        impl=impl,
        output_final_state=True,
    )
    op = functools.partial(linear_attention, impl="reference", output_final_state=True)
    check_layer(layer, op, xs, do, ds, has_state=True, label=f"lasp {strategy} {impl} {decay}")


@pytest.mark.parametrize(
    "strategy,impl", [("allgather", "xla"), ("ring", "xla"), ("allgather", "pallas"), ("ring", "pallas")]
)
def test_softmax_attention(rng, strategy, impl):
    xs = {
        "q": rng.standard_normal((B, T, H, D)),
        "k": rng.standard_normal((B, T, HK, D)),
        "v": rng.standard_normal((B, T, HK, D)),
    }
    do = rng.standard_normal((B, T, H, D))

    def layer(**xs):
        o = softmax_attention(**xs, mesh=tp_mesh(), batch_axis="dp", head_axis="tp", strategy=strategy, impl=impl)
        return o, None

    def op(**xs):
        return causal_attention(**xs), None

    check_layer(layer, op, xs, do, None, has_state=False, label=f"softmax {strategy} {impl}")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_lasp_gated_delta_rule(rng, impl):
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    xs = {
        "q": unit(rng.standard_normal((B, T, DH, D))),
        "k": unit(rng.standard_normal((B, T, DH, D))),
        "v": rng.standard_normal((B, T, DHV, D)),
        "beta": 1 / (1 + np.exp(-rng.standard_normal((B, T, DHV)))),
        "g": -np.logaddexp(0.0, -(rng.standard_normal((B, T, DHV)) + 2)),
        "initial_state": rng.standard_normal((B, DHV, D, D)) / np.sqrt(D),
    }
    do, ds = rng.standard_normal((B, T, DHV, D)), rng.standard_normal((B, DHV, D, D))
    layer = functools.partial(
        lasp_gated_delta_rule,
        mesh=tp_mesh(),
        batch_axis="dp",
        head_axis="tp",
        strategy="allgather",
        impl=impl,
        output_final_state=True,
    )
    op = functools.partial(gated_delta_rule, impl="reference", output_final_state=True)
    check_layer(layer, op, xs, do, ds, has_state=True, label=f"delta rule allgather {impl}")


def test_per_shard_function_in_user_shard_map(rng):
    """``lasp_attention_shard`` in the caller's checked ``shard_map`` over (dp, sp, tp): the caller
    splits the heads (and ``g_gamma``) over tp, the function sees only its local heads."""
    mesh = tp_mesh()
    xs = linear_inputs(rng, "g_gamma")
    do, ds = rng.standard_normal((B, T, H, D)), rng.standard_normal((B, H, D, D))

    def layer(q, k, v, g_gamma, initial_state):
        def body(q, k, v, g_gamma, s0):
            return lasp_attention_shard(
                q, k, v, axis_name="sp", strategy="ring", g_gamma=g_gamma, initial_state=s0, output_final_state=True
            )

        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(TOKENS, TOKENS, TOKENS, PER_HEAD, STATE),
            out_specs=(TOKENS, STATE),
        )(q, k, v, g_gamma, initial_state)

    op = functools.partial(linear_attention, impl="reference", output_final_state=True)
    check_layer(layer, op, xs, do, ds, has_state=True, label="lasp_attention_shard in a checked shard_map")


# ---- bad head axes --------------------------------------------------------------------------------


def _ones(h, hk, hv=None):
    return jnp.ones((B, T, h, D)), jnp.ones((B, T, hk, D)), jnp.ones((B, T, hv or hk, D))


LINEAR_CASES = [
    (dict(head_axis="heads"), r"head_axis='heads' is not an axis of the mesh"),
    (dict(head_axis="sp"), r"head_axis='sp' must differ from seq_axis='sp'"),
    (dict(head_axis="dp", batch_axis="dp"), r"head_axis='dp' must differ"),
    (dict(head_axis="tp", hk=1), r"heads must divide over the head axis: H=4, Hk=1, mesh.shape\['tp'\]=2"),
    (dict(head_axis="tp", h=2, hk=2, strategy="ulysses"), r"ulysses.*mesh.shape\['sp'\]=2, got H=2"),
]


@pytest.mark.parametrize("kwargs,match", LINEAR_CASES, ids=["missing", "seq", "batch", "gqa", "ulysses"])
def test_lasp_attention_bad_head_axis(kwargs, match):
    kwargs = dict(kwargs)
    q, k, v = _ones(kwargs.pop("h", H), kwargs.pop("hk", HK))
    with pytest.raises(ValueError, match=match):
        lasp_attention(q, k, v, mesh=tp_mesh(), **kwargs)


@pytest.mark.parametrize("kwargs,match", LINEAR_CASES[:4], ids=["missing", "seq", "batch", "gqa"])
def test_softmax_attention_bad_head_axis(kwargs, match):
    kwargs = dict(kwargs)
    q, k, v = _ones(kwargs.pop("h", H), kwargs.pop("hk", HK))
    with pytest.raises(ValueError, match=match):
        softmax_attention(q, k, v, mesh=tp_mesh(), **kwargs)


def test_gated_delta_rule_ulysses_under_head_axis():
    q, k, v = _ones(DH, DH, DHV)
    with pytest.raises(ValueError, match=r"ulysses.*mesh.shape\['sp'\]=2, got H=2, Hv=4"):
        lasp_gated_delta_rule(q, k, v, jnp.ones((B, T, DHV)), mesh=tp_mesh(), head_axis="tp", strategy="ulysses")
