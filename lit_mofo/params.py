"""Parameters of a module: their category, and which of them the user left trainable.

**Categories.** One place for the rule, shared by the optimizer helpers (no weight decay / dense step by category)
and the callbacks that select tensors by category. Categories come from module structure, not names, so they hold
for any architecture: a parameter owned by a normalisation layer is ``"norm"``, one owned by an ``nn.Embedding``
is ``"embedding"``, any other parameter called ``bias`` is ``"bias"``, everything else is ``"weight"``.

**Trainable at the start of fit.** A parameter the module froze itself (``requires_grad=False`` when the fit
starts) is not lit_mofo's to train. :class:`~lit_mofo.HalfFineTuning` changes ``requires_grad`` flags during fit,
so the other callbacks cannot read the user's choice from the flags once it has run: it records them first
(:func:`record_initial_requires_grad`), and every callback asks :func:`initial_requires_grad`, which answers
with that record while it lives and with the current flags otherwise. The answer is the same whatever the order
of the callbacks in ``Trainer(callbacks=[...])``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Literal

from torch import Tensor, nn

from lit_mofo._validation import matches

__all__ = [
    "CATEGORIES",
    "Category",
    "check_trainable",
    "forget_initial_requires_grad",
    "initial_requires_grad",
    "is_norm",
    "match_any",
    "named_parameter_categories",
    "record_initial_requires_grad",
]

Category = Literal["bias", "norm", "embedding", "weight"]
CATEGORIES: tuple[str, ...] = ("bias", "norm", "embedding", "weight")

_NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's own, or a class named like one (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _category(owner: nn.Module, leaf_name: str) -> Category:
    if is_norm(owner):
        return "norm"
    if isinstance(owner, nn.Embedding):
        return "embedding"
    if leaf_name == "bias":
        return "bias"
    return "weight"


def named_parameter_categories(module: nn.Module) -> Iterator[tuple[str, Tensor, Category]]:
    """Yield ``(qualified_name, parameter, category)`` in ``named_parameters()`` order, shared tensors once."""
    seen: set[int] = set()
    for owner_name, owner in module.named_modules():
        for leaf_name, param in owner.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{owner_name}.{leaf_name}" if owner_name else leaf_name
            yield name, param, _category(owner, leaf_name)


def match_any(name: str, category: Category, patterns: Iterable[str]) -> bool:
    """Whether a parameter is named by ``patterns``: each is a category name or a regex searched in ``name``."""
    return any(matches(pattern, name, category, CATEGORIES) for pattern in patterns)


# ---------------------------------------------------------------------------------------- trainable at fit start
_INITIAL_REQUIRES_GRAD: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def _current_requires_grad(module: nn.Module) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in module.named_parameters()}


def record_initial_requires_grad(module: nn.Module) -> dict[str, bool]:
    """Record ``module``'s ``requires_grad`` flags (name as in ``named_parameters()`` -> flag) before changing any.

    A callback that changes flags during fit calls it in ``on_fit_start``, before its first change, and
    :func:`forget_initial_requires_grad` when it has put the flags back. Returns the record.
    """
    record = _INITIAL_REQUIRES_GRAD[module] = _current_requires_grad(module)
    return dict(record)


def forget_initial_requires_grad(module: nn.Module) -> None:
    """Drop the record of :func:`record_initial_requires_grad` (the flags are the user's again)."""
    _INITIAL_REQUIRES_GRAD.pop(module, None)


def initial_requires_grad(module: nn.Module) -> dict[str, bool]:
    """``requires_grad`` of every parameter as the user left it for this fit: name -> flag.

    While a callback that changes flags holds a record (:func:`record_initial_requires_grad`), the recorded flags;
    otherwise the current ones. Callbacks read it in ``on_fit_start`` or later to choose the tensors that may
    train, so their choice does not depend on whether Half Fine-Tuning's draw ran before them.
    """
    record = _INITIAL_REQUIRES_GRAD.get(module)
    return dict(record) if record is not None else _current_requires_grad(module)


def check_trainable(module: nn.Module, *, where: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` if no parameter of ``module`` was trainable at the start of fit, before backward fails.

    Without it, the first ``backward`` ends in torch's "element 0 of tensors does not require grad and does not
    have a grad_fn", which names neither the module nor the fix.
    """
    flags = initial_requires_grad(module)
    if any(flags.values()):
        return
    what = f"all {len(flags)} of its parameter tensors have" if flags else "it has no parameters, so none has"
    raise error(
        f"{where}: no parameter of {type(module).__name__} is trainable: {what} requires_grad=False, so the first "
        "backward would fail with torch's 'element 0 of tensors does not require grad'. Unfreeze the parameters to "
        "fine-tune before fit (e.g. `self.requires_grad_(True)`, or `param.requires_grad_(True)` for a subset), or "
        "drop the callback if this fit is not meant to train."
    )
