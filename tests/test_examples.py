"""The example scripts run as documented (each is a user's first contact with the kit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.mark.slow
def test_existing_module_example_adds_all_four_callbacks_and_writes_the_report(tmp_path: Path) -> None:
    import existing_module

    trainer = existing_module.main(["--steps", "6", "--eval-every", "3", "--root", str(tmp_path)])
    assert trainer.global_step == 6
    assert Path(trainer.log_dir) == tmp_path / "existing_module" / "version_0"  # not .../lightning_logs/version_0
    assert type(trainer.optimizers[0]).__name__ == "MoFO"  # the module's AdamW, converted by MoFOCallback
    report = json.loads((Path(trainer.log_dir) / "forgetting_report.json").read_text())
    text = json.dumps(report)
    assert "general" in text and "relative_l2" in text
    assert "forgetting/general/loss" in trainer.callback_metrics
    hft = next(c for c in trainer.callbacks if type(c).__name__ == "HalfFineTuning")
    assert 0.4 < hft.trainable_fraction < 0.7


@pytest.mark.slow
def test_lm_eval_probe_example_scores_a_local_model_on_a_local_task(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval_probe
    from test_lm_eval_probe import TASK, examples, word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in examples()))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n'
    )
    model_dir = tmp_path / "model"
    tokenizer = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    values = lm_eval_probe.main(
        [
            "--model",
            str(model_dir),
            "--tasks",
            TASK,
            "--limit",
            "12",
            "--include-path",
            str(tasks),
            "--no-builtin-tasks",
        ]
    )
    assert set(values) == {f"{TASK}/acc"}
    assert 0.0 <= values[f"{TASK}/acc"] <= 1.0


@pytest.mark.slow
def test_custom_configure_optimizers_example_builds_groups_and_a_per_step_schedule(tmp_path: Path) -> None:
    import custom_configure_optimizers

    trainer = custom_configure_optimizers.main(["--steps", "4", "--root", str(tmp_path)])
    assert Path(trainer.log_dir) == tmp_path / "custom_configure_optimizers" / "version_0"
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == "MoFO"
    settings = {(group["weight_decay"], group["fraction"]) for group in optimizer.param_groups}
    assert (0.01, 0.15) in settings  # the filtered, decayed matrices
    assert any(fraction is None for _, fraction in settings)  # embeddings and head: dense step
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert 0.0 < optimizer.update_fraction < 1.0
