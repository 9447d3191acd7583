r"""Parameters of a module: the words that select them, and which of them the user left trainable.

**Selecting parameters.** Every argument of lit_mofo that names parameters - ``include``/``exclude`` of
:class:`~lit_mofo.L2ToPretrained`, :class:`~lit_mofo.ParameterDrift` and :func:`~lit_mofo.mofo_param_groups`,
``always_trainable``/``always_frozen`` of :class:`~lit_mofo.HalfFineTuning`, ``dense`` and ``no_decay`` of
:class:`~lit_mofo.callbacks.mofo_callback.MoFOCallback` and :func:`~lit_mofo.mofo_param_groups` - takes a
pattern or a list of them, read by this module in one way (:func:`check_patterns`, :func:`select_names`):

- a **word** of :data:`WORDS` names the parameters it describes. The roles of :mod:`lit_mofo.blocks`
  (``attention``, ``ffn``, ``router``, ``ssm``, ``norm``, ``embedding``, ``head``, ``other``:
  :func:`lit_mofo.blocks.parameter_roles`) say where a parameter sits; the kinds (``bias``, ``norm``,
  ``embedding``, ``weight``: :func:`named_parameter_categories`) say what it is, by module structure: a parameter
  of a normalisation layer is ``norm``, one of an ``nn.Embedding`` ``embedding``, any other parameter called
  ``bias`` (or ``..._bias``) ``bias``, everything else ``weight``. A parameter is named by its role and by its
  kind, so ``"norm"`` is every normalisation layer's parameters (the block norms and the final norm, which is role
  ``other``), ``"attention"`` every attention matrix and its bias, ``"weight"`` every matrix (and any other
  parameter that is no bias, norm or embedding);
- ``"re:<regex>"`` is a regular expression searched in the parameter's qualified name (``"re:lm_head"``,
  ``r"re:layers\.0\."``). A word never becomes a regular expression, so ``"attention"`` means the attention
  matrices on every architecture (Llama's are under ``self_attn``, where a regex ``attention`` finds nothing);
- a plain string that is not a word is still read as a regular expression, as before, with a ``FutureWarning``:
  write it with ``re:``. A string one typo away from a word (``"embeddings"``) gets a hint in the messages.

A single string is one pattern. A pattern that selects no parameter of the module is warned about
(``UserWarning``, with the nearest word for a typo) wherever it is given - never an error, so one configuration
serves models with and without, say, biases; a selection that leaves nothing to act on is refused by the callback
that needs something.

**Trainable at the start of fit.** A parameter the module froze itself (``requires_grad=False`` when the fit
starts) is not lit_mofo's to train. :class:`~lit_mofo.HalfFineTuning` changes ``requires_grad`` flags during fit,
so the other callbacks cannot read the user's choice from the flags once it has run: it records them first
(:func:`record_initial_requires_grad`), and every callback asks :func:`initial_requires_grad`, which answers
with that record while it lives and with the current flags otherwise. The answer is the same whatever the order
of the callbacks in ``Trainer(callbacks=[...])``.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
import weakref
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Literal

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lit_mofo._validation import argument_error, as_patterns

__all__ = [
    "CATEGORIES",
    "KINDS",
    "REGEX_PREFIX",
    "WORDS",
    "Category",
    "check_patterns",
    "check_trainable",
    "forget_initial_requires_grad",
    "initial_requires_grad",
    "is_norm",
    "matching_patterns",
    "named_parameter_categories",
    "parameter_words",
    "record_initial_requires_grad",
    "select_names",
    "warn_unmatched",
]

Category = Literal["bias", "norm", "embedding", "weight"]
KINDS: tuple[str, ...] = ("bias", "norm", "embedding", "weight")
CATEGORIES = KINDS  # the kinds' former name
# The kinds, then the roles of lit_mofo.blocks.ROLES that are not kinds.
WORDS: tuple[str, ...] = ("bias", "norm", "embedding", "weight", "attention", "ffn", "router", "ssm", "head", "other")
REGEX_PREFIX = "re:"

_NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's own, or a class named like one (``LlamaRMSNorm``, ``T5LayerNorm``, Mamba-2's
    ``MambaRMSNormGated``)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "NormGated"))


def _category(owner: nn.Module, leaf_name: str) -> Category:
    if is_norm(owner):
        return "norm"
    if isinstance(owner, nn.Embedding):
        return "embedding"
    if leaf_name == "bias" or leaf_name.endswith("_bias"):
        return "bias"
    return "weight"


def named_parameter_categories(module: nn.Module) -> Iterator[tuple[str, Tensor, Category]]:
    """Yield ``(qualified_name, parameter, kind)`` in ``named_parameters()`` order, shared tensors once; the kind is
    one of :data:`KINDS`."""
    seen: set[int] = set()
    for owner_name, owner in module.named_modules():
        for leaf_name, param in owner.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{owner_name}.{leaf_name}" if owner_name else leaf_name
            yield name, param, _category(owner, leaf_name)


def parameter_words(module: nn.Module, roles: Mapping[str, str] | None = None) -> dict[str, frozenset[str]]:
    """Name (as in ``module.named_parameters()``) -> the words of :data:`WORDS` that name it: its role
    (:func:`lit_mofo.blocks.parameter_roles`, or ``roles`` when the caller has them) and its kind
    (:func:`named_parameter_categories`)."""
    if roles is None:
        from lit_mofo.blocks import parameter_roles

        roles = parameter_roles(module)
    kinds = {name: kind for name, _, kind in named_parameter_categories(module)}
    return {name: frozenset((roles[name], kind)) for name, kind in kinds.items()}


# ------------------------------------------------------------------------------------------------------- patterns
_PACKAGE_DIR = os.path.dirname(__file__) + os.sep  # as the code objects of lit_mofo's modules name their files


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by this function's caller point at the first frame outside
    lit_mofo: the user's line that passed the argument, however many of lit_mofo's frames lie between (a helper
    calling a helper, a callback's own method). Python 3.12's ``skip_file_prefixes`` does this; lit_mofo supports
    3.10."""
    frame = sys._getframe(1)  # the caller: stacklevel 1
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def _near_word(pattern: str) -> str | None:
    close = difflib.get_close_matches(pattern, WORDS, n=1, cutoff=0.75)
    return close[0] if close else None


