"""Training-step time and optimizer-state memory of full fine-tuning against Half Fine-Tuning, in one process.

Usage::

    python benchmarks/hft_step.py                                  # small Llama on the CPU, AdamW
    python benchmarks/hft_step.py --optimizer mofo --rounds 3
    python benchmarks/hft_step.py --device cuda                    # same script on a GPU
    python benchmarks/hft_step.py --quick                          # a tiny model, seconds (kept working by a test)
    python benchmarks/hft_step.py --markdown benchmarks/results/hft_step.md

A step is forward, backward, HFT's gradient drop and the optimizer step, on the same model (same initial weights,
same batch) for every method. The three models are held side by side and every round times one step of each, the
order rotating, so that load from other processes hits all methods alike even on a shared machine. Each HFT model
carries the selection that the ``HalfFineTuning`` callback draws (a one-step ``Trainer.fit`` of a twin with the
same seed and structure), applied as the callback applies it. Reported: each method's median step, and its median
ratio to full fine-tuning over the rounds (paired within a round, so slow drifts in the load cancel). Methods:

- ``full``: no callback, every tensor trains;
- ``hft_freeze``: ``HalfFineTuning(mode="freeze")`` - frozen tensors have ``requires_grad=False``;
- ``hft_mask``: ``HalfFineTuning(mode="mask")`` - every gradient is computed, the frozen ones are dropped.

What the callback itself adds inside ``Trainer.fit`` - its per-step hooks (``on_before_optimizer_step`` drops
gradients, ``on_train_batch_start`` checks the re-draw schedule) - is timed separately in real fits.

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


FULL = Setup(hidden=512, intermediate=1408, layers=8, heads=8, vocab=1024, seq=128, batch=4)
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


def time_steps(setup: Setup, optimizer: str, rounds: int, warmup: int, device: str) -> dict[str, Any]:
    """Step-level interleaving: one step of each method per round, on three models held side by side.

    Each HFT model uses the selection that ``HalfFineTuning`` draws (a one-step fit of a twin with the same seed
    and structure) and applies it as the callback does: ``requires_grad=False`` for ``freeze``, ``grad = None``
    before the optimizer step for ``mask``.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    batch = batches(setup, 1).dataset.tensors[0].to(device)  # type: ignore[attr-defined]
    runners: dict[str, tuple[Llama, torch.optim.Optimizer, list[Tensor]]] = {}
    fractions: dict[str, float] = {"full": 1.0}
    for method in METHODS:
        module = Llama(setup, optimizer).to(device)
        drop: list[Tensor] = []
        if method != "full":
            hft = hft_for(method)[0]
            assert isinstance(hft, HalfFineTuning)
            make_trainer(1, [hft], device).fit(Llama(setup, optimizer), batches(setup, 1))
            fractions[method] = hft.trainable_fraction
            params = dict(module.named_parameters())
            frozen = [params[name] for name in hft.frozen_names]
            if method == "hft_freeze":
                for param in frozen:
                    param.requires_grad_(False)
            else:
                drop = frozen
        runners[method] = (module, module.configure_optimizers(), drop)

    def step(method: str) -> None:
        module, opt, drop = runners[method]
        module.training_step((batch,), 0).backward()
        for param in drop:
            param.grad = None
        opt.step()
        opt.zero_grad()

    for method in METHODS:
        for _ in range(warmup):
            step(method)
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_index in range(rounds):
        order = METHODS[round_index % len(METHODS) :] + METHODS[: round_index % len(METHODS)]
        for method in order:
            sync()
            start = time.perf_counter()
            step(method)
            sync()
            times[method].append(time.perf_counter() - start)
    paired = {m: [t / f for t, f in zip(v, times["full"], strict=True)] for m, v in times.items()}
    return {
        "median_s": {m: statistics.median(v) for m, v in times.items()},
        "ratio": {m: statistics.median(v) for m, v in paired.items()},
        "ratio_range": {m: (min(v), max(v)) for m, v in paired.items()},
        "rounds": rounds,
        "fraction": fractions,
    }


