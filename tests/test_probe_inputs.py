"""Bad probe input fails early and says what to do: when the probe is built (files, records, arguments, token ids
below 0), or in ``setup`` where the model is needed (token ids beyond its vocabulary, a ``forward`` the probe cannot
call); reference data is read, and text tokenized, only as far as ``limit_batches`` needs; and ``forward_fn`` adapts
a model that is not called as ``model(input_ids=..., attention_mask=...)``."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lit_mofo.probes import AccuracyProbe, CallableProbe, LanguageModelProbe, MultipleChoiceProbe, Probe

VOCAB = 32
SEQUENCES = [[(3 * i + 5 * t) % VOCAB for t in range(6 + i)] for i in range(5)]


def single_process() -> SimpleNamespace:
    return SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True)


class Holder(nn.Module):
    """Stands in for a LightningModule: a ``model`` attribute, a ``device`` and optionally a ``tokenizer``."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def evaluate(probe: Probe, holder: nn.Module) -> dict[str, float]:
    probe.setup(single_process(), holder)  # type: ignore[arg-type]
    with torch.no_grad():
        return probe.evaluate(single_process(), holder)  # type: ignore[arg-type]


def letters_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``size`` tokens: 4 specials, then 'w0', 'w1', ... ('w0 w1' -> [4, 5])."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(size - 4))])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# ---------------------------------------------------------------------- reference files, at construction
def test_a_binary_text_file_is_refused_at_construction_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "reference.txt"
    path.write_bytes(b"\xff\xfe\x00a\x80b")
    with pytest.raises(MisconfigurationException, match=r"files='.*reference\.txt' is invalid.*not UTF-8 text"):
        LanguageModelProbe(files=path)


def test_a_text_file_with_nul_bytes_is_refused_as_binary(tmp_path: Path) -> None:
    path = tmp_path / "reference.txt"
    path.write_bytes(b"abc\x00def\n")
    with pytest.raises(MisconfigurationException, match=r"reference\.txt.*NUL bytes: it is a binary file"):
        LanguageModelProbe(files=path)


def test_invalid_json_is_refused_at_construction_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "reference.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    with pytest.raises(MisconfigurationException, match=r"reference\.json:3 is not valid JSON: Expecting value"):
        LanguageModelProbe(files=path)


def test_an_invalid_jsonl_line_is_refused_at_construction_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "reference.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(MisconfigurationException, match=r"reference\.jsonl:3 is not valid JSON.*Fix that line"):
        LanguageModelProbe(files=path)


def test_a_directory_is_reported_as_a_directory_with_its_reference_files(tmp_path: Path) -> None:
    (tmp_path / "wiki.txt").write_text("a b\n")
    with pytest.raises(MisconfigurationException, match=r"is a directory \(it holds e\.g\. \['wiki\.txt'\]\)"):
        LanguageModelProbe(files=tmp_path)


def test_a_missing_file_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match=r"nope\.txt' does not exist \(cwd: "):
        LanguageModelProbe(files=[tmp_path / "nope.txt"])


