"""Reference data for the built-in probes: reading files, tokenizing, padding, limiting and splitting across ranks."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from lit_mofo.probes.base import find_language_model

IGNORE_INDEX = -100


def check_name(name: str) -> str:
    """A probe or metric name usable in ``probe/<name>/<metric>``: non-empty, no ``/``, no whitespace."""
    if not isinstance(name, str) or not name or "/" in name or any(c.isspace() for c in name):
        raise MisconfigurationException(
            f"Invalid probe name {name!r}: use a non-empty name without '/' or whitespace (it becomes part of "
            "the logged metric names `probe/<name>/<metric>`), e.g. 'general_text'."
        )
    return name


def check_limit(limit: int | float | None, what: str = "limit_batches") -> int | float | None:
    """Validate a Lightning-style limit: None (all), an int >= 1 (a count) or a float in (0, 1] (a fraction)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise MisconfigurationException(f"`{what}={limit!r}` must be None, an int >= 1 or a float in (0, 1].")
    if (isinstance(limit, int) and limit < 1) or (isinstance(limit, float) and not 0.0 < limit <= 1.0):
        raise MisconfigurationException(
            f"`{what}={limit!r}` is out of range: an int counts batches (>= 1), a float is a fraction in (0, 1]; "
            "use None to evaluate every batch."
        )
    return limit


def apply_limit(total: int, limit: int | float | None) -> int:
    """How many of ``total`` batches a limit keeps (a fraction keeps at least one)."""
    if limit is None:
        return total
    if isinstance(limit, float):
        return min(total, max(1, math.floor(total * limit)))
    return min(total, limit)


def rank_batches(batches: Sequence[Any], trainer: pl.Trainer | None) -> list[Any]:
    """This process's share of the (global) batches: batch ``i`` goes to rank ``i % world_size``."""
    if trainer is None or trainer.world_size <= 1:
        return list(batches)
    return list(batches[trainer.global_rank :: trainer.world_size])


def iterate_rank_batches(loader: Iterable[Any], trainer: pl.Trainer | None, limit: int | float | None) -> Iterator[Any]:
    """Batches of a user's dataloader for this rank: the first ``limit`` batches, batch ``i`` on rank ``i % world``.

    A float limit needs ``len(loader)``."""
    world = 1 if trainer is None else trainer.world_size
    rank = 0 if trainer is None else trainer.global_rank
    if isinstance(limit, float):
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError as error:
            raise MisconfigurationException(
                f"`limit_batches={limit}` is a fraction, but the reference dataloader has no length; give an int."
            ) from error
        limit = apply_limit(total, limit)
    for index, batch in enumerate(loader):
        if limit is not None and index >= limit:
            return
        if index % world == rank:
            yield batch


def read_records(paths: str | Path | Sequence[str | Path], text_key: str = "text") -> list[dict[str, Any]]:
    """Records of ``.txt`` files (one ``{text_key: line}`` per non-empty line), ``.jsonl`` files (one JSON object
    per non-empty line) and ``.json`` files (a list of objects)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records: list[dict[str, Any]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise MisconfigurationException(f"Reference file {str(path)!r} does not exist (cwd: {Path.cwd()}).")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            records += [{text_key: line} for line in lines if line.strip()]
        elif suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise MisconfigurationException(f"{path}:{number} is not valid JSON: {error}") from error
                if not isinstance(record, dict):
                    raise MisconfigurationException(f"{path}:{number} must hold a JSON object, got {record!r:.60}.")
                records.append(record)
        elif suffix == ".json":
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(loaded, list) or not all(isinstance(r, dict) for r in loaded):
                raise MisconfigurationException(f"{path} must hold a JSON list of objects.")
            records += loaded
        else:
            raise MisconfigurationException(
                f"Unsupported reference file {str(path)!r}: use .txt (one text per line), .jsonl or .json."
            )
    return records


def resolve_tokenizer(tokenizer: Any, pl_module: nn.Module | None) -> Any:
    """A tokenizer object: ``tokenizer`` itself, loaded with ``AutoTokenizer`` from a local path if a string, or the
    LightningModule's ``tokenizer`` attribute when None. ``None`` if there is none."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    if tokenizer is not None:
        return tokenizer
    return getattr(pl_module, "tokenizer", None) if pl_module is not None else None


def require_tokenizer(tokenizer: Any, probe: str) -> Any:
    if tokenizer is None:
        raise MisconfigurationException(
            f"Probe {probe!r} has text to tokenize but no tokenizer: pass `tokenizer=` (an object or a local path "
            "for AutoTokenizer), give the LightningModule a `tokenizer` attribute, or provide token ids instead."
        )
    return tokenizer


def pad_id(tokenizer: Any) -> int:
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    return 0


def as_id_list(value: Any, what: str) -> list[int]:
    if isinstance(value, Tensor):
        value = value.reshape(-1).tolist()
    if not isinstance(value, Sequence) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise MisconfigurationException(f"{what} must be a list of token ids (ints), got {value!r:.80}.")
    return list(value)


def pad_right(sequences: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` with the sequences left-aligned and padded with ``pad`` on the right."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


def forward_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Logits ``[batch, seq, vocab]`` (or ``[batch, classes]``) of a transformers model or any module that takes
    ``input_ids``/``attention_mask`` keywords and returns logits, an output with ``.logits`` or a dict."""
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if _is_transformers_model(model):
        kwargs["use_cache"] = False
    return _logits(model(**kwargs))


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise MisconfigurationException(
            f"The model returned {type(output).__name__}; a probe needs logits: a tensor, an output with `.logits` "
            "or a dict with 'logits'."
        )
    return logits


def model_for(pl_module: nn.Module) -> nn.Module:
    return find_language_model(pl_module)


class ListDataset(Dataset[Any]):
    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def check_loader(value: Any, what: str) -> None:
    if not isinstance(value, (DataLoader, Iterable)) or isinstance(value, (str, bytes, Mapping)):
        raise MisconfigurationException(f"`{what}` must be a DataLoader or an iterable of batches, got {value!r:.80}.")


class SumPair(Metric):
    """Two running sums (e.g. summed loss and token count, or correct answers and questions), summed across
    processes on ``compute()``, which returns both. Non-finite values propagate (a NaN loss stays NaN).

    Written out because ``torchmetrics.aggregation.MeanMetric(nan_strategy="disable")`` (1.9) drops the weights,
    and the default strategies drop NaNs, which would hide a diverged model."""

    full_state_update = False
    numerator: Tensor
    denominator: Tensor

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64  # MPS has no fp64
        self.add_state("numerator", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("denominator", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        if device is not None:
            self.to(device)

    def update(self, numerator: Tensor | float, denominator: Tensor | float) -> None:
        self.numerator += torch.as_tensor(numerator, device=self.numerator.device).to(self.numerator.dtype).sum()
        self.denominator += (
            torch.as_tensor(denominator, device=self.denominator.device).to(self.denominator.dtype).sum()
        )

    def restart(self, device: torch.device) -> None:
        """Zero the sums on ``device`` for a new evaluation (a rank with no batch still takes part in the sync)."""
        self.reset()
        self.to(device)
        self.update(0.0, 0.0)

    def compute(self) -> tuple[float, float]:
        return float(self.numerator.item()), float(self.denominator.item())
