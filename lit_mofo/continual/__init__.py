"""Continual fine-tuning: a sequence of stages in one ``trainer.fit``, with the accuracy matrix measured live.

- :class:`Stage` and :class:`StageSequence` (:mod:`~lit_mofo.continual.stages`): the stages (data, task probe,
  budget, learning rate) and the data module that serves them, one Lightning epoch per stage; :func:`stage_steps`,
  the budget a ``configure_optimizers`` schedule spans.
- :class:`ContinualLearning` (:mod:`~lit_mofo.continual.callback`): the callback that drives the stages (a fresh
  optimizer and schedule per stage, the stage protocol :class:`StageCallback` for the other callbacks) and measures
  the accuracy matrix, OP, BWT, forgetting and FWT, logged, written after every stage and reported.
- :mod:`~lit_mofo.continual.metrics`: the figures of an accuracy matrix, with their definitions and sources.
"""

from lit_mofo.continual.callback import MATRIX_STEM, ContinualLearning, StageCallback, StageContext, continual_learning
from lit_mofo.continual.metrics import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forgetting,
    forward_transfer,
)
from lit_mofo.continual.stages import Stage, StageLoader, StageSequence, stage_steps

__all__ = [
    "MATRIX_STEM",
    "ContinualLearning",
    "Stage",
    "StageCallback",
    "StageContext",
    "StageLoader",
    "StageSequence",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "continual_learning",
    "forgetting",
    "forward_transfer",
    "stage_steps",
]
