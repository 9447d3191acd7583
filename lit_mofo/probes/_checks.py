"""Argument checks of the probes, done when a probe is built: names, limits, sizes, record keys and functions given by
import path (YAML). Every check fails with the message shape of :mod:`lit_mofo._validation` (the probe and argument,
the bad value, the valid range and the fix), raised as ``MisconfigurationException`` as Lightning's callbacks do."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lit_mofo._validation import argument_error, as_bool, as_int

ForwardFn = Callable[[nn.Module, Any], Any]
"""``forward_fn(model, batch) -> logits``: how a probe gets logits from a model that is not called as
``model(input_ids=..., attention_mask=...)``."""


def where(probe: Any) -> str:
    """How messages name a probe: ``LanguageModelProbe(name='lm')``."""
    return f"{type(probe).__name__}(name={getattr(probe, 'name', '?')!r})"


def error(where: str, argument: str, value: Any, valid: str, fix: str = "") -> MisconfigurationException:
    exception = argument_error(where, argument, value, valid, fix, MisconfigurationException)
    assert isinstance(exception, MisconfigurationException)
    return exception


def check_name(name: str) -> str:
    """A probe or metric name usable in ``probe/<name>/<metric>``: non-empty, no ``/``, no whitespace."""
    if not isinstance(name, str) or not name or "/" in name or any(c.isspace() for c in name):
        raise MisconfigurationException(
            f"Invalid probe name {name!r}: use a non-empty name without '/' or whitespace (it becomes part of "
            "the logged metric names `probe/<name>/<metric>`), e.g. 'general_text'."
        )
    return name


def check_limit(
    limit: int | float | None, what: str = "limit_batches", where: str = "probe", unit: str = "batches"
) -> int | float | None:
    """A Lightning-style limit: None (all), an int >= 1 (a count) or a float in (0, 1] (a fraction)."""
    if limit is None:
        return None
    valid = f"None (everything), an int >= 1 (a count of {unit}) or a float in (0, 1] (a fraction of them)"
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise error(where, what, limit, valid)
    if (isinstance(limit, int) and limit < 1) or (isinstance(limit, float) and not 0.0 < limit <= 1.0):
        raise error(where, what, limit, valid, "Use None to evaluate everything.")
    return limit


def check_size(value: Any, argument: str, where: str, minimum: int = 1) -> int:
    """A count such as ``batch_size`` or ``max_length``: an int >= ``minimum`` (not a bool, a float or a string)."""
    return as_int(value, where=where, argument=argument, minimum=minimum, error=MisconfigurationException)


def check_key(value: Any, argument: str, where: str) -> str:
    """A record key such as ``text_key``: a non-empty string."""
    if not isinstance(value, str) or not value:
        raise error(where, argument, value, "a non-empty string (a key of the JSON records)")
    return value


def import_object(path: str, argument: str, where: str) -> Any:
    """The object named by ``"package.module.name"`` (or ``"package.module:name"``), for YAML configs."""
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise error(
            where,
            argument,
            path,
            "a callable or its import path 'package.module.function'",
            f"Cannot import it: {err}. The module must be importable from the working directory (or PYTHONPATH).",
        ) from err


def takes_two_arguments(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can be called with two positional arguments (True when its signature is unknown)."""
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # builtins without a signature
        return True
    return True


def check_forward_fn(forward_fn: ForwardFn | str | None, where: str) -> ForwardFn | None:
    """The ``forward_fn`` argument: None, a function ``(model, batch) -> logits`` or its import path."""
    if forward_fn is None:
        return None
    fn = import_object(forward_fn, "forward_fn", where) if isinstance(forward_fn, str) else forward_fn
    if not callable(fn) or not takes_two_arguments(fn):
        raise error(
            where,
            "forward_fn",
            forward_fn,
            "None or a function (model, batch) -> logits, or its import path 'package.module.function'",
            "E.g. `def forward_fn(model, batch): return model(batch['input_ids'])`.",
        )
    return fn


def check_flag(value: Any, argument: str, where: str) -> bool:
    """A switch such as ``allow_beyond_max_positions``: a real ``bool`` (a YAML ``"false"`` in quotes is refused)."""
    return as_bool(value, where=where, argument=argument, error=MisconfigurationException)
