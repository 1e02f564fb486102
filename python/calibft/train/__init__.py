"""The recipe: calibration fine-tuning of a causal LM with LoRA (soft or hard targets)."""

from calibft.train.config import PRESETS, TrainConfig, load_config
from calibft.train.loop import train

__all__ = ["PRESETS", "TrainConfig", "load_config", "train"]
