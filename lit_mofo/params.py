"""Parameter categorisation: which parameters of a module are biases, norm weights, embeddings or weights.

One place for the rule, shared by the optimizer helpers (no weight decay / dense step by category) and the
callbacks that select tensors by category. Categories come from module structure, not names, so they hold for
any architecture: a parameter owned by a normalisation layer is ``"norm"``, one owned by an ``nn.Embedding``
is ``"embedding"``, any other parameter called ``bias`` is ``"bias"``, everything else is ``"weight"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Literal

from torch import Tensor, nn

__all__ = ["CATEGORIES", "Category", "is_norm", "match_any", "named_parameter_categories"]

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
    return any(pattern == category or (pattern not in CATEGORIES and re.search(pattern, name)) for pattern in patterns)
