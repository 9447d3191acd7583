"""Argument checks shared by the optimizer, its helpers, the callbacks, the probes and the modules.

Every public entry point of lit_mofo checks its arguments where they are given (in ``__init__``, or in ``setup``
when the model is needed) and fails with one message shape: the argument, the bad value, the valid range and the
fix. The checks that several places need live here once:

- :func:`as_float` / :func:`as_int`: a real number (never a ``bool``, a string or ``None``; finite unless asked
  otherwise) or an integer in a range;
- :func:`as_patterns`: a list of name patterns (a single string is one pattern, never its characters), each a word
  of a vocabulary or a valid regular expression (:mod:`lit_mofo.params` reads them: words, ``re:`` regexes, and
  the one policy for patterns that select nothing);
- :func:`as_dtype`: a floating-point dtype given as a ``torch.dtype``, ``"float16"``, ``"torch.float16"`` or an
  alias (``"fp16"``, ``"half"``, ``"bf16"``, ...), the same forms everywhere;
- :func:`as_bool`: a real ``bool`` (a YAML ``"false"`` in quotes is a string, and a non-empty string is truthy);
- :func:`as_choice`: one of a fixed set of values (the ``Literal`` arguments);
- :func:`as_device`: a ``torch.device`` (or its string) that this build of torch can use;
- :func:`argument_error` builds the same message for checks of other kinds (a file's content, a token id beyond a
  model's vocabulary).

Each takes ``where`` (e.g. ``"L2ToPretrained()"``) for the message and ``error``, the exception type to raise
(``MisconfigurationException`` in Lightning callbacks, ``ValueError`` elsewhere); a wrong *type* raises that type
too, so a YAML value of the wrong kind gets the same message as a wrong value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "argument_error",
    "as_bool",
    "as_choice",
    "as_device",
    "as_dtype",
    "as_float",
    "as_int",
    "as_patterns",
]

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "double": torch.float64,
    "fp64": torch.float64,
    "float": torch.float32,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "half": torch.float16,
    "fp16": torch.float16,
}


def _bad(where: str, argument: str, value: Any, valid: str, fix: str, error: type[Exception]) -> Exception:
    message = f"{where}: {argument}={value!r} is invalid; the valid range is {valid}."
    return error(f"{message} {fix}" if fix else message)


def _interval(minimum: float | None, maximum: float | None, min_inclusive: bool, max_inclusive: bool) -> str:
    if minimum is None and maximum is None:
        return "any finite number"
    if maximum is None:
        return f"a number {'>=' if min_inclusive else '>'} {minimum:g}"
    if minimum is None:
        return f"a number {'<=' if max_inclusive else '<'} {maximum:g}"
    return f"{'[' if min_inclusive else '('}{minimum:g}, {maximum:g}{']' if max_inclusive else ')'}"


def as_float(
    value: Any,
    *,
    where: str,
    argument: str,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    allow_inf: bool = False,
    fix: str = "",
    error: type[Exception] = ValueError,
) -> float:
    """``value`` as a ``float`` if it is a real number (not a bool) in the range, else ``error`` naming all of it.

    NaN is always refused; infinities unless ``allow_inf``. ``minimum``/``maximum`` of None leave that side open.
    """
    valid = _interval(minimum, maximum, min_inclusive, max_inclusive)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _bad(where, argument, value, valid, fix, error)
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise _bad(where, argument, value, f"{valid}, finite", fix, error)
    if minimum is not None and (number < minimum or (number == minimum and not min_inclusive)):
        raise _bad(where, argument, value, valid, fix, error)
    if maximum is not None and (number > maximum or (number == maximum and not max_inclusive)):
        raise _bad(where, argument, value, valid, fix, error)
    return number


def as_int(
    value: Any,
    *,
    where: str,
    argument: str,
    minimum: int | None = None,
    maximum: int | None = None,
    fix: str = "",
    error: type[Exception] = ValueError,
) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool, not a float such as 2.5) in ``[minimum, maximum]``."""
    if minimum is not None and maximum is not None:
        valid = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        valid = f"an integer >= {minimum}"
    elif maximum is not None:
        valid = f"an integer <= {maximum}"
    else:
        valid = "an integer"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _bad(where, argument, value, valid, fix, error)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _bad(where, argument, value, valid, fix, error)
    return int(value)


