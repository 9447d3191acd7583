"""The built-in probes and the report writer: values checked against hand computations on tiny models."""

from __future__ import annotations

import builtins
import json
import math
import operator
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

from lit_mofo.probes import (
    AccuracyProbe,
    CallableProbe,
    LanguageModelProbe,
    MultipleChoiceProbe,
    Probe,
    find_language_model,
    rank_share,
    run_batches,
)
from lit_mofo.probes.distribution import rank_batches
from lit_mofo.report import Curve, ReportSection, Table, console_table, format_value, markdown_table, write_report

WORDS = ["<pad>", "<s>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz"]


def single_process() -> SimpleNamespace:
    return SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over single letters: 'a b c' -> [4, 5, 6]; no special tokens added."""
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


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
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def reference_loss(model: LlamaForCausalLM, sequences: list[list[int]], max_length: int) -> float:
    """Token-weighted mean next-token loss, one window at a time through transformers' own loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sequence in sequences:
            for start in range(0, len(sequence), max_length):
                window = sequence[start : start + max_length]
                if len(window) < 2:
                    continue
                ids = torch.tensor([window])
                total += model(input_ids=ids, labels=ids).loss.item() * (len(window) - 1)
                count += len(window) - 1
    return total / count


SEQUENCES = [[(7 * i + 3 * t) % 128 for t in range(5 + 3 * i)] for i in range(7)]  # lengths 5..23


def evaluate(probe: Probe, holder: nn.Module, trainer: Any = None) -> dict[str, float]:
    trainer = trainer or single_process()
    probe.setup(trainer, holder)  # type: ignore[arg-type]
    with torch.no_grad():
        return probe.evaluate(trainer, holder)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- language-model probe
def test_lm_probe_is_the_token_weighted_mean_loss_over_windows_and_perplexity_its_exp(llama: nn.Module) -> None:
    values = evaluate(LanguageModelProbe(token_ids=SEQUENCES, batch_size=3, max_length=8), Holder(llama))
    expected = reference_loss(llama, SEQUENCES, max_length=8)
    assert values["loss"] == pytest.approx(expected, rel=1e-6)
    assert values["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)


def test_lm_probe_value_does_not_depend_on_the_batching(llama: nn.Module) -> None:
    one = evaluate(LanguageModelProbe(token_ids=SEQUENCES, batch_size=1, max_length=16), Holder(llama))
    many = evaluate(LanguageModelProbe(token_ids=SEQUENCES, batch_size=5, max_length=16), Holder(llama))
    assert one["loss"] == pytest.approx(many["loss"], rel=1e-6)


def test_lm_probe_declares_both_metrics_lower_is_better() -> None:
    assert LanguageModelProbe(token_ids=SEQUENCES).higher_is_better == {"loss": False, "perplexity": False}


def test_lm_probe_reads_text_and_jsonl_files_with_the_modules_tokenizer(llama: nn.Module, tmp_path: Path) -> None:
    tokenizer = word_tokenizer()
    texts = ["a b c d e", "f g h", "x y z z y x"]
    (tmp_path / "ref.txt").write_text("\n".join(texts[:2]) + "\n\n")
    (tmp_path / "ref.jsonl").write_text(json.dumps({"body": texts[2]}) + "\n")
    probe = LanguageModelProbe(files=[tmp_path / "ref.txt", tmp_path / "ref.jsonl"], text_key="body")
    values = evaluate(probe, Holder(llama, tokenizer=tokenizer))
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert values["loss"] == pytest.approx(reference_loss(llama, ids, max_length=512), rel=1e-6)
    from_texts = evaluate(LanguageModelProbe(texts=texts, tokenizer=tokenizer), Holder(llama))
    assert from_texts["loss"] == pytest.approx(values["loss"], rel=1e-6)


def test_lm_probe_reads_token_ids_from_jsonl(llama: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in SEQUENCES))
    values = evaluate(LanguageModelProbe(files=str(path), max_length=8), Holder(llama))
    assert values["loss"] == pytest.approx(reference_loss(llama, SEQUENCES, max_length=8), rel=1e-6)


