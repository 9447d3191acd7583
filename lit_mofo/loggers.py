"""A CSV logger whose resumed fits continue their run's ``metrics.csv``, and the callback that makes them exact.

Lightning's :class:`~lightning.pytorch.loggers.CSVLogger` empties a version directory it is pointed at again, so a fit
resumed into its own run loses the metrics logged before the interruption. :class:`ResumableCSVLogger` continues
the directory instead: ``metrics.csv`` keeps its rows and header, new columns extend the header. With
:class:`ContinueCSVMetrics` among the callbacks, every checkpoint records how many rows ``metrics.csv`` had when it
was written, and a fit resumed from it drops the rows logged after it (the resumed fit logs them again), so the file
reads as if the run had never stopped. It is the ``lit-mofo`` command's logger (the shipped configs name both)::

    trainer:
      logger:
        class_path: lit_mofo.loggers.ResumableCSVLogger
      callbacks:
        - class_path: lit_mofo.loggers.ContinueCSVMetrics

From Python, point the logger at the run a checkpoint belongs to with :meth:`ResumableCSVLogger.for_run`::

    logger = ResumableCSVLogger().for_run(default_root_dir="runs", ckpt_path=ckpt_path)
    trainer = Trainer(logger=logger, callbacks=[ContinueCSVMetrics()], default_root_dir="runs")
    trainer.fit(module, ckpt_path=ckpt_path)
"""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

__all__ = ["ContinueCSVMetrics", "ResumableCSVLogger", "run_dir_of"]

_SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


