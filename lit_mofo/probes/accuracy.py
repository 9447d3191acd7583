"""Accuracy on a labelled reference set: classification, or multiple choice scored by log-likelihood."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import Dataset

from lit_mofo.probes import _data
from lit_mofo.probes.base import Probe, find_language_model, move_batch

__all__ = ["AccuracyProbe", "MultipleChoiceProbe"]

_LABEL_KEYS = ("labels", "label")


def _exactly_one(probe: str, **sources: Any) -> None:
    given = sorted(k for k, v in sources.items() if v is not None)
    if len(given) != 1:
        raise MisconfigurationException(
            f"{probe} needs exactly one of {', '.join(f'`{k}`' for k in sources)}, got {given or 'none'}."
        )


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

    Under DDP the batches are dealt round-robin to the processes and the counts summed (torchmetrics), so the
    whole set is evaluated once. Cost: one forward per batch.

    Args:
        files: reference files. examples: reference records. dataset: a map-style dataset. dataloader: batches.
        tokenizer: for texts: an object or a local path; None takes ``pl_module.tokenizer``.
        text_key: key of the text in records. label_key: key of the class index in records.
        max_length: texts longer than this many tokens are truncated.
        batch_size: examples per forward (not used with ``dataloader``).
        limit_batches: only the first batches: an int counts batches, a float is a fraction; None = all.
        name: the probe's name in metric keys (``probe/<name>/accuracy``).
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
        name: str = "accuracy",
    ) -> None:
        _exactly_one("AccuracyProbe", files=files, examples=examples, dataset=dataset, dataloader=dataloader)
        if dataloader is not None:
            _data.check_loader(dataloader, "dataloader")
        if batch_size < 1 or max_length < 1:
            raise MisconfigurationException(f"`batch_size={batch_size}` and `max_length={max_length}` must be >= 1.")
        self.files, self.examples, self.dataset, self.dataloader = files, examples, dataset, dataloader
        self.tokenizer = tokenizer
        self.text_key, self.label_key = text_key, label_key
        self.max_length, self.batch_size = max_length, batch_size
        self.limit_batches = _data.check_limit(limit_batches)
        self.name = _data.check_name(name)
        self._batches: list[list[tuple[list[int], int]]] | None = None
        self._pad_id = 0
        self._correct: _data.SumPair | None = None

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"accuracy": True}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._correct = _data.SumPair(pl_module.device)
        if self.dataloader is not None:
            return
        if self.files is not None:
            records: Sequence[Any] = _data.read_records(self.files, self.text_key)
        elif self.examples is not None:
            records = list(self.examples)
        else:
            assert self.dataset is not None
            records = [self.dataset[i] for i in range(len(self.dataset))]  # type: ignore[arg-type]
        if not records:
            raise MisconfigurationException(f"Probe {self.name!r}: the reference set is empty.")
        tokenizer = _data.resolve_tokenizer(self.tokenizer, pl_module)
        if tokenizer is not None:
            self._pad_id = _data.pad_id(tokenizer)
        items = [self._item(record, tokenizer) for record in records]
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        self._batches = batches[: _data.apply_limit(len(batches), self.limit_batches)]

    def _item(self, record: Any, tokenizer: Any) -> tuple[list[int], int]:
        if not isinstance(record, Mapping):
            raise MisconfigurationException(
                f"Probe {self.name!r}: reference records must be dicts, got {type(record).__name__}."
            )
        label = record.get(self.label_key)
        if isinstance(label, Tensor):
            label = label.item()
        if not isinstance(label, int) or isinstance(label, bool):
            raise MisconfigurationException(
                f"Probe {self.name!r}: record {dict(record)!r:.80} needs an int class index under {self.label_key!r}."
            )
        if "input_ids" in record:
            ids = _data.as_id_list(record["input_ids"], "input_ids")
        elif self.text_key in record:
            tokenizer = _data.require_tokenizer(tokenizer, self.name)
            ids = list(tokenizer(str(record[self.text_key]), add_special_tokens=True)["input_ids"])
        else:
            raise MisconfigurationException(
                f"Probe {self.name!r}: record {dict(record)!r:.80} has neither {self.text_key!r} nor 'input_ids'."
            )
        if not ids:
            raise MisconfigurationException(f"Probe {self.name!r}: record {dict(record)!r:.80} has no tokens.")
        return ids[: self.max_length], label

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._correct is None:
            self.setup(trainer, pl_module)
        assert self._correct is not None
        model = find_language_model(pl_module)
        device = pl_module.device
        self._correct.restart(device)
        if self._batches is not None:
            for batch in _data.rank_batches(self._batches, trainer):
                input_ids, attention_mask = _data.pad_right([ids for ids, _ in batch], self._pad_id)
                labels = torch.tensor([label for _, label in batch])
                logits = _data.forward_logits(model, input_ids.to(device), attention_mask.to(device))
                self._update(logits, labels)
        else:
            assert self.dataloader is not None
            for batch in _data.iterate_rank_batches(self.dataloader, trainer, self.limit_batches):
                logits, labels = self._user_forward(model, move_batch(batch, device))
                self._update(logits, labels)
        correct, count = self._correct.compute()
        if count == 0:
            raise MisconfigurationException(f"Probe {self.name!r}: the reference dataloader yielded no example.")
        return {"accuracy": correct / count}

    def _user_forward(self, model: torch.nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, Mapping):
            key = next((k for k in _LABEL_KEYS if k in batch), None)
            if key is None:
                raise MisconfigurationException(
                    f"Probe {self.name!r}: a dict batch needs the classes under 'labels' or 'label', got keys "
                    f"{sorted(batch)}."
                )
            inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
            output = model(**inputs, use_cache=False) if _data._is_transformers_model(model) else model(**inputs)
            return _data._logits(output), batch[key]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return _data._logits(model(batch[0])), batch[1]
        raise MisconfigurationException(
            f"Probe {self.name!r}: cannot read a batch of type {type(batch).__name__}; yield a dict with 'labels' or "
            "an (inputs, labels) pair."
        )

    def _update(self, logits: Tensor, labels: Tensor) -> None:
        assert self._correct is not None
        if logits.dim() != 2:
            raise MisconfigurationException(
                f"Probe {self.name!r}: the model returned logits of shape {tuple(logits.shape)}; AccuracyProbe needs "
                "class logits [batch, classes]. For a causal language model use MultipleChoiceProbe."
            )
        labels = labels.to(logits.device).reshape(-1)
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

    Under DDP the questions are dealt round-robin (by batch) to the processes and the counts summed. Cost: one
    forward per batch of ``batch_size`` questions times their choices.

    Args:
        files: reference files. examples: reference records.
        tokenizer: for texts: an object or a local path; None takes ``pl_module.tokenizer``.
        context_key: key of the context. choices_key: key of the list of choices. label_key: key of the answer index.
        target_delimiter: put between context and choice.
        max_length: longest scored sequence in tokens.
        batch_size: questions per forward.
        limit_batches: only the first batches: an int counts batches, a float is a fraction; None = all.
        name: the probe's name in metric keys (``probe/<name>/acc``).
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
        name: str = "multiple_choice",
    ) -> None:
        _exactly_one("MultipleChoiceProbe", files=files, examples=examples)
        if batch_size < 1 or max_length < 2:
            raise MisconfigurationException(
                f"`batch_size={batch_size}` must be >= 1 and `max_length={max_length}` >= 2."
            )
        self.files, self.examples = files, examples
        self.tokenizer = tokenizer
        self.context_key, self.choices_key, self.label_key = context_key, choices_key, label_key
        self.target_delimiter = target_delimiter
        self.max_length, self.batch_size = max_length, batch_size
        self.limit_batches = _data.check_limit(limit_batches)
        self.name = _data.check_name(name)
        self._batches: list[list[tuple[list[int], list[list[int]], int]]] = []
        self._pad_id = 0
        self._acc: _data.SumPair | None = None
        self._acc_norm: _data.SumPair | None = None

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"acc": True, "acc_norm": True}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        records = _data.read_records(self.files) if self.files is not None else list(self.examples or [])
        if not records:
            raise MisconfigurationException(f"Probe {self.name!r}: the reference set is empty.")
        tokenizer = _data.resolve_tokenizer(self.tokenizer, pl_module)
        if tokenizer is not None:
            self._pad_id = _data.pad_id(tokenizer)
        questions = [self._question(record, tokenizer) for record in records]
        batches = [questions[i : i + self.batch_size] for i in range(0, len(questions), self.batch_size)]
        self._batches = batches[: _data.apply_limit(len(batches), self.limit_batches)]
        self._acc = _data.SumPair(pl_module.device)
        self._acc_norm = _data.SumPair(pl_module.device)

    def _question(self, record: Any, tokenizer: Any) -> tuple[list[int], list[list[int]], int]:
        if not isinstance(record, Mapping):
            raise MisconfigurationException(f"Probe {self.name!r}: records must be dicts, got {record!r:.60}.")
        label = record.get(self.label_key)
        if "context_ids" in record:
            context = _data.as_id_list(record["context_ids"], "context_ids")
            choices = [_data.as_id_list(c, "choice_ids") for c in record.get("choice_ids", [])]
        elif self.context_key in record and self.choices_key in record:
            tokenizer = _data.require_tokenizer(tokenizer, self.name)
            context = list(tokenizer(str(record[self.context_key]), add_special_tokens=True)["input_ids"])
            choices = [
                list(tokenizer(self.target_delimiter + str(c), add_special_tokens=False)["input_ids"])
                for c in record[self.choices_key]
            ]
        else:
            raise MisconfigurationException(
                f"Probe {self.name!r}: record {dict(record)!r:.80} needs {self.context_key!r} and "
                f"{self.choices_key!r} (or 'context_ids' and 'choice_ids')."
            )
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise MisconfigurationException(
                f"Probe {self.name!r}: record {dict(record)!r:.80} needs {self.label_key!r}: the index of the right "
                f"choice among {len(choices)}."
            )
        if not context or any(not c or len(c) >= self.max_length for c in choices):
            raise MisconfigurationException(
                f"Probe {self.name!r}: record {dict(record)!r:.80} needs a non-empty context and choices of 1 to "
                f"{self.max_length - 1} tokens (`max_length={self.max_length}`)."
            )
        return context, choices, label

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._acc is None or self._acc_norm is None:
            self.setup(trainer, pl_module)
        assert self._acc is not None and self._acc_norm is not None
        model = find_language_model(pl_module)
        device = pl_module.device
        self._acc.restart(device)
        self._acc_norm.restart(device)
        for batch in _data.rank_batches(self._batches, trainer):
            sequences, spans = [], []
            for context, choices, _ in batch:
                for choice in choices:
                    kept = context[-(self.max_length - len(choice)) :]
                    sequences.append(kept + choice)
                    spans.append((len(kept), len(choice)))
            input_ids, attention_mask = _data.pad_right(sequences, self._pad_id)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = _data.forward_logits(model, input_ids, attention_mask)
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
        acc, count = self._acc.compute()
        acc_norm, _ = self._acc_norm.compute()
        return {"acc": acc / count, "acc_norm": acc_norm / count}
