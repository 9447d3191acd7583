"""Every shell command that README.md or a page of the docs (``docs/*.md``) shows is run by a test and finishes in
the time stated next to it; the two quickstart commands (set up + main job, set up + tests) stay what .ci/run and
pyproject.toml do.

A command is a line of a ```bash block or an inline code span that starts with ``python``, ``python3``,
``lit-mofo``, ``pip``, ``sphinx-build``, ``sphinx-autobuild`` or ``.ci/run``; ``&&`` chains count as their parts.
:data:`README_COMMANDS` says how the suite runs each one. Adding a command to the README or a docs page without an
entry there fails :func:`test_every_readme_command_is_covered`, whose message says what to add. (The pages that only
include BENCHMARKS.md and CHANGELOG.md are not scanned: their commands are the benchmarks' own, covered by the
benchmarks' tests.)
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The texts whose commands count: the README and every page of the docs site.
DOCUMENTS = {"README.md": README} | {
    str(path.relative_to(ROOT)): path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))
}


@dataclass(frozen=True)
class Run:
    """Run here, from a scratch directory that sees ``configs/``, ``examples/`` and ``benchmarks/``, with ``extra``
    appended to shorten it to seconds (a ``fit`` must also stop by itself as written: max_steps, max_epochs or
    max_time). ``takes``: how long the README says the full command takes, in the words it uses next to it."""

    takes: str
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class CoveredBy:
    """Another test runs it (shortened): ``test`` is ``"tests/test_x.py::test_name"``; ``takes`` as for :class:`Run`."""

    test: str
    takes: str


@dataclass(frozen=True)
class SetUp:
    """An environment step (virtualenv, pip, the test suite itself): checked against .ci/run and pyproject.toml by
    the tests at the end of this file; ``takes`` as for :class:`Run` where a duration matters."""

    takes: str | None = None


SHORT_QUICKSTART = (
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.callbacks.every_n_train_steps=2",
)
SHORT_TINY = ("--trainer.max_steps=3",)

README_COMMANDS: dict[str, Run | CoveredBy | SetUp] = {
    # the two quickstart commands
    "python3 -m venv .venv": SetUp(),
    ". .venv/bin/activate": SetUp(),
    "pip install torch==2.13.0": SetUp(),
    "pip install -e .": SetUp(),
    'pip install -e ".[dev,docs]"': SetUp(),
    'pip install -e ".[docs]"': SetUp(),
    "lit-mofo fit --config configs/quickstart.yaml": CoveredBy(
        "tests/test_cli.py::test_console_script_exits_zero_after_a_successful_fit", "30-60 s"
    ),
    "python -m pytest": SetUp("about 12 minutes"),
    'python -m pytest -m "not slow"': SetUp("about 2 minutes"),
    ".ci/run": SetUp("about 15 minutes"),
    "lit-mofo fit --config configs/quickstart.yaml "
    "--ckpt_path lightning_logs/version_0/checkpoints/epoch=0-step=100.ckpt": CoveredBy(
        "tests/test_cli.py::test_quickstart_resumed_from_a_mid_epoch_checkpoint_continues_its_run_bit_identically",
        "30-45 s",
    ),
    "python -m lit_mofo.scenario build-base": Run("about 2 minutes"),  # returns at once when cached (as here)
    "python -m lit_mofo.scenario build-base --scenario disjoint": Run("about 2 minutes"),
    "lit-mofo fit --config configs/quickstart_disjoint.yaml": Run("30-60 s", SHORT_QUICKSTART),
    'pip install "lit-mofo[lora]"': SetUp(),
    "pip install 'lit-mofo[triton]'": SetUp(),
    "lit-mofo fit --config configs/fsdp2_cpu.yaml": CoveredBy(
        "tests/test_fsdp2_callbacks.py::test_fsdp2_config_completes_and_writes_the_forgetting_report", "about 2 minutes"
    ),
    "lit-mofo fit --config configs/continual.yaml": CoveredBy(
        "tests/test_continual.py::test_the_continual_config_runs_end_to_end_shortened_and_writes_the_heatmap",
        "about 1.5 minutes",
    ),
    "lit-mofo fit --config configs/task_vector_scaling.yaml": CoveredBy(
        "tests/test_cli.py::test_task_vector_scaling_config_measures_the_edits_and_applies_the_rules_pick", "40-70 s"
    ),
    "python examples/quickstart.py": CoveredBy(
        "tests/test_lightning.py::test_quickstart_prints_adamw_versus_mofo_table", "about 45 s"
    ),
    'pip install "lit-mofo[lmeval]"': SetUp(),
    # MoFO, HFT, the forgetting hooks
    "python examples/cli.py fit --config configs/mofo.yaml --config configs/examples/tiny_lm.yaml "
    "--optimizer.lr 1e-3": Run("about 20 s", SHORT_TINY),
    "python examples/cli.py fit --config configs/examples/tiny_lm.yaml --config configs/mofo_callback.yaml "
    "--optimizer torch.optim.AdamW --optimizer.lr 1e-3": Run("about 20 s", SHORT_TINY),
    "python examples/cli.py fit --config configs/examples/tiny_lm.yaml --config configs/hft_callback.yaml "
    "--config configs/mofo.yaml": Run("about 20 s", SHORT_TINY),
    "lit-mofo fit --config configs/l2_to_pretrained.yaml": Run("1-2 minutes", SHORT_QUICKSTART),
    # fine-tune your own model
    "lit-mofo fit --config configs/recipes/qwen2.5-0.5b_metamath_mofo.yaml": CoveredBy(
        "tests/test_recipes.py::test_the_qwen_recipe_runs_as_written_with_a_tiny_local_model_and_data", "not timed here"
    ),
    "python benchmarks/precision.py": Run("about a minute", ("--quick",)),
    "python examples/lm_eval_probe.py --model Qwen/Qwen2.5-0.5B --tasks arc_easy,hellaswag --limit 100": CoveredBy(
        "tests/test_examples.py::test_lm_eval_probe_example_scores_a_local_model_on_a_local_task", "not timed here"
    ),
    # the docs site
    "sphinx-build -W --keep-going -n -b html docs docs/_build/html": CoveredBy(
        "tests/test_docs.py::test_the_docs_build_without_a_warning", "about 30 s"
    ),
    "sphinx-build -W --keep-going -n -b linkcheck docs docs/_build/linkcheck": CoveredBy(
        "tests/test_docs.py::test_the_docs_links_check", "about 30 s"
    ),
    "sphinx-autobuild docs docs/_build/html": SetUp(),  # a server, until stopped; it runs the build above
    "python tests/zoo.py": CoveredBy(
        "tests/test_zoo.py::test_the_docs_matrix_is_the_one_the_code_produces", "not timed here"
    ),
    # benchmarks
    "python benchmarks/optimizer_step.py": CoveredBy(
        "tests/test_benchmarks_optimizer.py::"
        "test_optimizer_step_benchmark_quick_mode_times_every_method_against_fused_adamw",
        "about 25 minutes",
    ),
    "python benchmarks/hft_step.py": CoveredBy(
        "tests/test_benchmarks_hft.py::test_hft_step_benchmark_quick_mode_reports_times_and_optimizer_state",
        "about 45 minutes",
    ),
    "python benchmarks/forgetting.py --workers 2": CoveredBy(
        "tests/test_benchmarks_forgetting.py::test_quick_mode_runs_every_method_on_both_scenarios_and_writes_json_markdown_and_plots",
        "50 minutes",
    ),
}

# A program with arguments (a bare name is prose).
_PROGRAMS = r"(?:python3?|lit-mofo|pip|sphinx-build|sphinx-autobuild)\s+\S|\.ci/run\b"


def readme_commands(text: str | None = None) -> list[str]:
    """The shell commands of a text (by default the README and the docs pages, in order), ``&&`` chains split,
    whitespace normalised."""
    if text is None:
        return list(dict.fromkeys(c for document in DOCUMENTS.values() for c in readme_commands(document)))
    found: list[str] = []
    for language, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if language in ("bash", "sh", "shell", "console"):
            found += [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [m.group(1) for m in re.finditer(r"`([^`]+)`", prose) if re.match(_PROGRAMS, m.group(1))]
    commands = [" ".join(part.split()) for line in found for part in line.split("&&")]
    return list(dict.fromkeys(command for command in commands if command))


# ---- the mechanism ---------------------------------------------------------------------------------------------------


def test_commands_are_extracted_from_code_blocks_and_inline_code_and_chains_are_split() -> None:
    text = (
        "Run `lit-mofo fit\n--config a.yaml`, not `configs/a.yaml` (a path) or `python` (a name).\n\n"
        "```bash\npython3 -m venv .venv && pip install -e .\n# a comment\n```\n\n```yaml\noptimizer: x\n```\n"
    )
    assert readme_commands(text) == ["python3 -m venv .venv", "pip install -e .", "lit-mofo fit --config a.yaml"]


def test_every_readme_command_is_covered() -> None:
    missing = [command for command in readme_commands() if command not in README_COMMANDS]
    assert not missing, (
        f"README.md or docs/*.md show commands that no test runs: {missing}. Add each to README_COMMANDS in "
        "tests/test_readme.py: Run((...)) with the arguments that shorten it to seconds (this file then runs it), "
        "CoveredBy('tests/test_x.py::test_name') naming the test that runs it, or SetUp() for an environment step. "
        "Also state next to it how long it takes (e.g. 'about 20 s on 2 CPU cores')."
    )


def test_every_entry_is_still_in_the_readme_and_every_named_test_exists() -> None:
    shown = set(readme_commands())
    stale = [command for command in README_COMMANDS if command not in shown]
    assert not stale, f"README_COMMANDS in tests/test_readme.py lists commands no document shows any more: {stale}"
    for coverage in README_COMMANDS.values():
        if isinstance(coverage, CoveredBy):
            path, name = coverage.test.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{coverage.test} does not exist"


def _paragraphs() -> list[str]:
    """The paragraphs of every document, each document's separately (a duration is stated within one page)."""
    return [" ".join(block.split()) for text in DOCUMENTS.values() for block in [*re.split(r"\n\s*\n", text), ""]]


