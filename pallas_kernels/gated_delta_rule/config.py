"""Block sizes and launch parameters of the Pallas Triton gated-delta-rule kernels, with a default.

The kernels (``pallas_triton``, ``pallas_triton_vjp``) cut the sequence into chunks of C tokens.
The chunk-parallel kernels (the WY preparation, the output, the chunk gradients) run one program
per (chunk, batch row, value head); the two state passes (forward and reverse) run one program per
(batch row, value head, value-dim block) and walk the chunks in order.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.common import NUM_SMS, is_two_byte, state_pass_splits, state_pass_stages

# rows of the sub-tiles of a chunk: the triangular solve works on 16×16 diagonal blocks, per-channel
# gates factor the decay between sub-tiles around a reference row (notes/design.md §6)
SUB_TILE = 16
# the float32 products of the WY inverse (``BlockConfig.inverse_precision``)
INVERSE_PRECISIONS = ("highest", "tf32", "tf32x3", "bf16")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Static tiling of the kernels.

    Attributes:
      chunk: tokens per chunk (C), a power of two >= 16 (cut into sub-tiles of ``wy_rows`` /
        ``channel_rows`` rows).
      block_e: value-dim tile of the two state passes: programs per (row, head) = E / block_e.
        Smaller tiles give the sequential passes more programs and shorter steps.
      block_cols: key/value columns per step of the loops over columns inside the wy and output
        kernels and their backward (the Gram blocks, W, U, the scores and their cotangents are sums
        over, or separate in, the columns; walking them in blocks keeps the live tiles small). Under
        scalar or no gates whole rows are fastest in bf16 (the default there; the output kernels
        took whole rows regardless before session 20): a config that leaves this at 32 runs them
        by 32-column blocks (H200, GDN (1, 32K, 16, 128) bf16 fwd+bwd 5.28 against 3.62 ms).
      splits: runs of whole chunks per row that the state passes walk in parallel (LASP inside
        one GPU): a first pass gives each run's transition ``(Φ, M)`` from a zero state, a float32
        scan over runs their entering states, the stored pass starts each run from its own. Each
        pass walks ``NC / splits`` chunks; the transition pass carries E + D columns. 1: one
        pass over the whole row.
      num_warps / num_stages: Triton launch parameters of the chunk-parallel forward kernels;
        num_warps_state / num_stages_state: of the two state passes (num_stages pipelines the loads
        of the next chunk behind the current step); num_warps_bwd / num_stages_bwd: of the
        chunk-parallel backward kernels (``output_bwd``'s warps: ``num_warps_output_bwd`` when set).
      wy_rows: rows of the sub-tiles of the WY kernels (the forward ``wy``, ``wy_bwd``,
        ``state_step_bwd``) under scalar or no gates: 16 (the inverse by 16×16 blocks, every product
        on 16-row tiles) up to the chunk (one tile: the inverse by doubling on the whole chunk, one
        product per step).
      channel_rows: rows of the sub-tiles of every chunk kernel under per-channel gates (16 up to the
        chunk): the decay factors around a reference row between two sub-tiles; a diagonal
        sub-tile of n rows is one product around its middle row where every tile's factors stay
        below e^40 (``products.diag_tiles_bounded``: n = 16 allows log gates ≥ −5 per token, n = 64
        about −1.25), else its pair tensor and log2(n) masked products by levels in the cotangents.
      store_inverse: the forward ``wy`` kernel also writes each chunk's ``X = (I + A)⁻¹`` (``C × C``,
        formed in float32, stored in the matmul operand dtype, which is all its products read) and
        the WY backward reads it instead of forming it (and the Gram blocks) again:
        on whole chunks under scalar or no gates (one ``C``-row tile: a few large products instead
        of the sub-tile blocks), as ``channel_rows`` blocks under per-channel gates.
      inverse_precision: the float32 products that form ``X = (I + A)⁻¹``: ``"highest"`` (exact
        float32 on the CUDA cores), ``"tf32x3"`` (three tf32 products on the tensor cores, about
        float32 accuracy) or ``"tf32"`` (one tf32 product: about 1e-3 relative, below the bf16
        rounding W, U and the backward's products of X already carry; for bf16/fp16 inputs only)
        or ``"bf16"`` (operands rounded to bf16, float32 sums: X's relative error about 1e-3 with
        random keys, up to 7e-3 with strongly correlated ones, where X rounded to bf16 for W's
        product already gives W about 1e-2: meant for bf16 inputs, the default there; other dtypes
        accept it and lose that much); the Pallas interpreter (CPU) uses ``"highest"`` for the tf32
        forms and runs ``"bf16"`` as on the GPU.
      store_scores: the forward ``output`` kernel also writes each chunk's score blocks ``Z = Q Kᵀ
        ⊙ Γ ⊙ causal`` (in the matmul operand dtype, ``C × C`` per chunk, as the ``[B, T, Hv, C]``
        array the stored inverse uses) and ``output_bwd`` reads them for ``dV' = scale · Zᵀ dO``
        instead of forming them again (under per-channel gates: the forward's pair tensors of the
        diagonal sub-tiles are not formed a second time).
      fuse_output: the forward state pass writes the output itself (each value block's, from the
        state it holds: ``Q Kᵀ ⊙ Γ`` formed again per value block, off the chain of states) instead
        of an output kernel reading h and V' back; scalar or no gates only, no stored scores. Off by
        default: slower (H200, GDN (1, 32K, 16, 128) bf16: the fused state pass 0.94 ms against 0.53
        + 0.22 for the state pass and the 4-warp output kernel; the products added to each
        latency-bound step cost more than the output kernel's reads).
      num_stages_bwd_exact: ``num_stages_bwd`` for the kernels that form per-channel diagonal
        sub-tiles exactly (the ``"channel"`` form behind the gates' cond, and fp16); None: the same.
        The factored form gains from two stages where the exact one loses (H200, KDA (1, 32K, 16,
        128) bf16 fwd+bwd, session 18: factored 13.80 → 13.03 ms, exact 24.96 → 31.10 ms).
      pregated_state: per-channel gates: the two state passes read the gated keys ``e^{b_last − b} ⊙ K``
        (and the reverse pass the gated queries ``e^b ⊙ Q``) and each chunk's decay ``e^{b_last}``,
        formed once per call in XLA (``layout.pregated_operands``), instead of loading the float32
        gates and forming two ``[C, D]`` exponentials and products at every step in every value-block
        program. The per-channel default (H200, KDA (1, 32K, 16, 128) bf16 fwd+bwd, session 19: 12.42
        → 10.88 ms; device time ``state_bwd`` 2.68 → 1.00 ms, ``state`` 1.21 → 0.73, the two XLA
        fusions that form the operands about 0.3 ms; float32: the in-kernel form's forward state pass
        needs 248 KB of shared memory with 3 stages, more than an H200 has; with 2 it runs, 52.4
        against 47.3 ms at (1, 4K, 16, 128)). The gated operands are stored per value head.
      cumsum_kernel: per-channel gates: the chunk-local cumulative gates ``b`` by a Pallas kernel of
        one ``[C, D]`` block per program (``layout.channel_chunk_cumsum``) instead of XLA's cumsum
        over the whole float32 ``[B, T, Hv, D]`` tensor, and its gradient (dg from db, the reverse
        sums) by a second kernel of the same grid. The per-channel default (``default_config``).
      num_warps_output_bwd: warps of the output backward kernel (``output_bwd``); None: ``num_warps_bwd``
        (the WY backward holds more live tiles than the output's: ptxas at 4 warps, GDN bf16 whole
        rows: ``output_bwd`` 255 registers and 64 B of spills, ``wy_bwd`` 1.2 KB of spills).
      stacked_pairs: per-channel gates: the forward kernels (``wy``'s Gram blocks, ``output``'s
        scores) form the products of all tile pairs after one key tile as one product of the whole
        chunk's rows (``products.channel_offdiag_stacked``: ``[C, w] × [w, n]``, wgmma-sized at C = 64
        where the pairwise ``[n, w] × [w, n]`` are not; twice the multiply-adds, same factors and
        blocks), the output backward their cotangents likewise (``channel_offdiag_stacked_vjp``,
        from ``dO V'ᵀ`` formed as whole-chunk columns and rows), and the WY backward (with the
        stored inverse and the state step in the same kernel) forms dX and ``dA = −Xᵀ dX Xᵀ`` as
        ``C × C`` products and A's pair cotangents the same way (``pallas_triton_stacked``; without
        ``store_inverse`` or with ``wy_bwd_split`` the WY backward keeps the tile pairs). Off by
        default: slower on an H200 (KDA fwd+bwd 28.8 against 24.6 ms at (1, 32K, 16, 128), session
        15; jax-linear-attention's KDA forms its off-diagonal blocks this way in Mosaic GPU).
      output_rows / wy_bwd_rows: per-channel gates: rows of the sub-tiles of the forward ``output``
        kernel / of ``wy_bwd`` alone (None: ``channel_rows``; at least ``channel_rows``, which the other
        kernels keep; the output backward reads the stored scores and the WY backward the stored
        inverse as blocks of its own size). The whole-input check then asks the larger tiles'
        factors to stay below e^40 (32 rows: log gates ≥ about −2.5 per token; a call without
        gradient checks the forward kernels' tiles alone: ``forward_factored_rows``). H200, KDA (1, 32K,
        16, 128) bf16, session 22: 32-row tiles everywhere cost 10.12 against 9.58 ms of device time
        but took ``wy_bwd`` 3.95 → 3.40 and ``output`` 1.01 → 0.83 ms (``wy`` 1.03 → 2.24); these
        two fields take the larger tiles only there, and only in the factored form (the exact kernels
        keep ``channel_rows``). The bf16 default since session 23: device time 9.62 → 8.88 ms (``wy_bwd``
        3.96 → 3.41, ``output`` 1.02 → 0.84); gates that fail the 32-row check take the 16-row tiles
        (``products.by_gates``).
      wy_bwd_split: the WY backward as two kernels, the state step's shares of dk and db first
        (reading h, dh and V'), then the WY form's; False: one kernel holding both (more live
        registers: ptxas reported spills for it).
    """

    chunk: int = 64
    block_e: int = 32
    block_cols: int = 32
    splits: int = 1
    num_warps: int = 8
    num_stages: int = 2
    num_warps_state: int = 4
    num_stages_state: int = 3
    num_warps_bwd: int = 8
    num_stages_bwd: int = 1
    wy_rows: int = SUB_TILE
    channel_rows: int = SUB_TILE
    store_inverse: bool = False
    inverse_precision: str = "highest"
    store_scores: bool = False
    wy_bwd_split: bool = False  # H200 sweep: fused 13.09 vs split 13.56 ms (GDN), 59.4 vs 60.0 (KDA)
    fuse_output: bool = False
    num_warps_output_bwd: int | None = None
    stacked_pairs: bool = False
    num_stages_bwd_exact: int | None = None
    pregated_state: bool = False
    cumsum_kernel: bool = False
    output_rows: int | None = None
    wy_bwd_rows: int | None = None

    def __post_init__(self):
        for name in ("chunk", "block_e", "block_cols", "wy_rows", "channel_rows"):
            value = getattr(self, name)
            if value < SUB_TILE or value & (value - 1):
                raise ValueError(f"BlockConfig.{name}={value} must be a power of two >= {SUB_TILE}")
        for name in ("wy_rows", "channel_rows"):
            if getattr(self, name) > self.chunk:
                raise ValueError(f"BlockConfig.{name}={getattr(self, name)} must be at most chunk={self.chunk}")
        for name in ("output_rows", "wy_bwd_rows"):
            value = getattr(self, name)
            if value is not None and (value & (value - 1) or not self.channel_rows <= value <= self.chunk):
                raise ValueError(
                    f"BlockConfig.{name}={value} must be a power of two from channel_rows={self.channel_rows}"
                    f" to chunk={self.chunk}"
                )
        if self.inverse_precision not in INVERSE_PRECISIONS:
            raise ValueError(
                f"BlockConfig.inverse_precision={self.inverse_precision!r} must be one of {INVERSE_PRECISIONS}"
            )
        if self.splits < 1:
            raise ValueError(f"BlockConfig.splits={self.splits} must be positive")
        for name in ("num_warps", "num_warps_state", "num_warps_bwd", "num_warps_output_bwd"):
            value = getattr(self, name)
            if value is not None and (value < 1 or value & (value - 1)):
                raise ValueError(f"BlockConfig.{name}={value} must be a power of two (Triton warps per program)")
        for name in ("num_stages", "num_stages_state", "num_stages_bwd", "num_stages_bwd_exact"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"BlockConfig.{name}={getattr(self, name)} must be positive")
        if self.fuse_output and self.store_scores:
            raise ValueError("BlockConfig.fuse_output writes the output in the state pass, which stores no scores")

    @property
    def factored_rows(self) -> int:
        """Per-channel gates: the largest sub-tile any chunk kernel factors its diagonal tiles over
        (what the whole-input check of ``products.gate_case`` asks of case 2)."""
        return max(self.channel_rows, self.output_rows or 0, self.wy_bwd_rows or 0)

    @property
    def forward_factored_rows(self) -> int:
        """``factored_rows`` of the forward kernels alone (a call that takes no gradient)."""
        return max(self.channel_rows, self.output_rows or 0)

    def small_tiles(self) -> BlockConfig:
        """This config with every kernel on ``channel_rows`` sub-tiles (the exact form, and the
        factored form where the larger tiles' check fails: ``products.by_gates``)."""
        return dataclasses.replace(self, output_rows=None, wy_bwd_rows=None)


