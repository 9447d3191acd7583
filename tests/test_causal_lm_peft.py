"""CausalLMModule with PEFT adapters (LoRA): wrapping, adapter-only optimizer, merged export, checkpoints, probes."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from peft import LoraConfig, PeftModel, PromptTuningConfig
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lit_mofo import ForgettingMonitor, MoFO
from lit_mofo.modules.causal_lm import CausalLMModule
from lit_mofo.scenario.data import ScenarioDataModule
from lit_mofo.scenario.probes import KnowledgeProbe, TaskProbe, evaluate_knowledge, evaluate_task
from lit_mofo.scenario.vocab import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = len(build_tokenizer())
TINY: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def lora(**overrides: Any) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0, **overrides})


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def trainer(max_steps: int = 3, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        **kwargs,
    }
    return pl.Trainer(**options)


def scenario_data() -> ScenarioDataModule:
    return ScenarioDataModule(num_train=64, num_val=0, batch_size=8)


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def adapter_names(module: CausalLMModule) -> set[str]:
    return {name for name, _ in module.named_parameters() if ".lora_A." in name or ".lora_B." in name}


# ---- wrapping and training ------------------------------------------------------------------------------------------


def test_a_lora_config_wraps_the_model_and_only_the_adapters_train() -> None:
    config = lora()
    module = CausalLMModule(model_config=TINY, peft=config)
    assert isinstance(module.model, PeftModel) and module.is_peft and module.model.training
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == adapter_names(module)
    assert len(trainable) == 2 * 7 * TINY["num_hidden_layers"]  # A and B on q, k, v, o, gate, up, down per block
    assert config.target_modules == "all-linear" and config.task_type is None  # the caller's config is untouched
    assert module.peft_config is not None and module.peft_config.task_type == "CAUSAL_LM"
    assert not CausalLMModule(model_config=TINY).is_peft
    saved = module.hparams["peft"]  # plain data, and the same config once rebuilt
    assert saved["peft_type"] == "LORA" and saved["target_modules"] == "all-linear"
    rebuilt = CausalLMModule(model_config=TINY, peft=saved)
    assert rebuilt.peft_config == module.peft_config
    assert adapter_names(rebuilt) == adapter_names(module)


@pytest.mark.parametrize("optimizer", [None, partial(torch.optim.AdamW, lr=1e-2)], ids=["mofo_default", "adamw"])
def test_the_optimizer_gets_the_adapters_alone_and_the_base_weights_stay_exactly(optimizer: Any) -> None:
    module = CausalLMModule(model_config=TINY, peft=lora(), optimizer=optimizer)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    fit = trainer(max_steps=3)
    fit.fit(module, scenario_data())
    optim = fit.optimizers[0]
    assert type(optim) is (MoFO if optimizer is None else torch.optim.AdamW)
    in_optimizer = {id(p) for group in optim.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for name, p in module.named_parameters() if name in adapter_names(module)}
    moved = {name for name, p in module.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert moved and moved <= adapter_names(module)  # every base weight bit-identical
    assert any(".lora_B." in name for name in moved)


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients() -> None:
    batch = next(iter(_loader()))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = CausalLMModule(model_config=TINY, peft=lora(), gradient_checkpointing=checkpointing)
        module._loss(batch).backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def _loader() -> Any:
    data = scenario_data()
    data.setup("fit")
    return data.train_dataloader()


# ---- export and checkpoints -----------------------------------------------------------------------------------------


def test_the_export_is_a_plain_merged_model_with_the_peft_models_logits(saved_model: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    module = CausalLMModule(
        model=str(saved_model), peft=lora(), optimizer=partial(torch.optim.AdamW, lr=3e-2), export_dir=str(export)
    )
    trainer(max_steps=3).fit(module, scenario_data())
    assert isinstance(module.model, PeftModel)  # the module keeps its adapters
    exported = AutoModelForCausalLM.from_pretrained(export)
    assert type(exported) is LlamaForCausalLM
    assert not [name for name, _ in exported.named_parameters() if "lora" in name or "base_layer" in name]
    assert (export / "tokenizer.json").is_file() and not (export / "adapter_config.json").exists()
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(exported, input_ids), logits(module.model, input_ids), rtol=1e-4, atol=1e-5)
    original = AutoModelForCausalLM.from_pretrained(saved_model)
    assert (logits(exported, input_ids) - logits(original, input_ids)).abs().max() > 1e-3  # the fine-tune is in it


# The resumed fit checkpoints into a directory of its own, so Lightning notes it keeps only `best_model_path`.
@pytest.mark.filterwarnings("ignore:The dirpath has changed from")
def test_a_lora_checkpoint_loads_back_and_resumes(saved_model: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(saved_model), peft=lora(), optimizer=partial(torch.optim.AdamW, lr=3e-2))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=2, enable_checkpointing=True, callbacks=[checkpoint]).fit(module, scenario_data())
    path = tmp_path / "last.ckpt"
    saved = torch.load(path, weights_only=True)  # plain data only: the peft config is kept as a dict
    assert adapter_names(module) <= set(saved["state_dict"])
    assert saved["hyper_parameters"]["peft"]["peft_type"] == "LORA"

    loaded = CausalLMModule.load_from_checkpoint(path)
    assert isinstance(loaded.model, PeftModel)
    assert adapter_names(loaded) == adapter_names(module)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(loaded.model, input_ids), logits(module.model, input_ids))

    resumed = CausalLMModule(model=str(saved_model), peft=lora(), optimizer=partial(torch.optim.AdamW, lr=3e-2))
    fit = trainer(max_steps=3, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path / "resume")])
    fit.fit(resumed, scenario_data(), ckpt_path=path)
    assert fit.global_step == 3
    assert fit.optimizers[0].state  # the adapters' AdamW moments came back from the checkpoint


def test_a_peft_export_under_a_sharded_strategy_is_refused_at_setup() -> None:
    class FSDPStrategy:  # stands in for Lightning's (it needs a GPU); only the name is looked at
        pass

    module = CausalLMModule(model_config=TINY, peft=lora(), export_dir="unused")
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())  # type: ignore[assignment]
    with pytest.raises(MisconfigurationException, match="merges its adapters in a copy of the whole model"):
        module.setup("fit")


# ---- probes on a PEFT model -----------------------------------------------------------------------------------------


def test_the_scenario_probes_score_a_peft_model_as_its_merged_model() -> None:
    module = CausalLMModule(model_config=TINY, peft=lora(init_lora_weights=False))  # random B: adapters matter
    merged = module.merged_model()
    assert type(merged) is LlamaForCausalLM
    fake_trainer = SimpleNamespace(world_size=1, global_rank=0)
    knowledge = KnowledgeProbe(limit_batches=1).evaluate(fake_trainer, module)  # type: ignore[arg-type]
    task = TaskProbe(num_examples=64).evaluate(fake_trainer, module)  # type: ignore[arg-type]
    reference = evaluate_knowledge(merged)
    # the probe scores the first 256 facts (one batch); compare the loss on the same facts through the merged model
    assert knowledge["accuracy"] == pytest.approx(evaluate_knowledge(merged, entities=_first_entities(64))["accuracy"])
    assert reference["loss"] > 0
    merged_task = evaluate_task(merged, num_examples=64)
    assert task["exact_match"] == merged_task["exact_match"]
    assert task["loss"] == pytest.approx(merged_task["loss"], rel=1e-4)


def _first_entities(count: int) -> list[str]:
    from lit_mofo.scenario.vocab import ENTITY_POOL

    return list(ENTITY_POOL[:count])


def test_forgetting_monitor_runs_on_a_lora_fine_tune() -> None:
    module = CausalLMModule(model_config=TINY, peft=lora(), optimizer=partial(torch.optim.AdamW, lr=1e-2))
    monitor = ForgettingMonitor(
        {"task": TaskProbe(num_examples=32), "knowledge": KnowledgeProbe(limit_batches=1)},
        every_n_train_steps=2,
        report=False,
    )
    fit = trainer(max_steps=2, callbacks=[monitor])
    fit.fit(module, scenario_data())
    assert {"forgetting/knowledge/accuracy", "probe/task/exact_match"} <= set(fit.callback_metrics)


# ---- configuration errors and YAML ----------------------------------------------------------------------------------


def test_bad_peft_arguments_say_what_to_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MisconfigurationException, match=r"is not a peft.PeftConfig \(nor its to_dict\(\) form"):
        CausalLMModule(model_config=TINY, peft={"r": 8})
    with pytest.raises(MisconfigurationException, match="adds virtual tokens"):
        CausalLMModule(model_config=TINY, peft=PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with pytest.raises(MisconfigurationException, match=r"task_type='SEQ_CLS'.*'CAUSAL_LM'"):
        CausalLMModule(model_config=TINY, peft=lora(task_type="SEQ_CLS"))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if the `lora` extra were not installed
    with pytest.raises(MisconfigurationException, match=r"pip install 'lit-mofo\[lora\]'"):
        CausalLMModule(model_config=TINY, peft=lora())


# jsonargparse builds LoraConfig's default LoftQConfig, which peft then drops with this notice; the lit-mofo CLI
# filters it (lit_mofo.cli.quiet_known_notices), stock LightningCLI does not. The module has no validation data
# (num_val: 0), which Lightning notes when it finds the empty list of validation loaders.
@pytest.mark.filterwarnings("ignore:`loftq_config` specified but will be ignored:UserWarning")
@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
def test_a_yaml_peft_block_builds_a_lora_module(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "lora.yaml"
    config.write_text(
        "seed_everything: 0\n"
        "model:\n"
        f"  model_config: {TINY}\n"
        "  peft:\n"
        "    class_path: peft.LoraConfig\n"
        "    init_args: {r: 2, lora_alpha: 4, target_modules: all-linear, lora_dropout: 0.0}\n"
        "  optimizer:\n"
        "    class_path: torch.optim.AdamW\n"
        "    init_args: {lr: 0.01}\n"
        "data:\n"
        "  num_train: 16\n"
        "  batch_size: 8\n"
        "  num_val: 0\n"
        "trainer:\n"
        "  max_steps: 1\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        f"  default_root_dir: {tmp_path}\n"
    )
    cli = LightningCLI(
        CausalLMModule, ScenarioDataModule, args=["--config", str(config)], run=False, save_config_callback=None
    )
    assert isinstance(cli.model.model, PeftModel)
    assert cli.model.peft_config is not None and cli.model.peft_config.r == 2
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1


@pytest.mark.slow
def test_the_shipped_lora_config_fine_tunes_the_scenario_model(tmp_path: Path) -> None:
    from lit_mofo.cli import main

    threads = torch.get_num_threads()
    try:
        cli = main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/lora.yaml"),
                "--trainer.max_steps=4",
                "--trainer.val_check_interval=2",
                "--trainer.callbacks.every_n_train_steps=2",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
                f"--model.init_args.export_dir={tmp_path / 'export'}",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert cli.trainer.global_step == 4
    assert isinstance(cli.model.model, PeftModel)
    assert "forgetting/knowledge/accuracy" in cli.trainer.callback_metrics
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "export")) is LlamaForCausalLM
