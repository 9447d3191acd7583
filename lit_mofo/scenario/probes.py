"""Probes of the embedded scenario: how much of its knowledge a model keeps, and how well it does a word-list task.

:class:`KnowledgeProbe` asks every fact of the scenario's world (``"brafu lives in"``) and scores the answer by
multiple choice over the relation's values (one forward per batch of facts: the values are single tokens, so their
log-likelihoods are read off the logits after the prompt); it also reports the language-model loss on the fact
sentences. :class:`TaskProbe` measures exact match on held-out problems of a task (``cipher`` — the fine-tuning
task —, ``repeat`` — the copying skill of the base model — or a stage of the continual sequence,
:data:`~lit_mofo.scenario.sequence.TASK_SEQUENCE`) by teacher forcing, which equals greedy decoding.

Under DDP and FSDP2 both run the same number of forwards on every process (the batches are dealt round-robin; a
process with one batch fewer runs a padding forward whose result it discards, so sharded models never wait on a
missing collective: :func:`~lit_mofo.probes.run_batches`) and sum their counts across processes with torchmetrics.
The plain functions :func:`evaluate_knowledge` and :func:`evaluate_task` compute the same numbers on one process
without a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_mofo._validation import as_int
from lit_mofo.probes import _checks, _inspect, _metrics, _model, distribution
from lit_mofo.probes.base import Probe, find_language_model
from lit_mofo.scenario.corpus import RELATION_TEMPLATES, Fact, KnowledgeSpec, generate_facts
from lit_mofo.scenario.scenarios import ScenarioName, get_scenario
from lit_mofo.scenario.task import TaskExample, TaskKind, TaskSpec, WordPool, generate_task
from lit_mofo.scenario.vocab import load_tokenizer

__all__ = ["KnowledgeProbe", "TaskProbe", "evaluate_knowledge", "evaluate_task"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class _Batch:
    """Token ids of a batch of scored sequences and what to read from the logits.

    ``labels`` holds the targets of the language-model loss (-100 elsewhere). Knowledge batches also carry
    ``answer_positions`` (the logit row predicting the value), ``choice_ids`` (the relation's values, padded with
    -1) and ``answer_index`` (the right value's column)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    answer_positions: Tensor | None = None
    choice_ids: Tensor | None = None
    answer_index: Tensor | None = None


def _pad(rows: Sequence[Sequence[int]], value: int) -> Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _knowledge_batches(facts: Sequence[Fact], tokenizer: PreTrainedTokenizerBase, batch_size: int) -> list[_Batch]:
    batches = []
    for start in range(0, len(facts), batch_size):
        chunk = facts[start : start + batch_size]
        sequences = [tokenizer(f.sentence)["input_ids"] + [tokenizer.eos_token_id] for f in chunk]
        input_ids = _pad(sequences, tokenizer.pad_token_id)
        attention_mask = _pad([[1] * len(s) for s in sequences], 0)
        choices = [tokenizer.convert_tokens_to_ids(list(f.choices)) for f in chunk]
        batches.append(
            _Batch(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
                answer_positions=torch.tensor([len(tokenizer(f.prompt)["input_ids"]) - 1 for f in chunk]),
                choice_ids=_pad(choices, -1),
                answer_index=torch.tensor([list(f.choices).index(f.value) for f in chunk]),
            )
        )
    return batches


def _task_batches(examples: Sequence[TaskExample], tokenizer: PreTrainedTokenizerBase, batch_size: int) -> list[_Batch]:
    batches = []
    for start in range(0, len(examples), batch_size):
        sequences, targets = [], []
        for example in examples[start : start + batch_size]:
            prompt = tokenizer(example.prompt)["input_ids"]
            response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            sequences.append(prompt + response)
            targets.append([IGNORE_INDEX] * len(prompt) + response)
        input_ids = _pad(sequences, tokenizer.pad_token_id)
        batches.append(
            _Batch(
                input_ids=input_ids,
                attention_mask=_pad([[1] * len(s) for s in sequences], 0),
                labels=_pad(targets, IGNORE_INDEX),
            )
        )
    return batches


def _logits(
    model: nn.Module, batch: _Batch, device: torch.device, forward_fn: _checks.ForwardFn | None = None
) -> Tensor:
    """The model's float logits of ``batch`` (the forward; see :func:`_checked_logits` for the shape check)."""
    return _model.forward_logits(
        model, batch.input_ids.to(device), batch.attention_mask.to(device), forward_fn, "The scenario probe"
    ).float()


def _checked_logits(logits: Tensor, batch: _Batch) -> Tensor:
    if logits.dim() != 3 or logits.size(1) != batch.input_ids.size(1):
        raise MisconfigurationException(
            f"The scenario probes need next-token logits [batch, seq, vocab] from a causal LM; the model returned "
            f"shape {tuple(logits.shape)}."
        )
    return logits


def _check_vocabulary(model: nn.Module, tokenizer: PreTrainedTokenizerBase, probe: str) -> None:
    """Refuse, before any forward, a model whose embeddings or outputs do not cover the scenario vocabulary."""
    size = _inspect.vocabulary_size(model)
    if size is not None and size < len(tokenizer):
        raise MisconfigurationException(
            f"{probe} scores the embedded scenario and needs a model over its vocabulary ({len(tokenizer)} tokens, "
            f"lit_mofo/scenario/tokenizer/); this model has {size}. Fine-tune the scenario base model "
            "(`model: scenario:base`) or drop the scenario probes."
        )


def _token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence summed next-token NLL over the labelled targets, and the per-sequence target count."""
    targets = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [batch, seq - 1]; 0 at ignored targets
    return nll.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def _knowledge_counts(logits: Tensor, batch: _Batch) -> tuple[int, float, int]:
    """(correct answers, summed sentence NLL, scored tokens) of one batch."""
    assert batch.answer_positions is not None and batch.choice_ids is not None and batch.answer_index is not None
    rows = torch.arange(logits.size(0), device=logits.device)
    answer_logits = logits[rows, batch.answer_positions.to(logits.device)]  # [batch, vocab]
    choice_ids = batch.choice_ids.to(logits.device)
    scores = answer_logits.gather(1, choice_ids.clamp(min=0)).masked_fill(choice_ids < 0, -math.inf)
    correct = int((scores.argmax(dim=1) == batch.answer_index.to(logits.device)).sum())
    nll, count = _token_nll(logits, batch.labels)
    return correct, float(nll.sum()), int(count.sum())


def _task_counts(logits: Tensor, batch: _Batch) -> tuple[int, float, int]:
    """(exactly matched answers, summed answer NLL, answer tokens) of one batch."""
    targets = batch.labels[:, 1:].to(logits.device)
    predictions = logits[:, :-1].argmax(dim=-1)
    exact = int(((predictions == targets) | (targets == IGNORE_INDEX)).all(dim=1).sum())
    nll, count = _token_nll(logits, batch.labels)
    return exact, float(nll.sum()), int(count.sum())


_Counts = Callable[[Tensor, _Batch], tuple[int, float, int]]


def _standalone(
    model: nn.Module, batches: Sequence[_Batch], tokenizer: PreTrainedTokenizerBase, probe: str, counts: _Counts
) -> tuple[float, float]:
    """(score, loss) over ``batches`` on one process, under ``no_grad`` and eval mode (restored afterwards)."""
    _check_vocabulary(model, tokenizer, probe)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = loss = 0.0
    tokens = items = 0
    try:
        with torch.no_grad():
            for batch in batches:
                logits = _checked_logits(_logits(model, batch, device), batch)
                batch_hits, batch_loss, batch_tokens = counts(logits, batch)
                hits, loss = hits + batch_hits, loss + batch_loss
                tokens, items = tokens + batch_tokens, items + len(batch.input_ids)
    finally:
        model.train(was_training)
    return hits / items, loss / tokens


def evaluate_knowledge(
    model: nn.Module,
    spec: KnowledgeSpec | None = None,
    *,
    batch_size: int = 256,
    entities: Collection[str] | None = None,
) -> dict[str, float]:
    """Knowledge accuracy and fact-sentence loss of ``model`` on one process (no Trainer): what
    :class:`KnowledgeProbe` reports, as ``{"accuracy": ..., "loss": ...}``.

    ``entities`` restricts the score to the facts about those entities (e.g. the words a task is written in, to
    see where forgetting happens); None scores every fact of the world.
    """
    tokenizer = load_tokenizer()
    facts = world = generate_facts(spec)
    if entities is not None:
        if isinstance(entities, str):
            raise ValueError(f"entities={entities!r} must be a collection of entity names, e.g. [{entities!r}].")
        facts = [fact for fact in world if fact.entity in entities]
        if not facts:
            known = sorted({fact.entity for fact in world})
            raise ValueError(
                f"entities={sorted(entities)[:5]!r} names no entity of the world; it has {len(known)} entities, "
                f"e.g. {known[:3]!r}."
            )
    batches = _knowledge_batches(facts, tokenizer, batch_size)
    accuracy, loss = _standalone(model, batches, tokenizer, "evaluate_knowledge", _knowledge_counts)
    return {"accuracy": accuracy, "loss": loss}


def evaluate_task(
    model: nn.Module, spec: TaskSpec | None = None, *, num_examples: int = 256, batch_size: int = 256
) -> dict[str, float]:
    """Exact match and answer loss of ``model`` on the held-out problems of ``spec`` on one process (no Trainer):
    what :class:`TaskProbe` reports, as ``{"exact_match": ..., "loss": ...}``."""
    tokenizer = load_tokenizer()
    _, examples = generate_task(spec, num_train=0, num_eval=num_examples)
    batches = _task_batches(examples, tokenizer, batch_size)
    exact_match, loss = _standalone(model, batches, tokenizer, "evaluate_task", _task_counts)
    return {"exact_match": exact_match, "loss": loss}


class _ScenarioProbe(Probe):
    """Shared machinery: batches built once in :meth:`setup`, dealt round-robin with equal forward counts per rank
    (:func:`~lit_mofo.probes.run_batches`), counts summed across ranks with torchmetrics."""

    _metric_names: tuple[str, str]

    def __init__(
        self,
        batch_size: int,
        limit_batches: int | float | None,
        forward_fn: _checks.ForwardFn | str | None,
        name: str,
        allow_beyond_max_positions: bool = False,
    ) -> None:
        self.name = _checks.check_name(name)
        where = _checks.where(self)
        self.batch_size = _checks.check_size(batch_size, "batch_size", where)
        self.limit_batches = _checks.check_limit(limit_batches, where=where)
        self.forward_fn = _checks.check_forward_fn(forward_fn, where)
        self.allow_beyond_max_positions = _checks.check_flag(
            allow_beyond_max_positions, "allow_beyond_max_positions", where
        )
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._batches: list[_Batch] = []
        self._hits: _metrics.SumPair | None = None
        self._loss: _metrics.SumPair | None = None

    def _spec_int(self, value: Any, argument: str) -> int:
        return as_int(value, where=_checks.where(self), argument=argument, error=MisconfigurationException)

    def _build_batches(self, tokenizer: PreTrainedTokenizerBase) -> list[_Batch]:
        raise NotImplementedError

    def _counts(self, logits: Tensor, batch: _Batch) -> tuple[int, float, int]:
        raise NotImplementedError

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = find_language_model(pl_module)
        self._tokenizer = load_tokenizer()
        _check_vocabulary(model, self._tokenizer, type(self).__name__)
        where = _checks.where(self)
        _inspect.check_next_token_model(model, self.forward_fn, where)
        _model.check_forward(model, self.forward_fn, where)
        batches = self._build_batches(self._tokenizer)
        self._batches = batches[: distribution.apply_limit(len(batches), self.limit_batches)]
        _inspect.check_window_lengths(
            ((f"batch {index}", batch.input_ids.size(1)) for index, batch in enumerate(self._batches)),
            _inspect.model_positions(model),
            self.allow_beyond_max_positions,
            where,
            "sequences",
            f"{max((batch.input_ids.size(1) for batch in self._batches), default=0)} tokens",
            "Score a model with at least that many positions (the scenario base model's recipe sets "
            "`max_position_embeddings`), or shorter problems.",
        )
        self._hits = _metrics.SumPair(pl_module.device)
        self._loss = _metrics.SumPair(pl_module.device)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._hits is None or self._loss is None or self._tokenizer is None:
            self.setup(trainer, pl_module)
        assert self._hits is not None and self._loss is not None and self._tokenizer is not None
        model = find_language_model(pl_module)
        device = pl_module.device
        self._hits.restart(device)
        self._loss.restart(device)
        with torch.no_grad():  # the monitor already does this; direct calls need it too
            distribution.run_batches(
                self._batches,
                trainer,
                forward=lambda batch: _logits(model, batch, device, self.forward_fn),
                consume=self._consume,
                where=_checks.where(self),
            )
        hits, items = self._hits.compute()
        loss, tokens = self._loss.compute()
        score_name, loss_name = self._metric_names
        return {score_name: hits / items, loss_name: loss / tokens}

    def _consume(self, batch: _Batch, logits: Tensor) -> None:
        assert self._hits is not None and self._loss is not None
        hits, loss, tokens = self._counts(_checked_logits(logits, batch), batch)
        self._hits.update(hits, len(batch.input_ids))
        self._loss.update(loss, tokens)


class KnowledgeProbe(_ScenarioProbe):
    """How much of the embedded scenario's knowledge the model keeps.

    Every fact of the world (:func:`~lit_mofo.scenario.corpus.generate_facts`) is asked with its prompt
    (``"brafu lives in"``) and answered by multiple choice over the relation's values (12 or 16 single-token
    words), scored by their log-likelihood after the prompt — like lm-evaluation-harness's ``acc``.

    Metrics: ``accuracy`` (share of facts answered right, higher is better; chance is about 1/14) and ``loss``
    (mean next-token loss in nats over the fact sentences ``"<bos> brafu lives in lisbon . <eos>"``, the
    knowledge-corpus loss; lower is better). The scenario base model scores 1.0 and 0.96 nats (most of that loss
    is the unpredictable entity name that starts each sentence).

    The facts are tokenized with the scenario's shipped tokenizer, so the model must be over the scenario
    vocabulary (the base model and its fine-tunes are). Cost: one forward per ``batch_size`` facts (512 facts of
    8 tokens by default). Under DDP and FSDP2 the batches are dealt round-robin and the counts summed across
    processes.

    Args:
        num_entities: the world's entities (see :class:`~lit_mofo.scenario.corpus.KnowledgeSpec`); must match the
            base model's recipe.
        relations: the world's relations.
        seed: the world's seed.
        batch_size: facts per forward.
        limit_batches: only the first batches: an int counts batches, a float is a fraction; None = all facts.
        forward_fn: a function ``(model, batch) -> logits`` (or its import path) for a model not called as
            ``model(input_ids=..., attention_mask=...)``; see :class:`~lit_mofo.probes.LanguageModelProbe`.
        name: the probe's name in metric keys (``probe/<name>/accuracy``).
        allow_beyond_max_positions: score sequences longer than the model's maximum positions on a model without a
            learned position table (refused otherwise, in ``setup``); see :class:`~lit_mofo.probes.LanguageModelProbe`.

    Example::

        monitor = ForgettingMonitor({"knowledge": KnowledgeProbe(), "task": TaskProbe()}, every_n_train_steps=50)
    """

    _metric_names = ("accuracy", "loss")

    def __init__(
        self,
        num_entities: int = KnowledgeSpec.num_entities,
        relations: Sequence[str] = KnowledgeSpec.relations,
        seed: int = KnowledgeSpec.seed,
        batch_size: int = 256,
        limit_batches: int | float | None = None,
        forward_fn: _checks.ForwardFn | str | None = None,
        name: str = "knowledge",
        allow_beyond_max_positions: bool = False,
    ) -> None:
        super().__init__(batch_size, limit_batches, forward_fn, name, allow_beyond_max_positions)
        relations = (relations,) if isinstance(relations, str) else relations  # one relation, not its letters
        if not isinstance(relations, Sequence) or not all(isinstance(r, str) for r in relations):
            raise _checks.error(_checks.where(self), "relations", relations, f"a list of {list(RELATION_TEMPLATES)}")
        try:
            self.spec = KnowledgeSpec(
                num_entities=self._spec_int(num_entities, "num_entities"),
                relations=tuple(relations),
                seed=self._spec_int(seed, "seed"),
            )
        except ValueError as error:
            raise MisconfigurationException(f"{_checks.where(self)}: {error}") from error

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"accuracy": True, "loss": False}

    def _build_batches(self, tokenizer: PreTrainedTokenizerBase) -> list[_Batch]:
        return _knowledge_batches(generate_facts(self.spec), tokenizer, self.batch_size)

    def _counts(self, logits: Tensor, batch: _Batch) -> tuple[int, float, int]:
        return _knowledge_counts(logits, batch)


class TaskProbe(_ScenarioProbe):
    """Exact match on held-out problems of a scenario word-list task (``cipher`` by default: the fine-tuning task).

    A problem counts as solved when, fed the prompt and the right answer so far, the model's most likely next token
    is the right one at every answer position and then ``<eos>`` — exactly when greedy decoding from the prompt
    produces the answer and stops, at the cost of one forward instead of one per generated token.

    Metrics: ``exact_match`` (higher is better; the base model scores 0 on ``cipher`` and on every task of
    :data:`~lit_mofo.scenario.sequence.TASK_SEQUENCE`, and about 0.9-1.0 on ``repeat``) and ``loss`` (mean
    next-token loss in nats over the answer tokens and ``<eos>``; lower is better). The problems are the evaluation
    set of :func:`~lit_mofo.scenario.task.generate_task`, which :class:`~lit_mofo.scenario.data.ScenarioDataModule`
    also uses for validation and never trains on.

    Args:
        kind: ``cipher`` (the fine-tuning task), ``repeat`` (the base model's copying skill, to watch it being
            forgotten), ``reverse`` or ``reverse_cipher`` (:data:`~lit_mofo.scenario.sequence.TASK_SEQUENCE` lists
            the continual sequence's tasks and their arguments).
        num_words: how many words of the pool the problems draw from (see
            :class:`~lit_mofo.scenario.task.TaskSpec`; at most 56 with ``pool="values"``).
        min_length: shortest word list.
        max_length: longest word list.
        seed: the task's seed (problems and cipher); must match the data module's.
        num_examples: held-out problems evaluated.
        batch_size: problems per forward.
        limit_batches: only the first batches: an int counts batches, a float is a fraction; None = all.
        forward_fn: a function ``(model, batch) -> logits`` (or its import path) for a model not called as
            ``model(input_ids=..., attention_mask=...)``; see :class:`~lit_mofo.probes.LanguageModelProbe`.
        name: the probe's name in metric keys (``probe/<name>/exact_match``).
        scenario: which embedded scenario's words the problems are written in (``overlap``, the default, or
            ``disjoint``); must match the data module's and the base model's (:mod:`lit_mofo.scenario.scenarios`).
        allow_beyond_max_positions: score problems longer than the model's maximum positions on a model without a
            learned position table (refused otherwise, in ``setup``); see :class:`~lit_mofo.probes.LanguageModelProbe`.
        pool: ``names`` (entity names: the scenario's, the default) or ``values`` (the world's 56 relation values,
            the same words in every scenario); must match the data module's.
    """

    _metric_names = ("exact_match", "loss")

    def __init__(
        self,
        kind: TaskKind = TaskSpec.kind,
        num_words: int = TaskSpec.num_words,
        min_length: int = TaskSpec.min_length,
        max_length: int = TaskSpec.max_length,
        seed: int = TaskSpec.seed,
        num_examples: int = 256,
        batch_size: int = 256,
        limit_batches: int | float | None = None,
        forward_fn: _checks.ForwardFn | str | None = None,
        name: str = "task",
        scenario: ScenarioName = "overlap",
        allow_beyond_max_positions: bool = False,
        pool: WordPool = TaskSpec.pool,
    ) -> None:
        super().__init__(batch_size, limit_batches, forward_fn, name, allow_beyond_max_positions)
        where = _checks.where(self)
        try:
            self.spec = get_scenario(scenario).task(
                kind,
                pool=pool,
                num_words=self._spec_int(num_words, "num_words"),
                min_length=self._spec_int(min_length, "min_length"),
                max_length=self._spec_int(max_length, "max_length"),
                seed=self._spec_int(seed, "seed"),
            )
        except ValueError as error:
            raise MisconfigurationException(f"{where}: {error}") from error
        self.num_examples = _checks.check_size(num_examples, "num_examples", where)
        try:  # the held-out problems need no model: refuse an impossible count now, not at the start of fit
            generate_task(self.spec, num_train=0, num_eval=self.num_examples)
        except ValueError as error:
            raise MisconfigurationException(f"{where}: {error}") from error

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"exact_match": True, "loss": False}

    def _build_batches(self, tokenizer: PreTrainedTokenizerBase) -> list[_Batch]:
        _, examples = generate_task(self.spec, num_train=0, num_eval=self.num_examples)
        return _task_batches(examples, tokenizer, self.batch_size)

    def _counts(self, logits: Tensor, batch: _Batch) -> tuple[int, float, int]:
        return _task_counts(logits, batch)
