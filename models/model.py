"""Decoder-only language model: embedding, blocks of (token mixer, channel mixer), final norm, head.

Training and prefill run whole sequences (``hidden``/``__call__``/``prefill``) through the chunked,
sequence-parallel op; decoding (``decode_step``) advances each linear layer's float32 recurrent
state by one token, so memory per generated token is constant. Softmax layers of hybrid models
(``layer_types``) run ``lasp_jax.softmax_attention`` on whole sequences and decode from a key/value
cache of fixed capacity (``cache_size``: prompt + new tokens), so their memory grows with the length.
Positions are global token indices, so LRPE/RoPE see the same positions whether or not the sequence is sharded.

With ``config.scan_layers`` the blocks' parameters are stacked and training runs them under one
``lax.scan`` (``models.layer_scan``: one step per period of the layer pattern, the remaining layers
after it), so compile time stays flat in depth; prefill and decoding run the layers one by one from
views of the stacked parameters (``layers()``), so generation is the same in both layouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.config import ModelConfig
from models.delta_layers import DELTA_MIXERS, DeltaRuleMixer
from models.gla_layers import GLA_MIXERS
from models.layer_scan import ScannedBlocks, scan_shape
from models.layers import SINGLE_DEVICE, Dense, Embed, LaspContext, LinearAttention, Mlp, Norm, SoftmaxAttention
from models.loss import cross_entropy_sum, head_logits

Array = jax.Array

BLOCK_INPUT = "block_input"  # the checkpoint name of each block's input (what remat "full" and "offload" keep)
REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute each block in the backward
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight-matmul outputs
    # "full" with each block's input kept in pinned host memory (copied back for its backward): at a
    # million tokens of TNL-1B the 16 saved inputs are 64 GiB of device memory under "full", none here
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=(BLOCK_INPUT,),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


class Block(nnx.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``.

    The token mixer is chosen per layer from ``config.types``: ``"linear"`` (the family's recurrent
    mixer: ``LinearAttention``, ``GatedDeltaNet`` / ``KDA`` for the delta-rule families, or
    ``GatedLinearAttention`` for ``gla``) or ``"softmax"`` (``SoftmaxAttention``, hybrid models).
    """

    def __init__(self, config: ModelConfig, layer: int, *, rngs):
        self.layer_type = config.types[layer]
        self.attn_norm = Norm(config.norm, config.d_model, eps=config.norm_eps, config=config)
        mixer = (DELTA_MIXERS | GLA_MIXERS).get(config.family, LinearAttention)
        mixer = SoftmaxAttention if self.layer_type == "softmax" else mixer
        self.attn = mixer.from_config(config, layer, rngs=rngs)
        self.mlp_norm = Norm(config.norm, config.d_model, eps=config.norm_eps, config=config)
        self.mlp = Mlp(config, rngs=rngs)

    def __call__(self, x, ctx: LaspContext, positions, *, initial_state=None, return_state=False, segment_ids=None):
        h, state = self.attn(
            self.attn_norm(x),
            ctx,
            positions,
            initial_state=initial_state,
            return_state=return_state,
            segment_ids=segment_ids,
        )
        x = ctx.constrain(x + h)
        x = ctx.constrain(x + self.mlp(self.mlp_norm(x), ctx))
        return x, state

    def step(self, x, state, position):
        h, state = self.attn.step(self.attn_norm(x), state, position)
        x = x + h
        # one token per row as [B, 1, d]: the MLP's token chunks (mlp_chunk) cut the second axis
        return x + self.mlp(self.mlp_norm(x)[:, None])[:, 0], state


