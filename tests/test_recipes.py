"""The real-model recipes (configs/recipes/) run as written, with the model and data swapped for tiny local ones by the
overrides their headers document; they train in a precision that moves the weights; and ``lit-mofo`` checks the
model, tokenizer and lm-eval data they name before anything loads."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from process_launch import ROOT, run_command
from tiny_models import byte_tokenizer, save_tiny_model

from lit_mofo.cli import main
from lit_mofo.modules.causal_lm import CausalLMModule

RECIPES = ROOT / "configs" / "recipes"
QWEN = RECIPES / "qwen2.5-0.5b_metamath_mofo.yaml"
LLAMA = RECIPES / "llama2-7b_metamath_mofo.yaml"
CALLBACKS = RECIPES / "callbacks"
sys.path.insert(0, str(ROOT / "benchmarks"))


def printed_config(recipe: Path, *overrides: str) -> dict[str, Any]:
    from contextlib import redirect_stdout
    from io import StringIO

    output = StringIO()
    with redirect_stdout(output), pytest.raises(SystemExit):
        main(["fit", "--config", str(recipe), *overrides, "--print_config"])
    return yaml.safe_load(output.getvalue())


# ---- precision ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_steps_fp32_weights_and_computes_in_bf16(recipe: Path) -> None:
    config = printed_config(recipe)
    model = config["model"]["init_args"]
    assert model["dtype"] == "float32"  # what the optimizer steps: updates at lr 2e-5 are not rounded away
    precision = config["trainer"]["precision"]
    if model.get("fsdp_param_dtype") is not None:  # FSDP2's mixed precision: bf16 all-gather and compute
        assert (model["fsdp_param_dtype"], model["fsdp_reduce_dtype"], precision) == ("bfloat16", "float32", "32-true")
    else:
        assert precision == "bf16-mixed"
    header = recipe.read_text().split("\nseed_everything")[0]
    assert "bf16-true" in header and "MoFO(master_weights=True)" in header  # says why, and what bf16-true needs


def test_bf16_mixed_moves_the_weights_as_fp32_does_where_bf16_true_rounds_most_updates_away(tmp_path: Path) -> None:
    """The measurement behind the recipes' precision (benchmarks/precision.py): a tiny Qwen2 saved in bf16, 3 steps of
    the kit's default MoFO at lr 2e-5."""
    import precision

    model_dir = precision.save_model(tmp_path / "qwen2", "qwen2")
    moved = {p: precision.run(model_dir, "qwen2", "mofo", p, steps=3).moved for p in precision.PRECISIONS}
    assert moved["bf16-mixed"] == pytest.approx(moved["32-true"], rel=0.02)
    assert moved["bf16-true"] < 0.5 * moved["32-true"]


