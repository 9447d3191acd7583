"""The probes' former single data module, split by concern; kept as re-exports for the modules that still import it.

What lived here now lives in :mod:`~lit_mofo.probes._checks` (argument checks), :mod:`~lit_mofo.probes._records`
(files and records), :mod:`~lit_mofo.probes._tokens` (token ids, tokenizers, padding), :mod:`~lit_mofo.probes._inspect`
(the model's kind, vocabulary and positions), :mod:`~lit_mofo.probes._model` (calling the model),
:mod:`~lit_mofo.probes.distribution` (splitting batches across ranks, :func:`run_batches`) and
:mod:`~lit_mofo.probes._metrics`; import from those. ``lit_mofo.probes.lm_eval`` still reads these names from here.
"""

from __future__ import annotations

from lit_mofo.probes._checks import (
    ForwardFn,
    check_forward_fn,
    check_key,
    check_limit,
    check_name,
    check_size,
    error,
    import_object,
    takes_two_arguments,
    where,
)
from lit_mofo.probes._inspect import vocabulary_size
from lit_mofo.probes._metrics import SumPair
from lit_mofo.probes._model import (
    call_model,
    check_forward,
    check_gathered,
    forward_logits,
    logits_of,
)
from lit_mofo.probes._records import (
    FILE_FORMATS,
    SUFFIXES,
    Record,
    check_dataset,
    check_files,
    check_loader,
    dataset_records,
    in_memory_records,
)
from lit_mofo.probes._tokens import (
    IGNORE_INDEX,
    TOKENIZER_MISMATCH,
    as_id_list,
    check_batch_ids,
    check_in_vocabulary,
    check_tokenizer,
    pad_id,
    pad_right,
    require_tokenizer,
    resolve_tokenizer,
    tokenize,
)
from lit_mofo.probes.distribution import (
    apply_limit,
    rank_batches,
    run_batches,
    world_and_rank,
)

__all__ = [
    "FILE_FORMATS",
    "ForwardFn",
    "IGNORE_INDEX",
    "Record",
    "SUFFIXES",
    "SumPair",
    "TOKENIZER_MISMATCH",
    "apply_limit",
    "as_id_list",
    "call_model",
    "check_batch_ids",
    "check_dataset",
    "check_files",
    "check_forward",
    "check_forward_fn",
    "check_gathered",
    "check_in_vocabulary",
    "check_key",
    "check_limit",
    "check_loader",
    "check_name",
    "check_size",
    "check_tokenizer",
    "dataset_records",
    "error",
    "forward_logits",
    "import_object",
    "in_memory_records",
    "logits_of",
    "pad_id",
    "pad_right",
    "rank_batches",
    "require_tokenizer",
    "resolve_tokenizer",
    "run_batches",
    "takes_two_arguments",
    "tokenize",
    "vocabulary_size",
    "where",
    "world_and_rank",
]
