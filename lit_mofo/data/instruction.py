"""Prompt/response fine-tuning data for causal language models: JSONL files or Hugging Face datasets.

Each example is a prompt and a response. The prompt (optionally put into a template) is tokenized with the
tokenizer's special tokens (e.g. BOS), the response without them, and an EOS token is appended; the labels are the
token ids on the response and its EOS, and -100 on the prompt, so the loss is taken on response tokens only. The
batches are dicts of ``input_ids``, ``attention_mask`` and ``labels``, what a transformers causal LM (and
:class:`~lit_mofo.modules.causal_lm.CausalLMModule`) takes.

Two layouts:

- padding (default): one example per row, padded per batch to its longest example (dynamic padding);
- packing: all examples concatenated (each ending with EOS) and cut into rows of exactly ``max_length`` tokens,
  the labels moving with their tokens (prompt tokens stay masked). Rows waste no padding; an example may span two
  rows, and an example attends to the ones before it in its row (the usual "concatenate and chunk" packing).
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lit_mofo.data.loader import ResumableDataLoader

__all__ = [
    "IGNORE_INDEX",
    "InstructionCollator",
    "InstructionDataModule",
    "TokenizedExample",
    "pack_examples",
    "read_jsonl",
    "resolve_pad_id",
    "tokenize_example",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example (or one packed row), its labels (-100 where no loss is taken), and how many of the
    ids at the end are already padding (only the last packed row has any)."""

    input_ids: list[int]
    labels: list[int]
    padding: int = 0


def read_jsonl(path: str | Path, keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-empty line.

    Raises:
        MisconfigurationException: the file is missing, a line is not a JSON object, or an object lacks one of
            ``keys`` — naming the file and the 1-based line number.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MisconfigurationException(f"Data file {str(path)!r} does not exist (cwd: {Path.cwd()}).")
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MisconfigurationException(
                    f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}); each line must be one "
                    'JSON object such as {"prompt": "...", "response": "..."}.'
                ) from error
            if not isinstance(record, dict):
                raise MisconfigurationException(
                    f"{path}:{number}: expected a JSON object, got {type(record).__name__} {line.strip()[:60]!r}."
                )
            missing = [key for key in keys if key not in record]
            if missing:
                raise MisconfigurationException(
                    f"{path}:{number}: the object has no {', '.join(map(repr, missing))} (keys: {sorted(record)}); "
                    "set prompt_key / response_key to the keys your file uses."
                )
            records.append(record)
    return records


