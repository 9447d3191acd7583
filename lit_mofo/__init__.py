"""lit_mofo: fine-tune pre-trained models with PyTorch Lightning without forgetting what they knew."""

from lit_mofo.callbacks import (
    ForgettingMonitor,
    HalfFineTuning,
    L2ToPretrained,
    MoFOCallback,
    ParameterDrift,
    TaskVectorScaling,
)
from lit_mofo.continual import ContinualLearning, Stage, StageSequence, stage_steps
from lit_mofo.optim import (
    MoFO,
    MoFOStepStats,
    mofo_configure_optimizers,
    mofo_param_groups,
    warmup_lr_scheduler,
)
from lit_mofo.snapshot import PretrainedSnapshot

__version__ = "0.2.0.dev0"

__all__ = [
    "ContinualLearning",
    "ForgettingMonitor",
    "HalfFineTuning",
    "L2ToPretrained",
    "MoFO",
    "MoFOCallback",
    "MoFOStepStats",
    "ParameterDrift",
    "PretrainedSnapshot",
    "Stage",
    "StageSequence",
    "TaskVectorScaling",
    "__version__",
    "mofo_configure_optimizers",
    "mofo_param_groups",
    "stage_steps",
    "warmup_lr_scheduler",
]
