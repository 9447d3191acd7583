"""Instruction and chat fine-tuning data for causal language models: JSONL files or Hugging Face datasets.

Two record formats, told apart by their keys (a file or dataset uses one of them):

- **prompt/response** (``{"prompt": "...", "response": "..."}``): the prompt (optionally put into a ``str.format``
  template) is tokenized with the tokenizer's special tokens (e.g. BOS), the response without them, and an EOS token
  is appended; the labels are the token ids on the response and its EOS, and -100 on the prompt.
- **chat** (``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``, the
  role/content format of OpenAI's and Hugging Face's chat APIs): the conversation is rendered with the tokenizer's
  chat template (``tokenizer.apply_chat_template``) and the labels are the token ids of the assistant turns — each
  reply and the end-of-turn markup the template puts after it, not the generation prompt before it — and -100
  everywhere else (system and user turns, the template's own markup). Each part is tokenized on its own, so every
  reply starts on a token boundary, as it does when the model generates after the rendered prompt.

In both, the loss is taken on what the model should learn to write, and the batches are dicts of ``input_ids``,
``attention_mask`` and ``labels``, what a transformers causal LM (and
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
    "CHAT_ROLES",
    "IGNORE_INDEX",
    "InstructionCollator",
    "InstructionDataModule",
    "SourcedRecord",
    "TokenizedExample",
    "check_conversation",
    "pack_examples",
    "read_jsonl",
    "resolve_pad_id",
    "tokenize_conversation",
    "tokenize_example",
]

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant")


class SourcedRecord(dict):  # type: ignore[type-arg]
    """A record (a plain ``dict``) that knows where it came from, e.g. ``"train.jsonl:12"``, for error messages."""

    def __init__(self, values: Mapping[str, Any], where: str) -> None:
        super().__init__(values)
        self.where = where


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example (or one packed row), its labels (-100 where no loss is taken), and how many of the
    ids at the end are already padding (only the last packed row has any)."""

    input_ids: list[int]
    labels: list[int]
    padding: int = 0


