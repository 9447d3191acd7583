"""The embedded scenario: deterministic world and tasks, shipped tokenizer, base-model cache, probes, data module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lit_mofo.probes.distribution import rank_batches
from lit_mofo.scenario import base_model as base_model_module
from lit_mofo.scenario.base_model import METADATA_FILE, BaseModelRecipe, base_model_path, build_base_model
from lit_mofo.scenario.corpus import KnowledgeSpec, generate_facts
from lit_mofo.scenario.data import ScenarioDataModule
from lit_mofo.scenario.probes import KnowledgeProbe, TaskProbe, evaluate_knowledge, evaluate_task
from lit_mofo.scenario.task import TaskSpec, generate_task
from lit_mofo.scenario.vocab import (
    ENTITY_POOL,
    RELATION_VALUES,
    TOKENIZER_DIR,
    VOCABULARY,
    build_tokenizer,
    load_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = load_tokenizer()
VOCAB = len(TOKENIZER)

TINY_RECIPE = BaseModelRecipe(
    knowledge=KnowledgeSpec(num_entities=8),
    skill=TaskSpec(kind="repeat", num_words=8, min_length=2, max_length=3),
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    steps=3,
    fact_batch_size=8,
    skill_batch_size=4,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


class OracleLM(nn.Module):
    """Next-token logits from a table of sequences: logit 10 on the token that follows the prefix, 0 elsewhere."""

    def __init__(self, sequences: list[list[int]], vocab_size: int = VOCAB) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.next_token: dict[tuple[int, ...], int] = {}
        for sequence in sequences:
            for end in range(1, len(sequence)):
                self.next_token[tuple(sequence[:end])] = sequence[end]
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
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


def fake_trainer(world_size: int = 1, rank: int = 0) -> Any:
    return SimpleNamespace(world_size=world_size, global_rank=rank)


def fact_sequence(sentence: str) -> list[int]:
    return TOKENIZER(sentence)["input_ids"] + [TOKENIZER.eos_token_id]


# ---- world, tasks, tokenizer ---------------------------------------------------------------------------------------


def test_facts_are_deterministic_per_seed_and_balanced_per_relation() -> None:
    facts = generate_facts()
    assert facts == generate_facts(KnowledgeSpec())
    assert len(facts) == 128 * 4
    assert facts[0].sentence == f"{ENTITY_POOL[0]} lives in {facts[0].value} ."
    assert generate_facts(KnowledgeSpec(seed=1)) != facts
    for relation, values in RELATION_VALUES.items():
        counts = Counter(f.value for f in facts if f.relation == relation)
        assert set(counts) == set(values)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_knowledge_spec_rejects_unknown_relations_and_too_many_entities() -> None:
    with pytest.raises(ValueError, match=r"num_entities=300 is outside \[1, 256\]"):
        KnowledgeSpec(num_entities=300)
    with pytest.raises(ValueError, match=r"relations=.*'age'"):
        KnowledgeSpec(relations=("city", "age"))


def test_task_train_and_eval_sets_share_no_word_list_and_are_reproducible() -> None:
    spec = TaskSpec()
    train, held_out = generate_task(spec, num_train=2000, num_eval=256)
    assert (train, held_out) == generate_task(spec, num_train=2000, num_eval=256)
    assert held_out == generate_task(spec, num_train=10, num_eval=256)[1]  # independent of num_train
    assert len({e.prompt for e in held_out}) == 256
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert generate_task(TaskSpec(seed=1), num_train=0, num_eval=256)[1] != held_out


def test_cipher_is_a_derangement_applied_word_by_word() -> None:
    spec = TaskSpec(kind="cipher")
    cipher = spec.cipher()
    assert sorted(cipher) == sorted(cipher.values()) == sorted(spec.words)
    assert all(word != code for word, code in cipher.items())
    example = spec.example(("brafu", "faxte", "brafu"))
    assert example.prompt == "cipher : brafu faxte brafu ="
    assert example.response == f"{cipher['brafu']} {cipher['faxte']} {cipher['brafu']}"


def test_repeat_and_reverse_answers() -> None:
    words = ("brafu", "faxte", "barthol")
    assert TaskSpec(kind="repeat").example(words).response == "brafu faxte barthol"
    assert TaskSpec(kind="reverse").example(words).response == "barthol faxte brafu"
    _, held_out = generate_task(TaskSpec(kind="reverse", min_length=2, max_length=2), num_train=0, num_eval=200)
    assert all(e.prompt.split()[2:-1] != e.response.split() for e in held_out)  # no palindromes


def test_task_spec_and_eval_size_are_validated() -> None:
    with pytest.raises(ValueError, match="kind='sort'"):
        TaskSpec(kind="sort")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_length=4, max_length=3"):
        TaskSpec(min_length=4)
    with pytest.raises(ValueError, match="num_eval=600 is more than half"):
        generate_task(TaskSpec(num_words=4, min_length=2, max_length=2), num_train=0, num_eval=600)


def test_shipped_tokenizer_equals_a_fresh_build() -> None:
    fresh = build_tokenizer()
    assert TOKENIZER.get_vocab() == fresh.get_vocab()
    assert list(TOKENIZER.convert_ids_to_tokens(range(VOCAB))) == list(VOCABULARY)
    for attribute in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(TOKENIZER, attribute) == getattr(fresh, attribute)
    assert AutoTokenizer.from_pretrained(TOKENIZER_DIR).get_vocab() == fresh.get_vocab()  # transformers 4 and 5
    config = (TOKENIZER_DIR / "tokenizer_config.json").read_text()
    assert '"tokenizer_class": "PreTrainedTokenizerFast"' in config


def test_tokenizer_round_trips_every_scenario_text_word_for_word() -> None:
    _, cipher = generate_task(TaskSpec(), num_train=0, num_eval=32)
    texts = [f.sentence for f in generate_facts()] + [f"{e.prompt} {e.response}" for e in cipher]
    for text in texts:
        ids = TOKENIZER(text)["input_ids"]
        assert ids[0] == TOKENIZER.bos_token_id
        assert len(ids) == len(text.split()) + 1  # one token per word
        assert TOKENIZER.unk_token_id not in ids
        assert TOKENIZER.decode(ids, skip_special_tokens=True) == text


# ---- base model build and cache ------------------------------------------------------------------------------------


def test_recipe_key_changes_with_every_field_and_is_stable() -> None:
    assert BaseModelRecipe().key() == BaseModelRecipe().key()
    assert BaseModelRecipe(steps=401).key() != BaseModelRecipe().key()
    assert BaseModelRecipe(knowledge=KnowledgeSpec(seed=1)).key() != BaseModelRecipe().key()
    assert BaseModelRecipe.from_dict(TINY_RECIPE.to_dict()) == TINY_RECIPE


def test_build_is_reproducible(tmp_path: Path) -> None:
    build_base_model(TINY_RECIPE, tmp_path / "a", log=None)
    build_base_model(TINY_RECIPE, tmp_path / "b", log=None)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_base_model_is_built_into_the_cache_once_and_then_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIT_MOFO_CACHE_DIR", str(tmp_path / "cache"))
    path = base_model_path(TINY_RECIPE, log=None)
    assert path == tmp_path / "cache" / "scenario" / f"base-{TINY_RECIPE.key()}"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", METADATA_FILE} <= {p.name for p in path.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == VOCAB and model.config.hidden_size == 16
    metadata = (path / METADATA_FILE).read_text()
    assert '"knowledge_accuracy"' in metadata and TINY_RECIPE.key() in metadata
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".base-")]  # no staging leftovers

    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(base_model_module, "build_base_model", no_build)
    assert base_model_path(TINY_RECIPE, log=None) == path
    with pytest.raises(AssertionError, match="rebuilt"):
        base_model_path(TINY_RECIPE, force=True, log=None)


def test_one_cache_variable_for_the_scenario_and_the_kernels_and_the_old_name_still_works_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lit_mofo.optim import _cpu
    from lit_mofo.scenario.base_model import cache_root

    monkeypatch.delenv("LIT_MOFO_CACHE", raising=False)
    monkeypatch.setenv("LIT_MOFO_CACHE_DIR", str(tmp_path / "one"))
    assert cache_root() == _cpu._cache_dir() == tmp_path / "one"
    monkeypatch.delenv("LIT_MOFO_CACHE_DIR")
    monkeypatch.setenv("LIT_MOFO_CACHE", str(tmp_path / "old"))
    with pytest.warns(FutureWarning, match=r"\$LIT_MOFO_CACHE is deprecated.*export LIT_MOFO_CACHE_DIR="):
        assert cache_root() == tmp_path / "old"


def test_missing_model_without_build_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"python -m lit_mofo\.scenario build-base"):
        base_model_path(TINY_RECIPE, cache_dir=tmp_path, build=False)


def test_an_incomplete_cache_directory_is_rebuilt(tmp_path: Path) -> None:
    final = tmp_path / "scenario" / f"base-{TINY_RECIPE.key()}"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # a crash before the metadata was written
    assert base_model_path(TINY_RECIPE, cache_dir=tmp_path, log=None) == final
    assert (final / METADATA_FILE).is_file()
    AutoModelForCausalLM.from_pretrained(final)


def test_the_next_build_removes_the_staging_directories_of_a_killed_build(tmp_path: Path) -> None:
    root = tmp_path / "scenario"
    killed = [root / f".base-{TINY_RECIPE.key()}-k1l2", root / f".base-{TINY_RECIPE.key()}-x9y8"]
    killed[0].mkdir(parents=True)  # killed before writing anything: an empty directory
    killed[1].mkdir()
    (killed[1] / "model.safetensors").write_bytes(b"half a model")
    other_recipe = root / ".base-0123456789abcdef-zzzz"  # another recipe's build, possibly running: not ours
    other_recipe.mkdir()
    path = base_model_path(TINY_RECIPE, cache_dir=tmp_path, log=None)
    assert (path / METADATA_FILE).is_file()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".base-")) == [other_recipe.name]


CONCURRENT_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import lit_mofo.scenario.base_model as base_model
    from lit_mofo.scenario.corpus import KnowledgeSpec
    from lit_mofo.scenario.task import TaskSpec

    cache, me, other = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    build = base_model.build_base_model

    def slow_build(*args, **kwargs):
        time.sleep(2)  # widen the window in which the other process would start a second build
        return build(*args, **kwargs)

    base_model.build_base_model = slow_build
    recipe = base_model.BaseModelRecipe(
        knowledge=KnowledgeSpec(num_entities=8), skill=TaskSpec(kind="repeat", num_words=8, min_length=2, max_length=3),
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, steps=3,
        fact_batch_size=8, skill_batch_size=4,
    )
    me.touch()
    while not other.exists():  # start together
        time.sleep(0.01)
    print(base_model.base_model_path(recipe, cache_dir=cache, log=lambda m: print("LOG", m)))
    """
)


