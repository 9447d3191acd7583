"""Reference records of the probes: reading ``.txt``/``.jsonl``/``.json`` files, in-memory lists and map-style
datasets into records that name where they came from (``ref.jsonl:3``, ``examples[1]``), and checking the data
arguments (``files``, ``dataset``, ``dataloader``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


HEAD_BYTES = 1 << 20
"""How much of each reference file a probe reads when it is built, to check it: the first MiB (at least the first
record). The rest is read, and checked, in ``setup``, as far as ``limit_batches`` needs."""
MAX_LINE_BYTES = 64 << 20
"""The longest line of a ``.txt``/``.jsonl`` reference file (64 MiB): a longer one is refused rather than read into
memory whole (a file without line breaks, or a corpus that is not split into lines)."""


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
                where, "files", str(raw), valid, f"{str(path)!r} is a directory{hint}: list the reference files in it."
            )
        if not path.is_file():
            raise error(where, "files", str(raw), valid, f"{str(path)!r} does not exist (cwd: {Path.cwd()}).")
        if path.suffix.lower() not in SUFFIXES:
            raise error(where, "files", str(raw), valid, f"{str(path)!r} has an unsupported suffix {path.suffix!r}.")
        checked.append(path)
    return checked


def _bad_file(where: str, path: Path, fix: str) -> MisconfigurationException:
    """The error for a reference file that is not one of :data:`FILE_FORMATS` as it should be, saying why."""
    return error(where, "files", str(path), FILE_FORMATS, fix)


def _unreadable(where: str, path: Path, err: OSError) -> MisconfigurationException:
    return error(where, "files", str(path), "a readable file", f"Reading it failed: {err}.")


def _decoded(raw: bytes, path: Path, where: str, offset: int = 0) -> str:
    """``raw`` (bytes of ``path`` from byte ``offset``) as text, or the error saying why it is not UTF-8 text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _bad_file(
            where,
            path,
            f"It is not UTF-8 text ({err.reason} at byte {offset + err.start}); re-encode it as UTF-8, or give "
            "token ids.",
        ) from err
    if "\x00" in text:
        raise _bad_file(where, path, "It holds NUL bytes: it is a binary file, not text.")
    return text


def _bytes(count: int) -> str:
    return f"{count >> 20} MiB" if count >= 1 << 20 else f"{count} bytes"


def _lines(path: Path, where: str) -> Iterator[tuple[int, str, int]]:
    """``(line number, line, bytes read so far)`` of a text file, read line by line (numbered as
    ``str.splitlines`` numbers them), each line checked as it is read: UTF-8, no NUL byte, at most
    :data:`MAX_LINE_BYTES`."""
    number = offset = 0
    try:
        with path.open("rb") as handle:
            while raw := handle.readline(MAX_LINE_BYTES + 1):
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise _bad_file(
                        where,
                        path,
                        f"{path}:{number + 1} is longer than {_bytes(MAX_LINE_BYTES)}: split the text into lines "
                        "(each line is one reference text or record; long texts are cut into windows anyway).",
                    )
                text = _decoded(raw, path, where, offset)
                offset += len(raw)
                for line in text.splitlines():  # "\n"-terminated, so only the separators str.splitlines adds split it
                    number += 1
                    yield number, line, offset
    except OSError as err:
        raise _unreadable(where, path, err) from err


def _file_records(path: Path, where: str, text_key: str) -> Iterator[tuple[Record, int]]:
    """The records of one file with the bytes read so far: one ``{text_key: line}`` per non-empty line of a ``.txt``,
    one JSON object per non-empty line of a ``.jsonl`` (both streamed), the objects of a ``.json`` list (parsed
    whole)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise _unreadable(where, path, err) from err
        try:
            loaded = json.loads(_decoded(raw, path, where))
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
            yield Record(f"{path}[{index}]", record), len(raw)
        return
    for number, line, offset in _lines(path, where):
        if not line.strip():
            continue
        if suffix == ".txt":
            yield Record(f"{path}:{number}", {text_key: line}), offset
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise _bad_file(
                where,
                path,
                f"{path}:{number} is not valid JSON: {err.msg} at column {err.colno}. Fix that line (one JSON object "
                "per line).",
            ) from err
        if not isinstance(record, dict):
            raise _bad_file(where, path, f"{path}:{number} holds {record!r:.60}, not a JSON object {{...}}.")
        yield Record(f"{path}:{number}", record), offset


def file_of(origin: str) -> str:
    """The file a record of :class:`ReferenceFiles` came from: its origin without ``:line`` or ``[index]``."""
    return re.sub(r"(:\d+|\[\d+\])$", "", origin)


class ReferenceFiles:
    """The ``files`` of a probe, read as a stream of records: ``.txt`` (one ``{text_key: line}`` per non-empty
    line), ``.jsonl`` (one JSON object per non-empty line) and ``.json`` (a list of objects), each record named
    by its origin (``file:line``, ``file[index]``). ``.txt`` and ``.jsonl`` files are read line by line, ``.json``
    files parsed whole (use ``.jsonl`` for large sets).

    A probe reads :meth:`head` when it is built, so that a missing, binary, empty or malformed file fails there,
    and :meth:`records` in ``setup``, where it stops reading once it has what ``limit_batches`` needs.

    Args:
        files: a path or a list of paths (checked here: existing files with a supported suffix).
        where: the probe, for messages.
        text_key: the key a ``.txt`` line is stored under.
    """

    def __init__(self, files: Any, where: str, text_key: str = "text") -> None:
        self.paths = check_files(files, where)
        self.where, self.text_key = where, text_key

    def head(self) -> Iterator[Record]:
        """The records in the first :data:`HEAD_BYTES` of every file (at least each file's first record, however
        far); then an error if a file holds no record."""
        empty = []
        for path in self.paths:
            seen = False
            for record, offset in _file_records(path, self.where, self.text_key):
                seen = True
                yield record
                if offset >= HEAD_BYTES:
                    break
            if not seen:
                empty.append(path)
        if empty:
            kind = "line" if empty[0].suffix.lower() == ".txt" else "record"
            consequence = (
                "The reference set is empty."
                if len(empty) == len(self.paths)
                else "Remove it from `files`, or check that it is the file you meant."
            )
            raise _bad_file(self.where, empty[0], f"{str(empty[0])!r} holds no non-empty {kind}. {consequence}")

    def records(self) -> Iterator[Record]:
        """Every record of every file, in order, read as it is consumed."""
        for path in self.paths:
            for record, _ in _file_records(path, self.where, self.text_key):
                yield record


def in_memory_records(values: Any, argument: str, where: str, valid: str) -> list[Record]:
    """A list argument (``texts``, ``examples``, ``token_ids``) as records named ``argument[i]``."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise error(where, argument, values, valid)
    if not values:
        raise error(where, argument, values, valid, "The reference set is empty.")
    return [Record(f"{argument}[{index}]", value) for index, value in enumerate(values)]


def dataset_records(dataset: Dataset[Any]) -> Iterator[Record]:
    """The items of a map-style dataset in order, named ``dataset[i]``, each read as it is consumed."""
    for index in range(len(dataset)):  # type: ignore[arg-type]
        yield Record(f"dataset[{index}]", dataset[index])


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
