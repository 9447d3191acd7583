"""Every lit_mofo callback under FSDP2: Lightning's ``ModelParallelStrategy`` on 2 gloo processes against one process.

The sharded fits run in ``tests/scripts/fsdp2_callbacks.py`` (one launch per scenario, shared by the tests through
module-scoped fixtures); the one-process references run here with the same :func:`fsdp2_callbacks.fit`. A tiny
Llama (3 blocks of hidden size 64, vocabulary 129 so the embedding and the head split unevenly) is fine-tuned with
MoFO (through ``MoFOCallback``), ``HalfFineTuning`` re-drawn every 2 steps with resets, ``L2ToPretrained`` and
``ParameterDrift``, validating every 3 steps.

Tolerances: where the arithmetic is the same the results must be bit-identical: the weights (every rank computes
the full batch's gradient, the reduce-scatter averages two equal halves exactly, MoFO agrees its threshold over the
mesh, HFT, L2 and resets act entry by entry), the draws, the changed-entry counts and the maxima. Sums differ only
in their order (each shard's sum of squares in float32, then the shards' sums in float64), so the L2 drift figures
and the penalty must agree to 1e-6 relative (float32 rounding is 6e-8; measured: <= 1e-7). The
probes' figures must agree to 1e-6 relative before the first step and to 1e-5 after (their data is split over the
ranks, so sums add up in another order).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from process_launch import run_command, run_script

from lit_mofo import HalfFineTuning, L2ToPretrained, ParameterDrift
from lit_mofo.callbacks.mofo_callback import MoFOCallback
from lit_mofo.modules import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fsdp2_callbacks.py"
sys.path.insert(0, str(SCRIPT.parent))

import fsdp2_callbacks  # noqa: E402

# Every fit also carries a ForgettingMonitor with a LanguageModelProbe, a MultipleChoiceProbe and an AccuracyProbe,
# whose figures are compared too.
SUM_TOLERANCE = 1e-6  # relative, for figures that are sums over tensors (see the module docstring)
PROBE_TOLERANCE = 1e-5  # relative, for the probes' figures after training began (the issue's bound)
EXACT_FIGURES = ("drift/fraction_changed", "drift/max_abs_change")
SUMMED_FIGURES = ("drift/relative_l2", "l2_to_pretrained/penalty")
PROBE_FIGURES = ("probe/", "forgetting/", "retention/")


def launch(scenario: str, out_dir: Path, timeout: float = 900) -> list[dict[str, Any]]:
    """Run one scenario on 2 processes (a hang kills both ranks); both ranks' results."""
    result = run_script(SCRIPT, str(out_dir), "--scenario", scenario, "--monitor", timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    results = [torch.load(out_dir / f"{scenario}.rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    print(f"\n{scenario}: {results[0]['wall_s']:.0f} s for the 2-process launch")
    return results


def one_process(tmp_path_factory: pytest.TempPathFactory, **options: Any) -> dict[str, Any]:
    """The same fit on one process, with one thread like each rank of the script (the same matmul reductions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fsdp2_callbacks.fit(1, tmp_path_factory.mktemp("one_process"), monitor=True, **options)
    finally:
        torch.set_num_threads(threads)  # the tests that follow in this process keep theirs


@pytest.fixture(scope="module")
def same_batch(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("same_batch", tmp_path_factory.mktemp("same_batch"))


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return {
        "freeze": one_process(tmp_path_factory, mode="freeze", optimizer_state="reset"),
        "mask": one_process(tmp_path_factory, mode="mask", optimizer_state="keep"),
    }


def figures(result: dict[str, Any], prefixes: tuple[str, ...]) -> dict[tuple[int, str], float]:
    """``(step, name) -> value`` of the logged metrics whose names start with one of ``prefixes``."""
    return {
        (step, name): value
        for step, metrics in result["metrics"]
        for name, value in metrics.items()
        if name.startswith(prefixes)
    }


def relative(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


# ---------------------------------------------------------------------------------------------------- same batch
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["freeze", "mask"])
def test_sharded_fit_ends_with_the_one_process_weights_bit_for_bit(
    same_batch: list[dict[str, Any]], references: dict[str, dict[str, Any]], mode: str
) -> None:
    reference = references[mode]["weights"]
    for rank in same_batch:
        result = rank[mode]
        assert result["types"] == ["DTensor"] and result["world_size"] == 2
        assert result["weights"].keys() == reference.keys()
        for name, weight in result["weights"].items():
            assert torch.equal(weight, reference[name]), f"{mode}, rank {rank[mode]['rank']}: {name} differs"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["freeze", "mask"])
def test_every_rank_draws_the_frozen_sets_of_one_process(
    same_batch: list[dict[str, Any]], references: dict[str, dict[str, Any]], mode: str
) -> None:
    reference = references[mode]
    assert len(reference["frozen"]) == fsdp2_callbacks.STEPS
    assert len(set(reference["frozen"].values())) > 1, "the schedule should have re-drawn"
    for rank in same_batch:
        assert rank[mode]["frozen"] == reference["frozen"]
        assert rank[mode]["history"] == reference["history"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["freeze", "mask"])
def test_sharded_fit_logs_the_one_process_drift_and_penalty(
    same_batch: list[dict[str, Any]], references: dict[str, dict[str, Any]], mode: str
) -> None:
    prefixes = ("drift/", "l2_to_pretrained/", *PROBE_FIGURES)
    reference = figures(references[mode], prefixes)
    sharded = figures(same_batch[0][mode], prefixes)
    assert sharded.keys() == reference.keys()
    assert {name for _, name in reference} >= {*EXACT_FIGURES, *SUMMED_FIGURES}
    assert {name.split("/")[0] + "/" for _, name in reference} >= set(PROBE_FIGURES)
    worst = 0.0
    for key, value in reference.items():
        if key[1].startswith(EXACT_FIGURES):
            assert sharded[key] == value, key
            continue
        tolerance = SUM_TOLERANCE
        if key[1].startswith(PROBE_FIGURES) and key[0] > 0:
            tolerance = PROBE_TOLERANCE  # the probe data split over the ranks adds up in another order
        assert relative(sharded[key], value) <= tolerance, (key, sharded[key], value)
        worst = max(worst, relative(sharded[key], value))
    print(f"\n{mode}: largest relative difference of a summed figure, 2 processes vs 1: {worst:.1e}")
    # Rank 1 logs the same penalty: it is reduced over the shards, not rank 1's half of it.
    penalty = {k: v for k, v in figures(same_batch[1][mode], ("l2_to_pretrained/",)).items()}
    assert penalty == {k: v for k, v in sharded.items() if k[1].startswith("l2_to_pretrained/")}


@pytest.mark.slow
def test_snapshot_holds_each_ranks_shards_only(
    same_batch: list[dict[str, Any]], references: dict[str, dict[str, Any]]
) -> None:
    whole = references["freeze"]["snapshot"]
    assert whole["nbytes"] == whole["full_nbytes"] == whole["storage_bytes"]
    per_rank = [rank["freeze"]["snapshot"] for rank in same_batch]
    for snapshot in per_rank:
        assert snapshot["tensors"] == whole["tensors"] and snapshot["full_nbytes"] == whole["nbytes"]
        assert snapshot["storage_bytes"] == snapshot["nbytes"]  # no copy keeps a larger storage alive
        # Half, up to the uneven split of the 129-row embedding and head (65 + 64 rows of 64 floats each).
        assert abs(snapshot["nbytes"] - whole["nbytes"] / 2) <= 2 * 64 * 4
    assert sum(snapshot["nbytes"] for snapshot in per_rank) == whole["nbytes"]
    print(f"\nsnapshot: {whole['nbytes']:,} bytes on 1 process, {[s['nbytes'] for s in per_rank]} bytes per rank on 2")


@pytest.mark.slow
def test_freeze_mode_holds_gradients_for_the_trainable_tensors_only(
    same_batch: list[dict[str, Any]], references: dict[str, dict[str, Any]]
) -> None:
    for mode in ("freeze", "mask"):
        ranks = [rank[mode]["gradient_bytes"] for rank in same_batch]
        assert [a + b for a, b in zip(*ranks, strict=True)] == references[mode]["gradient_bytes"]
    freeze, mask = same_batch[0]["freeze"], same_batch[0]["mask"]
    trainable = [sum(1 for _ in references["freeze"]["weights"]) - len(frozen) for frozen in freeze["frozen"].values()]
    assert freeze["with_grad"] == trainable  # frozen shards get no gradient at all, not a zero one
    assert set(mask["with_grad"]) == {len(references["mask"]["weights"])}  # mask: every gradient, then dropped
    ratio = max(freeze["gradient_bytes"]) / max(mask["gradient_bytes"])
    assert ratio < 0.65
    print(
        f"\ngradient bytes per rank after backward: freeze {freeze['gradient_bytes']}, mask {mask['gradient_bytes']} "
        f"(freeze/mask {ratio:.2f})"
    )


# ---------------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
@pytest.mark.parametrize(("mode", "sharded_checkpoint"), [("freeze", True), ("mask", False)])
def test_resumed_sharded_fit_continues_as_the_uninterrupted_one(
    same_batch: list[dict[str, Any]], mode: str, sharded_checkpoint: bool
) -> None:
    # freeze + optimizer_state="reset" from a sharded checkpoint directory, mask + "keep" from a full checkpoint file:
    # both hold no optimizer state for the tensors frozen since the start, and θ₀ comes from the checkpoint.
    for rank in same_batch:
        assert rank[f"{mode}_checkpoint_is_directory"] is sharded_checkpoint
        uninterrupted, resumed = rank[mode], rank[f"{mode}_resumed"]
        for name, weight in uninterrupted["weights"].items():
            assert torch.equal(resumed["weights"][name], weight), name
        assert resumed["history"] == uninterrupted["history"]  # the restored draws, then the same new ones
        start = fsdp2_callbacks.CHECKPOINT_EVERY
        assert sorted(resumed["frozen"]) == list(range(start, fsdp2_callbacks.STEPS))
        assert all(resumed["frozen"][step] == uninterrupted["frozen"][step] for step in resumed["frozen"])
        assert all(torch.equal(resumed["batches"][step], uninterrupted["batches"][step]) for step in resumed["batches"])
        logged = ("drift/", "l2_to_pretrained/", "train_loss", *PROBE_FIGURES)
        after, before = figures(resumed, logged), figures(uninterrupted, logged)
        assert after and all(after[key] == before[key] for key in after), "the resumed fit logs other figures"
    # Rank zero logs drift (and the probes) after every step from the checkpoint's on, the penalty before.
    logged_steps = {step for step, name in figures(same_batch[0][f"{mode}_resumed"], ("drift/",))}
    assert logged_steps == set(range(start + 1, fsdp2_callbacks.STEPS + 1))


# ---------------------------------------------------------------------------------------------------- sampler
@pytest.fixture(scope="module")
def sampler(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("sampler", tmp_path_factory.mktemp("sampler"))


@pytest.mark.slow
def test_distributed_sampler_fit_follows_the_one_process_fit_on_the_global_batch(
    sampler: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The ranks' batches make up the one-process batch of 2 * BATCH rows (Lightning's sampler shuffles, the reference
    # follows its order): the same global batch, halved. Averaging the two halves' gradients differs from the whole
    # batch's by float rounding only, and so do the figures and weights (measured: <= 2e-7 relative); MoFO's
    # top-k could turn rounding into a flipped entry, which did not happen here.
    reference = one_process(tmp_path_factory, batch_size=2 * fsdp2_callbacks.BATCH, shuffled=True)
    sharded = sampler[0]["freeze"]
    for step, batch in reference["batches"].items():
        halves = torch.cat([rank["freeze"]["batches"][step] for rank in sampler])
        assert sorted(map(tuple, halves.tolist())) == sorted(map(tuple, batch.tolist())), step
    assert sharded["frozen"] == reference["frozen"] == sampler[1]["freeze"]["frozen"]
    first_gradient = relative(sharded["gradient_norms"][0], reference["gradient_norms"][0])
    assert first_gradient <= 1e-6
    ours, theirs = figures(sharded, SUMMED_FIGURES), figures(reference, SUMMED_FIGURES)
    assert ours.keys() == theirs.keys()
    per_step: dict[int, float] = {}
    for key in ours:
        per_step[key[0]] = max(per_step.get(key[0], 0.0), relative(ours[key], theirs[key]))
    assert max(per_step.values()) <= 1e-5
    weights = max(
        ((sharded["weights"][n] - w).abs().max() / w.abs().max()).item() for n, w in reference["weights"].items()
    )
    assert weights <= 1e-5
    steps = ", ".join(f"{step}: {value:.1e}" for step, value in sorted(per_step.items()))
    print(
        f"\ndistributed sampler vs one process on the global batch: first gradient norm {first_gradient:.1e}; drift "
        f"and penalty, largest relative difference per step: {steps}; final weights {weights:.1e} (largest "
        "|difference| / largest |weight|)"
    )


# ---------------------------------------------------------------------------------------------------- mixed precision
@pytest.fixture(scope="module")
def mixed_precision(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("mixed_precision", tmp_path_factory.mktemp("mixed_precision"))


@pytest.mark.slow
def test_a_unit_unfrozen_after_a_frozen_first_forward_reduces_in_float32(mixed_precision: list[dict[str, Any]]) -> None:
    # pytorch/pytorch#186998: with MixedPrecisionPolicy(bf16, fp32) an FSDP2 unit whose first forward ran frozen
    # keeps no gradient dtypes and, unfrozen, fails to assign its bf16 gradient to its fp32 parameter. Layer-level
    # HFT freezes a whole block (one unit) at step 0 and the other one at step 1.
    for rank in mixed_precision:
        result = rank["layer"]
        frozen = result["frozen"]
        first = {name.split(".")[3] for name in frozen[0]}
        assert len(first) == 1 and any(first.isdisjoint(name.split(".")[3] for name in f) for f in frozen.values())
        assert set(result["compute_dtypes"]) == {"torch.bfloat16"}  # the blocks compute in bf16
        assert result["grad_dtypes"] == [["torch.float32"]] * fsdp2_callbacks.STEPS  # reduced in fp32, every step
        assert all(math.isfinite(v) for _, m in result["metrics"] for k, v in m.items() if k == "train_loss")
    present = mixed_precision[0]["torch_bug_present"]
    print(f"\ntorch {torch.__version__} has pytorch/pytorch#186998 without HalfFineTuning's refresh: {present}")


@pytest.mark.slow
def test_configure_model_runs_again_for_validate_and_leaves_the_sharded_model_as_it_is(
    mixed_precision: list[dict[str, Any]],
) -> None:
    for rank in mixed_precision:
        assert rank["layer"]["revalidated"] == {"same_parameters": True, "types": ["DTensor"]}


@pytest.mark.slow
def test_the_export_of_a_sharded_module_holds_the_whole_final_weights(mixed_precision: list[dict[str, Any]]) -> None:
    assert all(rank["exported"] for rank in mixed_precision)


# ---------------------------------------------------------------------------------------------------- the CLI
CONFIG = ROOT / "configs" / "fsdp2_cpu.yaml"


def run_cli(config: Path, cwd: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("lit-mofo")  # the console script, as the README runs it
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "lit_mofo.cli"]
    return run_command([*entry, "fit", "--config", str(config), *overrides], cwd=cwd, timeout=timeout)


SHORT = ("--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--trainer.limit_val_batches", "2")


@pytest.mark.slow
def test_fsdp2_config_completes_and_writes_the_forgetting_report(tmp_path: Path) -> None:
    result = run_cli(CONFIG, tmp_path, *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = list(tmp_path.glob("lightning_logs/version_*/forgetting_report.md"))
    assert len(reports) == 1 and "knowledge" in reports[0].read_text()


# ---------------------------------------------------------------------------------------------------- refused
CALLBACKS: dict[str, Callable[[], pl.Callback]] = {
    "HalfFineTuning": HalfFineTuning,
    "L2ToPretrained": L2ToPretrained,
    "ParameterDrift": lambda: ParameterDrift(report=False),
    "MoFOCallback": MoFOCallback,
}
REFUSED = {
    # Constructing FSDPStrategy works without a GPU; Lightning refuses strategy="fsdp" on CPU only when the Trainer is
    # built, so the guard is tested with the strategy object. DeepSpeed needs no install this way.
    "fsdp1": (lambda: FSDPStrategy(), r"FSDP1 flattens the parameters.*strategy=\"ddp\".*ModelParallelStrategy\("),
    "deepspeed": (
        lambda: object.__new__(DeepSpeedStrategy),
        r"DeepSpeed partitions its own flat fp32 buffers.*strategy=\"ddp\".*ModelParallelStrategy\(",
    ),
    "tensor_parallel": (
        lambda: ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
        r"tensor_parallel_size=2.*2-D mesh.*Use `tensor_parallel_size=1`",
    ),
}


@pytest.mark.parametrize("strategy", list(REFUSED))
@pytest.mark.parametrize("callback", list(CALLBACKS))
def test_unsupported_strategies_are_refused_in_setup_with_the_fix(callback: str, strategy: str) -> None:
    make, message = REFUSED[strategy]
    trainer = SimpleNamespace(strategy=make(), world_size=2, callbacks=[])
    with pytest.raises(MisconfigurationException, match=rf"{callback} does not support .*{message}"):
        CALLBACKS[callback]().setup(trainer, CausalLMModule(model_config=fsdp2_callbacks.model_config(1)), "fit")  # type: ignore[arg-type]


def test_causal_lm_module_refuses_tensor_parallelism_when_it_shards() -> None:
    module = CausalLMModule(model_config=fsdp2_callbacks.model_config(1))
    tensor_parallel = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    module._trainer = SimpleNamespace(strategy=tensor_parallel, world_size=2)  # type: ignore[assignment]
    with pytest.raises(MisconfigurationException, match=r"CausalLMModule does not support .*tensor_parallel_size=1"):
        module.shard()


def test_causal_lm_module_checks_its_fsdp_dtypes_and_leaves_an_unsharded_strategy_alone() -> None:
    with pytest.raises(MisconfigurationException, match=r"fsdp_param_dtype='bf17' is invalid.*bfloat16"):
        CausalLMModule(model_config=fsdp2_callbacks.model_config(1), fsdp_param_dtype="bf17")
    module = CausalLMModule(model_config=fsdp2_callbacks.model_config(1), fsdp_param_dtype="bf16")
    assert module.fsdp_param_dtype is torch.bfloat16 and module.fsdp_reduce_dtype is None
    with pytest.warns(UserWarning, match="apply to FSDP2 sharding under ModelParallelStrategy only"):
        module.configure_model()  # no device mesh: nothing to shard
    assert all(type(p) is torch.nn.Parameter for p in module.parameters())
