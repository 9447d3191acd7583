"""The forgetting benchmark keeps working: its quick mode runs every method and writes what it claims to measure."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
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


def _run(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def base_models() -> None:
    """Both scenarios' base models, built here on first use (about 2 minutes each on a quiet machine, once per
    cache) rather than inside a timed benchmark run."""
    from lit_mofo.scenario import get_scenario
    from lit_mofo.scenario.base_model import base_model_path

    for name in ("overlap", "disjoint"):
        base_model_path(get_scenario(name).recipe)


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


def sweep_run(method: str, lr: float, entries: dict[str, tuple[str | None, float, float | None, float, float]]) -> dict:
    """A sweep-seed run of a post-hoc base method: its curve, ``{key: (family, alpha, beta, task, forgetting)}``."""
    return {
        "method": method,
        "lr": lr,
        "post_hoc": {
            key: {
                "method": family,
                "alpha": alpha,
                "beta": beta,
                "task_exact_match": task,
                "forgetting_knowledge_accuracy": lost,
            }
            for key, (family, alpha, beta, task, lost) in entries.items()
        },
    }


def test_post_hoc_edits_are_picked_per_family_on_the_sweep_seed_at_the_chosen_lr() -> None:
    bench = _load_benchmark()
    sweep = [
        sweep_run(
            "full_ft",
            1e-3,
            {
                "finetuned": (None, 1.0, None, 100.0, 60.0),
                "wise_ft_a0.9": ("wise_ft", 0.9, None, 99.6, 50.0),
                "wise_ft_a0.8": ("wise_ft", 0.8, None, 99.0, 40.0),  # exactly 1 point below: still within
                "wise_ft_a0.7": ("wise_ft", 0.7, None, 90.0, 10.0),
                "lines_a0.9_b0.1": ("lines", 0.9, 0.1, 98.0, 55.0),  # more than 1 point below
            },
        ),
        sweep_run("full_ft", 3e-3, {"finetuned": (None, 1.0, None, 100.0, 90.0)}),  # another LR: not used
        sweep_run(
            "mofo_0.15",
            1e-3,
            {"finetuned": (None, 1.0, None, 99.0, 30.0), "lines_a0.5_b0.5": ("lines", 0.5, 0.5, 99.5, 20.0)},
        ),
    ]
    picks = bench.choose_edits(
        sweep, {"full_ft": 1e-3, "mofo_0.15": 1e-3}, ["full_ft+wise_ft", "full_ft+lines", "mofo_0.15+lines"]
    )
    assert {row: pick["edit"] for row, pick in picks.items()} == {
        "full_ft+wise_ft": "wise_ft_a0.8",
        "full_ft+lines": "finetuned",  # no LiNeS edit within 1 point: the rule keeps the fit
        "mofo_0.15+lines": "lines_a0.5_b0.5",
    }
    assert bench.edits_for("full_ft", picks) == ((0.8,), ())
    assert bench.edits_for("mofo_0.15", picks) == ((), ((0.5, 0.5),))
    assert bench.edits_for("hft_once", picks) == ((), ())


def test_post_hoc_rows_take_the_picked_edits_figures_from_their_base_fits() -> None:
    bench = _load_benchmark()
    base = {
        "method": "full_ft",
        "seed": 1,
        "task_exact_match": 100.0,
        "forgetting_knowledge_accuracy": 60.0,
        "drift_relative_l2": 0.2,
        "step_ms": 50.0,
        "train_state_mib": 17.0,
        "theta0_mib": 0.0,
        "post_hoc_theta0_mib": 4.0,
        "post_hoc": {"wise_ft_a0.8": {"task_exact_match": 99.0, "forgetting_knowledge_accuracy": 40.0}},
    }
    picks = {
        "full_ft+wise_ft": {"edit": "wise_ft_a0.8", "method": "wise_ft"},
        "full_ft+lines": {"edit": "finetuned", "method": None},
    }
    wise, kept = bench.post_hoc_runs([base, {**base, "method": "mofo_0.15"}], picks)
    assert (wise["method"], wise["edit"], wise["task_exact_match"], wise["forgetting_knowledge_accuracy"]) == (
        "full_ft+wise_ft",
        "wise_ft_a0.8",
        99.0,
        40.0,
    )
    assert wise["step_ms"] == 50.0 and wise["train_state_mib"] == 21.0 and wise["theta0_mib"] == 4.0
    assert wise["drift_relative_l2"] is None  # not measured for the edit in this synthetic run
    assert (kept["method"], kept["edit"], kept["task_exact_match"]) == ("full_ft+lines", "finetuned", 100.0)


def test_the_l2_goal_looks_for_a_recipe_at_l2s_task_score_that_forgets_less() -> None:
    bench = _load_benchmark()

    def stats(task: float, forgetting: float) -> dict[str, dict[str, float]]:
        return {"task_exact_match": {"mean": task}, "forgetting_knowledge_accuracy": {"mean": forgetting}}

    summary = {
        "l2_0.1": stats(99.0, 30.0),
        "lora_8": stats(99.5, 5.0),  # a baseline, not a lit_mofo recipe
        "mofo_0.15": stats(98.0, 10.0),  # below L2's task score
        "full_ft+wise_ft": stats(99.0, 25.0),
    }
    (check,) = bench.check_targets(summary)
    assert check["met"] and "Full FT + WiSE-FT, task 99.0 vs 99.0, forgetting 25.0 vs 30.0" in check["measured"]
    summary["full_ft+wise_ft"] = stats(99.0, 35.0)
    assert not bench.check_targets(summary)[0]["met"]
    del summary["full_ft+wise_ft"]
    assert "no lit_mofo recipe reaches its task score (99.0)" in bench.check_targets(summary)[0]["measured"]


def test_the_post_hoc_cost_goal_is_the_median_sweep_to_fit_ratio() -> None:
    bench = _load_benchmark()
    sweep = [
        {"post_hoc": {}, "post_hoc_sweep_seconds": s, "post_hoc_fit_seconds": 10.0, "post_hoc_edits": 10}
        for s in (0.5, 1.0, 3.0)
    ] + [{"method": "hft_once"}]
    (check,) = bench.check_targets({}, sweep)
    assert check["met"] and check["measured"] == "10% (median of 3 fits; 10 edits, 0.10 s each)"


def test_a_json_of_the_one_scenario_version_is_redrawn_as_the_overlap_scenario() -> None:
    bench = _load_benchmark()
    old = {
        "settings": {},
        "machine": "m",
        "wall_seconds": 1.0,
        "lr": {},
        "summary": {},
        "targets": [],
        "sweep": [],
        "runs": [],
    }
    upgraded = bench._upgrade(old)
    assert list(upgraded["scenarios"]) == ["overlap"] and upgraded["machine"] == "m"
    assert bench._upgrade(upgraded) is upgraded


@pytest.mark.slow
def test_quick_mode_runs_every_method_on_both_scenarios_and_writes_json_markdown_and_plots(
    tmp_path: Path, base_models: None
) -> None:
    bench = _load_benchmark()
    result = _run("--quick", "--out-dir", str(tmp_path))  # 48 fits in this process: about 1 minute, quiet
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "forgetting_quick.json").read_text())
    methods = list(bench.METHODS)
    assert data["settings"]["methods"] == methods and data["settings"]["scenarios"] == ["overlap", "disjoint"]
    assert list(data["scenarios"]) == ["overlap", "disjoint"]
    for name, scenario in data["scenarios"].items():
        base_model = scenario["base_model"]
        assert base_model["model"] == {"overlap": "scenario:base", "disjoint": "scenario:disjoint"}[name]
        assert base_model["knowledge_accuracy"] == 1.0 and 0 < base_model["copy_exact_match"] <= 1
        assert {"key", "machine", "versions", "train_seconds"} <= set(base_model)
        # One LR: no LR to choose, so the sweep seed fits only the post-hoc rows' bases, to pick their edits.
        assert [run["method"] for run in scenario["sweep"]] == ["full_ft", "mofo_0.15"]
        assert {run["seed"] for run in scenario["sweep"]} == {0}
        assert len(scenario["runs"]) == 2 * len(methods) and {run["seed"] for run in scenario["runs"]} == {1, 2}
        assert set(scenario["lr"]) >= set(methods)
        assert all(run["steps_done"] == data["settings"]["budget"]["steps"] for run in scenario["runs"])
        # Every run starts from the same pre-trained model, which knows every fact.
        assert {run["knowledge_accuracy_pretrained"] for run in scenario["runs"]} == {100.0}
        assert len({run["copy_exact_match_pretrained"] for run in scenario["runs"]}) == 1

        summary = scenario["summary"]
        changed = {method: summary[method]["drift_fraction_changed"]["mean"] for method in methods}
        # MoFO moves only its fraction of each matrix per step (the union over 12 steps is larger, but ordered), HFT
        # about half of the parameters, AdamW nearly every entry; LoRA every entry of the adapted matrices, nothing
        # of the embeddings and the head.
        assert changed["mofo_0.05"] < changed["mofo_0.15"] < 50 < changed["full_ft"]
        assert 40 < changed["hft_once"] < 60
        assert 80 < changed["lora_8"] < changed["full_ft"]
        state = {method: summary[method]["train_state_mib"]["mean"] for method in methods}
        assert state["hft_once"] < state["full_ft"] == pytest.approx(state["mofo_0.15"])
        assert state["lora_8"] < state["lora_64"] < state["full_ft"]
        runs = {(run["method"], run["seed"]): run for run in scenario["runs"]}
        lora = runs[("lora_64", 1)]
        assert lora["drift_relative_l2_by_role"]["embedding"] == lora["drift_relative_l2_by_role"]["head"] == 0.0
        # Rank 8 adapts a 128-wide model with 1/8 of its weights' size; rank 64 (half the width) with two thirds.
        assert runs[("lora_8", 1)]["trainable_mib"] < lora["trainable_mib"] < runs[("full_ft", 1)]["trainable_mib"]
        assert runs[("lora_8", 1)]["trainable_mib"] < runs[("full_ft", 1)]["trainable_mib"] / 5
        theta0 = {run["method"]: run["theta0_mib"] for run in scenario["runs"]}
        assert theta0["l2_0.1"] == theta0["l2_1"] > theta0["hft_reset"] > 0
        assert all(theta0[m] == 0 for m in bench.FITTED_METHODS if not m.startswith(("l2_", "hft_reset")))

        # Post-hoc: each base measured its rows' grids on the sweep seed; the pick is applied to every seed.
        grids = {run["method"]: sorted(run["post_hoc"]) for run in scenario["sweep"]}
        assert grids == {
            "full_ft": ["finetuned", "lines_a0.5_b0.5", "lines_a0_b1", "wise_ft_a0.3", "wise_ft_a0.7"],
            "mofo_0.15": ["finetuned", "lines_a0.5_b0.5", "lines_a0_b1"],
        }
        picks = scenario["post_hoc"]["picks"]
        assert set(picks) == set(bench.POST_HOC)
        for row, (base, family) in bench.POST_HOC.items():
            assert picks[row]["method"] in (None, family)
            for seed in (1, 2):
                edited, fitted = runs[(row, seed)], runs[(base, seed)]
                assert edited["edit"] == picks[row]["edit"] and edited["lr"] == fitted["lr"]
                assert edited["drift_relative_l2"] <= fitted["drift_relative_l2"]  # factors <= 1: back towards θ₀
                if picks[row]["method"] is None:
                    assert edited["task_exact_match"] == fitted["task_exact_match"]
                else:
                    assert edited["train_state_mib"] > fitted["train_state_mib"]  # it keeps θ₀
        # The script's own drift of the unedited fit is ParameterDrift's.
        for seed in (1, 2):
            fitted = runs[("full_ft", seed)]
            if "post_hoc" in fitted:
                unedited = fitted["post_hoc"]["finetuned"]
                assert unedited["drift_relative_l2"] == pytest.approx(fitted["drift_relative_l2"], rel=1e-5)
                assert unedited["drift_fraction_changed"] == pytest.approx(fitted["drift_fraction_changed"])
        targets = scenario["targets"]
        assert [t["method"] for t in targets][-2:] == ["l2_0.1", "post_hoc"]
        assert len(targets) == 11 and all(isinstance(check["met"], bool) for check in targets)

    text = (tmp_path / "forgetting_quick.md").read_text()
    assert text.strip() == result.stdout.strip()
    for method in methods:
        assert f"| {bench.label(method)} |" in text
    assert "± " in text and "LR sweep (seed 0)" in text and "Post-hoc edits on the sweep seed" in text
    assert "### Scenario `overlap`" in text and "### Scenario `disjoint`" in text
    assert "overlap: task EM | overlap: knowledge forgetting | disjoint: task EM" in text  # side by side
    for name in ("overlap", "disjoint"):
        assert (tmp_path / f"forgetting_quick_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    redrawn = tmp_path / "redrawn"
    again = _run("--from-json", str(tmp_path / "forgetting_quick.json"), "--out-dir", str(redrawn), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (redrawn / "forgetting_quick.md").read_text() == text
    assert (redrawn / "forgetting_quick_disjoint.png").exists()


@pytest.mark.slow
def test_worker_processes_report_each_runs_peak_memory(tmp_path: Path, base_models: None) -> None:
    result = _run(
        "--quick",
        "--scenarios",
        "overlap",
        "--methods",
        "full_ft",
        "hft_once",
        "--workers",
        "2",
        "--out-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "forgetting_quick.json").read_text())
    scenario = data["scenarios"]["overlap"]
    assert scenario["sweep"] == []  # one LR and no post-hoc row: nothing to choose
    assert len(scenario["runs"]) == 4
    assert all(run["peak_rss_mib"] > 100 for run in scenario["runs"])  # the Python/torch runtime is most of it
    assert scenario["summary"]["full_ft"]["peak_rss_mib"]["n"] == 2
    assert "leaked" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_run_with_workers_stopped_by_sigterm_exits_at_once_and_leaves_nothing_behind(
    tmp_path: Path, base_models: None
) -> None:
    """A job scheduler's SIGTERM used to leave the worker pool's semaphores behind ("5 leaked semaphore objects")."""
    import os
    import signal
    import time

    command = [sys.executable, str(SCRIPT), "--quick", "--scenarios", "overlap", "--methods", "full_ft", "hft_once"]
    with subprocess.Popen(
        [*command, "--workers", "2", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    ) as process:
        assert process.stderr is not None
        lines = []
        try:
            for line in process.stderr:  # stop it once the first run is in: the workers are busy with the next
                lines.append(line)
                if "[  1/4]" in line:
                    break
            process.send_signal(signal.SIGTERM)
            _, rest = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        stderr = "".join(lines) + rest
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "leaked" not in stderr and "Traceback" not in stderr
    assert not (tmp_path / "forgetting_quick.json").exists()

    def processes_left() -> bool:  # the runs and the fork server, all in the session the command started
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + 60  # the fork server exits once its parent is gone
    while processes_left() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_left()
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    assert not left, "processes of the interrupted benchmark outlived it"


# ---- the method files ------------------------------------------------------------------------------------------------


def _method_config() -> Any:
    _load_benchmark()  # puts benchmarks/ on sys.path
    import method_config

    return method_config


def test_every_method_file_is_checked_against_the_constructors_it_names_and_builds_fresh_instances() -> None:
    import torch

    from lit_mofo import HalfFineTuning, L2ToPretrained, MoFO

    method_config = _method_config()
    bench = _load_benchmark()
    assert set(bench.METHODS) <= set(method_config.available())
    for name in method_config.available():
        method_config.parse(name)  # raises on an option its class does not take
    params = [torch.nn.Parameter(torch.zeros(4, 4))]
    mofo = method_config.build_method("mofo_0.15", 3e-3)
    optimizer = mofo.optimizer(params)
    assert isinstance(optimizer, MoFO) and optimizer.defaults["lr"] == 3e-3 and optimizer.defaults["fraction"] == 0.15
    assert mofo.callbacks == [] and mofo.peft is None
    full = method_config.build_method("full_ft", 1e-3).optimizer(params)
    assert type(full) is torch.optim.AdamW and full.defaults["weight_decay"] == 0.0
    (hft,) = method_config.build_method("hft_reset", 1e-3, redraw_every_n_steps=3).callbacks
    assert isinstance(hft, HalfFineTuning) and hft.reset and hft.redraw_every_n_steps == 3
    (again,) = method_config.build_method("hft_reset", 1e-3, redraw_every_n_steps=3).callbacks
    assert again is not hft  # every run gets its own callbacks
    (l2,) = method_config.build_method("l2_prev_1", 1e-3).callbacks
    assert isinstance(l2, L2ToPretrained) and l2.strength == 1.0 and l2.anchor == "previous_stage"
    lora = method_config.build_method("lora_64", 1e-3).peft
    assert (lora.r, lora.lora_alpha, lora.target_modules, lora.lora_dropout) == (64, 128, "all-linear", 0.0)
    assert bench.POST_HOC["full_ft+lines"] == ("full_ft", "lines")
    assert bench.label("hft_once") == "HFT (once)" and not bench._is_recipe("lora_8") and bench._is_recipe("mofo_hft")


def test_a_method_file_with_an_option_its_class_does_not_take_is_refused_naming_it(tmp_path: Path) -> None:
    method_config = _method_config()
    path = tmp_path / "mine.yaml"
    path.write_text(
        "label: Mine\n"
        "model: {init_args: {optimizer: {class_path: torch.optim.AdamW}}}\n"
        "trainer: {callbacks: [{class_path: lit_mofo.HalfFineTuning, init_args: {ratio: 0.5, redraw: 3}}]}\n"
    )
    with pytest.raises(ValueError, match=r"(?s)mine.yaml: .*lit_mofo.HalfFineTuning.*Option 'redraw' is not accepted"):
        method_config.parse(str(path))
    path.write_text("label: Mine\ntrainer: {callbacks: []}\n")
    with pytest.raises(ValueError, match=r"a fitted method needs `model\.init_args\.optimizer`"):
        method_config.parse(str(path))
    path.write_text("model: {}\n")
    with pytest.raises(ValueError, match="a method file needs `label:"):
        method_config.method_info(str(path))


def test_a_method_file_given_by_path_is_a_method_named_by_its_path(tmp_path: Path) -> None:
    bench = _load_benchmark()
    path = tmp_path / "adamw_wd.yaml"
    path.write_text(
        "label: AdamW, weight decay 0.01\nmodel: {init_args: {optimizer: {class_path: torch.optim.AdamW, "
        "init_args: {weight_decay: 0.01}}}}\n"
    )
    assert bench._method_name(str(path)) == str(path)
    assert bench.label(str(path)) == "AdamW, weight decay 0.01" and bench.post_hoc_of(str(path)) is None
    assert bench._method_name("mofo_0.15") == "mofo_0.15"


def test_a_sigterm_arriving_in_a_multiprocessing_finaliser_still_stops_the_pool() -> None:
    """A SIGTERM while multiprocessing closes a finished run's pipes used to be swallowed by the finaliser ("Exception
    ignored in: <Finalize object>") and the benchmark ran on to the end; the pool now stops at its next turn."""
    script = textwrap.dedent(
        """
        import multiprocessing.util, os, signal, sys
        sys.path.insert(0, "benchmarks")
        import worker_pool

        signal.signal(signal.SIGTERM, worker_pool.exit_on_signal)
        class Owner: pass
        owner = Owner()
        multiprocessing.util.Finalize(owner, lambda: os.kill(os.getpid(), signal.SIGTERM))()
        print("after the finaliser", flush=True)
        worker_pool.run_all(["a", "b"], 0, lambda spec: {"spec": spec}, lambda result: print("ran", result))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + 15, result.stderr[-3000:]
    assert result.stdout == "after the finaliser\n" and "Exception ignored" not in result.stderr
