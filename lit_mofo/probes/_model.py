"""How the probes call the model: refusing in ``setup`` a model they cannot call, reading its vocabulary size,
calling it with the keywords its ``forward`` takes (or the user's ``forward_fn``) and finding the logits in its
output."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lit_mofo.probes._checks import ForwardFn
from lit_mofo.probes._inspect import is_transformers_model
from lit_mofo.probes._tokens import TOKENIZER_MISMATCH
from lit_mofo.strategy import StrategyAdapter


def _forward_parameters(model: nn.Module) -> tuple[set[str], bool] | None:
    """The keyword names ``model.forward`` takes and whether it takes ``**kwargs``; None if it cannot be read."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _keywords(model: nn.Module, inputs: Mapping[str, Any], where: str, optional: Sequence[str]) -> dict[str, Any]:
    """``inputs`` as keyword arguments ``model.forward`` takes: ``optional`` ones it does not take are dropped,
    ``use_cache=False`` is added for transformers models; any other key it does not take is refused with the fix."""
    kwargs = dict(inputs)
    if is_transformers_model(model):
        kwargs["use_cache"] = False
    accepted = _forward_parameters(model)
    if accepted is None or accepted[1]:
        return kwargs
    names, _ = accepted
    kwargs = {k: v for k, v in kwargs.items() if k in names or (k not in optional and k != "use_cache")}
    missing = [k for k in kwargs if k not in names]
    if missing:
        name = type(model).__name__
        raise MisconfigurationException(
            f"{where} calls the model as `{name}({', '.join(f'{k}=...' for k in inputs)})` and needs logits back, "
            f"but `{name}.forward{inspect.signature(model.forward)}` takes no {missing}. Pass `forward_fn=`: a "
            "function (model, batch) -> logits, where batch is the dict of tensors above, e.g. "
            "`forward_fn=lambda model, batch: model(batch['input_ids'])`; from YAML, its import path "
            "'package.module.function'."
        )
    return kwargs


def check_gathered(model: nn.Module, where: str) -> None:
    """Refuse a model the probe cannot call on its own: one with sharded parameters that no FSDP2 unit inside it
    gathers (``fully_shard`` applied to the LightningModule rather than to the model the probes call)."""
    outside = StrategyAdapter.sharded_outside(model)
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        raise MisconfigurationException(
            f"{where} calls `{type(model).__name__}` (the LightningModule's `model`, or the module itself) on its "
            f"own, but its parameters {shown} are sharded by an FSDP2 `fully_shard` applied outside of it (e.g. to "
            "the LightningModule), so calling it would not gather them. In `configure_model`, apply `fully_shard` "
            "to each block and then to `self.model`, the model the probes call (as `CausalLMModule` does)."
        )


def check_forward(model: nn.Module, forward_fn: ForwardFn | None, where: str) -> None:
    """Refuse in ``setup``, before any forward, a model the probe cannot call: one sharded from outside
    (:func:`check_gathered`), or one that does not take the probe's default keywords (without ``forward_fn``)."""
    check_gathered(model, where)
    if forward_fn is None:
        _keywords(model, {"input_ids": None, "attention_mask": None}, where, optional=("attention_mask",))


def call_model(
    model: nn.Module,
    inputs: Mapping[str, Any],
    forward_fn: ForwardFn | None,
    where: str,
    optional: Sequence[str] = ("attention_mask",),
) -> Tensor:
    """The logits of ``model`` on the dict ``inputs``: ``forward_fn(model, inputs)``, or ``model(**inputs)`` with
    the keywords its ``forward`` takes."""
    if forward_fn is not None:
        return logits_of(forward_fn(model, dict(inputs)), where)
    kwargs = _keywords(model, inputs, where, optional)
    try:
        output = model(**kwargs)
    except IndexError as err:  # an embedding lookup beyond the table of a model that does not say its size
        ids = inputs.get("input_ids")
        if not isinstance(ids, Tensor) or ids.numel() == 0 or "index out of range" not in str(err):
            raise
        raise MisconfigurationException(
            f"{where}: the model's forward failed with `IndexError: {err}` on token ids in [{int(ids.min())}, "
            f"{int(ids.max())}]: an id is probably beyond its embedding. {TOKENIZER_MISMATCH} Or, with sequences of "
            f"{ids.size(-1)} tokens, a position beyond its position embedding: score shorter windows (`max_length`)."
        ) from err
    return logits_of(output, where)


def forward_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    forward_fn: ForwardFn | None = None,
    where: str = "The probe",
) -> Tensor:
    """Logits ``[batch, seq, vocab]`` (or ``[batch, classes]``) of a batch of token ids: ``forward_fn(model,
    {"input_ids", "attention_mask"})``, or ``model(input_ids=..., attention_mask=...)`` (the mask only if
    ``forward`` takes it; ``use_cache=False`` for transformers models)."""
    inputs: dict[str, Any] = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    return call_model(model, inputs, forward_fn, where)


def logits_of(output: Any, where: str = "The probe") -> Tensor:
    """The logits in a model's output: the tensor itself, ``.logits``, ``["logits"]`` or a tuple's first tensor."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise MisconfigurationException(
            f"{where}: the model returned {type(output).__name__}; a probe needs logits: a tensor, an output with "
            "`.logits` or a dict with 'logits'. Pass `forward_fn=` (a function (model, batch) -> logits) to adapt "
            "the call."
        )
    return logits
