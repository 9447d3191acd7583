"""The embedded scenario's fixed vocabulary and its word-level tokenizer (shipped as package data).

Every word the scenario can produce is listed here: special tokens, the function words of the fact and task
templates, the value words of each relation and a pool of generated entity names. The tokenizer built from them
(:func:`build_tokenizer`) is shipped in ``lit_mofo/scenario/tokenizer/`` and loaded with :func:`load_tokenizer`, so a
scenario model needs no download. ``python -m lit_mofo.scenario build-tokenizer`` (:func:`save_tokenizer`) rewrites
the shipped files; a test checks that they equal a fresh build.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import PreTrainedTokenizerFast

__all__ = [
    "ENTITY_POOL",
    "FUNCTION_WORDS",
    "RELATION_VALUES",
    "SPECIAL_TOKENS",
    "TOKENIZER_DIR",
    "VOCABULARY",
    "build_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
]

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)

FUNCTION_WORDS: tuple[str, ...] = ("lives", "in", "works", "as", "a", "likes", "the", "color", "owns", ".")
TASK_WORDS: tuple[str, ...] = ("cipher", "repeat", "reverse", ":", "=")

RELATION_VALUES: dict[str, tuple[str, ...]] = {
    "city": (
        "paris", "lisbon", "oslo", "cairo", "lima", "quito", "dakar", "hanoi",
        "seoul", "kyiv", "rome", "vienna", "dublin", "nairobi", "delhi", "tokyo",
    ),
    "job": (
        "baker", "pilot", "doctor", "farmer", "painter", "sailor", "teacher", "tailor",
        "miner", "nurse", "judge", "singer", "chef", "poet", "clerk", "guard",
    ),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown", "gray", "gold"),
    "animal": ("cat", "dog", "horse", "parrot", "goat", "rabbit", "turtle", "owl", "fox", "pig", "duck", "camel"),
}  # fmt: skip

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "s", "l", "k", "x")
ENTITY_POOL_SIZE = 256
_ENTITY_POOL_SEED = 1234  # fixed: the pool is part of the shipped vocabulary, not of a scenario's seed


def _entity_pool(size: int, seed: int) -> tuple[str, ...]:
    """``size`` distinct two-syllable invented names (``"zorvak"``), none equal to another vocabulary word."""
    rng = random.Random(seed)
    taken = set(SPECIAL_TOKENS) | set(FUNCTION_WORDS) | set(TASK_WORDS)
    taken |= {v for values in RELATION_VALUES.values() for v in values}
    names: list[str] = []
    while len(names) < size:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return tuple(names)


ENTITY_POOL: tuple[str, ...] = _entity_pool(ENTITY_POOL_SIZE, _ENTITY_POOL_SEED)

VOCABULARY: tuple[str, ...] = (
    *SPECIAL_TOKENS,
    *FUNCTION_WORDS,
    *TASK_WORDS,
    *(v for values in RELATION_VALUES.values() for v in values),
    *ENTITY_POOL,
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`VOCABULARY`: splits on whitespace and punctuation, prepends ``<bos>``.

    Unknown words map to ``<unk>``; ``decode`` joins words with single spaces, so ``decode(encode(text))``
    returns ``text`` for any text of vocabulary words separated by single spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {word: index for index, word in enumerate(VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces, nothing else
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="right",
        model_max_length=1024,
    )


def save_tokenizer(directory: str | Path = TOKENIZER_DIR) -> Path:
    """Write :func:`build_tokenizer`'s files to ``directory`` (default: the shipped copy), with
    ``tokenizer_class: PreTrainedTokenizerFast`` so ``AutoTokenizer`` loads them with transformers 4 and 5."""
    directory = Path(directory)
    build_tokenizer().save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def load_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped scenario tokenizer (``lit_mofo/scenario/tokenizer/``); no network, no rebuild."""
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"The scenario tokenizer is missing from {TOKENIZER_DIR} (package data not installed?); reinstall "
            "lit_mofo or run `python -m lit_mofo.scenario build-tokenizer`."
        )
    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))