def test_a_record_without_the_text_key_is_refused_at_construction_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "reference.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(MisconfigurationException, match=r"reference\.jsonl:2 has no 'text'; its keys are \['body'\]"):
        LanguageModelProbe(files=path)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda path: AccuracyProbe(files=path), r"reference\.jsonl:2 .*needs an int class index >= 0 under 'label'"),
        (lambda path: MultipleChoiceProbe(files=path), r"reference\.jsonl:2 .*needs 'context' and 'choices'"),
    ],
)
def test_the_accuracy_probes_check_their_records_at_construction(build: Any, message: str, tmp_path: Path) -> None:
    path = tmp_path / "reference.jsonl"
    path.write_text(
        json.dumps({"text": "a", "label": 0, "context": "a", "choices": ["b", "c"]}) + "\n" + '{"text": "b"}\n'
    )
    with pytest.raises(MisconfigurationException, match=message):
        build(path)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("blank.txt", b"\n  \n\n", "holds no non-empty line. The reference set is empty."),
        ("empty.jsonl", b"", "holds no non-empty record. The reference set is empty."),
        ("empty.json", b"[]", "holds no non-empty record. The reference set is empty."),
        ("binary.txt", b"PK\x03\x04\x00\x00\x08\x00", "It holds NUL bytes: it is a binary file, not text."),
        ("latin1.txt", "caf\u00e9\n".encode("latin-1"), "It is not UTF-8 text (invalid continuation byte at byte 3)"),
        ("schema.jsonl", b'{"body": "a"}\n', "Record {path}:1 has no 'text'; its keys are ['body']."),
        ("schema.json", b'{"text": "a"}', "{path} holds a JSON dict, not a list of objects"),
        ("missing.txt", None, "{path!r} does not exist (cwd: "),
    ],
)
def test_a_bad_reference_file_is_refused_at_construction_naming_argument_file_and_reason_on_the_first_line(
    tmp_path: Path, name: str, content: bytes | None, reason: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MisconfigurationException) as refusal:
        LanguageModelProbe(files=[str(path)])
    first_line = str(refusal.value).splitlines()[0]
    assert first_line == str(refusal.value)  # one line: what a command line shows first is all of it
    assert first_line.startswith(f"LanguageModelProbe(name='lm'): files={str(path)!r} is invalid; the valid range is ")
    assert reason.format(path=str(path)) in first_line


@pytest.mark.parametrize(
    ("build", "probe", "reason"),
    [
        (
            lambda path: AccuracyProbe(files=path),
            "AccuracyProbe(name='accuracy')",
            "{path}:1 {{'text': 'a'}} needs an int class index >= 0 under 'label'.",
        ),
        (
            lambda path: MultipleChoiceProbe(files=path),
            "MultipleChoiceProbe(name='multiple_choice')",
            "{path}:1 {{'text': 'a'}} needs 'context' and 'choices' (or 'context_ids' and 'choice_ids').",
        ),
    ],
)
def test_the_accuracy_probes_name_argument_file_and_reason_of_a_wrong_record(
    build: Any, probe: str, reason: str, tmp_path: Path
) -> None:
    path = tmp_path / "reference.jsonl"
    path.write_text('{"text": "a"}\n')
    with pytest.raises(MisconfigurationException) as refusal:
        build(path)
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith(f"{probe}: files={str(path)!r} is invalid; the valid range is records (dicts) with ")
    assert message.endswith(reason.format(path=path))


def test_an_empty_file_among_reference_files_is_named(tmp_path: Path) -> None:
    (tmp_path / "wiki.txt").write_text("a b\n")
    (tmp_path / "news.txt").write_text("")
    with pytest.raises(
        MisconfigurationException, match=r"news\.txt' holds no non-empty line\. Remove it from `files`, or check"
    ):
        LanguageModelProbe(files=[tmp_path / "wiki.txt", tmp_path / "news.txt"])


def test_a_line_longer_than_the_bound_is_refused_rather_than_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lit_mofo.probes import _records

    monkeypatch.setattr(_records, "MAX_LINE_BYTES", 64)
    path = tmp_path / "reference.txt"
    path.write_text("a short line\n" + "w1 " * 40 + "\n")
    with pytest.raises(
        MisconfigurationException, match=r"reference\.txt:2 is longer than 64 bytes: split the text into lines"
    ):
        LanguageModelProbe(files=path)