class _TimedHalfFineTuning(HalfFineTuning):
    """The callback, with the time spent in its per-step hooks recorded."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_seconds: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, *args)
        self.hook_seconds.append(time.perf_counter() - start)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.hook_seconds[-1] += time.perf_counter() - start


def hook_overhead(setup: Setup, optimizer: str, steps: int, device: str) -> dict[str, float]:
    """Median seconds per step spent in the callback's per-step hooks during a real fit (no re-draw)."""
    overhead: dict[str, float] = {}
    for method in METHODS[1:]:
        hft = _TimedHalfFineTuning(mode="freeze" if method == "hft_freeze" else "mask", seed=0)
        make_trainer(steps, [hft], device).fit(Llama(setup, optimizer), batches(setup, steps))
        overhead[method] = statistics.median(hft.hook_seconds)
    return overhead


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


def markdown(
    setup: Setup, args: argparse.Namespace, timing: dict[str, Any], overhead: dict[str, float], memory: dict[str, int]
) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    lines = [
        "## Half Fine-Tuning: training-step time and optimizer state (`benchmarks/hft_step.py`)",
        "",
        f"Llama architecture, hidden {setup.hidden}, {setup.layers} layers, FFN {setup.intermediate}, "
        f"{setup.heads} heads, vocabulary {setup.vocab} (untied head), batch {setup.batch} x {setup.seq} tokens, "
        f"fp32, optimizer {args.optimizer}; device {args.device} ({device}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads). A step is forward + backward + "
        "(HFT's gradient drop) + optimizer step; the three models side by side, one step of each per round (order "
        f"rotating), {args.rounds} rounds after {args.warmup} warm-up steps. *vs full FT* is the median over the "
        "rounds of the step's ratio to the full fine-tuning step of the same round, *range* the smallest and the "
        "largest of those ratios.",
        "",
        "| method | median step (ms) | vs full FT | range over rounds | callback hooks per step (us) "
        "| trainable fraction |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    unsteady = []
    for method in METHODS:
        hooks = f"{overhead[method] * 1e6:.0f}" if method in overhead else "-"
        low, high = timing["ratio_range"][method]
        lines.append(
            f"| {method} | {timing['median_s'][method] * 1e3:.1f} | {timing['ratio'][method]:.2f}x | "
            f"{low:.2f}-{high:.2f}x | {hooks} | {timing['fraction'][method]:.1%} |"
        )
        of_medians = timing["median_s"][method] / timing["median_s"]["full"]
        if abs(of_medians / timing["ratio"][method] - 1) > 0.1:
            unsteady.append(f"{method} {of_medians:.2f}x")
    if unsteady or args.quick:
        lines += [
            "",
            (
                f"The ratios of the median steps ({', '.join(unsteady)}) differ from the paired ratios by more "
                "than 10%: the load changed during the run. "
                if unsteady
                else ""
            )
            + (
                f"`--quick` times {args.rounds} rounds of a tiny model: a smoke test of the script, not a measurement. "
                if args.quick
                else ""
            )
            + "Compare paired ratios from full runs (more `--rounds`, `--threads 1` on a busy machine).",
        ]
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
    parser.add_argument("--rounds", type=int, default=40, help="rounds of one timed step per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method before the rounds")
    parser.add_argument("--hook-steps", type=int, default=4, help="steps of the fits that time the callback's hooks")
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
        setup, args.rounds, args.warmup, args.hook_steps, args.memory_steps = QUICK, 3, 1, 2, 3

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lit_mofo"):
        logging.getLogger(name).setLevel(logging.WARNING)
    timing = time_steps(setup, args.optimizer, args.rounds, args.warmup, args.device)
    overhead = hook_overhead(setup, args.optimizer, args.hook_steps, args.device)
    memory = measure_memory(setup, args.optimizer, args.memory_steps, args.device)
    text = markdown(setup, args, timing, overhead, memory)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return text


if __name__ == "__main__":
    main()
