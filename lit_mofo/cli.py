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
- **Checkpoints.** A ``--ckpt_path`` that is missing, empty, cut short, an incomplete sharded directory or not a
  checkpoint is refused up front, naming the newest complete checkpoint of the same run before it in that directory
  (:func:`~lit_mofo.checkpoints.resume_problem`); another program's file and a checkpoint that ``TaskVectorScaling``
  rewrote with an edit (for ``fit``) too. Once the model and the Trainer are built, and before anything is restored,
  a checkpoint of another model or a sharded directory given to a strategy that reads single files is refused with
  the fix (:func:`~lit_mofo.checkpoints.load_problem`). A checkpoint written outside LightningCLI gives its
  hyper-parameters to the configured model class. ``--ckpt_path last`` resumes from the newest complete checkpoint of
  this run (the same model hyper-parameters) where the configured run writes checkpoints, or starts afresh.
- **Resume continues the run.** ``fit --ckpt_path .../lightning_logs/version_N/checkpoints/X.ckpt`` logs into
  ``version_N`` again (:meth:`~lit_mofo.loggers.ResumableCSVLogger.for_run`): ``metrics.csv`` keeps the rows logged
  before the checkpoint was written and continues after them, and the end-of-fit report lands next to them. With
  the project's data modules (see :class:`~lit_mofo.data.ResumableDataLoader`) a resumed fit ends bit-identical to
  the uninterrupted one, on one process, under DDP and FSDP2.
