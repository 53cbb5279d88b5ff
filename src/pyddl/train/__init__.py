"""pyddl.train: `pyddl train` as a library (config, recipe, data, models, checkpoints, reports, loop).

The building blocks work without a process group; `train(TrainConfig(...))` runs the
distributed loop on every rank of a job (see docs/train.md). The names below load on first use,
so `import pyddl.train.recipe` (pure) does not pull in torch.
"""

from pyddl._lazy import lazy_exports

_EXPORTS = {
    "CheckpointManager": "pyddl.train.checkpoint",
    "TrainConfig": "pyddl.train.config",
    "ShardSampler": "pyddl.train.data",
    "load_data": "pyddl.train.data",
    "build_model": "pyddl.train.models",
    "LARS": "pyddl.train.optim",
    "Recipe": "pyddl.train.recipe",
    "NonFiniteLossError": "pyddl.train.trainer",
    "RunResult": "pyddl.train.trainer",
    "train": "pyddl.train.trainer",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