def test_lm_probe_accepts_a_user_dataloader_and_masks_padding(llama: nn.Module) -> None:
    rows = [s[:5] for s in SEQUENCES]
    loader = DataLoader(TensorDataset(torch.tensor(rows)), batch_size=3)
    from_loader = evaluate(LanguageModelProbe(dataloader=loader), Holder(llama))
    assert from_loader["loss"] == pytest.approx(reference_loss(llama, rows, max_length=512), rel=1e-6)
    padded = [
        {"input_ids": torch.tensor([[*s, 0, 0] for s in rows]), "attention_mask": torch.tensor([[1] * 5 + [0] * 2] * 7)}
    ]
    from_dicts = evaluate(LanguageModelProbe(dataloader=padded), Holder(llama))
    assert from_dicts["loss"] == pytest.approx(from_loader["loss"], rel=1e-5)


def test_lm_probe_limit_batches_keeps_the_first_batches(llama: nn.Module) -> None:
    limited = evaluate(LanguageModelProbe(token_ids=SEQUENCES, batch_size=2, limit_batches=1), Holder(llama))
    assert limited["loss"] == pytest.approx(reference_loss(llama, SEQUENCES[:2], max_length=512), rel=1e-6)
    half = LanguageModelProbe(token_ids=SEQUENCES, batch_size=2, limit_batches=0.5)
    evaluate(half, Holder(llama))
    assert half.num_batches == 2  # 4 batches of <= 2 sequences, half of them


def test_lm_probe_splits_batches_across_ranks_so_that_each_sequence_is_scored_once(llama: nn.Module) -> None:
    probe = LanguageModelProbe(token_ids=SEQUENCES, batch_size=2)
    totals = []
    for rank in (0, 1):
        trainer = SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0)
        evaluate(probe, Holder(llama), trainer)
        assert probe._loss is not None
        totals.append((probe._loss.numerator.item(), probe._loss.denominator.item()))  # this rank's unsynced sums
    full = evaluate(LanguageModelProbe(token_ids=SEQUENCES, batch_size=2), Holder(llama))
    assert totals[0][1] + totals[1][1] == sum(len(s) - 1 for s in SEQUENCES)
    assert 0 < totals[0][1] < sum(len(s) - 1 for s in SEQUENCES)
    assert (totals[0][0] + totals[1][0]) / (totals[0][1] + totals[1][1]) == pytest.approx(full["loss"], rel=1e-6)


def test_rank_share_covers_every_item_exactly_once() -> None:
    shares = [set(rank_share(11, SimpleNamespace(world_size=3, global_rank=r))) for r in range(3)]
    assert set().union(*shares) == set(range(11)) and sum(len(s) for s in shares) == 11


def test_rank_batches_gives_every_rank_as_many_batches_padding_with_a_discarded_first_batch() -> None:
    batches = ["b0", "b1", "b2", "b3", "b4"]
    shares = [rank_batches(batches, SimpleNamespace(world_size=3, global_rank=r)) for r in range(3)]
    assert shares == [
        [("b0", True), ("b3", True)],
        [("b1", True), ("b4", True)],
        [("b2", True), ("b0", False)],
    ]
    assert rank_batches(batches, None, limit=2) == [("b0", True), ("b1", True)]
    assert rank_batches([], SimpleNamespace(world_size=2, global_rank=1)) == []


def test_run_batches_prepares_forwards_and_consumes_each_batch_in_order() -> None:
    calls: list[tuple[Any, ...]] = []
    forwards = run_batches(
        [1, 2, 3],
        None,
        forward=lambda inputs: calls.append(("forward", inputs)) or inputs * 10,
        prepare=lambda batch: calls.append(("prepare", batch)) or batch + 1,
        consume=lambda inputs, output: calls.append(("consume", inputs, output)),
    )
    assert forwards == 3
    assert calls[:3] == [("prepare", 1), ("forward", 2), ("consume", 2, 20)] and len(calls) == 9
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=2)  # not a sequence: iterated step by step
    seen: list[list[int]] = []
    assert run_batches(loader, None, forward=lambda b: seen.append(b[0].tolist()), limit=2) == 2
    assert seen == [[0, 1], [2, 3]]


