"""The scenario's task sequence for continual fine-tuning: new task kinds and word pools, their data and probes."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lit_mofo.scenario import (
    SCENARIOS,
    TASK_KINDS,
    TASK_SEQUENCE,
    WORD_POOLS,
    ScenarioDataModule,
    TaskProbe,
    TaskSpec,
    evaluate_task,
    generate_task,
    get_scenario,
    load_tokenizer,
    task_arguments,
)
from lit_mofo.scenario.task import TaskExample
from lit_mofo.scenario.vocab import ENTITY_POOL, RELATION_VALUES, VOCABULARY

TOKENIZER = load_tokenizer()
VALUES = tuple(value for values in RELATION_VALUES.values() for value in values)


def sequence(example: TaskExample) -> list[int]:
    return TOKENIZER(f"{example.prompt} {example.response}")["input_ids"] + [TOKENIZER.eos_token_id]


def listed_words(example: TaskExample) -> tuple[str, ...]:
    """The word list of a problem: the words between ``:`` and ``=``."""
    words = example.prompt.split()
    return tuple(words[words.index(":") + 1 : -1])


def digest(examples: list[TaskExample]) -> str:
    return hashlib.sha256(json.dumps([[e.prompt, e.response] for e in examples]).encode()).hexdigest()[:16]


class OracleLM(nn.Module):
    """Logit 10 on the token that follows the prefix in any of the given sequences, 0 elsewhere."""

    def __init__(self, sequences: list[list[int]]) -> None:
        super().__init__()
        self.next_token = {tuple(s[:end]): s[end] for s in sequences for end in range(1, len(s))}
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, len(TOKENIZER))
        for row, ids in enumerate(input_ids.tolist()):
            for position in range(len(ids)):
                token = self.next_token.get(tuple(ids[: position + 1]))
                if token is not None:
                    logits[row, position, token] = 10.0
        return SimpleNamespace(logits=logits)


class Wrapper(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def fake_trainer() -> Any:
    return SimpleNamespace(world_size=1, global_rank=0)


# ---- the existing tasks and the cached base models are untouched ---------------------------------------------------


def test_the_base_models_training_problems_and_the_cipher_are_unchanged() -> None:
    """Digests of the problems before task kinds and pools were added: the base models' copying skill (what they
    were pre-trained on, so the cached models stay valid) and the scenario's fine-tuning tasks."""
    for name, expected in (("overlap", "825de8e6a7d92f7e"), ("disjoint", "12a9f24ecd4a72fb")):
        recipe = SCENARIOS[name].recipe
        train, _ = generate_task(recipe.skill, num_train=recipe.steps * recipe.skill_batch_size)
        assert digest(train) == expected
    train, held_out = generate_task(TaskSpec(), num_train=8192, num_eval=256)
    assert (digest(train), digest(held_out)) == ("8f5b782c6daf490d", "333bf1d9bcfc4f7e")
    _, held_out = generate_task(TaskSpec(kind="reverse", min_length=2, max_length=2), num_train=0, num_eval=256)
    assert digest(held_out) == "6e077944d96c9b36"


def test_spec_dicts_name_the_pool_only_when_it_is_not_the_names() -> None:
    """The base models' cache keys hash ``TaskSpec.to_dict()``: a names spec keeps its dict from before pools."""
    assert TaskSpec().to_dict() == {
        "kind": "cipher",
        "num_words": 64,
        "min_length": 3,
        "max_length": 3,
        "seed": 0,
        "first_word": 0,
    }
    values = TASK_SEQUENCE["value_cipher"]
    assert values.to_dict()["pool"] == "values"
    for spec in (*TASK_SEQUENCE.values(), TaskSpec(first_word=128)):
        assert TaskSpec(**spec.to_dict()) == spec  # type: ignore[arg-type]


# ---- the sequence's tasks ------------------------------------------------------------------------------------------


def test_the_sequence_has_four_distinct_tasks_in_order() -> None:
    assert list(TASK_SEQUENCE) == ["cipher", "reverse", "value_cipher", "reverse_cipher"]
    assert TASK_SEQUENCE["cipher"] == get_scenario("overlap").task()  # the scenario's fine-tuning task comes first
    prompts = {}
    for name, spec in TASK_SEQUENCE.items():
        train, held_out = generate_task(spec, num_train=512)
        prompts[name] = {e.prompt for e in train + held_out}
    names = list(prompts)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not prompts[first] & prompts[second], (first, second)  # no problem belongs to two tasks


