"""Flax NNX linear-attention language models (TNL, Linear Transformer, Linear-Llama3) trained with LASP."""

from models.config import PRESETS, ModelConfig, get_config
from models.layers import LaspContext
from models.model import LanguageModel, lm_loss

__all__ = ["PRESETS", "LanguageModel", "LaspContext", "ModelConfig", "get_config", "lm_loss"]
