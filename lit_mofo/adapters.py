"""The effective weights of a PEFT (LoRA) model, for the callbacks that compare weights with θ₀.

A LoRA layer keeps its pre-trained matrix ``W`` frozen as ``<module>.base_layer.weight`` and trains a low-rank change
next to it: the layer computes with ``W + ΔW``, ``ΔW = scale · B·A`` summed over its active adapters (peft's
``get_delta_weight``). What a fine-tune changed, and what it may forget through, is that effective weight, not the
adapter tensors A and B themselves (B starts at zero, so "B's drift from θ₀" would be meaningless). This module
names each adapted matrix as the merged model names it and computes its effective value exactly as peft's
``merge_and_unload`` does (``W`` plus each active adapter's ``get_delta_weight``, in ``W``'s dtype), so that a
measurement on a LoRA model equals the same measurement on its merged model.

Names: ``model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` (inside a
:class:`~lit_mofo.modules.CausalLMModule`) is ``model.model.layers.0.self_attn.q_proj.weight``, the name the merged
model's weight has in the same module: the ``PeftModel``/``LoraModel`` wrappers and ``.base_layer`` are dropped.

Supported: LoRA layers (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``, convolutions: whatever peft's
``get_delta_weight`` covers) without DoRA. Other adapter kinds (DoRA, IA³, LoHa, LoKr, OFT, ...) change the weights
in ways one ``get_delta_weight`` does not express; the callbacks refuse them with the fix (merge first).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "LORA_DOWN",
    "LORA_UP",
    "LoraWeight",
    "adapter_tensors",
    "checked_lora_weights",
    "adapter_values",
    "effective_name",
    "is_peft_model",
    "lora_weights",
    "unsupported_adapters",
]


LORA_DOWN = ("lora_A", "lora_embedding_A")  # a LoRA layer's down-projections A
LORA_UP = ("lora_B", "lora_embedding_B")  # its up-projections B (zero at peft's default initialisation)


def is_peft_model(module: nn.Module) -> bool:
    """Whether ``module`` holds PEFT adapter layers (peft's ``BaseTunerLayer``)."""
    if "peft" not in sys.modules:  # a model with adapters has imported peft
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(layer, BaseTunerLayer) for layer in module.modules())


def effective_name(name: str) -> str:
    """The name a parameter (or module) of a PEFT model has in the merged model: without the ``base_model.model.``
    of peft's wrappers and without ``.base_layer``."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer", "")


@dataclass(frozen=True)
class LoraWeight:
    """One adapted matrix of a LoRA model.

    Attributes:
        name: the effective weight's name (see :func:`effective_name`).
        base: the real name of the pre-trained matrix (``...base_layer.weight``).
        adapters: the real names of the adapter tensors of its active adapters (A and B of each).
        layer: the peft ``LoraLayer``.
    """

    name: str
    base: str
    adapters: tuple[str, ...]
    layer: nn.Module

    def delta(self) -> Tensor:
        """``ΔW`` summed over the active adapters (differentiable in A and B; zero when the layer is merged or its
        adapters are disabled: the base weight then holds everything)."""
        layer = self.layer
        base = layer.get_base_layer().weight  # type: ignore[operator]
        if layer.merged or layer.disable_adapters:  # type: ignore[attr-defined]
            return torch.zeros_like(base)
        deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if _has_adapter(layer, a)]  # type: ignore[operator]
        return sum(deltas[1:], deltas[0]) if deltas else torch.zeros_like(base)

    def effective(self, base: Tensor | None = None) -> Tensor:
        """``W + ΔW`` as peft's merge computes it (``W`` added in place with each active adapter's delta in turn, in
        ``W``'s dtype); ``base`` replaces the current ``W`` (its θ₀, say). No autograd."""
        layer = self.layer
        weight = (layer.get_base_layer().weight if base is None else base).detach().clone()  # type: ignore[operator]
        if layer.merged or layer.disable_adapters:  # type: ignore[attr-defined]
            return weight
        with torch.no_grad():
            for adapter in layer.active_adapters:  # type: ignore[attr-defined]
                if _has_adapter(layer, adapter):
                    weight += layer.get_delta_weight(adapter).to(weight.dtype)  # type: ignore[operator]
        return weight


def _has_adapter(layer: nn.Module, adapter: str) -> bool:
    return any(adapter in getattr(layer, attribute, {}) for attribute in ("lora_A", "lora_embedding_A"))


