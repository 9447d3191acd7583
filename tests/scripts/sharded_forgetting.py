"""ForgettingMonitor and every probe under Lightning's ModelParallelStrategy (FSDP2) with 2 CPU processes; run by
``tests/test_sharded_forgetting.py``, which also runs the same fit on 1 process through :func:`fit` (unsharded).

Usage::

    python tests/scripts/sharded_forgetting.py OUT_DIR fit [--tasks TASK_DIR]
    python tests/scripts/sharded_forgetting.py OUT_DIR ranks [--tasks TASK_DIR]

``fit``: a tiny Llama sharded per decoder block with ``fully_shard`` in ``configure_model``, fed the same batch on
every rank (``use_distributed_sampler=False``), fine-tunes 4 steps with a monitor evaluating every probe every 2
steps; every built-in probe has an odd number of reference batches, so rank 1 runs a padding forward. A
``ModelCheckpoint`` writes a sharded checkpoint at step 2, and a second fit resumes from it to step 4. With
``--tasks`` (a directory written by :func:`write_lm_eval_task`) an ``LMEvalProbe`` runs too.

``ranks``: fits with a probe whose data or errors differ between the ranks: one failing on rank 1 only at each place a
probe can fail safely (preparing its data in ``setup``, checking a batch before the forward, reading the output after
it, a user's function), where both ranks must raise the error instead of waiting for each other; a reference
dataloader shorter on rank 1, where the ranks must still run as many forwards; one empty on rank 1, which cannot be
padded and must fail on both ranks; a user's function returning its rank, unreduced; a GPT-2 of 32 positions whose
reference set holds a 60-token window in rank 1's batch (from token ids and from a dataloader), which both ranks
must refuse before any forward instead of hanging in it; and (with ``--tasks``) an lm-eval run failing on rank 1
before its forwards while rank 0 is about to start them.

Lightning re-launches this very command for rank 1, so it must run as its own process, never inside pytest. Each rank
writes ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lit_mofo.callbacks.forgetting_monitor import ForgettingMonitor
from lit_mofo.probes import AccuracyProbe, CallableProbe, LanguageModelProbe, MultipleChoiceProbe, Probe
from lit_mofo.scenario.probes import KnowledgeProbe, TaskProbe
from lit_mofo.scenario.vocab import load_tokenizer
from lit_mofo.strategy import StrategyAdapter

VOCAB = len(load_tokenizer())  # the scenario probes score the scenario's vocabulary
STEPS = 4
EVERY = 2
CLASSES = 4
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASK = "lit_mofo_sharded_mc"


def progressions(rows: int, length: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(VOCAB, (rows, 1), generator=generator)
    stride = torch.randint(1, 5, (rows, 1), generator=generator)
    return (start + stride * torch.arange(length)) % VOCAB


POSITIONS = 32  # ShardedGPT2's learned positions
LONG = progressions(1, 60, seed=7)[0]  # 60 tokens: longer than ShardedGPT2's positions
REFERENCE = progressions(10, 12, seed=31)  # 5 batches of 2: rank 0 scores 3, rank 1 scores 2 and pads one
TRAIN = progressions(8, 16, seed=5)  # one batch per step, the same on both ranks


class ShardedLM(pl.LightningModule):
    """A tiny Llama that shards each decoder block and then the model with FSDP2 when a device mesh is given
    (ModelParallelStrategy), and stays whole on one process; counts the model's forwards."""

    def __init__(self) -> None:
        super().__init__()
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = LlamaForCausalLM(config)
        self.forwards = 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: Any) -> None:
        self.forwards += 1

    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.blocks():
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class ShardedGPT2(ShardedLM):
    """:class:`ShardedLM` with a tiny GPT-2 of 32 learned positions (``n_positions``) instead of the Llama: a window
    of 33 tokens or more has no position embedding row."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        config = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=64, n_layer=2, n_head=4)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = GPT2LMHeadModel(config)
        self.forwards = 0
        self.model.register_forward_pre_hook(self._count)

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.h


def last_token_classes(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Class logits of a causal LM: the next-token logits of the first tokens after the (equal-length) input."""
    return model(input_ids=batch["input_ids"]).logits[:, -1, :CLASSES]