class LanguageModel(nnx.Module):
    """A causal LM over ``config.vocab_size`` tokens; ``__call__(tokens) -> float32 logits``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(config, rngs=rngs)
        blocks = [Block(config, layer, rngs=rngs) for layer in range(config.n_layers)]
        # the attribute names are the parameter paths models.layer_scan's layout converters use
        if config.scan_layers:
            period, steps = scan_shape(config)
            self.layer_scan = ScannedBlocks(blocks[: steps * period], period)
            self.tail_blocks = nnx.List(blocks[steps * period :])  # the layers after the last whole period
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = Norm(config.norm, config.d_model, eps=config.norm_eps, config=config)
        if not config.tie_embeddings:
            self.head = Dense(
                config.d_model, config.vocab_size, ("embed", "vocab"), std=config.init_std, config=config, rngs=rngs
            )

    def hidden(
        self,
        tokens: Array,
        ctx: LaspContext = SINGLE_DEVICE,
        *,
        remat: str = "none",
        initial_states: list[Array] | None = None,
        return_states: bool = False,
        segment_ids: Array | None = None,
        start: int = 0,
    ) -> tuple[Array, list[Array] | None]:
        """Final-normed hidden states ``[B, T, d_model]`` (and each layer's final state).

        ``segment_ids`` ``[B, T]`` int (packed documents, see ``document_ids``): no token mixer lets
        anything flow between documents. Positions stay global; LRPE and RoPE are relative, so a
        document sees the same attention wherever it sits in the row. ``start``: the position of the
        first token (a continuation from ``initial_states``).
        """
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer [B, T], got shape={tokens.shape} dtype={tokens.dtype}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got remat={remat!r}")
        positions = start + jnp.arange(tokens.shape[1])
        x = ctx.constrain(self.embed(tokens))
        if return_states or initial_states is not None:
            states = []
            for i, block in enumerate(self.layers()):
                init = None if initial_states is None else initial_states[i]
                x, state = block(
                    x, ctx, positions, initial_state=init, return_state=return_states, segment_ids=segment_ids
                )
                states.append(state)
            return self.final_norm(x), (states if return_states else None)

        def layer(block, x):
            return block(checkpoint_name(x, BLOCK_INPUT), ctx, positions, segment_ids=segment_ids)[0]

        if self.config.scan_layers:
            x = self.layer_scan(x, layer, remat=remat != "none", policy=REMAT_POLICIES[remat])
            blocks = self.tail_blocks
        else:
            blocks = self.blocks
        if remat != "none":
            layer = nnx.remat(layer, policy=REMAT_POLICIES[remat])
        for block in blocks:
            x = layer(block, x)
        return self.final_norm(x), None

    def logits(self, hidden: Array) -> Array:
        """float32 logits of hidden states: products in the compute dtype (``models.loss.head_logits``)."""
        return head_logits(hidden, self.head_weight(), tied=self.config.tie_embeddings, dtype=self.embed.dtype)

    def head_weight(self) -> Array:
        """The output head: the ``[V, d]`` embedding table when tied, else the ``[d, V]`` kernel."""
        return self.embed.table[...] if self.config.tie_embeddings else self.head.kernel[...]

    def __call__(self, tokens: Array, ctx: LaspContext = SINGLE_DEVICE, *, remat: str = "none") -> Array:
        return self.logits(self.hidden(tokens, ctx, remat=remat)[0])

    def layers(self) -> list[Block]:
        """Every block in layer order; a scanned model's are views of its stacked parameters."""
        if not self.config.scan_layers:
            return list(self.blocks)
        return self.layer_scan.layer_blocks() + list(self.tail_blocks)

    # ---- generation ----
    @property
    def has_softmax_layers(self) -> bool:
        return "softmax" in self.config.types

    def init_states(self, batch: int, cache_size: int | None = None) -> list:
        """Empty decoding states: float32 ``[B, H, D', E']`` per linear layer, a zero key/value cache
        of ``cache_size`` positions per softmax layer (needed, and only used, by hybrid models)."""
        states = []
        for block in self.layers():
            if isinstance(block.attn, SoftmaxAttention):
                if not cache_size:
                    raise ValueError("a model with softmax layers decodes from a key/value cache: pass cache_size=")
                dtype = jnp.dtype(self.config.dtype)
                states.append(tuple(jnp.zeros(s, dtype) for s in block.attn.cache_shapes(batch, cache_size)))
            elif isinstance(block.attn, DeltaRuleMixer):
                states.append(block.attn.init_state(batch))
            else:
                states.append(jnp.zeros(block.attn.state_shape(batch), jnp.float32))
        return states

    def prefill(
        self,
        tokens: Array,
        ctx: LaspContext = SINGLE_DEVICE,
        initial_states: list | None = None,
        *,
        cache_size: int | None = None,
        start: int | None = None,
    ) -> tuple[Array, list]:
        """Run a prompt with the chunked (sequence-parallel) op: last-token logits ``[B, V]`` and states.

        Softmax layers return their keys and values padded to ``cache_size`` positions (≥ the prompt
        length; needed for hybrid models), ready for ``decode_step`` at position ``T``. A prompt
        continued from ``initial_states`` (a previous prefill's) needs ``start``, the position of its
        first token, when the model has positions (LRPE, RoPE).
        """
        if self.has_softmax_layers and initial_states is not None:
            raise ValueError("prefill of a model with softmax layers starts from the first token (initial_states=None)")
        if initial_states is not None and start is None and self.config.position != "none":
            raise ValueError(
                f"prefill from initial_states with position={self.config.position!r} needs start= the position of "
                "the first token (the number of tokens before it)"
            )
        start = 0 if start is None else start
        h, states = self.hidden(tokens, ctx, initial_states=initial_states, return_states=True, start=start)
        if self.has_softmax_layers:
            t = tokens.shape[1]
            if cache_size is None or cache_size < t:
                raise ValueError(f"cache_size must be >= the prompt length {t} for softmax layers, got {cache_size}")
            pad = ((0, 0), (0, cache_size - t), (0, 0), (0, 0))
            states = [
                tuple(jnp.pad(x.astype(jnp.dtype(self.config.dtype)), pad) for x in s) if isinstance(s, tuple) else s
                for s in states
            ]
        return self.logits(h[:, -1]), states

    def decode_step(self, token: Array, states: list, position: Array) -> tuple[Array, list]:
        """One token per row: token ``[B]`` at global ``position`` → logits ``[B, V]`` and the new states.

        With softmax layers ``position`` must be a scalar (the cache slot written), below ``cache_size``.
        """
        x = self.embed(token)
        new_states = []
        for block, state in zip(self.layers(), states, strict=True):
            x, state = block.step(x, state, position)
            new_states.append(state)
        return self.logits(self.final_norm(x)), new_states


def document_ids(tokens: Array, eod_token: int) -> Array:
    """Segment ids ``[B, T]`` int32 of packed rows: the number of ``eod_token``s strictly before each
    position, so an EOD token belongs to the document it ends and the next token starts a new one."""
    is_eod = (tokens == eod_token).astype(jnp.int32)
    return jnp.cumsum(is_eod, axis=1) - is_eod


def lm_loss(
    model: LanguageModel,
    tokens: Array,
    targets: Array,
    ctx: LaspContext = SINGLE_DEVICE,
    *,
    remat: str = "none",
    loss_chunks: int = 1,
    eod_token: int | None = None,
) -> tuple[Array, Array]:
    """Mean next-token cross entropy over targets ≥ 0; returns (loss, number of counted tokens).

    With ``eod_token`` (packed documents) the token mixers get ``document_ids(tokens, eod_token)``
    and the target after each EOD input (the next document's first token, which nothing in its own
    document predicts) is not counted, so neither attention nor the loss crosses a document
    boundary: the loss sum equals that of each document run alone.

    With ``loss_chunks = k > 1`` the ``[B, T, V]`` logits are never materialised at once: tokens
    ``t ≡ j (mod k)`` form chunk j (strided, so each chunk stays sharded over the sequence axis).
    The head and the loss are ``models.loss.cross_entropy_sum``: bf16 products with float32
    accumulation, gradients formed chunk by chunk in the forward pass, no logits kept.
    """
    segment_ids = None if eod_token is None else document_ids(tokens, eod_token)
    h, _ = model.hidden(tokens, ctx, remat=remat, segment_ids=segment_ids)
    mask = targets >= 0
    if eod_token is not None:
        mask = mask & (tokens != eod_token)
    total = cross_entropy_sum(
        h,
        model.head_weight(),
        jnp.where(mask, targets, 0),
        mask,
        tied=model.config.tie_embeddings,
        dtype=model.embed.dtype,
        chunks=max(loss_chunks, 1),
    )
    count = jnp.sum(mask)
    return total / jnp.maximum(count, 1), count