@pytest.mark.parametrize("name", list(TASK_SEQUENCE))
def test_each_task_is_seeded_and_its_training_and_evaluation_sets_share_no_list(name: str) -> None:
    spec = TASK_SEQUENCE[name]
    train, held_out = generate_task(spec, num_train=2000, num_eval=256)
    assert (train, held_out) == generate_task(spec, num_train=2000, num_eval=256)
    assert held_out == generate_task(spec, num_train=10, num_eval=256)[1]
    assert len({e.prompt for e in held_out}) == 256
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    other_seed = TaskSpec(**{**spec.to_dict(), "seed": 1})  # type: ignore[arg-type]
    assert generate_task(other_seed, num_train=0, num_eval=256)[1] != held_out
    for example in train[:200] + held_out:
        words = listed_words(example)
        assert spec.min_length <= len(words) <= spec.max_length and set(words) <= set(spec.words)
        assert example.prompt.startswith(f"{spec.instruction} : ")


def test_reverse_answers_are_the_words_in_reverse_order() -> None:
    _, held_out = generate_task(TASK_SEQUENCE["reverse"], num_train=0, num_eval=256)
    for example in held_out:
        assert example.response.split() == list(reversed(listed_words(example)))


def test_value_cipher_is_a_derangement_of_the_relation_values_applied_word_by_word() -> None:
    spec = TASK_SEQUENCE["value_cipher"]
    assert spec.words == VALUES and len(VALUES) == 56
    cipher = spec.cipher()
    assert sorted(cipher) == sorted(cipher.values()) == sorted(VALUES)
    assert all(word != code for word, code in cipher.items())
    assert cipher != dict(zip(VALUES, [TaskSpec().cipher()[name] for name in ENTITY_POOL[:56]], strict=True))
    example = spec.example(("paris", "cat", "paris"))
    assert example.prompt == "cipher : paris cat paris ="
    assert example.response == f"{cipher['paris']} {cipher['cat']} {cipher['paris']}"
    _, held_out = generate_task(spec, num_train=0, num_eval=256)
    for example in held_out:
        assert example.response.split() == [cipher[word] for word in listed_words(example)]


def test_reverse_cipher_composes_the_cipher_and_the_reversal_of_the_earlier_stages() -> None:
    spec = TASK_SEQUENCE["reverse_cipher"]
    assert spec.instruction == "reverse cipher" and spec.cipher() == TASK_SEQUENCE["cipher"].cipher()
    cipher = spec.cipher()
    assert spec.example(("brafu", "faxte")) == TaskExample(
        prompt="reverse cipher : brafu faxte =", response=f"{cipher['faxte']} {cipher['brafu']}"
    )
    _, held_out = generate_task(spec, num_train=0, num_eval=256)
    for example in held_out:
        words = listed_words(example)
        assert words != words[::-1]  # no palindrome: a model that only enciphers (or only reverses) scores 0
        assert example.response.split() == [cipher[word] for word in reversed(words)]
        assert example.response != " ".join(cipher[word] for word in words)
        assert example.response != " ".join(reversed(words))


def test_every_task_is_written_in_the_shipped_vocabulary() -> None:
    """No task adds a token: the tokenizer (and with it the base models' embeddings) keeps its size."""
    assert len(TOKENIZER) == len(VOCABULARY) == 331
    for kind in TASK_KINDS:
        for pool in WORD_POOLS:
            spec = TaskSpec(kind=kind, pool=pool, num_words=56, min_length=2, max_length=3)  # type: ignore[arg-type]
            assert spec.vocabulary <= set(VOCABULARY), (kind, pool)
            train, held_out = generate_task(spec, num_train=64, num_eval=64)
            for example in train + held_out:
                text = f"{example.prompt} {example.response}"
                ids = TOKENIZER(text)["input_ids"]
                assert TOKENIZER.unk_token_id not in ids and len(ids) == len(text.split()) + 1
                assert TOKENIZER.decode(ids, skip_special_tokens=True) == text


def test_bad_task_selections_are_refused_naming_the_valid_values() -> None:
    with pytest.raises(ValueError, match=r"kind='sort'.*\('cipher', 'repeat', 'reverse', 'reverse_cipher'\)"):
        TaskSpec(kind="sort")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pool='letters' is not a word pool.*\('names', 'values'\)"):
        TaskSpec(pool="letters")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_words=64 is outside \[2, 56\]: the values pool has 56 words"):
        TaskSpec(pool="values")
    with pytest.raises(ValueError, match=r"first_word=10 with num_words=50.*values pool.*\[0, 6\]"):
        TaskSpec(pool="values", num_words=50, first_word=10)
    with pytest.raises(MisconfigurationException, match=r"ScenarioDataModule: pool='letters'.*'names', 'values'"):
        ScenarioDataModule(pool="letters")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"ScenarioDataModule: kind='sort'.*'reverse_cipher'"):
        ScenarioDataModule(kind="sort")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"TaskProbe\(name='task'\): num_words=64 is outside \[2, 56\]"):
        TaskProbe(pool="values")
    with pytest.raises(MisconfigurationException, match=r"TaskProbe\(name='task'\): kind='sort'.*'reverse_cipher'"):
        TaskProbe(kind="sort")  # type: ignore[arg-type]


