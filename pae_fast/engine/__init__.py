"""The shared training engine (all stages)."""

from pae_fast.engine.task import LossFn, TrainTask

__all__ = ["LossFn", "TrainTask"]
