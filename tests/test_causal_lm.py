"""CausalLMModule: loading (name, path, config), response-only loss, injected optimizers, export, errors."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tiny_models import byte_tokenizer, save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lit_mofo
from lit_mofo.data.instruction import InstructionCollator, InstructionDataModule, tokenize_example
from lit_mofo.modules.causal_lm import CausalLMModule
from lit_mofo.scenario.data import ScenarioDataModule
from lit_mofo.scenario.vocab import build_tokenizer

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


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and the scenario tokenizer saved with save_pretrained, as a local model directory."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def trainer(max_steps: int = 3, logger: Any = False, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kwargs,
    )


def scenario_data() -> ScenarioDataModule:
    return ScenarioDataModule(num_train=64, num_val=8, batch_size=8)


def test_loss_is_taken_on_response_tokens_only() -> None:
    module = CausalLMModule(model_config=TINY)
    tokenizer = build_tokenizer()
    examples = [
        tokenize_example(tokenizer, "cipher : brafu faxte =", "molbu barthol"),
        tokenize_example(tokenizer, "repeat : brafu =", "brafu"),
    ]
    batch = InstructionCollator(tokenizer.pad_token_id)(examples)
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    response = targets != -100
    assert int(response.sum()) == 3 + 2  # two answer words + eos, one answer word + eos
    expected = F.cross_entropy(logits[:, :-1][response], targets[response])
    assert torch.allclose(module._loss(batch), expected, atol=1e-5)

    # labelling the prompt tokens as well takes the loss over them too (an untrained model's losses are all near
    # log(vocab), so compare with the loss over every attended token rather than "differs from expected")
    with_prompt = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}
    all_targets = with_prompt["labels"][:, 1:]
    attended = all_targets != -100
    assert int(attended.sum()) > int(response.sum())
    over_all = F.cross_entropy(logits[:, :-1][attended], all_targets[attended])
    assert torch.allclose(module._loss(with_prompt), over_all, atol=1e-5)


def test_batches_without_labels_train_on_every_attended_token() -> None:
    module = CausalLMModule(model_config=TINY)
    input_ids = torch.tensor([[2, 10, 11, 12], [2, 13, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    expected = module(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.allclose(module._loss({"input_ids": input_ids, "attention_mask": attention_mask}), expected)


def test_from_pretrained_local_directory_loads_weights_tokenizer_and_train_mode(saved_model: Path) -> None:
    module = CausalLMModule(model=str(saved_model))
    reference = AutoModelForCausalLM.from_pretrained(saved_model)
    for (name, p), (_, q) in zip(module.model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert module.model.training and all(m.training for m in module.model.modules())
    assert module.tokenizer is not None and module.tokenizer.eos_token == "<eos>"


def test_missing_model_path_names_the_path_and_why(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(MisconfigurationException, match=r"model=...\): no such directory: '.*no_such_model'.*cwd"):
        CausalLMModule(model=str(missing))


@pytest.mark.parametrize("path", ["./models/llama", "../llama", "~/no/such/llama", "models/llama/v2", "C:\\models"])
def test_a_path_that_cannot_be_a_hub_name_says_no_such_directory_not_a_repo_id_error(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _no_download)
    with pytest.raises(MisconfigurationException, match=r"no such directory") as error:
        CausalLMModule(model=path)
    assert "Repo id" not in str(error.value)  # transformers' HFValidationError about repository ids


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError("from_pretrained was called: the check should have answered before any download")


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "hub-unreachable"])
def test_an_uncached_hub_name_without_network_fails_before_any_download_saying_how_to_get_it(
    offline: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    from lit_mofo import _hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _no_download)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        reason = r"offline mode is on \(HF_HUB_OFFLINE=1\)"
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(_hub, "_endpoint_answers", lambda endpoint, timeout: False)
        reason = "cannot be reached"
    with pytest.raises(
        MisconfigurationException,
        match=rf"'Qwen/Qwen2.5-0.5B' is no local directory .*{reason}\. Not cached and no network: pass a local path "
        r".* pre-download with `hf download Qwen/Qwen2.5-0.5B`",
    ):
        CausalLMModule(model="Qwen/Qwen2.5-0.5B")


def test_a_cached_hub_name_loads_from_the_cache_when_the_hub_cannot_be_reached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants, file_download

    from lit_mofo import _hub

    source = save_tiny_model(tmp_path / "tiny", arch="qwen2")
    snapshot = tmp_path / "cache" / "models--lit-mofo--tiny-qwen2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(_hub, "_endpoint_answers", lambda endpoint, timeout: False)
    requests: list[object] = []

    def no_request(*args: object, **kwargs: object) -> None:
        requests.append(args)
        raise OSError("no network")

    monkeypatch.setattr(file_download, "get_hf_file_metadata", no_request)
    module = CausalLMModule(model="lit-mofo/tiny-qwen2")  # from the cache: no request, so no retries
    assert requests == []
    reference = AutoModelForCausalLM.from_pretrained(source)
    assert all(torch.equal(p, q) for p, q in zip(module.model.parameters(), reference.parameters(), strict=True))
    assert module.tokenizer is not None and module.tokenizer.chat_template == byte_tokenizer().chat_template


def test_a_custom_tokenizer_in_a_qwen2_model_directory_is_loaded_by_its_own_class(tmp_path: Path) -> None:
    words = build_tokenizer()  # a word-level tokenizer built with the `tokenizers` library
    directory = save_tiny_model(tmp_path / "qwen2", arch="qwen2", tokenizer=words)
    text = "brafu faxte molbu"
    # AutoTokenizer takes the class registered for the config's model type (Qwen2Tokenizer): other ids.
    assert AutoTokenizer.from_pretrained(directory)(text)["input_ids"] != words(text)["input_ids"]
    module = CausalLMModule(model=str(directory))
    assert module.tokenizer is not None
    assert module.tokenizer(text)["input_ids"] == words(text)["input_ids"]
    assert module.tokenizer.get_vocab() == words.get_vocab()


def test_the_tokenizer_set_on_the_model_only_is_the_datas_and_fits_with_a_logger(tmp_path: Path) -> None:
    """The tokenizer is one setting, the model's; Lightning's hyper-parameter merge does not see a second one."""
    model_dir = save_tiny_model(tmp_path / "model", arch="qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    tokenizer_dir = tmp_path / "tokenizer"
    byte_tokenizer().save_pretrained(tokenizer_dir)
    train = tmp_path / "train.jsonl"
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    train.write_text(json.dumps({"messages": conversation}) + "\n")
    module = CausalLMModule(model=str(model_dir), tokenizer=str(tokenizer_dir))
    data = InstructionDataModule(train_file=str(train), batch_size=1)
    fit = trainer(max_steps=1, logger=CSVLogger(tmp_path), log_every_n_steps=1)  # Lightning merges the hparams
    fit.fit(module, data)
    assert fit.global_step == 1
    assert data.tokenizer is module.tokenizer


def test_directory_without_a_model_is_reported_as_such(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="is a directory but holds no loadable model"):
        CausalLMModule(model=str(tmp_path))


def test_exactly_one_of_model_and_model_config(saved_model: Path) -> None:
    with pytest.raises(MisconfigurationException, match="exactly one of `model`"):
        CausalLMModule()
    with pytest.raises(MisconfigurationException, match="exactly one of `model`"):
        CausalLMModule(model=str(saved_model), model_config=TINY)
    with pytest.raises(MisconfigurationException, match="needs a 'model_type'"):
        CausalLMModule(model_config={"hidden_size": 8})


def test_tokenizer_without_pad_token_gets_eos_as_pad(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config.get("pad_token") is None
    module = CausalLMModule(model_config=TINY, tokenizer=str(tmp_path / "tok"))
    assert module.tokenizer is not None
    assert module.tokenizer.pad_token == "<eos>"
    assert module.tokenizer.pad_token_id == module.tokenizer.eos_token_id


def test_model_directory_without_tokenizer_leaves_tokenizer_none(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    assert CausalLMModule(model=str(tmp_path)).tokenizer is None


def test_dtype_and_gradient_checkpointing_are_passed_through(saved_model: Path) -> None:
    module = CausalLMModule(model=str(saved_model), dtype="bfloat16", gradient_checkpointing=True)
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    assert getattr(module.model, "is_activation_checkpointing", None) or module.model.is_gradient_checkpointing
    assert module.model.config.use_cache is False
    with pytest.raises(MisconfigurationException, match="dtype='float8'"):
        CausalLMModule(model=str(saved_model), dtype="float8")  # type: ignore[arg-type]


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = CausalLMModule(model_config=TINY)
    checkpointed = CausalLMModule(model_config=TINY, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    input_ids = torch.randint(4, VOCAB, (2, 10))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    plain._loss(batch).backward()
    checkpointed._loss(batch).backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_default_optimizer_is_mofo_with_the_paper_settings() -> None:
    module = CausalLMModule(model_config=TINY)
    fit = trainer(max_steps=2)
    fit.fit(module, scenario_data())
    optimizer = fit.optimizers[0]
    assert isinstance(optimizer, lit_mofo.MoFO)
    assert {g["initial_lr"] for g in optimizer.param_groups} == {2e-5}
    assert {g["fraction"] for g in optimizer.param_groups} == {0.15}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0}
    config = fit.lr_scheduler_configs[0]
    assert config.interval == "step"


def test_injected_optimizer_gets_named_groups_and_the_warmup_schedule() -> None:
    module = CausalLMModule(
        model_config=TINY, optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), warmup_ratio=0.5
    )
    fit = trainer(max_steps=4)
    fit.fit(module, scenario_data())
    optimizer = fit.optimizers[0]
    assert type(optimizer) is torch.optim.AdamW
    decays = {name: group["weight_decay"] for group in optimizer.param_groups for name in group["param_names"]}
    assert decays["model.model.embed_tokens.weight"] == 0.0
    assert decays["model.model.layers.0.input_layernorm.weight"] == 0.0
    assert decays["model.model.layers.0.self_attn.q_proj.weight"] == 0.1
    assert len(decays) == len(list(module.parameters()))
    # warmup over ceil(0.5 * 4) = 2 steps, then cosine to 0 at step 4
    scheduler = fit.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    assert [scheduler.lr_lambdas[0](step) for step in range(5)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])


def test_injected_scheduler_is_stepped_every_optimizer_step() -> None:
    module = CausalLMModule(
        model_config=TINY,
        optimizer=partial(torch.optim.SGD, lr=1.0),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    fit = trainer(max_steps=3)
    fit.fit(module, scenario_data())
    assert fit.lr_scheduler_configs[0].interval == "step"
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.125)


def test_training_lowers_the_loss_and_logs_it() -> None:
    module = CausalLMModule(model_config=TINY, optimizer=partial(torch.optim.AdamW, lr=3e-3), schedule="constant")
    data = ScenarioDataModule(kind="repeat", num_train=256, num_val=16, batch_size=16)
    fit = pl.Trainer(
        accelerator="cpu",
        max_steps=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=None,
        val_check_interval=30,
        num_sanity_val_steps=0,
    )
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        before = module._loss(batch).item()
    fit.fit(module, data)
    with torch.no_grad():
        after = module._loss(batch).item()
    assert after < before - 0.5
    assert {"train_loss", "val_loss"} <= set(fit.callback_metrics)


def test_export_dir_holds_the_final_model_and_tokenizer(saved_model: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    module = CausalLMModule(
        model=str(saved_model), optimizer=partial(torch.optim.AdamW, lr=1e-2), export_dir=str(export)
    )
    trainer(max_steps=2).fit(module, scenario_data())
    exported = AutoModelForCausalLM.from_pretrained(export)
    original = AutoModelForCausalLM.from_pretrained(saved_model)
    changed = False
    for (name, p), (_, q), (_, r) in zip(
        module.model.named_parameters(), exported.named_parameters(), original.named_parameters(), strict=True
    ):
        assert torch.equal(p.detach(), q), name
        changed |= not torch.equal(q, r)
    assert changed, "the export holds the pre-trained weights, not the fine-tuned ones"
    assert (export / "tokenizer.json").is_file()


def test_scenario_model_name_resolves_to_the_cached_base_model(
    saved_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lit_mofo.scenario.base_model as base_model

    monkeypatch.setattr(base_model, "base_model_path", lambda: saved_model)
    module = CausalLMModule(model="scenario:base")
    assert module.model.config.vocab_size == VOCAB
    assert module.tokenizer is not None


def test_lightning_cli_injects_the_optimizer_from_arguments(tmp_path: Path) -> None:
    cli = LightningCLI(
        CausalLMModule,
        ScenarioDataModule,
        args=[
            "--seed_everything=0",
            "--model.model_config",
            json.dumps(TINY),
            "--model.optimizer",
            "torch.optim.AdamW",
            "--model.optimizer.lr",
            "1e-3",
            "--data.num_train",
            "32",
            "--trainer.max_steps",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
        save_config_callback=None,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.AdamW
    assert {g["initial_lr"] for g in optimizer.param_groups} == {1e-3}


def test_a_module_built_from_a_config_object_checkpoints_loadably_with_weights_only(tmp_path: Path) -> None:
    config = LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    module = CausalLMModule(model_config=config)
    fit = trainer(max_steps=1, default_root_dir=tmp_path)
    fit.fit(module, datamodule=ScenarioDataModule(num_train=8, num_val=0, batch_size=4))
    path = tmp_path / "last.ckpt"
    fit.save_checkpoint(path)
    # The config object is kept as its dict, so the safe loader (weights_only=True, torch's default) accepts it.
    saved = torch.load(path, weights_only=True)
    assert saved["hyper_parameters"]["model_config"]["hidden_size"] == TINY["hidden_size"]
    loaded = CausalLMModule.load_from_checkpoint(path)
    assert type(loaded.model.config) is LlamaConfig
    for (name, param), (_, want) in zip(loaded.named_parameters(), module.named_parameters(), strict=True):
        assert torch.equal(param, want), name
