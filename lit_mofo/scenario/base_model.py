"""The embedded scenario's base model: a small Llama pre-trained by lit_mofo itself, built once and cached.

:func:`build_base_model` pre-trains a Llama over the scenario vocabulary on two things a pre-trained model knows:
the world's facts (:mod:`~lit_mofo.scenario.corpus`) and the skill of copying a word list (``repeat`` problems,
:mod:`~lit_mofo.scenario.task`). Everything is seeded by a :class:`BaseModelRecipe`; the result is a regular
``save_pretrained`` directory (model, tokenizer, ``lit_mofo_scenario.json`` with the recipe and the measured
knowledge accuracy and copying exact match), loadable with ``AutoModelForCausalLM.from_pretrained``.

:func:`base_model_path` returns the cached model of a recipe, building it on first use, under
``$LIT_MOFO_CACHE_DIR/scenario/base-<key>`` (default cache ``~/.cache/lit_mofo``; the same root and variable as
MoFO's compiled CPU kernels), where ``<key>`` hashes the recipe,
the vocabulary and the build format. Two processes asking at once (DDP ranks, parallel tests) do not both build:
a file lock serialises them, and the model is written to a temporary directory renamed into place only when
complete, so a reader never sees half a model (the next build removes the temporary directory of a killed one).
Build it ahead of time with::

    python -m lit_mofo.scenario build-base

(about 2 minutes on 2 CPU cores; see the README for the measured figure).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_mofo.scenario.corpus import KnowledgeSpec, generate_facts
from lit_mofo.scenario.task import TaskSpec, generate_task
from lit_mofo.scenario.vocab import TOKENIZER_DIR, VOCABULARY, load_tokenizer

__all__ = [
    "CACHE_ENV",
    "METADATA_FILE",
    "SCENARIO_MODEL",
    "BaseModelRecipe",
    "base_model_path",
    "build_base_model",
    "cache_root",
]

CACHE_ENV = "LIT_MOFO_CACHE_DIR"  # one cache for lit_mofo: the scenario's base models and MoFO's compiled kernels
_OLD_CACHE_ENV = "LIT_MOFO_CACHE"  # the scenario's own name before 0.1: still read, with a deprecation warning
METADATA_FILE = "lit_mofo_scenario.json"
SCENARIO_MODEL = "scenario:base"  # what CausalLMModule(model=...) resolves to the default recipe's cached model
_FORMAT_VERSION = 1  # bump when the build changes in a way the recipe does not capture


@dataclass(frozen=True)
class BaseModelRecipe:
    """Everything that determines the base model: the world, the skill, the architecture and the pre-training.

    Args:
        knowledge: the facts pre-trained on (and later probed).
        skill: the copying problems pre-trained on (``kind="repeat"``).
        hidden_size: Llama width.
        num_hidden_layers: transformer blocks.
        num_attention_heads: attention heads (as many key/value heads).
        intermediate_size: MLP width.
        max_position_embeddings: longest sequence.
        steps: optimizer steps; each sees ``fact_batch_size`` facts and ``skill_batch_size`` copying problems.
        fact_batch_size: fact sentences per step (the facts are cycled in a freshly shuffled order per epoch).
        skill_batch_size: copying problems per step.
        lr: AdamW peak learning rate (linear warmup, then cosine to 0; betas 0.9/0.98, no weight decay,
            gradients clipped at norm 1).
        warmup_ratio: share of the steps spent warming up.
        skill_prompt_loss: also take the loss on the copying problems' prompts (whose words are random, so they
            only add noise); by default only the answer and ``<eos>`` are targets, as in fine-tuning.
        seed: seeds the initialisation and the data order.
    """

    knowledge: KnowledgeSpec = field(default_factory=KnowledgeSpec)
    skill: TaskSpec = field(default_factory=lambda: TaskSpec(kind="repeat", min_length=2, max_length=5))
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 64
    steps: int = 400
    fact_batch_size: int = 96
    skill_batch_size: int = 64
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    skill_prompt_loss: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.skill.kind != "repeat":
            raise ValueError(f"skill.kind={self.skill.kind!r}: the base model's skill is copying, kind='repeat'.")
        for name in ("steps", "fact_batch_size", "skill_batch_size", "hidden_size", "num_hidden_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}."
            )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "knowledge": self.knowledge.to_dict(), "skill": self.skill.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BaseModelRecipe:
        values = dict(values)
        knowledge = values.pop("knowledge", {})
        skill = values.pop("skill", {})
        return cls(
            knowledge=KnowledgeSpec(**{**knowledge, "relations": tuple(knowledge.get("relations", ()))})
            if knowledge
            else KnowledgeSpec(),
            skill=TaskSpec(**skill) if skill else TaskSpec(kind="repeat", min_length=2, max_length=5),
            **values,
        )

    def key(self) -> str:
        """16 hex digits hashing the recipe, the vocabulary and the build format: the cache directory's name."""
        recipe = self.to_dict()
        if self.skill.first_word == 0:  # recipes from before `first_word` existed keep their key (and cached model)
            del recipe["skill"]["first_word"]
        payload = json.dumps(
            {"format": _FORMAT_VERSION, "recipe": recipe, "vocabulary": list(VOCABULARY)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def model_config(self) -> Any:
        """The ``LlamaConfig`` of the model (untied embeddings, as Llama's default)."""
        from transformers import LlamaConfig

        tokenizer = load_tokenizer()
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$LIT_MOFO_CACHE_DIR``, else ``$XDG_CACHE_HOME/lit_mofo``, else ``~/.cache/lit_mofo``:
    the root MoFO's compiled CPU kernels use too. The former ``$LIT_MOFO_CACHE`` is still read when
    ``$LIT_MOFO_CACHE_DIR`` is not set, with a warning to rename it."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    configured = os.environ.get(CACHE_ENV)
    if not configured and os.environ.get(_OLD_CACHE_ENV):
        configured = os.environ[_OLD_CACHE_ENV]
        rank_zero_warn(
            f"${_OLD_CACHE_ENV} is deprecated: lit_mofo's one cache variable is ${CACHE_ENV} (the scenario's base "
            f"models and MoFO's compiled kernels). Rename it: export {CACHE_ENV}={configured}",
            category=FutureWarning,
        )
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lit_mofo"


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` right-padded; labels are the ids with -100 on padding."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, : len(sequence)] = torch.tensor(sequence)
    return input_ids, labels


def build_base_model(
    recipe: BaseModelRecipe | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    num_threads: int | None = 1,
    log: Callable[[str], None] | None = rank_zero_info,
    log_every: int = 100,
) -> dict[str, Any]:
    """Pre-train the scenario base model of ``recipe`` and save it (model, tokenizer, metadata) to ``output_dir``.

    Args:
        recipe: what to build (default :class:`BaseModelRecipe`).
        output_dir: where to save; None trains without saving (for measurements).
        num_threads: torch intra-op threads while building (restored afterwards). One thread is the default: the
            model is so small that more threads hardly help, and on a loaded machine they can make each step many
            times slower. None keeps the current setting.
        log: progress messages (None: silent).
        log_every: steps between progress messages.

    Returns:
        The metadata also written to ``lit_mofo_scenario.json``: the recipe, its key, the knowledge accuracy and
        fact loss and the copying exact match of the final model, the build time, and the versions used.
    """
    from transformers import LlamaForCausalLM, get_cosine_schedule_with_warmup

    from lit_mofo.scenario.probes import evaluate_knowledge, evaluate_task

    recipe = recipe or BaseModelRecipe()
    tokenizer = load_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    start = time.perf_counter()
    with _torch_threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(recipe.model_config())
        model.train()

        facts = [tokenizer(f.sentence)["input_ids"] + [eos] for f in generate_facts(recipe.knowledge)]
        skill_train, _ = generate_task(recipe.skill, num_train=recipe.steps * recipe.skill_batch_size)
        skill = []
        for example in skill_train:
            prompt = tokenizer(example.prompt)["input_ids"]
            answer = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [eos]
            skill.append((prompt, answer))
        longest = max(len(s) for s in facts + [p + a for p, a in skill])
        if longest > recipe.max_position_embeddings:
            raise ValueError(
                f"max_position_embeddings={recipe.max_position_embeddings} is shorter than the longest pre-training "
                f"sequence ({longest} tokens); raise it or shorten skill.max_length."
            )
        fact_ids, fact_labels = _padded(facts, pad)
        skill_ids, skill_labels = _padded([p + a for p, a in skill], pad)
        if not recipe.skill_prompt_loss:  # the listed words are random: a target that teaches nothing
            for row, (prompt, _) in enumerate(skill):
                skill_labels[row, : len(prompt)] = -100

        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, math.ceil(recipe.warmup_ratio * recipe.steps), recipe.steps
        )
        generator = torch.Generator().manual_seed(recipe.seed)
        order = torch.randperm(len(facts), generator=generator)
        cursor = 0
        weight = recipe.fact_batch_size / (recipe.fact_batch_size + recipe.skill_batch_size)

        def loss_of(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            attention_mask = (input_ids != pad).long()
            width = int(attention_mask.sum(dim=1).max())  # padded to the longest sequence of this batch only
            input_ids, labels, attention_mask = input_ids[:, :width], labels[:, :width], attention_mask[:, :width]
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

        for step in range(recipe.steps):
            chunks, taken = [], 0
            while taken < recipe.fact_batch_size:
                if cursor == len(order):
                    order, cursor = torch.randperm(len(facts), generator=generator), 0
                take = min(recipe.fact_batch_size - taken, len(order) - cursor)
                chunks.append(order[cursor : cursor + take])
                cursor, taken = cursor + take, taken + take
            fact_rows = torch.cat(chunks)
            skill_rows = torch.arange(step * recipe.skill_batch_size, (step + 1) * recipe.skill_batch_size)
            fact_loss = loss_of(fact_ids[fact_rows], fact_labels[fact_rows])
            (weight * fact_loss).backward()
            skill_loss = loss_of(skill_ids[skill_rows], skill_labels[skill_rows])
            ((1 - weight) * skill_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if log is not None and (step + 1) % log_every == 0:
                log(
                    f"scenario base model: step {step + 1}/{recipe.steps}, fact loss {fact_loss.item():.3f}, "
                    f"copy loss {skill_loss.item():.3f}, {time.perf_counter() - start:.0f} s"
                )
        train_seconds = time.perf_counter() - start
        knowledge = evaluate_knowledge(model, recipe.knowledge)
        copying = evaluate_task(model, recipe.skill)

    import transformers

    metadata: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "key": recipe.key(),
        "knowledge_accuracy": knowledge["accuracy"],
        "knowledge_loss": knowledge["loss"],
        "copy_exact_match": copying["exact_match"],
        "train_seconds": round(train_seconds, 1),
        "num_threads": num_threads if num_threads is not None else torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "machine": platform.machine(),
    }
    if log is not None:
        log(
            f"scenario base model: knowledge accuracy {knowledge['accuracy']:.3f}, copy exact match "
            f"{copying['exact_match']:.3f}, trained in {train_seconds:.0f} s"
        )
    if output_dir is not None:
        output = Path(output_dir)
        model.config.use_cache = True
        model.generation_config.pad_token_id = pad
        model.save_pretrained(output)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(TOKENIZER_DIR / name, output / name)
        (output / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return metadata


def _is_complete(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


def base_model_path(
    recipe: BaseModelRecipe | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    build: bool = True,
    force: bool = False,
    num_threads: int | None = 1,
    log: Callable[[str], None] | None = rank_zero_info,
) -> Path:
    """The cached base model of ``recipe`` (default :class:`BaseModelRecipe`), built first if it is missing.

    Args:
        recipe: which model.
        cache_dir: cache root; None: :func:`cache_root` (``$LIT_MOFO_CACHE_DIR`` or ``~/.cache/lit_mofo``).
        build: build a missing model (else raise ``FileNotFoundError``).
        force: rebuild even if cached.
        num_threads: torch threads while building (see :func:`build_base_model`).
        log: progress messages.

    Returns:
        The model directory ``<cache root>/scenario/base-<key>``, complete (it is renamed into place only when
        saved).
    """
    recipe = recipe or BaseModelRecipe()
    root = cache_root(cache_dir) / "scenario"
    final = root / f"base-{recipe.key()}"
    if _is_complete(final) and not force:
        return final
    if not build:
        raise FileNotFoundError(
            f"The scenario base model {final} is not built; run `python -m lit_mofo.scenario build-base` "
            f"(cache root: ${CACHE_ENV} or ~/.cache/lit_mofo)."
        )
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"base-{recipe.key()}.lock")):
        if _is_complete(final) and not force:  # another process built it while this one waited
            return final
        prefix = f".base-{recipe.key()}-"
        for leftover in root.glob(f"{prefix}*"):  # a build that was killed; the lock says none is running now
            shutil.rmtree(leftover, ignore_errors=True)
        if log is not None:
            log(f"Building the scenario base model into {final} (first use; cached for later runs) ...")
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        try:
            build_base_model(recipe, staging, num_threads=num_threads, log=log)
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
            if final.exists():  # an incomplete leftover, or force=True
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final
