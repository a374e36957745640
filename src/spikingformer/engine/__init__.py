"""Training and evaluation engine: loops, checkpoints, distributed set-up, and the CLI commands."""

from spikingformer import _lazy_exports

_EXPORTS = {
    "evaluate_checkpoint": "spikingformer.engine.evaluation",
    "evaluate": "spikingformer.engine.trainer",
    "train": "spikingformer.engine.trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
