"""Reference data for the built-in probes: checking and reading files, tokenizing, padding, limiting, splitting the
batches across ranks, and calling the model.

Every check here fails with the message shape of :mod:`lit_mofo._validation` (the probe and argument, the bad value,
the valid range and the fix), raised as ``MisconfigurationException`` as Lightning's callbacks do. What can be
checked without the model is checked when the probe is built (files, records, token ids >= 0); what needs the model
or its tokenizer in ``setup`` (token ids within the model's vocabulary, the model's ``forward`` signature).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from lit_mofo._validation import argument_error, as_int
from lit_mofo.strategy import StrategyAdapter

IGNORE_INDEX = -100
SUFFIXES = (".txt", ".jsonl", ".json")
FILE_FORMATS = ".txt (one text per line), .jsonl (one JSON object per line) or .json (a list of objects), in UTF-8"

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


# ---------------------------------------------------------------------- scalar arguments
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


def apply_limit(total: int, limit: int | float | None) -> int:
    """How many of ``total`` batches a limit keeps (a fraction keeps at least one)."""
    if limit is None:
        return total
    if isinstance(limit, float):
        return min(total, max(1, math.floor(total * limit)))
    return min(total, limit)


# ---------------------------------------------------------------------- splitting across ranks
def world_and_rank(trainer: pl.Trainer | None) -> tuple[int, int]:
    """``(world_size, global_rank)`` of ``trainer``; ``(1, 0)`` without one."""
    return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)


def rank_batches(
    batches: Sequence[Any], trainer: pl.Trainer | None, limit: int | float | None = None
) -> list[tuple[Any, bool]]:
    """This process's share of the first ``limit`` (global) ``batches``, as ``(batch, counts)`` pairs.

    Batch ``i`` goes to rank ``i % world_size``; every rank gets ``ceil(len / world_size)`` pairs: a rank with one
    batch fewer ends with ``(batches[0], False)``, a padding batch whose forward it runs and whose result it
    discards, so that sharded models, where every forward is a collective, never wait on a missing one.
    """
    world, rank = world_and_rank(trainer)
    total = apply_limit(len(batches), limit)
    mine = [(batches[index], True) for index in range(rank, total, world)]
    padding = math.ceil(total / world) - len(mine)
    return mine + [(batches[0], False)] * padding if padding else mine


class _LoaderShare:
    """This rank's batches of a dataloader that every rank iterates (batch ``i`` to rank ``i % world``), step by
    step; once they run out, the loader's first batch as padding (None if the loader yielded nothing here)."""

    def __init__(self, loader: Iterable[Any], world: int, rank: int, limit: int | float | None) -> None:
        if isinstance(limit, float):
            try:
                total = len(loader)  # type: ignore[arg-type]
            except TypeError as err:
                raise MisconfigurationException(
                    f"`limit_batches={limit}` is a fraction, but the reference dataloader has no length; give an int."
                ) from err
            limit = apply_limit(total, limit)
        self._batches = self._mine(loader, world, rank, limit)
        self._first: Any = None
        self._seen_any = False

    def _mine(self, loader: Iterable[Any], world: int, rank: int, limit: int | None) -> Iterator[Any]:
        for index, batch in enumerate(loader):
            if limit is not None and index >= limit:
                return
            if index == 0:
                self._first, self._seen_any = batch, True
            if index % world == rank:
                yield batch

    def next(self) -> tuple[Any, bool] | None:
        """``(batch, True)``, then ``(first batch, False)`` forever; None if there is nothing to pad with."""
        batch = next(self._batches, _DONE)
        if batch is not _DONE:
            return batch, True
        return (self._first, False) if self._seen_any else None


_DONE = object()


