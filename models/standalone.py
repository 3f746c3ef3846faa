"""The token mixers as drop-in layers for your own model: Flax NNX classes and their Linen forms.

Each layer takes its own small constructor arguments (no ``ModelConfig``, no layer index) and is
called as ``layer(x, ctx=None, *, segment_ids=None, cache=None) -> (y, cache)`` on ``x`` ``[B, T,
d_model]``:

- ``ctx``: a ``LaspContext`` (mesh, sequence/batch/head axes, strategy, impl) or None for one
  device. Under a mesh the layer runs sequence-parallel (LASP) over ``ctx.seq_axis`` and, with
  ``ctx.head_axis``, tensor-parallel over the heads (notes/design.md §2-3).
- ``segment_ids`` ``[B, T]``: packed documents; nothing flows between them.
- ``cache``: ``layer.init_cache(batch)`` (softmax: ``init_cache(batch, size)``) to continue a
  sequence: the layer starts from it and returns the cache after x (None in, None out).

| layer | what it runs |
|---|---|
| ``LinearAttention`` | causal linear attention; ``g_gamma`` (per-head log decays) makes it lightning attention |
| ``GatedDeltaNet`` | Gated DeltaNet (short convolution, gated delta rule, per-head gates) |
| ``KDA`` | Kimi Delta Attention (per-channel gates from a low-rank projection) |
| ``GatedLinearAttention`` | GLA: linear attention with per-channel decays from a rank-16 gate, output gate |
| ``SoftmaxAttention`` | causal softmax attention (LASP-2H all-gather or ring under a mesh) |

The language models in ``models.model`` are built from these same classes (``from_config``), so
their parameter names are the ones here. ``to_linen(Layer, ...)`` wraps any of them as a Linen
module through ``flax.nnx.bridge``; the Linen names below are ready-made wrappers.
"""

from __future__ import annotations

import functools

from flax import linen, nnx

from models.delta_layers import KDA, DeltaRuleState, GatedDeltaNet
from models.gla_layers import GatedLinearAttention
from models.layers import KVCache, LaspContext, LinearAttention, LinearCache, SoftmaxAttention
from models.mixer_math import tnl_log_decay

__all__ = [
    "KDA",
    "DeltaRuleState",
    "GatedDeltaNet",
    "GatedLinearAttention",
    "KVCache",
    "LaspContext",
    "LinearAttention",
    "LinearCache",
    "LinenGatedDeltaNet",
    "LinenGatedLinearAttention",
    "LinenKDA",
    "LinenLinearAttention",
    "LinenSoftmaxAttention",
    "SoftmaxAttention",
    "tnl_log_decay",
    "to_linen",
]


def to_linen(layer: type[nnx.Module], *args, name: str | None = None, **kwargs) -> linen.Module:
    """A Linen module of the NNX ``layer`` built with ``args``/``kwargs`` (``rngs`` comes from Linen's
    ``params`` stream). Call it as the layer: ``module.apply(variables, x, ctx, cache=...)``; the
    parameters live under ``variables["params"]`` with the layer's own names."""
    return nnx.bridge.to_linen(layer, *args, name=name, **kwargs)


LinenLinearAttention = functools.partial(to_linen, LinearAttention)
LinenSoftmaxAttention = functools.partial(to_linen, SoftmaxAttention)
LinenGatedDeltaNet = functools.partial(to_linen, GatedDeltaNet)
LinenKDA = functools.partial(to_linen, KDA)
LinenGatedLinearAttention = functools.partial(to_linen, GatedLinearAttention)