# ---------------------------------------------------------------------- reading bounded by limit_batches
class CountingTokenizer:
    """A tokenizer recording the length of every text it is given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.lengths = tokenizer, []
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


def test_a_long_line_is_tokenized_only_as_far_as_the_windows_limit_batches_keeps(
    llama: nn.Module, tmp_path: Path
) -> None:
    tokenizer = letters_tokenizer(VOCAB)
    line = " ".join(f"w{(7 * i) % (VOCAB - 4)}" for i in range(200_000))  # 1.2 MB, 200,000 tokens
    path = tmp_path / "one_line.txt"
    path.write_text(line + "\n")
    counting = CountingTokenizer(tokenizer)
    probe = LanguageModelProbe(files=path, tokenizer=counting, max_length=16, batch_size=2, limit_batches=1)
    values = evaluate(probe, Holder(llama))
    assert probe.num_batches == 1 and max(counting.lengths) < len(line) / 50
    ids = tokenizer(line)["input_ids"]
    assert values == evaluate(LanguageModelProbe(token_ids=[ids[:16], ids[16:32]]), Holder(llama))


def test_records_are_read_and_checked_only_as_far_as_limit_batches_needs(
    llama: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lit_mofo.probes import _records

    monkeypatch.setattr(_records, "HEAD_BYTES", 1)  # construction reads the first record of each file only
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in SEQUENCES[:3]) + '{"input_ids": [1, }\n')
    limited = evaluate(LanguageModelProbe(files=path, batch_size=2, limit_batches=1), Holder(llama))
    assert limited == evaluate(LanguageModelProbe(token_ids=SEQUENCES[:2]), Holder(llama))
    whole = LanguageModelProbe(files=path, batch_size=2)  # built: the bad line is beyond what construction reads
    with pytest.raises(MisconfigurationException, match=r"ids\.jsonl:4 is not valid JSON: Expecting value"):
        whole.setup(single_process(), Holder(llama))  # type: ignore[arg-type]

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(
        "".join(
            json.dumps({"input_ids": s, "label": 0, "context_ids": s, "choice_ids": [[1], [2]]}) + "\n"
            for s in SEQUENCES[:2]
        )
        + '{"text": "no label"}\n'
    )
    for build in (AccuracyProbe, MultipleChoiceProbe):
        limited_probe = build(files=labelled, batch_size=2, limit_batches=1)
        limited_probe.setup(single_process(), Holder(llama))  # type: ignore[arg-type]
        with pytest.raises(MisconfigurationException, match=r"labelled\.jsonl:3 \{'text': 'no label'\} needs"):
            build(files=labelled, batch_size=2).setup(single_process(), Holder(llama))  # type: ignore[arg-type]


def test_a_dataset_is_read_item_by_item_only_as_far_as_limit_batches_needs(llama: nn.Module) -> None:
    class Counted(torch.utils.data.Dataset[list[int]]):
        def __init__(self) -> None:
            self.read: list[int] = []

        def __len__(self) -> int:
            return len(SEQUENCES)

        def __getitem__(self, index: int) -> list[int]:
            self.read.append(index)
            return SEQUENCES[index]

    dataset = Counted()
    evaluate(LanguageModelProbe(dataset=dataset, batch_size=2, limit_batches=1), Holder(llama))
    assert dataset.read == [0, 1]


def _tokenizers_of_every_kind() -> tuple[dict[str, PreTrainedTokenizerFast], list[str]]:
    """Small tokenizers built here: byte-level BPE (GPT-2's scheme) and Unigram with Metaspace (SentencePiece's),
    trained on random words, and a word-level one over long words that ends every text with ``</s>`` (more
    characters per token than a first prefix expects, and an end token wherever a prefix is cut); with its words."""
    from tokenizers import processors, trainers

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 9))) for _ in range(300)]
    corpus = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(
        corpus, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
    )
    long_words = [f"{word}{word}{word}" for word in words if len(word) >= 7][:50]  # 21 to 27 characters a token
    vocabulary = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *long_words])}
    words_and_end = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    words_and_end.pre_tokenizer = pre_tokenizers.Whitespace()
    words_and_end.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    tokenizers = {
        name: PreTrainedTokenizerFast(tokenizer_object=trained, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        for name, trained in (("byte-level BPE", bpe), ("unigram", unigram), ("long words", words_and_end))
    }
    return tokenizers, long_words


def test_tokenize_prefix_gives_the_first_ids_of_the_whole_texts_tokenization() -> None:
    from lit_mofo.probes._tokens import tokenize_prefix

    rng = random.Random(1)
    tokenizers, long_words = _tokenizers_of_every_kind()
    for name, tokenizer in {**tokenizers, "word level": letters_tokenizer(VOCAB)}.items():
        for index in range(8):  # texts of 5,000 to 12,000 characters: longer than the first prefixes tried
            if name == "word level":
                text = " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(1500))
            elif name.startswith("long words"):
                text = " ".join(rng.choice(long_words) for _ in range(500))
            elif index < 2:  # one word of 5,000 letters: a cut anywhere splits it
                text = "".join(rng.choice("abcdefgh") for _ in range(5000))
            else:
                text = " ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 30))) for _ in range(400))
            whole = tokenizer(text)["input_ids"]
            for count in (1, 7, 100, 400):
                assert tokenize_prefix(tokenizer, text, True, count)[:count] == whole[:count], (name, count)
            assert tokenize_prefix(tokenizer, text, True, None) == whole


# ---------------------------------------------------------------------- token ids
def test_negative_token_ids_are_refused_at_construction() -> None:
    with pytest.raises(
        MisconfigurationException, match=r"token_ids\[1\]=.* is invalid; the valid range is a list of token"
    ):
        LanguageModelProbe(token_ids=[[1, 2, 3], [4, -1, 5]])


def test_token_ids_beyond_the_vocabulary_are_refused_in_setup_naming_the_sequence(llama: nn.Module) -> None:
    probe = LanguageModelProbe(token_ids=[[1, 2, 3], [4, 40, 5]])
    with pytest.raises(
        MisconfigurationException, match=r"token ids='token_ids\[1\]: 40' is invalid; the valid range is \[0, 31\]"
    ):
        probe.setup(single_process(), Holder(llama))  # type: ignore[arg-type]


def test_jsonl_token_ids_beyond_the_vocabulary_name_file_and_line(llama: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "ids.jsonl"
    path.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 99]}\n')
    with pytest.raises(MisconfigurationException, match=r"ids\.jsonl:2: 99' is invalid; the valid range is \[0, 31\]"):
        LanguageModelProbe(files=path).setup(single_process(), Holder(llama))  # type: ignore[arg-type]


def test_a_tokenizer_larger_than_the_model_is_named_as_the_cause(llama: nn.Module) -> None:
    probe = LanguageModelProbe(texts=["w1 w2", "w3 w60"], tokenizer=letters_tokenizer(80))
    with pytest.raises(MisconfigurationException, match=r"texts\[1\]: 64'.*tokenizer does not match the model"):
        probe.setup(single_process(), Holder(llama))  # type: ignore[arg-type]


def test_the_accuracy_probes_check_token_ids_against_the_vocabulary_in_setup(llama: nn.Module) -> None:
    accuracy = AccuracyProbe(examples=[{"input_ids": [1, 2], "label": 0}, {"input_ids": [3, 32], "label": 1}])
    with pytest.raises(MisconfigurationException, match=r"examples\[1\]: 32'.*\[0, 31\]"):
        accuracy.setup(single_process(), Holder(llama))  # type: ignore[arg-type]
    choice = MultipleChoiceProbe(examples=[{"context_ids": [1, 2], "choice_ids": [[3], [50]], "label": 0}])
    with pytest.raises(MisconfigurationException, match=r"examples\[0\]: 50'.*\[0, 31\]"):
        choice.setup(single_process(), Holder(llama))  # type: ignore[arg-type]


def test_dataloader_batches_beyond_the_vocabulary_are_refused_before_the_forward(llama: nn.Module) -> None:
    loader = [torch.tensor([[1, 2, 3], [4, 5, 33]])]
    with pytest.raises(
        MisconfigurationException, match=r"dataloader input_ids='ids in \[1, 33\]' is invalid.*\[0, 31\]"
    ):
        evaluate(LanguageModelProbe(dataloader=loader), Holder(llama))


class UnsizedLM(nn.Module):
    """A causal LM that does not say its vocabulary size (no get_input_embeddings, no config)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.head(self.embed(input_ids))


