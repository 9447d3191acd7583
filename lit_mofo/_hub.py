"""Where pre-trained models, tokenizers and datasets come from: a local directory or the Hugging Face Hub, offline too.

Every loader of lit_mofo that takes a name or a path goes through here, so that the three cases a user meets give
one clear answer each, at once:

- a local path that does not exist (``./models/llama``, ``/data/llama``, ``~/llama``, anything that cannot be a Hub
  name) is "no such directory", with the working directory — not transformers' message about repository ids;
- a Hub name that is neither cached nor reachable (``HF_HUB_OFFLINE=1``, or no connection to the Hub's endpoint)
  fails in well under a second with "not cached and no network: pass a local path or pre-download with ...",
  instead of half a minute of retries ending in ``gaierror``;
- a Hub name that is cached while the Hub is unreachable loads from the cache (``local_files_only=True``) without
  trying the network first.

Tokenizers are loaded by the class their own ``tokenizer_config.json`` names when that is the generic
``PreTrainedTokenizerFast``/``TokenizersBackend`` (a tokenizer trained or assembled with the ``tokenizers`` library):
``AutoTokenizer`` would otherwise pick the class registered for the *model's* type when the tokenizer sits in a
model directory (e.g. ``Qwen2Tokenizer`` for a Qwen2 config), which rebuilds a different pipeline and gives wrong ids.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = [
    "GENERIC_TOKENIZER_CLASSES",
    "dataset_is_cached",
    "hub_reachable",
    "is_hub_name",
    "is_offline",
    "load_tokenizer",
    "no_network_reason",
    "require_dataset",
    "resolve_pretrained",
]

# Tokenizer classes that load ``tokenizer.json`` exactly as it is (transformers >= 5 calls the fast one
# ``TokenizersBackend``; ``PreTrainedTokenizerFast`` is its name before, and an alias after).
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
_TRUE = {"1", "ON", "YES", "TRUE"}
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def is_offline(repo_type: Literal["model", "dataset"] = "model") -> bool:
    """Whether the environment asks for offline mode: ``HF_HUB_OFFLINE`` set to 1/ON/YES/TRUE (now or when
    ``huggingface_hub`` was imported), or the library's own switch for the kind of repository
    (``TRANSFORMERS_OFFLINE`` for models, ``HF_DATASETS_OFFLINE`` for datasets)."""
    from huggingface_hub import constants

    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE" if repo_type == "model" else "HF_DATASETS_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE) or any(os.environ.get(name, "").upper() in _TRUE for name in names)


@functools.lru_cache(maxsize=4)
def _endpoint_answers(endpoint: str, timeout: float) -> bool:
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # gaierror (no DNS), refused, unreachable, timed out
        return False


def hub_reachable(timeout: float = 3.0, repo_type: Literal["model", "dataset"] = "model") -> bool:
    """Whether the Hugging Face Hub can be reached: not in offline mode, and a TCP connection to its endpoint
    (``HF_ENDPOINT``, default ``huggingface.co:443``) opens within ``timeout`` seconds. With a proxy configured
    (``HTTPS_PROXY``...) the answer is yes: the Hub client goes through the proxy, which this check cannot judge.
    The connection is tried once per process."""
    if is_offline(repo_type):
        return False
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    from huggingface_hub import constants

    return _endpoint_answers(constants.ENDPOINT, timeout)


def no_network_reason(repo_type: Literal["model", "dataset"] = "model") -> str:
    """Why there is no network, in the words of the environment: offline mode or the unreachable endpoint."""
    from huggingface_hub import constants

    if is_offline(repo_type):
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    return f"{constants.ENDPOINT} cannot be reached"


def is_hub_name(name: str) -> bool:
    """Whether ``name`` can be a Hub repository id (``name`` or ``namespace/name``), as opposed to a local path:
    ``./x``, ``/x``, ``~/x``, ``a/b/c`` or ``x\\y`` can only be paths."""
    if not name or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/"):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cache_hint(name: str, repo_type: Literal["model", "dataset"]) -> str:
    download = f"hf download {name}" if repo_type == "model" else f"hf download --repo-type dataset {name}"
    return (
        f"pass a local path (a directory written by `save_pretrained`) or pre-download with `{download}` on a "
        "machine with network, into the same Hugging Face cache (HF_HOME)"
    )


def resolve_pretrained(
    name: str, *, argument: str, repo_type: Literal["model", "dataset"] = "model", marker: str = "config.json"
) -> tuple[str, bool]:
    """``(source, local_files_only)`` for ``from_pretrained``: ``name`` itself, and whether to stay off the network.

    Args:
        name: a local directory or a Hub repository id.
        argument: how the user set it, for the messages (e.g. ``"CausalLMModule(model=...)"``).
        repo_type: what kind of Hub repository a name is.
        marker: a file every repository of the kind has; its presence in the cache means "cached".

    Raises:
        MisconfigurationException: ``name`` is a path that does not exist ("no such directory"), or a Hub name that
            is not cached while the Hub cannot be reached.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MisconfigurationException(
                f"{argument}: {name!r} is a file; give the directory that holds it (a `save_pretrained` directory "
                f"with {marker})."
            )
        return str(path), False
    if not is_hub_name(name):
        raise MisconfigurationException(
            f"{argument}: no such directory: {name!r} (resolved to {path.resolve()}; cwd: {os.getcwd()}). Check the "
            "path, or give a Hugging Face Hub name such as 'Qwen/Qwen2.5-0.5B'."
        )
    if hub_reachable(repo_type=repo_type):
        return name, False
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, marker, repo_type=repo_type), str):
        return name, True  # cached: load it without trying the network
    raise MisconfigurationException(
        f"{argument}: {name!r} is no local directory (cwd: {os.getcwd()}) nor in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and {no_network_reason(repo_type)}. Not cached and no network: "
        f"{_cache_hint(name, repo_type)}."
    )


