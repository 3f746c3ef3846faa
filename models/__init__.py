"""Flax NNX linear-attention and delta-rule language models (TNL, Linear Transformer, Linear-Llama3,
Gated DeltaNet, KDA, and their softmax hybrids) trained with LASP."""

from models.config import PRESETS, ModelConfig, get_config
from models.layers import LaspContext
from models.model import LanguageModel, lm_loss

__all__ = ["PRESETS", "LanguageModel", "LaspContext", "ModelConfig", "get_config", "lm_loss"]
