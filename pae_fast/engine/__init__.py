"""The shared training engine (all stages): ``train(task, cfg, out_dir, seed, config_yaml) -> TrainResult``.

See :mod:`pae_fast.engine.loop` for the step, :mod:`pae_fast.engine.outputs` for the log line and checkpoint
writing, :mod:`pae_fast.engine.checkpoint` for the checkpoint layout and
:mod:`pae_fast.engine.distributed` for the process-group helpers. Trained weights are loaded back through
:mod:`pae_fast.weights`.
"""

from pae_fast.engine.checkpoint import CheckpointError, latest_checkpoint
from pae_fast.engine.loop import NonFiniteLossError, TrainResult, train
from pae_fast.engine.task import LossFn, TrainTask

__all__ = [
    "train",
    "TrainTask",
    "TrainResult",
    "LossFn",
    "latest_checkpoint",
    "CheckpointError",
    "NonFiniteLossError",
]
