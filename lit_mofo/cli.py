"""The ``lit-mofo`` command: a :class:`~lightning.pytorch.cli.LightningCLI` that knows lit_mofo's parts.

Subcommands ``fit``, ``validate``, ``test`` and ``predict``, with ``--help``, ``--print_config`` and
``--config FILE`` as in any LightningCLI. lit_mofo's optimizer, callbacks, probes, modules and datamodules are
imported up front, so configs may name them by short class name (``class_path: MoFO``, ``ForgettingMonitor``,
``CausalLMModule``, ``ScenarioDataModule``, ...) as well as by full path (``lit_mofo.MoFO``).

Beyond LightningCLI:

- **Arguments are checked before anything is built.** A value of the wrong type, an optimizer argument out of range
  (the optimizer is built once on a dummy parameter right after parsing) or a callback argument out of range
  (callbacks are built before the model) ends the command with exit status 2 and the reason first, without the
  usage text. A class whose constructor refuses its arguments is reported with its own message first (for a probe
  inside a monitor, with its config key: jsonargparse would name only the abstract ``Probe``).
  ``JSONARGPARSE_DEBUG=true`` raises the error with its traceback instead. Then, before anything loads, the sources
  the config names are checked: a model, tokenizer or dataset path that does not exist ("no such directory"), a Hub
  name that is neither cached nor reachable ("not cached and no network", with the download command), an lm-eval
  task whose data cannot be loaded.
- **One tokenizer.** ``data.init_args.tokenizer`` given alone becomes ``model.init_args.tokenizer`` too (the model,
  its probes and the data tokenize alike); two different ones are refused, naming both keys.
- **SIGTERM** (a scheduler's preemption) stops a fit at the end of its step with a checkpoint of that step, a line
  ``lit-mofo: stopped by SIGTERM at step N; its checkpoint is PATH. Resume with: ...`` and exit status 143.
- **Resume continues the run.** ``fit --ckpt_path .../lightning_logs/version_N/checkpoints/X.ckpt`` logs into
  ``version_N`` again: ``metrics.csv`` keeps the rows logged before the checkpoint was written and continues after
  them, and the end-of-fit report lands next to them. With the project's data modules (see
  :class:`~lit_mofo.data.ResumableDataLoader`) a resumed fit ends bit-identical to the uninterrupted one, on one
  process, under DDP and FSDP2 (from a checkpoint written in the middle of a step, Lightning does not redo the rest
  of that step's logging). ``--ckpt_path last`` resumes from the newest complete checkpoint of this run (the same
  model hyper-parameters) where the configured run writes checkpoints, or starts afresh when there is none.
- **Checkpoints a crash cannot tear.** Every checkpoint is written under ``<name>.partial`` and renamed when complete
  (:func:`~lit_mofo.checkpoints.save_checkpoints_atomically`). A ``--ckpt_path`` that is missing, empty, cut short,
  an incomplete sharded directory or not a checkpoint is refused up front, naming the newest complete checkpoint of
  the same run before it in that directory; another program's file and a checkpoint that ``TaskVectorScaling``
  rewrote with an edit (for ``fit``) too. Once the model and the Trainer are built, and before anything is restored,
  a checkpoint of another model (tensors that do not fit) or a sharded directory given to a strategy that reads
  single files is refused with the fix. A checkpoint written outside LightningCLI gives its hyper-parameters to the
  configured model class.
- **Default logger**: a CSV logger in ``<default_root_dir>/lightning_logs/version_N`` (what Lightning picks without
  TensorBoard installed, without its notice about it); a fit that fails before logging anything removes the version
  directory it created. Give ``--trainer.logger`` to use another logger.
- Lightning's install tips (litlogger, litmodels) and torch 2.13's ``LeafSpec`` deprecation warning inside Lightning
  are filtered by their exact text (:func:`lit_mofo.notices.quiet_known_notices`); the progress bar shows ``Epoch
  N`` without the ``/-2`` of step-limited runs, counts the batches of a resumed epoch from where it resumed, and
  shows the run's version number (``v_num: 2``).

Example::

    lit-mofo fit --config configs/quickstart.yaml
    lit-mofo fit --config configs/quickstart.yaml --ckpt_path lightning_logs/version_0/checkpoints/epoch=0-step=100.ckpt
    lit-mofo fit --config configs/recipes/qwen2.5-0.5b_metamath_mofo.yaml --print_config
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import inspect
import os
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace
from jsonargparse.typing import PositiveInt
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

# Imported for their side effect: jsonargparse resolves short class names among the imported subclasses.
import lit_mofo.callbacks
import lit_mofo.data
import lit_mofo.modules
import lit_mofo.optim
import lit_mofo.probes
import lit_mofo.scenario  # noqa: F401
from lit_mofo.callbacks.task_vector_scaling import applied_edit
from lit_mofo.checkpoints import (
    checkpoint_problem,
    newest_complete_checkpoint,
    read_checkpoint_meta,
    replacement_checkpoint,
    save_checkpoints_atomically,
)
from lit_mofo.notices import quiet_known_notices

__all__ = ["LitMoFOCLI", "console_main", "main", "quiet_known_notices"]

_DEBUG_ENV = "JSONARGPARSE_DEBUG"


# ---------------------------------------------------------------------------------------------------- errors
def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


_PROBLEM_WITH_CLASS = re.compile(r"(\s*)- Problem with given class_path '([^']+)':")


def _without_base_class_alternatives(lines: list[str]) -> list[str]:
    """``lines`` without the union alternatives that retry a value with a base class of the class it was given for.

    For ``--trainer.callbacks.mode=freez`` after ``--trainer.callbacks+=HalfFineTuning``, jsonargparse reports the
    value against ``lit_mofo.HalfFineTuning`` (the real reason: not one of its modes) and against
    ``lightning.Callback`` (which has no option ``mode``); the second says nothing about the user's class."""
    problems = [
        (i, len(m.group(1)), m.group(2)) for i, line in enumerate(lines) if (m := _PROBLEM_WITH_CLASS.match(line))
    ]
    classes = {path: _import(path) for _, _, path in problems}
    dropped: set[int] = set()
    for i, indent, path in problems:
        base = classes[path]
        if not isinstance(base, type):
            continue
        siblings = [classes[other] for _, other_indent, other in problems if other_indent == indent and other != path]
        if any(isinstance(other, type) and other is not base and issubclass(other, base) for other in siblings):
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
                end += 1
            dropped.update(range(i, end))
    return [line for i, line in enumerate(lines) if i not in dropped]


