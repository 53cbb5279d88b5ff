"""pyddl.train: `pyddl train` as a library (config, recipe, data, models, checkpoints, reports, loop).

The building blocks work without a process group; `train(TrainConfig(...))` runs the
distributed loop on every rank of a job (see docs/train.md).
"""

from pyddl.train.checkpoint import CheckpointManager
from pyddl.train.config import TrainConfig
from pyddl.train.data import ShardSampler, load_data
from pyddl.train.models import build_model
from pyddl.train.recipe import LARS, Recipe
from pyddl.train.trainer import NonFiniteLossError, RunResult, train

__all__ = ["CheckpointManager", "LARS", "NonFiniteLossError", "Recipe", "RunResult",
           "ShardSampler", "TrainConfig", "build_model", "load_data", "train"]
