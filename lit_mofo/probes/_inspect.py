"""What the probes read off a model without calling it: what kind of language model it is, how many token ids it
takes and how many positions, and the refusals in ``setup`` that these facts decide (before any forward, so that a
model the probe cannot measure fails on every rank together rather than inside a sharded forward).

The kind is read from the model's class and config, never from its ``forward`` signature (transformers 5 forwards
take ``**kwargs``): transformers' own auto-class tables say which classes are causal LMs, sequence-to-sequence LMs
and masked LMs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lit_mofo.probes._checks import ForwardFn, error

__all__ = [
    "ModelKind",
    "Positions",
    "check_next_token_model",
    "check_window_lengths",
    "language_model_kind",
    "model_positions",
    "vocabulary_size",
]

ModelKind = Literal["causal", "seq2seq", "masked", "other", "unknown"]

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx", "max_sequence_length")
_POSITION_TABLE = re.compile(r"(^|_)(wpe|pos|position|positions|positional)(_|$)")  # wpe, embed_positions, ...


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside the wrappers that keep its behaviour: PEFT's ``PeftModel`` (its base model) and
    ``torch.compile``'s ``OptimizedModule``. FSDP2's ``fully_shard`` keeps the model's class, so it needs none."""
    for _ in range(8):  # a wrapper of a wrapper at most a few deep
        compiled = getattr(model, "_orig_mod", None)
        base = getattr(model, "get_base_model", None)
        if isinstance(compiled, nn.Module):
            model = compiled
        elif callable(base) and type(model).__module__.split(".")[0] == "peft":
            model = base()
        else:
            break
    return model


