"""The embedded scenario's word-list tasks: ``repeat`` (a skill of the base model), ``cipher`` (the fine-tuning task).

A problem is ``"<kind> : w1 w2 w3 ="`` and its answer is

- ``repeat``: the same words (``w1 w2 w3``);
- ``cipher``: every word replaced by its code word under a fixed substitution cipher (``f(w1) f(w2) f(w3)``), a
  seeded derangement of the word pool, so no word is its own code;
- ``reverse``: the words in reverse order (``w3 w2 w1``) — a harder option, which a few hundred steps teach only
  for lists of two words.

The words are entity names of the scenario's vocabulary: by default the first 64, which are also the names of 64 of
the world's entities, so the tasks read the same words as the knowledge but ask nothing about the facts;
``first_word`` moves the pool elsewhere in the name list (the ``disjoint`` scenario, :mod:`~lit_mofo.scenario.
scenarios`, writes its problems in names that no fact is about). The base model is pre-trained on the facts and on
``repeat`` problems — like a real pre-trained model, it can already copy text — and is fine-tuned on ``cipher``,
which it cannot do (it scores 0) but learns within a few hundred steps by reusing its copying. Problems are seeded;
the training and evaluation sets of a spec share no word list (:func:`generate_task`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Literal

from lit_mofo.scenario.vocab import ENTITY_POOL

__all__ = ["TASK_KINDS", "TaskExample", "TaskKind", "TaskSpec", "generate_task"]

TaskKind = Literal["cipher", "repeat", "reverse"]
TASK_KINDS: tuple[str, ...] = ("cipher", "repeat", "reverse")


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
        kind: ``cipher`` (answer = each word's code word), ``repeat`` (the same words) or ``reverse`` (the words
            in reverse order).
        num_words: how many words problems draw from: ``num_words`` entity names from ``first_word`` on.
        min_length: shortest list.
        max_length: longest list.
        seed: seeds the problems and the cipher.
        first_word: index of the pool's first word in :data:`~lit_mofo.scenario.vocab.ENTITY_POOL` (0: the first
            names, which the default world's entities also use; 128: the names after the default world's 128
            entities, which no fact is about).
    """

    kind: TaskKind = "cipher"
    num_words: int = 64
    min_length: int = 3
    max_length: int = 3
    seed: int = 0
    first_word: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind={self.kind!r} is not a task of the scenario; choose one of {TASK_KINDS}.")
        if not 2 <= self.num_words <= len(ENTITY_POOL):
            raise ValueError(f"num_words={self.num_words} is outside [2, {len(ENTITY_POOL)}].")
        if not 0 <= self.first_word <= len(ENTITY_POOL) - self.num_words:
            raise ValueError(
                f"first_word={self.first_word} with num_words={self.num_words}: the words are "
                f"ENTITY_POOL[first_word : first_word + num_words], so first_word must lie in "
                f"[0, {len(ENTITY_POOL) - self.num_words}] (the pool has {len(ENTITY_POOL)} names)."
            )
        if not 2 <= self.min_length <= self.max_length:
            raise ValueError(
                f"min_length={self.min_length}, max_length={self.max_length}: need 2 <= min_length <= max_length."
            )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def words(self) -> tuple[str, ...]:
        """The word pool problems draw from."""
        return ENTITY_POOL[self.first_word : self.first_word + self.num_words]

    def cipher(self) -> dict[str, str]:
        """The substitution cipher of ``kind="cipher"``: word -> code word, a seeded derangement of :attr:`words`."""
        rng = random.Random(f"cipher-{self.seed}")
        codes = list(self.words)
        while True:
            rng.shuffle(codes)
            if all(word != code for word, code in zip(self.words, codes, strict=True)):
                return dict(zip(self.words, codes, strict=True))

    def answer(self, words: tuple[str, ...]) -> tuple[str, ...]:
        """The answer words of the problem over ``words``."""
        if self.kind == "cipher":
            cipher = self.cipher()
            return tuple(cipher[word] for word in words)
        return tuple(reversed(words)) if self.kind == "reverse" else tuple(words)

    def example(self, words: tuple[str, ...]) -> TaskExample:
        """The problem of this kind over ``words``."""
        return TaskExample(prompt=f"{self.kind} : {' '.join(words)} =", response=" ".join(self.answer(words)))


def generate_task(
    spec: TaskSpec | None = None, *, num_train: int = 4096, num_eval: int = 256
) -> tuple[list[TaskExample], list[TaskExample]]:
    """``num_train`` training and ``num_eval`` evaluation problems of ``spec``, no word list in both.

    The evaluation set is drawn first with its own stream, so it does not depend on ``num_train``; training
    lists equal to an evaluation list are redrawn. Training problems may repeat; evaluation problems do not.
    For ``reverse``, palindromic lists (whose answer equals the ``repeat`` answer) are left out of the evaluation
    set, so a model that only copies scores exactly 0 (a cipher has no fixed word, so no list is its own answer).
    """
    spec = spec or TaskSpec()
    pool = spec.words
    cipher = spec.cipher() if spec.kind == "cipher" else None

    def example(words: tuple[str, ...]) -> TaskExample:
        answer = tuple(cipher[w] for w in words) if cipher is not None else spec.answer(words)
        return TaskExample(prompt=f"{spec.kind} : {' '.join(words)} =", response=" ".join(answer))

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
        if spec.kind == "reverse" and words == words[::-1]:
            continue
        held_out.setdefault(words, None)
    train_rng = random.Random(f"{spec.kind}-train-{spec.seed}")
    train: list[TaskExample] = []
    while len(train) < num_train:
        words = draw(train_rng)
        if words not in held_out:
            train.append(example(words))
    return train, [example(words) for words in held_out]
