"""Token ids and tokenizers of the probes: checking token ids (>= 0; within the model's vocabulary), resolving and
calling the tokenizer, and padding sequences into batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lit_mofo.probes._checks import error

IGNORE_INDEX = -100


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
    """A tokenizer object: ``tokenizer`` itself, loaded by its own class from a local path if a path
    (:func:`lit_mofo._hub.load_tokenizer`, as the model's tokenizer is), or the LightningModule's ``tokenizer``
    attribute when None. ``None`` if there is none."""
    if isinstance(tokenizer, (str, Path)):
        from lit_mofo._hub import load_tokenizer

        try:
            return load_tokenizer(str(tokenizer))
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


def tokenize_prefix(tokenizer: Any, text: str, add_special_tokens: bool, num_tokens: int | None) -> list[int]:
    """The token ids of ``text`` as far as the first ``num_tokens`` (all of them when None): exactly what tokenizing
    the whole text gives there, tokenizing only a prefix when the text is long.

    The prefix grows (doubling) until two successive prefixes agree on their first ``num_tokens`` ids and both
    have more: appending text then changes only the last tokens of a prefix (a word cut in two, an end-of-text
    token), never the first ones, so the full text agrees too. Returns at least ``num_tokens`` ids (or the whole
    tokenization when the text is shorter). A 20 MB line with ``limit_batches=2`` tokenizes a few kB instead.
    """
    if num_tokens is None:
        return tokenize(tokenizer, text, add_special_tokens)
    length = max(1024, 8 * num_tokens)  # characters; most tokenizers give fewer tokens than characters
    previous: list[int] | None = None
    while length < len(text):
        ids = tokenize(tokenizer, text[:length], add_special_tokens)
        if previous is not None and len(previous) > num_tokens and ids[:num_tokens] == previous[:num_tokens]:
            return previous
        previous = ids
        length *= 2
    return tokenize(tokenizer, text, add_special_tokens)