def read_jsonl(path: str | Path, keys: Sequence[str] = ()) -> list[SourcedRecord]:
    """The JSON objects of a JSONL file, one per non-empty line, each a :class:`SourcedRecord` that knows its
    ``file:line``.

    Raises:
        MisconfigurationException: the file is missing, a line is not a JSON object, or an object lacks one of
            ``keys`` — naming the file and the 1-based line number.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MisconfigurationException(f"Data file {str(path)!r} does not exist (cwd: {Path.cwd()}).")
    records: list[SourcedRecord] = []
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
            records.append(SourcedRecord(record, f"{path}:{number}"))
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


def check_conversation(messages: Any) -> None:
    """Check that ``messages`` is a conversation to train on, in the role/content format.

    A conversation is a list of ``{"role": ..., "content": "..."}`` turns: an optional ``system`` turn first, then
    ``user`` and ``assistant`` turns in alternation, starting with ``user`` and ending with a non-empty
    ``assistant`` reply (the text the model learns).

    Raises:
        ValueError: what is wrong, with the turn's 1-based number and the fix.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"'messages' is {messages!r:.80}; it must be a non-empty list of turns such as "
            '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].'
        )
    for number, turn in enumerate(messages, start=1):
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise ValueError(f"turn {number} is {turn!r:.80}; every turn is an object with 'role' and 'content'.")
        if turn["role"] not in CHAT_ROLES:
            raise ValueError(
                f"turn {number} has the role {turn['role']!r}, which chat templates do not know; use 'system' (first "
                "turn only), 'user' or 'assistant' (ShareGPT's 'human' and 'gpt' are 'user' and 'assistant')."
            )
        if not isinstance(turn["content"], str):
            raise ValueError(
                f"turn {number} ({turn['role']}) has content of type {type(turn['content']).__name__}; the content "
                "of a turn is a string."
            )
    start = 1 if messages[0]["role"] == "system" else 0
    for number, turn in enumerate(messages[start:], start=start + 1):
        expected = "user" if (number - start) % 2 == 1 else "assistant"
        if turn["role"] != expected:
            after = f"after a {messages[number - 2]['role']!r} turn" if number > 1 else "as the first turn"
            fix = (
                "only the first turn may be 'system': merge this text into it"
                if turn["role"] == "system"
                else f"merge consecutive {turn['role']!r} turns into one"
                if number > 1 and messages[number - 2]["role"] == turn["role"]
                else "a conversation starts with 'user' (after an optional 'system' turn)"
            )
            raise ValueError(
                f"the turns do not alternate: turn {number} is {turn['role']!r} {after}, where {expected!r} belongs. "
                f"A conversation is an optional 'system' turn, then 'user' and 'assistant' in turn; {fix}."
            )
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"the conversation ends with a {messages[-1]['role']!r} turn (turn {len(messages)}): it must end with the "
            "'assistant' reply the model learns; drop the last turn or add the reply."
        )
    for number, turn in enumerate(messages, start=1):
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise ValueError(
                f"turn {number} (assistant) is empty: there is nothing to learn from it. Write the reply, or drop "
                "it together with the 'user' turn before it."
            )


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    *,
    max_length: int | None = None,
    train_on_prompt: bool = False,
    chat_template: str | None = None,
) -> TokenizedExample:
    """Render a conversation with the tokenizer's chat template (or ``chat_template``) and tokenize it; labels are
    the ids of the assistant turns and -100 elsewhere (all ids with ``train_on_prompt``).

    An assistant turn is the text the template adds for it after the generation prompt (``add_generation_prompt``):
    the reply and the end-of-turn markup after it (e.g. ``<|im_end|>``), so the model learns to stop. Every part is
    tokenized without special tokens (the template writes them, BOS included), on its own, so a reply starts on a
    token boundary. An example longer than ``max_length`` is cut at the end.

    Raises:
        ValueError: the conversation fails :func:`check_conversation`; the template refuses it or drops a turn (a
            role it does not know); or the template renders earlier turns differently once later turns follow, so
            the assistant text cannot be located.
    """
    check_conversation(messages)
    turns = [{"role": turn["role"], "content": turn["content"]} for turn in messages]

    def render(count: int, generation_prompt: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(
                turns[:count], tokenize=False, add_generation_prompt=generation_prompt, chat_template=chat_template
            )
        except Exception as error:  # jinja2's TemplateError, the template's raise_exception(...), a missing template
            raise ValueError(f"the chat template refuses the conversation: {error}") from error
        return str(text)

    full = render(len(turns), False)
    cursor = 0
    for number, turn in enumerate(turns, start=1):
        content = turn["content"].strip()
        found = full.find(content, cursor)
        if found < 0:
            raise ValueError(
                f"the chat template leaves out turn {number} ({turn['role']}): it does not render that role (or "
                f"that turn) with its content. Use the roles the model's template knows (e.g. merge a 'system' turn "
                "into the first 'user' turn), or give a chat_template that renders it."
            )
        cursor = found + len(content)
    spans = []
    for index, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before, through = render(index, True), render(index + 1, False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"the chat template renders the turns before turn {index + 1} differently once a reply follows (e.g. "
                "it drops the reasoning of earlier replies), so the assistant text cannot be located. Split the "
                "conversation into one record per reply, or give a chat_template that renders a conversation as "
                "the concatenation of its turns."
            )
        spans.append((len(before), len(through)))
    input_ids: list[int] = []
    labels: list[int] = []
    position = 0
    for start, end in [*spans, (len(full), len(full))]:
        for text, learned in ((full[position:start], train_on_prompt), (full[start:end], True)):
            if text:
                ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
                input_ids += ids
                labels += ids if learned else [IGNORE_INDEX] * len(ids)
        position = end
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
    """Instruction or chat fine-tuning data from JSONL files or a Hugging Face dataset, tokenized for a causal LM.

    Records come from ``train_file`` (JSONL: one object per line) or from ``dataset`` (a Hugging Face ``datasets``
    name or local path, loaded with ``datasets.load_dataset``; needs ``pip install datasets`` and, for a Hub name,
    network or the datasets cache). The validation set is ``val_file`` (or ``val_split`` of the dataset) if given,
    else a seeded random ``val_fraction`` of the training records, else none (no validation loop).

    **Formats** (see the module docstring), told apart by the keys of the records; a source uses one of them:

    - prompt/response: the prompt under ``prompt_key``, the response under ``response_key``
      (``{"prompt": "What is 2+2?", "response": "4"}``); the loss is on the response and the EOS token;
    - chat: a list of role/content turns under ``messages_key``
      (``{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}``),
      rendered with the tokenizer's chat template (``chat_template`` overrides it); the loss is on the assistant
      turns. A conversation is an optional ``system`` turn, then ``user`` and ``assistant`` turns in alternation,
      ending with a non-empty ``assistant`` reply. A conversation that breaks these rules, a role the template does
      not render, and a tokenizer without a chat template are refused in :meth:`setup` with the record's
      ``file:line`` and the fix.

    **Tokenizer.** The LightningModule's ``tokenizer`` attribute (``trainer.lightning_module.tokenizer``, which
    :class:`~lit_mofo.modules.causal_lm.CausalLMModule` loads with the model, from its ``tokenizer`` argument or the
    model's directory): so the model, its probes and the data share one tokenizer, set once on the model.
    ``tokenizer`` (a name or local path) loads one here instead, for modules without a ``tokenizer`` attribute; when
    the module has one too, the two must agree (same vocabulary and special tokens), or :meth:`setup` refuses them,
    naming both. It is not one of this module's hyper-parameters (the model's is), so setting it on both never
    clashes in Lightning's hyper-parameter merge. A tokenizer without a pad token pads with its EOS token (padding is
    masked out of attention and loss).

    **Template.** ``template`` formats the prompt of prompt/response records before tokenization: a ``str.format``
    string whose fields are record keys, ``{prompt}`` standing for the ``prompt_key`` value, e.g.
    ``"### Instruction:\\n{prompt}\\n\\n### Response:\\n"`` or ``"{instruction}\\n{input}\\n"``. Chat records use the
    chat template instead (a ``template`` with chat records is refused).

    **Batches** (see the module docstring): padding to the longest example of each batch, or ``packing`` into rows
    of ``max_length`` tokens. Labels are -100 on prompt tokens (system, user and template markup for chats) and
    padding in both.

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
        tokenizer: tokenizer name or path; None (the default) takes the LightningModule's.
        prompt_key: record key of the prompt.
        response_key: record key of the response.
        messages_key: record key of a chat record's list of turns.
        template: prompt template of prompt/response records (see above); None uses the prompt as it is.
        chat_template: a Jinja chat template (the text, or the path of a file holding it) for chat records, instead
            of the tokenizer's own; None: the tokenizer's.
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
        train_on_prompt: take the loss on prompt tokens too (for chats: on every token).
        add_eos: append the EOS token to every response of prompt/response records (chat templates end each turn
            themselves).

    Example::

        # train.jsonl: {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
        module = CausalLMModule("Qwen/Qwen2.5-0.5B-Instruct")
        trainer.fit(module, InstructionDataModule(train_file="train.jsonl", val_fraction=0.05))
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
        messages_key: str = "messages",
        template: str | None = None,
        chat_template: str | None = None,
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
        # The tokenizer is the model's hyper-parameter: a second `tokenizer` here would clash with it in Lightning's
        # merge of the module's and the data's hyper-parameters ("Error while merging hparams").
        self.save_hyperparameters(ignore=["tokenizer"])
        self.train_file, self.val_file = train_file, val_file
        self.dataset, self.dataset_config = dataset, dataset_config
        self.train_split, self.val_split = train_split, val_split
        self.tokenizer_name = tokenizer
        self.prompt_key, self.response_key, self.messages_key = prompt_key, response_key, messages_key
        self.template = template
        self.chat_template = self._read_chat_template(chat_template)
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
        self._dataset_offline = False

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

    @staticmethod
    def _read_chat_template(chat_template: str | None) -> str | None:
        """The template text: ``chat_template`` itself when it is Jinja, else the file it names."""
        if chat_template is None or "{{" in chat_template or "{%" in chat_template:
            return chat_template
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise MisconfigurationException(
                f"chat_template={chat_template!r} is neither a Jinja template (it has no '{{{{' or '{{%') nor a file "
                f"(cwd: {Path.cwd()}); give the template's text or the path of a .jinja file."
            )
        return path.read_text(encoding="utf-8")

    # ---- records -------------------------------------------------------------------------------------------------

    def load_records(self) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]] | None]:
        """The training records and the validation records (None when there is no validation source).

        Each record is a mapping in one of the two formats (prompt/response keys, or ``messages_key``); a
        :class:`SourcedRecord` names its origin in error messages. Subclasses override this to generate data.
        """
        if self.dataset is not None:
            return self._dataset_records(self.train_split), (
                self._dataset_records(self.val_split) if self.val_split is not None else None
            )
        assert self.train_file is not None
        train = read_jsonl(self.train_file)
        val = read_jsonl(self.val_file) if self.val_file is not None else None
        return train, val

    def _dataset_records(self, split: str) -> list[Mapping[str, Any]]:
        try:
            import datasets
        except ImportError as error:
            raise MisconfigurationException(
                f"dataset={self.dataset!r} needs the Hugging Face `datasets` package: `pip install datasets` "
                "(or convert the data to JSONL and pass train_file)."
            ) from error
        assert self.dataset is not None
        local = Path(self.dataset).expanduser().exists()
        if not local:
            from lit_mofo._hub import is_hub_name, is_offline, require_dataset

            if not is_hub_name(self.dataset):
                raise MisconfigurationException(
                    f"InstructionDataModule(dataset=...): no such directory or file: {self.dataset!r} (cwd: "
                    f"{Path.cwd()}). Check the path, or give a Hugging Face dataset name such as "
                    "'meta-math/MetaMathQA'."
                )
            unreachable = require_dataset(self.dataset, argument="InstructionDataModule(dataset=...)")
            if unreachable and not is_offline("dataset") and not self._dataset_offline:
                self._dataset_offline = True
                rank_zero_warn(
                    f"InstructionDataModule: the Hugging Face Hub cannot be reached; dataset={self.dataset!r} loads "
                    "from the cache after the `datasets` library's retries. Set HF_HUB_OFFLINE=1 to skip them."
                )
        try:
            loaded = datasets.load_dataset(self.dataset, self.dataset_config, split=split)
        except Exception as error:  # the library raises many types (network, missing split, bad name)
            raise MisconfigurationException(
                f"Could not load dataset={self.dataset!r} (config {self.dataset_config!r}, split {split!r}): "
                f"{error}. Offline, a hub dataset must be in the datasets cache; a local path works too."
            ) from error
        formats = ((self.messages_key,), (self.prompt_key, self.response_key))
        if not any(all(key in loaded.column_names for key in keys) for keys in formats):
            raise MisconfigurationException(
                f"dataset={self.dataset!r} split {split!r} has neither a {self.messages_key!r} column (chat) nor "
                f"{self.prompt_key!r} and {self.response_key!r} columns (prompt/response): columns "
                f"{loaded.column_names}. Set messages_key, or prompt_key / response_key."
            )
        return [SourcedRecord(row, f"dataset {self.dataset!r} split {split!r} row {i}") for i, row in enumerate(loaded)]

    def _prompt(self, record: Mapping[str, Any]) -> str:
        if self.template is None:
            return str(record[self.prompt_key])
        try:
            return self.template.format(**{**record, "prompt": record[self.prompt_key]})
        except (KeyError, IndexError) as error:
            raise MisconfigurationException(
                f"{self._where(record)}template={self.template!r} uses the field {error}, which the record "
                f"{dict(record)!r:.120} lacks; use record keys or {{prompt}}."
            ) from error

    @staticmethod
    def _where(record: Mapping[str, Any], fallback: str | None = None) -> str:
        where = getattr(record, "where", fallback)
        return f"{where}: " if where else ""

    def _is_chat(self, record: Mapping[str, Any], fallback: str) -> bool:
        """Whether ``record`` is a chat record; a record in neither format is refused, naming where it is."""
        if self.messages_key in record:
            return True
        missing = [key for key in (self.prompt_key, self.response_key) if key not in record]
        if missing:
            raise MisconfigurationException(
                f"{self._where(record, fallback)}the record has neither {self.messages_key!r} (a chat: a list of "
                f"role/content turns) nor {' and '.join(map(repr, missing))} (prompt/response); its keys are "
                f"{sorted(record)}. Set messages_key, or prompt_key / response_key, to the keys your data uses."
            )
        return False

    # ---- tokenizer -----------------------------------------------------------------------------------------------

    def resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        """The LightningModule's ``tokenizer``; ``tokenizer`` (loaded here, by its own class) when the module has
        none, or when both agree. A ``tokenizer`` that differs from the module's is refused."""
        if self.tokenizer is not None:
            return self.tokenizer
        module = self.trainer.lightning_module if self.trainer is not None else None
        module_tokenizer = getattr(module, "tokenizer", None)
        if self.tokenizer_name is None:
            if module_tokenizer is None:
                raise MisconfigurationException(
                    f"{type(self).__name__} has no tokenizer: set the model's (`CausalLMModule(tokenizer=...)`, in "
                    "YAML `model.init_args.tokenizer`; by default the model directory's), or give this data module "
                    "`tokenizer` (a name or path) when the LightningModule has no `tokenizer` attribute."
                )
            return module_tokenizer
        from lit_mofo._hub import load_tokenizer, resolve_pretrained

        name, offline = resolve_pretrained(
            self.tokenizer_name, argument=f"{type(self).__name__}(tokenizer=...)", marker="tokenizer_config.json"
        )
        try:
            own = load_tokenizer(name, **({"local_files_only": True} if offline else {}))
        except (OSError, ValueError) as error:
            raise MisconfigurationException(
                f"tokenizer={self.tokenizer_name!r} is neither a local directory with tokenizer files nor a "
                f"Hugging Face name that can be loaded: {error}"
            ) from error
        if module_tokenizer is not None and not _same_tokenizer(own, module_tokenizer):
            module_name = getattr(module_tokenizer, "name_or_path", "") or type(module_tokenizer).__name__
            raise MisconfigurationException(
                f"Two different tokenizers: the data's `tokenizer={self.tokenizer_name!r}` (data.init_args.tokenizer) "
                f"and the model's {module_name!r} (model.init_args.tokenizer, or the model directory's) differ in "
                f"their vocabulary or special tokens ({len(own)} vs {len(module_tokenizer)} tokens). Set the "
                "tokenizer once, on the model: the data takes the model's."
            )
        return own

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
        chats = [self._is_chat(record, f"{split} record {i + 1}") for i, record in enumerate(records)]
        if any(chats) and not all(chats):
            first, other = chats[0], chats.index(not chats[0])
            kinds = {True: "chat record", False: "prompt/response record"}
            raise MisconfigurationException(
                f"{self._where(records[other], f'{split} record {other + 1}')}a {kinds[not first]} among "
                f"{kinds[first]}s: a data source holds one format. Convert the records to one of them."
            )
        if any(chats):
            self._check_chat_setup(records[0], split)
        examples = []
        for index, (record, chat) in enumerate(zip(records, chats, strict=True)):
            if not chat:
                examples.append(
                    tokenize_example(
                        self.tokenizer,
                        self._prompt(record),
                        str(record[self.response_key]),
                        max_length=limit,
                        add_eos=self.add_eos,
                        train_on_prompt=self.train_on_prompt,
                    )
                )
                continue
            try:
                examples.append(
                    tokenize_conversation(
                        self.tokenizer,
                        record[self.messages_key],
                        max_length=limit,
                        train_on_prompt=self.train_on_prompt,
                        chat_template=self.chat_template,
                    )
                )
            except ValueError as error:
                raise MisconfigurationException(
                    f"{self._where(record, f'{split} record {index + 1}')}{error}"
                ) from error
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

    def _check_chat_setup(self, first: Mapping[str, Any], split: str) -> None:
        """Chat records need a chat template, and take no prompt ``template``."""
        assert self.tokenizer is not None
        where = self._where(first, f"{split} record 1")
        if self.template is not None:
            raise MisconfigurationException(
                f"{where}a chat record ({self.messages_key!r}), but template={self.template!r} is set: the template "
                "formats prompt/response records, chats are rendered by the chat template. Drop `template` (or give "
                "`chat_template` to change how chats are rendered)."
            )
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            raise MisconfigurationException(
                f"{where}a chat record ({self.messages_key!r}), but the tokenizer {name!r} has no chat template to "
                "render it with. Use the tokenizer of a chat/instruct model (e.g. Qwen/Qwen2.5-0.5B-Instruct), give "
                "`chat_template` (a Jinja template or its file), or write the data as prompt/response records."
            )

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


def _same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map text to the same ids: the same vocabulary and the same special tokens."""
    if a is b:
        return True
    return bool(a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens)
