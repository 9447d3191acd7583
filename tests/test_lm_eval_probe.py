"""LMEvalProbe offline: a local multiple-choice task (YAML + JSONL written by the test) on a tiny Llama with a
word-level tokenizer built in the test. Needs the ``lmeval`` extra (lm-eval with its ``hf`` extra)."""

from __future__ import annotations

import builtins
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local JSON task needs no network; never try it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from lit_mofo.callbacks.forgetting_monitor import ForgettingMonitor, isolated_evaluation
from lit_mofo.probes import LMEvalProbe, MultipleChoiceProbe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASK = "lit_mofo_tiny_mc"


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *LETTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def examples() -> list[dict[str, Any]]:
    rows = []
    for i in range(12):
        question = " ".join(LETTERS[(i + k) % 26] for k in range(3 + i % 3))
        # equal lengths, so the ranking comes from the model's logits, not from the number of tokens
        choices = [" ".join(LETTERS[(5 * i + 7 * c + 3 * k) % 26] for k in range(2)) for c in range(3)]
        rows.append({"question": question, "choices": choices, "label": i % 3})
    return rows


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    data = directory / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in examples()))
    (directory / "tiny_mc.yaml").write_text(
        f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
    )
    return directory


class LM(TinyCausalLM):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(max_position_embeddings=64, seed=seed)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Single:
    world_size = 1
    global_rank = 0
    is_global_zero = True


def probe(task_dir: Path, **kwargs: Any) -> LMEvalProbe:
    return LMEvalProbe(
        TASK, include_path=task_dir, include_defaults=False, tokenizer=word_tokenizer(), batch_size=6, **kwargs
    )


def run(probe: Any, module: pl.LightningModule) -> dict[str, float]:
    probe.setup(Single(), module)
    with isolated_evaluation(module):
        return probe.evaluate(Single(), module)


def test_lm_eval_probe_reports_task_metrics_with_lm_evals_directions(task_dir: Path) -> None:
    module = LM(seed=3)
    lm_eval_probe = probe(task_dir)
    values = run(lm_eval_probe, module)
    assert set(values) == {f"{TASK}/acc", f"{TASK}/acc_norm"}
    assert lm_eval_probe.higher_is_better == {f"{TASK}/acc": True, f"{TASK}/acc_norm": True}
    # The same log-likelihood ranking, computed by lit_mofo's own multiple-choice probe, gives the same accuracy
    # (choices have equal lengths, so acc_norm agrees too); this model gets 7 of 12, far from the 1/3 of chance.
    ours = run(MultipleChoiceProbe(examples=examples(), context_key="question", tokenizer=word_tokenizer()), module)
    assert ours["acc"] == pytest.approx(7 / 12)
    assert values[f"{TASK}/acc"] == pytest.approx(ours["acc"])
    assert values[f"{TASK}/acc_norm"] == pytest.approx(ours["acc_norm"])
    assert module.training  # lm-eval's eval() was undone by the isolation


def test_lm_eval_probe_passes_limit_and_few_shot(task_dir: Path) -> None:
    lm_eval_probe = probe(task_dir, limit=4, num_fewshot=2)
    values = run(lm_eval_probe, LM())
    assert lm_eval_probe.last_output is not None
    assert lm_eval_probe.last_output["n-samples"][TASK]["effective"] == 4
    assert lm_eval_probe.last_output["n-shot"][TASK] == 2
    assert values[f"{TASK}/acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_an_unknown_task_is_refused_with_the_closest_names(task_dir: Path) -> None:
    with pytest.raises(MisconfigurationException, match=rf"Unknown lm-eval task\(s\) \['lit_mofo_tiny_mcq'\].*{TASK}"):
        LMEvalProbe("lit_mofo_tiny_mcq", include_path=task_dir, include_defaults=False).setup(Single(), LM())


def test_a_missing_include_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="is not a directory of task YAML files"):
        LMEvalProbe(TASK, include_path=tmp_path / "nope").setup(Single(), LM())


def test_a_missing_extra_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def without_lm_eval(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("lm_eval"):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_lm_eval)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lit-mofo\[lmeval\]"'):
        LMEvalProbe(TASK).setup(Single(), LM())


def test_a_max_length_beyond_the_models_positions_is_refused_in_setup(task_dir: Path) -> None:
    # lm-eval truncates requests to max_length; beyond the model's 64 positions a sharded fit would hang in one rank
    with pytest.raises(MisconfigurationException, match=r"max_length=65.*64.*Pass max_length=64 or less"):
        probe(task_dir, max_length=65).setup(Single(), LM())
    probe(task_dir, max_length=64).setup(Single(), LM())


def test_a_model_without_a_tokenizer_is_refused(task_dir: Path) -> None:
    with pytest.raises(MisconfigurationException, match="no tokenizer"):
        LMEvalProbe(TASK, include_path=task_dir, include_defaults=False).setup(Single(), LM())


@pytest.mark.slow
def test_the_monitor_logs_lm_eval_metrics_against_the_pretrained_baseline(task_dir: Path, tmp_path: Path) -> None:
    module = LM()
    expected = run(probe(task_dir), module)
    monitor = ForgettingMonitor({"harness": probe(task_dir)}, every_n_train_steps=None, report=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, SyntheticTokenDataModule(num_sequences=16, seq_len=16, vocab_size=128, batch_size=8))
    assert monitor.baselines["harness"] == pytest.approx(expected)
    assert f"forgetting/harness/{TASK}/acc" in trainer.callback_metrics
    assert [r["step"] for r in monitor.history if r["metric"] == f"{TASK}/acc"] == [0, 2]


def task_reading(directory: Path, dataset: str) -> Path:
    """A task directory whose one task reads ``dataset`` (a `datasets` builder line or a Hub name)."""
    directory.mkdir()
    (directory / "task.yaml").write_text(
        f"task: lit_mofo_data_check\n{dataset}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return directory


def test_a_task_whose_hub_dataset_is_not_cached_is_refused_offline_in_setup_before_any_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    tasks = task_reading(tmp_path / "tasks", "dataset_path: lit-mofo/no-such-dataset\ndataset_name: easy")
    lm_eval_probe = LMEvalProbe("lit_mofo_data_check", include_path=tasks, include_defaults=False)
    with pytest.raises(
        MisconfigurationException,
        match=r"task 'lit_mofo_data_check' needs the Hugging Face dataset 'lit-mofo/no-such-dataset' \(easy\), which "
        r"is not cached \(pre-download it with `python -c \"import datasets; datasets.load_dataset\('lit-mofo/"
        r"no-such-dataset', 'easy'\)\"`.*Not cached and no network \(offline mode is on",
    ):
        lm_eval_probe.setup(Single(), LM())  # refused before the tokenizer or the model is looked at


def test_a_task_whose_local_data_file_is_missing_is_refused_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "gone.jsonl"
    tasks = task_reading(tmp_path / "tasks", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {missing}")
    with pytest.raises(MisconfigurationException, match=rf"task 'lit_mofo_data_check' reads \['{missing}'\], which do"):
        LMEvalProbe("lit_mofo_data_check", include_path=tasks, include_defaults=False).check_data()
