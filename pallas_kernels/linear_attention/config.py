"""Block sizes for the Pallas Triton linear-attention kernels, with a heuristic default.

The kernels cut each (batch row, head) into ``splits``: runs of whole chunks, enough of them
that the grid has the programs to fill the GPU (LASP inside one device: every split computes its
own state from zero, a float32 prefix scan gives each split its entering state). Inside a split
one program walks the chunks in order, carrying the float32 state in registers.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels.common import NUM_SMS, is_two_byte, state_pass_splits, state_pass_stages


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Static tiling of the kernels.

    Attributes:
      chunk: tokens per chunk (C): the intra-chunk attention is a C×C masked matmul.
      min_programs: cut rows into splits until B·H·splits reaches this.
      block_e: value-dim tile of the forward output kernel (each program recomputes Q Kᵀ).
      block_d: key-dim tile of the dq kernel (each program recomputes dO Vᵀ).
      split_dkdv: compute dk and dv in two kernels (smaller register footprint, one more
        read of q and dO) instead of one fused kernel.
      block_dkdv: key-dim tile of the dk kernel and value-dim tile of the dv kernel when split.
      num_warps / num_stages: Triton launch parameters of the forward chunk-loop kernels;
        num_warps_bwd / num_stages_bwd: the same for the backward ones.
    """

    chunk: int = 64
    min_programs: int = 4 * NUM_SMS
    block_e: int = 64
    block_d: int = 64
    split_dkdv: bool = False
    block_dkdv: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 8
    num_stages_bwd: int = 3

    def __post_init__(self):
        for name in ("chunk", "block_e", "block_d", "block_dkdv"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"BlockConfig.{name}={value} must be a power of two >= 16")
        if self.min_programs < 1:
            raise ValueError(f"BlockConfig.min_programs={self.min_programs} must be positive")


# interpret mode (CPU tests) runs the grid as a Python-level loop: small chunks and a couple of
# splits per row keep it fast while still exercising multi-chunk splits and the state scan
INTERPRET_CONFIG = BlockConfig(chunk=16, min_programs=1, block_e=16, block_d=16, block_dkdv=16)


def default_config(
    *,
    batch: int,
    heads: int,
    seq_len: int,
    interpret: bool,
    grouped: bool = False,
    decay: bool = True,
    head_dim: int | None = None,
    dtype=None,
) -> BlockConfig:
    """Heuristic tiling for a problem; interpret mode gets small blocks and two splits per row.

    Above ``head_dim`` 64 (the larger of D and E, unpadded; None: unknown, taken as above 64 and at
    most 128, so callers with wider heads must pass it), without a decay (``decay=False``) or under
    grouped heads (``grouped``: fewer key/value heads than query heads, dk and dv written per query
    head in float32), the backward runs two pipeline stages: three overflow an H200's shared memory
    there (233,472 bytes asked of 232,448: measured at D = 128 without a decay, grouped and not;
    grouped heads with a decay not measured at three; D = 64 fits three).

    Past head dim 128 (the kernels pad to 256) dk and dv run as two kernels (``split_dkdv``: the fused
    one holds the whole ``[D, E]`` state cotangent) with 2 backward stages for bf16/fp16 ``dtype`` and
    1 for float32 (H200, session 21, 256-wide heads: the default asked 264,192 bytes of shared memory,
    ``split_dkdv`` alone 247,296; bf16 (1, 16K, 8, 256) fwd+bwd with a per-token decay 2.56 ms with 2
    stages, 2.79 with 1, 3.54 with 32-wide blocks; float32 ran with 1 stage)."""
    if interpret:
        return dataclasses.replace(INTERPRET_CONFIG, min_programs=2 * batch * heads)
    del seq_len
    if head_dim is not None and head_dim > 128:
        return BlockConfig(split_dkdv=True, num_stages_bwd=2 if is_two_byte(dtype) else 1)
    if (head_dim is None or head_dim > 64) and (grouped or not decay):
        return BlockConfig(num_stages_bwd=2)
    return BlockConfig()


def splits(num_chunks: int, rows: int, min_programs: int) -> tuple[int, int]:
    """(number of splits, chunks per split) so that rows · splits >= min_programs."""
    wanted = max(1, min(num_chunks, math.ceil(min_programs / rows)))
    per_split = math.ceil(num_chunks / wanted)
    return math.ceil(num_chunks / per_split), per_split


# ---- per-key-channel gates (GLA): ``pallas_triton_channel`` ----------------------------------