@functools.cache
def _auto_classes(table: str) -> frozenset[str]:
    """The class names of one of transformers' auto-class tables (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, ...)."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, table, {}).values():
        names.update((value,) if isinstance(value, str) else value)
    return frozenset(names)


def language_model_kind(model: nn.Module) -> ModelKind:
    """What kind of language model ``model`` is, from its class and config (PEFT and ``torch.compile`` wrappers
    looked through):

    - ``"causal"``: a decoder-only LM whose ``logits[:, t]`` predict the token after position ``t`` (Llama, GPT-2,
      Qwen3, Gemma3, Mixtral, ...: the classes of transformers' causal-LM table, or named ``*ForCausalLM``);
    - ``"seq2seq"``: an encoder-decoder LM over token ids (BART, T5, ...): called with ``input_ids`` alone, its
      decoder reads the ids shifted right, so ``logits[:, t]`` predict token ``t`` itself;
    - ``"masked"``: a bidirectional encoder with an LM head (BERT, RoBERTa, ...), every position seeing every token;
    - ``"other"``: any other transformers model (a vision or speech model, a classifier, a model without its head);
    - ``"unknown"``: not a transformers model: nothing says what it computes.

    The next-token probes (:class:`~lit_mofo.probes.LanguageModelProbe`,
    :class:`~lit_mofo.probes.MultipleChoiceProbe`, the scenario probes) measure ``"causal"`` models, and
    ``"unknown"`` ones on the documented contract (next-token logits); they refuse the others in ``setup`` unless
    given a ``forward_fn``.
    """
    model = unwrapped(model)
    if not is_transformers_model(model):
        return "unknown"
    classes = {cls.__name__ for cls in type(model).__mro__}
    config = getattr(model, "config", None)

    def listed(table: str, *suffixes: str) -> bool:
        return bool(classes & _auto_classes(table)) or any(name.endswith(suffixes) for name in classes)

    if getattr(config, "is_encoder_decoder", False):
        text_to_text = getattr(model, "main_input_name", "input_ids") == "input_ids"
        seq2seq = text_to_text and listed("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "ForConditionalGeneration")
        return "seq2seq" if seq2seq else "other"
    encoder_type = getattr(config, "model_type", None) in _auto_model_types("MODEL_FOR_MASKED_LM_MAPPING_NAMES")
    if listed("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "ForCausalLM", "LMHeadModel"):
        # BERT-like encoders' causal heads (BertLMHeadModel, RobertaForCausalLM) attend causally only as decoders
        return "masked" if encoder_type and getattr(config, "is_decoder", True) is False else "causal"
    pretraining = encoder_type and any(name.endswith("ForPreTraining") for name in classes)  # BertForPreTraining
    if listed("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "ForMaskedLM") or pretraining:
        return "masked"
    return "other"


@functools.cache
def _auto_model_types(table: str) -> frozenset[str]:
    from transformers.models.auto import modeling_auto

    return frozenset(getattr(modeling_auto, table, {}))


_FORWARD_FN = (
    "or pass `forward_fn=` if you have a causal way to call it (a function (model, batch) -> logits [batch, seq, "
    "vocab] where logits[:, t] predict batch['input_ids'][:, t + 1])."
)


def check_next_token_model(model: nn.Module, forward_fn: ForwardFn | None, where: str) -> None:
    """Refuse in ``setup``, before any forward, a model whose logits are not next-token predictions when the probe
    would call it itself (no ``forward_fn``): an encoder-decoder, a masked LM or another kind of transformers model
    (:func:`language_model_kind`), with the fix."""
    if forward_fn is not None:
        return
    kind = language_model_kind(model)
    if kind in ("causal", "unknown"):
        return
    name = type(unwrapped(model)).__name__
    if kind == "seq2seq":
        why = (
            f"{name} is an encoder-decoder (sequence-to-sequence) model: called with `input_ids` alone, its decoder "
            "reads them shifted right, so logits[:, t] predict token t, not t + 1, and the score would be off by one "
            "token. Measure it with a `CallableProbe` on (source, target) pairs, e.g. the mean of "
            "`model(input_ids=source, labels=target).loss` (transformers shifts the labels the model's own way), "
        )
    elif kind == "masked":
        why = (
            f"{name} is a masked (bidirectional) language model: every position sees the token a next-token score "
            "would ask it to predict, so the score would mean nothing. Measure its masked-LM loss with a "
            "`CallableProbe` (e.g. `model(input_ids=masked, labels=labels).loss` with a fixed mask), a "
            "classification head with `AccuracyProbe`, "
        )
    else:
        why = (
            f"{name} is not a causal language model (those are transformers' `*ForCausalLM` classes; a base model "
            "such as `LlamaModel` has no LM head). Measure a classifier with `AccuracyProbe` (a dataloader of its "
            "inputs and labels), anything else with a `CallableProbe`, "
        )
    raise MisconfigurationException(f"{where} scores next-token predictions, but {why}{_FORWARD_FN}")


def vocabulary_size(model: nn.Module) -> int | None:
    """How many token ids ``model`` can take and predict: the smallest of its input embedding's rows, its output
    embedding's outputs and ``config.vocab_size`` that it has; None when it has none of them."""
    sizes = []
    for getter, attribute in (("get_input_embeddings", "num_embeddings"), ("get_output_embeddings", "out_features")):
        get = getattr(model, getter, None)
        if callable(get):
            try:
                layer = get()
            except (NotImplementedError, AttributeError):
                layer = None
            if isinstance(getattr(layer, attribute, None), int):
                sizes.append(getattr(layer, attribute))
    config_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(config_size, int) and not isinstance(config_size, bool):
        sizes.append(config_size)
    return min(sizes) if sizes else None


@dataclass(frozen=True)
class Positions:
    """The longest sequence a model takes.

    Attributes:
        trained: the maximum positions its config states (``max_position_embeddings``, ``n_positions``, ...): what
            it was trained on; None if its config states none.
        trained_source: where that number comes from, for messages (``GPT2Config.n_positions``).
        table: the positions its learned absolute position embedding holds (``wpe``, ``position_embeddings``,
            ``embed_positions``: the rows less an offset or a padding row): no position beyond them can run; None
            if it has none (rotary, ALiBi or relative positions run any length, if not well beyond ``trained``).
        table_source: the module holding that table, for messages.
    """

    trained: int | None = None
    trained_source: str = ""
    table: int | None = None
    table_source: str = ""

    @property
    def limit(self) -> int | None:
        """The longest window a probe scores without being told to go beyond: the smaller of the two."""
        known = [n for n in (self.trained, self.table) if n is not None]
        return min(known) if known else None

    def describe(self) -> str:
        """``"GPT2Config.n_positions = 32; position table transformer.wpe: 32 rows"``."""
        parts = []
        if self.trained is not None:
            parts.append(f"{self.trained_source} = {self.trained}")
        if self.table is not None:
            parts.append(f"position table {self.table_source}: {self.table} rows")
        return "; ".join(parts)


def _position_tables(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """The learned position tables the token ids go through: the embeddings named like one (``wpe``,
    ``position_embeddings``, ``embed_positions``, ...) beside the token embedding (``get_input_embeddings``),
    wherever it is used (BART's encoder and decoder), so that a vision tower's patch positions do not count; in the
    whole model when it does not say which its token embedding is."""
    modules = dict(model.named_modules(remove_duplicate=False))
    get_tokens = getattr(model, "get_input_embeddings", None)
    try:
        tokens = get_tokens() if callable(get_tokens) else None
    except (NotImplementedError, AttributeError):
        tokens = None
    weight = getattr(tokens, "weight", None) if tokens is not None else None
    parents = {  # where the token embedding (or one tied to it: BART's encoder and decoder) is used
        name.rpartition(".")[0]
        for name, module in modules.items()
        if module is tokens or (weight is not None and getattr(module, "weight", None) is weight)
    }
    return [
        (name, module)
        for name, module in modules.items()
        if isinstance(module, nn.Embedding)
        and _POSITION_TABLE.search(name.rpartition(".")[2])
        and (not parents or name.rpartition(".")[0] in parents)
    ]


def model_positions(model: nn.Module) -> Positions:
    """The maximum positions of ``model``: its (text decoder's) config and its learned position tables, found by
    name (PEFT and ``torch.compile`` wrappers looked through; under FSDP2 the table keeps its full row count)."""
    model = unwrapped(model)
    trained, trained_source = None, ""
    config = getattr(model, "config", None)
    if config is not None:
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        for key in _POSITION_KEYS:
            value = getattr(text_config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                attribute = getattr(text_config, "attribute_map", {}).get(key, key)  # GPT-2's n_positions
                trained, trained_source = value, f"{type(text_config).__name__}.{attribute}"
                break
    table, table_source = None, ""
    for name, module in _position_tables(model):
        # BART/OPT count positions from an offset; RoBERTa-likes from padding_idx + 1 (roberta-base: 514 rows, 512)
        offset = getattr(module, "offset", 0)
        skipped = offset if isinstance(offset, int) else 0
        if module.padding_idx is not None:
            skipped = max(skipped, module.padding_idx + 1)
        rows = module.num_embeddings - skipped
        if table is None or rows < table:
            table, table_source = rows, name
    return Positions(trained, trained_source, table, table_source)


def check_window_lengths(
    lengths: Iterable[tuple[str, int]],
    positions: Positions,
    allow_beyond: bool,
    where: str,
    argument: str,
    value: object,
    fix: str,
) -> None:
    """Refuse, before any forward, the longest of the windows ``(origin, length)`` if it is longer than the model
    takes: beyond a learned position table always (it cannot run), beyond the config's maximum positions unless
    ``allow_beyond`` (it runs on rotary/relative positions, beyond what the model was trained on).

    The error names ``argument=value`` (what the fix changes), the model's maximum positions and where they come
    from, the longest window and its origin, and ``fix`` (which gets the limit as ``{limit}``), with the opt-in
    ``allow_beyond_max_positions=True`` where it applies.
    """
    limit = positions.limit
    if limit is None:
        return
    origin, longest = max(lengths, key=lambda pair: pair[1], default=("", 0))
    hard = positions.table is not None and longest > positions.table
    if longest <= limit or (allow_beyond and not hard):
        return
    fix = fix.format(limit=limit)
    if hard:
        advice = f"{fix} The model's learned position table has {positions.table} rows: no longer window can run" + (
            ", whatever `allow_beyond_max_positions`." if allow_beyond else "."
        )
    else:
        advice = (
            f"{fix} Or pass `allow_beyond_max_positions=True` to score longer windows anyway: the model has no "
            f"learned position table, so they run, but beyond the {limit} positions it was trained on."
        )
    raise error(
        where,
        argument,
        value,
        f"windows of at most {limit} tokens (the model's maximum positions: {positions.describe()})",
        f"The longest window ({origin}) has {longest} tokens. {advice}",
    )
