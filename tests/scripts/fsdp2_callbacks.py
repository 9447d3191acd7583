"""Every lit_mofo callback under FSDP2 (``ModelParallelStrategy``, 2 CPU processes, gloo); run by
``tests/test_fsdp2_callbacks.py``, which runs the same fits on one process with :func:`fit` and compares.

Usage::

    python tests/scripts/fsdp2_callbacks.py OUT_DIR --scenario {same_batch,sampler,mixed_precision} [--monitor]

Scenarios (each one launch, several fits):

- ``same_batch``: every rank is fed the same batch (``use_distributed_sampler=False``), so the reduced gradient is
  the one-process gradient. Two fits of :func:`callbacks` (MoFO through ``MoFOCallback``, ``HalfFineTuning`` with
  re-draws and resets, ``ParameterDrift``, ``L2ToPretrained``): ``mode="freeze"`` with ``optimizer_state="reset"``
  and sharded checkpoints, then ``mode="mask"`` with ``optimizer_state="keep"`` and full checkpoint files
  (``save_distributed_checkpoint=False``). Each writes a checkpoint at step 4 of 8 (mid-epoch, the data loader
  stateful) and is resumed from it by a second fit (a fresh module: θ₀ comes from the checkpoint).
- ``sampler``: the usual distributed sampler (each rank its half of the global batch), ``mode="freeze"``.
- ``mixed_precision``: the module's FSDP2 ``MixedPrecisionPolicy`` (bf16 compute, fp32 reduce) with
  ``HalfFineTuning(granularity="layer", mode="freeze")`` re-drawn every step, so whole FSDP units run their first
  forward frozen and are unfrozen later (pytorch/pytorch#186998); records the dtypes the blocks compute in and
  the gradients' dtypes, and exports the model (``export_dir``: the weights gathered from the shards).

``--monitor`` adds a ``ForgettingMonitor`` with a ``LanguageModelProbe``, a ``MultipleChoiceProbe`` (the accuracy
probe for causal LMs) and an ``AccuracyProbe`` (classes from the last token's logits) to every fit. Lightning
re-launches this very command for rank 1, so it must run as its own process, never inside pytest. Each rank writes
``OUT_DIR/<scenario>.rank{r}.pt``: per fit the logged metrics, the frozen selection at every step, the gradient
bytes it held after each backward, the snapshot's bytes, the whole final weights, and the wall time of the launch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import Dataset

from lit_mofo import HalfFineTuning, L2ToPretrained, ParameterDrift
from lit_mofo.callbacks.mofo_callback import MoFOCallback
from lit_mofo.data import ResumableDataLoader
from lit_mofo.modules import CausalLMModule
from lit_mofo.snapshot import PretrainedSnapshot
from lit_mofo.strategy import StrategyAdapter

VOCAB = 129  # odd: the embedding and the head split unevenly over 2 ranks (65 + 64 rows)
SEQ = 16
BATCH = 4  # per rank; the one-process run of the `sampler` scenario takes 2 * BATCH
STEPS = 8
CHECKPOINT_EVERY = 4  # the resumed fits start from the checkpoint of step 4, mid-epoch
REDRAW = 2
VALIDATE_EVERY = 3  # validations after steps 3 and 6; the re-draw (with resets) of step 6 follows one
SEED = 0


def model_config(layers: int = 3) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": SEQ,
        "tie_word_embeddings": False,
    }


class Tokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, sequences: int) -> None:
        generator = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, VOCAB, (sequences, SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": torch.ones(SEQ, dtype=torch.long)}


class RecordingLogger(Logger):
    """Every metric dict Lightning or a callback logs, with its step, on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((int(step or 0), {key: float(value) for key, value in metrics.items()}))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class Gradients(pl.Callback):
    """Per step, when backward is done (listed before HalfFineTuning, so before a mask drops any): the bytes of
    gradient this rank holds, how many tensors have one, and the L2 norm of the whole (reduced) gradient."""

    def __init__(self) -> None:
        self.bytes: list[int] = []
        self.with_grad: list[int] = []
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [StrategyAdapter.local(p.grad) for p in pl_module.parameters() if p.grad is not None]
        self.bytes.append(sum(g.numel() * g.element_size() for g in grads))
        self.with_grad.append(len(grads))
        squares = torch.stack([g.double().pow(2).sum() for g in grads]).sum()
        self.norms.append(StrategyAdapter.of(trainer, user="test").sum_over_shards(squares).sqrt().item())