def test_the_values_pool_is_the_same_in_every_scenario_and_the_names_follow_the_scenario() -> None:
    overlap, disjoint = get_scenario("overlap"), get_scenario("disjoint")
    assert disjoint.task(pool="values", num_words=56) == overlap.task(pool="values", num_words=56)
    assert disjoint.task("reverse_cipher").words == ENTITY_POOL[128:192]
    values = ScenarioDataModule(**task_arguments(TASK_SEQUENCE["value_cipher"], "disjoint"))
    assert values.spec == TASK_SEQUENCE["value_cipher"]


def test_task_arguments_select_the_spec_in_the_data_module_and_the_probe() -> None:
    for name, spec in TASK_SEQUENCE.items():
        arguments = task_arguments(spec)
        assert ScenarioDataModule(**arguments).spec == spec
        assert TaskProbe(**arguments, name=name).spec == spec
    disjoint = get_scenario("disjoint").task("reverse", min_length=2, max_length=2)
    assert ScenarioDataModule(**task_arguments(disjoint, "disjoint")).spec == disjoint
    with pytest.raises(
        ValueError, match=r"spec.first_word=0 is not the first word scenario='disjoint' chooses.*\(128\)"
    ):
        task_arguments(TASK_SEQUENCE["reverse"], "disjoint")
    with pytest.raises(TypeError, match="spec='cipher' is not a TaskSpec"):
        task_arguments("cipher")  # type: ignore[arg-type]


# ---- data module and probe on each task ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASK_SEQUENCE))
def test_the_data_module_trains_on_the_answers_and_validates_on_the_probes_problems(name: str) -> None:
    spec = TASK_SEQUENCE[name]
    data = ScenarioDataModule(**task_arguments(spec), num_train=64, num_val=16, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    prompt_length = 1 + len(spec.instruction.split()) + 1 + spec.max_length + 1  # <bos> kind : words =
    assert batch["input_ids"].shape == (8, prompt_length + spec.max_length + 1)  # + answer <eos>
    assert (batch["labels"][:, :prompt_length] == -100).all()
    assert (batch["labels"][:, prompt_length:] == batch["input_ids"][:, prompt_length:]).all()
    _, held_out = generate_task(spec, num_train=0, num_eval=16)
    assert [example.input_ids for example in data.val_examples] == [sequence(e) for e in held_out]


@pytest.mark.parametrize("name", list(TASK_SEQUENCE))
def test_the_probe_scores_each_task_by_exact_match(name: str) -> None:
    """An oracle of the task's answers scores 1, with two answers broken 62/64; an oracle of another operation
    over the same prompts (the earlier stages' skills) scores 0."""
    spec = TASK_SEQUENCE[name]
    _, held_out = generate_task(spec, num_train=0, num_eval=64)
    sequences = [sequence(e) for e in held_out]
    probe = TaskProbe(**task_arguments(spec), num_examples=64, batch_size=10, name=name)
    assert probe.evaluate(fake_trainer(), Wrapper(OracleLM(sequences)))["exact_match"] == 1.0
    sequences[3][-1] = TOKENIZER.convert_tokens_to_ids(".")  # does not stop after the answer
    sequences[7][-2] = sequences[7][-3] if sequences[7][-2] != sequences[7][-3] else TOKENIZER.unk_token_id
    metrics = probe.evaluate(fake_trainer(), Wrapper(OracleLM(sequences)))
    assert metrics["exact_match"] == pytest.approx(62 / 64)
    assert evaluate_task(OracleLM(sequences), spec, num_examples=64, batch_size=10) == pytest.approx(metrics)

    other_kind = {"cipher": "repeat", "reverse": "repeat", "value_cipher": "repeat", "reverse_cipher": "cipher"}[name]
    other = TaskSpec(**{**spec.to_dict(), "kind": other_kind})  # type: ignore[arg-type]
    wrong = [sequence(TaskExample(e.prompt, " ".join(other.answer(listed_words(e))))) for e in held_out]
    assert probe.evaluate(fake_trainer(), Wrapper(OracleLM(wrong)))["exact_match"] == 0.0


# ---- the real base model -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_base_model_cannot_do_any_task_of_the_sequence() -> None:
    """The cached ``scenario:base`` (built on first use, ~2-3 min on 2 CPU cores; then ~5 s): its embeddings cover
    exactly the shipped vocabulary, and it scores ~0 exact match on every stage (measured: 0.0 each)."""
    from transformers import AutoModelForCausalLM

    from lit_mofo.scenario.base_model import base_model_path

    model = AutoModelForCausalLM.from_pretrained(base_model_path())
    assert model.get_input_embeddings().num_embeddings == len(TOKENIZER)
    for name, spec in TASK_SEQUENCE.items():
        assert evaluate_task(model, spec)["exact_match"] <= 0.02, name