class _ContinuingWriter(ExperimentWriter):
    """ExperimentWriter that appends to an existing ``metrics.csv`` (Lightning's deletes it) and counts its rows."""

    def __init__(self, log_dir: str) -> None:
        self.rows = 0
        super().__init__(log_dir)

    @override
    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            self.metrics_keys = list(reader.fieldnames or [])
            self.rows = sum(1 for _ in reader)

    @override
    def save(self) -> None:
        pending = len(self.metrics)
        super().save()
        self.rows += pending

    def keep(self, rows: int | None = None, up_to_step: int | None = None) -> None:
        """Drop the rows of ``metrics.csv`` after the first ``rows`` (or after those with ``step <= up_to_step``)."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            fieldnames = list(reader.fieldnames or [])
            kept = list(reader)
        if rows is not None:
            kept = kept[:rows]
        if up_to_step is not None:
            kept = [row for row in kept if not row.get("step") or float(row["step"]) <= up_to_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(kept)
        self.rows = len(kept)


def run_dir_of(ckpt_path: str | os.PathLike[str] | None) -> Path | None:
    """The logger version directory holding ``ckpt_path`` (``<save_dir>/<name>/<version>/checkpoints/X.ckpt``, with
    the run's ``metrics.csv``, ``hparams.yaml`` or ``config.yaml`` beside ``checkpoints``), or None when the
    checkpoint is elsewhere (or a special or remote path: ``last``, ``s3://...``)."""
    if not ckpt_path or str(ckpt_path) in _SPECIAL_CKPT_PATHS or "://" in str(ckpt_path):
        return None
    path = Path(ckpt_path).expanduser().resolve()
    run_dir = path.parent.parent
    if path.parent.name != "checkpoints" or not any(
        (run_dir / name).is_file() for name in ("metrics.csv", "hparams.yaml", "config.yaml")
    ):
        return None
    return run_dir


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSV logger, continuing an existing version directory instead of emptying it.

    - **Resume.** Pointed at a version directory that exists (``version="version_0"``, or :meth:`for_run` with a
      checkpoint of that run), it keeps ``metrics.csv`` and appends to it; with :class:`ContinueCSVMetrics` the rows
      logged after the checkpoint are dropped first, so the resumed fit continues exactly where it was written.
    - **No empty runs.** A fit that fails before logging anything removes the version directory it created (and
      ``lightning_logs`` if nothing else is in it), so a typo in a config leaves no ``version_N`` behind.

    Args:
        save_dir: where the runs go (``<save_dir>/<name>/version_N``); None: the current directory, or the Trainer's
            ``default_root_dir`` when placed with :meth:`for_run` (the ``lit-mofo`` command does it for every run).
        name: the experiment's directory under ``save_dir``.
        version: the run's directory name or number (None: the next free ``version_N``).
        prefix: a prefix for every metric key.
        flush_logs_every_n_steps: how often the buffered rows are written to ``metrics.csv``.

    Example::

        trainer = Trainer(logger=ResumableCSVLogger("runs"), callbacks=[ContinueCSVMetrics()])
    """

    _LEFTOVERS = frozenset({"config.yaml", "hparams.yaml", "checkpoints"})

    def __init__(
        self,
        save_dir: str | None = None,
        name: str = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(
            os.getcwd() if save_dir is None else save_dir,
            name=name,
            version=version,
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )
        self._placed = save_dir is not None
        self._place: dict[str, Any] = {"name": name, "version": version}
        self._settings: dict[str, Any] = {"prefix": prefix, "flush_logs_every_n_steps": flush_logs_every_n_steps}
        self.continues = version is not None and Path(self.log_dir).is_dir()

    def for_run(self, default_root_dir: str | None = None, ckpt_path: str | None = None) -> ResumableCSVLogger:
        """This logger as a run places it: in the version directory ``ckpt_path`` belongs to (see
        :func:`run_dir_of`), whatever its ``save_dir``, so that a resumed fit continues its own run; otherwise, when
        it was built without ``save_dir``, under ``default_root_dir`` (the Trainer's, as Lightning's own default
        logger; the current directory if None). Returns a new logger with the same settings, or this one when
        neither applies. Call it before the Trainer uses the logger."""
        run_dir = run_dir_of(ckpt_path)
        if run_dir is not None:
            place = {"save_dir": str(run_dir.parent.parent), "name": run_dir.parent.name, "version": run_dir.name}
        elif not self._placed:
            place = {"save_dir": default_root_dir or os.getcwd(), **self._place}
        else:
            return self
        return type(self)(**place, **self._settings)

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status != "failed" or self.continues:
            return
        log_dir = Path(self.log_dir)
        if not log_dir.is_dir():
            return
        entries = list(log_dir.iterdir())
        checkpoints = log_dir / "checkpoints"
        if all(e.name in self._LEFTOVERS for e in entries) and not (
            checkpoints.is_dir() and any(checkpoints.iterdir())
        ):
            for entry in entries:
                entry.rmdir() if entry.is_dir() else entry.unlink()
            log_dir.rmdir()
            with contextlib.suppress(OSError):  # the `lightning_logs` it made, unless other runs are there
                log_dir.parent.rmdir()


class ContinueCSVMetrics(Callback):
    """Makes a resumed fit's ``metrics.csv`` continue exactly where its checkpoint was written.

    Every checkpoint records how many rows the run's ``metrics.csv`` had (after writing out the buffered ones, so a
    crash loses none of them); resuming into that run's directory keeps those rows and drops the ones logged after
    the checkpoint, which the resumed fit logs again. Checkpoints without the count keep the rows up to their step.
    Acts only with a :class:`ResumableCSVLogger` as the Trainer's logger (a no-op with any other).

    Example::

        trainer = Trainer(logger=ResumableCSVLogger("runs"), callbacks=[ContinueCSVMetrics()])
    """

    def __init__(self) -> None:
        self._trainer: Trainer | None = None

    @staticmethod
    def _writer(trainer: Trainer) -> _ContinuingWriter | None:
        logger = trainer.logger
        if not isinstance(logger, ResumableCSVLogger) or not trainer.is_global_zero:
            return None
        return logger.experiment

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def state_dict(self) -> dict[str, Any]:
        writer = None if self._trainer is None else self._writer(self._trainer)
        if writer is None:
            return {}
        writer.save()
        return {"metrics_rows": writer.rows}

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        writer = self._writer(trainer)
        if writer is None or not trainer.logger.continues:  # type: ignore[union-attr]  # _writer: a ResumableCSVLogger
            return
        rows = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("metrics_rows")
        if rows is not None:
            writer.keep(rows=rows)
        else:
            writer.keep(up_to_step=int(checkpoint.get("global_step", 0)))
