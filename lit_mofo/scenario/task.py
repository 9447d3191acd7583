"""The embedded scenario's word-list tasks: ``repeat`` (a skill of the base model), ``cipher`` (the fine-tuning task)
and the other tasks of the continual sequence.

A problem is ``"<kind> : w1 w2 w3 ="`` (``reverse_cipher`` is written ``"reverse cipher : w1 w2 ="``) and its answer is

- ``repeat``: the same words (``w1 w2 w3``);
- ``cipher``: every word replaced by its code word under a fixed substitution cipher (``f(w1) f(w2) f(w3)``), a
  seeded derangement of the word pool, so no word is its own code;
- ``reverse``: the words in reverse order (``w3 w2 w1``) — a harder option, which a few hundred steps teach only
  for lists of two words;
- ``reverse_cipher``: the code words in reverse order (``f(w3) f(w2) f(w1)``): both operations at once, with the
  cipher of ``cipher`` for the same pool and seed.

The words come from one of two pools of the scenario's vocabulary (``pool``):

- ``names`` (the default): entity names, by default the first 64, which are also the names of 64 of the world's
  entities, so the tasks read the same words as the knowledge but ask nothing about the facts; ``first_word`` moves
  the window elsewhere in the name list (the ``disjoint`` scenario, :mod:`~lit_mofo.scenario.scenarios`, writes its
  problems in names that no fact is about);
- ``values``: the 56 values of the world's relations (cities, jobs, colours, animals) — the words the knowledge
  probe's answers are, in problems that ask nothing about the facts.

The base model is pre-trained on the facts and on ``repeat`` problems over names — like a real pre-trained model,
it can already copy text — and is fine-tuned on ``cipher``, which it cannot do (it scores 0) but learns within a
few hundred steps by reusing its copying. Problems are seeded; the training and evaluation sets of a spec share no
word list (:func:`generate_task`). Every task is written in words of the shipped vocabulary (the kind's words,
``:``, ``=`` and the pool's words): no task adds a token, so the cached base models stay valid.

:data:`~lit_mofo.scenario.sequence.TASK_SEQUENCE` names four of these tasks as the stages of a continual
fine-tuning sequence, with the measured figures.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from lit_mofo.scenario.vocab import ENTITY_POOL, RELATION_VALUES

__all__ = [
    "TASK_KINDS",
    "WORD_POOLS",
    "TaskExample",
    "TaskKind",
    "TaskSpec",
    "WordPool",
    "generate_task",
]

TaskKind = Literal["cipher", "repeat", "reverse", "reverse_cipher"]
TASK_KINDS: tuple[str, ...] = ("cipher", "repeat", "reverse", "reverse_cipher")

WordPool = Literal["names", "values"]
WORD_POOLS: dict[str, tuple[str, ...]] = {
    "names": ENTITY_POOL,
    "values": tuple(value for values in RELATION_VALUES.values() for value in values),
}

_ENCIPHERED = ("cipher", "reverse_cipher")
_REVERSED = ("reverse", "reverse_cipher")


@dataclass(frozen=True)
class TaskExample:
    """One problem: the ``prompt`` and the expected ``response`` (no trailing end-of-sequence token)."""

    prompt: str
    response: str

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "response": self.response}


@dataclass(frozen=True)
class TaskSpec:
    """Which word-list problems a task holds.

    Args:
        kind: ``cipher`` (answer = each word's code word), ``repeat`` (the same words), ``reverse`` (the words
            in reverse order) or ``reverse_cipher`` (the code words in reverse order).
        num_words: how many words problems draw from: ``num_words`` words of the pool from ``first_word`` on.
        min_length: shortest list.
        max_length: longest list.
        seed: seeds the problems and the cipher.
        first_word: index of the first word in the pool (``names``: 0, the first names, which the default world's
            entities also use; 128, the names after the default world's 128 entities, which no fact is about).
        pool: ``names`` (the 256 entity names of :data:`~lit_mofo.scenario.vocab.ENTITY_POOL`) or ``values``
            (the 56 relation values of :data:`~lit_mofo.scenario.vocab.RELATION_VALUES`, in vocabulary order;
            ``num_words`` must then be at most 56).
    """

    kind: TaskKind = "cipher"
    num_words: int = 64
    min_length: int = 3
    max_length: int = 3
    seed: int = 0
    first_word: int = 0
    pool: WordPool = "names"

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind={self.kind!r} is not a task of the scenario; choose one of {TASK_KINDS}.")
        if not isinstance(self.pool, str) or self.pool not in WORD_POOLS:
            raise ValueError(
                f"pool={self.pool!r} is not a word pool of the scenario; choose one of {tuple(WORD_POOLS)}."
            )
        size = len(WORD_POOLS[self.pool])
        if not 2 <= self.num_words <= size:
            raise ValueError(
                f"num_words={self.num_words} is outside [2, {size}]: the {self.pool} pool has {size} words."
            )
        if not 0 <= self.first_word <= size - self.num_words:
            raise ValueError(
                f"first_word={self.first_word} with num_words={self.num_words}: the words are the {self.pool} pool's "
                f"[first_word : first_word + num_words], so first_word must lie in [0, {size - self.num_words}] "
                f"(the pool has {size} words)."
            )
        if not 2 <= self.min_length <= self.max_length:
            raise ValueError(
                f"min_length={self.min_length}, max_length={self.max_length}: need 2 <= min_length <= max_length."
            )

    def to_dict(self) -> dict[str, object]:
        """The fields as a dict; ``pool`` only when it is not ``names``, so the dicts (and the base models' cache
        keys, which hash them) of the specs from before pools existed stay what they were."""
        values = asdict(self)
        if self.pool == "names":
            del values["pool"]
        return values

    @property
    def words(self) -> tuple[str, ...]:
        """The words problems draw from."""
        return WORD_POOLS[self.pool][self.first_word : self.first_word + self.num_words]

    @property
    def instruction(self) -> str:
        """The words a prompt starts with: the kind, with a space for the underscore (all vocabulary words)."""
        return self.kind.replace("_", " ")

    @property
    def vocabulary(self) -> frozenset[str]:
        """Every word the problems and answers use (all in the scenario tokenizer's vocabulary)."""
        return frozenset((*self.instruction.split(), ":", "=", *self.words))

    def cipher(self) -> dict[str, str]:
        """The substitution cipher of ``cipher`` and ``reverse_cipher``: word -> code word, a seeded derangement
        of :attr:`words`."""
        rng = random.Random(f"cipher-{self.seed}")
        codes = list(self.words)
        while True:
            rng.shuffle(codes)
            if all(word != code for word, code in zip(self.words, codes, strict=True)):
                return dict(zip(self.words, codes, strict=True))

    def _answerer(self) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
        cipher = self.cipher() if self.kind in _ENCIPHERED else None
        reverse = self.kind in _REVERSED

        def answer(words: tuple[str, ...]) -> tuple[str, ...]:
            ordered = tuple(reversed(words)) if reverse else tuple(words)
            return tuple(cipher[word] for word in ordered) if cipher is not None else ordered

        return answer

    def answer(self, words: tuple[str, ...]) -> tuple[str, ...]:
        """The answer words of the problem over ``words``."""
        return self._answerer()(words)

    def example(self, words: tuple[str, ...]) -> TaskExample:
        """The problem of this kind over ``words``."""
        return _example(self.instruction, words, self.answer(words))


def _example(instruction: str, words: tuple[str, ...], answer: tuple[str, ...]) -> TaskExample:
    return TaskExample(prompt=f"{instruction} : {' '.join(words)} =", response=" ".join(answer))


def generate_task(
    spec: TaskSpec | None = None, *, num_train: int = 4096, num_eval: int = 256
) -> tuple[list[TaskExample], list[TaskExample]]:
    """``num_train`` training and ``num_eval`` evaluation problems of ``spec``, no word list in both.

    The evaluation set is drawn first with its own stream, so it does not depend on ``num_train``; training
    lists equal to an evaluation list are redrawn. Training problems may repeat; evaluation problems do not.
    For ``reverse`` and ``reverse_cipher``, palindromic lists (whose answer equals the ``repeat`` or ``cipher``
    answer) are left out of the evaluation set, so a model that only copies or only enciphers scores exactly 0 (a
    cipher has no fixed word, so no list is its own answer).
    """
    spec = spec or TaskSpec()
    pool = spec.words
    answer = spec._answerer()

    def example(words: tuple[str, ...]) -> TaskExample:
        return _example(spec.instruction, words, answer(words))

    distinct_lists = sum(spec.num_words**n for n in range(spec.min_length, spec.max_length + 1))
    if num_eval > distinct_lists // 2:
        raise ValueError(
            f"num_eval={num_eval} is more than half of the {distinct_lists} distinct word lists of {spec}; "
            "lower num_eval or raise num_words / max_length."
        )

    def draw(rng: random.Random) -> tuple[str, ...]:
        return tuple(rng.choice(pool) for _ in range(rng.randint(spec.min_length, spec.max_length)))

    eval_rng = random.Random(f"{spec.kind}-eval-{spec.seed}")
    held_out: dict[tuple[str, ...], None] = {}
    while len(held_out) < num_eval:
        words = draw(eval_rng)
        if spec.kind in _REVERSED and words == words[::-1]:
            continue
        held_out.setdefault(words, None)
    train_rng = random.Random(f"{spec.kind}-train-{spec.seed}")
    train: list[TaskExample] = []
    while len(train) < num_train:
        words = draw(train_rng)
        if words not in held_out:
            train.append(example(words))
    return train, [example(words) for words in held_out]
