"""Accuracy on a labelled reference set: classification, or multiple choice scored by log-likelihood."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import Dataset

from lit_mofo.probes import _checks, _inspect, _metrics, _model, _records, _tokens, distribution
from lit_mofo.probes.base import Probe, find_language_model, move_batch

__all__ = ["AccuracyProbe", "MultipleChoiceProbe"]

_LABEL_KEYS = ("labels", "label")


def _exactly_one(where: str, **sources: Any) -> None:
    given = sorted(k for k, v in sources.items() if v is not None)
    if len(given) != 1:
        raise MisconfigurationException(
            f"{where} needs exactly one of {', '.join(f'`{k}`' for k in sources)}, got {given or 'none'}."
        )


def _given_records(
    where: str, files: Any, examples: Any, text_key: str, check: Callable[[_records.Record], _records.Record]
) -> tuple[_records.ReferenceFiles | None, list[_records.Record]]:
    """``(files, records)``: the reference files (their head read and checked now, the rest left to ``setup``), or
    the ``examples`` given, all checked, as records named by origin."""
    if files is not None:
        reference = _records.ReferenceFiles(files, where, text_key)
        for record in reference.head():
            check(record)
        return reference, []
    examples = _records.in_memory_records(examples, "examples", where, "a non-empty list of dicts")
    return None, [check(record) for record in examples]


def _bad_record(where: str, record: _records.Record, valid: str, problem: str) -> MisconfigurationException:
    """The error for a record the probe cannot read, naming the argument it came from: ``files`` (with its file),
    ``examples`` or ``dataset``."""
    origin, shown = record.origin, f"{record.data!r:.80}"
    if origin.startswith(("examples[", "dataset[")):
        return _checks.error(where, origin.split("[", 1)[0], f"{origin} = {shown}", valid, problem)
    return _checks.error(where, "files", _records.file_of(origin), valid, f"{origin} {shown} {problem}")


def _needed(limit: int | float | None, batch_size: int) -> int | None:
    """How many records an int ``limit_batches`` needs (None: all of them, for no limit or a fraction)."""
    return limit * batch_size if isinstance(limit, int) else None


def _take(records: Iterable[_records.Record], count: int | None) -> list[_records.Record]:
    """The first ``count`` records (all when None), reading no further."""
    return list(records if count is None else itertools.islice(records, count))


def _index(value: Any) -> int | None:
    """An int (a 0-d tensor's item included), else None."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class AccuracyProbe(Probe):
    """Classification accuracy on a labelled reference set (metric ``accuracy``, higher is better).

    The model (:func:`~lit_mofo.probes.base.find_language_model` of the LightningModule) must return class logits
    ``[batch, classes]`` (a tensor, ``.logits`` or ``["logits"]``), e.g. a transformers
    ``*ForSequenceClassification`` model; the prediction is their argmax. For a causal LM answering questions, use
    :class:`MultipleChoiceProbe`.

    Give the reference data in exactly one way:

    - ``files`` (``.jsonl``/``.json`` records, or ``examples``: a list of such dicts) with the text under
      ``text_key`` (tokenized with ``tokenizer``, or ``pl_module.tokenizer``) or token ids under ``"input_ids"``,
      and the class index under ``label_key``;
    - ``dataset``: a map-style dataset of such dicts (tensors allowed);
    - ``dataloader``: any iterable of batches, each either a dict whose ``"labels"``/``"label"`` entry holds the
      classes and whose other entries are passed to the model as keyword arguments, or an ``(inputs, labels)`` pair
      with the model called as ``model(inputs)`` (any model, not only transformers).

    The model is called as ``model(input_ids=..., attention_mask=...)`` (or ``model(**batch)`` / ``model(inputs)``
    for your ``dataloader``); for a model called another way, give ``forward_fn(model, batch) -> logits``, with
    ``batch`` the dict ``{"input_ids", "attention_mask"}`` (your dataloader's dict without the labels, or the
    ``inputs`` of a pair). Records, token ids and labels (ints >= 0) are checked when the probe is built (of
    ``files``, the first MiB of each; the rest as ``setup`` reads it), token ids against the model's vocabulary and
    sequences against its maximum positions in ``setup`` (a batch of your ``dataloader`` before its forward), and
    labels against the model's number of classes at the first forward, each error naming the record
    (``file:line``) and the fix. ``setup`` reads ``files`` and ``dataset`` only as far as an int ``limit_batches``
    needs (``limit_batches * batch_size`` records).

    Under DDP and FSDP2 the batches are dealt round-robin to the processes with as many forwards on every rank
    (:func:`~lit_mofo.probes.run_batches`) and the counts summed (torchmetrics), so the whole set is evaluated once.
    Cost: one forward per batch.

    Args:
        files: reference files. examples: reference records. dataset: a map-style dataset. dataloader: batches.
        tokenizer: for texts: an object or a local path; None takes ``pl_module.tokenizer``.
        text_key: key of the text in records. label_key: key of the class index in records.
        max_length: texts longer than this many tokens are truncated.
        batch_size: examples per forward (not used with ``dataloader``).
        limit_batches: only the first batches: an int counts batches, a float is a fraction; None = all.
        forward_fn: a function ``(model, batch) -> logits`` (or its import path) for a model called another way.
        name: the probe's name in metric keys (``probe/<name>/accuracy``).
        allow_beyond_max_positions: score sequences longer than the model's maximum positions on a model without a
            learned position table (see :class:`~lit_mofo.probes.LanguageModelProbe`); False refuses them.
    """

    def __init__(
        self,
        files: str | Path | Sequence[str | Path] | None = None,
        examples: Sequence[Mapping[str, Any]] | None = None,
        dataset: Dataset[Any] | None = None,
        dataloader: Iterable[Any] | None = None,
        tokenizer: Any = None,
        text_key: str = "text",
        label_key: str = "label",
        max_length: int = 512,
        batch_size: int = 8,
        limit_batches: int | float | None = None,
        forward_fn: _checks.ForwardFn | str | None = None,
        name: str = "accuracy",
        allow_beyond_max_positions: bool = False,
    ) -> None:
        self.name = _checks.check_name(name)
        where = _checks.where(self)
        _exactly_one(where, files=files, examples=examples, dataset=dataset, dataloader=dataloader)
        self.text_key = _checks.check_key(text_key, "text_key", where)
        self.label_key = _checks.check_key(label_key, "label_key", where)
        self.max_length = _checks.check_size(max_length, "max_length", where)
        self.batch_size = _checks.check_size(batch_size, "batch_size", where)
        self.limit_batches = _checks.check_limit(limit_batches, where=where)
        self.tokenizer = _tokens.check_tokenizer(tokenizer, where)
        self.forward_fn = _checks.check_forward_fn(forward_fn, where)
        self.allow_beyond_max_positions = _checks.check_flag(
            allow_beyond_max_positions, "allow_beyond_max_positions", where
        )
        self.files, self.examples, self.dataset, self.dataloader = files, examples, dataset, dataloader
        self._files: _records.ReferenceFiles | None = None
        self._records: list[_records.Record] = []
        if files is not None or examples is not None:
            self._files, self._records = _given_records(where, files, examples, self.text_key, self._checked)
        elif dataset is not None:
            _records.check_dataset(dataset, where)
        else:
            _records.check_loader(dataloader, "dataloader", where)
        self._batches: list[list[tuple[list[int], int]]] | None = None
        self._pad_id = 0
        self._positions = _inspect.Positions()
        self._correct: _metrics.SumPair | None = None

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"accuracy": True}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._correct = _metrics.SumPair(pl_module.device)
        where = _checks.where(self)
        model = find_language_model(pl_module)
        self._positions = _inspect.model_positions(model)
        if self.dataloader is not None:  # the batches say how the model is called
            _model.check_gathered(model, where)
            return
        _model.check_forward(model, self.forward_fn, where)
        needed = _needed(self.limit_batches, self.batch_size)  # read no record beyond what limit_batches needs
        if self._files is not None:
            records = _take(map(self._checked, self._files.records()), needed)
        elif self.dataset is not None:
            records = _take(map(self._checked, _records.dataset_records(self.dataset)), needed)
        else:
            records = _take(self._records, needed)
        tokenizer = _tokens.resolve_tokenizer(self.tokenizer, pl_module, where)
        if tokenizer is not None:
            self._pad_id = _tokens.pad_id(tokenizer)
        items = []
        for origin, (content, label) in records:
            if isinstance(content, str):
                ids = _tokens.tokenize(
                    _tokens.require_tokenizer(tokenizer, self.name), content, add_special_tokens=True
                )
                if not ids:
                    raise MisconfigurationException(f"{where}: {origin} has no tokens after tokenization.")
            else:
                ids = content
            items.append((origin, ids[: self.max_length], label))
        _tokens.check_in_vocabulary(
            ((o, ids) for o, ids, _ in items), _inspect.vocabulary_size(model), where, _tokens.TOKENIZER_MISMATCH
        )
        pairs = [(ids, label) for _, ids, label in items]
        batches = [pairs[i : i + self.batch_size] for i in range(0, len(pairs), self.batch_size)]
        self._batches = batches[: distribution.apply_limit(len(batches), self.limit_batches)]
        kept = sum(len(batch) for batch in self._batches)
        _inspect.check_window_lengths(
            ((origin, len(ids)) for origin, ids, _ in items[:kept]),
            self._positions,
            self.allow_beyond_max_positions,
            where,
            "max_length",
            self.max_length,
            "Set `max_length={limit}` (longer texts are truncated to that many tokens).",
        )

    def _checked(self, record: _records.Record) -> _records.Record:
        """``record`` as ``(origin, (text or token ids, label))``, or an error naming it and its argument."""
        where, origin, data = _checks.where(self), record.origin, record.data
        valid = (
            f"records (dicts) with the text under {self.text_key!r} (`text_key`) or token ids under 'input_ids', "
            f"and an int class index >= 0 under {self.label_key!r} (`label_key`)"
        )
        if not isinstance(data, Mapping):
            raise _bad_record(where, record, valid, f"is a {type(data).__name__}, not a dict.")
        label = _index(data.get(self.label_key))
        if label is None or label < 0:
            raise _bad_record(where, record, valid, f"needs an int class index >= 0 under {self.label_key!r}.")
        if "input_ids" in data:
            ids = _tokens.as_id_list(data["input_ids"], f"{origin} input_ids", where)
            if not ids:
                raise _bad_record(where, record, valid, "has no tokens.")
            return _records.Record(origin, (ids, label))
        text = data.get(self.text_key)
        if not isinstance(text, str):
            raise _bad_record(where, record, valid, f"has neither a string under {self.text_key!r} nor 'input_ids'.")
        return _records.Record(origin, (text, label))

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._correct is None:
            self.setup(trainer, pl_module)
        assert self._correct is not None
        model = find_language_model(pl_module)
        device = pl_module.device
        self._correct.restart(device)
        distribution.run_batches(
            self._batches if self._batches is not None else self.dataloader,  # type: ignore[arg-type]
            trainer,
            forward=lambda inputs: self._forward(model, inputs),
            prepare=lambda batch: self._prepare(batch, device),
            consume=lambda inputs, logits: self._update(logits, inputs[1]),
            limit=None if self._batches is not None else self.limit_batches,  # the built batches are limited already
            where=_checks.where(self),
        )
        correct, count = self._correct.compute()
        if count == 0:
            raise MisconfigurationException(f"Probe {self.name!r}: the reference dataloader yielded no example.")
        return {"accuracy": correct / count}

    def _prepare(self, batch: Any, device: torch.device) -> tuple[Any, Tensor, bool]:
        """``(model inputs, labels, as keywords)`` of a batch on ``device``: the inputs are a dict of keyword
        arguments (built batches, a dict batch of the user's dataloader without its labels) or the first element of
        an ``(inputs, labels)`` pair, passed positionally."""
        if self._batches is not None:
            input_ids, attention_mask = _tokens.pad_right([ids for ids, _ in batch], self._pad_id)
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
            return inputs, torch.tensor([label for _, label in batch]), True
        batch = move_batch(batch, device)
        if isinstance(batch, Mapping):
            key = next((k for k in _LABEL_KEYS if k in batch), None)
            if key is None:
                raise MisconfigurationException(
                    f"Probe {self.name!r}: a dict batch needs the classes under 'labels' or 'label', got keys "
                    f"{sorted(batch)}."
                )
            inputs, labels, as_keywords = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}, batch[key], True
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, labels, as_keywords = batch[0], batch[1], False
        else:
            raise MisconfigurationException(
                f"Probe {self.name!r}: cannot read a batch of type {type(batch).__name__}; yield a dict with 'labels' "
                "or an (inputs, labels) pair."
            )
        if torch.as_tensor(labels).numel() == 0:  # refused here: a forward failing on one rank would hang the others
            raise _checks.error(
                _checks.where(self),
                "dataloader batch",
                "a batch of 0 examples",
                "batches of at least one example",
                "Drop empty batches from the reference dataloader.",
            )
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
        if isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point():  # token ids: positions apply
            _inspect.check_window_lengths(
                [("a dataloader batch", ids.size(1))],
                self._positions,
                self.allow_beyond_max_positions,
                _checks.where(self),
                "dataloader batch",
                f"input_ids of {ids.size(1)} tokens per row",
                "Cut the reference texts to at most {limit} tokens.",
            )
        return inputs, labels, as_keywords

    def _forward(self, model: torch.nn.Module, prepared: tuple[Any, Tensor, bool]) -> Tensor:
        where = _checks.where(self)
        inputs, _, as_keywords = prepared
        if as_keywords:
            return _model.call_model(model, inputs, self.forward_fn, where)
        if self.forward_fn is not None:
            return _model.logits_of(self.forward_fn(model, inputs), where)
        return _model.logits_of(model(inputs), where)

    def _update(self, logits: Tensor, labels: Tensor) -> None:
        assert self._correct is not None
        if logits.dim() != 2:
            raise MisconfigurationException(
                f"Probe {self.name!r}: the model returned logits of shape {tuple(logits.shape)}; AccuracyProbe needs "
                "class logits [batch, classes]. For a causal language model use MultipleChoiceProbe."
            )
        labels = torch.as_tensor(labels, device=logits.device).reshape(-1)
        classes = logits.size(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise _checks.error(
                _checks.where(self),
                "labels",
                f"class indices in [{int(labels.min())}, {int(labels.max())}]",
                f"[0, {classes - 1}] (the model returns {classes} class logits)",
                f"Check `label_key` ({self.label_key!r}) and that the model has a logit per class.",
            )
        self._correct.update((logits.argmax(dim=-1) == labels).sum(), labels.numel())


class MultipleChoiceProbe(Probe):
    """Multiple-choice accuracy of a causal LM, each choice scored by its log-likelihood after the context.

    For each question the model scores every choice ``c`` by ``sum log p(c_tokens | context)`` (the continuation's
    tokens only); the prediction is the best choice. Metrics (higher is better): ``acc`` (raw log-likelihood, as
    lm-evaluation-harness's ``acc``) and ``acc_norm`` (log-likelihood divided by the choice's number of tokens;
    lm-evaluation-harness normalises by bytes instead, so its ``acc_norm`` can differ slightly).

    Records (``files`` in ``.jsonl``/``.json``, or ``examples``) hold the context under ``context_key``, the choices
    under ``choices_key`` and the index of the right one under ``label_key``; choices are appended to the context
    after ``target_delimiter`` (a space by default, like lm-evaluation-harness), tokenized separately without
    special tokens. Token ids work too: ``{"context_ids": [...], "choice_ids": [[...], ...], "label": 1}``.
    A context longer than ``max_length`` minus the choice is cut from the left.

    The model is called as ``model(input_ids=..., attention_mask=...)``; give ``forward_fn(model, batch) -> logits``
    (``batch`` the dict ``{"input_ids", "attention_mask"}``) for a model called another way. Without ``forward_fn``,
    a transformers model that is not a causal LM (:func:`~lit_mofo.probes.language_model_kind`) is refused in
    ``setup``. Records are checked when the probe is built (of ``files``, the first MiB of each; the rest as
    ``setup`` reads it, only as far as an int ``limit_batches`` needs), token ids against the model's vocabulary and
    the scored sequences against its maximum positions in ``setup``, each error naming the record and the fix.

    Under DDP and FSDP2 the questions are dealt round-robin (by batch) to the processes, with as many forwards on
    every rank (:func:`~lit_mofo.probes.run_batches`), and the counts summed. Cost: one forward per batch of
    ``batch_size`` questions times their choices.

    Args:
        files: reference files. examples: reference records.
        tokenizer: for texts: an object or a local path; None takes ``pl_module.tokenizer``.
        context_key: key of the context. choices_key: key of the list of choices. label_key: key of the answer index.
        target_delimiter: put between context and choice.
        max_length: longest scored sequence in tokens.
        batch_size: questions per forward.
        limit_batches: only the first batches: an int counts batches, a float is a fraction; None = all.
        forward_fn: a function ``(model, batch) -> logits`` (or its import path) for a model called another way.
        name: the probe's name in metric keys (``probe/<name>/acc``).
        allow_beyond_max_positions: score sequences longer than the model's maximum positions on a model without a
            learned position table (see :class:`~lit_mofo.probes.LanguageModelProbe`); False refuses them.
    """

    def __init__(
        self,
        files: str | Path | Sequence[str | Path] | None = None,
        examples: Sequence[Mapping[str, Any]] | None = None,
        tokenizer: Any = None,
        context_key: str = "context",
        choices_key: str = "choices",
        label_key: str = "label",
        target_delimiter: str = " ",
        max_length: int = 512,
        batch_size: int = 4,
        limit_batches: int | float | None = None,
        forward_fn: _checks.ForwardFn | str | None = None,
        name: str = "multiple_choice",
        allow_beyond_max_positions: bool = False,
    ) -> None:
        self.name = _checks.check_name(name)
        where = _checks.where(self)
        _exactly_one(where, files=files, examples=examples)
        self.context_key = _checks.check_key(context_key, "context_key", where)
        self.choices_key = _checks.check_key(choices_key, "choices_key", where)
        self.label_key = _checks.check_key(label_key, "label_key", where)
        if not isinstance(target_delimiter, str):
            raise _checks.error(where, "target_delimiter", target_delimiter, "a string (a space by default)")
        self.target_delimiter = target_delimiter
        self.max_length = _checks.check_size(max_length, "max_length", where, minimum=2)
        self.batch_size = _checks.check_size(batch_size, "batch_size", where)
        self.limit_batches = _checks.check_limit(limit_batches, where=where)
        self.tokenizer = _tokens.check_tokenizer(tokenizer, where)
        self.forward_fn = _checks.check_forward_fn(forward_fn, where)
        self.allow_beyond_max_positions = _checks.check_flag(
            allow_beyond_max_positions, "allow_beyond_max_positions", where
        )
        self.files, self.examples = files, examples
        self._files, self._records = _given_records(where, files, examples, self.context_key, self._checked)
        self._batches: list[list[tuple[list[int], list[list[int]], int]]] = []
        self._pad_id = 0
        self._acc: _metrics.SumPair | None = None
        self._acc_norm: _metrics.SumPair | None = None

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"acc": True, "acc_norm": True}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        where = _checks.where(self)
        model = find_language_model(pl_module)
        _inspect.check_next_token_model(model, self.forward_fn, where)
        _model.check_forward(model, self.forward_fn, where)
        tokenizer = _tokens.resolve_tokenizer(self.tokenizer, pl_module, where)
        if tokenizer is not None:
            self._pad_id = _tokens.pad_id(tokenizer)
        needed = _needed(self.limit_batches, self.batch_size)  # read no record beyond what limit_batches needs
        records = _take(
            map(self._checked, self._files.records()) if self._files is not None else iter(self._records), needed
        )
        questions = [(origin, self._tokenized(origin, question, tokenizer)) for origin, question in records]
        _tokens.check_in_vocabulary(
            ((o, [t for part in (q[0], *q[1]) for t in part]) for o, q in questions),
            _inspect.vocabulary_size(model),
            where,
            _tokens.TOKENIZER_MISMATCH,
        )
        items = [question for _, question in questions]
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        self._batches = batches[: distribution.apply_limit(len(batches), self.limit_batches)]
        kept = sum(len(batch) for batch in self._batches)
        _inspect.check_window_lengths(  # each choice after its context, cut from the left to max_length
            (
                (origin, min(self.max_length, max(len(context) + len(choice) for choice in choices)))
                for origin, (context, choices, _) in questions[:kept]
            ),
            _inspect.model_positions(model),
            self.allow_beyond_max_positions,
            where,
            "max_length",
            self.max_length,
            "Set `max_length={limit}` (a context is cut from the left to fit its choice in that many tokens).",
        )
        self._acc = _metrics.SumPair(pl_module.device)
        self._acc_norm = _metrics.SumPair(pl_module.device)

    def _checked(self, record: _records.Record) -> _records.Record:
        """``record`` as ``(origin, (context, choices, label))`` (texts or token ids), or an error naming it and its
        argument."""
        where, origin, data = _checks.where(self), record.origin, record.data
        valid = (
            f"records (dicts) with the context under {self.context_key!r}, the list of choices under "
            f"{self.choices_key!r} (or 'context_ids' and 'choice_ids') and the index of the right one under "
            f"{self.label_key!r}"
        )
        if not isinstance(data, Mapping):
            raise _bad_record(where, record, valid, f"is a {type(data).__name__}, not a dict.")
        if "context_ids" in data:
            context: Any = _tokens.as_id_list(data["context_ids"], f"{origin} context_ids", where)
            raw_choices = data.get("choice_ids")
            if isinstance(raw_choices, Tensor) or not isinstance(raw_choices, Sequence):
                raw_choices = [] if raw_choices is None else list(raw_choices)
            choices: list[Any] = [_tokens.as_id_list(c, f"{origin} choice_ids", where) for c in raw_choices]
        elif self.context_key in data and self.choices_key in data:
            context, raw = data[self.context_key], data[self.choices_key]
            if isinstance(raw, str) or not isinstance(raw, Sequence):
                raise _bad_record(where, record, valid, f"needs a list of choices under {self.choices_key!r}.")
            choices = [str(c) for c in raw]
            context = str(context)
        else:
            raise _bad_record(
                where,
                record,
                valid,
                f"needs {self.context_key!r} and {self.choices_key!r} (or 'context_ids' and 'choice_ids').",
            )
        label = _index(data.get(self.label_key))
        if label is None or not 0 <= label < len(choices):
            raise _bad_record(
                where, record, valid, f"needs {self.label_key!r}: the index of the right choice among {len(choices)}."
            )
        self._check_lengths(origin, context, choices)
        return _records.Record(origin, (context, choices, label))

    def _check_lengths(self, origin: str, context: Any, choices: list[Any]) -> None:
        if not context or any(not c or (isinstance(c, list) and len(c) >= self.max_length) for c in choices):
            raise MisconfigurationException(
                f"Probe {self.name!r}: {origin} needs a non-empty context and choices of 1 to "
                f"{self.max_length - 1} tokens (`max_length={self.max_length}`)."
            )

    def _tokenized(
        self, origin: str, question: tuple[Any, list[Any], int], tokenizer: Any
    ) -> tuple[list[int], list[list[int]], int]:
        context, choices, label = question
        if isinstance(context, str):
            tokenizer = _tokens.require_tokenizer(tokenizer, self.name)
            context = _tokens.tokenize(tokenizer, context, add_special_tokens=True)
            choices = [
                _tokens.tokenize(tokenizer, self.target_delimiter + c, add_special_tokens=False) for c in choices
            ]
            self._check_lengths(origin, context, choices)
        return context, choices, label

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._acc is None or self._acc_norm is None:
            self.setup(trainer, pl_module)
        assert self._acc is not None and self._acc_norm is not None
        where = _checks.where(self)
        model = find_language_model(pl_module)
        device = pl_module.device
        self._acc.restart(device)
        self._acc_norm.restart(device)
        distribution.run_batches(
            self._batches,
            trainer,
            forward=lambda inputs: _model.forward_logits(model, inputs[0], inputs[1], self.forward_fn, where),
            prepare=lambda batch: self._prepare(batch, device),
            consume=self._consume,
            where=where,
        )
        acc, count = self._acc.compute()
        acc_norm, _ = self._acc_norm.compute()
        return {"acc": acc / count, "acc_norm": acc_norm / count}

    def _prepare(
        self, batch: list[tuple[list[int], list[list[int]], int]], device: torch.device
    ) -> tuple[Tensor, Tensor, list[tuple[int, int]], list[tuple[list[int], list[list[int]], int]]]:
        """``(input_ids, attention_mask, spans, batch)``: one row per question and choice (context cut from the
        left to fit ``max_length``), with the ``(start, length)`` of each choice's tokens."""
        sequences, spans = [], []
        for context, choices, _ in batch:
            for choice in choices:
                kept = context[-(self.max_length - len(choice)) :]
                sequences.append(kept + choice)
                spans.append((len(kept), len(choice)))
        input_ids, attention_mask = _tokens.pad_right(sequences, self._pad_id)
        return input_ids.to(device), attention_mask.to(device), spans, batch

    def _consume(
        self,
        inputs: tuple[Tensor, Tensor, list[tuple[int, int]], list[tuple[list[int], list[list[int]], int]]],
        logits: Tensor,
    ) -> None:
        """Score every choice by the log-likelihood of its tokens; count the questions answered right."""
        assert self._acc is not None and self._acc_norm is not None
        input_ids, _, spans, batch = inputs
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_log_probs = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        scores = [
            token_log_probs[row, start - 1 : start - 1 + length].sum() for row, (start, length) in enumerate(spans)
        ]
        offset = 0
        for _, choices, label in batch:
            raw = torch.stack(scores[offset : offset + len(choices)])
            lengths = torch.tensor([len(c) for c in choices], device=raw.device, dtype=raw.dtype)
            offset += len(choices)
            self._acc.update(float(raw.argmax().item() == label), 1)
            self._acc_norm.update(float((raw / lengths).argmax().item() == label), 1)