# interpret mode (CPU tests): the interpreter's programs are compiled by XLA once per shape, and the
# unrolled sub-tile math of larger chunks dominates that; 16-token chunks (one sub-tile) and 16-wide
# value blocks keep it fast (tests pass larger chunks explicitly to exercise the block solve)
# per-channel gates: the GPU default's state passes and cumulative-gate kernel
INTERPRET_CONFIG = BlockConfig(chunk=16, block_e=16, pregated_state=True, cumsum_kernel=True)


def default_config(
    *,
    batch: int,
    value_heads: int,
    seq_len: int,
    value_dim: int,
    interpret: bool,
    key_dim: int = 128,
    per_channel: bool = False,
    dtype=None,
    sequence_parallel: bool = False,
) -> BlockConfig:
    """Interpret mode: small chunks, one split, pregated per-channel state passes. GPU: 64-token
    chunks, value blocks of 32, and splits (a power of two) doubled while the state passes have
    fewer programs than twice the SMs under per-channel gates in float32 or in the split entry
    points (bf16/fp16 per-channel gates elsewhere take the scalar gates' rule, session 18, see
    below), fewer than a quarter of the SMs (33) under scalar or no gates, keeping at least 16 chunks
    per split (H200, bf16, GDN fwd+bwd with one split against the former two-per-SM
    rule: (1, 32K, 16, 128) 5.40 against 5.75 ms with 8 splits, (4, 8K, 16, 128) 4.25 against 5.77
    ms with 2, (1, 32K, 32, 128) 8.09 against 10.77 ms with 4: a split costs a transition pass over
    D + E columns and a local reverse pass, more than the parallelism it buys once the heads give
    the passes 64 programs; KDA (1, 32K, 16, 128): 40.16 ms with 8 splits, 40.11 with 2, 41.33 with
    1, so per-channel gates keep the rule. The split entry points of sequence parallelism
    (``sequence_parallel``, which run the transition and the local reverse pass anyway) split while
    fewer than half the SMs (66) have programs: 2×H200, GDN 32K tokens per GPU, 16 heads, allgather,
    2 / 4 / 8 / 16 runs per shard 5.60 / 5.64 / 5.86 / 6.29 ms), and where that cuts the shard under
    scalar or no gates they take 64-wide value blocks and twice the runs; the WY and output kernels
    take whole rows of keys and values at once (``block_cols`` = the padded head dim) under scalar or
    no gates (64-column blocks in float32 past head dim 128, where whole rows do not fit the shared
    memory), 32-column blocks under per-channel gates; float32 takes 2 state-pass stages; the
    forward stores each chunk's inverse for the WY backward (``store_inverse``: on whole chunks
    under scalar or no gates, by sub-tile blocks under per-channel gates). For bf16/fp16 inputs
    (``dtype``) under scalar or no gates the forward WY kernel works on whole chunks and forms the
    inverse in tf32 (``wy_rows`` = chunk, ``inverse_precision="tf32"``; bf16 since session 24 on bf16
    operands, below; H200, GDN (1, 32K, 16, 128) fwd+bwd 5.70 against 6.18 ms with 16-row tiles in
    float32, the same errors against the XLA path: the bf16 rounding of W and U dominates), and its
    forward chunk kernels (wy, output) and the
    output backward run 4 warps; float32 inputs keep the exact float32 inverse ("tf32x3" measured
    slower: 6.41 against 6.04 ms) and 8 warps. Per-channel gates store the output's score blocks for
    its backward (``store_scores``; H200, KDA (1, 32K, 16, 128) bf16 fwd+bwd 40.84 against 59.38
    ms) and run the backward chunk kernels with 4 warps. bf16 inputs (either gate form) form the
    inverse on bf16 operands (``inverse_precision="bf16"``, session 24).

    The other warps from ptxas register counts of a Triton 3.9 sm_90 build (the 16-row-tile wy
    kernel spilled at 4 warps, not at 8); ``block_cols`` from the H200 sweep of 2026-11-30 (GDN (1, 32K, 16, 128) bf16
    fwd+bwd: 10.5 ms whole rows, 13.2 ms 32 or 64 columns; ``wy_rows`` 32 13.3 ms, 64 18.8 ms).
    Under scalar or no gates, outside sequence parallelism, when the 32-wide value blocks would give
    between a quarter and half of the SMs programs, the blocks are 16 wide (``block_e``). At (B, T,
    Hv) = (1, 32K, 16) with E = 128 this gives 128 programs of 16 columns and one split (GDN), 8
    splits (KDA: 512 programs of 32 columns, 64 chunks each).
    """
    if interpret:
        return INTERPRET_CONFIG
    two_byte = is_two_byte(dtype)
    cfg = BlockConfig(
        block_e=min(32, value_dim),
        block_cols=32 if per_channel else max(16, key_dim, value_dim),
        # the WY backward reads X and forms no Gram block (H200, KDA (1, 32K, 16, 128) bf16 fwd+bwd
        # 24.96 against 27.11 ms forming G and X again from 16-row tiles)
        store_inverse=True,
        store_scores=per_channel,
        # per-channel gates: 4 warps in the backward chunk kernels since their diagonal tiles'
        # cotangents go by levels of products (H200, KDA (1, 32K, 16, 128) bf16 fwd+bwd 26.82
        # against 33.55 ms with 8 warps, 40.55 ms with 8 warps and the pair tensors before)
        num_warps_bwd=4 if per_channel else 8,
        # per-channel gates: the state passes read gated keys / queries formed once in XLA (session
        # 19, H200, KDA (1, 32K, 16, 128) bf16 fwd+bwd 12.42 → 10.88 ms: state_bwd 2.68 → 1.00 ms,
        # state 1.21 → 0.73). float32 too: there the in-kernel form with 3 state stages did not launch
        # (its forward state pass asked for 248 KB of shared memory, 227 KB available); at (1, 4K, 16,
        # 128) pregated 47.3 ms against 52.4 in-kernel with 2 stages
        pregated_state=per_channel,
        # per-channel gates: the chunk-local cumulative gates and their reverse sums (dg) by Pallas
        # kernels (sessions 21-22, H200, KDA (1, 32K, 16, 128) bf16: forward 3.54 ms once against
        # 3.71 / 3.73 in two default runs; the reverse sums 0.155 ms against XLA's 0.41, with
        # session 22's pregated operands fwd+bwd 11.04 -> 10.33 ms)
        cumsum_kernel=per_channel,
    )
    if not per_channel and two_byte:
        # and 4 warps in the forward chunk kernels (H200, GDN (1, 32K, 16, 128) bf16: wy 0.89 → 0.37
        # ms, output 0.38 → 0.22 ms, fwd+bwd 4.55 → 3.90 ms; offline ptxas: the whole-chunk wy
        # kernel takes 176 registers and two programs per SM at 4 warps, 245 and one at 8) and in
        # the output backward (output_bwd 0.65 → 0.41 ms, fwd+bwd 3.91 → 3.73 ms; 255 registers,
        # 64 B of spills, two programs per SM; the WY backward keeps 8: 1.2 KB of spills at 4)
        cfg = dataclasses.replace(cfg, wy_rows=cfg.chunk, inverse_precision="tf32", num_warps=4, num_warps_output_bwd=4)
    # per-channel gates in bf16/fp16, since the diagonal sub-tiles are one product when the gates allow
    # it (session 17): 4 warps in the forward chunk kernels, 2 stages in the backward ones where the
    # tiles are factored, and the state passes by the scalar gates' rule (H200, KDA (1, 32K, 16, 128)
    # bf16 fwd+bwd, session 18: 15.51 → 13.80 → 13.03 → 12.56 ms; the exact kernels behind the cond
    # 24.96 → 24.09 with 4 warps, 31.10 with 2 stages, hence ``num_stages_bwd_exact=1``)
    channel_fast = per_channel and two_byte
    if channel_fast:
        cfg = dataclasses.replace(cfg, num_warps=4, num_stages_bwd=2, num_stages_bwd_exact=1)
    bf16 = dtype is not None and jnp.dtype(dtype) == jnp.bfloat16
    if per_channel and bf16 and max(key_dim, value_dim) <= 128:
        # and 32-row sub-tiles in the forward output kernel and the WY backward where the gates allow
        # them (log gates >= about -2.5 per token; else 16-row tiles, or the exact kernels: the
        # three-way switch of ``products.by_gates``). H200, KDA (1, 32K, 16, 128) bf16 fwd+bwd,
        # session 23: device time 9.62 -> 8.88 ms (wy_bwd 3.96 -> 3.41, output 1.02 -> 0.84), wall
        # 10.07 -> 9.45 ms. float16 takes the exact kernels (no factored tiles); float32 and heads
        # wider than 128 were not timed with them
        cfg = dataclasses.replace(cfg, output_rows=min(32, cfg.chunk), wy_bwd_rows=min(32, cfg.chunk))
    if bf16:
        # the inverse's products on bf16 operands, float32 sums (X is rounded to bf16 for its products
        # with the keys and values anyway). H200, (1, 32K, 16, 128) bf16, session 24 call C: GDN fwd
        # 1.51 -> 1.26 ms, fwd+bwd 3.67 -> 3.60 (its backward reads the stored X); KDA 3.29 / 9.54 ->
        # 3.08 / 9.29. float16 keeps tf32 / float32 (not timed)
        cfg = dataclasses.replace(cfg, inverse_precision="bf16")
    if not two_byte:
        # float32 tiles are twice as large: on an H200 (session 20) GDN's former float32 default did
        # not launch at head dim 128 (its reverse state pass asked for 249344 B of shared memory with
        # 3 stages, 232448 B available; 131840 B by an offline build with 2) nor at 256 (whole-row
        # column blocks: 344064 B; 128 columns: 262144 B; 64 ran, call C): 2 state stages, and past
        # head dim 128 column blocks of at most 64 columns
        cfg = dataclasses.replace(cfg, num_stages_state=2)
        if max(key_dim, value_dim) > 128:
            cfg = dataclasses.replace(cfg, block_cols=min(cfg.block_cols, 64))
    # head dims past 128: fewer state-pass stages (past 227 KB of shared memory a launch fails)
    stages = state_pass_stages(cfg.num_stages_state, key_dim=key_dim, value_dim=value_dim, two_byte=two_byte)
    cfg = dataclasses.replace(cfg, num_stages_state=stages)
    scalar_rule = not per_channel or (channel_fast and not sequence_parallel)
    programs = batch * value_heads * (value_dim // cfg.block_e)
    few = programs >= NUM_SMS // 4 and 2 * programs <= NUM_SMS
    if few and scalar_rule and not sequence_parallel and cfg.block_e == 32:
        # half the SMs or fewer busy: 16-wide value blocks (twice the programs, each step half as
        # wide); H200, GDN bf16 fwd+bwd: (1, 32K, 16, 128) 5.15 against 5.72 ms (5.37 / 5.73 in
        # another run); at 32 heads (128 programs of 32) 16-wide blocks lose, 9.94 against 8.16 ms;
        # the split entry points of sequence parallelism lose too (2×H200, 32K tokens per GPU, 16
        # heads, 2 / 4 / 8 runs: 7.36 / 7.52 / 7.69 against 5.85 ms with 32-wide blocks and 8 runs)
        cfg = dataclasses.replace(cfg, block_e=16)
        programs *= 2
    target = NUM_SMS // 2 if sequence_parallel and not per_channel else NUM_SMS // 4 if scalar_rule else 2 * NUM_SMS
    chunks = -(-seq_len // cfg.chunk)
    splits = state_pass_splits(programs, chunks, target=target)
    wide_ok = sequence_parallel and not per_channel and two_byte and cfg.block_e == 32 and value_dim >= 64
    if (
        wide_ok
        and splits > 1
        and key_dim <= 128
        and state_pass_splits(programs // 2, chunks, target=target) == 2 * splits
    ):
        # where the shard is cut into runs anyway: 64-wide value blocks and twice the runs (the same
        # programs, half the sequential steps each); H200, a rank's own work at (1, 32K, 16, 128) bf16
        # fwd+bwd (benchmarks/delta_rule_rank_work.py, session 16): 4 runs of 64 3.93 ms against 4.07
        # with 2 runs of 32 (the single-device op: 3.75); 8 runs of 64 4.09, 4 runs of 32 4.15. Only
        # where that was measured: bf16/fp16, heads up to 128 wide, and the runs can double
        cfg = dataclasses.replace(cfg, block_e=64)
        splits *= 2
    return dataclasses.replace(cfg, splits=splits)