def test_run_batches_fails_before_the_forward_when_a_batch_cannot_be_prepared() -> None:
    def prepare(batch: int) -> int:
        if batch == 2:
            raise ValueError("batch 2 is unreadable")
        return batch

    run: list[int] = []
    with pytest.raises(ValueError, match="batch 2 is unreadable"):
        run_batches([1, 2, 3], None, forward=run.append, prepare=prepare)
    assert run == [1]
    with pytest.raises(KeyError, match="logits"):
        run_batches([1, 2, 3], None, forward=run.append, consume=lambda inputs, output: {}["logits"])


def test_probes_refuse_a_model_sharded_from_outside_before_any_forward() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    holder = Holder(LlamaForCausalLM(config))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(holder.model.model.layers[0], mesh=mesh)
        fully_shard(holder, mesh=mesh)  # the root on the LightningModule: calling holder.model gathers nothing
        question = {"context_ids": [1, 2, 3], "choice_ids": [[4], [5]], "label": 0}
        probes = [
            LanguageModelProbe(token_ids=SEQUENCES),
            MultipleChoiceProbe(examples=[question]),
            AccuracyProbe(dataloader=[{"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([0])}]),
        ]
        for probe in probes:
            with pytest.raises(MisconfigurationException, match=r"model\.embed_tokens\.weight.*apply `fully_shard`"):
                probe.setup(single_process(), holder)  # type: ignore[arg-type]
    finally:
        dist.destroy_process_group()


def test_lm_probe_refuses_an_empty_dataloader_batch_before_the_forward(llama: nn.Module) -> None:
    probe = LanguageModelProbe(dataloader=[torch.tensor(SEQUENCES[0][:5])[None], torch.zeros(0, 5, dtype=torch.long)])
    with pytest.raises(MisconfigurationException, match=r"input_ids of shape \(0, 5\).*Drop empty batches"):
        evaluate(probe, Holder(llama))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"token_ids": SEQUENCES, "texts": ["a"]}, "exactly one of"),
        ({"texts": "a b c"}, "list of strings"),
        ({"token_ids": SEQUENCES, "limit_batches": 0}, "limit_batches=0"),
        ({"token_ids": SEQUENCES, "limit_batches": 1.5}, "limit_batches=1.5"),
        ({"token_ids": SEQUENCES, "max_length": 1}, "max_length=1"),
        ({"token_ids": SEQUENCES, "name": "a/b"}, "Invalid probe name"),
    ],
)
def test_lm_probe_rejects_bad_arguments_with_the_fix(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        LanguageModelProbe(**kwargs)


def test_lm_probe_refuses_an_empty_reference_set(llama: nn.Module, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(MisconfigurationException, match="reference set is empty"):
        evaluate(LanguageModelProbe(files=empty, tokenizer=word_tokenizer()), Holder(llama))
    with pytest.raises(MisconfigurationException, match="reference set is empty"):
        evaluate(LanguageModelProbe(token_ids=[[5]]), Holder(llama))
    with pytest.raises(MisconfigurationException, match="no reference token was scored"):
        evaluate(LanguageModelProbe(dataloader=[]), Holder(llama))


def test_lm_probe_asks_for_a_tokenizer_when_given_text_without_one(llama: nn.Module) -> None:
    with pytest.raises(MisconfigurationException, match="no tokenizer"):
        evaluate(LanguageModelProbe(texts=["a b c"]), Holder(llama))


def test_lm_probe_names_a_missing_file(llama: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="does not exist"):
        evaluate(LanguageModelProbe(files=tmp_path / "nope.txt"), Holder(llama))


def test_find_language_model_prefers_the_model_attribute(llama: nn.Module) -> None:
    assert find_language_model(Holder(llama)) is llama
    plain = nn.Linear(2, 2)
    assert find_language_model(plain) is plain


# ---------------------------------------------------------------------- accuracy probes
class FirstTokenClassifier(nn.Module):
    """Predicts class ``input_ids[:, 0] % 3`` with certainty: accuracy is known from the data."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return nn.functional.one_hot(input_ids[:, 0] % 3, 3).float()


def test_accuracy_probe_counts_argmax_hits(tmp_path: Path) -> None:
    examples = [{"input_ids": [i, 1, 2], "label": i % 3 if i < 6 else (i + 1) % 3} for i in range(8)]  # 6 of 8 right
    values = evaluate(AccuracyProbe(examples=examples, batch_size=3), Holder(FirstTokenClassifier()))
    assert values == {"accuracy": pytest.approx(6 / 8)}
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps({"text": "b c", "y": 1}) + "\n" for _ in range(4)))  # 'b' is id 5: 5 % 3 = 2
    tokenized = evaluate(
        AccuracyProbe(files=path, label_key="y", tokenizer=word_tokenizer()), Holder(FirstTokenClassifier())
    )
    assert tokenized == {"accuracy": 0.0}


def test_accuracy_probe_accepts_input_label_pairs_for_any_model() -> None:
    inputs = torch.tensor([[0, 9], [1, 9], [2, 9], [4, 9]])
    loader = DataLoader(TensorDataset(inputs, torch.tensor([0, 1, 0, 1])), batch_size=2)
    values = evaluate(AccuracyProbe(dataloader=loader), Holder(FirstTokenClassifier()))
    assert values == {"accuracy": pytest.approx(3 / 4)}  # predictions 0, 1, 2, 1


def test_accuracy_probe_explains_sequence_logits(llama: nn.Module) -> None:
    with pytest.raises(MisconfigurationException, match="MultipleChoiceProbe"):
        evaluate(AccuracyProbe(examples=[{"input_ids": [1, 2], "label": 0}]), Holder(llama))


class FixedDistributionLM(nn.Module):
    """Every position predicts the same distribution: p(5) = 0.5, p(6) = 0.3, the rest share 0.2."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        probs = torch.full((10,), 0.2 / 8)
        probs[5], probs[6] = 0.5, 0.3
        return probs.log().expand(*input_ids.shape, 10)


def test_multiple_choice_scores_the_continuation_and_normalises_by_its_length() -> None:
    # choice [5, 5, 5]: log-likelihood 3 log 0.5 = -2.08 < log 0.3 = -1.20, but per token -0.69 > -1.20.
    examples = [
        {"context_ids": [1, 2], "choice_ids": [[5, 5, 5], [6]], "label": 0},  # acc wrong, acc_norm right
        {"context_ids": [1], "choice_ids": [[6], [5]], "label": 1},  # both right
    ]
    values = evaluate(MultipleChoiceProbe(examples=examples, batch_size=1), Holder(FixedDistributionLM()))
    assert values == {"acc": pytest.approx(0.5), "acc_norm": pytest.approx(1.0)}


def test_multiple_choice_tokenizes_choices_after_the_delimiter(llama: nn.Module) -> None:
    tokenizer = word_tokenizer()
    examples = [{"context": "a b", "choices": ["c", "d e"], "label": 1}]
    probe = MultipleChoiceProbe(examples=examples, tokenizer=tokenizer)
    probe.setup(single_process(), Holder(llama))  # type: ignore[arg-type]
    assert probe._batches[0][0] == ([4, 5], [[6], [7, 8]], 1)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"context_ids": [1], "choice_ids": [[2], [3]], "label": 2}, "index of the right choice"),
        ({"context_ids": [], "choice_ids": [[2]], "label": 0}, "non-empty context"),
        ({"question": "a"}, "needs 'context' and 'choices'"),
    ],
)
def test_multiple_choice_rejects_malformed_records(record: dict[str, Any], message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        evaluate(MultipleChoiceProbe(examples=[record]), Holder(FixedDistributionLM()))


# ---------------------------------------------------------------------- callable probe
def test_callable_probe_reports_a_scalar_as_value_and_a_dict_as_is() -> None:
    scalar = CallableProbe(lambda trainer, module: 0.25, higher_is_better=True, name="custom")
    assert scalar.evaluate(None, None) == {"value": 0.25}  # type: ignore[arg-type]
    assert scalar.higher_is_better == {"value": True}
    several = CallableProbe(lambda trainer, module: {"a": 1.0, "b": 2.0}, higher_is_better=False)
    assert several.evaluate(None, None) == {"a": 1.0, "b": 2.0}  # type: ignore[arg-type]
    assert several.higher_is_better == {"value": False, "a": False, "b": False}
    per_metric = CallableProbe(lambda trainer, module: {"a": 1.0}, higher_is_better={"a": True})
    assert per_metric.higher_is_better == {"a": True}


def test_callable_probe_imports_a_function_by_path() -> None:
    probe = CallableProbe("operator.add", higher_is_better=True)  # any function of two arguments
    assert probe.fn is operator.add
    with pytest.raises(MisconfigurationException, match=r"fn='math\.nope' is invalid.*Cannot import it"):
        CallableProbe("math.nope", higher_is_better=True)


def test_callable_probe_requires_directions() -> None:
    with pytest.raises(MisconfigurationException, match=r"True \(higher is better\) or"):
        CallableProbe(lambda t, m: 1.0, higher_is_better={"a": "yes"})  # type: ignore[dict-item]
    with pytest.raises(MisconfigurationException, match="must be True/False"):
        CallableProbe(lambda t, m: 1.0, higher_is_better=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- report writer
def test_format_value_keeps_four_significant_digits_and_shows_non_finite() -> None:
    assert format_value(3.14159265) == "3.142"
    assert format_value(1.5e-5) == "1.500e-05"
    assert format_value(float("nan")) == "nan"
    assert format_value(None) == "-"
    assert format_value(12) == "12"


def test_tables_render_for_markdown_and_console() -> None:
    table = Table("T", ["name", "x"], [["a", 1.0], ["b|c", float("inf")]])
    assert markdown_table(table).splitlines()[2:] == ["| name | x |", "|---|---|", "| a | 1 |", "| b\\|c | inf |"]
    lines = console_table(table).splitlines()
    assert lines[0] == "T" and lines[2].startswith("name") and lines[3].startswith("a") is False


def sections() -> list[ReportSection]:
    return [
        ReportSection(
            key="forgetting",
            title="F",
            records=[{"step": 0, "value": float("nan")}],
            summary=[Table("S", ["a"], [[1.0]])],
            curves=[Curve("c", {"v": [(0, 1.0), (5, 2.0)]}, baseline=1.0)],
        )
    ]


def test_write_report_writes_strict_json_markdown_and_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = write_report(tmp_path, sections(), meta={"global_step": 5})
    assert sorted(paths) == ["json", "md", "png"]
    data = json.loads(paths["json"].read_text())  # strict: NaN became null
    assert data["forgetting"]["measurements"] == [{"step": 0, "value": None}]
    assert data["meta"] == {"global_step": 5}
    assert "### S" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_write_report_skips_the_png_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    paths = write_report(tmp_path, sections())
    assert sorted(paths) == ["json", "md"]
    assert not (tmp_path / "forgetting_report.png").exists()


def test_probes_do_not_consume_the_global_rng(llama: nn.Module) -> None:
    torch.manual_seed(3)
    random.seed(3)
    evaluate(LanguageModelProbe(token_ids=SEQUENCES), Holder(llama))
    after = (torch.rand(1).item(), random.random())
    torch.manual_seed(3)
    random.seed(3)
    assert after == (torch.rand(1).item(), random.random())
