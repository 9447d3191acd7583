"""``configure_optimizers`` helpers: MoFO param groups by parameter name/category, and the paper's schedule.

The three entry points compose: :func:`mofo_param_groups` builds the groups, :func:`warmup_lr_scheduler`
builds Lightning's per-step scheduler config for any optimizer, and :func:`mofo_configure_optimizers` returns the
whole ``configure_optimizers`` dict with the MoFO paper's defaults (lr 2e-5, cosine, warmup 3%, fraction 0.15,
no weight decay).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn
from torch.optim import Optimizer

from lit_mofo.optim.mofo import MoFO
from lit_mofo.params import match_any, named_parameter_categories

__all__ = ["Schedule", "mofo_configure_optimizers", "mofo_param_groups", "warmup_lr_scheduler"]

Schedule = Literal["cosine", "linear", "constant"]
_SCHEDULES = ("cosine", "linear", "constant")


def _compile(patterns: Sequence[str], argument: str) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(
                f"mofo_param_groups: {argument} entry {pattern!r} is not a valid regular expression ({err}); "
                "entries are a category (bias, norm, embedding, weight) or a regex searched in the parameter name."
            ) from err


def mofo_param_groups(
    module: nn.Module,
    *,
    no_decay: Sequence[str] = ("bias", "norm", "embedding"),
    dense: Sequence[str] = (),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Split ``module``'s parameters into MoFO param groups that carry only their overrides.

    Groups named by ``no_decay`` get ``weight_decay=0.0`` and groups named by ``dense`` get ``fraction=None``
    (the dense Adam step); every other hyper-parameter is inherited from the optimizer they are passed to, so
    ``MoFO(mofo_param_groups(model), lr=2e-5, fraction=0.1, weight_decay=0.01)`` means what it says.

    Every entry of ``no_decay``, ``dense``, ``include`` and ``exclude`` is either a category — ``bias``,
    ``norm``, ``embedding`` or ``weight``, decided by module structure (:mod:`lit_mofo.params`) — or a regular
    expression searched in the parameter's qualified name (e.g. ``r"lm_head"``).

    Args:
        module: the model (a LightningModule or any ``nn.Module``).
        no_decay: parameters that get ``weight_decay=0``.
        dense: parameters that take the dense Adam step (``fraction=None``).
        include: if given, only parameters named here are optimized.
        exclude: parameters left out of the optimizer.
        trainable_only: skip parameters with ``requires_grad=False``.

    Returns:
        Non-empty groups of ``(name, parameter)`` pairs; pass them to :class:`~lit_mofo.MoFO` (or any torch
        optimizer, for the ``no_decay`` split alone). The names end up in the optimizer's ``param_names``.
    """
    for argument, patterns in (
        ("no_decay", no_decay),
        ("dense", dense),
        ("include", include or ()),
        ("exclude", exclude),
    ):
        _compile(patterns, argument)

    groups: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, param, category in named_parameter_categories(module):
        if trainable_only and not param.requires_grad:
            continue
        if include is not None and not match_any(name, category, include):
            continue
        if match_any(name, category, exclude):
            continue
        key = (match_any(name, category, no_decay), match_any(name, category, dense))
        groups.setdefault(key, []).append((name, param))

    if not groups:
        raise ValueError(
            f"mofo_param_groups: no parameter of {type(module).__name__} was selected "
            f"(include={include!r}, exclude={list(exclude)!r}, trainable_only={trainable_only}); "
            "widen `include`, narrow `exclude`, or unfreeze parameters."
        )
    return [
        {
            "params": params,
            **({"weight_decay": 0.0} if without_decay else {}),
            **({"fraction": None} if dense_step else {}),
        }
        for (without_decay, dense_step), params in groups.items()
    ]


def warmup_lr_scheduler(
    optimizer: Optimizer,
    num_training_steps: int,
    *,
    schedule: Schedule = "cosine",
    warmup_ratio: float = 0.03,
) -> dict[str, Any]:
    """Lightning's ``lr_scheduler`` config for a per-step schedule with linear warmup.

    The learning rate rises linearly from 0 over ``ceil(warmup_ratio * num_training_steps)`` optimizer steps,
    then follows ``schedule``: ``cosine`` (to 0 at the end), ``linear`` (to 0) or ``constant``. These are the
    schedules of ``transformers.get_scheduler``, so runs match the Hugging Face Trainer's.
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not supported; choose one of {_SCHEDULES}.")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio={warmup_ratio!r} is outside [0, 1); the MoFO paper uses 0.03.")
    if (isinstance(num_training_steps, float) and math.isinf(num_training_steps)) or num_training_steps < 1:
        raise ValueError(
            f"num_training_steps={num_training_steps!r} must be a finite int >= 1; set the Trainer's "
            "max_steps or max_epochs, or pass num_training_steps explicitly."
        )
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    num_training_steps = int(num_training_steps)
    num_warmup_steps = math.ceil(warmup_ratio * num_training_steps)
    if schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps)
    else:
        build = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
        scheduler = build(optimizer, num_warmup_steps, num_training_steps)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}


def mofo_configure_optimizers(
    pl_module: pl.LightningModule,
    *,
    lr: float = 2e-5,
    fraction: float | None = 0.15,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    filter_min_ndim: int = 2,
    schedule: Schedule = "cosine",
    warmup_ratio: float = 0.03,
    num_training_steps: int | None = None,
    **group_options: Any,
) -> dict[str, Any]:
    """The whole ``configure_optimizers`` return value: MoFO with the paper's defaults and a per-step schedule.

    Call it from a LightningModule's ``configure_optimizers``::

        def configure_optimizers(self):
            return mofo_configure_optimizers(self, lr=2e-5, fraction=0.15)

    ``num_training_steps`` defaults to ``trainer.estimated_stepping_batches`` (optimizer steps, so gradient
    accumulation and ``max_steps`` are accounted for). ``group_options`` (``no_decay``, ``dense``, ``include``,
    ``exclude``, ``trainable_only``) go to :func:`mofo_param_groups`.
    """
    groups = mofo_param_groups(pl_module, **group_options)
    optimizer = MoFO(
        groups,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        fraction=fraction,
        filter_min_ndim=filter_min_ndim,
    )
    if num_training_steps is None:
        if pl_module._trainer is None:
            raise ValueError(
                f"mofo_configure_optimizers: {type(pl_module).__name__} is not attached to a Trainer, so the "
                "number of training steps is unknown; call it from configure_optimizers during fit, or pass "
                "num_training_steps."
            )
        num_training_steps = pl_module.trainer.estimated_stepping_batches
    scheduler = warmup_lr_scheduler(optimizer, num_training_steps, schedule=schedule, warmup_ratio=warmup_ratio)
    return {"optimizer": optimizer, "lr_scheduler": scheduler}
