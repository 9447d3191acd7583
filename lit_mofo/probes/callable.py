"""A probe that wraps any user function: the quickest way to monitor a custom measure of the model."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mofo.probes._data import check_name
from lit_mofo.probes.base import Probe

__all__ = ["CallableProbe"]

ProbeFunction = Callable[[pl.Trainer, pl.LightningModule], Any]


class CallableProbe(Probe):
    """Evaluate ``fn(trainer, pl_module)`` and report what it returns.

    ``fn`` returns a number (reported as metric ``value``) or a dict ``{metric: number}``. It is called like any
    probe: under ``no_grad``, in eval mode, with the RNG state restored afterwards, on every process — so under DDP
    it must return the same (reduced) values on every rank, e.g. via ``trainer.strategy.reduce``.

    Args:
        fn: the function, or its import path as a string (``"package.module.function"`` or
            ``"package.module:function"``) for YAML configs.
        higher_is_better: one flag for every metric ``fn`` returns, or ``{metric: flag}`` per metric.
        name: the probe's name in metric keys (``probe/<name>/<metric>``); a monitor's dict key overrides it.

    Example::

        def answer_logit(trainer, pl_module):
            logits = pl_module.model(input_ids=QUESTION.to(pl_module.device)).logits
            return {"answer_logit": logits[0, -1, ANSWER].item()}

        probe = CallableProbe(answer_logit, higher_is_better=True, name="capital_of_france")
    """

    def __init__(
        self,
        fn: ProbeFunction | str,
        higher_is_better: bool | dict[str, bool],
        name: str = "callable",
    ) -> None:
        self.fn = _import(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise MisconfigurationException(f"`fn={fn!r}` is not callable; give a function(trainer, pl_module).")
        if isinstance(higher_is_better, Mapping):
            bad = {k: v for k, v in higher_is_better.items() if not isinstance(v, bool)}
            if bad or not higher_is_better:
                raise MisconfigurationException(
                    f"`higher_is_better={higher_is_better!r}` must map every metric to True (higher is better) or "
                    "False (lower is better)."
                )
            self._directions = dict(higher_is_better)
            self._default: bool | None = None
        elif isinstance(higher_is_better, bool):
            self._directions = {"value": higher_is_better}
            self._default = higher_is_better
        else:
            raise MisconfigurationException(
                f"`higher_is_better={higher_is_better!r}` must be True/False or a dict {{metric: True/False}}."
            )
        self.name = check_name(name)

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return dict(self._directions)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        result = self.fn(trainer, pl_module)
        values: dict[str, Any] = dict(result) if isinstance(result, Mapping) else {"value": result}
        if self._default is not None:  # one flag for all: whatever the function names its metrics
            for metric in values:
                self._directions.setdefault(metric, self._default)
        return values


def _import(path: str) -> Any:
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise MisconfigurationException(
            f"Cannot import the probe function {path!r}: {error}. Give 'package.module.function' importable from "
            "the working directory."
        ) from error
