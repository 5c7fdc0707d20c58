"""End-to-end tests of the ``falcon-rl`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from experiments.cli import main

FAST = ["--preset", "test", "--batch-size", "16", "--search-space", "128", "--top-k", "8", "--eval-every", "3",
        "--no-progress", "--warmup-steps", "0"]
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "chance_rsum",
               "fn_i2t_r1", "fn_t2i_r10", "fn_rsum", "i2t_map_r", "t2i_map_r", "num_test_images",
               "num_test_captions", "steps", "skipped_steps", "wall_seconds", "mined_fn_rate", "mean_hardness")


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ppo") / "run"
    code = main(["train", *FAST, "--steps", "6", "--scheduler", "ppo", "--scheduler-opt", "n_steps=2",
                 "--output", str(directory)])
    return code, directory


def test_train_exits_zero(ppo_run):
    code, _ = ppo_run
    assert code == 0


def test_train_writes_finished_metrics(ppo_run):
    _, directory = ppo_run
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert [key for key in METRIC_KEYS if key not in metrics] == []


def test_train_writes_run_files(ppo_run):
    _, directory = ppo_run
    expected = ["config.yaml", "run_info.json", "checkpoints/step-6.pt", "policy/scheduler.json"]
    assert [name for name in expected if not (directory / name).exists()] == []


def test_train_records_command_line(ppo_run):
    _, directory = ppo_run
    info = json.loads((directory / "run_info.json").read_text())
    assert "--scheduler" in info["command"] and "torch" in info["packages"]


def test_train_event_files_have_tag_groups(ppo_run):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    _, directory = ppo_run
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(directory / "tensorboard"))
    multiplexer.Reload()
    tags = {tag for run in multiplexer.Runs().values() for tag in run.get("scalars", [])}
    groups = {tag.split("/")[0] for tag in tags}
    assert {"loss", "reward", "mining", "eval"} <= groups


def test_eval_reads_run_directory(ppo_run, capsys):
    _, directory = ppo_run
    assert main(["eval", "--checkpoint", str(directory), "--split", "val"]) == 0
    assert "RSUM" in capsys.readouterr().out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments", *args], capture_output=True, text=True,
                          timeout=300)


def test_missing_data_path_exits_2_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_cli("train", "--data", str(missing), *FAST)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_unknown_scheduler_exits_2_listing_known(tmp_path):
    result = run_cli("train", "--scheduler", "greedy", *FAST, "--output", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "greedy" in result.stderr and "hardest" in result.stderr and "Traceback" not in result.stderr


def test_steps_and_epochs_together_exit_2(tmp_path):
    assert main(["train", *FAST, "--steps", "2", "--epochs", "1", "--output", str(tmp_path / "run")]) == 2


def test_bad_choice_exits_2():
    with pytest.raises(SystemExit) as stop:
        main(["train", "--precision", "fp8"])
    assert stop.value.code == 2