def resolve_pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id: the tokenizer's pad token, else its EOS token (padding is masked out of attention and loss,
    so its id does not matter; many causal-LM tokenizers, e.g. Llama's and GPT-2's, define no pad token)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise MisconfigurationException(
        f"The tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token; set one, e.g. "
        "`tokenizer.add_special_tokens({'pad_token': '<pad>'})` and resize the model's embeddings."
    )


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    *,
    max_length: int | None = None,
    add_eos: bool = True,
    train_on_prompt: bool = False,
) -> TokenizedExample:
    """Tokenize one prompt/response pair; labels are -100 on the prompt (unless ``train_on_prompt``).

    The prompt is tokenized with special tokens (BOS for Llama-style tokenizers), the response without, and the EOS
    token appended (``add_eos``). Prompt and response are tokenized separately, so the boundary between them is a
    token boundary; end the prompt (or the template) with the separator the response should follow. An example
    longer than ``max_length`` is cut at the end (the response is shortened first).
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise MisconfigurationException(
                f"add_eos=True but the tokenizer {type(tokenizer).__name__} has no EOS token; set one or pass "
                "add_eos=False."
            )
        response_ids.append(int(tokenizer.eos_token_id))
    input_ids = prompt_ids + response_ids
    labels = (list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + response_ids
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedExample(input_ids, labels)


def pack_examples(examples: Iterable[TokenizedExample], block_size: int, pad_id: int) -> list[TokenizedExample]:
    """Concatenate ``examples`` and cut the stream into rows of ``block_size`` tokens.

    Labels travel with their tokens; the last row is padded to ``block_size`` with ``pad_id`` (labels -100,
    recorded in :attr:`TokenizedExample.padding` so the collator masks it out of attention).
    """
    if block_size < 2:
        raise MisconfigurationException(f"block_size={block_size} must be >= 2 tokens to pack examples.")
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        ids += example.input_ids
        labels += example.labels
    rows = [
        TokenizedExample(ids[start : start + block_size], labels[start : start + block_size])
        for start in range(0, len(ids), block_size)
    ]
    if rows and len(rows[-1].input_ids) < block_size:
        missing = block_size - len(rows[-1].input_ids)
        rows[-1] = TokenizedExample(
            rows[-1].input_ids + [pad_id] * missing, rows[-1].labels + [IGNORE_INDEX] * missing, padding=missing
        )
    return rows


class _ExampleDataset(Dataset[TokenizedExample]):
    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]


class InstructionCollator:
    """Collate :class:`TokenizedExample` s into ``input_ids``/``attention_mask``/``labels`` tensors, right-padded to
    the longest row of the batch with ``pad_id`` (attention 0, labels -100). Picklable, for ``num_workers > 0``."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, Tensor]:
        lengths = [len(e.input_ids) - e.padding for e in examples]
        width = max(len(e.input_ids) for e in examples)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths, strict=True)):
            size = len(example.input_ids)
            input_ids[row, :size] = torch.as_tensor(example.input_ids, dtype=torch.long)
            labels[row, :size] = torch.as_tensor(example.labels, dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class InstructionDataModule(pl.LightningDataModule):
    """Prompt/response fine-tuning data from JSONL files or a Hugging Face dataset, tokenized for a causal LM.

    Records come from ``train_file`` (JSONL: one object per line with the prompt under ``prompt_key`` and the
    response under ``response_key``) or from ``dataset`` (a Hugging Face ``datasets`` name or local path, loaded with
    ``datasets.load_dataset``; needs ``pip install datasets`` and, for a hub name, network or the datasets cache).
    The validation set is ``val_file`` (or ``val_split`` of the dataset) if given, else a seeded random
    ``val_fraction`` of the training records, else none (no validation loop).

    **Tokenizer.** ``tokenizer`` (a name or local path for ``AutoTokenizer``); when None, :meth:`setup` takes the
    LightningModule's ``tokenizer`` attribute (``trainer.lightning_module.tokenizer``, which
    :class:`~lit_mofo.modules.causal_lm.CausalLMModule` loads with the model), so one ``model:`` entry in a config
    sets both. A tokenizer without a pad token pads with its EOS token (padding is masked out of attention and loss).

    **Template.** ``template`` formats the prompt before tokenization: a ``str.format`` string whose fields are
    record keys, ``{prompt}`` standing for the ``prompt_key`` value, e.g.
    ``"### Instruction:\\n{prompt}\\n\\n### Response:\\n"`` or ``"{instruction}\\n{input}\\n"``.

    **Batches** (see the module docstring): padding to the longest example of each batch, or ``packing`` into rows
    of ``max_length`` tokens. Labels are -100 on prompt tokens and padding in both.

    **Resume.** The loaders are :class:`~lit_mofo.data.loader.ResumableDataLoader` s: every checkpoint holds the
    position in the epoch and the shuffling generator, so ``fit(ckpt_path=...)`` from any checkpoint, mid-epoch
    included, sees exactly the batches the uninterrupted fit would have seen.

    Args:
        train_file: JSONL file of training records.
        val_file: JSONL file of validation records.
        dataset: Hugging Face dataset name or path (instead of ``train_file``).
        dataset_config: the dataset's configuration name.
        train_split: split of ``dataset`` for training.
        val_split: split of ``dataset`` for validation (None: use ``val_fraction``).
        tokenizer: tokenizer name or path; None takes the LightningModule's.
        prompt_key: record key of the prompt.
        response_key: record key of the response.
        template: prompt template (see above); None uses the prompt as it is.
        max_length: longest example in tokens (longer ones are cut at the end); with packing, the row length.
        packing: pack examples into rows of ``max_length`` tokens instead of padding.
        val_fraction: share of the training records held out for validation when there is no validation source,
            in [0, 1).
        batch_size: rows per batch and process.
        eval_batch_size: rows per validation batch (default ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seeds the validation split and the packing order. The training order is shuffled every epoch by a
            generator drawn from torch's global RNG when the training loader is built, which ``seed_everything``
            (LightningCLI's ``seed_everything``) seeds; checkpoints carry the generator.
        train_on_prompt: take the loss on prompt tokens too.
        add_eos: append the EOS token to every response.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        tokenizer: str | None = None,
        prompt_key: str = "prompt",
        response_key: str = "response",
        template: str | None = None,
        max_length: int = 1024,
        packing: bool = False,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        train_on_prompt: bool = False,
        add_eos: bool = True,
    ) -> None:
        super().__init__()
        if (train_file is None) == (dataset is None) and type(self).load_records is InstructionDataModule.load_records:
            raise MisconfigurationException(
                f"InstructionDataModule needs exactly one data source: train_file={train_file!r}, "
                f"dataset={dataset!r}. Give a JSONL file (train_file) or a Hugging Face dataset name (dataset)."
            )
        if val_file is not None and dataset is not None:
            raise MisconfigurationException("val_file goes with train_file; with `dataset` use val_split.")
        if not 0.0 <= val_fraction < 1.0:
            raise MisconfigurationException(
                f"val_fraction={val_fraction!r} is outside [0, 1); e.g. 0.05 holds out 5% of the training records."
            )
        if max_length < 2:
            raise MisconfigurationException(f"max_length={max_length} must be >= 2 tokens.")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if value < 1:
                raise MisconfigurationException(f"{name}={value} must be >= 1.")
        if num_workers < 0:
            raise MisconfigurationException(f"num_workers={num_workers} must be >= 0.")
        if template is not None:
            self._check_template(template)
        self.save_hyperparameters()
        self.train_file, self.val_file = train_file, val_file
        self.dataset, self.dataset_config = dataset, dataset_config
        self.train_split, self.val_split = train_split, val_split
        self.tokenizer_name = tokenizer
        self.prompt_key, self.response_key = prompt_key, response_key
        self.template = template
        self.max_length = max_length
        self.packing = packing
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_on_prompt = train_on_prompt
        self.add_eos = add_eos
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_examples: list[TokenizedExample] = []
        self.val_examples: list[TokenizedExample] = []
        self._pad_id = 0

    @staticmethod
    def _check_template(template: str) -> None:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as error:
            raise MisconfigurationException(f"template={template!r} is not a valid format string: {error}") from error
        if not fields:
            raise MisconfigurationException(
                f"template={template!r} has no field; put the prompt in with '{{prompt}}' (or other record keys)."
            )

    # ---- records -------------------------------------------------------------------------------------------------

    def load_records(self) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]] | None]:
        """The training records and the validation records (None when there is no validation source).

        Each record is a mapping with the prompt and response keys. Subclasses override this to generate data.
        """
        if self.dataset is not None:
            return self._dataset_records(self.train_split), (
                self._dataset_records(self.val_split) if self.val_split is not None else None
            )
        assert self.train_file is not None
        keys = (self.prompt_key, self.response_key)
        train = read_jsonl(self.train_file, keys)
        val = read_jsonl(self.val_file, keys) if self.val_file is not None else None
        return train, val

    def _dataset_records(self, split: str) -> list[Mapping[str, Any]]:
        try:
            import datasets
        except ImportError as error:
            raise MisconfigurationException(
                f"dataset={self.dataset!r} needs the Hugging Face `datasets` package: `pip install datasets` "
                "(or convert the data to JSONL and pass train_file)."
            ) from error
        try:
            loaded = datasets.load_dataset(self.dataset, self.dataset_config, split=split)
        except Exception as error:  # the library raises many types (network, missing split, bad name)
            raise MisconfigurationException(
                f"Could not load dataset={self.dataset!r} (config {self.dataset_config!r}, split {split!r}): "
                f"{error}. Offline, a hub dataset must be in the datasets cache; a local path works too."
            ) from error
        missing = [key for key in (self.prompt_key, self.response_key) if key not in loaded.column_names]
        if missing:
            raise MisconfigurationException(
                f"dataset={self.dataset!r} split {split!r} has no column {missing} (columns: {loaded.column_names}); "
                "set prompt_key / response_key."
            )
        return list(loaded)

    def _prompt(self, record: Mapping[str, Any]) -> str:
        if self.template is None:
            return str(record[self.prompt_key])
        try:
            return self.template.format(**{**record, "prompt": record[self.prompt_key]})
        except (KeyError, IndexError) as error:
            raise MisconfigurationException(
                f"template={self.template!r} uses the field {error}, which the record {dict(record)!r:.120} lacks; "
                "use record keys or {prompt}."
            ) from error

    # ---- tokenizer -----------------------------------------------------------------------------------------------

    def resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        """``tokenizer`` loaded with ``AutoTokenizer``, else the attached LightningModule's ``tokenizer``."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_name is not None:
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(self.tokenizer_name)
            except OSError as error:
                raise MisconfigurationException(
                    f"tokenizer={self.tokenizer_name!r} is neither a local directory with tokenizer files nor a "
                    f"Hugging Face name reachable offline or online: {error}"
                ) from error
        module = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise MisconfigurationException(
                f"{type(self).__name__} has no tokenizer: set `tokenizer` (a name or path), or give the "
                "LightningModule a `tokenizer` attribute (CausalLMModule loads the model's)."
            )
        return tokenizer

    # ---- Lightning hooks -----------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.dataset is not None:  # download once, on the local rank zero; setup() reads the cache
            self._dataset_records(self.train_split)

    def setup(self, stage: str) -> None:
        if self.train_examples:
            return
        self.tokenizer = self.resolve_tokenizer()
        self._pad_id = resolve_pad_id(self.tokenizer)
        if self.tokenizer.pad_token_id is None:
            rank_zero_info(f"{type(self).__name__}: the tokenizer has no pad token; padding with EOS instead.")
        train_records, val_records = self.load_records()
        if val_records is None and self.val_fraction > 0:
            order = list(range(len(train_records)))
            random.Random(self.seed).shuffle(order)
            held_out = max(1, round(self.val_fraction * len(train_records)))
            if held_out >= len(train_records):
                raise MisconfigurationException(
                    f"val_fraction={self.val_fraction} of {len(train_records)} records leaves no training data."
                )
            val_records = [train_records[i] for i in sorted(order[:held_out])]
            train_records = [train_records[i] for i in sorted(order[held_out:])]
        if not train_records:
            raise MisconfigurationException(f"{type(self).__name__}: there is no training record.")
        self.train_examples = self._examples(train_records, "training")
        self.val_examples = self._examples(val_records, "validation") if val_records else []

    def _examples(self, records: Sequence[Mapping[str, Any]], split: str) -> list[TokenizedExample]:
        assert self.tokenizer is not None
        limit = None if self.packing else self.max_length
        examples = [
            tokenize_example(
                self.tokenizer,
                self._prompt(record),
                str(record[self.response_key]),
                max_length=limit,
                add_eos=self.add_eos,
                train_on_prompt=self.train_on_prompt,
            )
            for record in records
        ]
        kept = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
        if len(kept) < len(examples):
            rank_zero_warn(
                f"{type(self).__name__}: {len(examples) - len(kept)} of {len(examples)} {split} examples have no "
                f"response token within max_length={self.max_length} and are dropped; raise max_length."
            )
        if self.packing:
            order = list(range(len(kept)))
            random.Random(self.seed).shuffle(order)
            return pack_examples([kept[i] for i in order], self.max_length, self._pad_id)
        return kept

    def _loader(self, examples: Sequence[TokenizedExample], batch_size: int, shuffle: bool) -> ResumableDataLoader:
        return ResumableDataLoader(
            _ExampleDataset(examples),
            batch_size=batch_size,
            shuffle=shuffle,  # seeded from torch's global RNG, so `seed_everything` (the Trainer's seed) sets the order
            collate_fn=InstructionCollator(self._pad_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.train_examples, self.batch_size, shuffle=True)

    def val_dataloader(self) -> ResumableDataLoader | list[ResumableDataLoader]:
        if not self.val_examples:
            return []  # no validation source: Lightning skips the validation loop
        return self._loader(self.val_examples, self.eval_batch_size, shuffle=False)
