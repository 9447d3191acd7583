"""The second scenario, ``disjoint``: a task whose words are no fact's words, its base model, data and probes."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lit_mofo.modules.causal_lm import CausalLMModule
from lit_mofo.scenario import SCENARIOS, ScenarioDataModule, TaskProbe, get_scenario
from lit_mofo.scenario.base_model import BaseModelRecipe, base_model_path
from lit_mofo.scenario.corpus import generate_facts
from lit_mofo.scenario.probes import evaluate_knowledge, evaluate_task
from lit_mofo.scenario.scenarios import scenario_for_model
from lit_mofo.scenario.task import TaskSpec, generate_task
from lit_mofo.scenario.vocab import ENTITY_POOL, load_tokenizer

TOKENIZER = load_tokenizer()
DISJOINT = SCENARIOS["disjoint"]
OVERLAP = SCENARIOS["overlap"]


def fact_subjects() -> set[str]:
    return {fact.entity for fact in generate_facts(DISJOINT.recipe.knowledge)}


def fact_words() -> set[str]:
    return {word for fact in generate_facts(DISJOINT.recipe.knowledge) for word in fact.sentence.split()}


# ---- the design --------------------------------------------------------------------------------------------------


def test_the_disjoint_tasks_words_are_no_facts_subject_nor_any_word_of_a_fact() -> None:
    for kind in ("cipher", "repeat", "reverse"):
        words = set(DISJOINT.task(kind).words)
        assert len(words) == TaskSpec.num_words
        assert not words & fact_subjects()
        assert not words & fact_words()
        assert DISJOINT.overlap(kind) == set()
    cipher = DISJOINT.task().cipher()
    assert set(cipher.values()) == set(DISJOINT.task().words)  # the answers' words too
    # The first scenario, for contrast: its task is written in the names of half the world's entities.
    assert set(OVERLAP.task().words) <= fact_subjects()
    assert len(OVERLAP.overlap()) == len(fact_subjects()) // 2


def test_every_problem_of_the_disjoint_task_avoids_the_facts_words() -> None:
    train, held_out = generate_task(DISJOINT.task(), num_train=512, num_eval=256)
    for example in train + held_out:
        words = set(example.prompt.split()[2:-1]) | set(example.response.split())
        assert words and not words & fact_words(), example


def test_the_first_scenario_is_unchanged() -> None:
    assert OVERLAP.task() == TaskSpec()
    assert OVERLAP.recipe == BaseModelRecipe()
    assert BaseModelRecipe().key() == "e2dda26b8fcee51d"  # adding `first_word` kept the cached model's key
    assert OVERLAP.model == "scenario:base"


def test_the_disjoint_base_model_differs_only_in_the_copying_skills_words() -> None:
    recipe, default = DISJOINT.recipe, BaseModelRecipe()
    assert recipe.skill == TaskSpec(kind="repeat", min_length=2, max_length=5, first_word=128)
    assert recipe.knowledge == default.knowledge
    assert {**recipe.to_dict(), "skill": None} == {**default.to_dict(), "skill": None}
    assert recipe.key() != default.key()
    assert BaseModelRecipe.from_dict(recipe.to_dict()) == recipe


def test_task_spec_first_word_selects_the_pool_and_is_validated() -> None:
    assert TaskSpec(first_word=128).words == ENTITY_POOL[128:192]
    assert TaskSpec(num_words=128, first_word=128).words == ENTITY_POOL[128:]
    with pytest.raises(ValueError, match=r"first_word=200 with num_words=64.*\[0, 192\]"):
        TaskSpec(first_word=200)
    with pytest.raises(ValueError, match="first_word=-1"):
        TaskSpec(first_word=-1)


def test_scenario_names_are_validated_everywhere() -> None:
    assert get_scenario("disjoint") is DISJOINT
    with pytest.raises(ValueError, match=r"scenario='nope' is not an embedded scenario; choose one of \['overlap'"):
        get_scenario("nope")
    with pytest.raises(MisconfigurationException, match="ScenarioDataModule: scenario='nope'"):
        ScenarioDataModule(scenario="nope")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"TaskProbe\(name='task'\): scenario='nope'"):
        TaskProbe(scenario="nope")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"model='scenario:nope' names no embedded scenario"):
        CausalLMModule(model="scenario:nope")
    assert scenario_for_model("scenario:disjoint") is DISJOINT
    assert scenario_for_model("scenario:overlap") is OVERLAP
    assert scenario_for_model("scenario:base") is OVERLAP
    assert scenario_for_model("gpt2") is None


def test_path_command_knows_the_disjoint_base_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lit_mofo.scenario.__main__ import main

    assert main(["path", "--scenario", "disjoint", "--cache-dir", str(tmp_path)]) == 1
    out, _ = capsys.readouterr()
    assert out.strip() == str(tmp_path / "scenario" / f"base-{DISJOINT.recipe.key()}")


# ---- data and probes ---------------------------------------------------------------------------------------------


def test_data_module_writes_the_disjoint_problems_and_validates_on_the_probes_problems() -> None:
    data = ScenarioDataModule(num_train=32, num_val=16, batch_size=8, scenario="disjoint")
    assert data.spec == DISJOINT.task()
    data.setup("fit")
    words = set(DISJOINT.task().words)
    batch = next(iter(data.train_dataloader()))
    for row in batch["input_ids"].tolist():
        tokens = TOKENIZER.convert_ids_to_tokens(row)
        assert tokens[:3] == ["<bos>", "cipher", ":"] and set(tokens[3:6]) <= words and set(tokens[7:10]) <= words
    _, held_out = generate_task(DISJOINT.task(), num_train=0, num_eval=16)
    expected = [TOKENIZER(f"{e.prompt} {e.response}")["input_ids"] + [TOKENIZER.eos_token_id] for e in held_out]
    assert [example.input_ids for example in data.val_examples] == expected


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


def sequences(spec: TaskSpec, num: int) -> list[list[int]]:
    _, examples = generate_task(spec, num_train=0, num_eval=num)
    return [TOKENIZER(f"{e.prompt} {e.response}")["input_ids"] + [TOKENIZER.eos_token_id] for e in examples]


def test_task_probe_scores_the_disjoint_task() -> None:
    probe = TaskProbe(scenario="disjoint", num_examples=32, batch_size=8)
    assert probe.spec == DISJOINT.task()
    trainer = SimpleNamespace(world_size=1, global_rank=0)
    knows_disjoint = Wrapper(OracleLM(sequences(DISJOINT.task(), 32)))
    knows_overlap = Wrapper(OracleLM(sequences(OVERLAP.task(), 32)))
    assert probe.evaluate(trainer, knows_disjoint)["exact_match"] == 1.0  # type: ignore[arg-type]
    assert probe.evaluate(trainer, knows_overlap)["exact_match"] == 0.0  # type: ignore[arg-type]
    assert TaskProbe(num_examples=32).evaluate(trainer, knows_overlap)["exact_match"] == 1.0  # type: ignore[arg-type]
    copying = TaskProbe(kind="repeat", scenario="disjoint", num_examples=32)
    assert copying.spec.words == DISJOINT.task().words


# ---- the real base model (built into the default cache on first use: ~2 min on 2 CPU cores, 5 on a loaded one) ---


@pytest.mark.slow
def test_the_disjoint_base_model_knows_the_facts_copies_its_words_and_learns_the_cipher() -> None:
    module = CausalLMModule(
        model=DISJOINT.model, optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0), schedule="cosine"
    )
    assert Path(module.model.name_or_path) == base_model_path(DISJOINT.recipe)
    knowledge = evaluate_knowledge(module.model)
    assert knowledge["accuracy"] > 0.95  # the same facts as the first scenario's base model
    assert evaluate_task(module.model, DISJOINT.task())["exact_match"] == 0.0  # cannot do the task before fine-tuning
    # It copies lists of the task's words (the pre-training skill: 2-5 words; 0.65 on the cache built here) and
    # not lists of the first scenario's words, which it was never taught to copy.
    assert evaluate_task(module.model, DISJOINT.recipe.skill)["exact_match"] > 0.5
    assert evaluate_task(module.model, OVERLAP.recipe.skill)["exact_match"] == 0.0

    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=200,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module, ScenarioDataModule(batch_size=32, num_val=0, scenario="disjoint"))
    finally:
        torch.set_num_threads(previous_threads)
    assert evaluate_task(module.model, DISJOINT.task(), num_examples=64)["exact_match"] > 0.8
