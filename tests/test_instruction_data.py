"""InstructionDataModule: prompt/response JSONL to masked causal-LM batches, padding or packing, splits and errors."""

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
from transformers import PreTrainedTokenizerFast

from lit_mofo.data.instruction import (
    IGNORE_INDEX,
    InstructionCollator,
    InstructionDataModule,
    TokenizedExample,
    pack_examples,
    read_jsonl,
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
