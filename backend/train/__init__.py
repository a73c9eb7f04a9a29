"""Training: device-resident data, the Hashing-NVD loop, checkpoints."""

from .checkpoint import load_checkpoint, read_meta, save_checkpoint
from .trainer import Trainer, TrainState, resolve_device

__all__ = ["Trainer", "TrainState", "resolve_device", "save_checkpoint", "load_checkpoint", "read_meta"]