def test_an_embedding_lookup_beyond_an_unsized_model_is_explained() -> None:
    with pytest.raises(MisconfigurationException, match=r"token ids in \[1, 40\].*tokenizer does not match the model"):
        evaluate(LanguageModelProbe(token_ids=[[1, 2, 40]]), Holder(UnsizedLM()))


def test_labels_beyond_the_models_classes_are_refused() -> None:
    class ThreeClasses(nn.Module):
        def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            return torch.zeros(input_ids.size(0), 3)

    probe = AccuracyProbe(examples=[{"input_ids": [1], "label": 0}, {"input_ids": [2], "label": 5}])
    with pytest.raises(MisconfigurationException, match=r"labels='class indices in \[0, 5\]'.*\[0, 2\] \(the model"):
        evaluate(probe, Holder(ThreeClasses()))


# ---------------------------------------------------------------------- arguments of every probe
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: LanguageModelProbe(token_ids=SEQUENCES, batch_size="8"),
            r"batch_size='8' is invalid.*an integer >= 1",
        ),
        (lambda: LanguageModelProbe(token_ids=SEQUENCES, max_length=True), r"max_length=True is invalid.*>= 2"),
        (lambda: LanguageModelProbe(token_ids=SEQUENCES, limit_batches="0.5"), r"limit_batches='0\.5' is invalid"),
        (lambda: LanguageModelProbe(token_ids=SEQUENCES, text_key=""), r"text_key='' is invalid.*non-empty string"),
        (lambda: LanguageModelProbe(texts=["a", 3]), r"texts='texts\[1\] = 3' is invalid.*a list of strings"),
        (lambda: LanguageModelProbe(texts=[]), r"texts=\[\] is invalid.*reference set is empty"),
        (lambda: LanguageModelProbe(token_ids=SEQUENCES, tokenizer="/no/such/dir"), r"tokenizer='/no/such/dir'.*exist"),
        (lambda: LanguageModelProbe(token_ids=SEQUENCES, tokenizer=3), r"tokenizer=3 is invalid"),
        (lambda: LanguageModelProbe(token_ids=SEQUENCES, forward_fn=3), r"forward_fn=3 is invalid.*\(model, batch\)"),
        (lambda: LanguageModelProbe(token_ids=SEQUENCES, forward_fn="math.nope"), r"forward_fn='math\.nope'.*import"),
        (lambda: LanguageModelProbe(token_ids=SEQUENCES, forward_fn=lambda m: m), r"forward_fn=.* is invalid"),
        (lambda: LanguageModelProbe(dataset=[]), r"dataset=\[\] is invalid; the valid range is a non-empty"),
        (lambda: LanguageModelProbe(dataset=iter([[1, 2]])), r"dataset=.* is invalid.*map-style dataset"),
        (lambda: LanguageModelProbe(dataloader=iter([torch.ones(1, 2)])), r"dataloader=.*exhausted after the first"),
        (lambda: AccuracyProbe(examples=[{"input_ids": [1], "label": -1}]), r"needs an int class index >= 0"),
        (lambda: AccuracyProbe(examples=[{"input_ids": [1], "label": 0}], label_key=None), r"label_key=None is"),
        (lambda: AccuracyProbe(dataloader=[], batch_size=0), r"batch_size=0 is invalid.*an integer >= 1"),
        (lambda: MultipleChoiceProbe(examples=[{"context": "a", "choices": "bc", "label": 0}]), r"a list of choices"),
        (
            lambda: MultipleChoiceProbe(examples=[{"context": "a", "choices": ["b"], "label": 0}], target_delimiter=0),
            r"target_delimiter=0",
        ),
        (
            lambda: CallableProbe(lambda trainer: 1.0, higher_is_better=True),
            r"fn=.* is invalid.*\(trainer, pl_module\)",
        ),
        (lambda: CallableProbe(lambda t, m: 1.0, higher_is_better={"a b": True}), r"higher_is_better=.*not \{'a b'"),
    ],
)
def test_every_probe_argument_is_checked_at_construction(build: Any, message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        build()


def test_scenario_probe_arguments_are_checked_at_construction() -> None:
    from lit_mofo.scenario import KnowledgeProbe, TaskProbe

    with pytest.raises(MisconfigurationException, match=r"KnowledgeProbe\(name='knowledge'\): num_entities='8' is"):
        KnowledgeProbe(num_entities="8")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"seed=True is invalid; the valid range is an integer"):
        TaskProbe(seed=True)  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"batch_size=2\.5 is invalid"):
        TaskProbe(batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"TaskProbe\(name='task'\): num_eval=10 is more than half"):
        TaskProbe(num_words=4, min_length=2, max_length=2, num_examples=10)  # 16 lists: refused when built
    assert KnowledgeProbe(relations="city").spec.relations == ("city",)  # one relation, not its letters


