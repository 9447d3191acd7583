"""The `lit-mofo` CLI and every shipped config: each parses (no download, no training), short names resolve."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lit_mofo.cli import main

ROOT = Path(__file__).resolve().parents[1]
APP_CONFIGS = sorted(
    [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "recipes").glob("*.yaml")],
)
# Snippets for examples/cli.py (a model/data config plus an optimizer or callbacks); the rest are whole app configs.
SNIPPETS = {"mofo.yaml", "mofo_callback.yaml", "hft_callback.yaml", "forgetting_callbacks.yaml"}


@pytest.mark.parametrize("config", [c for c in APP_CONFIGS if c.name not in SNIPPETS], ids=lambda c: c.name)
def test_every_app_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lit_mofo" in printed


@pytest.mark.parametrize("snippet", sorted(SNIPPETS), ids=str)
def test_every_snippet_parses_with_the_example_model(snippet: str, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from cli import main as example_main

    args = ["fit", "--config", str(ROOT / "configs/examples/tiny_lm.yaml"), "--config", str(ROOT / "configs" / snippet)]
    if snippet != "mofo.yaml":
        args += ["--optimizer", "torch.optim.AdamW"]
    with pytest.raises(SystemExit) as exit_info:
        example_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)


def test_short_class_names_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "fit",
        "--model=CausalLMModule",
        "--model.model=scenario:base",
        "--data=ScenarioDataModule",
        "--trainer.callbacks+=HalfFineTuning",
        "--trainer.callbacks+=ParameterDrift",
        "--print_config",
    ]
    with pytest.raises(SystemExit):
        main(args)
    printed = capsys.readouterr().out
    for path in ("lit_mofo.modules.CausalLMModule", "lit_mofo.scenario.ScenarioDataModule", "HalfFineTuning"):
        assert path in printed


def test_an_unknown_config_key_gets_a_parser_message_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.no_such_key=1"])
    assert exit_info.value.code == 2
    assert "no_such_key" in capsys.readouterr().err
