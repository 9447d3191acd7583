"""The forgetting benchmark keeps working: its quick mode runs every method and writes what it claims to measure."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "forgetting.py"


def _load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("forgetting_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is being executed
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_lr_rule_takes_the_best_task_score_and_the_smallest_lr_among_ties() -> None:
    bench = _load_benchmark()
    sweep = [
        {"method": "a", "lr": 3e-4, "task_exact_match": 90.0},
        {"method": "a", "lr": 1e-3, "task_exact_match": 99.5},
        {"method": "a", "lr": 3e-3, "task_exact_match": 100.0},
        {"method": "b", "lr": 3e-4, "task_exact_match": 50.0},
        {"method": "b", "lr": 1e-3, "task_exact_match": 97.0},
        {"method": "b", "lr": 3e-3, "task_exact_match": 98.5},
    ]
    assert bench.choose_lrs(sweep, tie_points=1.0) == {"a": 1e-3, "b": 3e-3}
    assert bench.choose_lrs(sweep, tie_points=0.0) == {"a": 3e-3, "b": 3e-3}


def test_targets_compare_means_with_full_fine_tuning() -> None:
    bench = _load_benchmark()

    def stats(task: float, forgetting: float, drift: float) -> dict[str, dict[str, float]]:
        return {
            "task_exact_match": {"mean": task},
            "forgetting_knowledge_accuracy": {"mean": forgetting},
            "drift_relative_l2": {"mean": drift},
        }

    checks = bench.check_targets(
        {"full_ft": stats(100, 40, 0.2), "mofo_0.15": stats(99.5, 25, 0.1), "hft_once": stats(97, 30, 0.15)}
    )
    met = {(check["method"], check["target"]): check["met"] for check in checks}
    assert met == {
        ("mofo_0.15", "task >= full FT - 1 point"): True,
        ("mofo_0.15", "knowledge forgetting <= 0.5x full FT"): False,  # 25 > 20
        ("mofo_0.15", "drift (relative L2) clearly below full FT (<= 0.8x)"): True,
        ("hft_once", "task >= full FT - 2 points"): False,  # 97 < 98
        ("hft_once", "knowledge forgetting below full FT"): True,
    }


def test_summary_is_mean_and_sample_std_over_seeds() -> None:
    bench = _load_benchmark()
    runs = [{"method": "m", "task_exact_match": value, "peak_rss_mib": None} for value in (1.0, 2.0, 6.0)]
    summary = bench.summarize(runs)
    assert summary["m"]["task_exact_match"] == {"mean": 3.0, "std": pytest.approx(2.6457513), "n": 3}
    assert "peak_rss_mib" not in summary["m"]  # in-process runs have no attributable peak


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "1"], "at least 2 distinct seeds"),
        (["--seeds", "0", "1"], "--sweep-seed=0 is among --seeds"),
        (["--lrs", "0", "1e-3"], "learning rates must be in (0, 1)"),
        (["--workers", "-1"], "--workers=-1 must be >= 0"),
        (["--methods", "l2_0"], "'l2_0' is not one of"),
        (["--methods", "sgd"], "'sgd' is not one of"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(args: list[str], message: str) -> None:
    result = _run("--quick", *args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.slow
def test_quick_mode_runs_every_method_and_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    bench = _load_benchmark()
    result = _run("--quick", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "forgetting_quick.json").read_text())
    methods = list(bench.METHODS)
    assert data["settings"]["methods"] == methods
    assert len(data["sweep"]) == 2 * len(methods) and len(data["runs"]) == 2 * len(methods)
    assert {run["seed"] for run in data["runs"]} == {1, 2} and {run["seed"] for run in data["sweep"]} == {0}
    assert set(data["lr"]) == set(methods) and set(data["lr"].values()) <= set(data["settings"]["lrs"])
    assert all(run["lr"] == data["lr"][run["method"]] for run in data["runs"])
    assert all(run["steps_done"] == data["settings"]["budget"]["steps"] for run in data["runs"])
    # Every run starts from the same pre-trained model, which knows every fact and can copy.
    assert {run["knowledge_accuracy_pretrained"] for run in data["runs"]} == {100.0}

    summary = data["summary"]
    changed = {method: summary[method]["drift_fraction_changed"]["mean"] for method in methods}
    # MoFO moves only its fraction of each matrix per step (the union over 12 steps is larger, but ordered), HFT
    # about half of the parameters, AdamW nearly every entry.
    assert changed["mofo_0.05"] < changed["mofo_0.15"] < 50 < changed["full_ft"]
    assert 40 < changed["hft_once"] < 60
    state = {method: summary[method]["train_state_mib"]["mean"] for method in methods}
    assert state["hft_once"] < state["full_ft"] == pytest.approx(state["mofo_0.15"])
    theta0 = {run["method"]: run["theta0_mib"] for run in data["runs"]}
    assert theta0["l2_0.1"] == theta0["l2_1"] > theta0["hft_reset"] > 0
    assert all(theta0[method] == 0 for method in methods if not method.startswith(("l2_", "hft_reset")))
    assert len(data["targets"]) == 9 and all(isinstance(check["met"], bool) for check in data["targets"])

    text = (tmp_path / "forgetting_quick.md").read_text()
    assert text.strip() == result.stdout.strip()
    for method in methods:
        assert f"| {bench.label(method)} |" in text
    assert "± " in text and "LR sweep (seed 0)" in text
    assert (tmp_path / "forgetting_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    redrawn = tmp_path / "redrawn"
    again = _run("--from-json", str(tmp_path / "forgetting_quick.json"), "--out-dir", str(redrawn), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (redrawn / "forgetting_quick.md").read_text() == text
    assert (redrawn / "forgetting_quick.png").exists()


@pytest.mark.slow
def test_worker_processes_report_each_runs_peak_memory(tmp_path: Path) -> None:
    result = _run(
        "--quick", "--methods", "full_ft", "hft_once", "--lrs", "1e-3", "--workers", "2", "--out-dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "forgetting_quick.json").read_text())
    assert data["sweep"] == []  # one LR: nothing to choose
    assert len(data["runs"]) == 4
    assert all(run["peak_rss_mib"] > 100 for run in data["runs"])  # the Python/torch runtime is most of it
    assert data["summary"]["full_ft"]["peak_rss_mib"]["n"] == 2