def test_two_processes_asking_at_once_build_the_model_once(tmp_path: Path) -> None:
    script = tmp_path / "build.py"
    script.write_text(CONCURRENT_BUILD)
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache"), str(ready[i]), str(ready[1 - i])],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for i in (0, 1)
    ]
    outputs = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in processes:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("the concurrent builds did not finish in 240 s")
        assert process.returncode == 0, stderr[-2000:]
        outputs.append(stdout)
    builds = sum("Building the scenario base model" in out for out in outputs)
    assert builds == 1, outputs
    paths = {out.strip().splitlines()[-1] for out in outputs}
    assert paths == {str(tmp_path / "cache" / "scenario" / f"base-{TINY_RECIPE.key()}")}


def test_path_command_prints_the_cache_directory_and_fails_until_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lit_mofo.scenario.__main__ import main

    assert main(["path", "--cache-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "scenario" / f"base-{BaseModelRecipe().key()}")
    assert "build-base" in err


# ---- probes --------------------------------------------------------------------------------------------------------


def test_knowledge_probe_scores_an_oracle_perfectly_and_counts_each_wrong_answer() -> None:
    facts = generate_facts()
    sequences = [fact_sequence(f.sentence) for f in facts]
    wrong = {3, 100, 511}
    for index in wrong:  # answer another value of the same relation
        fact = facts[index]
        other = next(v for v in fact.choices if v != fact.value)
        sequences[index] = fact_sequence(f"{fact.prompt} {other} .")
    probe = KnowledgeProbe(batch_size=100)
    module = Wrapper(OracleLM(sequences))
    probe.setup(fake_trainer(), module)
    metrics = probe.evaluate(fake_trainer(), module)
    assert metrics["accuracy"] == pytest.approx(1 - len(wrong) / len(facts))
    assert probe.higher_is_better == {"accuracy": True, "loss": False}


def test_evaluate_knowledge_scores_only_the_facts_about_the_given_entities() -> None:
    facts = generate_facts()
    sequences = [fact_sequence(f.sentence) for f in facts]
    wrong = {3, 100, 511}
    for index in wrong:
        fact = facts[index]
        other = next(v for v in fact.choices if v != fact.value)
        sequences[index] = fact_sequence(f"{fact.prompt} {other} .")
    model = OracleLM(sequences)
    entities = {facts[3].entity, facts[200].entity}
    chosen = [i for i, fact in enumerate(facts) if fact.entity in entities]
    assert 3 in chosen and 100 not in chosen and 511 not in chosen
    accuracy = evaluate_knowledge(model, entities=entities)["accuracy"]
    assert accuracy == pytest.approx(1 - 1 / len(chosen))
    everyone = {fact.entity for fact in facts}
    assert evaluate_knowledge(model, entities=everyone) == pytest.approx(evaluate_knowledge(model))
    with pytest.raises(ValueError, match="names no entity of the world"):
        evaluate_knowledge(model, entities={"nobody"})
    with pytest.raises(ValueError, match="must be a collection of entity names"):
        evaluate_knowledge(model, entities=facts[3].entity)


def test_knowledge_probe_matches_a_per_fact_computation_on_a_real_model() -> None:
    model = tiny_llama().eval()
    facts = generate_facts(KnowledgeSpec(num_entities=10))
    correct, nll, tokens = 0, 0.0, 0
    with torch.no_grad():
        for fact in facts:
            ids = torch.tensor([fact_sequence(fact.sentence)])
            prompt_len = len(TOKENIZER(fact.prompt)["input_ids"])
            output = model(input_ids=ids, labels=ids)
            nll += output.loss.item() * (ids.size(1) - 1)
            tokens += ids.size(1) - 1
            choices = TOKENIZER.convert_tokens_to_ids(list(fact.choices))
            scores = output.logits[0, prompt_len - 1, choices]
            correct += fact.choices[int(scores.argmax())] == fact.value
    probe = KnowledgeProbe(num_entities=10, batch_size=7)
    module = Wrapper(model)
    metrics = probe.evaluate(fake_trainer(), module)
    assert metrics["accuracy"] == pytest.approx(correct / len(facts))
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert evaluate_knowledge(model, KnowledgeSpec(num_entities=10)) == pytest.approx(metrics)


def test_task_probe_exact_match_requires_every_answer_token_and_eos() -> None:
    spec = TaskSpec()
    _, held_out = generate_task(spec, num_train=0, num_eval=64)
    sequences = [fact_sequence(f"{e.prompt} {e.response}") for e in held_out]
    sequences[5][-1] = TOKENIZER.convert_tokens_to_ids(".")  # does not stop after the answer
    sequences[9][-2] = TOKENIZER.convert_tokens_to_ids(ENTITY_POOL[0])  # one wrong word (pool words != its code)
    probe = TaskProbe(num_examples=64, batch_size=10)
    metrics = probe.evaluate(fake_trainer(), Wrapper(OracleLM(sequences)))
    assert metrics["exact_match"] == pytest.approx(62 / 64)
    assert probe.higher_is_better == {"exact_match": True, "loss": False}


def test_task_probe_loss_is_the_answer_token_loss() -> None:
    model = tiny_llama().eval()
    _, held_out = generate_task(TaskSpec(kind="repeat"), num_train=0, num_eval=12)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for example in held_out:
            prompt = TOKENIZER(example.prompt)["input_ids"]
            answer = TOKENIZER(example.response, add_special_tokens=False)["input_ids"] + [TOKENIZER.eos_token_id]
            ids = torch.tensor([prompt + answer])
            labels = torch.tensor([[-100] * len(prompt) + answer])
            nll += model(input_ids=ids, labels=labels).loss.item() * len(answer)
            tokens += len(answer)
    metrics = evaluate_task(model, TaskSpec(kind="repeat"), num_examples=12, batch_size=5)
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["exact_match"] == 0.0  # an untrained model


def test_probes_give_every_rank_the_same_number_of_forwards_and_cover_each_batch_once() -> None:
    probe = KnowledgeProbe(batch_size=100)  # 512 facts: 6 batches
    module = Wrapper(OracleLM([fact_sequence(f.sentence) for f in generate_facts()]))
    probe.setup(fake_trainer(), module)
    for world in (2, 4, 5):
        shares = [rank_batches(probe._batches, fake_trainer(world, rank)) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1
        counted = [id(batch) for share in shares for batch, counts in share if counts]
        assert sorted(counted) == sorted(id(batch) for batch in probe._batches)
    hits = items = 0.0
    for rank in range(4):
        probe.evaluate(fake_trainer(4, rank), module)
        rank_hits, rank_items = probe._hits.compute()  # type: ignore[union-attr]
        hits, items = hits + rank_hits, items + rank_items
    assert (hits, items) == (512, 512)


def test_limit_batches_evaluates_only_the_first_batches() -> None:
    probe = TaskProbe(num_examples=100, batch_size=10, limit_batches=3)
    probe.setup(fake_trainer(), Wrapper(tiny_llama()))
    assert [len(b.input_ids) for b in probe._batches] == [10, 10, 10]
    assert len(KnowledgeProbe(batch_size=64, limit_batches=0.5)._build_batches(TOKENIZER)) == 8


def test_probes_refuse_a_model_without_the_scenario_vocabulary() -> None:
    small = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(MisconfigurationException, match=rf"over its vocabulary \({VOCAB} tokens.*this model has 64"):
        KnowledgeProbe(num_entities=4).evaluate(fake_trainer(), Wrapper(small))
    with pytest.raises(MisconfigurationException, match="this model has 64"):
        evaluate_task(small)


def test_probe_arguments_are_validated() -> None:
    with pytest.raises(MisconfigurationException, match="batch_size=0"):
        KnowledgeProbe(batch_size=0)
    with pytest.raises(MisconfigurationException, match="num_entities=999"):
        KnowledgeProbe(num_entities=999)
    with pytest.raises(MisconfigurationException, match="kind='sort'"):
        TaskProbe(kind="sort")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="num_examples=0"):
        TaskProbe(num_examples=0)


DDP_PROBES = textwrap.dedent(
    """
    import sys
    from functools import partial
    from pathlib import Path
    import lightning.pytorch as pl
    import torch
    from lit_mofo.callbacks.forgetting_monitor import ForgettingMonitor
    from lit_mofo.modules.causal_lm import CausalLMModule
    from lit_mofo.scenario.data import ScenarioDataModule
    from lit_mofo.scenario.probes import KnowledgeProbe, TaskProbe

    out = Path(sys.argv[1])
    torch.manual_seed(0)
    config = {"model_type": "llama", "vocab_size": int(sys.argv[2]), "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    module = CausalLMModule(model_config=config, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    probes = {"knowledge": KnowledgeProbe(num_entities=10, batch_size=9),
              "task": TaskProbe(num_examples=30, batch_size=7)}
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=out,
                         callbacks=[ForgettingMonitor(probes, every_n_train_steps=None, report=False)])
    trainer.fit(module, ScenarioDataModule(num_train=64, num_val=0, batch_size=4))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("probe/")}
    torch.save({"metrics": metrics, "state": module.model.state_dict()}, out / f"rank{trainer.global_rank}.pt")
    """
)


@pytest.mark.slow
def test_probes_under_two_process_ddp_agree_with_one_process(tmp_path: Path) -> None:
    """40 facts in 5 batches (3 on rank 0, 2 + a discarded one on rank 1), 30 problems in 5: the reduced values
    on both ranks equal a single-process evaluation of the same weights."""
    script = tmp_path / "ddp_probes.py"
    script.write_text(DDP_PROBES)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(VOCAB)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            _, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("the DDP probe script did not finish in 300 s")
    assert process.returncode == 0, stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    model = tiny_llama()
    model.load_state_dict(ranks[0]["state"])
    knowledge = evaluate_knowledge(model, KnowledgeSpec(num_entities=10))
    task = evaluate_task(model, num_examples=30)
    metrics = ranks[0]["metrics"]
    assert metrics["probe/knowledge/accuracy"] == pytest.approx(knowledge["accuracy"])
    assert metrics["probe/knowledge/loss"] == pytest.approx(knowledge["loss"], rel=1e-4)
    assert metrics["probe/task/exact_match"] == pytest.approx(task["exact_match"])
    assert metrics["probe/task/loss"] == pytest.approx(task["loss"], rel=1e-4)


# ---- data module ---------------------------------------------------------------------------------------------------


def test_scenario_data_module_trains_on_answers_and_validates_on_the_probe_problems() -> None:
    data = ScenarioDataModule(num_train=64, num_val=16, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (8, 1 + 2 + 3 + 1 + 3 + 1)  # <bos> cipher : w w w = c c c <eos>
    assert (batch["labels"][:, :7] == -100).all()
    assert (batch["labels"][:, 7:] == batch["input_ids"][:, 7:]).all()
    assert (batch["labels"][:, -1] == TOKENIZER.eos_token_id).all()
    _, held_out = generate_task(TaskSpec(), num_train=0, num_eval=16)
    val_ids = [ex.input_ids for ex in data.val_examples]
    assert val_ids == [fact_sequence(f"{e.prompt} {e.response}") for e in held_out]
    assert len(data.train_dataloader()) == 8


def test_scenario_data_module_ignores_the_modules_tokenizer() -> None:
    data = ScenarioDataModule(num_train=8, num_val=0)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    other = Wrapper(nn.Linear(1, 1))
    other.tokenizer = "not a tokenizer"  # type: ignore[assignment]
    trainer.strategy.connect(other)
    data.trainer = trainer
    data.setup("fit")
    assert data.tokenizer is not None and data.tokenizer.get_vocab() == TOKENIZER.get_vocab()
    assert data.val_dataloader() == []


def test_scenario_data_module_arguments_are_validated() -> None:
    with pytest.raises(MisconfigurationException, match="min_length=5, max_length=3"):
        ScenarioDataModule(min_length=5)
    with pytest.raises(MisconfigurationException, match="num_train=0"):
        ScenarioDataModule(num_train=0)


# ---- the scenario property (real base model) -----------------------------------------------------------------------


@pytest.mark.slow
def test_full_fine_tuning_with_adamw_learns_the_task_and_forgets_knowledge() -> None:
    """The benchmark's premise, on the real base model (built into the default cache on first use, ~2-3 min on 2
    CPU cores; then ~20 s): AdamW at lr 1e-3 learns the cipher and measurably forgets the facts."""
    from lit_mofo.modules.causal_lm import CausalLMModule

    module = CausalLMModule(model="scenario:base", optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0))
    base_knowledge = evaluate_knowledge(module.model)
    base_task = evaluate_task(module.model)
    assert base_knowledge["accuracy"] > 0.9
    assert base_task["exact_match"] == 0.0
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=150,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module, ScenarioDataModule(batch_size=32))
    finally:
        torch.set_num_threads(previous_threads)
    knowledge = evaluate_knowledge(module.model)
    task = evaluate_task(module.model, num_examples=64)
    assert task["exact_match"] > 0.8
    assert base_knowledge["accuracy"] - knowledge["accuracy"] > 0.10

    # teacher-forced exact match == greedy decoding
    _, held_out = generate_task(TaskSpec(), num_train=0, num_eval=64)
    model = module.model.eval()
    greedy = 0
    for example in held_out:
        prompt = torch.tensor([TOKENIZER(example.prompt)["input_ids"]])
        answer = TOKENIZER(example.response, add_special_tokens=False)["input_ids"] + [TOKENIZER.eos_token_id]
        output = model.generate(prompt, max_new_tokens=len(answer), do_sample=False, pad_token_id=0)
        greedy += output[0, prompt.size(1) :].tolist() == answer
    assert task["exact_match"] == pytest.approx(greedy / len(held_out))