def test_lm_eval_probe_arguments_are_checked_at_construction(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from lit_mofo.probes import LMEvalProbe

    with pytest.raises(MisconfigurationException, match=r"include_path=.* is invalid.*nope' is not a directory"):
        LMEvalProbe("task", include_path=tmp_path / "nope")  # no setup needed
    with pytest.raises(MisconfigurationException, match=r"num_fewshot='2' is invalid; the valid range is an integer"):
        LMEvalProbe("task", num_fewshot="2")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"include_defaults='false' is invalid.*True or False"):
        LMEvalProbe("task", include_defaults="false")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"evaluate_kwargs=.*\['limit'\] are set by the probe"):
        LMEvalProbe("task", evaluate_kwargs={"limit": 3})
    with pytest.raises(MisconfigurationException, match=r"tasks=\[\] is invalid"):
        LMEvalProbe([])
    with pytest.raises(MisconfigurationException, match=r"limit=0 is invalid.*count of examples per task"):
        LMEvalProbe("task", limit=0)


# ---------------------------------------------------------------------- models called another way: forward_fn
class PositionalLM(nn.Module):
    """A causal LM whose forward takes the token ids positionally as ``tokens`` and returns logits."""

    def __init__(self, inner: LlamaForCausalLM) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens: Tensor) -> Tensor:
        return self.inner(input_ids=tokens).logits