def run_batches(
    batches: Iterable[Any],
    trainer: pl.Trainer | None,
    forward: Callable[[Any], Any],
    prepare: Callable[[Any], Any] | None = None,
    consume: Callable[[Any, Any], None] | None = None,
    limit: int | float | None = None,
    where: str = "The probe",
) -> int:
    """Evaluate this process's share of the reference ``batches``: the one way lit_mofo's probes split their data
    across processes. Returns the number of forwards this rank ran.

    For each of its batches a rank calls ``prepare(batch)`` (collating, checking: host-side work), then
    ``forward(inputs)`` (the model call) and ``consume(inputs, output)`` (updating the probe's sums). Batch ``i``
    goes to rank ``i % world_size``, and every rank runs as many forwards: a rank out of batches runs padding
    forwards on the first batch whose output it discards (not passed to ``consume``), since under FSDP2 each
    forward is a collective that all ranks must join. ``batches`` is a sequence (the same on every rank: the
    share is computed locally, see :func:`rank_batches`) or any other iterable, e.g. a ``DataLoader``, iterated by
    every rank, of which only the first ``limit`` batches count (an int, or a float fraction of ``len``); its
    length may even differ between ranks, since the ranks agree at every step whether any of them has a batch left.

    Failing together: an error in ``prepare`` on some rank is reported to every rank before the forward it would
    have run, one in ``forward`` or ``consume`` at the next step (or at the end), through
    :meth:`~lit_mofo.strategy.StrategyAdapter.agree`, and every rank raises. The limit: a forward that fails on one
    rank part-way, after its first FSDP2 all-gather, leaves the others waiting inside that forward, where no meeting
    can reach them; lit_mofo's probes check their inputs in ``prepare`` so that bad data fails before the forward.
    """
    adapter = StrategyAdapter.of(trainer, user=where)
    world, rank = world_and_rank(trainer)
    if isinstance(batches, Sequence):
        plan = iter(rank_batches(batches, trainer, limit))

        def next_step() -> tuple[Any, bool] | None:
            return next(plan, None)

    else:
        next_step = _LoaderShare(batches, world, rank, limit).next
    forwards = 0
    pending: BaseException | None = None  # a failure of the last forward or consume, reported at the next meeting
    while True:
        step: tuple[Any, bool] | None = None
        inputs: Any = None
        error: BaseException | None = None
        try:
            step = next_step()
            if step is not None:
                inputs = step[0] if prepare is None else prepare(step[0])
        except Exception as caught:  # re-raised by agree() on every rank
            error = caught
        counts, unable = step is not None and step[1], step is None
        more, someone_unable = adapter.agree(where, pending or error, flags=(counts, unable))
        pending = None
        if not more:
            break
        if someone_unable:
            raise MisconfigurationException(
                f"{where}: a process has no reference batch left to run while another one has: every process must "
                "iterate the same reference dataloader (a loader that yields nothing on one process cannot be "
                "padded). Give every rank the same batches; they are split across the processes by the probe."
            )
        assert step is not None
        try:
            output = forward(inputs)
            forwards += 1
            if step[1] and consume is not None:
                consume(inputs, output)
        except Exception as caught:  # reported at the next meeting, after the other ranks' forward
            pending = caught
    adapter.agree(where, pending)
    return forwards


# ---------------------------------------------------------------------- files and records
class Record(NamedTuple):
    """A reference record and where it came from, for messages: ``ref.jsonl:3``, ``ref.json[2]``, ``examples[1]``."""

    origin: str
    data: Any


def check_files(files: Any, where: str) -> list[Path]:
    """The ``files`` argument as paths of existing ``.txt``/``.jsonl``/``.json`` files (one path or a list)."""
    valid = f"an existing file or a list of them, each {FILE_FORMATS}"
    paths = [files] if isinstance(files, (str, Path)) else files
    if not isinstance(paths, Sequence) or isinstance(paths, (bytes, Mapping)) or not paths:
        raise error(where, "files", files, valid)
    checked = []
    for raw in paths:
        if not isinstance(raw, (str, Path)) or not str(raw):
            raise error(where, "files", files, valid, f"Entry {raw!r} is not a path.")
        path = Path(raw).expanduser()
        if path.is_dir():
            inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUFFIXES)[:3]
            hint = f" (it holds e.g. {inside})" if inside else ""
            raise error(
                where, "files", files, valid, f"{str(path)!r} is a directory{hint}: list the reference files in it."
            )
        if not path.is_file():
            raise error(where, "files", files, valid, f"{str(path)!r} does not exist (cwd: {Path.cwd()}).")
        if path.suffix.lower() not in SUFFIXES:
            raise error(where, "files", files, valid, f"{str(path)!r} has an unsupported suffix {path.suffix!r}.")
        checked.append(path)
    return checked


