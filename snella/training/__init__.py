"""The pieces of `snella finetune`: its config, methods, data, checkpoints, data parallelism, reports and run tools."""

from snella.training.config import TrainConfig

__all__ = ["TrainConfig"]
