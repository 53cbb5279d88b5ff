"""pyddl.train: the building blocks of `pyddl train` (config, recipe, data, models, checkpoints, reports).

Each submodule works without a process group; the distributed loop composes them with the core.
"""

from pyddl.train.checkpoint import CheckpointManager
from pyddl.train.config import TrainConfig
from pyddl.train.data import ShardSampler, load_data
from pyddl.train.models import build_model
from pyddl.train.recipe import LARS, Recipe

__all__ = ["CheckpointManager", "LARS", "Recipe", "ShardSampler", "TrainConfig", "build_model",
           "load_data"]
