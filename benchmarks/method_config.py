"""The benchmarks' methods, one YAML file each in ``benchmarks/methods/`` (torchtune-style recipes of a method).

A method file holds what makes the method, in the keys and the ``class_path``/``init_args`` form that ``lit-mofo fit``
reads, so the same blocks can be pasted into a CLI config:

- ``model.init_args.optimizer``: the optimizer (``CausalLMModule(optimizer=...)``), e.g. ``lit_mofo.MoFO`` with its
  ``fraction``; its ``lr`` is the benchmark's (the LR sweep), whatever the file says;
- ``model.init_args.peft``: adapters (``peft.LoraConfig``), or absent;
- ``trainer.callbacks``: the method's callbacks (``HalfFineTuning``, ``L2ToPretrained``), or absent;

and three keys of the benchmarks' own: ``label`` (its name in tables and plots; ``continual_label`` where the
continual benchmark's reading of the same method differs), ``baseline: true`` for a method the kit's recipes are
compared with (full fine-tuning, L2, LoRA) rather than one of them, and ``post_hoc`` (``base``: a fitted method,
``edit``: ``wise_ft`` or ``lines``) for a row that edits another method's fits after training instead of fitting.

The blocks are parsed by a ``LightningArgumentParser`` whose types are ``CausalLMModule``'s and ``Trainer``'s
signatures (the CLI's parser class and types), so every ``init_args`` is checked against its class's constructor: a
file cannot drift from the callbacks it names. A method is named by its file's stem (``mofo_0.15``) or given as a path
to a YAML file of this form.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

METHODS_DIR = Path(__file__).resolve().parent / "methods"
EDITS = ("wise_ft", "lines")

__all__ = ["EDITS", "METHODS_DIR", "BuiltMethod", "MethodInfo", "available", "build_method", "method_info", "parse"]


@dataclass(frozen=True)
class MethodInfo:
    """A method file's own keys, read without importing torch (for argument checks and ``--from-json``)."""

    name: str
    path: Path
    label: str
    continual_label: str
    baseline: bool
    post_hoc: tuple[str, str] | None  # (the fitted method whose fits it edits, the edit family)


@dataclass
class BuiltMethod:
    """A method ready for one run: the optimizer factory, the adapters' config and fresh callback instances."""

    optimizer: Any
    peft: Any
    callbacks: list[Any]


def available() -> list[str]:
    """The names of the shipped method files (``benchmarks/methods/*.yaml``), sorted."""
    return sorted(path.stem for path in METHODS_DIR.glob("*.yaml"))


def _path_of(method: str) -> Path:
    path = METHODS_DIR / f"{method}.yaml"
    if path.is_file():
        return path
    given = Path(method)
    if given.suffix in (".yaml", ".yml") and given.is_file():
        return given.resolve()
    raise ValueError(
        f"{method!r} is not one of {', '.join(available())} (the files in {METHODS_DIR}), nor a path to a method YAML "
        "file: write one there (model.init_args.optimizer, trainer.callbacks, label) and name it"
    )


def method_info(method: str) -> MethodInfo:
    """The ``label``/``baseline``/``post_hoc`` of ``method`` (a shipped name or a YAML path); ValueError naming the
    valid names when there is no such file, or when its own keys are malformed."""
    path = _path_of(method)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("label"), str):
        raise ValueError(f"{path}: a method file needs `label: <its name in tables>` at the top level")
    post_hoc = data.get("post_hoc")
    if post_hoc is not None:
        if set(post_hoc) != {"base", "edit"} or post_hoc["edit"] not in EDITS or set(data) & {"model", "trainer"}:
            raise ValueError(
                f"{path}: a post-hoc row has `post_hoc: {{base: <a fitted method>, edit: one of {list(EDITS)}}}` and "
                f"no `model`/`trainer` of its own; got post_hoc={post_hoc!r}"
            )
        post_hoc = (str(post_hoc["base"]), str(post_hoc["edit"]))
    return MethodInfo(
        name=path.stem,
        path=path,
        label=data["label"],
        continual_label=str(data.get("continual_label", data["label"])),
        baseline=bool(data.get("baseline", False)),
        post_hoc=post_hoc,
    )


@functools.cache
def _parser() -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningArgumentParser

    from lit_mofo.modules import CausalLMModule

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--label", type=str, required=True)
    parser.add_argument("--continual_label", type=str | None, default=None)
    parser.add_argument("--baseline", type=bool, default=False)
    parser.add_argument("--post_hoc.base", type=str | None, default=None)
    parser.add_argument("--post_hoc.edit", type=str | None, default=None)
    # The CLI's own types: those of CausalLMModule's `optimizer`/`peft` and Trainer's `callbacks`, and nothing else.
    module_types = typing.get_type_hints(CausalLMModule.__init__)
    for argument in ("optimizer", "peft"):
        parser.add_argument(f"--model.init_args.{argument}", type=module_types[argument], default=None)
    parser.add_argument(
        "--trainer.callbacks", type=typing.get_type_hints(pl.Trainer.__init__)["callbacks"], default=None
    )
    return parser


def parse(method: str) -> Any:
    """``method``'s file parsed and checked against the constructors it names (a jsonargparse Namespace); ValueError
    naming the file and the problem."""
    info = method_info(method)
    parser = _parser()
    try:
        config = parser.parse_path(str(info.path))
    except Exception as error:  # jsonargparse's ArgumentError says which key and why
        raise ValueError(f"{info.path}: {error}") from error
    if info.post_hoc is None and config.model.init_args.optimizer is None:
        raise ValueError(f"{info.path}: a fitted method needs `model.init_args.optimizer` (class_path, init_args)")
    return config


def build_method(method: str, lr: float, redraw_every_n_steps: int | None = None) -> BuiltMethod:
    """Instantiate ``method`` for one run: its optimizer at learning rate ``lr``, its adapters' config and its
    callbacks, fresh. ``redraw_every_n_steps``, if given, replaces that option of every callback that re-draws on a
    step schedule (the forgetting benchmark's rounds of its budget)."""
    import warnings

    config = parse(method)
    if config.model.init_args.optimizer is None:
        raise ValueError(f"{method!r} is a post-hoc row: it has no fit of its own to build")
    config.model.init_args.optimizer.init_args.lr = lr
    for callback in config.trainer.callbacks or []:
        if redraw_every_n_steps is not None and getattr(callback.init_args, "redraw_every_n_steps", None) is not None:
            callback.init_args.redraw_every_n_steps = redraw_every_n_steps
    with warnings.catch_warnings():
        # peft's LoraConfig warns about a `loftq_config` that jsonargparse fills with its (unused) default.
        warnings.filterwarnings("ignore", message=".*loftq_config.*")
        built = _parser().instantiate(config)
    callbacks = built.trainer.callbacks or []
    return BuiltMethod(
        optimizer=built.model.init_args.optimizer,
        peft=built.model.init_args.peft,
        callbacks=list(callbacks) if isinstance(callbacks, list) else [callbacks],
    )
