"""Training-step time and optimizer-state memory of full fine-tuning against Half Fine-Tuning, in one process.

Usage::

    python benchmarks/hft_step.py                                  # small Llama on the CPU, AdamW
    python benchmarks/hft_step.py --optimizer mofo --rounds 3
    python benchmarks/hft_step.py --device cuda                    # same script on a GPU
    python benchmarks/hft_step.py --quick                          # a tiny model, seconds (kept working by a test)
    python benchmarks/hft_step.py --markdown benchmarks/results/hft_step.md

Each method is a real ``Trainer.fit`` of the same model (same initial weights, same batches) with the
``HalfFineTuning`` callback as a user adds it; a step is timed from ``on_train_batch_start`` to
``on_train_batch_end``, i.e. forward, backward, the callback's gradient drop and the optimizer step. Rounds
interleave the methods (the order rotates every round) so that load from other processes hits all of them alike;
each method's time is the median over all timed steps after the warm-up steps of every fit. Ratios are to full
fine-tuning of the same run. Methods:

- ``full``: no callback, every tensor trains;
- ``hft_freeze``: ``HalfFineTuning(mode="freeze")`` - frozen tensors have ``requires_grad=False``;
- ``hft_mask``: ``HalfFineTuning(mode="mask")`` - every gradient is computed, the frozen ones are dropped.

Memory: the bytes of the optimizer state (``optimizer.state``) at the end of a fit of ``--memory-steps`` steps
(odd, so the last step trains under the latest draw), for full fine-tuning and for HFT with one draw and with a
re-draw every 2 steps, each with ``optimizer_state`` ``keep`` and ``reset``; and the pre-trained snapshot that
``reset=True`` keeps on the CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_mofo.callbacks.half_finetuning import HalfFineTuning
from lit_mofo.optim.mofo import MoFO
from lit_mofo.snapshot import PretrainedSnapshot

METHODS = ("full", "hft_freeze", "hft_mask")


@dataclass(frozen=True)
class Setup:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int


FULL = Setup(hidden=384, intermediate=1024, layers=6, heads=6, vocab=1024, seq=128, batch=4)
QUICK = Setup(hidden=64, intermediate=128, layers=2, heads=4, vocab=128, seq=16, batch=2)


class Llama(pl.LightningModule):
    def __init__(self, setup: Setup, optimizer: str, seed: int = 0) -> None:
        super().__init__()
        config = LlamaConfig(
            vocab_size=setup.vocab,
            hidden_size=setup.hidden,
            intermediate_size=setup.intermediate,
            num_hidden_layers=setup.layers,
            num_attention_heads=setup.heads,
            num_key_value_heads=setup.heads,
            max_position_embeddings=setup.seq,
            tie_word_embeddings=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = LlamaForCausalLM(config)
        self.optimizer_name = optimizer

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "mofo":
            return MoFO(self.parameters(), lr=1e-5, fraction=0.15)
        return torch.optim.AdamW(self.parameters(), lr=1e-5, weight_decay=0.0)


class StepTimer(pl.Callback):
    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self._start)


def batches(setup: Setup, count: int) -> DataLoader[tuple[Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(setup.vocab, (count * setup.batch, setup.seq), generator=generator)
    return DataLoader(TensorDataset(tokens), batch_size=setup.batch)


def make_trainer(steps: int, callbacks: list[pl.Callback], device: str) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def hft_for(method: str, **kwargs: Any) -> list[pl.Callback]:
    if method == "full":
        return []
    return [HalfFineTuning(mode="freeze" if method == "hft_freeze" else "mask", seed=0, **kwargs)]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )


def time_methods(setup: Setup, optimizer: str, rounds: int, steps: int, warmup: int, device: str) -> dict[str, Any]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    fractions: dict[str, float] = {"full": 1.0}
    for method in METHODS:  # an untimed fit of each first: one-time costs (allocator, kernels, imports)
        make_trainer(warmup, hft_for(method), device).fit(Llama(setup, optimizer), batches(setup, warmup))
    for round_index in range(rounds):
        order = METHODS[round_index % len(METHODS) :] + METHODS[: round_index % len(METHODS)]
        for method in order:
            module = Llama(setup, optimizer)
            timer = StepTimer(sync)
            callbacks = hft_for(method)
            make_trainer(warmup + steps, [*callbacks, timer], device).fit(module, batches(setup, warmup + steps))
            times[method].extend(timer.times[warmup:])
            if callbacks:
                fractions[method] = callbacks[0].trainable_fraction  # type: ignore[attr-defined]
    medians = {method: statistics.median(values) for method, values in times.items()}
    return {"median_s": medians, "samples": {m: len(v) for m, v in times.items()}, "fraction": fractions}


def measure_memory(setup: Setup, optimizer: str, steps: int, device: str) -> dict[str, int]:
    results: dict[str, int] = {}
    configs: dict[str, tuple[str, dict[str, Any]]] = {
        "full": ("full", {}),
        "hft once, keep": ("hft_freeze", {"optimizer_state": "keep"}),
        "hft once, reset": ("hft_freeze", {"optimizer_state": "reset"}),
        "hft redraw/2, keep": ("hft_freeze", {"optimizer_state": "keep", "redraw_every_n_steps": 2}),
        "hft redraw/2, reset": ("hft_freeze", {"optimizer_state": "reset", "redraw_every_n_steps": 2}),
        "hft mask redraw/2, reset": ("hft_mask", {"optimizer_state": "reset", "redraw_every_n_steps": 2}),
    }
    for label, (method, kwargs) in configs.items():
        module = Llama(setup, optimizer)
        trainer = make_trainer(steps, hft_for(method, **kwargs), device)
        trainer.fit(module, batches(setup, steps))
        results[label] = state_bytes(trainer.optimizers[0])
    # the pre-trained copy that reset=True keeps: capture it as the callback does and read its size
    module = Llama(setup, optimizer)
    hft = HalfFineTuning(seed=0, redraw_every_n_steps=2, reset=True)
    snapshot_sizes: list[int] = []

    class SnapshotSize(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            snapshot = PretrainedSnapshot.get(pl_module)
            snapshot_sizes.append(snapshot.nbytes if snapshot is not None else 0)

    make_trainer(1, [hft, SnapshotSize()], device).fit(module, batches(setup, 1))
    results["parameters"] = sum(p.numel() * p.element_size() for p in module.parameters())
    results["snapshot (reset=True)"] = snapshot_sizes[0]
    return results


def markdown(setup: Setup, args: argparse.Namespace, timing: dict[str, Any], memory: dict[str, int]) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    lines = [
        "## Half Fine-Tuning: training-step time and optimizer state (`benchmarks/hft_step.py`)",
        "",
        f"Llama architecture, hidden {setup.hidden}, {setup.layers} layers, FFN {setup.intermediate}, "
        f"{setup.heads} heads, vocabulary {setup.vocab} (untied head), batch {setup.batch} x {setup.seq} tokens, "
        f"fp32, optimizer {args.optimizer}; device {args.device} ({device}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads). {args.rounds} interleaved rounds x "
        f"{args.steps} timed steps (+{args.warmup} warm-up) per method; the median step (forward + backward + "
        "optimizer step, inside `Trainer.fit`).",
        "",
        "| method | median step (ms) | vs full FT | trainable fraction |",
        "|---|---:|---:|---:|",
    ]
    full = timing["median_s"]["full"]
    for method in METHODS:
        seconds = timing["median_s"][method]
        lines.append(f"| {method} | {seconds * 1e3:.1f} | {seconds / full:.2f}x | {timing['fraction'][method]:.1%} |")
    lines += [
        "",
        f"Optimizer state at the end of a {args.memory_steps}-step fit (`optimizer_state` keep/reset; redraw/2 = "
        "a new draw every 2 steps, the last step trained under the latest draw):",
        "",
        "| configuration | optimizer state (MiB) | vs full FT |",
        "|---|---:|---:|",
    ]
    full_state = memory["full"]
    for label, value in memory.items():
        if label in ("parameters", "snapshot (reset=True)"):
            continue
        lines.append(f"| {label} | {value / 2**20:.2f} | {value / full_state:.2f}x |")
    lines += [
        "",
        f"Parameters: {memory['parameters'] / 2**20:.2f} MiB; the pre-trained snapshot that `reset=True` keeps on "
        f"the CPU: {memory['snapshot (reset=True)'] / 2**20:.2f} MiB "
        f"({memory['snapshot (reset=True)'] / memory['parameters']:.2f}x the parameters: the block tensors a "
        "re-draw may freeze, in their own dtype).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds of 2 steps: a smoke test")
    parser.add_argument("--optimizer", choices=["adamw", "mofo"], default="adamw")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every fit")
    parser.add_argument(
        "--memory-steps", type=int, default=7, help="odd, so that the last step trains under the latest re-draw"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = FULL
    if args.quick:
        setup, args.rounds, args.steps, args.warmup, args.memory_steps = QUICK, 2, 2, 1, 3

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lit_mofo"):
        logging.getLogger(name).setLevel(logging.WARNING)
    timing = time_methods(setup, args.optimizer, args.rounds, args.steps, args.warmup, args.device)
    memory = measure_memory(setup, args.optimizer, args.memory_steps, args.device)
    text = markdown(setup, args, timing, memory)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return text


if __name__ == "__main__":
    main()
