"""The probe API: something that evaluates the current model and returns named metrics with their direction.

A :class:`Probe` is what :class:`~lit_mofo.callbacks.forgetting_monitor.ForgettingMonitor` runs before the first
optimizer step (the pre-trained model) and then on a schedule, to measure how much general capability fine-tuning
has cost. Subclass it to measure anything:

.. code-block:: python

    class MeanLogitProbe(Probe):
        name = "mean_logit"

        @property
        def higher_is_better(self) -> dict[str, bool]:
            return {"value": True}

        def evaluate(self, trainer, pl_module):
            model = find_language_model(pl_module)
            logits = model(input_ids=self.input_ids.to(pl_module.device)).logits
            return {"value": trainer.strategy.reduce(logits.mean(), reduce_op="mean").item()}

The monitor calls :meth:`Probe.evaluate` under ``torch.no_grad()``, with every submodule in eval mode and the RNG
state saved and restored around it, so a probe needs none of that itself. It is called on *every* process: a probe
must run the same number of forwards (and collectives) on every rank — under FSDP2 each forward gathers the
sharded weights — and return values already reduced across ranks (torchmetrics objects sync on ``compute()``;
``trainer.strategy.reduce`` for plain tensors). :func:`~lit_mofo.probes.run_batches` splits reference batches
across the ranks with as many forwards on each and makes a failure on one rank fail all of them.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = ["Probe", "find_language_model", "move_batch"]


class Probe(abc.ABC):
    """Evaluates the current model and returns named metrics, each with a fixed higher-is-better direction.

    Attributes:
        name: the probe's name in metric keys (``probe/<name>/<metric>``). The monitor's dict key overrides it, so
            two instances of one class can coexist. Letters, digits, ``_``, ``-`` and ``.`` only.

    Subclasses implement :attr:`higher_is_better` and :meth:`evaluate`; :meth:`setup` and :meth:`teardown` are
    optional hooks for loading data once per fit and releasing it.
    """

    name: str = "probe"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: B027 - optional hook
        """Prepare once per fit, before the baseline evaluation (tokenize data, build dataloaders). Default: no-op."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`setup` built, at the end of fit. Default: no-op."""

    @property
    @abc.abstractmethod
    def higher_is_better(self) -> dict[str, bool]:
        """Each metric :meth:`evaluate` returns, mapped to ``True`` if a larger value is better (accuracy) and
        ``False`` if a smaller one is (loss, perplexity). Fixed for the probe's lifetime."""

    @abc.abstractmethod
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Measure the current model; return ``{metric: value}`` with the keys of :attr:`higher_is_better`.

        Runs on every rank (same forwards everywhere); the values must already be reduced across ranks.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def find_language_model(pl_module: nn.Module) -> nn.Module:
    """The model a probe should call: ``pl_module.model`` if the LightningModule has a module attribute ``model``
    (the convention of lit_mofo's modules and most Hugging Face wrappers), else ``pl_module`` itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def move_batch(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (dicts, lists and tuples are walked recursively)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: move_batch(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(move_batch(value, device) for value in batch)
    if isinstance(batch, list):
        return [move_batch(value, device) for value in batch]
    return batch