def _bad_file(where: str, path: Path, fix: str) -> MisconfigurationException:
    """The error for a reference file that is not one of :data:`FILE_FORMATS` as it should be, saying why."""
    return error(where, "files", str(path), FILE_FORMATS, fix)


def _read_text(path: Path, where: str) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise _bad_file(
            where,
            path,
            f"It is not UTF-8 text ({err.reason} at byte {err.start}); re-encode it as UTF-8, or give token ids.",
        ) from err
    except OSError as err:
        raise error(where, "files", str(path), "a readable file", f"Reading it failed: {err}.") from err
    if "\x00" in text:
        raise _bad_file(where, path, "It holds NUL bytes: it is a binary file, not text.")
    return text


def read_records(paths: Sequence[Path], where: str, text_key: str = "text") -> list[Record]:
    """Records of ``.txt`` files (one ``{text_key: line}`` per non-empty line), ``.jsonl`` files (one JSON object
    per non-empty line) and ``.json`` files (a list of objects), each with its origin (``file:line``)."""
    records: list[Record] = []
    for path in paths:
        text = _read_text(path, where)
        suffix = path.suffix.lower()
        if suffix == ".txt":
            lines = text.splitlines()
            records += [Record(f"{path}:{n}", {text_key: line}) for n, line in enumerate(lines, 1) if line.strip()]
        elif suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _bad_file(
                        where,
                        path,
                        f"{path}:{number} is not valid JSON: {err.msg} at "
                        f"column {err.colno}. Fix that line (one JSON object per line).",
                    ) from err
                if not isinstance(record, dict):
                    raise _bad_file(where, path, f"{path}:{number} holds {record!r:.60}, not a JSON object {{...}}.")
                records.append(Record(f"{path}:{number}", record))
        else:
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise _bad_file(
                    where, path, f"{path}:{err.lineno} is not valid JSON: {err.msg} at column {err.colno}."
                ) from err
            if not isinstance(loaded, list):
                raise _bad_file(
                    where, path, f"{path} holds a JSON {type(loaded).__name__}, not a list of objects [{{...}}, ...]."
                )
            for index, record in enumerate(loaded):
                if not isinstance(record, dict):
                    raise _bad_file(where, path, f"{path}[{index}] is {record!r:.60}, not a JSON object {{...}}.")
                records.append(Record(f"{path}[{index}]", record))
    return records


def in_memory_records(values: Any, argument: str, where: str, valid: str) -> list[Record]:
    """A list argument (``texts``, ``examples``, ``token_ids``) as records named ``argument[i]``."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise error(where, argument, values, valid)
    if not values:
        raise error(where, argument, values, valid, "The reference set is empty.")
    return [Record(f"{argument}[{index}]", value) for index, value in enumerate(values)]


def dataset_records(dataset: Dataset[Any], where: str) -> list[Record]:
    """Every item of a map-style dataset, named ``dataset[i]``."""
    return [Record(f"dataset[{index}]", dataset[index]) for index in range(len(dataset))]  # type: ignore[arg-type]


def check_dataset(dataset: Any, where: str) -> None:
    """A map-style dataset: ``len()`` and integer indexing, and not empty."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or isinstance(dataset, (str, Mapping)):
        raise error(
            where,
            "dataset",
            dataset,
            "a map-style dataset (with __len__ and __getitem__)",
            "For an iterable dataset, wrap it in a DataLoader and pass `dataloader=`.",
        )
    if len(dataset) == 0:
        raise error(where, "dataset", dataset, "a non-empty map-style dataset")


def check_loader(value: Any, what: str, where: str = "probe") -> None:
    """A reference dataloader: re-iterable (a DataLoader, a list of batches), since every evaluation iterates it."""
    valid = "a DataLoader or a list of batches (iterated again at every evaluation)"
    if not isinstance(value, (DataLoader, Iterable)) or isinstance(value, (str, bytes, Mapping)):
        raise error(where, what, value, valid)
    if iter(value) is value:
        raise error(
            where,
            what,
            value,
            valid,
            "An iterator or generator is exhausted after the first evaluation; give a list or a DataLoader.",
        )