@pytest.mark.parametrize("command", [c for c, k in README_COMMANDS.items() if k.takes], ids=str)
def test_the_readme_states_how_long_each_command_takes(command: str) -> None:
    """Next to the command: in its paragraph, or in the one before (the sentence that introduces a code block)."""
    takes = README_COMMANDS[command].takes
    assert takes
    paragraphs = _paragraphs()
    places = [i for i, paragraph in enumerate(paragraphs) if command in paragraph]
    assert places, command
    assert any(takes in paragraphs[i] or (i and takes in paragraphs[i - 1]) for i in places), (
        f"The documents show `{command}` without the duration README_COMMANDS states for it ({takes!r}); say next to "
        "the command how long it takes (e.g. 'about 20 s on 2 CPU cores') and keep README_COMMANDS in step."
    )


# ---- the commands run ------------------------------------------------------------------------------------------------

FIT_COMMANDS = [c for c, k in README_COMMANDS.items() if not isinstance(k, SetUp) and " fit " in f" {c} "]


@pytest.mark.parametrize("command", FIT_COMMANDS, ids=str)
def test_every_readme_fit_stops_by_itself(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As written, without shortening: a step, epoch or time limit (Lightning's default is 1000 epochs)."""
    monkeypatch.chdir(ROOT)
    program, *args = re.sub(r" --ckpt_path \S+", "", command).split()  # a resumed fit has its run's limits
    if program == "lit-mofo":
        from lit_mofo.cli import main
    else:
        assert args[0] == "examples/cli.py", command
        monkeypatch.syspath_prepend(str(ROOT / "examples"))
        from cli import main  # type: ignore[no-redef]

        args = args[1:]
    output = io.StringIO()
    with redirect_stdout(output), pytest.raises(SystemExit):
        main([*args, "--print_config"])
    trainer = yaml.safe_load(output.getvalue())["trainer"]
    steps, epochs, time_limit = trainer.get("max_steps", -1), trainer.get("max_epochs"), trainer.get("max_time")
    assert (steps is not None and steps > 0) or epochs not in (None, -1) or time_limit, (
        f"`{command}` has no step, epoch or time limit, so it runs Lightning's default 1000 epochs; set "
        "trainer.max_steps in its config."
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, k in README_COMMANDS.items() if isinstance(k, Run)], ids=str)
def test_every_readme_command_runs(command: str, tmp_path: Path) -> None:
    coverage = README_COMMANDS[command]
    assert isinstance(coverage, Run)
    for folder in ("configs", "examples", "benchmarks"):  # relative paths as from the repository root
        (tmp_path / folder).symlink_to(ROOT / folder)
    program, *args = shlex.split(command)
    if program == "lit-mofo":
        argv = [sys.executable, "-m", "lit_mofo.cli", *args]
    else:
        assert program in ("python", "python3"), command
        argv = [sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [*argv, *coverage.extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"`{command}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


# ---- the set-up steps ------------------------------------------------------------------------------------------------


def _normalised(command: str) -> str:
    """A pip command as the README would show it: ``python -m pip`` is ``pip``, no ``--quiet``, no quotes."""
    command = command.replace("python -m pip ", "pip ").replace("--quiet ", "").replace('"', "")
    return " ".join(command.split())


def _ci_commands() -> list[str]:
    lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    return [_normalised(line) for line in lines if line and not line.startswith("#")]


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_ci_runs_the_readme_test_command_after_the_readme_set_up() -> None:
    chain = next(line for line in README.splitlines() if line.startswith("python3 -m venv") and "pytest" in line)
    assert chain in DOCUMENTS["docs/getting-started.md"]  # the docs show the same command
    *set_up, test_command = [part.strip() for part in chain.split("&&")]
    ci = _ci_commands()
    assert ci[-1] == test_command  # CI ends with the README's test command, verbatim
    for step in set_up[2:]:  # after venv + activate: the same torch pin and the same project install
        assert _normalised(step) in ci, f"`{step}` from the README's test command is not in .ci/run"


def test_every_extra_the_readme_installs_exists() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    named = {m.group(1) for c in readme_commands() for m in re.finditer(r"\[(\w+)\]", c) if c.startswith("pip")}
    assert named and named <= set(extras), (named, sorted(extras))


def test_the_main_job_needs_no_extra_for_its_png_and_its_exact_resume() -> None:
    dependencies = " ".join(_pyproject()["project"]["dependencies"])
    assert "matplotlib" in dependencies  # the quickstart promises forgetting_report.png
    assert "torchdata" in dependencies  # ResumableDataLoader
    extras = _pyproject()["project"]["optional-dependencies"]
    assert extras["plot"] == []  # kept so that `pip install "lit-mofo[plot]"` still works


# ---- the data examples -----------------------------------------------------------------------------------------------


def test_the_readmes_jsonl_examples_are_data_the_instruction_module_trains_on(tmp_path: Path) -> None:
    """Each ```jsonl block of the data formats (docs/cli.md) is a training file in one format; the chat one labels
    exactly its assistant replies."""
    from tiny_models import byte_tokenizer

    from lit_mofo.data.instruction import IGNORE_INDEX, InstructionDataModule

    blocks = re.findall(r"```jsonl\n(.*?)```", DOCUMENTS["docs/cli.md"], re.S)
    assert [len(block.splitlines()) for block in blocks] == [5, 2]  # a 5-line chat file, then prompt/response
    tokenizer = byte_tokenizer()
    for index, block in enumerate(blocks):
        path = tmp_path / f"example{index}.jsonl"
        path.write_text(block)
        data = InstructionDataModule(train_file=str(path))
        data.tokenizer = tokenizer
        data.setup("fit")
        assert len(data.train_examples) == len(block.splitlines())
        learned = [
            tokenizer.decode([t for t, label in zip(e.input_ids, e.labels, strict=True) if label != IGNORE_INDEX])
            for e in data.train_examples
        ]
        replies = [
            [turn["content"] for turn in json.loads(line)["messages"] if turn["role"] == "assistant"]
            if index == 0
            else [json.loads(line)["response"]]
            for line in block.splitlines()
        ]
        end = "<|im_end|>\n" if index == 0 else "<|endoftext|>"  # the chat template's end of turn, or EOS
        assert learned == ["".join(reply + end for reply in reply_list) for reply_list in replies]
