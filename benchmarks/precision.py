"""Which Trainer precision lets a fine-tune at the papers' learning rate actually move the weights.

Usage::

    python benchmarks/precision.py                  # tiny Qwen2 and Llama, MoFO and AdamW, 10 steps at lr 2e-5
    python benchmarks/precision.py --quick          # one model and optimizer, 3 steps (kept working by a test)
    python benchmarks/precision.py --markdown out.md

Each run loads a tiny model built from transformers' config class and saved with ``save_pretrained`` in bf16 (as Hub
checkpoints are stored) through :class:`~lit_mofo.modules.CausalLMModule`, in the parameter dtype the precision
needs, and fine-tunes it for ``--steps`` steps at a constant lr 2e-5 (the MoFO paper's; no warmup) on the same
random token batches, with the kit's default optimizer path: ``CausalLMModule``'s MoFO (fraction 0.15) or AdamW,
neither keeping fp32 master weights. Reported per precision: the share of the parameter entries that differ from
the pre-trained value after any step ("ever moved"), the share of the norm weights that did, and the loss of the
first and the last step.

- ``bf16-true``: bf16 parameters, bf16 compute. The update is rounded into a bf16 weight: one smaller than half a
  bf16 ulp of the weight (a relative change below about 2^-9) is lost.
- ``bf16-mixed``: fp32 parameters (``dtype: float32``), bf16 compute under autocast: the update lands in fp32.
- ``32-true``: fp32 throughout (the reference).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_mofo.modules import CausalLMModule

PRECISIONS: dict[str, Literal["bfloat16", "float32"]] = {
    "bf16-true": "bfloat16",
    "bf16-mixed": "float32",
    "32-true": "float32",
}
VOCAB = 512


@dataclass(frozen=True)
class Result:
    arch: str
    optimizer: str
    precision: str
    moved: float
    norms_moved: float
    first_loss: float
    last_loss: float


def save_model(directory: Path, arch: str, seed: int = 0) -> Path:
    """A tiny model of ``arch`` (``qwen2`` or ``llama``), randomly initialised, saved in bf16."""
    sizes = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**sizes)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**sizes))
    model.to(torch.bfloat16).save_pretrained(directory)
    return directory


class _EverMoved(pl.Callback):
    """Which entries differ from their pre-trained value after any step, and the loss of every step."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = {n: p.detach().float().clone() for n, p in pl_module.named_parameters()}
        self.moved = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in pl_module.named_parameters()}
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, index) -> None:  # type: ignore[no-untyped-def]
        self.losses.append(float(outputs["loss"]))
        for name, param in pl_module.named_parameters():
            self.moved[name] |= param.detach().float() != self.start[name]

    def share(self, selected: str = "") -> float:
        names = [name for name in self.moved if selected in name]
        return sum(int(self.moved[n].sum()) for n in names) / sum(self.moved[n].numel() for n in names)


def run(model_dir: Path, arch: str, optimizer: str, precision: str, steps: int) -> Result:
    """Fine-tune the saved model for ``steps`` steps in ``precision``; what moved and the loss. ``mofo`` is
    ``CausalLMModule``'s default optimizer (MoFO, lr 2e-5, fraction 0.15); ``adamw`` is AdamW at lr 2e-5."""
    torch.manual_seed(0)
    options = {} if optimizer == "mofo" else {"optimizer": partial(torch.optim.AdamW, lr=2e-5, weight_decay=0.0)}
    module = CausalLMModule(
        str(model_dir), dtype=PRECISIONS[precision], schedule="constant", warmup_ratio=0.0, **options
    )
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, VOCAB, (4, 64), generator=generator)} for _ in range(steps)]
    tracker = _EverMoved()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        precision=precision,  # type: ignore[arg-type]
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[tracker],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
        trainer.fit(module, DataLoader(batches, batch_size=None))
    return Result(
        arch, optimizer, precision, tracker.share(), tracker.share("norm"), tracker.losses[0], tracker.losses[-1]
    )


def markdown(results: list[Result], steps: int) -> str:
    reference = {(r.arch, r.optimizer): r.moved for r in results if r.precision == "32-true"}
    lines = [
        "## Precision and the share of the weights a fine-tune moves (`benchmarks/precision.py`)",
        "",
        f"Tiny models saved in bf16, {steps} steps at a constant lr 2e-5, random token batches of 4 x 64, "
        f"CPU ({platform.machine()}, torch {torch.__version__}). *Ever moved*: entries that differ from their "
        "pre-trained value after any step.",
        "",
        "| model | optimizer | precision | parameters | ever moved | vs 32-true | norm weights moved | first loss "
        "| last loss |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = r.moved / reference[(r.arch, r.optimizer)] if (r.arch, r.optimizer) in reference else float("nan")
        lines.append(
            f"| {r.arch} | {r.optimizer} | {r.precision} | {PRECISIONS[r.precision]} | {r.moved:.1%} | {ratio:.2f}x "
            f"| {r.norms_moved:.0%} | {r.first_loss:.4f} | {r.last_loss:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny Qwen2 with MoFO, 3 steps: a smoke test")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    archs, optimizers = (["qwen2"], ["mofo"]) if args.quick else (["qwen2", "llama"], ["mofo", "adamw"])
    steps = 3 if args.quick else args.steps
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lit_mofo", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for arch in archs:
            model_dir = save_model(Path(scratch) / arch, arch)
            results += [run(model_dir, arch, o, p, steps) for o in optimizers for p in PRECISIONS]
    text = markdown(results, steps)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return results


if __name__ == "__main__":
    main()
