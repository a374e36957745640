"""Training and evaluation engine: loops, checkpoints, distributed set-up, and the CLI commands."""

from spikingformer.engine.evaluation import evaluate_checkpoint
from spikingformer.engine.trainer import evaluate, train

__all__ = ["evaluate", "evaluate_checkpoint", "train"]
