"""Language-model loss and perplexity on a reference set: the "general text" a fine-tuned model should not forget."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import Dataset

from lit_mofo.probes import _data
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
    its own; windows of a single token predict nothing and are dropped.

    The model called is :func:`~lit_mofo.probes.base.find_language_model` of the LightningModule (its ``model``
    attribute, else itself) with ``input_ids``/``attention_mask`` (and ``use_cache=False`` for transformers models);
    it must return next-token logits (a tensor, ``.logits`` or ``["logits"]``).

    Cost: one forward pass (no backward) per batch: about a third of a training step on the same number of tokens.
    ``limit_batches`` bounds it. Under DDP the batches are dealt round-robin to the processes (batch ``i`` to rank
    ``i % world_size``), so the set is evaluated once in total, and the metric sums across ranks; the set and the
    limit are the same whatever the number of processes, so values are comparable between runs.

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
        name: the probe's name in metric keys (``probe/<name>/loss``); a monitor's dict key overrides it.

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
        name: str = "lm",
    ) -> None:
        given = {
            k: v
            for k, v in {
                "files": files,
                "texts": texts,
                "token_ids": token_ids,
                "dataset": dataset,
                "dataloader": dataloader,
            }.items()
            if v is not None
        }
        if len(given) != 1:
            raise MisconfigurationException(
                f"LanguageModelProbe needs exactly one of `files`, `texts`, `token_ids`, `dataset` or `dataloader`, "
                f"got {sorted(given) or 'none'}."
            )
        if isinstance(texts, str):
            raise MisconfigurationException("`texts` must be a list of strings; for a file use `files=`.")
        if dataloader is not None:
            _data.check_loader(dataloader, "dataloader")
        if max_length < 2:
            raise MisconfigurationException(f"`max_length={max_length}` must be >= 2 (one token predicts the next).")
        if batch_size < 1:
            raise MisconfigurationException(f"`batch_size={batch_size}` must be >= 1.")
        self.files = files
        self.texts = texts
        self.token_ids = token_ids
        self.dataset = dataset
        self.dataloader = dataloader
        self.tokenizer = tokenizer
        self.text_key = text_key
        self.max_length = max_length
        self.batch_size = batch_size
        self.limit_batches = _data.check_limit(limit_batches)
        self.name = _data.check_name(name)
        self._batches: list[Any] | None = None
        self._pad_id = 0
        self._loss: _data.SumPair | None = None

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"loss": False, "perplexity": False}

    @property
    def num_batches(self) -> int | None:
        """Batches evaluated per evaluation across all processes (after ``limit_batches``); None for a dataloader."""
        return None if self._batches is None else len(self._batches)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dataloader is None:
            sequences = self._sequences(pl_module)
            windows = [w for s in sequences for w in self._windows(s)]
            if not windows:
                raise MisconfigurationException(
                    f"Probe {self.name!r}: the reference set is empty (no sequence of at least 2 tokens). "
                    "Check the files/texts given, `text_key` and the tokenizer."
                )
            if not any(label != _data.IGNORE_INDEX for _, labels in windows for label in labels[1:]):
                raise MisconfigurationException(
                    f"Probe {self.name!r}: no token of the reference set is scored (every label after the first "
                    "token of each window is -100)."
                )
            batches = [windows[i : i + self.batch_size] for i in range(0, len(windows), self.batch_size)]
            self._batches = batches[: _data.apply_limit(len(batches), self.limit_batches)]
        self._loss = _data.SumPair(pl_module.device)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._loss is None:
            self.setup(trainer, pl_module)
        assert self._loss is not None
        model = find_language_model(pl_module)
        device = pl_module.device
        self._loss.restart(device)
        if self._batches is not None:
            batches: Iterable[Any] = _data.rank_batches(self._batches, trainer)
        else:
            assert self.dataloader is not None
            batches = _data.iterate_rank_batches(self.dataloader, trainer, self.limit_batches)
        for batch in batches:
            input_ids, attention_mask, labels = self._collate(batch)
            input_ids, attention_mask, labels = move_batch((input_ids, attention_mask, labels), device)
            logits = _data.forward_logits(model, input_ids, attention_mask)
            total, count = next_token_nll(logits, labels)
            if count > 0:
                self._loss.update(total, count)
        total, count = self._loss.compute()  # summed across processes
        if count == 0:
            raise MisconfigurationException(
                f"Probe {self.name!r}: no reference token was scored on any process (empty dataloader, every label "
                "-100, or sequences of one token)."
            )
        loss = total / count
        return {"loss": loss, "perplexity": _exp(loss)}

    # ------------------------------------------------------------------ data
    def _sequences(self, pl_module: pl.LightningModule) -> list[Any]:
        if self.token_ids is not None:
            return [_data.as_id_list(ids, f"token_ids[{i}]") for i, ids in enumerate(self.token_ids)]
        if self.texts is not None:
            items: Sequence[Any] = list(self.texts)
        elif self.files is not None:
            items = []
            for record in _data.read_records(self.files, self.text_key):
                if "input_ids" in record:
                    items.append(_data.as_id_list(record["input_ids"], "`input_ids` of a reference record"))
                elif self.text_key in record:
                    items.append(str(record[self.text_key]))
                else:
                    raise MisconfigurationException(
                        f"Probe {self.name!r}: record {record!r:.80} has neither {self.text_key!r} (`text_key`) nor "
                        "'input_ids'."
                    )
        else:
            assert self.dataset is not None
            items = [self.dataset[i] for i in range(len(self.dataset))]  # type: ignore[arg-type]
        needs_tokenizer = any(isinstance(item, str) for item in items)
        tokenizer = _data.resolve_tokenizer(self.tokenizer, pl_module)
        if needs_tokenizer:
            tokenizer = _data.require_tokenizer(tokenizer, self.name)
        if tokenizer is not None:
            self._pad_id = _data.pad_id(tokenizer)
        return [self._item(item, tokenizer) for item in items]

    def _item(self, item: Any, tokenizer: Any) -> Any:
        if isinstance(item, str):
            return list(tokenizer(item, add_special_tokens=True)["input_ids"])
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise MisconfigurationException(
                    f"Probe {self.name!r}: dataset item with keys {sorted(item)} has no 'input_ids'."
                )
            ids = _data.as_id_list(item["input_ids"], "input_ids")
            keep = item.get("attention_mask")
            labels = item.get("labels")
            labels = ids if labels is None else _data.as_id_list(labels, "labels")
            if keep is not None:
                mask = _data.as_id_list(keep, "attention_mask")
                ids = [t for t, m in zip(ids, mask, strict=True) if m]
                labels = [t for t, m in zip(labels, mask, strict=True) if m]
            return (ids, labels)
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
            return _data.as_id_list(item[0], "input_ids")
        return _data.as_id_list(item, "a reference item")

    def _windows(self, sequence: Any) -> list[tuple[list[int], list[int]]]:
        ids, labels = sequence if isinstance(sequence, tuple) else (sequence, sequence)
        windows = []
        for start in range(0, len(ids), self.max_length):
            window = ids[start : start + self.max_length]
            if len(window) >= 2:
                windows.append((window, labels[start : start + self.max_length]))
        return windows

    def _collate(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        if isinstance(batch, list) and batch and isinstance(batch[0], tuple) and isinstance(batch[0][0], list):
            input_ids, attention_mask = _data.pad_right([ids for ids, _ in batch], self._pad_id)
            labels, _ = _data.pad_right([lab for _, lab in batch], _data.IGNORE_INDEX)
            return input_ids, attention_mask, labels
        # a batch from the user's dataloader
        if isinstance(batch, Mapping):
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
            labels = input_ids.masked_fill(attention_mask == 0, _data.IGNORE_INDEX)
        return input_ids, attention_mask, labels


def next_token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed next-token negative log-likelihood (fp32) of ``labels[:, 1:]`` given ``logits[:, :-1]``, and the number
    of scored tokens (labels of -100 are ignored)."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(shifted.device)
    total = F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=_data.IGNORE_INDEX, reduction="sum"
    )
    return total, int((targets != _data.IGNORE_INDEX).sum().item())


def _exp(value: float) -> float:
    try:
        return float(torch.tensor(value, dtype=torch.float64).exp().item())
    except OverflowError:  # pragma: no cover - exp of a float64 tensor saturates to inf instead
        return float("inf")