def _expected(type_text: str) -> str:
    """``<class 'float'>`` -> ``float``, ``typing.Literal['freeze', 'mask']`` -> ``one of 'freeze', 'mask'``."""
    literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", type_text)
    if literal:
        return f"one of {literal.group(1)}"
    name = re.fullmatch(r"<class '([^']+)'>", type_text)
    text = name.group(1) if name else type_text
    return "None" if text == "NoneType" else text


def _condensed_parser_error(message: str) -> str:
    """One line for jsonargparse's nested errors: the full key, then the bad value and what was expected, or the
    option the class does not accept.

    jsonargparse reports ``fraction: "abc"`` in a MoFO inside a model as a tree of "Parser key" blocks (one per level,
    each listing the alternatives of a union); the reason is in the deepest block. Returns "" when the message has no
    such structure (then it is short already).
    """
    lines = _without_base_class_alternatives(message.splitlines())
    keys = [
        (i, _indent(line), m.group(1))
        for i, line in enumerate(lines)
        for m in re.finditer(r'Parser key "([^"]+)"', line)
    ]

    def path_to(index: int, indent: int) -> str:
        path: list[str] = []
        for _, key_indent, key in reversed([k for k in keys if k[0] <= index]):
            if key_indent < indent or (not path and key_indent == indent):
                path.insert(0, key)
                indent = key_indent
        return ".".join(path)

    for i, line in enumerate(lines):  # an unknown option of a class
        unknown = re.match(r"\s*Option '([^']+)' is not accepted", line)
        owner = re.search(r"Problem with given class_path '([^']+)'", lines[i - 1]) if i else None
        if unknown and owner:
            return f"{path_to(i, _indent(line))}: {owner.group(1)} has no option {unknown.group(1)!r}."
    if len(keys) < 2:
        return ""
    deepest = max(keys, key=lambda k: (k[1], -k[0]))
    block = []
    for line in lines[deepest[0] + 1 :]:
        if line.strip() and _indent(line) <= deepest[1]:
            break
        block.append(line.strip())
    given: str | None = None
    expected: list[str] = []
    for line in block:
        if line.startswith("Given value:"):
            given = line.split(":", 1)[1].split(". Got value:")[0].strip()
        elif (union := re.match(r"- Expected a (.+)$", line)) is not None:
            expected.append(_expected(union.group(1)))
        elif (single := re.match(r"Expected a (.+?)\. Got value: (.*)$", line)) is not None:
            expected, given = [_expected(single.group(1))], single.group(2).strip()
    if given is None:
        return ""
    want = f"; expected {' or '.join(expected)}" if expected else ""
    return f"{path_to(deepest[0], deepest[1])}: invalid value {given!r}{want}."


def _debug() -> bool:
    """Whether ``JSONARGPARSE_DEBUG=true``: errors are raised with their traceback (jsonargparse's own setting)."""
    return os.environ.get(_DEBUG_ENV, "").strip().lower() == "true"


class LitMoFOArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors give the reason first and no usage text (``--help`` has it)."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or _debug():
            super().error(message, ex)
        summary = _condensed_parser_error(message)
        prog = self.prog.replace(" [options]", "")
        text = f"error: {summary}\n\nThe parser's full message:\n{message}" if summary else f"error: {message}"
        sys.stderr.write(f"{text}\n\ntip: `{prog} --help` lists the options; {_DEBUG_ENV}=true shows the traceback.\n")
        self.exit(2)


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from, outermost first."""
    chain, seen = [error], {id(error)}
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(cause)
    return chain


# jsonargparse's own words for "this alternative of a union did not fit", which hide the constructor's error.
_GENERIC_REASON = re.compile(
    r"(Expected a |Expected an instantiatable class|Does not validate against any of the Union subtypes|"
    r"Not a valid subclass of|Problem with given class_path|Type .* expects a function|Parser key|"
    r"Subclass types expect|Import path .* does not|Given value)"
)


def _alternatives(text: str) -> list[str]:
    """The errors jsonargparse lists for the alternatives of a union (``Errors:`` then ``- ...`` items), each with
    its continuation lines."""
    lines = text.splitlines()
    items: list[str] = []
    for i, line in enumerate(lines):
        item = re.match(r"(\s*)- (.*)$", line)
        if item is None:
            continue
        parts, depth = [item.group(2)], len(item.group(1))
        for following in lines[i + 1 :]:
            if not following.strip() or _indent(following) <= depth or following.lstrip().startswith("- "):
                break
            parts.append(following.strip())
        items.append(" ".join(parts))
    return items


def _instantiation_error(error: BaseException, config: Namespace) -> str:
    """The reason a class of the config could not be built, first: the constructor's own message.

    A constructor's error reaches here wrapped by jsonargparse: as the start of the exception chain, or, for a value
    that may be one of several types (a probe, a mapping of probes, a sequence of probes), only as one line of a
    union's "Errors:" list whose first item is jsonargparse's ("Expected an instantiatable class, but ... is
    abstract"). That line is found, and prefixed with the config key of the class that raised it when the message
    names the class.
    """
    chain = _chain(error)
    innermost = chain[-1]
    if isinstance(innermost, MisconfigurationException):
        return str(innermost)
    if not _GENERIC_REASON.match(str(innermost)):
        return f"{type(innermost).__name__}: {innermost}"
    for link in chain:
        for reason in _alternatives(str(link)):
            if not _GENERIC_REASON.match(reason):
                key = _key_of(reason, config)
                return f"{key}: {reason}" if key else reason
    return f"{type(innermost).__name__}: {innermost}"


def _key_of(reason: str, config: Namespace) -> str | None:
    """The config key of the class whose constructor wrote ``reason`` (it starts with the class name), when one
    class spec of that name fits (several: the one whose argument values the message quotes)."""
    named = re.match(r"([A-Za-z_]\w*)\b", reason)
    if named is None:
        return None
    specs = [
        (key.replace(".init_args", ""), init_args)
        for key, class_path, init_args in _class_specs(config)
        if class_path.rpartition(".")[2] == named.group(1)
    ]
    if len(specs) > 1:
        specs = [(key, args) for key, args in specs if any(repr(v) in reason for v in args.values() if v is not None)]
    return specs[0][0] if len(specs) == 1 else None


# ---------------------------------------------------------------------------------------------------- checkpoints
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def _is_local(ckpt_path: str) -> bool:
    return ckpt_path not in _SPECIAL_CKPT_PATHS and "://" not in ckpt_path and not ckpt_path.startswith("registry:")


def _model_hyper_parameters(config: Namespace) -> dict[str, Any]:
    """The hyper-parameters the configured model would save (``_class_path`` and its plain init arguments), to tell
    a checkpoint of this run from one of another model."""
    model = config.get("model")
    if isinstance(model, Namespace):
        model = model.as_dict()
    if not isinstance(model, dict) or not isinstance(model.get("class_path"), str):
        return {}
    init_args = model.get("init_args") or {}
    plain = {
        key: value
        for key, value in dict(init_args).items()
        if not (isinstance(value, dict) and "class_path" in value)  # optimizers, schedulers, adapters: not saved
    }
    return {"_class_path": model["class_path"], **plain}


def _checkpoint_directories(config: Namespace) -> list[Path]:
    """Where the configured run writes its checkpoints: each ``ModelCheckpoint``'s ``dirpath``, the
    ``version_*/checkpoints`` directories of the logger's runs (the ``lit-mofo`` default: ``<default_root_dir>/
    lightning_logs``), and ``<default_root_dir>/checkpoints`` (Lightning's place without a logger)."""
    trainer = config.get("trainer")
    trainer = trainer.as_dict() if isinstance(trainer, Namespace) else dict(trainer or {})
    root = Path(trainer.get("default_root_dir") or os.getcwd()).expanduser()
    directories = [
        Path(str(init_args["dirpath"])).expanduser()
        for _, class_path, init_args in _class_specs(trainer.get("callbacks"))
        if class_path.rpartition(".")[2] == "ModelCheckpoint" and init_args.get("dirpath")
    ]
    logger = trainer.get("logger")
    runs = [root / "lightning_logs"] if logger in (None, True) else []
    for _, _, init_args in _class_specs(logger) if logger not in (None, True, False) else ():
        runs.append(Path(str(init_args.get("save_dir") or root)).expanduser() / str(init_args.get("name") or ""))
    for run in runs:
        directories += sorted(run.glob("version_*/checkpoints"))
    return [*directories, root / "checkpoints"]


def _resume_hint(path: Path, hyper_parameters: dict[str, Any]) -> str:
    """What to resume from instead of the unusable checkpoint ``path`` (see
    :func:`~lit_mofo.checkpoints.replacement_checkpoint`)."""
    found = replacement_checkpoint(path, hyper_parameters)
    if found is None:
        return f"There is no other complete checkpoint of this run in {path.parent}; start without --ckpt_path."
    other, before = found
    which = "The previous" if before else "The newest"
    return (
        f"{which} complete checkpoint of this run in that directory is {other}: resume from it with --ckpt_path {other}"
    )


def _ckpt_path_problem(value: str, config: Namespace, subcommand: str) -> str | None:
    """The message for a local ``--ckpt_path`` that is missing, incomplete, damaged or not a Lightning checkpoint
    that can continue this run, else None. Reads the archive's table of contents (or a sharded checkpoint's metadata)
    and the pickled entries without the tensors."""
    path = Path(value).expanduser()
    hyper_parameters = _model_hyper_parameters(config)
    if not path.exists() and not path.parent.is_dir():
        return f"--ckpt_path {value}: no such file, and no directory {path.parent}."
    problem = checkpoint_problem(path)
    if problem is not None:
        what = ": no such file" if not path.exists() else f" is not a valid checkpoint: {problem}"
        return f"--ckpt_path {value}{what}. {_resume_hint(path, hyper_parameters)}"
    try:
        meta = read_checkpoint_meta(path)
    except Exception as error:  # whatever unpickling a foreign file raises
        return f"--ckpt_path {value} cannot be read as a checkpoint ({type(error).__name__}: {error})."
    if "pytorch-lightning_version" not in meta:
        keys = sorted(map(str, meta))[:6]
        return (
            f"--ckpt_path {value} is not a checkpoint written by Lightning (no 'pytorch-lightning_version' entry; it "
            f"holds {keys}): it cannot resume a fit. To start from weights saved by another program, load them into "
            "the model (CausalLMModule(model=...) takes a save_pretrained directory); to continue a run, give one of "
            f"its checkpoints. {_resume_hint(path, hyper_parameters)}"
        )
    if subcommand == "fit":
        edited = applied_edit(meta)
        if edited is not None:
            return (
                f"--ckpt_path {value} holds the weights TaskVectorScaling edited at the end of its fit ({edited}: "
                "θ₀ + λ·Δ), not the fine-tune's, while its optimizer state is the fine-tune's: training on from it "
                "would mix the two, and a second sweep would edit the edit. To train further, resume from a "
                "checkpoint written before the edit (one of an earlier step, or of a ModelCheckpoint with a monitor, "
                "which keeps the weights its score was measured on); to fine-tune the edited model anew, load its "
                "weights without --ckpt_path; to evaluate it, use `lit-mofo validate` or `test` with --ckpt_path."
            )
    return None


def _saved_weight_names(path: Path) -> set[str]:
    """The names in the checkpoint's ``state_dict``: a file's keys (tensors not read), or the ``state_dict.*``
    entries of a sharded checkpoint's metadata."""
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        return {key.removeprefix("state_dict.") for key in keys if key.startswith("state_dict.")}
    return set(read_checkpoint_meta(path).get("state_dict") or {})


def _run_dir_of(ckpt_path: str | None) -> Path | None:
    """The logger version directory holding ``ckpt_path`` (``<save_dir>/<name>/<version>/checkpoints/X.ckpt``), or
    None when the checkpoint is elsewhere."""
    if not ckpt_path or ckpt_path in _SPECIAL_CKPT_PATHS or "://" in ckpt_path:
        return None
    path = Path(ckpt_path).expanduser().resolve()
    run_dir = path.parent.parent
    if path.parent.name != "checkpoints" or not any(
        (run_dir / name).is_file() for name in ("metrics.csv", "hparams.yaml", "config.yaml")
    ):
        return None
    return run_dir


# ---------------------------------------------------------------------------------------------------- logging
class _ContinuingWriter(ExperimentWriter):
    """ExperimentWriter that appends to an existing ``metrics.csv`` (Lightning's deletes it) and counts its rows."""

    def __init__(self, log_dir: str) -> None:
        self.rows = 0
        super().__init__(log_dir)

    @override
    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            self.metrics_keys = list(reader.fieldnames or [])
            self.rows = sum(1 for _ in reader)

    @override
    def save(self) -> None:
        pending = len(self.metrics)
        super().save()
        self.rows += pending

    def keep(self, rows: int | None = None, up_to_step: int | None = None) -> None:
        """Drop the rows of ``metrics.csv`` after the first ``rows`` (or after those with ``step <= up_to_step``)."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            fieldnames = list(reader.fieldnames or [])
            kept = list(reader)
        if rows is not None:
            kept = kept[:rows]
        if up_to_step is not None:
            kept = [row for row in kept if not row.get("step") or float(row["step"]) <= up_to_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(kept)
        self.rows = len(kept)


class _RunLogger(CSVLogger):
    """The ``lit-mofo`` default logger: Lightning's CSVLogger, continuing an existing version directory (a resumed
    fit) instead of emptying it, and removing the directory it created when a run fails before logging anything."""

    _LEFTOVERS = frozenset({"config.yaml", "hparams.yaml", "checkpoints"})

    def __init__(self, save_dir: str, name: str = "lightning_logs", version: str | int | None = None) -> None:
        super().__init__(save_dir, name=name, version=version)
        self.continues = version is not None and Path(self.log_dir).is_dir()

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status != "failed" or self.continues:
            return
        log_dir = Path(self.log_dir)
        if not log_dir.is_dir():
            return
        entries = list(log_dir.iterdir())
        checkpoints = log_dir / "checkpoints"
        if all(e.name in self._LEFTOVERS for e in entries) and not (
            checkpoints.is_dir() and any(checkpoints.iterdir())
        ):
            for entry in entries:
                entry.rmdir() if entry.is_dir() else entry.unlink()
            log_dir.rmdir()
            with contextlib.suppress(OSError):  # the `lightning_logs` it made, unless other runs are there
                log_dir.parent.rmdir()


class _ContinueMetrics(Callback):
    """Makes a resumed fit's ``metrics.csv`` continue exactly where its checkpoint was written.

    Every checkpoint records how many rows the run's ``metrics.csv`` had (after writing out the buffered ones, so a
    crash loses none of them); resuming into that run's directory keeps those rows and drops the ones logged after
    the checkpoint, which the resumed fit logs again. Checkpoints without the count keep the rows up to their step.
    """

    def __init__(self) -> None:
        self._trainer: Trainer | None = None

    def _writer(self, trainer: Trainer) -> _ContinuingWriter | None:
        logger = trainer.logger
        if not isinstance(logger, _RunLogger) or not trainer.is_global_zero:
            return None
        return logger.experiment

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def state_dict(self) -> dict[str, Any]:
        writer = None if self._trainer is None else self._writer(self._trainer)
        if writer is None:
            return {}
        writer.save()
        return {"metrics_rows": writer.rows}

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        writer = self._writer(trainer)
        if writer is None or not trainer.logger.continues:  # type: ignore[union-attr]  # _writer: a _RunLogger
            return
        rows = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("metrics_rows")
        if rows is not None:
            writer.keep(rows=rows)
        else:
            writer.keep(up_to_step=int(checkpoint.get("global_step", 0)))


class _ProgressBarFixes(ProgressBar):
    """Lightning's progress bar with two fixes for step-limited runs (``max_steps`` set, so ``max_epochs == -1``).

    The epoch's total counts the batches already seen in it, so a fit resumed mid-epoch shows ``150/200``, not
    ``150/99``; and gradient accumulation is taken into account (``max_steps`` counts optimizer steps).
    """

    @property
    @override
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            seen = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return min(trainer.num_training_batches, seen + remaining)
        return trainer.num_training_batches

    @override
    def get_metrics(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        """The metrics, with ``v_num`` the run's version number as text (``v_num: 2``): not ``0.000`` (the rich bar
        formats numbers as floats) nor the last 4 letters of ``version_2`` (``on_2``) after a resume."""
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        if "v_num" in items:
            versions = [_version_number(logger.version) for logger in trainer.loggers]
            items["v_num"] = "_".join(dict.fromkeys(v for v in versions if v))
        return items


def _version_number(version: int | str | None) -> str:
    """``2`` for ``2`` and ``"version_2"``; any other version as it is."""
    if version is None:
        return ""
    match = re.fullmatch(r"version_(\d+)", str(version))
    return match.group(1) if match else str(version)


class _RichBar(_ProgressBarFixes, RichProgressBar):
    @override
    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:  # "Epoch 0/-2": no epoch limit
            description = description.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
        return description


class _TQDMBar(_ProgressBarFixes, TQDMProgressBar):
    pass


# ---------------------------------------------------------------------------------------------------- SIGTERM
class _CheckpointOnSigterm(Callback):
    """Saves a checkpoint when a fit is stopped by SIGTERM (what schedulers send before preemption).

    Lightning turns SIGTERM into a ``SIGTERMException`` at the end of the training step it arrives in (a
    ``SystemExit`` with exit status 0). This callback writes that step's checkpoint beside the ``ModelCheckpoint``'s
    (same directory and naming, e.g. ``epoch=0-step=137.ckpt``; ``<log dir>/checkpoints`` without one) — the
    state at the end of a complete step, so it resumes like any other. :class:`LitMoFOCLI` then prints where it
    stopped and how to resume, and exits with status 143 (128 + SIGTERM), so the job reads as interrupted.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.path: Path | None = None

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        self.step = trainer.global_step
        saver = trainer.checkpoint_callback
        if saver is not None and getattr(saver, "dirpath", None):
            path = Path(saver.format_checkpoint_name({"epoch": trainer.current_epoch, "step": trainer.global_step}))
        else:
            path = (
                Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / f"step={trainer.global_step}.ckpt"
            )
        if not path.exists():  # ModelCheckpoint may have written this step already
            trainer.save_checkpoint(path, weights_only=False)
        self.path = path