# rows of the sub-tiles of a chunk under per-channel gates: the decay between two sub-tiles is
# factored around a reference row, the pairs inside a diagonal sub-tile are formed directly
CHANNEL_SUB_TILE = 16


@dataclasses.dataclass(frozen=True)
class ChannelConfig:
    """Static tiling of the per-channel (GLA) kernels.

    The two state passes (forward from a zero state, reverse from a zero cotangent) walk the chunks
    of a run one program per (value block, run, head); the output and gradient kernels run one
    program per (chunk, run, head).

    Attributes:
      chunk: tokens per chunk (C), a power of two >= 16 (C / 16 sub-tiles).
      block_cols: key columns per step of the chunk kernels' loops over key columns (the scores
        and their gradients are sums over, or separate in, the key channels; the exact diagonal
        sub-tiles form ``[16, 16, block_cols]`` pairs, so this bounds the live registers).
      block_e: value-dim tile of the two state passes.
      splits: runs of whole chunks per row that the state passes walk in parallel (each from a
        zero state; a float32 scan over runs gives their entering states, which the chunk
        kernels add to the stored per-chunk states).
      split_grads: the chunk gradients in two kernels, dq/dk/dg and dv (fewer live tiles in each:
        no dV accumulator, scores or state-to-dV product beside the gated-product cotangents; one
        more read of k, g, dO, the scores and the leaving cotangents) instead of one.
      recompute_dz: the gradient kernel forms the scores' cotangent ``scale · dO Vᵀ`` again in each
        step of its key-column loop instead of keeping its ``[16, 16]`` blocks live across it (fewer
        registers and spills, ``D / block_cols`` times those products).
      stacked_pairs: the off-diagonal sub-tile pairs of the scores and of their cotangents by one
        whole-chunk product per key (or query) tile (``gated_delta_rule.products
        .channel_offdiag_stacked`` and ``_vjp``: 64-row products, wgmma-sized on Hopper, where the
        pairs are 16 rows); the same blocks. Off by default: slower on an H200 (fwd+bwd 26.5
        against 15.7 ms at (1, 32K, 16, 128), session 15).
      pregated_state: the two state passes read the gated keys ``e^{b_last − b} ⊙ K`` (the reverse
        pass the gated queries ``e^b ⊙ Q``) and each chunk's decay ``e^{b_last}``, formed once per call
        (``channel_common.pregated_inputs``: the cumulative gates by the delta rule's Pallas kernel, the
        rest in XLA), instead of loading the gates and forming their
        cumulative sums and two ``[C, D]`` exponentials at every step in every value-block program
        (the delta rule's ``BlockConfig.pregated_state``); the gated operands are stored per query
        head (``[R, T, H, D]``, H / Hk times the keys).
      num_warps / num_stages: Triton launch parameters of the output kernel; ``*_state``: of the
        two state passes; ``*_bwd``: of the gradient kernel(s).
      output_rows: rows of the output kernel's sub-tiles in the factored form (None: 16, as every
        other kernel; a power of two up to the chunk), as the delta rule's ``BlockConfig.output_rows``
        (session 23, KDA on an H200: its output kernel 1.02 → 0.84 ms with 32). Its stored scores are
        read back by the gradient kernels as their 16-row blocks. The whole-input gate check then
        asks the larger tiles' factors to stay below e^40 too (32 rows: log gates ≥ about −2.5 per
        token), else the 16-row factored form runs, or the exact one (``gated_delta_rule
        .products.gate_case`` / ``by_gates``). The bf16 default for heads up to 128 (session 24).
    """

    chunk: int = 64
    block_cols: int = 32
    block_e: int = 32
    splits: int = 1
    split_grads: bool = False
    recompute_dz: bool = False
    num_warps: int = 8
    num_stages: int = 2
    num_warps_state: int = 4
    num_stages_state: int = 3
    num_warps_bwd: int = 8
    num_stages_bwd: int = 1
    stacked_pairs: bool = False
    pregated_state: bool = False
    output_rows: int | None = None

    def __post_init__(self):
        for name in ("chunk", "block_cols", "block_e"):
            value = getattr(self, name)
            if value < CHANNEL_SUB_TILE or value & (value - 1):
                raise ValueError(f"ChannelConfig.{name}={value} must be a power of two >= {CHANNEL_SUB_TILE}")
        if self.splits < 1:
            raise ValueError(f"ChannelConfig.splits={self.splits} must be positive")
        rows = self.output_rows
        if rows is not None and (rows & (rows - 1) or not CHANNEL_SUB_TILE <= rows <= self.chunk):
            raise ValueError(
                f"ChannelConfig.output_rows={rows} must be a power of two from {CHANNEL_SUB_TILE} to chunk={self.chunk}"
            )

    # the interface of ``gated_delta_rule.products.gate_case`` / ``by_gates`` (shared with the
    # delta rule's BlockConfig): the sub-tile every kernel takes, the largest any kernel factors over

    @property
    def channel_rows(self) -> int:
        return CHANNEL_SUB_TILE

    @property
    def factored_rows(self) -> int:
        return max(CHANNEL_SUB_TILE, self.output_rows or 0)

    @property
    def forward_factored_rows(self) -> int:
        return self.factored_rows

    def small_tiles(self) -> ChannelConfig:
        """This config with every kernel on 16-row sub-tiles (the exact and 16-row factored forms)."""
        return dataclasses.replace(self, output_rows=None)