- **SIGTERM** (a scheduler's preemption) stops a fit at the end of its step with a checkpoint of that step
  (:class:`~lit_mofo.checkpoints.CheckpointOnSigterm`), a line ``lit-mofo: stopped by SIGTERM at step N; its
  checkpoint is PATH. Resume with: ...`` and exit status 143.

What the command adds to a run is in the config, where ``--print_config`` shows it and a config can change it:

- ``trainer.logger``: :class:`~lit_mofo.loggers.ResumableCSVLogger` by default (the parser's default, so
  ``--print_config`` shows it for any config; ``true`` or ``null`` mean it too), under ``default_root_dir`` unless
  given a ``save_dir``; ``false`` or another logger replace it.
- ``trainer.callbacks``: the shipped configs name the run's four callbacks first in their lists:
  :class:`~lit_mofo.checkpoints.AtomicCheckpoints` (no crash leaves a torn checkpoint),
  :class:`~lit_mofo.checkpoints.CheckpointOnSigterm`, :class:`~lit_mofo.loggers.ContinueCSVMetrics` (the logger's
  rows in every checkpoint) and :class:`~lit_mofo.progress.ProgressBarFixes` (``Epoch N`` without ``/-2``, a resumed
  epoch counted from its start, the run's version number). A config that does not name one of them gets it added
  (first, so that the SIGTERM checkpoint is written before other callbacks react to the stop), with an info line
  naming what was added; ``default_callbacks: false`` gives the Trainer exactly the callbacks the config names.
- ``quiet_notices`` (default true): Lightning's install tips, its tensorboardX notice and the deprecation warnings
  raised inside Lightning, peft and transformers that a user cannot act on are hidden
  (:func:`lit_mofo.notices.quiet_known_notices`) while the command builds and runs, and the process's warning and
  logging filters are put back as they were when it returns. ``false`` shows them.
- ``torch_num_threads`` (default none): ``torch.set_num_threads`` before anything is built; it stays set.

Nothing happens to the process when this module is imported or before the config is parsed.

Example::

    lit-mofo fit --config configs/quickstart.yaml
    lit-mofo fit --config configs/quickstart.yaml --ckpt_path lightning_logs/version_0/checkpoints/epoch=0-step=100.ckpt
    lit-mofo fit --config configs/recipes/qwen2.5-0.5b_metamath_mofo.yaml --print_config
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace
from jsonargparse.typing import PositiveInt
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger
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
from lit_mofo.checkpoints import (
    AtomicCheckpoints,
    CheckpointOnSigterm,
    is_local_checkpoint_path,
    load_problem,
    newest_complete_checkpoint,
    read_checkpoint_meta,
    resume_problem,
)
from lit_mofo.loggers import ContinueCSVMetrics, ResumableCSVLogger
from lit_mofo.notices import quiet_known_notices
from lit_mofo.progress import ProgressBarFixes

__all__ = ["LitMoFOCLI", "console_main", "main", "quiet_known_notices"]

_DEBUG_ENV = "JSONARGPARSE_DEBUG"
_DEFAULT_LOGGER = "lit_mofo.loggers.ResumableCSVLogger"


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


# ---------------------------------------------------------------------------------------------------- config
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

    Options beyond LightningCLI's, each shown by ``--print_config``:

    - ``torch_num_threads``: ``torch.set_num_threads`` before anything is built. Small models on a CPU are bound by
      per-op overhead, and on a shared or small machine one thread per process is often several times faster than
      the default of one per core (measured 14 s vs 229 s for the quickstart's fit on a loaded 2-core machine); the
      scenario configs set it to 1.
    - ``quiet_notices``: hide the known notices while the command runs (default true).
    - ``default_callbacks``: add the run callbacks the config does not name (default true).

    The resolved config is saved next to the logs (``config.yaml`` in the run's log dir), overwriting a previous
    one in the same directory (a resumed fit records its own).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        self._argv: list[str] | None = (
            list(sys.argv[1:]) if given is None else [str(a) for a in given] if isinstance(given, list) else None
        )
        self._quiet: quiet_known_notices | None = None
        kwargs.setdefault("parser_class", LitMoFOArgumentParser)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self._quiet is not None:  # the filters of quiet_notices end with the command
                self._quiet.__exit__(None, None, None)
                self._quiet = None

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--torch_num_threads",
            type=PositiveInt | None,
            default=None,
            help="torch.set_num_threads for each process before training (None: torch's default, one per core).",
        )
        parser.add_argument(
            "--quiet_notices",
            type=bool,
            default=True,
            help="Hide the notices every run prints that are not about the run (Lightning's install tips and "
            "tensorboardX notice, deprecation warnings raised inside Lightning, peft and transformers; see "
            "lit_mofo.notices) while the command runs; the process's filters are put back when it returns.",
        )
        parser.add_argument(
            "--default_callbacks",
            type=bool,
            default=True,
            help="Add the run callbacks that trainer.callbacks does not name: lit_mofo.checkpoints.AtomicCheckpoints, "
            "lit_mofo.checkpoints.CheckpointOnSigterm, lit_mofo.progress.ProgressBarFixes and, with a "
            "ResumableCSVLogger, lit_mofo.loggers.ContinueCSVMetrics. false: exactly the callbacks the config names.",
        )
        parser.set_defaults({"trainer.logger": {"class_path": _DEFAULT_LOGGER}})

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
        elif is_local_checkpoint_path(str(ckpt_path)):
            problem = resume_problem(str(ckpt_path), _model_hyper_parameters(config), fitting=subcommand == "fit")
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
        if not ckpt_path or not is_local_checkpoint_path(str(ckpt_path)):
            return
        problem = load_problem(str(ckpt_path), self.trainer.strategy, self.model)
        if problem is not None:
            self._fail(problem)

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
        if config.get("quiet_notices", True) and self._quiet is None:
            self._quiet = quiet_known_notices()  # until the command returns (see __init__)
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
        config = self._subcommand_config()
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        logger = trainer_config.get("logger")
        if logger in (None, True):  # Lightning's "the default logger": lit-mofo's
            logger = ResumableCSVLogger()
        if isinstance(logger, ResumableCSVLogger):
            ckpt_path = config.get("ckpt_path") if self.subcommand == "fit" else None
            kwargs["logger"] = logger = logger.for_run(trainer_config.get("default_root_dir"), ckpt_path)
        if config.get("default_callbacks", True):
            given = trainer_config.get("callbacks") or []
            given = list(given) if isinstance(given, Sequence) else [given]
            added = _missing_run_callbacks(given, logger)
            if added:
                rank_zero_info(
                    f"lit-mofo adds the run callbacks the config does not name: {[type(c).__name__ for c in added]} "
                    "(name them under trainer.callbacks to see and configure them, or set default_callbacks: false)."
                )
                kwargs["callbacks"] = [*added, *given]
        return super().instantiate_trainer(**kwargs)

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``; a fit stopped by SIGTERM names its checkpoint, says how to resume and exits with status
        143 (Lightning's ``SIGTERMException`` would exit with 0, as if the job had succeeded)."""
        logger = self.trainer.logger
        try:
            with warnings.catch_warnings():
                if isinstance(logger, ResumableCSVLogger) and logger.continues:
                    # The resumed fit continues its run, checkpoints included: ModelCheckpoint would warn that their
                    # directory is not empty.
                    checkpoints = Path(logger.log_dir) / "checkpoints"
                    message = re.escape(f"Checkpoint directory {checkpoints} exists and is not empty.")
                    warnings.filterwarnings("ignore", message=message)
                self.trainer.fit(**kwargs)
        except SIGTERMException:
            saver = next((c for c in self.trainer.callbacks if isinstance(c, CheckpointOnSigterm)), None)
            if self.trainer.is_global_zero:
                path = None if saver is None else saver.path
                where = (
                    f"; its checkpoint is {path}. Resume with:\n  {_resume_command(self._argv, path)}"
                    if path is not None
                    else " (no checkpoint was written)."
                )
                step = self.trainer.global_step if saver is None else saver.step
                sys.stderr.write(f"\nlit-mofo: stopped by SIGTERM at step {step}{where}\n")
                sys.stderr.flush()
            raise SystemExit(128 + signal.SIGTERM) from None


def _missing_run_callbacks(given: list[Any], logger: Logger | bool | None) -> list[Callback]:
    """The run callbacks (see the module docstring) of which ``given`` has no instance."""
    wanted: list[Callback] = [AtomicCheckpoints(), CheckpointOnSigterm()]
    if isinstance(logger, ResumableCSVLogger):
        wanted.append(ContinueCSVMetrics())
    wanted.append(ProgressBarFixes())
    return [callback for callback in wanted if not any(isinstance(c, type(callback)) for c in given)]


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