def check_patterns(
    value: str | Iterable[str] | None,
    *,
    where: str,
    argument: str,
    error: type[Exception] = ValueError,
) -> tuple[str, ...] | None:
    """A pattern argument as a tuple (a single string is one pattern; ``None`` stays ``None``), each entry checked.

    Raises ``error`` naming a non-string entry or an invalid regular expression; warns (``FutureWarning``) for a
    plain string that is not a word of :data:`WORDS`, which is read as a regular expression as before but should be
    written ``"re:<regex>"``.
    """
    checked = as_patterns(value, where=where, argument=argument, vocabulary=WORDS, error=error)
    if checked is None:
        return None
    for pattern in checked:
        if pattern.startswith(REGEX_PREFIX):
            try:
                re.compile(pattern[len(REGEX_PREFIX) :])
            except re.error as err:
                raise argument_error(
                    where,
                    argument,
                    value,
                    f"a word of {list(WORDS)} or {REGEX_PREFIX}<regex>, or a list of them",
                    f"Entry {pattern!r} is not a valid regular expression ({err}).",
                    error,
                ) from err
    for pattern in checked:
        if pattern in WORDS or pattern.startswith(REGEX_PREFIX):
            continue
        near = _near_word(pattern)
        hint = f" (did you mean the word {near!r}?)" if near else ""
        warnings.warn(
            f"{where}: {argument} entry {pattern!r} is not a word of {list(WORDS)}{hint}; reading it as a regular "
            f"expression searched in the parameter names is deprecated: write {REGEX_PREFIX + pattern!r}.",
            FutureWarning,
            stacklevel=_caller_stacklevel(),
        )
    return checked


def _pattern_matches(pattern: str, name: str, words: Collection[str]) -> bool:
    if pattern.startswith(REGEX_PREFIX):
        return re.search(pattern[len(REGEX_PREFIX) :], name) is not None
    if pattern in WORDS:
        return pattern in words
    return re.search(pattern, name) is not None  # the deprecated plain regex (check_patterns warned)


def matching_patterns(patterns: Iterable[str], name: str, words: Collection[str]) -> list[str]:
    """The patterns that name the parameter called ``name`` whose words (see :func:`parameter_words`) are
    ``words``."""
    return [pattern for pattern in patterns if _pattern_matches(pattern, name, words)]


def warn_unmatched(
    argument: str,
    patterns: Sequence[str],
    words: Mapping[str, Collection[str]],
    *,
    where: str,
    scope: str = "match no parameter",
) -> list[str]:
    """Warn about the patterns that name none of ``words`` (name -> its words) and return them: the one policy for
    patterns that select nothing. ``scope`` says what they missed (the default: any parameter)."""
    unmatched = [
        pattern
        for pattern in patterns
        if not any(_pattern_matches(pattern, name, name_words) for name, name_words in words.items())
    ]
    if unmatched:
        hints = []
        for pattern in unmatched:
            near = None if pattern in WORDS else _near_word(pattern.removeprefix(REGEX_PREFIX))
            if near:
                hints.append(f"{pattern!r} is not a vocabulary word, did you mean {near!r}?")
        example = f" (e.g. {next(iter(words))!r})" if words else ""
        present = sorted({word for name_words in words.values() for word in name_words})
        rank_zero_warn(
            f"{where}: {argument} entries {list(unmatched)} {scope}. Entries are words of {list(WORDS)} (here: "
            f"{present}) or regular expressions written {REGEX_PREFIX}<regex>, searched in the parameter "
            f"names{example}." + (f" {' '.join(hints)}" if hints else ""),
            category=UserWarning,
        )
    return unmatched


def select_names(
    words: Mapping[str, Collection[str]],
    include: Sequence[str] | None,
    exclude: Sequence[str],
    *,
    where: str,
) -> list[str]:
    """The names of ``words`` (name -> its words, in order) that ``include`` names (None: all) and ``exclude`` does
    not; warns about patterns of either that name nothing (:func:`warn_unmatched`)."""
    if include is not None:
        warn_unmatched("include", include, words, where=where)
    warn_unmatched("exclude", exclude, words, where=where)
    return [
        name
        for name, name_words in words.items()
        if (include is None or matching_patterns(include, name, name_words))
        and not matching_patterns(exclude, name, name_words)
    ]


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
