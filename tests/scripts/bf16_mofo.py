"""How much of a tiny causal LM MoFO moves in ``bf16-true``, with and without float32 master weights, against fp32.

Usage::

    python tests/scripts/bf16_mofo.py [--steps 10] [--lr 2e-5] [--models llama qwen2]

A tiny Llama and a tiny Qwen2 (built from their transformers configs: hidden 64, 2 layers, vocabulary 256, weights
drawn with the configs' ``initializer_range`` 0.02) train on the same seeded token sequences for ``--steps`` steps of
MoFO (fraction 0.15, the paper's lr 2e-5), in three settings:

- ``fp32``: parameters and compute in float32 (``precision="32-true"``);
- ``bf16``: parameters and compute in bfloat16 (``precision="bf16-true"``), ``MoFO(master_weights=False)``: every
  update is written into the bfloat16 weight, so one smaller than half a bfloat16 spacing is rounded away;
- ``bf16+master``: the same with MoFO's default float32 master weights.

For each it prints the share of parameter entries whose value ever changed (over all tensors, over the matrices,
over the norm weights; for ``bf16+master`` also of the master copies), and the loss of the first and the last step.
``tests/test_mofo_master_weights.py`` runs it with fewer steps and checks the shares.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lit_mofo import MoFO

TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "initializer_range": 0.02,
}
MODELS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
SETTINGS = ("fp32", "bf16", "bf16+master")


@dataclass
class Result:
    model: str
    setting: str
    moved: float  # share of all entries that ever changed
    moved_matrices: float
    moved_norms: float
    master_moved: float | None  # share of the master copies' entries that ever changed
    first_loss: float
    last_loss: float


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    config_class, model_class = MODELS[name]
    torch.manual_seed(seed)
    return model_class(config_class(**TINY))


def batches(steps: int, batch_size: int = 8, seq_len: int = 32, seed: int = 0) -> list[Tensor]:
    """Arithmetic progressions modulo the vocabulary: a task the model can learn from context."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(TINY["vocab_size"], (steps, batch_size, 1), generator=gen)
    stride = torch.randint(1, 5, (steps, batch_size, 1), generator=gen)
    return list((start + stride * torch.arange(seq_len)) % TINY["vocab_size"])


def run(name: str, setting: str, steps: int, lr: float = 2e-5) -> Result:
    model = tiny_model(name)
    if setting != "fp32":
        model = model.to(torch.bfloat16)  # what precision="bf16-true" does to the module
    params = dict(model.named_parameters())
    initial = {key: p.detach().clone() for key, p in params.items()}
    ever = {key: torch.zeros_like(p, dtype=torch.bool) for key, p in params.items()}
    optimizer = MoFO(model.parameters(), lr=lr, fraction=0.15, master_weights=setting == "bf16+master")
    masters_initial: dict[str, Tensor] = {}
    masters_ever: dict[str, Tensor] = {}
    losses = []
    for input_ids in batches(steps):
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        with torch.no_grad():
            for key, p in params.items():
                ever[key] |= p != initial[key]
                master = optimizer.state[p].get("master_weight")
                if master is not None:
                    start = masters_initial.setdefault(key, initial[key].float())
                    masters_ever.setdefault(key, torch.zeros_like(master, dtype=torch.bool))
                    masters_ever[key] |= master != start

    def share(keys: list[str], flags: dict[str, Tensor]) -> float:
        total = sum(flags[key].numel() for key in keys)
        return sum(int(flags[key].sum()) for key in keys) / total if total else 0.0

    keys = list(params)
    matrices = [key for key in keys if params[key].dim() >= 2]
    norms = [key for key in keys if "norm" in key]
    return Result(
        name,
        setting,
        share(keys, ever),
        share(matrices, ever),
        share(norms, ever),
        share(keys, masters_ever) if masters_ever else None,
        losses[0],
        losses[-1],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    print(f"{args.steps} MoFO steps (fraction 0.15, lr {args.lr:g}) on tiny models; share of entries ever moved")
    print()
    print("| model | setting | all entries | matrices | norm weights | master copies | loss, first step | last step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        for setting in SETTINGS:
            r = run(name, setting, args.steps, args.lr)
            master = f"{r.master_moved:.1%}" if r.master_moved is not None else "-"
            print(
                f"| {r.model} | {r.setting} | {r.moved:.1%} | {r.moved_matrices:.1%} | {r.moved_norms:.1%} | {master} "
                f"| {r.first_loss:.4f} | {r.last_loss:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