# ---------------------------------------------------------------------- token ids
def as_id_list(value: Any, what: str, where: str = "probe", labels: bool = False) -> list[int]:
    """Token ids as a list of ints >= 0 (labels may also be -100, ignored); ``what`` names them in messages."""
    if isinstance(value, Tensor) or type(value).__name__ == "ndarray":  # torch or numpy
        value = value.reshape(-1).tolist()
    valid = "a list of token ids: ints >= 0" + (" or -100 (ignored)" if labels else "")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise error(where, what, value, valid)
    for token in value:
        if isinstance(token, bool) or not isinstance(token, Integral) or (token < 0 and not (labels and token == -100)):
            raise error(where, what, f"{value!r:.80}", valid, f"Entry {token!r} is not one.")
    return [int(token) for token in value]


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


def check_in_vocabulary(
    sequences: Iterable[tuple[str, Sequence[int]]], vocab: int | None, where: str, fix: str
) -> None:
    """Refuse, before any forward, a token id beyond the model's vocabulary (``origin`` names the record)."""
    if vocab is None:
        return
    for origin, ids in sequences:
        beyond = [token for token in ids if token >= vocab]
        if beyond:
            raise error(
                where,
                "token ids",
                f"{origin}: {max(beyond)}",
                f"[0, {vocab - 1}] (the model's vocabulary has {vocab} tokens)",
                fix,
            )


def check_batch_ids(ids: Tensor, vocab: int | None, where: str, what: str, labels: bool = False) -> None:
    """A batch of token ids (or labels: -100 allowed) from a user's dataloader within ``[0, vocab)``."""
    if ids.numel() == 0 or ids.is_floating_point():
        return
    valid_ids = ids[ids != IGNORE_INDEX] if labels else ids
    if valid_ids.numel() == 0:
        return
    low, high = int(valid_ids.min().item()), int(valid_ids.max().item())
    if low < 0 or (vocab is not None and high >= vocab):
        upper = f"{vocab - 1}" if vocab is not None else "the vocabulary size - 1"
        raise error(
            where,
            f"dataloader {what}",
            f"ids in [{low}, {high}]",
            f"[0, {upper}]" + (" or -100 (ignored)" if labels else ""),
            "Tokenize the reference data with the model's own tokenizer.",
        )


# ---------------------------------------------------------------------- tokenizers
def check_tokenizer(tokenizer: Any, where: str) -> Any:
    """The ``tokenizer`` argument: None, a tokenizer object (callable) or an existing local directory/file."""
    valid = "None (the LightningModule's `tokenizer`), a tokenizer object or a local directory for AutoTokenizer"
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer).expanduser()
        if not path.exists():
            raise error(
                where,
                "tokenizer",
                str(tokenizer),
                valid,
                f"{str(path)!r} does not exist (cwd: {Path.cwd()}); save "
                "one with `tokenizer.save_pretrained(directory)`.",
            )
        return tokenizer
    if not callable(tokenizer):
        raise error(where, "tokenizer", tokenizer, valid)
    return tokenizer


def resolve_tokenizer(tokenizer: Any, pl_module: nn.Module | None, where: str = "probe") -> Any:
    """A tokenizer object: ``tokenizer`` itself, loaded with ``AutoTokenizer`` from a local path if a path, or the
    LightningModule's ``tokenizer`` attribute when None. ``None`` if there is none."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as err:
            raise error(
                where,
                "tokenizer",
                str(tokenizer),
                "a directory saved with `tokenizer.save_pretrained`",
                f"AutoTokenizer could not load it: {err}",
            ) from err
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


def tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


TOKENIZER_MISMATCH = (
    "The tokenizer does not match the model: tokenize with the model's own tokenizer (`tokenizer=`), or check the "
    "token ids of the reference data."
)


def pad_id(tokenizer: Any) -> int:
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    return 0


def pad_right(sequences: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` with the sequences left-aligned and padded with ``pad`` on the right."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------- calling the model
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
    if _is_transformers_model(model):
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
    except IndexError as err:  # an embedding lookup beyond the vocabulary of a model that does not say its size
        ids = inputs.get("input_ids")
        if not isinstance(ids, Tensor) or ids.numel() == 0 or "index out of range" not in str(err):
            raise
        raise MisconfigurationException(
            f"{where}: the model's forward failed with `IndexError: {err}` on token ids in [{int(ids.min())}, "
            f"{int(ids.max())}]: an id is probably beyond its embedding. {TOKENIZER_MISMATCH}"
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


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


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
