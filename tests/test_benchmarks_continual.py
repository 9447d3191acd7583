"""The continual benchmark keeps working: its quick mode runs every method through the four-stage sequence with the
continual API and writes what it claims to measure; its LR rule is the forgetting benchmark's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "continual.py"


def _load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("continual_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is being executed
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_the_lr_rule_is_the_forgetting_benchmarks_applied_to_the_learning_accuracy() -> None:
    bench = _load_benchmark()
    sweep = [
        {"method": "a", "lr": 3e-4, "learning_accuracy": 90.0, "op_exact_match": 60.0},
        {"method": "a", "lr": 1e-3, "learning_accuracy": 99.5, "op_exact_match": 30.0},
        {"method": "a", "lr": 3e-3, "learning_accuracy": 100.0, "op_exact_match": 25.0},
        {"method": "b", "lr": 3e-4, "learning_accuracy": 50.0, "op_exact_match": 90.0},
        {"method": "b", "lr": 1e-3, "learning_accuracy": 97.0, "op_exact_match": 40.0},
        {"method": "b", "lr": 3e-3, "learning_accuracy": 98.5, "op_exact_match": 25.0},
    ]
    # The task only (each task right after its own stage), never the OP that includes the forgetting.
    assert bench.choose_lrs(sweep, tie_points=1.0) == {"a": 1e-3, "b": 3e-3}
    assert bench.choose_lrs(sweep, tie_points=0.0) == {"a": 3e-3, "b": 3e-3}
    assert bench.forgetting.choose_lrs.__module__ == "forgetting"  # imported from benchmarks/forgetting.py


def _stats(mean: float, std: float) -> dict[str, float]:
    return {"mean": mean, "std": std, "n": 3}


def _figures(op: float, bwt: float, op_loss: float, bwt_loss: float, spread: float = 1.0) -> dict[str, Any]:
    return {
        "op_exact_match": _stats(op, spread),
        "bwt_exact_match": _stats(bwt, spread),
        "op_loss": _stats(op_loss, 0.1),
        "bwt_loss": _stats(bwt_loss, 0.1),
    }


def test_the_hft_claim_needs_a_bwt_gain_beyond_the_seeds_spread_at_an_op_no_more_than_two_points_below() -> None:
    bench = _load_benchmark()
    summary = {
        "full_ft": _figures(op=25.0, bwt=-90.0, op_loss=5.0, bwt_loss=-6.0),
        "hft_once": _figures(op=24.0, bwt=-80.0, op_loss=4.0, bwt_loss=-6.1),  # BWT +10 > 2 std; OP -1 point
        "mofo_hft": _figures(op=20.0, bwt=-70.0, op_loss=5.5, bwt_loss=-5.0),  # better BWT, but OP 5 points below
    }
    checks = {
        (c["method"], c["metric"]): (c["bwt_better"], c["op_equal"], c["holds"]) for c in bench.check_claims(summary)
    }
    assert checks == {
        ("hft_once", "exact_match"): (True, True, True),
        ("hft_once", "loss"): (False, True, False),  # -0.1 nats is within the spread (0.2)
        ("mofo_hft", "exact_match"): (True, False, False),
        ("mofo_hft", "loss"): (True, False, False),  # a higher task loss at the end is a worse OP
    }
    summary["hft_once"]["bwt_exact_match"] = _stats(-88.5, 1.0)  # +1.5 points: inside the two std (2.0)
    assert not bench.check_claims({"full_ft": summary["full_ft"], "hft_once": summary["hft_once"]})[0]["holds"]
    assert bench.check_claims({"hft_once": summary["hft_once"]}) == []  # nothing to compare with


def test_summary_is_mean_and_sample_std_over_seeds_with_mean_matrices_and_knowledge_curves() -> None:
    bench = _load_benchmark()

    def run(seed: int, scale: float) -> dict[str, Any]:
        return {
            "method": "m",
            "seed": seed,
            "op_exact_match": 10.0 * scale,
            "peak_rss_mib": None,
            "forgetting_exact_match": {"a": 100.0 * scale, "b": None},
            "forgetting_loss": {"a": 2.0 * scale, "b": None},
            "matrix_exact_match": [[0.0, 0.0], [100.0 * scale, 0.0], [0.0, 100.0]],
            "matrix_loss": [[5.0, 5.0], [0.1, 5.0], [5.0 * scale, 0.1]],
            "knowledge_accuracy_after": [100.0, 50.0 * scale, 40.0 * scale],
        }

    summary = bench.summarize([run(1, 1.0), run(2, 0.5), run(3, 0.0)])["m"]
    assert summary["op_exact_match"] == {"mean": 5.0, "std": pytest.approx(5.0), "n": 3}
    assert "peak_rss_mib" not in summary  # in-process runs have no attributable peak
    assert summary["forgetting_exact_match_per_task"] == {"a": {"mean": 50.0, "std": pytest.approx(50.0), "n": 3}}
    assert summary["matrix_exact_match"] == [[0.0, 0.0], [50.0, 0.0], [0.0, 100.0]]
    assert summary["matrix_loss"][2][0] == pytest.approx(2.5)
    assert [s["mean"] for s in summary["knowledge_accuracy_after"]] == [100.0, 25.0, 20.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "1"], "at least 2 distinct seeds"),
        (["--seeds", "0", "1", "--lrs", "1e-3", "3e-3"], "--sweep-seed=0 is among --seeds"),
        (["--lrs", "0", "1e-3"], "learning rates must be in (0, 1)"),
        (["--workers", "-1"], "--workers=-1 must be >= 0"),
        (["--methods", "sgd"], "'sgd' is not one of"),
        (["--methods", "full_ft+lines"], "'full_ft+lines' is a post-hoc row of the forgetting benchmark"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(args: list[str], message: str) -> None:
    result = _run("--quick", *args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr


def _check_runs(data: dict[str, Any], methods: list[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """What every quick run must show: one fit through the four stages of ``TASK_SEQUENCE``, its matrices and the
    figures derived from them as ``lit_mofo.continual.metrics`` defines them; the runs by (method, seed)."""
    from lit_mofo.scenario import TASK_SEQUENCE

    stages = list(TASK_SEQUENCE)
    assert data["settings"]["methods"] == methods and data["settings"]["seeds"] == [1, 2]
    assert data["stages"] == stages and data["sweep"] == []  # one LR: nothing to choose
    assert data["machine"].startswith("CPU: ") and len(data["load_average"]) == 2
    assert len(data["runs"]) == 2 * len(methods)
    for run in data["runs"]:
        # One fit: four stages of exactly their budget, a matrix row before stage 1 and after each stage.
        assert run["steps_done"] == 16 and run["row_steps"] == [0, 4, 8, 12, 16]
        for metric in ("exact_match", "loss"):
            assert len(run[f"matrix_{metric}"]) == 5 and all(len(row) == 4 for row in run[f"matrix_{metric}"])
            assert run["matrix_payload"]["metrics"][metric]["matrix"][0] == pytest.approx(
                [value / (100 if metric == "exact_match" else 1) for value in run[f"matrix_{metric}"][0]]
            )
        assert run["matrix_exact_match"][0] == [0.0, 0.0, 0.0, 0.0]  # the base model can do none of the tasks
        assert run["knowledge_accuracy_pretrained"] == run["knowledge_accuracy_after"][0] == 100.0
        assert len(run["knowledge_accuracy_after"]) == 5 and run["forgetting_knowledge_accuracy"] == pytest.approx(
            100.0 - run["knowledge_accuracy_after"][-1]
        )
        assert (
            set(run["forgetting_exact_match"]) == set(stages)
            and run["forgetting_exact_match"]["reverse_cipher"] is None
        )
        # OP and BWT as lit_mofo.continual.metrics defines them, from the run's own matrix (the loss: lower is
        # better, so BWT's sign is flipped and negative still means worse).
        final, diagonal = run["matrix_loss"][-1], [run["matrix_loss"][j + 1][j] for j in range(4)]
        assert run["op_loss"] == pytest.approx(sum(final) / 4)
        assert run["bwt_loss"] == pytest.approx(-sum(final[j] - diagonal[j] for j in range(3)) / 3)
        final, diagonal = run["matrix_exact_match"][-1], [run["matrix_exact_match"][j + 1][j] for j in range(4)]
        assert run["op_exact_match"] == pytest.approx(sum(final) / 4)
        assert run["learning_accuracy"] == pytest.approx(sum(diagonal) / 4)
        assert run["fit_seconds"] > run["evaluation_seconds"] > 0
    return {(run["method"], run["seed"]): run for run in data["runs"]}


def _check_outputs(bench: Any, out: Path, stdout: str, methods: list[str]) -> None:
    """The Markdown is what the run printed, names every method, checks the HFT claim; the PNG is a PNG; both are
    redrawn from the JSON alone."""
    text = (out / "continual_quick.md").read_text()
    assert text.strip() == stdout.strip()
    for method in methods:
        assert f"| {bench.label(method)} |" in text
    assert "The HFT paper's claim" in text
    assert (out / "continual_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    redrawn = out / "redrawn"
    again = _run("--from-json", str(out / "continual_quick.json"), "--out-dir", str(redrawn), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (redrawn / "continual_quick.md").read_text() == text
    assert (redrawn / "continual_quick.png").exists()


def test_quick_mode_runs_the_sequence_with_the_continual_api_and_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    bench = _load_benchmark()
    methods = ["full_ft", "mofo_hft", "l2_1"]
    result = _run("--quick", "--methods", *methods, "--out-dir", str(tmp_path))  # 6 sequences of 4 x 4 steps
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _check_runs(json.loads((tmp_path / "continual_quick.json").read_text()), methods)
    # HalfFineTuning draws a new half at every stage start; MoFO on that half moves fewer entries than AdamW; L2
    # towards θ₀ keeps the weights closer to θ₀ than plain AdamW.
    for seed in (1, 2):
        assert runs[("mofo_hft", seed)]["hft_draw_steps"] == [0, 4, 8, 12]
        assert runs[("full_ft", seed)]["hft_draw_steps"] is None
        assert runs[("mofo_hft", seed)]["drift_fraction_changed"] < runs[("full_ft", seed)]["drift_fraction_changed"]
        assert runs[("l2_1", seed)]["drift_relative_l2"] < runs[("full_ft", seed)]["drift_relative_l2"]
    _check_outputs(bench, tmp_path, result.stdout, methods)


@pytest.mark.slow
def test_quick_mode_runs_every_default_method_through_the_four_stages(tmp_path: Path) -> None:
    bench = _load_benchmark()
    methods = list(bench.METHODS)
    result = _run("--quick", "--out-dir", str(tmp_path))  # 14 sequences of 4 x 4 steps in this process
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _check_runs(json.loads((tmp_path / "continual_quick.json").read_text()), methods)
    for seed in (1, 2):
        for method in ("hft_once", "mofo_hft"):
            assert runs[(method, seed)]["hft_draw_steps"] == [0, 4, 8, 12]
        drift = {method: runs[(method, seed)]["drift_relative_l2"] for method in methods}
        # MoFO moves fewer entries than AdamW; L2 towards θ₀ stays closer to θ₀ than L2 towards each stage's start,
        # which still stays closer than no pull at all.
        assert runs[("mofo_0.15", seed)]["drift_fraction_changed"] < runs[("full_ft", seed)]["drift_fraction_changed"]
        assert drift["l2_1"] < drift["l2_prev_1"] < drift["full_ft"]
    _check_outputs(bench, tmp_path, result.stdout, methods)
    assert "HFT (a new half per stage)" in (tmp_path / "continual_quick.md").read_text()