class Steps(pl.Callback):
    """Per step: the frozen selection it trains with (listed after HalfFineTuning) and the batch; the snapshot's
    bytes."""

    def __init__(self, hft: HalfFineTuning) -> None:
        self.hft = hft
        self.frozen: dict[int, tuple[str, ...]] = {}
        self.batches: dict[int, torch.Tensor] = {}
        self.snapshot: dict[str, int] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snapshot = PretrainedSnapshot.get(pl_module)
        assert snapshot is not None
        self.snapshot = {
            "nbytes": snapshot.nbytes,
            "full_nbytes": snapshot.full_nbytes,
            "storage_bytes": sum(snapshot[name].untyped_storage().nbytes() for name in snapshot.names),
            "tensors": len(snapshot),
        }

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.frozen[trainer.global_step] = self.hft.frozen_names
        self.batches[trainer.global_step] = batch["input_ids"].clone()


class Dtypes(pl.Callback):
    """The dtypes a block's attention computes in (its all-gathered weight) and the gradients' dtypes."""

    def __init__(self) -> None:
        self.compute: list[str] = []
        self.grads: list[list[str]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in pl_module.model.model.layers:  # type: ignore[union-attr]
            layer.self_attn.q_proj.register_forward_pre_hook(self._record)

    def _record(self, module: torch.nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self.compute.append(str(module.weight.dtype))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.grads.append(sorted({str(p.grad.dtype) for p in pl_module.parameters() if p.grad is not None}))


def build_module(**module_options: Any) -> CausalLMModule:
    """The module, seeded as a script would seed it (the same weights on every rank and in the one-process run)."""
    pl.seed_everything(SEED, verbose=False)
    return CausalLMModule(
        model_config=model_config(module_options.pop("layers", 3)),
        optimizer=lambda params: torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01),
        schedule="constant",
        warmup_ratio=0.0,
        **module_options,
    )


def callbacks(mode: str, optimizer_state: str, granularity: str = "category", monitor: bool = False) -> list[Any]:
    hft = HalfFineTuning(
        mode=mode,
        granularity=granularity,
        redraw_every_n_steps=REDRAW if granularity == "category" else 1,
        reset=True,
        optimizer_state=optimizer_state,
    )
    chosen: list[Any] = [
        Gradients(),
        MoFOCallback(fraction=0.3),
        hft,
        L2ToPretrained(strength=0.05),
        ParameterDrift(every_n_train_steps=1, report=False),
        Steps(hft),
    ]
    if monitor:
        chosen.append(forgetting_monitor())
    return chosen


def last_token_classes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """An AccuracyProbe's class logits from a causal LM: the first 3 next-token logits after the input."""
    return model(input_ids=batch["input_ids"]).logits[:, -1, :3]


def forgetting_monitor() -> pl.Callback:
    from lit_mofo import ForgettingMonitor
    from lit_mofo.probes import AccuracyProbe, LanguageModelProbe, MultipleChoiceProbe

    generator = torch.Generator().manual_seed(3)
    reference = torch.randint(0, VOCAB, (10, SEQ), generator=generator).tolist()  # 10: uneven over 2 ranks
    questions = [
        {
            "context_ids": torch.randint(0, VOCAB, (6,), generator=generator).tolist(),
            "choice_ids": torch.randint(0, VOCAB, (3, 2), generator=generator).tolist(),
            "label": index % 3,
        }
        for index in range(7)
    ]
    classified = [  # 9 examples in batches of 2: 5 batches, uneven over 2 ranks
        {"input_ids": torch.randint(0, VOCAB, (6,), generator=generator).tolist(), "label": index % 3}
        for index in range(9)
    ]
    return ForgettingMonitor(
        {
            "lm": LanguageModelProbe(token_ids=reference, batch_size=3),
            "choice": MultipleChoiceProbe(examples=questions, batch_size=2),
            "accuracy": AccuracyProbe(examples=classified, batch_size=2, forward_fn=last_token_classes),
        },
        every_n_train_steps=2,
        report=False,
    )


def fit(
    devices: int,
    root: Path,
    *,
    mode: str = "freeze",
    optimizer_state: str = "reset",
    batch_size: int = BATCH,
    distributed_sampler: bool = False,
    shuffled: bool = False,
    sharded_checkpoints: bool = True,
    checkpoint: bool = False,
    ckpt_path: Path | None = None,
    granularity: str = "category",
    monitor: bool = False,
    **module_options: Any,
) -> dict[str, Any]:
    """One fit of the tiny Llama with the callbacks; returns what the tests compare (the same on 1 and 2 processes).

    ``distributed_sampler``: each rank its part of the data (Lightning's sampler); ``shuffled``: one process
    iterates the rows in the order that sampler deals them out, for the global batch of a sharded fit.
    """
    module = build_module(**module_options)
    chosen = callbacks(mode, optimizer_state, granularity, monitor)
    logger = RecordingLogger()
    if checkpoint:
        chosen.append(
            ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1)
        )
    dtypes = Dtypes() if module_options.get("fsdp_param_dtype") else None
    if dtypes is not None:
        chosen.append(dtypes)
    strategy: Any = "auto"
    if devices > 1:
        strategy = ModelParallelStrategy(
            data_parallel_size=devices, tensor_parallel_size=1, save_distributed_checkpoint=sharded_checkpoints
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        default_root_dir=root,
        logger=logger,
        log_every_n_steps=1,
        callbacks=chosen,
        use_distributed_sampler=distributed_sampler,
        enable_checkpointing=checkpoint,
        enable_progress_bar=False,
        enable_model_summary=False,
        # Validation forwards leave FSDP2's root unit all-gathered (no backward reshards it): the callbacks that
        # run after them (a re-draw with resets, drift, checkpoints) must still see the sharded parameters.
        val_check_interval=VALIDATE_EVERY,
        limit_val_batches=1,
        num_sanity_val_steps=1,
    )
    # One epoch; a stateful loader, so a fit resumed mid-epoch continues with the next batch (as the uninterrupted fit).
    tokens = Tokens(STEPS * batch_size * (devices if distributed_sampler else 1))
    # Lightning's distributed sampler for training data always shuffles, seeded with seed_everything's seed and the
    # epoch; the global batch of the sharded fit is then the next 2 * BATCH rows in that order.
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(SEED)).tolist() if shuffled else None
    data = ResumableDataLoader(tokens, batch_size, sampler=order)
    validation = ResumableDataLoader(Tokens(batch_size), batch_size)
    trainer.fit(module, data, validation, ckpt_path=ckpt_path)
    hft, steps, gradients = chosen[2], chosen[5], chosen[0]
    parameters = StrategyAdapter.named_parameters(module)  # the shards, also after the last validation
    weights = {name: StrategyAdapter.full(p.detach()).clone() for name, p in parameters.items()}
    return {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "types": sorted({type(p).__name__ for p in parameters.values()}),
        "metrics": logger.records,
        "frozen": steps.frozen,
        "batches": steps.batches,
        "history": hft.history,
        "snapshot": steps.snapshot,
        "gradient_bytes": gradients.bytes,
        "with_grad": gradients.with_grad,
        "gradient_norms": gradients.norms,
        "weights": weights,
        "checkpoints": sorted(str(path) for path in (root / "checkpoints").glob("*")) if checkpoint else [],
        "compute_dtypes": dtypes.compute if dtypes is not None else [],
        "grad_dtypes": dtypes.grads if dtypes is not None else [],
        "revalidated": revalidate(trainer, module, validation) if devices > 1 else None,
    }