def mean_logit(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """A user's function: one forward of the whole model on a fixed input (the same on every rank)."""
    logits = pl_module.model(input_ids=REFERENCE[:2].to(pl_module.device)).logits
    return {"mean_logit": logits.float().mean().item()}


def word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *LETTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_lm_eval_task(directory: Path) -> Path:
    """A local multiple-choice lm-eval task (YAML + JSONL) in ``directory``, as in tests/test_lm_eval_probe.py."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(9):
        question = " ".join(LETTERS[(i + k) % 26] for k in range(3 + i % 3))
        choices = [" ".join(LETTERS[(5 * i + 7 * c + 3 * k) % 26] for k in range(2)) for c in range(3)]
        rows.append({"question": question, "choices": choices, "label": i % 3})
    data = directory / "sharded_mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "sharded_mc.yaml").write_text(
        f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    return directory


def probes(tasks: Path | None = None) -> dict[str, Probe]:
    """Every kind of probe, each with an odd number of reference batches."""
    labels = torch.randint(CLASSES, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    classified = [
        {"input_ids": row, "label": label} for row, label in zip(progressions(12, 6, 11).tolist(), labels, strict=True)
    ]
    questions = [
        {"context_ids": row[:6], "choice_ids": [row[6:8], [7, 8], [9, 10]], "label": i % 3}
        for i, row in enumerate(progressions(12, 8, seed=13).tolist())
    ]
    chosen: dict[str, Probe] = {
        "lm": LanguageModelProbe(token_ids=REFERENCE.tolist(), batch_size=2),
        "lm_loader": LanguageModelProbe(dataloader=DataLoader(TensorDataset(REFERENCE), batch_size=2)),
        "accuracy": AccuracyProbe(examples=classified, batch_size=4, forward_fn=last_token_classes),
        "multiple_choice": MultipleChoiceProbe(examples=questions, batch_size=4),
        "knowledge": KnowledgeProbe(batch_size=64, limit_batches=3),
        "task": TaskProbe(kind="repeat", num_examples=36, batch_size=12),
        "callable": CallableProbe(mean_logit, higher_is_better=True),
    }
    if tasks is not None:
        from lit_mofo.probes import LMEvalProbe

        chosen["harness"] = LMEvalProbe(
            TASK, include_path=tasks, include_defaults=False, tokenizer=word_tokenizer(), batch_size=4
        )
    return chosen


def trainer_for(
    devices: int, root: Path, callbacks: list[pl.Callback], max_steps: int = STEPS, logger: Any = False
) -> pl.Trainer:
    strategy: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if devices == 2 else "auto"
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        default_root_dir=root,
        logger=logger,
        callbacks=callbacks,
        use_distributed_sampler=False,  # the same batch on every rank: the averaged gradient is the 1-process one
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )


def train_loader() -> DataLoader[tuple[Tensor, ...]]:
    return DataLoader(TensorDataset(TRAIN), batch_size=len(TRAIN))


def records(monitor: ForgettingMonitor) -> list[dict[str, Any]]:
    """The monitor's history without the timings (which differ from run to run)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in monitor.history]


def fit(devices: int, root: Path, tasks: Path | None = None, checkpoint_every: int | None = None) -> dict[str, Any]:
    """The uninterrupted fit on ``devices`` processes: the monitor's records, the forwards and the final weights."""
    module = ShardedLM()
    monitor = ForgettingMonitor(probes(tasks), every_n_train_steps=EVERY, report_dir=root / "report")
    callbacks: list[pl.Callback] = [monitor]
    if checkpoint_every:
        callbacks.append(
            ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=checkpoint_every, save_top_k=-1)
        )
    trainer = trainer_for(devices, root, callbacks, logger=CSVLogger(root, name="logs", version=0))
    start = time.perf_counter()
    trainer.fit(module, train_loader())
    seconds = time.perf_counter() - start
    params = dict(module.model.named_parameters())
    return {
        "records": records(monitor),
        "baselines": monitor.baselines,
        "forwards": module.forwards,
        "param_types": sorted({type(p).__name__ for p in params.values()}),
        "weights": {name: StrategyAdapter.full(p.detach()).clone() for name, p in params.items()},
        "seconds": seconds,
        "probe_seconds": {
            name: sum(r["seconds"] for r in monitor.history if r["probe"] == name and r["step"] == 0)
            for name in monitor.probes
        },
    }


class UnreadableOnRank1(Dataset[list[int]]):
    """Reference sequences stored per rank, of which rank 1's copy cannot be read."""

    def __len__(self) -> int:
        return len(REFERENCE)

    def __getitem__(self, index: int) -> list[int]:
        if torch.distributed.get_rank() == 1 and index == 3:
            raise OSError("reference shard 3 is unreadable on this rank")
        return REFERENCE[index].tolist()


