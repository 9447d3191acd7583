"""InstructionDataModule: prompt/response and chat JSONL to masked causal-LM batches, padding or packing, splits,
the tokenizer it shares with the model, and errors."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tiny_models import CHATML, byte_tokenizer
from transformers import PreTrainedTokenizerFast

from lit_mofo.data.instruction import (
    IGNORE_INDEX,
    InstructionCollator,
    InstructionDataModule,
    TokenizedExample,
    pack_examples,
    read_jsonl,
    tokenize_conversation,
    tokenize_example,
)
from lit_mofo.scenario.vocab import ENTITY_POOL, build_tokenizer

WORDS = ENTITY_POOL[:40]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """The scenario's word-level tokenizer: offline, one token per word, BOS prepended, EOS and pad defined."""
    return build_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def records(count: int, prompt_words: int = 3, response_words: int = 2) -> list[dict[str, str]]:
    return [
        {
            "prompt": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(prompt_words)),
            "response": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(response_words)),
            "id": str(i),
        }
        for i in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def setup_module_data(data: InstructionDataModule) -> InstructionDataModule:
    data.setup("fit")
    return data


def test_tokenize_example_masks_the_prompt_and_labels_the_response_and_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    example = tokenize_example(tokenizer, "brafu faxte", "molbu")
    prompt = tokenizer("brafu faxte")["input_ids"]  # [<bos>, brafu, faxte]
    response = tokenizer("molbu", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * 3 + response + [tokenizer.eos_token_id]


def test_tokenize_example_train_on_prompt_and_truncation(tokenizer: PreTrainedTokenizerFast) -> None:
    full = tokenize_example(tokenizer, "brafu faxte", "molbu barthol", train_on_prompt=True)
    assert full.labels == full.input_ids
    cut = tokenize_example(tokenizer, "brafu faxte", "molbu barthol", max_length=4)
    assert cut.input_ids == full.input_ids[:4]
    assert cut.labels == [IGNORE_INDEX] * 3 + [full.input_ids[3]]


def test_collator_pads_each_batch_to_its_longest_row_and_masks_padding() -> None:
    collate = InstructionCollator(pad_id=0)
    batch = collate([TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([5, 8], [-100, 8])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 8, -100]]


def test_collator_keeps_eos_labels_when_padding_with_the_eos_id() -> None:
    eos = 3
    batch = InstructionCollator(pad_id=eos)([TokenizedExample([5, 6, eos], [-100, 6, eos]), TokenizedExample([5], [5])])
    assert batch["labels"].tolist() == [[-100, 6, eos], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collator_is_picklable_for_dataloader_workers() -> None:
    restored = pickle.loads(pickle.dumps(InstructionCollator(pad_id=7, pad_to_multiple_of=8)))
    batch = restored([TokenizedExample([1, 2, 3], [1, 2, 3])])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["input_ids"][0, 3:].tolist() == [7] * 5


def test_pack_examples_cuts_the_concatenation_into_full_rows_and_keeps_labels() -> None:
    examples = [
        TokenizedExample([1, 2, 3], [-100, 2, 3]),
        TokenizedExample([4, 5], [-100, 5]),
        TokenizedExample([6], [6]),
    ]
    rows = pack_examples(examples, block_size=4, pad_id=0)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert [r.labels for r in rows] == [[-100, 2, 3, -100], [5, 6, -100, -100]]
    assert [r.padding for r in rows] == [0, 2]
    batch = InstructionCollator(pad_id=0)(rows)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.fixture()
def train_file(tmp_path: Path) -> Path:
    rows = records(6, prompt_words=2, response_words=1) + records(2, prompt_words=4, response_words=3)
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_padding_batches_label_only_response_tokens(train_file: Path, tokenizer_dir: Path) -> None:
    data = setup_module_data(
        InstructionDataModule(train_file=str(train_file), tokenizer=str(tokenizer_dir), batch_size=8)
    )
    batch = next(
        iter(torch.utils.data.DataLoader(data.train_examples, batch_size=8, collate_fn=InstructionCollator(0)))
    )
    tokenizer = data.tokenizer
    assert tokenizer is not None
    for row, record in enumerate(read_jsonl(train_file)):
        prompt_len = len(tokenizer(record["prompt"])["input_ids"])
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = batch["labels"][row]
        assert (labels[:prompt_len] == IGNORE_INDEX).all()
        assert labels[prompt_len : prompt_len + len(response)].tolist() == response
        assert (labels[prompt_len + len(response) :] == IGNORE_INDEX).all()
        assert int(batch["attention_mask"][row].sum()) == prompt_len + len(response)
    loader_batch = next(iter(data.train_dataloader()))
    assert set(loader_batch) == {"input_ids", "attention_mask", "labels"}
    assert loader_batch["input_ids"].shape[1] == 1 + 4 + 3 + 1  # dynamic: the longest example of the batch


def test_packing_gives_full_rows_with_the_same_labelled_tokens(train_file: Path, tokenizer_dir: Path) -> None:
    padded = setup_module_data(InstructionDataModule(train_file=str(train_file), tokenizer=str(tokenizer_dir)))
    packed = setup_module_data(
        InstructionDataModule(train_file=str(train_file), tokenizer=str(tokenizer_dir), packing=True, max_length=16)
    )
    assert all(len(row.input_ids) == 16 for row in packed.train_examples)
    assert sum(len(r.input_ids) - r.padding for r in packed.train_examples) == sum(
        len(e.input_ids) for e in padded.train_examples
    )

    def labelled(examples: list[TokenizedExample]) -> list[int]:
        return sorted(label for e in examples for label in e.labels if label != IGNORE_INDEX)

    assert labelled(packed.train_examples) == labelled(padded.train_examples)
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape[1] == 16


def test_val_fraction_splits_records_disjointly_and_reproducibly(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", records(40))

    def split(seed: int) -> tuple[list[list[int]], list[list[int]]]:
        data = setup_module_data(
            InstructionDataModule(train_file=str(path), tokenizer=str(tokenizer_dir), val_fraction=0.25, seed=seed)
        )
        return [e.input_ids for e in data.train_examples], [e.input_ids for e in data.val_examples]

    train, val = split(0)
    assert len(train) == 30 and len(val) == 10
    assert not {tuple(x) for x in train} & {tuple(x) for x in val}
    assert split(0) == (train, val)
    assert split(1)[1] != val


def test_separate_val_file_is_the_validation_set(tmp_path: Path, tokenizer_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", records(10))
    val = write_jsonl(tmp_path / "val.jsonl", records(3, prompt_words=5))
    data = setup_module_data(
        InstructionDataModule(train_file=str(train), val_file=str(val), tokenizer=str(tokenizer_dir), batch_size=2)
    )
    assert len(data.train_examples) == 10 and len(data.val_examples) == 3
    assert len(data.val_dataloader()) == 2


def test_malformed_jsonl_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    with pytest.raises(MisconfigurationException, match=rf"{path.name}:3: not valid JSON"):
        read_jsonl(path)


def test_jsonl_line_without_the_response_key_names_the_line_and_the_option(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "keys.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(MisconfigurationException, match=r"keys.jsonl:2: the object has no 'response'.*response_key"):
        read_jsonl(path, ("prompt", "response"))
    assert [r["answer"] for r in read_jsonl(path)[1:]] == ["d"]


def test_jsonl_line_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('["a", "b"]\n')
    with pytest.raises(MisconfigurationException, match=r"list.jsonl:1: expected a JSON object, got list"):
        read_jsonl(path)


def test_missing_data_file_is_named(tmp_path: Path, tokenizer_dir: Path) -> None:
    data = InstructionDataModule(train_file=str(tmp_path / "nope.jsonl"), tokenizer=str(tokenizer_dir))
    with pytest.raises(MisconfigurationException, match=r"nope\.jsonl' does not exist"):
        data.setup("fit")


def test_custom_keys_and_template_format_the_prompt(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "brafu", "context": "faxte", "answer": "molbu"}])
    data = InstructionDataModule(
        train_file=str(path), prompt_key="question", response_key="answer", template="{context} {prompt} :"
    )
    data.tokenizer = tokenizer
    data.setup("fit")
    expected = tokenize_example(tokenizer, "faxte brafu :", "molbu")
    assert data.train_examples == [expected]


def test_template_with_an_unknown_field_is_reported(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", records(1))
    data = InstructionDataModule(train_file=str(path), template="{instruction}\n{prompt}")
    data.tokenizer = tokenizer
    with pytest.raises(MisconfigurationException, match="uses the field 'instruction'"):
        data.setup("fit")
    with pytest.raises(MisconfigurationException, match="has no field"):
        InstructionDataModule(train_file=str(path), template="no fields")


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    path = write_jsonl(tmp_path / "t.jsonl", records(4, prompt_words=1) + records(1, prompt_words=4))
    data = InstructionDataModule(train_file=str(path), batch_size=5)
    data.tokenizer = tokenizer
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["input_ids"][padding] == tokenizer.eos_token_id).all()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()


def test_tokenizer_comes_from_the_lightning_module_when_not_given(tmp_path: Path) -> None:
    class WithTokenizer(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = build_tokenizer()

    data = InstructionDataModule(train_file=str(write_jsonl(tmp_path / "t.jsonl", records(3))))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(WithTokenizer())
    data.trainer = trainer
    data.setup("fit")
    assert data.tokenizer is trainer.lightning_module.tokenizer
    assert len(data.train_examples) == 3

    orphan = InstructionDataModule(train_file=str(tmp_path / "t.jsonl"))
    with pytest.raises(MisconfigurationException, match="has no tokenizer"):
        orphan.setup("fit")


def test_examples_without_response_tokens_within_max_length_are_dropped(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", records(3, prompt_words=2) + records(1, prompt_words=12))
    data = InstructionDataModule(train_file=str(path), max_length=8)
    data.tokenizer = tokenizer
    with pytest.warns(UserWarning, match="1 of 4 training examples have no response token"):
        data.setup("fit")
    assert len(data.train_examples) == 3


def test_hugging_face_dataset_without_the_datasets_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tokenizer: PreTrainedTokenizerFast
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    data = InstructionDataModule(dataset="tatsu-lab/alpaca", prompt_key="instruction", response_key="output")
    data.tokenizer = tokenizer
    with pytest.raises(MisconfigurationException, match="pip install datasets"):
        data.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one data source"),
        ({"train_file": "a.jsonl", "dataset": "x"}, "exactly one data source"),
        ({"train_file": "a.jsonl", "val_fraction": 1.0}, r"val_fraction=1.0 is outside \[0, 1\)"),
        ({"train_file": "a.jsonl", "max_length": 1}, "max_length=1 must be >= 2"),
        ({"train_file": "a.jsonl", "batch_size": 0}, "batch_size=0 must be >= 1"),
        ({"train_file": "a.jsonl", "num_workers": -1}, "num_workers=-1 must be >= 0"),
        ({"dataset": "x", "val_file": "v.jsonl"}, "val_file goes with train_file"),
    ],
)
def test_invalid_arguments_are_rejected_with_the_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        InstructionDataModule(**kwargs)


# ---- chat records (role/content turns rendered with the chat template) -------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany? (ü)"},
    {"role": "assistant", "content": "Berlin."},
]


def labelled_spans(tokenizer: PreTrainedTokenizerFast, example: TokenizedExample) -> list[str]:
    """The decoded runs of labelled tokens: what the loss is taken on."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # a label is the token itself (the model shifts them)
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(token)
        previous = label
    return [tokenizer.decode(span) for span in spans]


def chat_file(tmp_path: Path, conversations: list[Any], name: str = "chat.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [{"messages": messages} for messages in conversations])


def test_a_conversation_is_rendered_with_the_chat_template_and_labelled_on_the_assistant_turns_only() -> None:
    tokenizer = byte_tokenizer()
    example = tokenize_conversation(tokenizer, CONVERSATION)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered  # the whole conversation, as the template writes it
    # The replies and the end-of-turn markup after each (so the model learns to stop), not the generation prompt.
    assert labelled_spans(tokenizer, example) == ["Paris.<|im_end|>\n", "Berlin.<|im_end|>\n"]
    everything = tokenize_conversation(tokenizer, CONVERSATION, train_on_prompt=True)
    assert everything.input_ids == example.input_ids and everything.labels == everything.input_ids
    cut = tokenize_conversation(tokenizer, CONVERSATION, max_length=20)
    assert cut.input_ids == example.input_ids[:20] and cut.labels == example.labels[:20]


def test_the_prompt_the_model_sees_at_generation_is_the_unlabelled_text_before_each_reply() -> None:
    tokenizer = byte_tokenizer()
    example = tokenize_conversation(tokenizer, CONVERSATION[:3])
    first_label = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert example.input_ids[:first_label] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_chat_jsonl_batches_label_the_replies_and_prompt_response_files_still_work(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    single = [CONVERSATION[1], {"role": "assistant", "content": "Paris."}]
    path = chat_file(tmp_path, [CONVERSATION, single])
    data = setup_module_data(InstructionDataModule(train_file=str(path), tokenizer=str(tokenizer_dir)))
    assert [labelled_spans(tokenizer, e) for e in data.train_examples] == [
        ["Paris.<|im_end|>\n", "Berlin.<|im_end|>\n"],
        ["Paris.<|im_end|>\n"],
    ]
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(
        label != IGNORE_INDEX for e in data.train_examples for label in e.labels
    )
    prompt_response = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "Capital of France? ", "response": "Paris."}])
    plain = setup_module_data(InstructionDataModule(train_file=str(prompt_response), tokenizer=str(tokenizer_dir)))
    assert labelled_spans(tokenizer, plain.train_examples[0]) == ["Paris.<|endoftext|>"]


def test_chat_template_argument_renders_with_a_template_file(tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    data = InstructionDataModule(train_file=str(chat_file(tmp_path, [CONVERSATION[1:3]])), chat_template=str(template))
    data.tokenizer = byte_tokenizer(chat_template=None)
    data.setup("fit")
    tokenizer = data.tokenizer
    assert tokenizer.decode(data.train_examples[0].input_ids) == "user: Capital of France?\nassistant: Paris.\n"
    assert labelled_spans(tokenizer, data.train_examples[0]) == ["Paris.\n"]
    with pytest.raises(MisconfigurationException, match=r"chat_template='nope.jinja' is neither a Jinja template"):
        InstructionDataModule(train_file="a.jsonl", chat_template="nope.jinja")


# Templates that do not know the system role: Gemma's refuses it, another one leaves it out silently.
REFUSES_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHATML
)
DROPS_SYSTEM = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
USER, REPLY = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}


@pytest.mark.parametrize(
    ("messages", "chat_template", "message"),
    [
        (
            [USER, USER, REPLY],
            CHATML,
            r"turns do not alternate: turn 2 is 'user' after a 'user' turn.*merge consecutive",
        ),
        ([REPLY], CHATML, r"turn 1 is 'assistant' as the first turn.*starts with 'user'"),
        ([USER, REPLY, USER], CHATML, r"ends with a 'user' turn \(turn 3\).*must end with the 'assistant' reply"),
        (
            [USER, {"role": "bot", "content": "x"}],
            CHATML,
            r"role 'bot'.*'system' \(first turn only\), 'user' or 'assistant'",
        ),
        ([USER, {"role": "assistant", "content": "  "}], CHATML, r"turn 2 \(assistant\) is empty.*Write the reply"),
        (
            [{"role": "system", "content": "Be brief."}, USER, REPLY],
            REFUSES_SYSTEM,
            r"refuses the conversation: System role not supported",
        ),
        (
            [{"role": "system", "content": "Be brief."}, USER, REPLY],
            DROPS_SYSTEM,
            r"leaves out turn 1 \(system\).*roles the model's template knows",
        ),
        ("Hello", CHATML, r"'messages' is 'Hello'; it must be a non-empty list of turns"),
    ],
    ids=[
        "not-alternating",
        "reply-first",
        "ends-with-user",
        "unknown-role",
        "empty-reply",
        "template-refuses-role",
        "template-drops-role",
        "not-a-list",
    ],
)
def test_a_bad_conversation_is_refused_with_its_line_and_the_fix(
    tmp_path: Path, messages: Any, chat_template: str, message: str
) -> None:
    path = chat_file(tmp_path, [[USER, REPLY], messages])
    data = InstructionDataModule(train_file=str(path))
    data.tokenizer = byte_tokenizer(chat_template)
    with pytest.raises(MisconfigurationException, match=rf"chat\.jsonl:2: .*{message}"):
        data.setup("fit")


def test_chat_records_with_a_tokenizer_without_a_chat_template_are_refused_with_the_fix(tmp_path: Path) -> None:
    data = InstructionDataModule(train_file=str(chat_file(tmp_path, [[USER, REPLY]])))
    data.tokenizer = byte_tokenizer(chat_template=None)
    with pytest.raises(
        MisconfigurationException, match=r"chat\.jsonl:1: a chat record .* has no chat template.*give `chat_template`"
    ):
        data.setup("fit")


def test_a_file_mixing_the_formats_or_a_template_with_chats_is_refused(tmp_path: Path) -> None:
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": [USER, REPLY]}, {"prompt": "a", "response": "b"}])
    data = InstructionDataModule(train_file=str(mixed))
    data.tokenizer = byte_tokenizer()
    with pytest.raises(MisconfigurationException, match=r"mixed\.jsonl:2: a prompt/response record among chat records"):
        data.setup("fit")
    neither = write_jsonl(tmp_path / "neither.jsonl", [{"question": "a", "answer": "b"}])
    data = InstructionDataModule(train_file=str(neither))
    data.tokenizer = byte_tokenizer()
    with pytest.raises(MisconfigurationException, match=r"neither\.jsonl:1: the record has neither 'messages'"):
        data.setup("fit")
    templated = InstructionDataModule(train_file=str(chat_file(tmp_path, [[USER, REPLY]])), template="Q: {prompt}")
    templated.tokenizer = byte_tokenizer()
    with pytest.raises(MisconfigurationException, match=r"chat\.jsonl:1: a chat record .* template='Q: \{prompt\}'"):
        templated.setup("fit")


# ---- one tokenizer for the model and the data ----------------------------------------------------------------------


def test_the_data_tokenizer_is_not_a_hyper_parameter_that_could_clash_with_the_models(tmp_path: Path) -> None:
    data = InstructionDataModule(train_file="a.jsonl", tokenizer=str(tmp_path))
    assert "tokenizer" not in data.hparams  # Lightning merges the module's and the data's: the model's is the one
    assert data.hparams["messages_key"] == "messages"


def test_a_data_tokenizer_that_differs_from_the_models_is_refused_naming_both(tmp_path: Path) -> None:
    byte_dir = tmp_path / "byte"
    byte_tokenizer().save_pretrained(byte_dir)
    word_dir = tmp_path / "word"
    build_tokenizer().save_pretrained(word_dir)

    class WithTokenizer(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = byte_tokenizer()

    path = chat_file(tmp_path, [[USER, REPLY]])
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(WithTokenizer())
    same = InstructionDataModule(train_file=str(path), tokenizer=str(byte_dir))
    same.trainer = trainer
    same.setup("fit")  # the same vocabulary and special tokens, saved elsewhere: accepted
    assert len(same.train_examples) == 1
    other = InstructionDataModule(train_file=str(path), tokenizer=str(word_dir))
    other.trainer = trainer
    with pytest.raises(
        MisconfigurationException,
        match=r"Two different tokenizers.*data.init_args.tokenizer.*model.init_args.tokenizer",
    ):
        other.setup("fit")


def test_a_hub_dataset_that_is_not_cached_offline_or_a_missing_path_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch, tokenizer: PreTrainedTokenizerFast
) -> None:
    pytest.importorskip("datasets")
    from lit_mofo import _hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(_hub, "dataset_is_cached", lambda name: False)
    data = InstructionDataModule(dataset="lit-mofo/no-such-dataset")
    data.tokenizer = tokenizer
    with pytest.raises(
        MisconfigurationException,
        match=r"dataset 'lit-mofo/no-such-dataset' is not in the cache, and offline mode is on.*Not cached and no "
        r"network: pass a local path .*datasets.load_dataset\('lit-mofo/no-such-dataset'\)",
    ):
        data.setup("fit")
    missing = InstructionDataModule(dataset="./no/such/data")
    missing.tokenizer = tokenizer
    with pytest.raises(MisconfigurationException, match=r"no such directory or file: './no/such/data'"):
        missing.setup("fit")