def lora_weights(module: nn.Module) -> dict[str, LoraWeight]:
    """Every LoRA-adapted matrix of ``module`` by the real name of its base weight; empty without LoRA layers."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    names = {id(param): name for name, param in module.named_parameters()}
    found: dict[str, LoraWeight] = {}
    for layer in module.modules():
        if not isinstance(layer, LoraLayer):
            continue
        base = names.get(id(layer.get_base_layer().weight))
        if base is None:
            continue
        adapters = tuple(
            names[id(param)]
            for attribute in (*LORA_DOWN, *LORA_UP)
            for adapter in layer.active_adapters
            if adapter in getattr(layer, attribute, {})
            for param in _parameters_of(getattr(layer, attribute)[adapter])
            if id(param) in names
        )
        found[base] = LoraWeight(name=effective_name(base), base=base, adapters=adapters, layer=layer)
    return found


def _parameters_of(entry: nn.Module | Tensor) -> Iterator[Tensor]:
    if isinstance(entry, nn.Module):
        yield from entry.parameters()
    else:  # lora_embedding_A/B are ParameterDicts of plain parameters
        yield entry


def unsupported_adapters(module: nn.Module) -> dict[str, str]:
    """Adapter tensors of ``module`` whose effect on the weights :class:`LoraWeight` cannot compute -> what they are
    (DoRA's magnitude, IA³, LoHa, LoKr, OFT, ...); empty for plain LoRA or no adapters."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    refused: dict[str, str] = {}
    for name, (layer, attribute) in adapter_tensors(module).items():
        dora = isinstance(layer, LoraLayer) and any(layer.use_dora.get(a, False) for a in layer.active_adapters)
        if isinstance(layer, LoraLayer) and attribute.startswith("lora_") and not dora:
            continue
        refused[name] = f"{'DoRA' if dora else type(layer).__name__}.{attribute}"
    return refused


def adapter_tensors(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every adapter tensor of ``module``'s PEFT layers (peft's ``BaseTunerLayer``), by name -> (its layer, the
    layer attribute that holds it: ``lora_A``, ``lora_B``, ``lora_magnitude_vector``, ``ia3_l``, ...); empty for a
    model without adapters."""
    if "peft" not in sys.modules:  # a model with adapters has imported peft
        return {}
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = {id(param): name for name, param in module.named_parameters()}
    found: dict[str, tuple[nn.Module, str]] = {}
    for layer in module.modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        for attribute in layer.adapter_layer_names:
            container = getattr(layer, attribute, None)
            if isinstance(container, nn.Module):
                found.update((names[id(p)], (layer, attribute)) for p in container.parameters() if id(p) in names)
    return found


@contextmanager
def adapter_values(params: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> Iterator[None]:
    """Temporarily give the parameters of ``params`` (by name) named in ``values`` those values (e.g. θ₀ of a layer's
    adapter tensors, to compute the effective weight the fit started from); restored on exit. No autograd."""
    saved = {name: params[name].detach().clone() for name in values}
    try:
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def checked_lora_weights(module: nn.Module, *, user: str, what: str, sharded: bool) -> dict[str, LoraWeight]:
    """:func:`lora_weights` of ``module`` for a callback that works on the effective weights: raises a
    ``MisconfigurationException`` naming ``user`` (the callback) and ``what`` it does with them, with the fix, for
    adapters whose effective weights cannot be computed (:func:`unsupported_adapters`) and for adapters on sharded
    parameters (``sharded``: FSDP2)."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    refused = unsupported_adapters(module)
    if refused:
        name, kind = next(iter(refused.items()))
        more = f", and {len(refused) - 1} more tensors" if len(refused) > 1 else ""
        raise MisconfigurationException(
            f"{user} {what} a PEFT model's effective weights W + scale·B·A, which it cannot compute for {name!r} "
            f"({kind}{more}). Use LoRA without DoRA, or work on the merged model: CausalLMModule.merged_model() "
            "(peft's merge_and_unload()) against the base model."
        )
    lora = lora_weights(module)
    if lora and sharded:
        raise MisconfigurationException(
            f"{user} does not support a PEFT model under FSDP2 sharding. Use `strategy='ddp'` for adapters (their "
            "trainable part is small), or a single device."
        )
    return lora