def as_patterns(
    value: str | Iterable[str] | None,
    *,
    where: str,
    argument: str,
    vocabulary: Sequence[str],
    error: type[Exception] = ValueError,
) -> tuple[str, ...] | None:
    """A pattern argument as a tuple: a single string is one pattern; ``None`` stays ``None``.

    Each pattern is a word of ``vocabulary`` (e.g. the parameter categories or roles) or a regular expression
    searched in parameter names; a non-string entry or an invalid regex raises ``error`` naming it.
    """
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else value
    valid = f"a {' / '.join(vocabulary)} or a regular expression searched in the parameter names, or a list of them"
    if not isinstance(patterns, Iterable) or isinstance(patterns, (bytes, dict)):
        raise _bad(where, argument, value, valid, "", error)
    checked = tuple(patterns)
    for pattern in checked:
        if not isinstance(pattern, str):
            raise _bad(where, argument, value, valid, f"Entry {pattern!r} is not a string.", error)
        if pattern in vocabulary:
            continue
        try:
            re.compile(pattern)
        except re.error as err:
            raise _bad(
                where, argument, value, valid, f"Entry {pattern!r} is not a valid regular expression ({err}).", error
            ) from err
    return checked


def as_dtype(
    value: str | torch.dtype | None, *, where: str, argument: str, error: type[Exception] = ValueError
) -> torch.dtype | None:
    """A floating-point dtype from a ``torch.dtype``, its name (``"bfloat16"``, ``"torch.bfloat16"``) or an alias
    (``"bf16"``, ``"fp16"``, ``"half"``, ``"fp32"``, ``"float"``, ``"double"``); ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
    raise _bad(
        where,
        argument,
        value,
        f"one of {list(DTYPES)} (a string, 'torch.<name>', an alias such as 'bf16'/'fp16', or the torch.dtype), "
        "or None for each parameter's own dtype",
        "",
        error,
    )


def argument_error(
    where: str, argument: str, value: Any, valid: str, fix: str = "", error: type[Exception] = ValueError
) -> Exception:
    """The exception (not raised) for a bad argument, in the message shape of every check here: for checks that
    need more than a number or a pattern (a file's content, a token id beyond the model's vocabulary)."""
    return _bad(where, argument, value, valid, fix, error)


def as_bool(value: Any, *, where: str, argument: str, error: type[Exception] = ValueError) -> bool:
    """``value`` if it is a ``bool``; anything else (``"false"``, ``0``, ``None``) raises ``error`` naming it.

    A string is refused rather than read: ``bool("false")`` is ``True``, and a quoted YAML ``"false"`` is a string.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's bool too
        return bool(value)
    fix = "Write true or false without quotes in YAML." if isinstance(value, str) else ""
    raise _bad(where, argument, value, "True or False", fix, error)


def as_choice(
    value: Any, *, where: str, argument: str, choices: Sequence[Any], fix: str = "", error: type[Exception] = ValueError
) -> Any:
    """``value`` if it is one of ``choices`` (compared with ``==``, never a ``bool`` for a non-bool choice)."""
    if not isinstance(value, bool) and any(value == choice for choice in choices if not isinstance(choice, bool)):
        return value
    raise _bad(where, argument, value, f"one of {tuple(choices)!r}", fix, error)


def as_device(
    value: str | torch.device | None, *, where: str, argument: str, error: type[Exception] = ValueError
) -> torch.device | None:
    """A ``torch.device`` from a device or its string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) that this
    build of torch and this machine provide; ``None`` stays ``None``. ``"meta"`` holds no values and is refused."""
    if value is None:
        return None
    valid = "None, 'cpu', or an accelerator this machine has ('cuda', 'cuda:<index>', 'mps', ...)"
    if not isinstance(value, (str, torch.device)):
        raise _bad(where, argument, value, valid, "", error)
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise _bad(where, argument, value, valid, f"torch cannot parse it ({err}).", error) from err
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise _bad(where, argument, value, valid, "The meta device holds no values; use 'cpu' or None.", error)
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if device.type == "mps":
        is_available = torch.backends.mps.is_available
    if is_available is None or not is_available():
        raise _bad(
            where,
            argument,
            value,
            valid,
            f"This torch build ({torch.__version__}) has no usable {device.type!r} device here; use 'cpu' or None "
            "(each parameter's own device).",
            error,
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise _bad(
            where,
            argument,
            value,
            valid,
            f"There are {count()} {device.type!r} device(s), indices 0-{count() - 1}.",
            error,
        )
    return device
