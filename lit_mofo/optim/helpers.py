"""``configure_optimizers`` helpers: MoFO param groups by parameter word or name, and the paper's schedule.

The three entry points compose: :func:`mofo_param_groups` builds the groups, :func:`warmup_lr_scheduler`
builds Lightning's per-step scheduler config for any optimizer, and :func:`mofo_configure_optimizers` returns the
whole ``configure_optimizers`` dict with the MoFO paper's defaults (lr 2e-5, cosine, warmup 3%, fraction 0.15,
no weight decay).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn
from torch.optim import Optimizer

from lit_mofo._validation import as_float, as_int
from lit_mofo.optim.mofo import MoFO, _validate_hyperparameters
from lit_mofo.params import check_patterns, matching_patterns, parameter_words, warn_unmatched

__all__ = ["Schedule", "mofo_configure_optimizers", "mofo_param_groups", "warmup_lr_scheduler"]

Schedule = Literal["cosine", "linear", "constant"]
_SCHEDULES = ("cosine", "linear", "constant")


# The default no-decay categories; a model without biases (Llama) is not warned about them.
DEFAULT_NO_DECAY: tuple[str, ...] = ("bias", "norm", "embedding")
_GROUP_OPTIONS = ("no_decay", "dense", "include", "exclude", "trainable_only")


def mofo_param_groups(
    module: nn.Module,
    *,
    no_decay: str | Sequence[str] = DEFAULT_NO_DECAY,
    dense: str | Sequence[str] = (),
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] = (),
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Split ``module``'s parameters into MoFO param groups that carry only their overrides.

    Groups named by ``no_decay`` get ``weight_decay=0.0`` and groups named by ``dense`` get ``fraction=None``
    (the dense Adam step); every other hyper-parameter is inherited from the optimizer they are passed to, so
    ``MoFO(mofo_param_groups(model), lr=2e-5, fraction=0.1, weight_decay=0.01)`` means what it says.

    Every entry of ``no_decay``, ``dense``, ``include`` and ``exclude`` is a word of :data:`lit_mofo.params.WORDS`
    - a kind (``bias``, ``norm``, ``embedding``, ``weight``, by module structure) or a role of
    :mod:`lit_mofo.blocks` (``attention``, ``ffn``, ``router``, ``ssm``, ``head``, ``other``) - or a regular
    expression written ``"re:<regex>"``, searched in the parameter's qualified name (``"re:lm_head"``); see
    :mod:`lit_mofo.params`. A single string is one entry (``dense="re:lm_head"``). An entry that names no
    parameter of the module is warned about (with the nearest word for a typo such as ``"embeddings"``), except in
    the default ``no_decay``.

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
    where = "mofo_param_groups()"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: module must be a torch.nn.Module (e.g. your LightningModule), got {module!r}.")
    if not isinstance(trainable_only, bool):
        raise ValueError(
            f"{where}: trainable_only={trainable_only!r} is invalid; the valid range is True or False. True skips "
            "parameters with requires_grad=False."
        )
    arguments = {"no_decay": no_decay, "dense": dense, "include": include, "exclude": exclude}
    patterns = {name: check_patterns(value, where=where, argument=name) for name, value in arguments.items()}
    words = parameter_words(module)
    for name, value in arguments.items():
        checked = patterns[name]
        if checked and not (name == "no_decay" and value is DEFAULT_NO_DECAY):
            warn_unmatched(name, checked, words, where=where)
    params = dict(module.named_parameters())

    def named_by(key: str, name: str) -> bool:
        return bool(matching_patterns(patterns[key] or (), name, words[name]))

    groups: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, param in params.items():
        if trainable_only and not param.requires_grad:
            continue
        if patterns["include"] is not None and not named_by("include", name):
            continue
        if named_by("exclude", name):
            continue
        key = (named_by("no_decay", name), named_by("dense", name))
        groups.setdefault(key, []).append((name, param))

    if not groups:
        raise ValueError(
            f"{where}: no parameter of {type(module).__name__} was selected "
            f"(include={include!r}, exclude={exclude!r}, trainable_only={trainable_only}); "
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
    where = "warmup_lr_scheduler()"
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{where}: optimizer must be a torch.optim.Optimizer (e.g. lit_mofo.MoFO), got {optimizer!r}.")
    _check_schedule(schedule, warmup_ratio, num_training_steps, where)
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    num_warmup_steps = math.ceil(warmup_ratio * num_training_steps)
    if schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps)
    else:
        build = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
        scheduler = build(optimizer, num_warmup_steps, num_training_steps)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}


def _check_schedule(schedule: Any, warmup_ratio: Any, num_training_steps: Any, where: str) -> None:
    if not (isinstance(schedule, str) and schedule in _SCHEDULES):
        raise ValueError(
            f"{where}: schedule={schedule!r} is invalid; the valid range is one of {_SCHEDULES}. The MoFO paper "
            'uses "cosine".'
        )
    as_float(
        warmup_ratio,
        where=where,
        argument="warmup_ratio",
        minimum=0.0,
        maximum=1.0,
        max_inclusive=False,
        fix="It is the share of the training steps spent warming up; the MoFO paper uses 0.03.",
    )
    if num_training_steps is not None:
        as_int(
            num_training_steps,
            where=where,
            argument="num_training_steps",
            minimum=1,
            fix="Set the Trainer's max_steps or max_epochs (trainer.estimated_stepping_batches is infinite "
            "without them), or pass num_training_steps explicitly.",
        )


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

    ``num_training_steps`` defaults to :func:`lit_mofo.continual.stage_steps`: ``trainer.estimated_stepping_batches``
    (optimizer steps, so gradient accumulation and ``max_steps`` are accounted for), or in a continual run the current
    stage's budget, so that every stage's fresh schedule spans that stage. ``group_options`` (``no_decay``,
    ``dense``, ``include``, ``exclude``, ``trainable_only``) go to :func:`mofo_param_groups`.
    """
    where = "mofo_configure_optimizers()"
    unknown = sorted(set(group_options) - set(_GROUP_OPTIONS))
    if unknown:
        raise TypeError(
            f"{where} got unexpected keyword arguments {unknown}; besides the MoFO hyper-parameters and the schedule "
            f"it takes the mofo_param_groups options {list(_GROUP_OPTIONS)}."
        )
    hyperparameters = {
        "lr": lr,
        "betas": betas,
        "eps": eps,
        "weight_decay": weight_decay,
        "fraction": fraction,
        "filter_min_ndim": filter_min_ndim,
    }
    _validate_hyperparameters(hyperparameters, where=where)
    _check_schedule(schedule, warmup_ratio, num_training_steps, where)
    groups = mofo_param_groups(pl_module, **group_options)
    optimizer = MoFO(groups, **hyperparameters)
    if num_training_steps is None:
        if getattr(pl_module, "_trainer", None) is None:
            raise ValueError(
                f"{where}: {type(pl_module).__name__} is not attached to a Trainer, so the number of training steps "
                "is unknown; call it from configure_optimizers during fit, or pass num_training_steps."
            )
        from lit_mofo.continual.stages import stage_steps  # here: lit_mofo.continual imports the callbacks

        num_training_steps = stage_steps(pl_module.trainer)
        _check_schedule(schedule, warmup_ratio, num_training_steps, where)
    scheduler = warmup_lr_scheduler(optimizer, num_training_steps, schedule=schedule, warmup_ratio=warmup_ratio)
    return {"optimizer": optimizer, "lr_scheduler": scheduler}