def dataset_is_cached(name: str) -> bool:
    """Whether the Hub dataset ``name`` has files in the Hub cache or a prepared copy in the ``datasets`` cache."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    try:
        from datasets import config

        prepared: Path | None = Path(config.HF_DATASETS_CACHE) / name.replace("/", "___")
    except ImportError:
        prepared = None
    return hub.is_dir() or (prepared is not None and prepared.is_dir())


def require_dataset(name: str, *, argument: str) -> bool:
    """Check that a Hub dataset can be loaded: cached, or the Hub reachable. Returns whether the Hub is unreachable
    (the dataset then loads from the cache: pass that on as offline mode where the loader takes it).

    Raises:
        MisconfigurationException: not cached and no network, with the fix.
    """
    if hub_reachable(repo_type="dataset"):
        return False
    if dataset_is_cached(name):
        return True
    raise MisconfigurationException(
        f"{argument}: the Hugging Face dataset {name!r} is not in the cache, and {no_network_reason('dataset')}. "
        "Not cached and no network: pass a local path (JSONL files or a dataset directory) or pre-download with "
        f"`python -c \"import datasets; datasets.load_dataset('{name}')\"` on a machine with network, into the same "
        "Hugging Face cache (HF_HOME)."
    )


def load_tokenizer(source: str, **kwargs: Any) -> Any:
    """The tokenizer at ``source`` (a local directory or a Hub name), loaded by its own class.

    ``AutoTokenizer``, except that a tokenizer whose ``tokenizer_config.json`` names the generic fast class
    (:data:`GENERIC_TOKENIZER_CLASSES`) is loaded by that class: its ``tokenizer.json`` as it is. ``AutoTokenizer``
    would pick the class registered for the model type of a ``config.json`` beside it (e.g. ``Qwen2Tokenizer`` for
    a custom tokenizer saved into a Qwen2 model directory), which builds its own pre-tokenizer and gives other ids.
    ``kwargs`` go to ``from_pretrained`` (``local_files_only``, ``revision``...).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    try:
        declared = get_tokenizer_config(source, **kwargs).get("tokenizer_class")
    except (OSError, ValueError):
        declared = None
    if declared in GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(source, **kwargs)
    return AutoTokenizer.from_pretrained(source, **kwargs)
