"""A probe that wraps any user function: the quickest way to monitor a custom measure of the model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl

from lit_mofo.probes import _checks
from lit_mofo.probes.base import Probe

__all__ = ["CallableProbe"]

ProbeFunction = Callable[[pl.Trainer, pl.LightningModule], Any]


class CallableProbe(Probe):
    """Evaluate ``fn(trainer, pl_module)`` and report what it returns.

    ``fn`` returns a number (reported as metric ``value``) or a dict ``{metric: number}``. It is called like any
    probe: under ``no_grad``, in eval mode, with the RNG state restored afterwards, on every process — so under DDP
    and FSDP2 it must return the same (reduced) values on every rank, e.g. via ``trainer.strategy.reduce`` (the
    monitor records rank zero's and warns if they differ), and under FSDP2 it must run the same forwards on every
    rank, since each gathers the sharded weights: a forward of the whole model on the same input everywhere is
    fine. If ``fn`` raises on some ranks only, the monitor fails every rank with the error, provided the other ranks
    are not inside a forward or reduction of their own ``fn`` by then: let ``fn`` fail, if it must, after its
    forwards (checking their results) rather than before them.

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
        self.name = _checks.check_name(name)
        where = _checks.where(self)
        self.fn = _checks.import_object(fn, "fn", where) if isinstance(fn, str) else fn
        if not callable(self.fn) or not _checks.takes_two_arguments(self.fn):
            raise _checks.error(
                where,
                "fn",
                fn,
                "a function (trainer, pl_module) -> number or {metric: number}, or its import path "
                "'package.module.function'",
            )
        directions_valid = "True (higher is better), False (lower is better) or a dict {metric: True/False}"
        if isinstance(higher_is_better, Mapping):
            bad = {
                k: v
                for k, v in higher_is_better.items()
                if not isinstance(v, bool) or not isinstance(k, str) or not k or any(c.isspace() for c in k)
            }
            if bad or not higher_is_better:
                raise _checks.error(
                    where,
                    "higher_is_better",
                    higher_is_better,
                    directions_valid,
                    "Map every metric (a name without whitespace) to True (higher is better) or False (lower is "
                    f"better){f'; not {bad}' if bad else ''}.",
                )
            self._directions = dict(higher_is_better)
            self._default: bool | None = None
        elif isinstance(higher_is_better, bool):
            self._directions = {"value": higher_is_better}
            self._default = higher_is_better
        else:
            raise _checks.error(where, "higher_is_better", higher_is_better, directions_valid, "It must be True/False.")

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