def revalidate(trainer: pl.Trainer, module: CausalLMModule, validation: Any) -> dict[str, Any]:
    """``trainer.validate`` after fit: Lightning calls ``configure_model`` again, which must leave the sharded model
    as it is (the same parameter objects, still sharded)."""
    before = {name: id(p) for name, p in StrategyAdapter.named_parameters(module).items()}
    trainer.validate(module, validation, verbose=False)
    after = StrategyAdapter.named_parameters(module)
    return {
        "same_parameters": before == {name: id(p) for name, p in after.items()},
        "types": sorted({type(p).__name__ for p in after.values()}),
    }


def same_batch(out_dir: Path, monitor: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode, optimizer_state, sharded in (("freeze", "reset", True), ("mask", "keep", False)):
        options = {"mode": mode, "optimizer_state": optimizer_state, "sharded_checkpoints": sharded, "monitor": monitor}
        first = fit(2, out_dir / mode, checkpoint=True, **options)
        middle = Path(first["checkpoints"][0])  # step 4 of 8
        resumed = fit(2, out_dir / f"{mode}_resumed", ckpt_path=middle, **options)
        results[mode] = first
        results[f"{mode}_resumed"] = resumed
        results[f"{mode}_checkpoint_is_directory"] = middle.is_dir()
    return results


def sampler(out_dir: Path, monitor: bool) -> dict[str, Any]:
    return {"freeze": fit(2, out_dir / "sampler", distributed_sampler=True, monitor=monitor)}


def mixed_precision(out_dir: Path, monitor: bool) -> dict[str, Any]:
    export = out_dir / "export"
    options = {"fsdp_param_dtype": "bfloat16", "fsdp_reduce_dtype": "float32", "layers": 2, "export_dir": str(export)}
    result = fit(2, out_dir / "mixed", granularity="layer", monitor=monitor, **options)
    return {
        "layer": result,
        "exported": exported_weights_match(export, result["weights"]),
        "torch_bug_present": torch_reduce_dtype_bug_present(),
    }


def exported_weights_match(export: Path, weights: dict[str, torch.Tensor]) -> bool:
    """Whether the model ``export_dir`` received (gathered from the shards, written by rank zero) has the final
    weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    exported = {f"model.{name}": value for name, value in model.state_dict().items()}
    return exported.keys() >= weights.keys() and all(torch.equal(exported[n], w) for n, w in weights.items())


def torch_reduce_dtype_bug_present() -> bool:
    """Whether this torch still has pytorch/pytorch#186998 without the callback's refresh: an FSDP2 unit whose first
    forward ran frozen, unfrozen afterwards, fails to assign its bf16-reduced gradient to its fp32 parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model[0], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model[0].requires_grad_(False)
    model(torch.randn(2, 8)).float().sum().backward()
    model[0].requires_grad_(True)
    try:
        model(torch.randn(2, 8)).float().sum().backward()
    except RuntimeError:
        return True
    return model[0].weight.grad.dtype != torch.float32


SCENARIOS = {"same_batch": same_batch, "sampler": sampler, "mixed_precision": mixed_precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--monitor", action="store_true", help="add a ForgettingMonitor with two probes")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)
    results = SCENARIOS[args.scenario](args.out_dir, args.monitor)
    rank = torch.distributed.get_rank()
    results["wall_s"] = time.perf_counter() - start
    torch.save(results, args.out_dir / f"{args.scenario}.rank{rank}.pt")


if __name__ == "__main__":
    main()
