"""lm-evaluation-harness tasks as a probe: the benchmarks the MoFO and HFT papers report, on the in-memory model.

Needs the optional extra: ``pip install "lit-mofo[lmeval]"`` (``lm-eval[hf]``, which brings ``accelerate``).
"""

from __future__ import annotations

import difflib
import functools
import glob
import importlib.util
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lit_mofo import _hub
from lit_mofo._validation import as_bool, as_int
from lit_mofo.probes import _checks, _inspect, _model, _tokens
from lit_mofo.probes.base import Probe, find_language_model
from lit_mofo.strategy import StrategyAdapter

__all__ = ["LMEvalProbe"]

_SET_BY_PROBE = ("model", "tasks", "num_fewshot", "limit", "task_manager", "bootstrap_iters", "log_samples")
_INSTALL_HINT = 'install the optional extra: `pip install "lit-mofo[lmeval]"` (lm-eval with its `hf` extra)'


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ModuleNotFoundError(f"LMEvalProbe needs lm-evaluation-harness: {_INSTALL_HINT} ({error}).") from error
    return lm_eval.simple_evaluate, HFLM, TaskManager


# `datasets` builders that read files named in `dataset_kwargs.data_files` instead of a Hub repository.
_FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset"})


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool) -> Any:
    """lm-eval's task index (``include_defaults``: its thousands of built-in task files, ~20 s on 2 CPU cores),
    built once per process for a set of task directories: the CLI's check before the model loads and the probe's
    ``setup`` share it."""
    _, _, task_manager_cls = _import_lm_eval()
    return task_manager_cls(include_path=list(include_path) or None, include_defaults=include_defaults)


