"""Block sizes and launch parameters of the Pallas Triton gated-delta-rule kernels, with a default.

The kernels (``pallas_triton``, ``pallas_triton_vjp``) cut the sequence into chunks of C tokens.
The chunk-parallel kernels (the WY preparation, the output, the chunk gradients) run one program
per (chunk, batch row, value head); the two state passes (forward and reverse) run one program per
(batch row, value head, value-dim block) and walk the chunks in order.
"""

from __future__ import annotations

import dataclasses

# rows of the sub-tiles of a chunk: the triangular solve works on 16×16 diagonal blocks, per-channel
# gates factor the decay between sub-tiles around a reference row (notes/design.md §6)
SUB_TILE = 16


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Static tiling of the kernels.

    Attributes:
      chunk: tokens per chunk (C), a power of two >= 16 (the chunk holds C / 16 sub-tiles).
      block_e: value-dim tile of the two state passes: programs per (row, head) = E / block_e.
        Smaller tiles give the sequential passes more programs and shorter steps.
      num_warps / num_stages: Triton launch parameters of the chunk-parallel forward kernels;
        num_warps_state / num_stages_state: of the two state passes (num_stages pipelines the loads
        of the next chunk behind the current step); num_warps_bwd / num_stages_bwd: of the
        chunk-parallel backward kernels.
    """

    chunk: int = 64
    block_e: int = 32
    num_warps: int = 4
    num_stages: int = 2
    num_warps_state: int = 4
    num_stages_state: int = 3
    num_warps_bwd: int = 8
    num_stages_bwd: int = 1

    def __post_init__(self):
        for name in ("chunk", "block_e"):
            value = getattr(self, name)
            if value < SUB_TILE or value & (value - 1):
                raise ValueError(f"BlockConfig.{name}={value} must be a power of two >= {SUB_TILE}")


# interpret mode (CPU tests): the interpreter's programs are compiled by XLA once per shape, and the
# unrolled sub-tile math of larger chunks dominates that; 16-token chunks (one sub-tile) and 16-wide
# value blocks keep it fast (tests pass larger chunks explicitly to exercise the block solve)
INTERPRET_CONFIG = BlockConfig(chunk=16, block_e=16)


def default_config(*, head_dim: int, value_dim: int, interpret: bool) -> BlockConfig:
    """Interpret mode: small chunks; GPU: 64-token chunks, value blocks of 32 (64 for narrow heads).

    Untuned first choice (no GPU sweep yet): at (B, T, Hv) = (1, 32K, 16) with E = 128, value
    blocks of 32 give the state passes 64 programs.
    """
    if interpret:
        return INTERPRET_CONFIG
    del head_dim
    return BlockConfig(block_e=min(32, value_dim))
