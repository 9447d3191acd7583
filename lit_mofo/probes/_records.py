"""Reference records of the probes: reading ``.txt``/``.jsonl``/``.json`` files, in-memory lists and map-style
datasets into records that name where they came from (``ref.jsonl:3``, ``examples[1]``), and checking the data
arguments (``files``, ``dataset``, ``dataloader``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset

from lit_mofo.probes._checks import error

SUFFIXES = (".txt", ".jsonl", ".json")
FILE_FORMATS = ".txt (one text per line), .jsonl (one JSON object per line) or .json (a list of objects), in UTF-8"


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