def positional_forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(batch["input_ids"])


def test_a_model_without_input_ids_is_refused_in_setup_with_the_expected_signature(llama: LlamaForCausalLM) -> None:
    probe = LanguageModelProbe(token_ids=SEQUENCES)
    with pytest.raises(
        MisconfigurationException,
        match=r"calls the model as `PositionalLM\(input_ids=\.\.\., attention_mask=\.\.\.\)`.*"
        r"`PositionalLM\.forward\(tokens: 'Tensor'\) -> 'Tensor'` takes no \['input_ids'\]\. Pass `forward_fn=`",
    ):
        probe.setup(single_process(), Holder(PositionalLM(llama)))  # type: ignore[arg-type]


def test_forward_fn_adapts_the_call_and_gives_the_same_loss(llama: LlamaForCausalLM) -> None:
    direct = evaluate(LanguageModelProbe(token_ids=SEQUENCES, batch_size=2), Holder(llama))
    adapted = evaluate(
        LanguageModelProbe(token_ids=SEQUENCES, batch_size=2, forward_fn=positional_forward),
        Holder(PositionalLM(llama)),
    )
    assert adapted["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert math.isfinite(direct["loss"])


def test_forward_fn_can_be_an_import_path_as_in_yaml(
    llama: LlamaForCausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_forwards.py").write_text("def tokens_first(model, batch):\n    return model(batch['input_ids'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = LanguageModelProbe(token_ids=SEQUENCES, forward_fn="my_forwards.tokens_first")
    assert probe.forward_fn is not None and probe.forward_fn.__name__ == "tokens_first"
    direct = evaluate(LanguageModelProbe(token_ids=SEQUENCES), Holder(llama))
    assert evaluate(probe, Holder(PositionalLM(llama)))["loss"] == pytest.approx(direct["loss"], rel=1e-6)


def test_a_model_without_attention_mask_is_called_without_it(llama: LlamaForCausalLM) -> None:
    class IdsOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = llama

        def forward(self, input_ids: Tensor) -> Tensor:
            return self.inner(input_ids=input_ids).logits

    # right padding does not change a causal model's scores of the real tokens, so the loss is the same
    direct = evaluate(LanguageModelProbe(token_ids=SEQUENCES, batch_size=5), Holder(llama))
    assert evaluate(LanguageModelProbe(token_ids=SEQUENCES, batch_size=5), Holder(IdsOnly()))["loss"] == pytest.approx(
        direct["loss"], rel=1e-5
    )


def test_the_accuracy_probes_take_a_forward_fn_too(llama: LlamaForCausalLM) -> None:
    examples = [{"context_ids": [1, 2, 3], "choice_ids": [[4], [5, 6]], "label": i % 2} for i in range(4)]
    direct = evaluate(MultipleChoiceProbe(examples=examples), Holder(llama))
    adapted = evaluate(
        MultipleChoiceProbe(examples=examples, forward_fn=positional_forward), Holder(PositionalLM(llama))
    )
    assert adapted == direct
    with pytest.raises(MisconfigurationException, match="Pass `forward_fn=`"):
        MultipleChoiceProbe(examples=examples).setup(single_process(), Holder(PositionalLM(llama)))  # type: ignore[arg-type]

    class FirstToken(nn.Module):
        def forward(self, tokens: Tensor) -> Tensor:
            return nn.functional.one_hot(tokens[:, 0] % 3, 3).float()

    labelled = [{"input_ids": [i, 1], "label": i % 3} for i in range(6)]
    values = evaluate(AccuracyProbe(examples=labelled, forward_fn=positional_forward), Holder(FirstToken()))
    assert values == {"accuracy": 1.0}
    loader = DataLoader(TensorDataset(torch.tensor([[0, 1], [1, 1]]), torch.tensor([0, 2])), batch_size=2)
    pairs = evaluate(AccuracyProbe(dataloader=loader, forward_fn=lambda model, x: model(x)), Holder(FirstToken()))
    assert pairs == {"accuracy": 0.5}


def test_a_dict_batch_with_keys_the_model_does_not_take_is_explained() -> None:
    class Classifier(nn.Module):
        def forward(self, input_ids: Tensor) -> Tensor:
            return torch.zeros(input_ids.size(0), 2)

    batches = [
        {"input_ids": torch.ones(2, 3, dtype=torch.long), "token_type_ids": torch.zeros(2, 3), "labels": torch.zeros(2)}
    ]
    with pytest.raises(MisconfigurationException, match=r"takes no \['token_type_ids'\]\. Pass `forward_fn=`"):
        evaluate(AccuracyProbe(dataloader=batches), Holder(Classifier()))


def test_the_scenario_probes_take_a_forward_fn() -> None:
    from lit_mofo.scenario import KnowledgeProbe
    from lit_mofo.scenario.vocab import load_tokenizer

    torch.manual_seed(0)
    size = len(load_tokenizer())
    config = LlamaConfig(
        vocab_size=size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    inner = LlamaForCausalLM(config).eval()
    direct = evaluate(KnowledgeProbe(num_entities=4, batch_size=8), Holder(inner))
    wrapped = Holder(PositionalLM(inner))
    with pytest.raises(MisconfigurationException, match="Pass `forward_fn=`"):
        KnowledgeProbe(num_entities=4).setup(single_process(), wrapped)  # type: ignore[arg-type]
    adapted = evaluate(KnowledgeProbe(num_entities=4, batch_size=8, forward_fn=positional_forward), wrapped)
    assert adapted == pytest.approx(direct, rel=1e-6)
