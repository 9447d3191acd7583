"""Callbacks a test adds to a ``lit-mofo`` subprocess with ``--trainer.callbacks+=run_markers.<Name>`` (the test puts
this directory on ``PYTHONPATH``)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl


class TouchAtStep(pl.Callback):
    """Writes ``path`` once the fit has taken ``step`` optimizer steps: the test then knows training is under way."""

    def __init__(self, path: str, step: int = 3) -> None:
        self.path = Path(path)
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            self.path.write_text(str(trainer.global_step))
