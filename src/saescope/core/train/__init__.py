"""Training SAEs on every layer from one forward pass per batch."""

from saescope.core.train.config import PRESETS, TrainConfig, parse_layers
from saescope.core.train.run import TrainLaunch, TrainResult, run_train
from saescope.core.train.trainer import Trainer, resolve_device, resolve_dtype

__all__ = ["PRESETS", "TrainConfig", "TrainLaunch", "TrainResult", "Trainer", "parse_layers", "resolve_device",
           "resolve_dtype", "run_train"]
