"""Lightning callbacks: MoFO as a callback, Half Fine-Tuning, forgetting evaluation, parameter drift, L2 to θ₀,
post-hoc task-vector scaling."""

from lit_mofo.callbacks.forgetting_monitor import ForgettingMonitor
from lit_mofo.callbacks.half_finetuning import HalfFineTuning
from lit_mofo.callbacks.l2_to_pretrained import L2ToPretrained
from lit_mofo.callbacks.mofo_callback import MoFOCallback
from lit_mofo.callbacks.parameter_drift import ParameterDrift
from lit_mofo.callbacks.task_vector_scaling import TaskVectorScaling

__all__ = [
    "ForgettingMonitor",
    "HalfFineTuning",
    "L2ToPretrained",
    "MoFOCallback",
    "ParameterDrift",
    "TaskVectorScaling",
]
