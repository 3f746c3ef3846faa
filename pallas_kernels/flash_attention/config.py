"""Block sizes for the Pallas Triton flash-attention kernels, with a heuristic default."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

BACKWARDS = ("split", "fused")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Static tiling of the kernels (forward, dq, dk/dv) and the choice of backward.

    Attributes:
      block_q / block_k: query rows × key rows of one forward program's tile; the program owns
        ``block_q`` query rows and walks the visible key blocks.
      block_q_dq / block_k_dq: the same for the dq kernel (owns query rows, walks keys).
      block_k_dkv / block_q_dkv: the dk/dv kernel owns ``block_k_dkv`` key rows and walks the
        query blocks (of every query head of its key head's group) that see them.
      num_warps / num_stages: Triton launch parameters of the forward kernel;
        num_warps_bwd / num_stages_bwd: the same for the dk/dv (or fused) kernel, and for the dq
        kernel unless num_warps_dq / num_stages_dq are given (None: as the dk/dv kernel).
      backward: ``"split"`` (a dq kernel and a dk/dv kernel, each recomputing Q Kᵀ and dO Vᵀ: seven
        tile products) or ``"fused"`` (the dk/dv kernel also adds dQ in float32 with atomic adds:
        five products; the dq tiles are ignored); see ``pallas_triton_vjp``. "split" is the
        default: on an H200 (``benchmarks/flash_sweep.py``, causal 32K, H32 Hk8 D128 bf16) the fused
        backward took 161–425 ms against 57.8 ms split (its float32 atomic adds of dQ dominate).
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_k_dkv: int = 64
    block_q_dkv: int = 64
    num_warps: int = 8
    num_stages: int = 3
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    num_warps_dq: int | None = None
    num_stages_dq: int | None = None
    backward: str = "split"

    def __post_init__(self):
        if self.backward not in BACKWARDS:
            raise ValueError(f"BlockConfig.backward={self.backward!r} must be one of {BACKWARDS}")
        for field in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_k_dkv", "block_q_dkv"):
            value = getattr(self, field)
            if value < 16 or value & (value - 1):
                raise ValueError(f"BlockConfig.{field}={value} must be a power of two >= 16")


# interpret mode (CPU tests) runs the grid as a Python loop: small blocks keep it fast and give
# even tiny test lengths several query and key blocks (diagonal, fully visible, future blocks)
INTERPRET_CONFIG = BlockConfig(
    block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_k_dkv=16, block_q_dkv=16, num_warps=4
)


# shared memory per program on an H200 / H100 (the limit a failed launch reported: 232,448 bytes)
SHARED_MEMORY_BYTES = 232448


def default_config(*, head_dim: int, interpret: bool, dtype=None) -> BlockConfig:
    """Forward 128×128 tiles with 8 warps for 128-wide heads (128×64 with 4 warps for 64 and
    narrower), split backward on 64×64 tiles with 4 warps; the walked axis' tiles halved while their
    pipeline stages exceed the shared memory (float32 above 64-wide heads: 128×64 forward tiles;
    session 16's GPU test found fp32 at 128×128 asking 384 KiB). The estimate is a lower bound:
    fp32 256-wide heads asked 279 KB at 128×32, so the compiled kernels refuse heads wider than 128
    (``common.fits_shared_memory``) unless a config is given.

    H200 sweep (``benchmarks/flash_sweep.py``, 2026-11-30, causal 32K, H32 Hk8 D128 bf16, cuDNN
    13.49 / 56.56 ms fwd / fwd+bwd in the same run): forward 128×128, 3 stages 18.62 ms against
    19.63 ms for 128×64; forward+backward 76.7 ms (1.36× cuDNN); raw rows in
    ``benchmarks/results/2026-11-30_2xH200_s6/flash_sweep.json``.

    Picked from one sweep on an H100 (``benchmarks/flash_attention.py --q-start 0 --k-tokens
    32768``: causal 32K, H32 Hk8 D128 bf16; ``benchmarks/results/2026-11-22_H100_s2``): forward
    128,64,8,3 19.6 ms (128,128,8,3 19.1 ms), backward 64×64 with 4 warps 57.2 ms against 127.9 ms
    with 8 warps; cuDNN 14.9 / 40.4 ms.
    """
    if interpret:
        return INTERPRET_CONFIG
    cfg = BlockConfig(num_warps=4) if head_dim <= 64 else BlockConfig(block_k=128, num_warps=8)
    itemsize = 2 if dtype is None else jnp.dtype(dtype).itemsize
    # tiles along the walked axis as large as fit: Triton keeps that axis' two operand tiles per stage
    # in shared memory (2·rows·D·itemsize·stages bytes; H200, fp32 D128 at 128 rows in 3 stages asked
    # 384 KiB and failed)
    fits = lambda rows, stages: 2 * rows * head_dim * itemsize * stages <= SHARED_MEMORY_BYTES  # noqa: E731
    while cfg.block_k > 16 and not fits(cfg.block_k, cfg.num_stages):
        cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    while cfg.block_q_dkv > 16 and not fits(cfg.block_q_dkv, cfg.num_stages_bwd):
        cfg = dataclasses.replace(cfg, block_q_dkv=cfg.block_q_dkv // 2, block_k_dq=cfg.block_k_dq // 2)
    return cfg