def failing_probes() -> dict[str, Probe]:
    """Probes that fail on rank 1 only, one per place a probe can fail safely."""
    bad_ids = REFERENCE.clone()
    bad_ids[2, 5] = VOCAB + 7  # in batch 1 (rows 2-3): rank 1's share
    labels = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]
    labels[5] = CLASSES + 2  # in batch 1 (examples 4-7): rank 1's share
    rows = progressions(12, 6, 11).tolist()
    examples = [{"input_ids": row, "label": label} for row, label in zip(rows, labels, strict=True)]

    def rank_dependent(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        value = mean_logit(trainer, pl_module)["mean_logit"]  # every rank runs its forward first
        if trainer.global_rank == 1:
            raise KeyError("metric 'exact' is missing from this rank's answers")
        return value

    return {
        "setup": LanguageModelProbe(dataset=UnreadableOnRank1(), batch_size=2, name="setup"),
        "prepare": LanguageModelProbe(dataloader=[row for row in bad_ids.split(2)], name="prepare"),
        "consume": AccuracyProbe(examples=examples, batch_size=4, forward_fn=last_token_classes, name="consume"),
        "callable": CallableProbe(rank_dependent, higher_is_better=True, name="callable"),
    }


def run_fit(out_dir: Path, tasks: Path | None) -> dict[str, Any]:
    result = fit(2, out_dir, tasks, checkpoint_every=EVERY)
    checkpoint = next((out_dir / "checkpoints").glob("*step=2*"))
    module = ShardedLM()
    monitor = ForgettingMonitor(probes(tasks), every_n_train_steps=EVERY, report=False)
    trainer = trainer_for(2, out_dir / "resumed", [monitor])
    trainer.fit(module, train_loader(), ckpt_path=checkpoint)
    result["resumed_records"] = records(monitor)
    result["resumed_from"] = checkpoint.name
    result["checkpoint_is_sharded"] = checkpoint.is_dir()
    return result


class RankDependentLoader:
    """A reference dataloader that yields other batches on each rank: ``rows[rank]`` batches of 2 sequences."""

    def __init__(self, rows: tuple[int, int]) -> None:
        self.rows = rows

    def __iter__(self) -> Any:
        rows = self.rows[torch.distributed.get_rank()]
        yield from REFERENCE[: 2 * rows].split(2) if rows else ()


def harness_failing_on_rank_1(tasks: Path) -> Probe:
    """An LMEvalProbe whose lm-eval run fails on rank 1 before its first forward (say, loading the task's data),
    while rank 0 goes on into its forwards."""
    from lit_mofo.probes import LMEvalProbe

    class FailingOnRank1(LMEvalProbe):
        def _run(self, pl_module: pl.LightningModule, adapter: Any, meeting: Any) -> Any:
            if adapter.rank == 1:
                raise FileNotFoundError("the task's data files are missing on this node")
            return super()._run(pl_module, adapter, meeting)

    return FailingOnRank1(
        TASK, include_path=tasks, include_defaults=False, tokenizer=word_tokenizer(), batch_size=4, name="harness"
    )


def overlong_probes() -> dict[str, Probe]:
    """Probes of ShardedGPT2 whose reference set holds a window longer than its 32 positions, in the batch dealt to
    rank 1 (batch 1): built from token ids (checked in ``setup``, on every rank) and from a dataloader (checked by
    rank 1 before the forward that would index past the position table)."""
    rows = REFERENCE[:3].tolist()
    return {
        "overlong": LanguageModelProbe(
            token_ids=[rows[0], rows[1], LONG.tolist(), rows[2]], batch_size=2, max_length=64, name="overlong"
        ),
        "overlong_loader": LanguageModelProbe(
            dataloader=[REFERENCE[:2], torch.stack([LONG, LONG])], name="overlong_loader"
        ),
    }


def run_ranks(out_dir: Path, tasks: Path | None) -> dict[str, Any]:
    outcomes: dict[str, tuple[str, str]] = {}
    forwards: dict[str, int] = {}
    values: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    chosen: dict[str, Probe] = {
        **failing_probes(),
        "uneven": LanguageModelProbe(dataloader=RankDependentLoader((5, 3)), name="uneven"),
        "empty": LanguageModelProbe(dataloader=RankDependentLoader((2, 0)), name="empty"),
        "unreduced": CallableProbe(lambda trainer, module: float(trainer.global_rank), True, name="unreduced"),
        **overlong_probes(),
    }
    if tasks is not None:
        chosen["harness"] = harness_failing_on_rank_1(tasks)
    for name, probe in chosen.items():
        monitor = ForgettingMonitor({name: probe}, report=False)
        trainer = trainer_for(2, out_dir / name, [monitor], max_steps=1)
        module = ShardedGPT2() if name.startswith("overlong") else ShardedLM()
        start = time.perf_counter()
        try:
            trainer.fit(module, train_loader())
            outcomes[name] = ("", "")
        except Exception as error:  # recorded for the test
            outcomes[name] = (type(error).__name__, str(error))
        seconds[name] = time.perf_counter() - start
        forwards[name] = module.forwards
        values[name] = monitor.baselines.get(name, {})
    return {"outcomes": outcomes, "forwards": forwards, "baselines": values, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("scenario", choices=["fit", "ranks"])
    parser.add_argument("--tasks", type=Path, default=None, help="directory of the local lm-eval task")
    args = parser.parse_args()
    result = run_fit(args.out_dir, args.tasks) if args.scenario == "fit" else run_ranks(args.out_dir, args.tasks)
    rank = torch.distributed.get_rank()
    torch.save({**result, "rank": rank}, args.out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
