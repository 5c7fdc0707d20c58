"""Tests of ``falcon-rl sweep`` and ``experiments/report.py``: runs, re-runs, failures, report tables."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from experiments import report, sweep
from experiments.cli import main
from experiments.report import RunResult

REPOSITORY = Path(__file__).resolve().parents[1]
FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k"
FAST_TRAIN = ["--preset", "test", "--batch-size", "16", "--search-space", "128", "--top-k", "8", "--eval-every", "0",
              "--warmup-steps", "0", "--bank-init", "random"]
FINISHED_RUNS = ("albef-hardest-seed0", "albef-random-seed0", "albef-hardest-seed1", "albef-random-seed1")
STOPPED_RUN = "albef-hardest-seed0"  # its metrics.json is deleted before the second sweep
PLUGIN = """
from agents.heuristics import Hardest


class Flaky(Hardest):
    name = "flaky"
"""


# -- one sweep, then the same command again ------------------------------------------

@dataclass
class SweepResult:
    code: int
    rows: list[dict[str, str]]
    summary: str
    plots: list[str]
    metrics_mtimes: dict[str, int]


def read_result(output: Path, code: int) -> SweepResult:
    with open(output / "results.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    mtimes = {path.parent.name: path.stat().st_mtime_ns for path in (output / "runs").glob("*/metrics.json")}
    return SweepResult(code=code, rows=rows, summary=(output / "summary.md").read_text(encoding="utf-8"),
                       plots=sorted(path.name for path in (output / "plots").glob("*.png")), metrics_mtimes=mtimes)


@pytest.fixture(scope="module")
def sweep_case(tmp_path_factory):
    """A sweep of hardest and random (2 seeds, 3 steps) plus a plugin scheduler whose file is missing at first."""
    root = tmp_path_factory.mktemp("sweep")
    plugin = root / "plugin" / "flaky.py"
    sweep_file = root / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "schedulers": ["hardest", "random", {"name": f"{plugin}:Flaky", "label": "flaky"}],
        "seeds": [0, 1], "steps": 3}), encoding="utf-8")
    output = root / "out"
    argv = ["sweep", "--sweep", str(sweep_file), "--jobs", "2", "--no-progress", "--output", str(output),
            "--", *FAST_TRAIN]
    return root, output, argv, plugin


@pytest.fixture(scope="module")
def first_sweep(sweep_case):
    _, output, argv, _ = sweep_case
    return read_result(output, main(argv))


@pytest.fixture(scope="module")
def second_sweep(sweep_case, first_sweep):
    """The same command again, after making one finished run look stopped and creating the plugin file."""
    _, output, argv, plugin = sweep_case
    (output / "runs" / STOPPED_RUN / "metrics.json").unlink()
    plugin.parent.mkdir(parents=True, exist_ok=True)
    plugin.write_text(PLUGIN, encoding="utf-8")
    return read_result(output, main(argv))


def rows_by_run(result: SweepResult) -> dict[str, dict[str, str]]:
    return {f"albef-{row['scheduler']}-seed{row['seed']}": row for row in result.rows}


@pytest.mark.slow
def test_sweep_finishes_both_schedulers_and_seeds(first_sweep):
    finished = sorted(name for name, row in rows_by_run(first_sweep).items() if row["status"] == "finished")
    assert finished == sorted(FINISHED_RUNS)


@pytest.mark.slow
def test_sweep_records_missing_plugin_as_failed(first_sweep):
    rows = rows_by_run(first_sweep)
    assert [rows[f"albef-flaky-seed{seed}"]["status"] for seed in (0, 1)] == ["failed", "failed"]


@pytest.mark.slow
def test_sweep_failed_row_carries_error(first_sweep):
    assert "flaky.py" in rows_by_run(first_sweep)["albef-flaky-seed0"]["error"]


@pytest.mark.slow
def test_sweep_exits_one_when_a_run_failed(first_sweep):
    assert first_sweep.code == 1


@pytest.mark.slow
def test_sweep_results_have_test_and_val_metrics(first_sweep):
    row = rows_by_run(first_sweep)["albef-hardest-seed0"]
    assert [key for key in ("rsum", "val_rsum", "mean_hardness", "wall_seconds") if not row[key]] == []


@pytest.mark.slow
def test_sweep_results_columns_start_and_end_fixed(first_sweep):
    columns = list(first_sweep.rows[0])
    assert columns[:4] + columns[-2:] == ["framework", "scheduler", "seed", "status", "wall_seconds", "error"]


@pytest.mark.slow
def test_sweep_summary_has_intervals(first_sweep):
    assert "±" in first_sweep.summary


@pytest.mark.slow
def test_sweep_summary_lists_failed_run(first_sweep):
    assert "albef-flaky-seed1 | failed" in first_sweep.summary


@pytest.mark.slow
def test_sweep_summary_compares_with_hardest(first_sweep):
    assert "| random | test RSUM |" in first_sweep.summary


@pytest.mark.slow
def test_sweep_writes_plots(first_sweep):
    expected = ["fn-rate-vs-hardness.png", "fn_rsum.png", "hardness.png", "rsum.png", "val_rsum.png"]
    assert first_sweep.plots == expected


@pytest.mark.slow
def test_sweep_plots_are_png(sweep_case, first_sweep):
    _, output, _, _ = sweep_case
    assert (output / "plots" / "val_rsum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sweep_gives_runs_their_own_log(sweep_case, first_sweep):
    _, output, _, _ = sweep_case
    assert "--seed 1" in (output / "runs" / "albef-random-seed1" / "log.txt").read_text(encoding="utf-8")


@pytest.mark.slow
def test_sweep_splits_threads_between_jobs(sweep_case, first_sweep):
    _, output, _, _ = sweep_case
    record = json.loads((output / "runs" / "albef-random-seed1" / report.RUN_RECORD).read_text())
    cores = len(os.sched_getaffinity(0))
    assert record["command"][record["command"].index("--num-threads") + 1] == str(max(1, cores // 2))


@pytest.mark.slow
def test_rerun_exits_zero_once_all_finish(second_sweep):
    assert second_sweep.code == 0


@pytest.mark.slow
def test_rerun_skips_finished_runs(first_sweep, second_sweep):
    untouched = [name for name in FINISHED_RUNS if name != STOPPED_RUN]
    assert {name: second_sweep.metrics_mtimes[name] for name in untouched} == \
        {name: first_sweep.metrics_mtimes[name] for name in untouched}


@pytest.mark.slow
def test_rerun_resumes_stopped_run(sweep_case, second_sweep):
    _, output, _, _ = sweep_case
    info = json.loads((output / "runs" / STOPPED_RUN / "run_info.json").read_text())
    assert len(info.get("resumed", [])) == 1


@pytest.mark.slow
def test_rerun_resume_finishes_stopped_run(second_sweep):
    assert rows_by_run(second_sweep)[STOPPED_RUN]["status"] == "finished"


@pytest.mark.slow
def test_rerun_retries_failed_run(second_sweep):
    rows = rows_by_run(second_sweep)
    assert [rows[f"albef-flaky-seed{seed}"]["status"] for seed in (0, 1)] == ["finished", "finished"]


@pytest.mark.slow
def test_rerun_moves_failed_attempt_aside(sweep_case, second_sweep):
    _, output, _, _ = sweep_case
    attempt = output / sweep.PREVIOUS_ATTEMPTS / "albef-flaky-seed0-attempt1"
    assert json.loads((attempt / report.RUN_RECORD).read_text())["exit_code"] == 2


@pytest.mark.slow
def test_rerun_counts_attempts(sweep_case, second_sweep):
    _, output, _, _ = sweep_case
    record = json.loads((output / "runs" / "albef-flaky-seed0" / report.RUN_RECORD).read_text())
    assert record["attempt"] == 2


@pytest.mark.slow
def test_report_rebuilds_from_run_directories(sweep_case, second_sweep, capsys):
    _, output, _, _ = sweep_case
    (output / "summary.md").unlink()
    (output / "results.csv").unlink()
    code = report.main([str(output)])
    rebuilt = read_result(output, code)
    assert rebuilt.code == 0
    assert len(rebuilt.rows) == 6
    assert rebuilt.summary == second_sweep.summary


def test_report_rejects_directory_without_runs(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2


@pytest.mark.slow
def test_sweep_script_runs_from_a_clone(tmp_path):
    # From another directory, so only the script's own sys.path entry makes the packages importable.
    result = subprocess.run([sys.executable, str(REPOSITORY / "experiments" / "sweep.py"), "--schedulers", "nope",
                             "--seeds", "0", "--output", str(tmp_path / "out")], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert result.returncode == 2
    assert "unknown scheduler 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


# -- invalid input ----------------------------------------------------------------------

BAD_INPUTS = {
    "unknown scheduler": (["--schedulers", "hardest,nope", "--seeds", "0"], "unknown scheduler 'nope'"),
    "empty schedulers": (["--schedulers", ",", "--seeds", "0"], "invalid value for --schedulers"),
    "no seeds": (["--schedulers", "hardest"], "no seeds given"),
    "non-integer seed": (["--schedulers", "hardest", "--seeds", "0,x"], "invalid seed in --seeds: 'x'"),
    "repeated seed": (["--schedulers", "hardest", "--seeds", "1,1"], "invalid value for --seeds: 1"),
    "steps and epochs": (["--schedulers", "hardest", "--seeds", "0", "--steps", "3", "--epochs", "1"],
                         "--steps and --epochs are both given"),
    "unknown framework": (["--schedulers", "hardest", "--seeds", "0", "--frameworks", "clip"],
                          "invalid framework 'clip'"),
    "baseline not swept": (["--schedulers", "hardest", "--seeds", "0", "--baseline", "ppo"],
                           "invalid value for baseline: 'ppo'"),
    "zero jobs": (["--schedulers", "hardest", "--seeds", "0", "--jobs", "0"], "invalid value for --jobs: 0"),
    "seed after --": (["--schedulers", "hardest", "--seeds", "0", "--", "--seed", "3"], "use the sweep option --seeds"),
    "unknown train option": (["--schedulers", "hardest", "--seeds", "0", "--", "--bogus"],
                             "unknown train option(s) after --: --bogus"),
    "invalid train value": (["--schedulers", "hardest", "--seeds", "0", "--", "--lr", "-1"],
                            "invalid value for lr: -1.0"),
    "missing data": (["--schedulers", "hardest", "--seeds", "0", "--", "--data", "/nonexistent/flickr"],
                     "invalid value for data: '/nonexistent/flickr'"),
    "missing sweep file": (["--sweep", "nowhere.yaml"], "invalid value for --sweep: 'nowhere.yaml'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_sweep_rejects_bad_input_with_exit_2(case, tmp_path, capsys):
    options, message = BAD_INPUTS[case]
    code = main(["sweep", "--output", str(tmp_path / "out"), *options])
    error = capsys.readouterr().err
    assert code == 2
    assert message in error
    assert "Traceback" not in error


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_sweep_bad_input_creates_no_output(case, tmp_path, capsys):
    options, _ = BAD_INPUTS[case]
    main(["sweep", "--output", str(tmp_path / "out"), *options])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ({"schedulers": ["hardest"], "seeds": [0], "colour": 1}, "unknown key(s) in sweep file"),
    ({"schedulers": ["hardest", {"name": "fixed", "label": "hardest"}], "seeds": [0]}, "appear more than once"),
    ({"schedulers": ["hardest"], "seeds": [0], "train": {"seed": 3}}, "train sets 'seed'"),
    ({"schedulers": [{"name": "fixed", "options": 0.5}], "seeds": [0]}, "invalid options for scheduler 'fixed'"),
    ({"schedulers": [{"name": "fixed", "label": "a/b"}], "seeds": [0]}, "invalid label 'a/b'"),
    ({"schedulers": ["hardest"], "seeds": [0.5]}, "invalid seed in seeds: 0.5"),
    ({"schedulers": ["hardest"], "seeds": [0], "steps": 0}, "invalid value for steps: 0"),
])
def test_sweep_file_rejects_bad_content(content, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    code = main(["sweep", "--sweep", str(path), "--output", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err


# -- the specification ---------------------------------------------------------------------

def spec_for(values: dict, config: str | None = None, train_args: list[str] | None = None) -> sweep.SweepSpec:
    return sweep.build_spec(values, config, train_args or [])


def test_scheduler_entry_label_defaults_to_name_and_options():
    entry = sweep.parse_scheduler_entry({"name": "fixed", "options": {"q": 0.5}})
    assert entry.label == "fixed-q0.5"


def test_plugin_label_is_directory_safe():
    entry = sweep.parse_scheduler_entry("plugins/my_agent.py:Agent")
    assert entry.label == "plugins_my_agent.py_Agent"


def test_scheduler_name_accepts_plugin_syntax():
    sweep.check_scheduler_name("my_package.agents:Agent")


def test_spec_baseline_defaults_to_hardest():
    assert spec_for({"schedulers": ["ppo"], "seeds": [0]}).baseline == "hardest"


def test_scheduler_config_layers_in_order(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"lr": 0.1, "epochs": 2, "seed": 9, "output": "x", "scheduler": "ppo",
                                    "scheduler_options": {"n_steps": 4}}), encoding="utf-8")
    spec = spec_for({"schedulers": [{"name": "fixed", "options": {"q": 0.5}, "train": {"lr": 0.3}}], "seeds": [0],
                     "steps": 5, "train": {"lr": 0.2, "top_k": 4}}, config=str(base))
    config = sweep.scheduler_config(spec, "albef", spec.schedulers[0])
    assert config == {"lr": 0.3, "top_k": 4, "steps": 5, "framework": "albef", "scheduler": "fixed",
                      "scheduler_options": {"q": 0.5}, "progress": False}


def test_plan_runs_orders_seeds_outermost(tmp_path):
    spec = spec_for({"schedulers": ["hardest", "random"], "seeds": [3, 4]})
    names = [run.name for run in sweep.plan_runs(spec, tmp_path)]
    assert names == ["albef-hardest-seed3", "albef-random-seed3", "albef-hardest-seed4", "albef-random-seed4"]


def test_thread_count_respects_num_threads_option(tmp_path):
    spec = spec_for({"schedulers": ["hardest"], "seeds": [0]}, train_args=["--num-threads", "3"])
    assert sweep.thread_count(spec, sweep.plan_runs(spec, tmp_path), jobs=2) is None


def test_error_summary_picks_error_line(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("12:00 INFO loading\nfalcon-rl: error: invalid value for q: 7 (allowed: [0, 1])\n")
    assert sweep.error_summary(log)[0] == "invalid value for q: 7 (allowed: [0, 1])"


def test_error_summary_falls_back_to_traceback_end(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("Traceback (most recent call last):\n  File \"x\", line 1\nRuntimeError: boom\n")
    assert sweep.error_summary(log)[0] == "RuntimeError: boom"


# -- the shipped configuration files ---------------------------------------------------------

CONFIGS = REPOSITORY / "experiments" / "configs"


def test_default_config_matches_train_defaults():
    from falcon_rl.config import TrainConfig, load_yaml_mapping

    assert TrainConfig.from_dict(load_yaml_mapping(CONFIGS / "default.yaml")) == TrainConfig()


def test_compare_flickr8k_sweeps_nine_schedulers():
    spec = spec_for(sweep.load_sweep_file(str(CONFIGS / "compare-flickr8k.yaml")))
    assert [entry.label for entry in spec.schedulers] == ["ppo", "ucb", "linucb", "exp3", "hardest", "fixed-0.5",
                                                          "hardening", "mafa-filter", "random"]


def test_compare_flickr8k_budget_is_one_epoch():
    spec = spec_for(sweep.load_sweep_file("compare-flickr8k.yaml"))
    assert spec.seeds == [0, 1, 2]
    assert spec.steps == math.ceil(30_000 / 64)
    assert spec.schedulers[5].options == {"q": 0.5}


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason="the full Flickr8k corpus is not beside the repository")
def test_compare_flickr8k_configs_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(REPOSITORY)
    spec = spec_for(sweep.load_sweep_file("compare-flickr8k.yaml"))
    sweep.check_run_configs(sweep.plan_runs(spec, tmp_path), [])


def test_quick_compare_resolves(tmp_path):
    spec = spec_for(sweep.load_sweep_file("quick-compare"))
    sweep.check_run_configs(sweep.plan_runs(spec, tmp_path), [])
    assert [entry.label for entry in spec.schedulers] == ["hardest", "random", "ucb", "ppo"]
    assert spec.seeds == [0, 1]
    assert spec.steps == 20


# -- run status -------------------------------------------------------------------------------

def write_record(directory: Path, exit_code: int | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / report.RUN_RECORD).write_text(json.dumps({"exit_code": exit_code}))


def test_run_status_failed_on_error_exit(tmp_path):
    write_record(tmp_path, 2)
    assert report.run_status(tmp_path) == "failed"


def test_run_status_stopped_with_checkpoint(tmp_path):
    write_record(tmp_path, 143)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-5.pt").write_bytes(b"")
    assert report.run_status(tmp_path) == "stopped"


def test_run_status_incomplete_without_checkpoint(tmp_path):
    write_record(tmp_path, None)
    assert report.run_status(tmp_path) == "incomplete"


def test_run_status_finished_from_metrics(tmp_path):
    write_record(tmp_path, 0)
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "finished"}))
    assert report.run_status(tmp_path) == "finished"


# -- summary tables ---------------------------------------------------------------------------

def finished_run(scheduler: str, seed: int, **metrics: float) -> RunResult:
    return RunResult(name=f"albef-{scheduler}-seed{seed}", directory=Path("."), framework="albef",
                     scheduler=scheduler, seed=seed, status="finished", metrics=metrics)


# Hand-computed: values 10, 12, 14 have mean 12, standard deviation 2 and standard error
# 2 / sqrt(3) = 1.1547; t(0.975, df=2) = 4.3027, so the half-width is 4.9683.
PPO = [finished_run("ppo", seed, val_rsum=value, rsum=value + 1, mined_fn_rate=0.01 * (seed + 1))
       for seed, value in enumerate([10.0, 12.0, 14.0])]
# Against 9, 12, 12 the paired differences are 1, 0, 2: mean 1, standard deviation 1, standard
# error 0.57735, half-width 4.3027 * 0.57735 = 2.4841, t = 1.732 and, with the closed-form t CDF
# of 2 degrees of freedom, p = 2 * (1 - (1/2 + t / (2 sqrt(2 + t^2)))) = 0.2254.
HARDEST = [finished_run("hardest", seed, val_rsum=value, rsum=value) for seed, value in enumerate([9.0, 12.0, 12.0])]


def table_row(lines: list[str], scheduler: str) -> list[str]:
    row = next(line for line in lines if line.startswith(f"| {scheduler} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_metric_table_cell_is_mean_and_half_width():
    lines = report.metric_table({"ppo": PPO}, ["ppo"], report.VALIDATION_METRICS)
    assert table_row(lines, "ppo")[:3] == ["ppo", "3", "12.00 ± 4.97"]


def test_metric_table_bolds_requested_cell():
    lines = report.metric_table({"ppo": PPO}, ["ppo"], report.VALIDATION_METRICS, bold=("ppo", "val_rsum"))
    assert table_row(lines, "ppo")[2] == "**12.00 ± 4.97**"


def test_metric_table_scales_fn_rate_to_percent():
    lines = report.metric_table({"ppo": PPO}, ["ppo"], report.TRAINING_METRICS)
    # Rates 0.01, 0.02, 0.03 are 1, 2, 3 percent: mean 2, half-width 4.3027 * 1 / sqrt(3) = 2.48.
    assert table_row(lines, "ppo")[3] == "2.00 ± 2.48"


def test_metric_table_single_seed_has_no_interval():
    lines = report.metric_table({"ppo": PPO[:1]}, ["ppo"], report.VALIDATION_METRICS)
    assert table_row(lines, "ppo")[2] == "10.00 ± n/a"


def test_metric_table_missing_metric_is_na():
    lines = report.metric_table({"hardest": HARDEST}, ["hardest"], report.TRAINING_METRICS)
    assert table_row(lines, "hardest")[3] == "n/a"


def test_best_scheduler_uses_validation_not_test():
    better_on_test = [finished_run("random", seed, val_rsum=0.0, rsum=99.0) for seed in range(3)]
    assert report.best_scheduler({"ppo": PPO, "random": better_on_test}) == "ppo"


def test_paired_rows_mean_difference_and_interval():
    row = report.paired_rows({"ppo": PPO, "hardest": HARDEST}, ["hardest", "ppo"], "hardest")[0]
    assert row["metric"] == "validation RSUM"
    assert row["n"] == 3
    assert round(row["mean_diff"], 4) == 1.0
    assert round(row["ci_half_width"], 4) == 2.4841


def test_paired_rows_p_value():
    row = report.paired_rows({"ppo": PPO, "hardest": HARDEST}, ["hardest", "ppo"], "hardest")[0]
    assert round(row["p_value"], 4) == 0.2254


def test_paired_rows_use_shared_seeds_only():
    rows = report.paired_rows({"ppo": PPO, "hardest": HARDEST[:2]}, ["hardest", "ppo"], "hardest")
    assert rows[0]["seeds"] == [0, 1]
    assert rows[0]["mean_diff"] == 0.5


def test_paired_table_formats_difference():
    rows = report.paired_rows({"ppo": PPO, "hardest": HARDEST}, ["hardest", "ppo"], "hardest")
    assert report.paired_table(rows)[2] == "| ppo | validation RSUM | +1.00 ± 2.48 | 0.225 | 3 |"


def test_paired_table_without_shared_seed():
    other_seed = [finished_run("ppo", 7, val_rsum=1.0)]
    rows = report.paired_rows({"ppo": other_seed, "hardest": HARDEST}, ["hardest", "ppo"], "hardest")
    assert report.paired_table(rows)[2] == "| ppo | validation RSUM | n/a (no shared seed) | n/a | 0 |"


def test_summary_says_selection_uses_validation():
    text = report.render_summary([*PPO, *HARDEST], ["hardest", "ppo"], "hardest")
    assert "Selection uses the validation split only" in text


def test_summary_names_selected_scheduler():
    text = report.render_summary([*PPO, *HARDEST], ["hardest", "ppo"], "hardest")
    assert "Selected by validation RSUM: **ppo** (its test RSUM: 13.00 ± 4.97)." in text


def test_summary_notes_missing_baseline():
    text = report.render_summary(PPO, ["ppo"], "hardest")
    assert "No finished `hardest` run for albef" in text