def _resume_command(argv: list[str] | None, checkpoint: Path) -> str:
    """The command that continues the run: the same arguments with ``--ckpt_path`` pointing at ``checkpoint``."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "lit-mofo"
    if program.endswith(".py"):
        program = "lit-mofo" if Path(sys.argv[0]).resolve() == Path(__file__).resolve() else f"python {sys.argv[0]}"
    if argv is None:
        return f"{program} fit <the same arguments> --ckpt_path {shlex.quote(str(checkpoint))}"
    kept: list[str] = []
    skip = False
    for argument in argv:
        if skip:
            skip = False
            continue
        if argument == "--ckpt_path":
            skip = True
            continue
        if not argument.startswith("--ckpt_path="):
            kept.append(argument)
    return shlex.join([*program.split(), *kept, f"--ckpt_path={checkpoint}"])


# ---------------------------------------------------------------------------------------------------- the CLI
def _class_specs(node: Any, key: str = "") -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(config key, class_path, init_args)`` of every ``class_path`` entry in a parsed config."""
    if isinstance(node, Namespace):
        node = node.as_dict()
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield key, node["class_path"], dict(node.get("init_args") or {})
        for name, value in node.items():
            if name != "class_path":
                yield from _class_specs(value, f"{key}.{name}" if key else name)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _class_specs(value, f"{key}[{index}]")


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