def _task_configs(manager: Any, name: str, seen: set[str] | None = None) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(task, config)`` of every task that ``name`` (a task, group or tag) runs, from lm-eval's index.

    Reads the index's parsed YAML (``TaskManager.task_index`` entries of lm-eval 0.4.13+); Python-defined tasks and
    anything the index does not describe are skipped (lm-eval checks those itself when it loads them)."""
    seen = set() if seen is None else seen
    if name in seen:
        return
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return
    kind, config = getattr(entry.kind, "name", ""), entry.cfg or {}
    if kind == "TASK":
        yield name, config
    elif kind == "GROUP":
        for child in config.get("task") or []:
            if isinstance(child, str):
                yield from _task_configs(manager, child, seen)
            elif isinstance(child, Mapping) and isinstance(child.get("task"), str):
                if "dataset_path" in child:
                    yield child["task"], child
                else:
                    yield from _task_configs(manager, child["task"], seen)
    elif kind == "TAG":
        for member in sorted(entry.tags):
            yield from _task_configs(manager, member, seen)


def _data_files(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [file for item in value.values() for file in _data_files(item)]
    if isinstance(value, (list, tuple)):
        return [file for item in value for file in _data_files(item)]
    return []


def _data_problem(task: str, config: Mapping[str, Any]) -> str | None:
    """Why the data of ``task`` cannot be loaded now (a missing file, an uncached dataset without network), or None."""
    path, name = config.get("dataset_path"), config.get("dataset_name")
    if not isinstance(path, str) or not path:
        return None
    if path in _FILE_BUILDERS:
        files = _data_files((config.get("dataset_kwargs") or {}).get("data_files"))
        local = [file for file in files if "://" not in file and not glob.has_magic(file)]
        missing = [file for file in local if not Path(file).expanduser().exists()]
        if missing:
            return f"task {task!r} reads {missing}, which do not exist (cwd: {Path.cwd()})"
        if len(local) < len(files) and not _hub.hub_reachable(repo_type="dataset"):
            return f"task {task!r} downloads its data files and {_hub.no_network_reason('dataset')}"
        return None
    if Path(path).expanduser().exists():
        return None
    if not _hub.is_hub_name(path) or _hub.hub_reachable(repo_type="dataset") or _hub.dataset_is_cached(path):
        return None
    configuration, named = (f", '{name}'", f" ({name})") if isinstance(name, str) else ("", "")
    return (
        f"task {task!r} needs the Hugging Face dataset {path!r}{named}, which is not cached (pre-download it with "
        f"`python -c \"import datasets; datasets.load_dataset('{path}'{configuration})\"` on a machine with network, "
        "into the same HF_HOME)"
    )


class _Meeting:
    """A meeting of all ranks (:meth:`~lit_mofo.strategy.StrategyAdapter.agree`) that remembers whether it raised,
    so that a failure already agreed on is not announced a second time."""

    def __init__(self, adapter: StrategyAdapter, what: str) -> None:
        self.adapter, self.what, self.raised = adapter, what, False

    def __call__(self, error: BaseException | None = None) -> None:
        try:
            self.adapter.agree(self.what, error)
        except BaseException:
            self.raised = True
            raise


@functools.cache
def _lockstep_hflm(hflm_cls: type) -> type:
    """lm-eval's ``HFLM`` whose request calls (each a sequence of forwards) start with a meeting of all ranks, and
    whose generation keeps every rank stepping until all have finished (``synced_gpus``) when the model is sharded.

    Every rank runs the same requests through it, so the forwards line up as FSDP2 requires; a rank that failed
    before the forwards (loading a task, building its requests) is announced to the others at the meeting instead
    of leaving them waiting inside their first forward."""

    class LockstepHFLM(hflm_cls):  # type: ignore[misc, valid-type]
        meet: Callable[[], None] = staticmethod(lambda: None)
        quiet = False  # no progress bars on the ranks other than zero
        synced_generation = False

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self.meet()
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self.meet()
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self.quiet)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self.meet()
            return super().generate_until(requests, disable_tqdm=disable_tqdm or self.quiet)

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any) -> Any:
            if self.synced_generation:  # ranks may finish at different lengths; each step is a collective
                generation_kwargs.setdefault("synced_gpus", True)
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return LockstepHFLM


class LMEvalProbe(Probe):
    """Run lm-evaluation-harness tasks with ``lm_eval.simple_evaluate`` on the model being fine-tuned.

    The model is wrapped in lm-eval's ``HFLM`` as it is in memory (no copy, no reload) with its tokenizer, so it
    must be a transformers ``PreTrainedModel`` (the LightningModule's ``model`` attribute, see
    :func:`~lit_mofo.probes.base.find_language_model`). Every numeric task metric is reported as
    ``<task>/<metric>`` (``<task>/<metric>/<filter>`` for a filter other than ``none``, e.g.
    ``gsm8k/exact_match/strict-match``), with lm-eval's own higher-is-better flag; standard errors are left out,
    and a metric lm-eval gives no direction for is skipped with a warning.

    Tasks are looked up in lm-eval's registry and in ``include_path`` (directories of task YAML files — local tasks
    with local data files run offline). An unknown task name is refused in ``setup`` with the closest known names;
    the other arguments (a missing ``include_path`` directory, ``evaluate_kwargs`` that the probe sets itself, a
    missing ``lm_eval``) when the probe is built.

    Cost: a full lm-eval run per evaluation, bounded by ``limit`` (examples per task). Under DDP and FSDP2 every
    rank runs the whole request list through its own ``HFLM`` on the in-memory model (which lm-eval treats as one
    process): the ranks issue the same forwards in the same order, as FSDP2 requires (each forward gathers the
    sharded weights), and rank zero's results are kept and broadcast. So an evaluation takes about the wall time of
    a single-process lm-eval run (plus, under FSDP2, the all-gather of every block per forward) and costs
    ``world_size`` times its compute; no rank waits at a collective for the length of a run, so no process-group
    timeout is at risk. Splitting the requests across the ranks would need equal forward counts per rank, which
    lm-eval's batching (it groups requests that share a context) does not guarantee. Each request type (a sequence
    of forwards) starts with a meeting of all ranks, so a rank that failed before its forwards (loading a task,
    building its requests) fails the others instead of leaving them waiting; generation keeps every rank stepping
    until all have finished (``synced_gpus``) when the model is sharded.

    Args:
        tasks: task, group or tag names, e.g. ``["hellaswag", "arc_easy"]``.
        num_fewshot: few-shot examples per prompt; None keeps each task's default.
        limit: examples per task: an int counts examples, a float is a fraction; None runs every example.
        batch_size: sequences per forward inside lm-eval.
        include_path: extra directory (or directories) of task YAML files.
        include_defaults: also index lm-eval's built-in tasks (thousands of YAML files: ~20 s on 2 CPU cores);
            False for local tasks only.
        tokenizer: a tokenizer object or local path; None takes ``pl_module.tokenizer``.
        max_length: longest sequence lm-eval builds; None takes the model config's.
        bootstrap_iters: bootstrap resamples for lm-eval's standard errors (0 = none, the fast default here).
        evaluate_kwargs: further keyword arguments for ``simple_evaluate`` (e.g. ``apply_chat_template``).
        name: the probe's name in metric keys (``probe/<name>/<task>/<metric>``).

    Attributes:
        last_output: the full dict ``simple_evaluate`` returned at the last evaluation (rank zero only), e.g. for
            ``last_output["n-samples"]``.

    Example::

        probe = LMEvalProbe(["arc_easy", "hellaswag"], limit=200, num_fewshot=0)
        trainer = Trainer(callbacks=[ForgettingMonitor({"general": probe}, every_n_train_steps=500)])
    """

    def __init__(
        self,
        tasks: str | Sequence[str],
        num_fewshot: int | None = None,
        limit: int | float | None = None,
        batch_size: int = 8,
        include_path: str | Path | Sequence[str | Path] | None = None,
        include_defaults: bool = True,
        tokenizer: Any = None,
        max_length: int | None = None,
        bootstrap_iters: int = 0,
        evaluate_kwargs: dict[str, Any] | None = None,
        name: str = "lm_eval",
    ) -> None:
        self.name = _checks.check_name(name)
        where = _checks.where(self)
        if importlib.util.find_spec("lm_eval") is None:
            raise ModuleNotFoundError(f"{where} needs lm-evaluation-harness: {_INSTALL_HINT}.")
        self.tasks = [tasks] if isinstance(tasks, str) else list(tasks) if isinstance(tasks, Sequence) else []
        if not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise _checks.error(
                where,
                "tasks",
                tasks,
                "a task, group or tag name of lm-eval, or a non-empty list of them",
                "E.g. tasks=['arc_easy', 'hellaswag'].",
            )
        if num_fewshot is not None:
            as_int(num_fewshot, where=where, argument="num_fewshot", minimum=0, error=MisconfigurationException)
        self.num_fewshot = num_fewshot
        self.limit = _checks.check_limit(limit, "limit", where, unit="examples per task")
        self.batch_size = _checks.check_size(batch_size, "batch_size", where)
        paths = [include_path] if isinstance(include_path, (str, Path)) else include_path or []
        if not isinstance(paths, Sequence):
            raise _checks.error(
                where, "include_path", include_path, "a directory of task YAML files, or a list of them"
            )
        self.include_path = []
        for path in paths:
            if not isinstance(path, (str, Path)) or not Path(path).expanduser().is_dir():
                raise _checks.error(
                    where,
                    "include_path",
                    include_path,
                    "a directory of task YAML files, or a list of them",
                    f"{str(path)!r} is not a directory of task YAML files (cwd: {Path.cwd()}).",
                )
            self.include_path.append(str(Path(path).expanduser()))
        self.include_defaults = as_bool(
            include_defaults, where=where, argument="include_defaults", error=MisconfigurationException
        )
        self.tokenizer = _tokens.check_tokenizer(tokenizer, where)
        if max_length is not None:
            _checks.check_size(max_length, "max_length", where)
        self.max_length = max_length
        self.bootstrap_iters = _checks.check_size(bootstrap_iters, "bootstrap_iters", where, minimum=0)
        if evaluate_kwargs is not None and (
            not isinstance(evaluate_kwargs, Mapping) or not all(isinstance(k, str) for k in evaluate_kwargs)
        ):
            raise _checks.error(
                where, "evaluate_kwargs", evaluate_kwargs, "None or a dict of keyword arguments for simple_evaluate"
            )
        clashes = sorted(set(evaluate_kwargs or {}) & set(_SET_BY_PROBE))
        if clashes:
            raise _checks.error(
                where,
                "evaluate_kwargs",
                evaluate_kwargs,
                f"keyword arguments of simple_evaluate other than {list(_SET_BY_PROBE)}",
                f"{clashes} are set by the probe; use its own arguments (e.g. `limit=`, `num_fewshot=`).",
            )
        self.evaluate_kwargs = dict(evaluate_kwargs or {})
        self._directions: dict[str, bool] = {}
        self._task_manager: Any = None
        self._tokenizer: Any = None
        self._lm: Any = None
        self.last_output: dict[str, Any] | None = None

    @property
    def higher_is_better(self) -> dict[str, bool]:
        """Filled from lm-eval's results: ``{"<task>/<metric>": flag}`` for every metric reported so far."""
        return dict(self._directions)

    def check_data(self) -> Any:
        """Resolve the tasks in lm-eval's index and check that their data can be loaded now; returns the task index
        (lm-eval's ``TaskManager``).

        Runs in :meth:`setup`, and in ``lit-mofo`` right after the arguments are parsed, before the model loads.
        Every task's dataset must be a local file or directory, cached, or reachable: a Hub dataset that is not
        cached while the Hub cannot be reached (``HF_HUB_OFFLINE=1``, or no network) is refused at once, instead of
        lm-eval's retries and raw ``ConnectionError`` at the first evaluation.

        Raises:
            MisconfigurationException: an unknown task (with the closest known names), or data that cannot be
                loaded (naming the task, the dataset and how to pre-download it).
        """
        manager = _task_manager(tuple(self.include_path), self.include_defaults)
        known = set(manager.all_tasks)
        unknown = [task for task in self.tasks if task not in known]
        if unknown:
            hints = {task: difflib.get_close_matches(task, known, n=3) for task in unknown}
            raise MisconfigurationException(
                f"Unknown lm-eval task(s) {unknown} (closest known: {hints}). Check the spelling against "
                "`lm_eval --tasks list`, or point `include_path` at the directory holding the task's YAML."
            )
        try:
            configs = dict(config for task in self.tasks for config in _task_configs(manager, task))
        except (AttributeError, TypeError):  # an lm-eval whose index looks otherwise: it checks its data itself
            return manager
        problems = [problem for task, config in configs.items() if (problem := _data_problem(task, config))]
        if problems:
            offline = (
                f" Not cached and no network ({_hub.no_network_reason('dataset')}): pre-download the data as above, "
                "or point `include_path` at tasks with local data files."
                if not _hub.hub_reachable(repo_type="dataset")
                else ""
            )
            raise MisconfigurationException(
                f"{_checks.where(self)}: the data of tasks {self.tasks} cannot be loaded: "
                f"{'; '.join(problems)}.{offline}"
            )
        hub_datasets = [c["dataset_path"] for c in configs.values() if _hub.is_hub_name(str(c.get("dataset_path")))]
        if hub_datasets and not _hub.hub_reachable(repo_type="dataset") and not _hub.is_offline("dataset"):
            rank_zero_warn(
                f"{_checks.where(self)}: the Hugging Face Hub cannot be reached; {sorted(set(hub_datasets))} load from "
                "the cache after the `datasets` library's retries at every evaluation. Set HF_HUB_OFFLINE=1 to skip "
                "them."
            )
        return manager

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        simple_evaluate, _, _ = _import_lm_eval()
        accepted = inspect.signature(simple_evaluate).parameters
        unknown_kwargs = sorted(set(self.evaluate_kwargs) - set(accepted))
        if unknown_kwargs:
            raise _checks.error(
                _checks.where(self),
                "evaluate_kwargs",
                self.evaluate_kwargs,
                "keyword arguments of lm_eval.simple_evaluate",
                f"It takes no {unknown_kwargs}; see `help(lm_eval.simple_evaluate)`.",
            )
        self._task_manager = self.check_data()
        model = find_language_model(pl_module)
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise MisconfigurationException(
                f"LMEvalProbe needs a transformers PreTrainedModel as `pl_module.model`, got {type(model).__name__}."
            )
        _model.check_gathered(model, _checks.where(self))
        if self.max_length is not None:
            # lm-eval truncates every request to max_length: longer than the model's positions, a sharded model would
            # fail in one rank's forward while the others wait in FSDP's all-gather. Every rank checks the same value.
            _inspect.check_window_lengths(
                [("max_length", self.max_length)],
                _inspect.model_positions(model),
                allow_beyond=False,
                where=_checks.where(self),
                argument="max_length",
                value=self.max_length,
                fix="Pass max_length={limit} or less, or leave it None (the model config's).",
            )
        self._tokenizer = _tokens.require_tokenizer(
            _tokens.resolve_tokenizer(self.tokenizer, pl_module, _checks.where(self)), self.name
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lm = None
        self._task_manager = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._task_manager is None:
            self.setup(trainer, pl_module)
        where = _checks.where(self)
        adapter = StrategyAdapter.of(trainer, user=where)
        meeting = _Meeting(adapter, where)
        output: dict[str, Any] | None = None
        error: BaseException | None = None
        try:
            output = self._run(pl_module, adapter, meeting)
        except Exception as caught:
            if meeting.raised:  # every rank raises already
                raise
            error = caught
        meeting(error)  # every rank is past its last forward: a failure anywhere fails all
        parsed = adapter.run_together(where, lambda: self._parse(output or {}) if adapter.is_global_zero else None)
        values, directions = adapter.broadcast(parsed, src=0)
        self._directions.update(directions)
        return values

    def _run(self, pl_module: pl.LightningModule, adapter: StrategyAdapter, meeting: _Meeting) -> dict[str, Any] | None:
        """lm-eval's output (None on the ranks where lm-eval returns none: those with a ``LOCAL_RANK`` other than 0)."""
        simple_evaluate, hflm_cls, _ = _import_lm_eval()
        if self._lm is None:
            self._lm = _lockstep_hflm(hflm_cls)(
                pretrained=find_language_model(pl_module),
                tokenizer=self._tokenizer,
                batch_size=self.batch_size,
                max_length=self.max_length,
            )
        self._lm.meet = meeting
        self._lm.quiet = not adapter.is_global_zero
        self._lm.synced_generation = adapter.sharded and adapter.distributed
        output = simple_evaluate(
            model=self._lm,
            tasks=self.tasks,
            num_fewshot=self.num_fewshot,
            limit=self.limit,
            task_manager=self._task_manager,
            bootstrap_iters=self.bootstrap_iters,
            log_samples=False,
            **self.evaluate_kwargs,
        )
        if adapter.is_global_zero:
            self.last_output = output
        return output

    def _parse(self, output: dict[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
        values: dict[str, float] = {}
        directions: dict[str, bool] = {}
        flags = output.get("higher_is_better", {})
        for task, metrics in output.get("results", {}).items():
            for key, value in metrics.items():
                metric, _, filter_name = key.partition(",")
                if not filter_name or metric.endswith("_stderr") or isinstance(value, bool):
                    continue  # "alias", "name", "sample_len", standard errors
                if not isinstance(value, (int, float)):
                    continue  # "N/A"
                flag = flags.get(task, {}).get(metric)
                if not isinstance(flag, bool):
                    rank_zero_warn(
                        f"lm-eval gives no higher-is-better flag for {task}/{metric}; it is not monitored. Set "
                        "`higher_is_better` for it in the task's metric_list."
                    )
                    continue
                name = f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}/{filter_name}"
                values[name] = float(value)
                directions[name] = flag
        if not values:
            raise MisconfigurationException(
                f"lm-eval returned no numeric metric for tasks {self.tasks} (results: {output.get('results')!r:.200})."
            )
        return values, directions
