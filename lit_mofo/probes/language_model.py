"""Language-model loss and perplexity on a reference set: the "general text" a fine-tuned model should not forget."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import Dataset

from lit_mofo.probes import _checks, _inspect, _metrics, _model, _records, _tokens, distribution
from lit_mofo.probes.base import Probe, find_language_model, move_batch

__all__ = ["LanguageModelProbe"]


class LanguageModelProbe(Probe):
    r"""Token-weighted mean next-token loss and perplexity of the model on a reference set.

    Metrics (both lower is better): ``loss``, the mean negative log-likelihood in nats over every predicted token of
    the set (each token weighs the same, whatever the batching), and ``perplexity`` = ``exp(loss)``. The aggregation
    is a torchmetrics metric holding the summed loss and the token count, summed across processes.

    Give the reference data in exactly one way:

    - ``files``: ``.txt`` (each non-empty line is one text), ``.jsonl`` (one object per line, with the text under
      ``text_key`` or token ids under ``"input_ids"``) or ``.json`` (a list of such objects);
    - ``texts``: a list of strings; ``token_ids``: a list of token-id lists;
    - ``dataset``: a map-style dataset whose items are strings, token-id lists/tensors, ``(input_ids, ...)`` tuples
      or dicts with ``"input_ids"`` (and optionally ``"attention_mask"``, ``"labels"`` with -100 = ignored);
    - ``dataloader``: any iterable of batches shaped like the items above, already collated (a tensor of ids, a
      tuple whose first element is one, or a dict). Its batches are used as they come.

    Texts are tokenized with ``tokenizer`` (an object, or a local path for ``AutoTokenizer``), or with the
    LightningModule's ``tokenizer`` attribute when None; special tokens (e.g. BOS) are added as the tokenizer does.
    Sequences longer than ``max_length`` are cut into consecutive windows of ``max_length`` tokens, each scored on
    its own; windows of a single token predict nothing and are dropped. Every window (and every batch of your
    ``dataloader``) is checked in ``setup``, before any forward, against the model's maximum positions (its
    config's ``max_position_embeddings``/``n_positions``/..., and the rows of a learned position table such as
    GPT-2's ``wpe``): a longer one is refused with the lengths and the fix (``max_length``). A model with rotary or
    relative positions runs longer windows, beyond what it was trained on; ``allow_beyond_max_positions=True``
    scores them anyway (a learned table cannot: those stay refused).

    The model called is :func:`~lit_mofo.probes.base.find_language_model` of the LightningModule (its ``model``
    attribute, else itself), as ``model(input_ids=..., attention_mask=...)`` (the mask only if its ``forward`` takes
    it; ``use_cache=False`` for transformers models); it must return next-token logits ``[batch, seq, vocab]`` (a
    tensor, ``.logits`` or ``["logits"]``). For a model called another way, give ``forward_fn(model, batch)``,
    which gets ``batch = {"input_ids": [batch, seq] int64, "attention_mask": [batch, seq]}`` (1 = token, 0 = right
    padding; for your ``dataloader``, its own batch) on the module's device and returns the logits (or an output
    holding them); e.g. ``forward_fn=lambda model, batch: model(batch["input_ids"])``. From YAML, give its import
    path ``"package.module.function"``. Refused in ``setup``, before any forward, without ``forward_fn``: a model
    whose ``forward`` takes no ``input_ids``, and a transformers model that is not a causal LM
    (:func:`~lit_mofo.probes.language_model_kind`: an encoder-decoder such as BART or T5, whose logits at ``t``
    predict token ``t``, not ``t + 1``; a masked LM such as BERT; a vision model), each with the fix.

    Bad input fails early, naming the argument, the bad value, the valid range and the fix: files, records and
    token ids (>= 0) when the probe is built (a directory, a missing, empty or binary file, text that is not UTF-8,
    invalid JSON with its ``file:line``, a record without ``text_key``: the first MiB of each file is read then,
    the rest as ``setup`` reads it); token ids beyond the model's vocabulary (its input and output embeddings,
    ``config.vocab_size``) and windows beyond its positions in ``setup``; the batches of your ``dataloader`` as
    they come.

    Reading is bounded by what ``limit_batches`` needs: with an int limit, ``setup`` reads records (``.txt`` and
    ``.jsonl`` files line by line, a ``dataset`` item by item) and tokenizes texts only until it has
    ``limit_batches * batch_size`` windows, tokenizing only as much of a long text as those windows take (the ids
    are exactly those of the whole text's tokenization). Without a limit, or with a fraction (which needs the
    total), it reads everything.

    Cost: one forward pass (no backward) per batch: about a third of a training step on the same number of tokens.
    ``limit_batches`` bounds it. Under DDP and FSDP2 the batches are dealt round-robin to the processes (batch ``i``
    to rank ``i % world_size``; see :func:`~lit_mofo.probes.run_batches`), so the set is evaluated once in total, and
    the metric sums across ranks; the set and the limit are the same whatever the number of processes, so values are
    comparable between runs (on the same weights they equal the single-process ones up to float64 summation order).
    Every rank runs as many forwards, as FSDP2's all-gathers need: a rank with a batch fewer runs one more on the
    first batch and discards it. Your ``dataloader`` is iterated by every rank, which keeps its own share; the ranks
    agree at each step whether a batch is left, so a loader of another length on some rank cannot make them wait.

    Args:
        files: reference files (see above).
        texts: reference texts.
        token_ids: reference token-id sequences.
        dataset: a map-style reference dataset.
        dataloader: an iterable of reference batches.
        tokenizer: tokenizer for texts: an object or a local path; None takes ``pl_module.tokenizer``.
        text_key: JSON key of the text in ``.jsonl``/``.json`` records.
        max_length: longest window scored, in tokens.
        batch_size: sequences per forward (not used with ``dataloader``).
        limit_batches: evaluate only the first batches: an int counts batches, a float is a fraction of them; None
            evaluates the whole set. The same batches every evaluation.
        forward_fn: a function ``(model, batch) -> logits`` (or its import path) for a model that is not called as
            ``model(input_ids=..., attention_mask=...)``; None calls it so.
        name: the probe's name in metric keys (``probe/<name>/loss``); a monitor's dict key overrides it.
        allow_beyond_max_positions: score windows longer than the model's maximum positions on a model without a
            learned position table (rotary, relative positions), beyond what it was trained on; False refuses them.

    Example::

        probe = LanguageModelProbe(files="data/wikitext_sample.txt", max_length=256, limit_batches=20)
        trainer = Trainer(callbacks=[ForgettingMonitor({"general_text": probe})])
    """

    def __init__(
        self,
        files: str | Path | Sequence[str | Path] | None = None,
        texts: Sequence[str] | None = None,
        token_ids: Sequence[Sequence[int]] | None = None,
        dataset: Dataset[Any] | None = None,
        dataloader: Iterable[Any] | None = None,
        tokenizer: Any = None,
        text_key: str = "text",
        max_length: int = 512,
        batch_size: int = 8,
        limit_batches: int | float | None = None,
        forward_fn: _checks.ForwardFn | str | None = None,
        name: str = "lm",
        allow_beyond_max_positions: bool = False,
    ) -> None:
        self.name = _checks.check_name(name)
        where = _checks.where(self)
        sources = {"files": files, "texts": texts, "token_ids": token_ids, "dataset": dataset, "dataloader": dataloader}
        given = sorted(k for k, v in sources.items() if v is not None)
        if len(given) != 1:
            raise MisconfigurationException(
                f"{where} needs exactly one of `files`, `texts`, `token_ids`, `dataset` or `dataloader`, "
                f"got {given or 'none'}."
            )
        self.text_key = _checks.check_key(text_key, "text_key", where)
        self.max_length = _checks.check_size(max_length, "max_length", where, minimum=2)  # one token predicts the next
        self.batch_size = _checks.check_size(batch_size, "batch_size", where)
        self.limit_batches = _checks.check_limit(limit_batches, where=where)
        self.tokenizer = _tokens.check_tokenizer(tokenizer, where)
        self.forward_fn = _checks.check_forward_fn(forward_fn, where)
        self.allow_beyond_max_positions = _checks.check_flag(
            allow_beyond_max_positions, "allow_beyond_max_positions", where
        )
        self.files, self.texts, self.token_ids = files, texts, token_ids
        self.dataset, self.dataloader = dataset, dataloader
        # the reference items given in memory: texts or token-id lists, with origins
        self._items: list[_records.Record] = []
        self._files: _records.ReferenceFiles | None = None
        if files is not None:
            self._files = _records.ReferenceFiles(files, where, self.text_key)
            for record in self._files.head():  # the rest is read, and checked, in setup
                self._record_item(record)
        elif texts is not None:
            if isinstance(texts, str):
                raise _checks.error(where, "texts", texts, "a list of strings", "For a file use `files=`.")
            self._items = _records.in_memory_records(texts, "texts", where, "a non-empty list of strings")
            for origin, text in self._items:
                if not isinstance(text, str):
                    raise _checks.error(where, "texts", f"{origin} = {text!r:.60}", "a list of strings")
        elif token_ids is not None:
            rows = token_ids.tolist() if isinstance(token_ids, Tensor) else token_ids
            records = _records.in_memory_records(rows, "token_ids", where, "a non-empty list of token-id lists")
            self._items = [_records.Record(o, _tokens.as_id_list(ids, o, where)) for o, ids in records]
            if not any(len(ids) >= 2 for _, ids in self._items):
                raise _checks.error(
                    where,
                    "token_ids",
                    f"{token_ids!r:.80}",
                    "sequences of at least 2 tokens (one predicts the next)",
                    "The reference set is empty: no sequence has 2 tokens.",
                )
        elif dataset is not None:
            _records.check_dataset(dataset, where)
        else:
            _records.check_loader(dataloader, "dataloader", where)
        self._batches: list[Any] | None = None
        self._pad_id = 0
        self._vocab: int | None = None
        self._positions = _inspect.Positions()
        self._loss: _metrics.SumPair | None = None

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"loss": False, "perplexity": False}

    @property
    def num_batches(self) -> int | None:
        """Batches evaluated per evaluation across all processes (after ``limit_batches``); None for a dataloader."""
        return None if self._batches is None else len(self._batches)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        where = _checks.where(self)
        model = find_language_model(pl_module)
        _inspect.check_next_token_model(model, self.forward_fn, where)
        _model.check_forward(model, self.forward_fn, where)
        self._vocab = _inspect.vocabulary_size(model)
        self._positions = _inspect.model_positions(model)
        if self.dataloader is None:
            windows = self._read_windows(pl_module)
            if not windows:
                raise MisconfigurationException(
                    f"Probe {self.name!r}: the reference set is empty (no sequence of at least 2 tokens). "
                    "Check the files/texts given, `text_key` and the tokenizer."
                )
            if not any(label != _tokens.IGNORE_INDEX for _, (_, labels) in windows for label in labels[1:]):
                raise MisconfigurationException(
                    f"Probe {self.name!r}: no token of the reference set is scored (every label after the first "
                    "token of each window is -100)."
                )
            batches = [windows[i : i + self.batch_size] for i in range(0, len(windows), self.batch_size)]
            batches = batches[: distribution.apply_limit(len(batches), self.limit_batches)]
            _inspect.check_window_lengths(
                ((origin, len(ids)) for batch in batches for origin, (ids, _) in batch),
                self._positions,
                self.allow_beyond_max_positions,
                where,
                "max_length",
                self.max_length,
                "Set `max_length={limit}` (longer sequences are cut into windows of at most that many tokens).",
            )
            self._batches = [[window for _, window in batch] for batch in batches]
        self._loss = _metrics.SumPair(pl_module.device)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._loss is None:
            self.setup(trainer, pl_module)
        assert self._loss is not None
        model = find_language_model(pl_module)
        self._loss.restart(pl_module.device)
        distribution.run_batches(
            self._batches if self._batches is not None else self.dataloader,  # type: ignore[arg-type]
            trainer,
            forward=lambda inputs: _model.forward_logits(
                model, inputs[0], inputs[1], self.forward_fn, _checks.where(self)
            ),
            prepare=lambda batch: self._prepare(batch, pl_module.device),
            consume=self._consume,
            limit=None if self._batches is not None else self.limit_batches,  # the built batches are limited already
            where=_checks.where(self),
        )
        total, count = self._loss.compute()  # summed across processes
        if count == 0:
            raise MisconfigurationException(
                f"Probe {self.name!r}: no reference token was scored on any process (empty dataloader, every label "
                "-100, or sequences of one token)."
            )
        loss = total / count
        return {"loss": loss, "perplexity": _exp(loss)}

    def _prepare(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, labels)`` of a batch on ``device``; a batch of the user's dataloader is
        checked first, so that ids beyond the model fail on every rank before the forward."""
        input_ids, attention_mask, labels = self._collate(batch)
        if self._batches is None:
            where = _checks.where(self)
            if input_ids.dim() != 2 or 0 in input_ids.shape:  # refused here: a forward failing on one rank would hang
                raise _checks.error(
                    where,
                    "dataloader batch",
                    f"input_ids of shape {tuple(input_ids.shape)}",
                    "token ids [batch, sequence] with at least one sequence of at least one token",
                    "Drop empty batches from the reference dataloader.",
                )
            _tokens.check_batch_ids(input_ids, self._vocab, where, "input_ids")
            _tokens.check_batch_ids(labels, self._vocab, where, "labels", labels=True)
            _inspect.check_window_lengths(
                [("a dataloader batch", input_ids.size(1))],
                self._positions,
                self.allow_beyond_max_positions,
                where,
                "dataloader batch",
                f"input_ids of {input_ids.size(1)} tokens per row",
                "Cut the reference sequences to at most {limit} tokens.",
            )
        return move_batch((input_ids, attention_mask, labels), device)

    def _consume(self, inputs: tuple[Tensor, Tensor, Tensor], logits: Tensor) -> None:
        """Add a batch's summed next-token loss and its number of scored tokens."""
        assert self._loss is not None
        total, count = next_token_nll(logits, inputs[2])
        if count > 0:
            self._loss.update(total, count)

    # ------------------------------------------------------------------ data
    def _record_item(self, record: _records.Record, num_tokens: int | None = None) -> str | list[int]:
        """A file record's text, or its token ids (the first ``num_tokens``; all when None), checked."""
        data = record.data
        if "input_ids" in data:
            ids = data["input_ids"]
            if num_tokens is not None and isinstance(ids, list):
                ids = ids[:num_tokens]
            return _tokens.as_id_list(ids, f"{record.origin} input_ids", _checks.where(self))
        text = data.get(self.text_key)
        if not isinstance(text, str):
            problem = "has no" if self.text_key not in data else f"has a {type(text).__name__}, not a string, under"
            raise _checks.error(
                _checks.where(self),
                "files",
                _records.file_of(record.origin),
                f"records with the text (a string) under `text_key` ({self.text_key!r}) or token ids under 'input_ids'",
                f"Record {record.origin} {problem} {self.text_key!r}; its keys are {sorted(data)}.",
            )
        return text

    def _read_windows(self, pl_module: pl.LightningModule) -> list[tuple[str, tuple[list[int], list[int]]]]:
        """The reference windows as ``(origin, (ids, labels))``, read (and checked against the model's vocabulary)
        only as far as an int ``limit_batches`` needs: ``limit_batches * batch_size`` windows."""
        where = _checks.where(self)
        needed = self.limit_batches * self.batch_size if isinstance(self.limit_batches, int) else None
        tokenizer = _tokens.resolve_tokenizer(self.tokenizer, pl_module, where)
        if tokenizer is not None:
            self._pad_id = _tokens.pad_id(tokenizer)
        windows: list[tuple[str, tuple[list[int], list[int]]]] = []
        for origin, item in self._reference_items():
            num_tokens = None if needed is None else (needed - len(windows)) * self.max_length
            ids, labels = self._item(origin, item, tokenizer, num_tokens)
            _tokens.check_in_vocabulary(
                [(origin, ids + [t for t in labels if t != _tokens.IGNORE_INDEX])],
                self._vocab,
                where,
                _tokens.TOKENIZER_MISMATCH,
            )
            windows += [(origin, window) for window in self._windows((ids, labels))]
            if needed is not None and len(windows) >= needed:
                return windows[:needed]
        return windows

    def _reference_items(self) -> Iterator[tuple[str, Any]]:
        """``(origin, item)`` of every reference sequence, read as consumed: a file's records, a dataset's items,
        or the texts/token ids given."""
        if self._files is not None:
            return ((record.origin, record) for record in self._files.records())
        if self.dataset is not None:
            return iter(_records.dataset_records(self.dataset))
        return iter(self._items)

    def _item(self, origin: str, item: Any, tokenizer: Any, num_tokens: int | None) -> tuple[list[int], list[int]]:
        """``(ids, labels)`` of one reference item, as far as its first ``num_tokens`` tokens (all when None)."""
        where = _checks.where(self)
        if isinstance(item, _records.Record):  # a record of the files
            item = self._record_item(item, num_tokens)
        if isinstance(item, str):
            tokenizer = _tokens.require_tokenizer(tokenizer, self.name)
            ids = _tokens.tokenize_prefix(tokenizer, item, True, num_tokens)
            return ids, ids
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise MisconfigurationException(
                    f"{where}: {origin} is a dict with keys {sorted(item)} and no 'input_ids'."
                )
            ids = _tokens.as_id_list(item["input_ids"], f"{origin} input_ids", where)
            keep = item.get("attention_mask")
            labels = item.get("labels")
            labels = ids if labels is None else _tokens.as_id_list(labels, f"{origin} labels", where, labels=True)
            if keep is not None:
                mask = _tokens.as_id_list(keep, f"{origin} attention_mask", where)
                ids = [t for t, m in zip(ids, mask, strict=True) if m]
                labels = [t for t, m in zip(labels, mask, strict=True) if m]
            return ids, labels
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
            item = item[0]
        if num_tokens is not None and isinstance(item, (list, Tensor)):
            item = item.reshape(-1)[:num_tokens] if isinstance(item, Tensor) else item[:num_tokens]
        ids = _tokens.as_id_list(item, origin, where)
        return ids, ids

    def _windows(self, sequence: tuple[list[int], list[int]]) -> list[tuple[list[int], list[int]]]:
        ids, labels = sequence
        windows = []
        for start in range(0, len(ids), self.max_length):
            window = ids[start : start + self.max_length]
            if len(window) >= 2:
                windows.append((window, labels[start : start + self.max_length]))
        return windows

    def _collate(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        if isinstance(batch, list) and batch and isinstance(batch[0], tuple) and isinstance(batch[0][0], list):
            input_ids, attention_mask = _tokens.pad_right([ids for ids, _ in batch], self._pad_id)
            labels, _ = _tokens.pad_right([lab for _, lab in batch], _tokens.IGNORE_INDEX)
            return input_ids, attention_mask, labels
        # a batch from the user's dataloader
        if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
            input_ids = batch["input_ids"]
            attention_mask = batch.get("attention_mask")
            labels = batch.get("labels")
        elif isinstance(batch, Tensor):
            input_ids, attention_mask, labels = batch, None, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            input_ids, attention_mask, labels = batch[0], None, None
        else:
            raise MisconfigurationException(
                f"Probe {self.name!r}: cannot read a batch of type {type(batch).__name__}; yield a tensor of token "
                "ids, a tuple whose first element is one, or a dict with 'input_ids'."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, _tokens.IGNORE_INDEX)
        return input_ids, attention_mask, labels


def next_token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed next-token negative log-likelihood (fp32) of ``labels[:, 1:]`` given ``logits[:, :-1]``, and the number
    of scored tokens (labels of -100 are ignored)."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(shifted.device)
    total = F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=_tokens.IGNORE_INDEX, reduction="sum"
    )
    return total, int((targets != _tokens.IGNORE_INDEX).sum().item())


def _exp(value: float) -> float:
    try:
        return float(torch.tensor(value, dtype=torch.float64).exp().item())
    except OverflowError:  # pragma: no cover - exp of a float64 tensor saturates to inf instead
        return float("inf")