class LitMoFOCLI(LightningCLI):
    """LightningCLI with any LightningModule/LightningDataModule subclass selectable by ``class_path``, argument checks
    before anything is built, and resumes that continue their run (see the module docstring).

    One option beyond LightningCLI's: ``torch_num_threads`` (``torch.set_num_threads`` before anything is built).
    Small models on a CPU are bound by per-op overhead, and on a shared or small machine one thread per process is
    often several times faster than the default of one per core (measured 14 s vs 229 s for the quickstart's fit
    on a loaded 2-core machine); the scenario configs set it to 1.

    The resolved config is saved next to the logs (``config.yaml`` in the run's log dir), overwriting a previous
    one in the same directory (a resumed fit records its own).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_known_notices()
        given = kwargs.get("args")
        self._argv: list[str] | None = (
            list(sys.argv[1:]) if given is None else [str(a) for a in given] if isinstance(given, list) else None
        )
        kwargs.setdefault("parser_class", LitMoFOArgumentParser)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--torch_num_threads",
            type=PositiveInt | None,
            default=None,
            help="torch.set_num_threads for each process before training (None: torch's default, one per core).",
        )

    def _subcommand_config(self) -> Namespace:
        return self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config

    def _fail(self, message: str) -> NoReturn:
        self._parser(self.subcommand).error(message)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI reads the checkpoint's hyper-parameters (torch.load of the whole file).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        config = self.config[subcommand]
        if str(ckpt_path) == "last":
            self.config[subcommand]["ckpt_path"] = self._last_checkpoint(config)
        elif _is_local(str(ckpt_path)):
            problem = _ckpt_path_problem(str(ckpt_path), config, subcommand)
            if problem is not None:
                self._parser(subcommand).error(problem)

    @override
    def _parse_ckpt_path(self) -> None:
        """Take the model's hyper-parameters from the ``--ckpt_path`` file, as LightningCLI does, reading only its
        pickled entries (not the weights) and also when it was written outside LightningCLI: its hyper-parameters
        are then those of the configured model class, and a clear error says when they do not fit it."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(str(ckpt_path)).expanduser().is_file():
            return
        hparams = dict(read_checkpoint_meta(Path(str(ckpt_path)).expanduser()).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = hparams.pop("_class_path", None)
        if class_path is not None:  # written by LightningCLI: its own model class
            model: dict[str, Any] = {"class_path": class_path, "dict_kwargs": hparams}
        else:
            configured = _model_hyper_parameters(self.config[subcommand]).get("_class_path")
            if configured is None:
                return
            model = {"class_path": configured, "init_args": hparams}
        parser = self._parser(subcommand)
        exit_on_error, parser.exit_on_error = parser.exit_on_error, False
        try:
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        except Exception as error:
            if _debug():
                raise
            reason = _condensed_parser_error(str(error)) or str(error).splitlines()[0]
            self._parser(subcommand).error(
                f"--ckpt_path {ckpt_path} was written by a model whose hyper-parameters ({sorted(hparams)}) do not "
                f"fit the configured {model['class_path']}: {reason} Resume with the config it was written with (its "
                "run directory's config.yaml), or start without --ckpt_path."
            )
        finally:
            parser.exit_on_error = exit_on_error

    @staticmethod
    def _last_checkpoint(config: Namespace) -> str | None:
        """``--ckpt_path last``: the newest complete checkpoint of this run (the same model hyper-parameters) where
        the configured run writes them, or None (a fresh start) when there is none."""
        directories = _checkpoint_directories(config)
        found = newest_complete_checkpoint(directories, _model_hyper_parameters(config))
        if found is None:
            where = ", ".join(str(d) for d in directories[:3]) + (", ..." if len(directories) > 3 else "")
            rank_zero_info(
                f"--ckpt_path last: no complete checkpoint of this run in {where}; starting from the beginning."
            )
            return None
        rank_zero_info(f"--ckpt_path last: resuming from the newest complete checkpoint of this run, {found}")
        return str(found)

    def _check_checkpoint_fits_the_run(self) -> None:
        """Refuse a ``--ckpt_path`` that this Trainer's strategy cannot load, or that holds another model's weights,
        now that both are built (before anything is restored)."""
        ckpt_path = self._subcommand_config().get("ckpt_path")
        if not ckpt_path or not _is_local(str(ckpt_path)):
            return
        path = Path(str(ckpt_path)).expanduser()
        strategy = self.trainer.strategy
        if path.is_dir() and not isinstance(strategy, ModelParallelStrategy):
            self._fail(
                f"--ckpt_path {ckpt_path} is a sharded checkpoint (a torch.distributed.checkpoint directory written "
                f"by ModelParallelStrategy/FSDP2), which `{type(strategy).__name__}` cannot load: it reads a single "
                "checkpoint file. Resume it with the strategy that wrote it (ModelParallelStrategy, with any number of "
                "processes: it reshards), or have that run write single files with "
                "`ModelParallelStrategy(save_distributed_checkpoint=False)`. For the weights alone: "
                f"`python -m torch.distributed.checkpoint.format_utils dcp_to_torch {ckpt_path} weights.pt`."
            )
        expected = set(self.model.state_dict())
        if not expected or not self.model.strict_loading:
            return
        saved = _saved_weight_names(path)
        missing = sorted(expected - saved)
        if saved and missing:
            unexpected = sorted(saved - expected)
            meta = read_checkpoint_meta(path)
            written_by = (meta.get("hyper_parameters") or {}).get("_class_path") or "another module"
            self._fail(
                f"--ckpt_path {ckpt_path} holds the weights of another model: {len(missing)} of this model's "
                f"{len(expected)} tensors are not in it (e.g. {missing[:2]})"
                + (
                    f" and {len(unexpected)} of its tensors are not in this model (e.g. {unexpected[:2]})"
                    if unexpected
                    else ""
                )
                + f". It was written by {written_by} with other settings (an adapter, another architecture). Resume "
                "with the config it was written with (its run directory's config.yaml), or start without --ckpt_path."
            )

    def before_fit(self) -> None:
        self._check_checkpoint_fits_the_run()

    def before_validate(self) -> None:
        self._check_checkpoint_fits_the_run()

    def before_test(self) -> None:
        self._check_checkpoint_fits_the_run()

    def before_predict(self) -> None:
        self._check_checkpoint_fits_the_run()

    @override
    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        threads = config.get("torch_num_threads")
        if threads is not None:
            torch.set_num_threads(threads)
        self._check_optimizers(config)
        self._share_tokenizer(config)
        self._check_sources(config)

    def _share_tokenizer(self, config: Namespace) -> None:
        """One tokenizer for the model and the data: a ``data.init_args.tokenizer`` alone becomes the model's too
        (the model, its probes and the data then tokenize alike); two different ones are refused now, naming both
        keys, instead of failing after the model has loaded."""
        model, data = config.get("model"), config.get("data")
        model_args = model.get("init_args") if isinstance(model, Namespace) else None
        data_args = data.get("init_args") if isinstance(data, Namespace) else None
        if not isinstance(model_args, Namespace) or not isinstance(data_args, Namespace):
            return
        if "tokenizer" not in model_args or "tokenizer" not in data_args:
            return  # one of the classes takes no tokenizer
        ours, theirs = model_args.get("tokenizer"), data_args.get("tokenizer")
        if ours is not None and theirs is not None and ours != theirs:
            self._fail(
                f"model.init_args.tokenizer={ours!r} and data.init_args.tokenizer={theirs!r} differ: the model, its "
                "probes and the data must tokenize alike. Set the tokenizer once, on the model "
                "(--model.init_args.tokenizer): the data takes the model's."
            )
        if ours is None and theirs is not None:
            model_args["tokenizer"] = theirs

    def _check_sources(self, config: Namespace) -> None:
        """Before anything is built: every model, tokenizer, dataset and lm-eval task the config names can be
        loaded — a local path that exists, or a Hub name that is cached or reachable — so that a typo or a missing
        network fails now, in seconds, not after a model has loaded."""
        from lit_mofo import _hub
        from lit_mofo.data.instruction import InstructionDataModule
        from lit_mofo.modules.causal_lm import CausalLMModule
        from lit_mofo.probes.lm_eval import LMEvalProbe

        specs = [(key, _import(class_path), init_args) for key, class_path, init_args in _class_specs(config)]
        expensive = [spec for spec in specs if isinstance(spec[1], type) and issubclass(spec[1], LMEvalProbe)]
        for key, cls, init_args in [spec for spec in specs if spec not in expensive] + expensive:  # cheap ones first
            if not isinstance(cls, type):
                continue
            try:
                if issubclass(cls, CausalLMModule):
                    local_only = (init_args.get("from_pretrained_kwargs") or {}).get("local_files_only")
                    model = init_args.get("model")
                    if isinstance(model, str) and not model.startswith("scenario:") and not local_only:
                        _hub.resolve_pretrained(model, argument=f"{key}.init_args.model")
                    if isinstance(init_args.get("tokenizer"), str) and not local_only:
                        _hub.resolve_pretrained(
                            init_args["tokenizer"],
                            argument=f"{key}.init_args.tokenizer",
                            marker="tokenizer_config.json",
                        )
                elif issubclass(cls, InstructionDataModule) and isinstance(init_args.get("dataset"), str):
                    dataset = init_args["dataset"]
                    if not Path(dataset).expanduser().exists():
                        if not _hub.is_hub_name(dataset):
                            raise MisconfigurationException(
                                f"{key}.init_args.dataset: no such directory or file: {dataset!r} (cwd: {os.getcwd()})."
                            )
                        _hub.require_dataset(dataset, argument=f"{key}.init_args.dataset")
                elif issubclass(cls, LMEvalProbe):
                    parameters = inspect.signature(cls).parameters
                    cls(**{k: v for k, v in init_args.items() if k in parameters}).check_data()
            except MisconfigurationException as error:
                if _debug():
                    raise
                self._fail(str(error))

    def _check_optimizers(self, config: Namespace) -> None:
        """Build every configured torch or lit_mofo optimizer once on a dummy parameter: its own checks of the
        hyper-parameters run now, before the model loads (LightningCLI builds optimizers in ``configure_optimizers``,
        after the model). Other libraries' optimizers may need real parameters (a device, a type) to be built; they
        are left to ``configure_optimizers``."""
        for key, class_path, init_args in _class_specs(config):
            cls = _import(class_path)
            if not (
                isinstance(cls, type)
                and issubclass(cls, torch.optim.Optimizer)
                and cls.__module__.startswith(("torch.optim", "lit_mofo."))
            ):
                continue
            try:
                cls([torch.nn.Parameter(torch.zeros(2, 2))], **init_args)
            except Exception as error:
                if _debug():
                    raise
                self._fail(f"{key} ({class_path}): {error}")

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            if _debug():
                raise
            self._fail(_instantiation_error(error, self._subcommand_config()))

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = self._default_logger(trainer_config.get("default_root_dir"))
            callbacks.append(_ContinueMetrics())
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(_RichBar() if _RICH_AVAILABLE else _TQDMBar())
        callbacks.append(_CheckpointOnSigterm())
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        save_checkpoints_atomically(trainer.strategy)  # a killed save never leaves a checkpoint that cannot load
        return trainer

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``; a fit stopped by SIGTERM names its checkpoint, says how to resume and exits with status
        143 (Lightning's ``SIGTERMException`` would exit with 0, as if the job had succeeded)."""
        try:
            self.trainer.fit(**kwargs)
        except SIGTERMException:
            saver = next(c for c in self.trainer.callbacks if isinstance(c, _CheckpointOnSigterm))
            if self.trainer.is_global_zero:
                where = (
                    f"; its checkpoint is {saver.path}. Resume with:\n  {_resume_command(self._argv, saver.path)}"
                    if saver.path is not None
                    else " (no checkpoint was written)."
                )
                sys.stderr.write(f"\nlit-mofo: stopped by SIGTERM at step {saver.step}{where}\n")
                sys.stderr.flush()
            raise SystemExit(128 + signal.SIGTERM) from None

    def _default_logger(self, default_root_dir: str | None) -> _RunLogger:
        run_dir = _run_dir_of(self._subcommand_config().get("ckpt_path")) if self.subcommand == "fit" else None
        if run_dir is None:
            return _RunLogger(save_dir=default_root_dir or os.getcwd())
        # The resumed fit continues the run it belongs to: same version directory, checkpoints included, whatever
        # the current directory or default_root_dir. ModelCheckpoint would warn that its directory is not empty.
        warnings.filterwarnings(
            "ignore", message=re.escape(f"Checkpoint directory {run_dir / 'checkpoints'} exists and is not empty.")
        )
        return _RunLogger(save_dir=str(run_dir.parent.parent), name=run_dir.parent.name, version=run_dir.name)


def main(args: ArgsType = None, run: bool = True, **kwargs: Any) -> LitMoFOCLI:
    """Entry point of the ``lit-mofo`` console script; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    return LitMoFOCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        **kwargs,
    )


def console_main() -> int:
    """The ``lit-mofo`` console script: :func:`main` on ``sys.argv``, exit status 0 once the subcommand has run.

    (Installers wrap the entry point in ``sys.exit(...)``; returning the CLI object from there would print it and
    exit with status 1 after a successful fit.) A failing run raises, which exits non-zero.
    """
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(console_main())