# ---- the recipes run -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny stand-ins for the recipes' model and data: a Qwen2 and a Llama saved in bf16 with a byte-level ChatML
    tokenizer, MetaMathQA-shaped records, the same as chats, and a local lm-eval task."""
    root = tmp_path_factory.mktemp("recipe_assets")
    questions = [
        (f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}.") for a in range(4) for b in range(4)
    ]
    metamath = root / "metamath.jsonl"
    metamath.write_text("".join(json.dumps({"query": q, "response": r, "type": "toy"}) + "\n" for q, r in questions))
    chats = root / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}) + "\n"
            for q, r in questions
        )
    )
    tasks = root / "tasks"
    tasks.mkdir()
    rows = [{"question": q, "choices": [r, f"The answer is {i}."], "label": 0} for i, (q, r) in enumerate(questions)]
    (tasks / "sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tasks / "sums.yaml").write_text(
        f"task: lit_mofo_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'sums.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n'
    )
    # The recipe's forgetting hooks with local references: what `--trainer.callbacks='[...]'` swaps in.
    monitor = root / "forgetting_local.yaml"
    monitor.write_text(
        yaml.safe_dump(
            {
                "class_path": "lit_mofo.ForgettingMonitor",
                "init_args": {
                    "probes": {
                        "general": {
                            "class_path": "lit_mofo.probes.LanguageModelProbe",
                            "init_args": {"files": str(ROOT / "configs/data/reference_general.txt"), "max_length": 64},
                        },
                        "sums": {
                            "class_path": "lit_mofo.probes.LMEvalProbe",
                            "init_args": {
                                "tasks": ["lit_mofo_sums"],
                                "limit": 8,
                                "include_path": str(tasks),
                                "include_defaults": False,
                            },
                        },
                    },
                    "every_n_train_steps": 1,
                },
            }
        )
    )
    return {
        "qwen2": save_tiny_model(root / "qwen2", "qwen2"),
        "llama": save_tiny_model(root / "llama", "llama"),
        "metamath": metamath,
        "chats": chats,
        "monitor": monitor,
    }


@pytest.mark.slow
def test_the_qwen_recipe_runs_as_written_with_a_tiny_local_model_and_data(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the local lm-eval task needs no network; never try it
    export = tmp_path / "export"
    threads = torch.get_num_threads()
    try:
        cli = main(
            [
                "fit",
                "--config",
                str(QWEN),
                # the overrides of the recipe's header
                "--trainer.accelerator=cpu",
                "--trainer.max_steps=2",
                "--trainer.accumulate_grad_batches=2",
                "--trainer.log_every_n_steps=1",
                f"--model.init_args.model={assets['qwen2']}",
                f"--model.init_args.export_dir={export}",
                "--data.init_args.dataset=null",
                f"--data.init_args.train_file={assets['metamath']}",
                "--data.init_args.batch_size=2",
                "--data.init_args.num_workers=0",
                # one callback replaced without repeating the others' settings
                f"--trainer.callbacks=[{CALLBACKS}/checkpoint.yaml, {assets['monitor']}, {CALLBACKS}/drift.yaml]",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 2 and trainer.precision == "bf16-mixed"
    assert {p.dtype for p in module.parameters()} == {torch.float32}  # bf16 compute, fp32 weights
    assert type(trainer.optimizers[0]).__name__ == "MoFO"
    assert {"ModelCheckpoint", "ForgettingMonitor", "ParameterDrift"} <= {type(c).__name__ for c in trainer.callbacks}
    assert "forgetting/sums/lit_mofo_sums/acc" in trainer.callback_metrics
    assert "drift/relative_l2" in trainer.callback_metrics
    report = json.loads((Path(trainer.log_dir) / "forgetting_report.json").read_text())["meta"]
    assert report["method"] == "MoFO(fraction=0.15)"
    assert report["model"].startswith("Qwen2ForCausalLM (") and report["model"].endswith("/qwen2)")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in export.iterdir()}
    assert (Path(trainer.log_dir) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_the_llama_recipe_runs_sharded_on_two_cpu_processes_with_a_tiny_local_model_and_chat_data(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    export = tmp_path / "export"
    result = run_command(
        [
            sys.executable,
            "-m",
            "lit_mofo.cli",
            "fit",
            "--config",
            str(LLAMA),
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy.init_args.data_parallel_size=2",
            "--trainer.max_steps=2",
            "--trainer.accumulate_grad_batches=1",
            f"--model.init_args.model={assets['llama']}",
            f"--model.init_args.export_dir={export}",
            "--data.init_args.dataset=null",
            f"--data.init_args.train_file={assets['chats']}",
            "--data.init_args.template=null",  # chat records: the tokenizer's chat template renders them
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            f"--trainer.default_root_dir={tmp_path}",
            "--torch_num_threads=1",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharded with FSDP2 over 2 processes" in result.stdout + result.stderr
    report = json.loads(next(tmp_path.glob("lightning_logs/*/forgetting_report.json")).read_text())
    assert report["meta"]["strategy"] == "ModelParallelStrategy" and report["meta"]["world_size"] == 2
    assert report["meta"]["method"] == "MoFO(fraction=0.15)"
    assert report["meta"]["global_step"] == 2
    assert {"config.json", "model.safetensors"} <= {p.name for p in export.iterdir()}


# ---- checked before anything loads -----------------------------------------------------------------------------------


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every model the CausalLMModule would load (and loads none)."""
    loaded: list[str] = []

    def record(source: str, *args: object) -> None:
        loaded.append(source)
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr(CausalLMModule, "_load", staticmethod(record))
    return loaded


def refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QWEN), "--trainer.accelerator=cpu", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_two_different_tokenizers_for_model_and_data_are_refused_at_parse_time_naming_both_keys(
    assets: dict[str, Path], model_loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    error = refused(
        [f"--model.init_args.model={assets['qwen2']}", "--model.init_args.tokenizer=a", "--data.init_args.tokenizer=b"],
        capsys,
    )
    assert error.startswith("error: model.init_args.tokenizer='a' and data.init_args.tokenizer='b' differ")
    assert "Set the tokenizer once, on the model" in error
    assert model_loads == []


def test_a_tokenizer_set_on_the_data_only_is_the_models_too(assets: dict[str, Path], tmp_path: Path) -> None:
    tokenizer_dir = tmp_path / "tokenizer"
    byte_tokenizer(chat_template=None).save_pretrained(tokenizer_dir)
    cli = main(
        [
            "--config",
            str(QWEN),
            "--trainer.accelerator=cpu",
            f"--model.init_args.model={assets['qwen2']}",
            "--data.init_args.dataset=null",
            f"--data.init_args.train_file={assets['metamath']}",
            f"--data.init_args.tokenizer={tokenizer_dir}",
            f"--trainer.callbacks=[{CALLBACKS}/checkpoint.yaml]",  # no lm-eval task from the Hub
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.model.hparams["tokenizer"] == str(tokenizer_dir)
    assert cli.model.tokenizer is not None and cli.model.tokenizer.chat_template is None  # the data's, not the model's


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.init_args.model=./no/such/model", r"model.init_args.model: no such directory: './no/such/model'"),
        ("--model.init_args.tokenizer=/no/such/tokenizer", r"model.init_args.tokenizer: no such directory"),
        ("--data.init_args.dataset=./no/such/data", r"data.init_args.dataset: no such directory or file"),
    ],
    ids=["model", "tokenizer", "dataset"],
)
def test_a_missing_local_path_is_refused_before_anything_loads(
    override: str, message: str, assets: dict[str, Path], model_loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    model = [] if "model.init_args.model" in override else [f"--model.init_args.model={assets['qwen2']}"]
    error = refused([*model, override], capsys)
    assert error.startswith("error: ") and re.search(message, error), error
    assert model_loads == []


def test_an_uncached_hub_model_offline_is_refused_at_once_with_the_download_command(
    model_loads: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    error = refused([], capsys)  # the recipe as written: Qwen/Qwen2.5-0.5B from the Hub
    assert "model.init_args.model: 'Qwen/Qwen2.5-0.5B' is no local directory" in error
    assert "Not cached and no network: pass a local path" in error and "`hf download Qwen/Qwen2.5-0.5B`" in error
    assert model_loads == []


@pytest.mark.slow
def test_the_recipes_lm_eval_data_is_checked_offline_before_the_model_loads(
    assets: dict[str, Path], model_loads: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's run: offline, arc_easy's data not cached; refused before the model loads, not with a raw
    ConnectionError after it (indexes lm-eval's built-in tasks: ~20 s)."""
    pytest.importorskip("lm_eval")
    from lit_mofo import _hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(_hub, "dataset_is_cached", lambda name: False)
    error = refused(
        [
            f"--model.init_args.model={assets['qwen2']}",
            "--data.init_args.dataset=null",
            f"--data.init_args.train_file={assets['metamath']}",
        ],
        capsys,
    )
    assert "task 'arc_easy' needs the Hugging Face dataset 'allenai/ai2_arc' (ARC-Easy), which is not cached" in error
    assert "Not cached and no network (offline mode is on" in error
    assert model_loads == []


def test_a_module_of_ones_own_is_named_by_its_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: `--model my_package.lm.MyLM` (or `class_path:` in YAML), importable from PYTHONPATH."""
    package = tmp_path / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lm.py").write_text(
        "from lit_mofo.modules import CausalLMModule\n\n\nclass MyLM(CausalLMModule):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # what PYTHONPATH=. does for a package in the current directory
    tiny = "{model_type: llama, vocab_size: 32, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
    tiny += "num_attention_heads: 2}"
    config = tmp_path / "my.yaml"
    config.write_text(
        f"model:\n  class_path: my_package.lm.MyLM\n  init_args:\n    model_config: {tiny}\n"
        "data:\n  class_path: lit_mofo.scenario.ScenarioDataModule\ntrainer:\n  max_steps: 1\n"
    )
    command_line = ["--model", "my_package.lm.MyLM", "--model.model_config", tiny, "--data", "ScenarioDataModule"]
    for args in (["--config", str(config)], command_line):
        cli = main([*args, f"--trainer.default_root_dir={tmp_path}"], run=False)
        assert type(cli.model).__module__ == "my_package.lm" and type(cli.model).__name__ == "MyLM"
