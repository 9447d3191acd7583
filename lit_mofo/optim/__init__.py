"""Optimizers and ``configure_optimizers`` helpers."""

from lit_mofo.optim.helpers import mofo_configure_optimizers, mofo_param_groups, warmup_lr_scheduler
from lit_mofo.optim.mofo import MoFO, MoFOStepResult, MoFOStepStats, mofo, selection_mask

__all__ = [
    "MoFO",
    "MoFOStepResult",
    "MoFOStepStats",
    "mofo",
    "mofo_configure_optimizers",
    "mofo_param_groups",
    "selection_mask",
    "warmup_lr_scheduler",
]
