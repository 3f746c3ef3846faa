"""Helpers every op in ``pallas_kernels`` shares: backend checks, dtypes, the float32-accumulating dot, padding.

Nothing here knows an op's math; what one op's forward and backward share lives in that op's own
``common.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = jnp.float32
# input dtypes the Pallas Triton kernels take (float32 accumulation for all of them)
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# the Triton lowering computes element offsets in int32
MAX_ELEMENTS = 2**31 - 1


def on_gpu() -> bool:
    """True when jax's default backend is a GPU (False when no backend can start)."""
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def resolve_scale(scale, head_dim: int) -> float:
    """``scale`` as the Python float the ops bake into their programs, ``head_dim ** -0.5`` when None.

    A clear error for a traced, non-scalar or non-finite ``scale`` (NaN would otherwise come out as
    NaN, zeros or a uniform average depending on the implementation) and for an empty head dim.
    """
    if head_dim <= 0:
        raise ValueError(f"the head dim (q's last axis) must be positive, got {head_dim=}")
    if scale is None:
        return float(head_dim) ** -0.5
    if isinstance(scale, jax.core.Tracer):
        raise TypeError("scale must be a static Python number (it is compiled into the op), got a traced value")
    if np.ndim(scale) != 0:
        raise TypeError(f"scale must be a scalar, got an array of shape {np.shape(scale)}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number, got {scale=}")
    return value


def acc_dtype(*dtypes) -> jnp.dtype:
    """The accumulation dtype for inputs of ``dtypes``: float32, or float64 when one of them is."""
    return jnp.result_type(jnp.float32, *[d for d in dtypes if d is not None])


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False, precision=lax.Precision.HIGHEST):
    """``a @ b`` (``aᵀ`` / ``bᵀ`` when asked) with float32 accumulation, for use inside kernels.

    HIGHEST keeps float32 operands exact (jax 0.11's Triton lowering maps DEFAULT to tf32);
    bf16/fp16 operands go to the tensor cores either way. ``precision`` may be another choice for
    float32 operands, e.g. ``TF32_X3`` (three tf32 products on the tensor cores; not on the CPU).
    """
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


# float32 products as three tf32 products on the tensor cores (about float32 accuracy; GPU only)
TF32_X3 = lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def pad_dim(n: int) -> int:
    """A head dim padded to a power of two ≥ 16 (``tl.dot`` needs ≥ 16, loads need powers of two)."""
    return max(16, 1 << (n - 1).bit_length())


def kernel_width(q, v) -> int:
    """The head width kernels that pad q/k and v alike run at: the wider of q's and v's, padded to a
    power of two ≥ 16 (``pad_dim``)."""
    return max(pad_dim(q.shape[-1]), pad_dim(v.shape[-1]))


def chain_pieces(call, sequences: tuple, *, piece: int, initial_state, segment_ids):
    """``call`` over runs of ``piece`` tokens, each entering with the last one's final state.

    For inputs longer than int32 element offsets allow. ``sequences``: the ``[B, T, ...]`` inputs
    (None entries stay None), cut along T and passed positionally; ``call(*cut, initial_state=,
    segment_ids=)`` returns ``(o [B, piece, ...], final_state [B, H, D, E])``. With documents, a piece
    that starts a new document enters with a zero state (the id changes across the cut), as the
    kernels reset it inside a piece. Returns ``(o [B, T, ...], final_state)``.
    """
    outs, state = [], initial_state
    for start in range(0, sequences[0].shape[1], piece):
        cut = slice(start, start + piece)
        seg = None if segment_ids is None else segment_ids[:, cut]
        if state is not None and seg is not None and start > 0:
            same = segment_ids[:, start - 1] == segment_ids[:, start]
            state = jnp.where(same[:, None, None, None], state, 0.0)
        o, state = call(*(None if x is None else x[:, cut] for x in sequences), initial_state=state, segment_ids=seg)
        outs.append(o)
    return jnp.concatenate(outs, axis=1), state


# streaming multiprocessors of an H100 / H200 (the kernels' launch heuristics size grids to them)
NUM_SMS = 132


def state_pass_splits(programs: int, num_chunks: int, *, min_chunks: int = 16, target: int = 2 * NUM_SMS) -> int:
    """Runs of whole chunks per row for the sequential state passes: doubled (a power of two) until
    the passes have about ``target`` programs (``programs`` per run: rows × heads × value blocks;
    default two per SM), while every run keeps at least ``min_chunks`` chunks."""
    splits = 1
    while programs * splits < target and num_chunks // (2 * splits) >= min_chunks:
        splits *= 2
    return splits


def is_two_byte(dtype) -> bool:
    """bf16 or fp16 (None: no dtype given, treated as float32), the launch heuristics' dtype split."""
    return dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def state_pass_stages(stages: int, *, key_dim: int, value_dim: int, two_byte: bool) -> int:
    """Pipeline stages of the sequential state passes: ``stages`` for head dims up to 128, fewer past
    them, 2 in bf16/fp16 and 1 in float32, so one program's shared memory stays under sm_90's 227 KB
    (offline Triton 3.6 for sm_90, session 19, (1, 8K, 8, 256): the delta rule's reverse state pass
    asks 306 KB with 3 stages in bf16, 206 KB with 2; float32 GDN's forward pass 128 KB with 1; GLA's
    float32 passes already ask 176 KB at 128 with 3). Run on an H200 in session 20: the defaults of
    GDN, KDA and GLA at head dim 256 launch (bf16 and float32)."""
    if max(key_dim, value_dim) <= 128:
        return stages
    return 2 if two_byte else 1
