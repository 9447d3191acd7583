"""Lightning's progress bars with three fixes for step-limited and resumed runs.

With ``max_steps`` set (so ``max_epochs == -1``), Lightning's bars show ``Epoch 0/-2`` (the rich bar), count the epoch's
total from the batches *left* after a mid-epoch resume (``150/99`` instead of ``150/200``) and ignore gradient
accumulation; after a resume into ``version_2`` the run's version shows as ``on_2`` (the last 4 letters; the rich bar
formats it as ``0.000`` otherwise). :class:`ResumableTQDMProgressBar` and :class:`ResumableRichProgressBar` fix all
three, and :class:`ProgressBarFixes` gives the fixes to the bar the Trainer already has (Lightning's default one
included), so a config keeps ``enable_progress_bar`` and Lightning's choice of bar::

    trainer:
      callbacks:
        - class_path: lit_mofo.progress.ProgressBarFixes
"""

from __future__ import annotations

import re

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from typing_extensions import override

__all__ = ["ProgressBarFixes", "ResumableRichProgressBar", "ResumableTQDMProgressBar"]


def _version_number(version: int | str | None) -> str:
    """``2`` for ``2`` and ``"version_2"``; any other version as it is."""
    if version is None:
        return ""
    match = re.fullmatch(r"version_(\d+)", str(version))
    return match.group(1) if match else str(version)


class _StepLimitedFixes(ProgressBar):
    """The fixes, for any Lightning progress bar: the epoch's total counts the batches already seen in it, so a fit
    resumed mid-epoch shows ``150/200``, not ``150/99``; gradient accumulation is taken into account (``max_steps``
    counts optimizer steps); ``v_num`` is the run's version number as text."""

    @property
    @override
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            seen = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return min(trainer.num_training_batches, seen + remaining)
        return trainer.num_training_batches

    @override
    def get_metrics(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        """The metrics, with ``v_num`` the run's version number as text (``v_num: 2``): not ``0.000`` (the rich bar
        formats numbers as floats) nor the last 4 letters of ``version_2`` (``on_2``) after a resume."""
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        if "v_num" in items:
            versions = [_version_number(logger.version) for logger in trainer.loggers]
            items["v_num"] = "_".join(dict.fromkeys(v for v in versions if v))
        return items


class ResumableRichProgressBar(_StepLimitedFixes, RichProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar` with the fixes of :mod:`lit_mofo.progress`,
    and ``Epoch N`` without the ``/-2`` of a run without an epoch limit. Needs ``rich``."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:  # "Epoch 0/-2": no epoch limit
            description = description.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
        return description


class ResumableTQDMProgressBar(_StepLimitedFixes, TQDMProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.TQDMProgressBar` with the fixes of :mod:`lit_mofo.progress`."""


_FIXED: dict[type[ProgressBar], type[ProgressBar]] = {
    RichProgressBar: ResumableRichProgressBar,
    TQDMProgressBar: ResumableTQDMProgressBar,
}


class ProgressBarFixes(Callback):
    """Gives the Trainer's progress bar the fixes of :mod:`lit_mofo.progress`, in ``setup``.

    The bar must be one of Lightning's own, :class:`~lightning.pytorch.callbacks.TQDMProgressBar` or
    :class:`~lightning.pytorch.callbacks.RichProgressBar` (the one Lightning adds by default, or one the config
    names): it becomes the matching :class:`ResumableTQDMProgressBar` or :class:`ResumableRichProgressBar`, with its
    settings and state as they are. Any other bar (a subclass, a custom one), or none (``enable_progress_bar=False``),
    is left alone.

    Example::

        trainer = Trainer(max_steps=1000, callbacks=[ProgressBarFixes()])
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        bar = trainer.progress_bar_callback
        fixed = _FIXED.get(type(bar))  # type: ignore[arg-type]
        if bar is not None and fixed is not None:
            bar.__class__ = fixed  # the same object, so the Trainer's reference and the bar's state stay