def default_channel_config(
    *, batch: int, heads: int, seq_len: int, value_dim: int, interpret: bool, dtype=None, key_dim: int = 128
) -> ChannelConfig:
    """Interpret mode: 16-token chunks (one sub-tile), 16-wide blocks, one run per row, the pregated
    state passes. GPU: 64-token chunks, and runs (a power of two) until the state passes have about
    two programs per SM while each run keeps at least 16 chunks: at (B, T, H) = (1, 32K, 16) with E =
    128, 8 runs of 64 chunks (512 programs per pass); the gradients in two kernels with the scores'
    cotangent formed again in each key-column step (``split_grads``, ``recompute_dz``: H200, (1, 32K,
    16, 128) bf16 fwd+bwd 15.15 against 22.37 ms in one kernel, same run, 2026-11-30). For bf16/fp16 inputs
    (``dtype``), since the diagonal sub-tiles are one product where the gates allow it (session 17):
    4 warps in the output and gradient kernels and 2 stages in the state passes (H200, (1, 32K, 16,
    128) bf16 fwd+bwd, session 18: 10.86 → 6.97 → 6.68 ms; with gates past the factored form, the
    exact kernels, 16.28 → 12.43 ms with the 4 warps), and the state passes on gated keys / queries
    formed once (``pregated_state``; session 19: 6.59 → 6.11 ms; fewer runs lose: 2 runs 6.54, one
    run of 16-wide blocks 7.67). fp16 takes the bf16 measurements (not timed itself); float32 keeps
    the in-kernel state passes, measured faster ((1, 8K, 16, 128): 27.4 against 37.6 ms pregated,
    unexplained: the pregated forward 1.81 → 8.67 ms; not profiled). bf16 with head dims up to 128
    runs the output kernel on 32-row sub-tiles where the gates allow them (``output_rows``, session
    24: its forward 1.90 / 1.67 → 1.71 / 1.65 ms in two runs)."""
    if interpret:  # the bf16/fp16 GPU default's state passes
        return ChannelConfig(chunk=16, block_cols=16, block_e=16, pregated_state=True)
    cfg = ChannelConfig(block_e=min(32, value_dim), split_grads=True, recompute_dz=True)
    two_byte = is_two_byte(dtype)
    if two_byte:
        cfg = dataclasses.replace(cfg, num_warps=4, num_warps_bwd=4, num_stages_state=2, pregated_state=True)
    if dtype is not None and jnp.dtype(dtype) == jnp.bfloat16 and max(key_dim, value_dim) <= 128:
        # the output kernel on 32-row sub-tiles where the gates allow them (the delta rule's KDA
        # default since session 23). H200, (1, 32K, 16, 128) bf16, two runs of both (session 24,
        # calls A, B): forward 1.90 / 1.67 ms -> 1.71 / 1.65, fwd+bwd 5.63 / 5.68 -> 5.70 / 5.56 (the
        # backward keeps 16-row tiles). float16 runs the exact kernels; float32 and heads past 128 not timed
        cfg = dataclasses.replace(cfg, output_rows=min(32, cfg.chunk))
    # head dims past 128: fewer state-pass stages (past 227 KB of shared memory a launch fails)
    stages = state_pass_stages(cfg.num_stages_state, key_dim=key_dim, value_dim=value_dim, two_byte=two_byte)
    cfg = dataclasses.replace(cfg, num_stages_state=stages)
    programs = batch * heads * (value_dim // cfg.block_e)
    return dataclasses.replace(cfg, splits=state_pass_splits(programs, -(-seq_len // cfg.chunk)))
