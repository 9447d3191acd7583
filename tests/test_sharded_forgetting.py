"""ForgettingMonitor and every probe under ModelParallelStrategy (FSDP2 over 2 gloo processes on CPU): the same
figures as on 1 process, as many forwards on every rank, resume from a sharded checkpoint, failing together.

The 2-process runs happen in ``tests/scripts/sharded_forgetting.py`` (one launch per scenario); the 1-process
reference is the same fit, unsharded, run here through the script's own :func:`fit`.

Tolerances: the baselines are the pre-trained model's figures, computed from the same weights on the same batches,
where only the order in which the ranks' float64 sums are added differs: <= 1e-6 relative. The later figures also
depend on the training: every rank trains on the same batch, so the averaged gradient is the 1-process one (the
average of equal float32 numbers is exact) and the weights stay equal; they are held to <= 1e-5 relative, room for
a reduction order that rounds differently (measured here: 0, every figure bit-identical).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from process_launch import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "sharded_forgetting.py"
sys.path.insert(0, str(SCRIPT.parent))

import sharded_forgetting  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local lm-eval task needs no network; never try it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HAS_LM_EVAL = all(importlib.util.find_spec(name) is not None for name in ("lm_eval", "accelerate"))
BUILT_IN = ["lm", "lm_loader", "accuracy", "multiple_choice", "knowledge", "task", "callable"]


def launch(out_dir: Path, *arguments: str, timeout: float = 600) -> tuple[list[dict[str, Any]], str, str]:
    """Run the script (a hang kills every rank) and load both ranks' results, with its stdout and stderr."""
    result = run_script(SCRIPT, str(out_dir), *arguments, timeout=timeout, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    return ranks, result.stdout, result.stderr


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The local lm-eval task when lm-eval is installed (the ``lmeval`` extra), else None (no LMEvalProbe)."""
    return sharded_forgetting.write_lm_eval_task(tmp_path_factory.mktemp("tasks")) if HAS_LM_EVAL else None


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, tasks: Path | None) -> dict[str, Any]:
    out_dir = tmp_path_factory.mktemp("sharded_fit")
    ranks, stdout, _ = launch(out_dir, "fit", *(["--tasks", str(tasks)] if tasks else []))
    return {"ranks": ranks, "stdout": stdout, "out_dir": out_dir}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, tasks: Path | None) -> dict[str, Any]:
    return sharded_forgetting.fit(1, tmp_path_factory.mktemp("single_fit"), tasks)


@pytest.fixture(scope="module")
def launched_ranks(
    tmp_path_factory: pytest.TempPathFactory, tasks: Path | None
) -> tuple[list[dict[str, Any]], str, str]:
    return launch(tmp_path_factory.mktemp("sharded_ranks"), "ranks", *(["--tasks", str(tasks)] if tasks else []))


@pytest.fixture(scope="module")
def ranks(launched_ranks: tuple[list[dict[str, Any]], str, str]) -> list[dict[str, Any]]:
    return launched_ranks[0]


def relative(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def keyed(records: list[dict[str, Any]]) -> dict[tuple[int, str, str], dict[str, Any]]:
    return {(r["step"], r["probe"], r["metric"]): r for r in records}


@pytest.mark.slow
def test_every_probe_kind_is_measured_at_the_baseline_every_2_steps_and_at_the_end(sharded: dict[str, Any]) -> None:
    rank0 = sharded["ranks"][0]
    expected = BUILT_IN + (["harness"] if HAS_LM_EVAL else [])
    assert list(dict.fromkeys(r["probe"] for r in rank0["records"])) == expected
    assert sorted({r["step"] for r in rank0["records"]}) == [0, 2, 4]


@pytest.mark.slow
def test_both_ranks_record_the_same_figures(sharded: dict[str, Any]) -> None:
    rank0, rank1 = sharded["ranks"]
    assert rank0["records"] == rank1["records"]
    assert rank0["baselines"] == rank1["baselines"]


@pytest.mark.slow
def test_the_pretrained_baselines_equal_the_single_process_ones(
    sharded: dict[str, Any], single: dict[str, Any]
) -> None:
    baselines = sharded["ranks"][0]["baselines"]
    assert baselines.keys() == single["baselines"].keys()
    for probe, values in single["baselines"].items():
        assert values.keys() == baselines[probe].keys()
        for metric, value in values.items():
            assert relative(baselines[probe][metric], value) <= 1e-6, (probe, metric, baselines[probe][metric], value)


@pytest.mark.slow
def test_every_later_figure_equals_the_single_process_one(sharded: dict[str, Any], single: dict[str, Any]) -> None:
    two, one = keyed(sharded["ranks"][0]["records"]), keyed(single["records"])
    assert two.keys() == one.keys()
    for key, record in one.items():
        for field in ("value", "forgetting", "retention"):
            assert relative(two[key][field], record[field]) <= 1e-5, (key, field, two[key][field], record[field])
        assert (two[key]["epoch"], two[key]["trigger"]) == (record["epoch"], record["trigger"])


@pytest.mark.slow
def test_the_monitor_leaves_the_model_sharded_and_training_as_on_one_process(
    sharded: dict[str, Any], single: dict[str, Any]
) -> None:
    for rank in sharded["ranks"]:
        assert rank["param_types"] == ["DTensor"]  # no evaluation leaves the root's parameters gathered
        for name, weight in single["weights"].items():
            assert torch.equal(rank["weights"][name], weight), name


@pytest.mark.slow
def test_every_rank_runs_as_many_forwards_padding_the_odd_batch(
    sharded: dict[str, Any], single: dict[str, Any]
) -> None:
    rank0, rank1 = sharded["ranks"]
    assert rank0["forwards"] == rank1["forwards"]
    steps, evaluations = sharded_forgetting.STEPS, 3
    # One process runs every batch: 5 + 5 + 3 + 3 + 3 + 3 + 1 per evaluation, plus lm-eval's own forwards.
    harness = (single["forwards"] - steps) / evaluations - 23
    assert harness == (int(harness) if HAS_LM_EVAL else 0)
    # Each rank runs ceil(batches / 2) of each probe (rank 1 pads the odd batch), the user's function and lm-eval on
    # every rank: 3 + 3 + 2 + 2 + 2 + 2 + 1.
    assert rank0["forwards"] == steps + evaluations * (15 + harness)


@pytest.mark.slow
def test_the_metrics_are_logged_once_from_rank_zero(sharded: dict[str, Any]) -> None:
    rank0 = sharded["ranks"][0]
    with open(sharded["out_dir"] / "logs" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = {int(r["step"]): r for r in rows if r.get("probe/lm/loss")}
    assert sorted(logged) == [0, 2, 4]
    for record in rank0["records"]:
        key = f"{record['probe']}/{record['metric']}"
        for kind, field in (("probe", "value"), ("forgetting", "forgetting"), ("retention", "retention")):
            logged_value = float(logged[record["step"]][f"{kind}/{key}"])
            assert math.isclose(logged_value, record[field], rel_tol=1e-6, abs_tol=1e-12), (kind, key, record["step"])
    assert sharded["stdout"].count("lit_mofo report") == 1
    assert (sharded["out_dir"] / "report" / "forgetting_report.json").is_file()


@pytest.mark.slow
def test_a_resume_from_a_mid_run_sharded_checkpoint_continues_with_the_same_metrics(sharded: dict[str, Any]) -> None:
    for rank in sharded["ranks"]:
        assert rank["resumed_from"] == "epoch=1-step=2.ckpt" and rank["checkpoint_is_sharded"]
        assert rank["resumed_records"] == rank["records"]  # restored for steps 0 and 2, measured again for step 4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("probe", "error", "message"),
    [
        ("setup", "OSError", "reference shard 3 is unreadable on this rank"),  # preparing the data in setup
        ("prepare", "MisconfigurationException", r"ids in \[29, 338\]' is invalid"),  # a batch, before its forward
        ("consume", "MisconfigurationException", r"class indices in \[0, 6\]' is invalid"),  # logits, after it
        ("callable", "KeyError", "metric 'exact' is missing"),  # a user's function
    ],
)
def test_a_probe_failing_on_rank_1_fails_both_ranks_with_its_error(
    ranks: list[dict[str, Any]], probe: str, error: str, message: str
) -> None:
    rank0, rank1 = (rank["outcomes"][probe] for rank in ranks)
    assert rank1[0] == error and re.search(message, rank1[1])
    assert rank0[0] == "RuntimeError" and "failed on rank 1" in rank0[1] and f"{error}: " in rank0[1]
    assert re.search(message, rank0[1])


@pytest.mark.slow
def test_a_dataloader_shorter_on_one_rank_runs_as_many_forwards_on_both(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = ranks
    assert rank0["outcomes"]["uneven"] == rank1["outcomes"]["uneven"] == ("", "")
    # Rank 0 scores loader batches 0, 2 and 4 of its 5, rank 1 batch 1 of its 3 and pads twice: 3 forwards each, at
    # the baseline and at the end, plus the training step.
    assert rank0["forwards"]["uneven"] == rank1["forwards"]["uneven"] == 7
    assert rank0["baselines"]["uneven"] == rank1["baselines"]["uneven"]
    module = sharded_forgetting.ShardedLM()
    scored = sharded_forgetting.REFERENCE[[0, 1, 2, 3, 4, 5, 8, 9]]  # batches 0, 1, 2 and 4, not the padding
    logits = module.model(input_ids=scored).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), scored[:, 1:].flatten()).item()
    assert relative(rank0["baselines"]["uneven"]["loss"], loss) <= 1e-6


@pytest.mark.slow
def test_a_dataloader_empty_on_one_rank_fails_both_ranks(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        error, message = rank["outcomes"]["empty"]
        assert error == "MisconfigurationException" and "no reference batch left to run" in message


@pytest.mark.slow
def test_a_window_longer_than_the_models_positions_fails_both_ranks_before_any_forward(
    ranks: list[dict[str, Any]],
) -> None:
    # GPT-2 with 32 learned positions and a 60-token window in rank 1's batch: it used to hang, rank 1 failing inside
    # its forward's position lookup while rank 0 waited in FSDP's all-gather. Built from token ids, every rank
    # refuses it in setup; from a dataloader, rank 1 refuses its batch before the forward and rank 0 is told.
    for rank in ranks:
        error, message = rank["outcomes"]["overlong"]
        assert error == "MisconfigurationException"
        assert message.startswith("LanguageModelProbe(name='overlong'): max_length=64 is invalid")
        assert "at most 32 tokens (the model's maximum positions: GPT2Config.n_positions = 32" in message
        assert "(token_ids[2]) has 60 tokens. Set `max_length=32`" in message
        assert "learned position table has 32 rows: no longer window can run" in message
        assert rank["forwards"]["overlong"] == rank["forwards"]["overlong_loader"] == 0
    rank0, rank1 = (rank["outcomes"]["overlong_loader"] for rank in ranks)
    assert rank1[0] == "MisconfigurationException" and "dataloader batch='input_ids of 60 tokens per row'" in rank1[1]
    assert rank0[0] == "RuntimeError" and "failed on rank 1: MisconfigurationException: " in rank0[1]
    assert "input_ids of 60 tokens per row" in rank0[1]


@pytest.mark.slow
def test_figures_a_probe_did_not_reduce_are_rank_zeros_on_every_rank_with_a_warning(
    launched_ranks: tuple[list[dict[str, Any]], str, str],
) -> None:
    ranks, _, stderr = launched_ranks
    assert [rank["baselines"]["unreduced"] for rank in ranks] == [{"value": 0.0}, {"value": 0.0}]
    assert (
        stderr.count(
            "Probe 'unreduced' returned different values on different processes ([{'value': 0.0}, {'value': 1.0}])"
        )
        == 1
    )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LM_EVAL, reason="needs the lmeval extra")
def test_an_lm_eval_run_failing_on_rank_1_before_its_forwards_fails_both_ranks(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = (rank["outcomes"]["harness"] for rank in ranks)
    assert rank1 == ("FileNotFoundError", "the task's data files are missing on this node")
    assert rank0[0] == "RuntimeError" and "failed on rank 1: FileNotFoundError: the task's data files" in rank0[1]
