"""A constant per-head decay (``g_gamma``) must not turn into T-long constants at long T.

XLA constant-folds an instruction whose operands are constants (or broadcasts of constants) at
compile time: a cumulative sum (``reduce-window``, or the ``scan`` op jax lowers cumsum to for
CUDA) over the per-head decay broadcast to every token took minutes of compile at a million
tokens. Lowering only (abstract inputs, no compile, no run): the HLO of the forward and backward
passes at T = 2**20 must hold no cumulative sum fed by a constant-derived float32 array of T or
more elements, for the XLA path and for the Pallas Triton kernels (lowered for CUDA, on a padded
and an unpadded length).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention
from pallas_kernels.linear_attention import pallas_triton, xla

LONG_T = 2**20
GAMMA = np.array([-0.05, -0.5], np.float32)  # a model constant, as TNL's per-layer decay is

CUMULATIVE = ("reduce-window", "scan")  # the HLO forms of a cumulative sum
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?(\S+) = (\S+|\(.*?\)) ([a-z][\w\-]*)\((.*?)\)(.*)$")
_ARRAY = re.compile(r"^(\w+)\[([\d,]*)\]")


def _elements(shape: str) -> tuple[str, int]:
    m = _ARRAY.match(shape)
    if not m:
        return "tuple", 0
    dims = [int(x) for x in m.group(2).split(",") if x]
    return m.group(1), math.prod(dims)


def folded_cumulative_sums(hlo: str, min_elements: int) -> list[str]:
    """Cumulative sums (direct, or through a call into a computation holding one) with a
    constant-derived float32 operand of ≥ ``min_elements`` elements: what XLA would fold.

    Constant-derived: a constant, or an instruction (iota and parameters excepted) whose operands
    are all constant-derived. Instruction names are unique in an HLO module.
    """
    constant, sizes, found = set(), {}, []
    cumulative, computation = set(), None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?(\S+) .*\{$", line) or re.match(r"^(?:ENTRY )?(\S+) \{$", line)
        if header and "=" not in line.split("{")[0]:
            computation = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, operands, attrs = m.groups()
        sizes[name] = _elements(shape)
        args = [a.strip() for a in operands.split(",") if a.strip() in sizes]
        callee = re.search(r"(?:to_apply|calls)=(\S+?)(?:,|$)", attrs)
        accumulates = opcode in CUMULATIVE or (
            opcode in ("call", "fusion") and callee is not None and callee.group(1) in cumulative
        )
        if accumulates:
            cumulative.add(computation)
            for a in args:
                dtype, n = sizes[a]
                if a in constant and dtype == "f32" and n >= min_elements:
                    found.append(line.strip()[:200])
        if opcode == "constant" or (opcode not in ("iota", "parameter") and args and all(a in constant for a in args)):
            constant.add(name)
    return found


def _fwd_bwd(attention):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _abstract(t):
    return jax.ShapeDtypeStruct((1, t, 2, 16), jnp.bfloat16)


def test_the_check_sees_a_folded_cumulative_sum():
    """The broadcast-then-cumsum form this file guards against is flagged (at a short T)."""
    t = 4096

    def old_form(q, k, v):
        log_decay = jnp.broadcast_to(jnp.asarray(GAMMA), q.shape[:3])
        return xla.linear_attention(q, k, v, log_decay, scale=0.25)[0]

    hlo = jax.jit(_fwd_bwd(old_form)).lower(*[_abstract(t)] * 3).as_text(dialect="hlo")
    assert folded_cumulative_sums(hlo, t), "the check missed a cumulative sum over a broadcast constant"


def test_xla_path_has_no_long_constant_cumsum():
    def attention(q, k, v):
        return linear_attention(q, k, v, g_gamma=jnp.asarray(GAMMA), impl="xla")[0]

    hlo = jax.jit(_fwd_bwd(attention)).lower(*[_abstract(LONG_T)] * 3).as_text(dialect="hlo")
    assert not folded_cumulative_sums(hlo, LONG_T)


@pytest.mark.parametrize("t", [LONG_T, LONG_T - 1], ids=["whole_chunks", "padded"])
def test_pallas_kernels_have_no_long_constant_cumsum(t, triton_lowering_cuda):
    """The Triton kernels lowered for CUDA (an abstract H100 off a GPU: the ``triton_lowering_cuda`` fixture)."""

    def attention(q, k, v):
        return pallas_triton.linear_attention(q, k, v, g_gamma=jnp.asarray(GAMMA), interpret=False)[0]

    traced = jax.jit(_fwd_bwd(attention)).trace(*[_abstract(t)] * 3)
    hlo = traced.lower(lowering_platforms=("cuda",)).as_text(dialect="hlo")
    assert hlo.count("__gpu$xla.gpu.triton") >= 5  # the forward and backward kernels are there
    assert not folded_cumulative_sums(hlo, t)
