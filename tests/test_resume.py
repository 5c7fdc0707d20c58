"""Tests of checkpoints, signals, resuming, non-finite stops and data-order edge cases.

The stop-and-resume tests compare a run stopped after step 5 and resumed with
the same run never stopped: every test metric and every step's loss, reward
and mean hardness must agree to 1e-6. The trainer's test hook
``FALCON_RL_STOP_AFTER_STEP`` makes it send itself the signal right after a
given step, so the stop goes through the real signal handler at an exact step.
Runs use a JSON dataset of 24 Flickr8k training images (120 pairs, 8 steps per
epoch at batch 16), so 12 steps also cross an epoch boundary.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import falcon_rl.data
from experiments.cli import main
from experiments.trainer import STOP_AFTER_STEP_VARIABLE, Stopped, Trainer, resume_config
from falcon_rl.config import ConfigError, TrainConfig
from falcon_rl.data import ImageTextPairs
from falcon_rl.training import NonFiniteError
from falcon_rl.training import checkpoint as ckpt

REPOSITORY = Path(__file__).resolve().parents[1]
EMBEDDED = Path(falcon_rl.data.__file__).resolve().parent / "flickr8k_mini"
STEPS = 12
STOP_AFTER = 5
COMMON = ["--preset", "test", "--batch-size", "16", "--search-space", "128", "--top-k", "8", "--eval-every", "4",
          "--no-progress", "--num-threads", "1", "--deterministic", "--seed", "3", "--checkpoint-every", "3",
          "--warmup-steps", "2", "--steps", str(STEPS)]
SCHEDULERS = {"ppo": ["--scheduler", "ppo", "--scheduler-opt", "n_steps=4"], "ucb": ["--scheduler", "ucb"]}
IGNORED_METRICS = {"wall_seconds"}
HISTORY_FIELDS = ("loss", "reward", "mean_hardness", "mined_fn_rate")


# -- helpers ----------------------------------------------------------------

def write_json_dataset(folder: Path, n_train: int, n_val: int, n_test: int) -> Path:
    """Write ALBEF-style JSON splits that point at the first images of the embedded Flickr8k subset."""
    captions: dict[str, list[str]] = {}
    for line in (EMBEDDED / "Flickr8k_text" / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, text = line.split("\t", 1)
        captions.setdefault(key.split("#")[0], []).append(text)
    lists = {"train": ("Flickr_8k.trainImages.txt", n_train), "val": ("Flickr_8k.devImages.txt", n_val),
             "test": ("Flickr_8k.testImages.txt", n_test)}
    folder.mkdir(parents=True, exist_ok=True)
    for split, (list_file, count) in lists.items():
        names = (EMBEDDED / "Flickr8k_text" / list_file).read_text(encoding="utf-8").split()[:count]
        entries = [{"image": str(EMBEDDED / "Flicker8k_Dataset" / name), "caption": captions[name], "image_id": name}
                   for name in names]
        (folder / f"{split}.json").write_text(json.dumps(entries), encoding="utf-8")
    return folder


def first_images(pairs: ImageTextPairs, n_images: int) -> ImageTextPairs:
    """The pairs of the first ``n_images`` images of ``pairs``."""
    keep = pairs.image_ids < n_images
    return ImageTextPairs(
        split=pairs.split,
        images=pairs.images[:n_images],
        image_names=pairs.image_names[:n_images],
        captions=[caption for caption, kept in zip(pairs.captions, keep) if kept],
        caption_keys=[key for key, kept in zip(pairs.caption_keys, keep) if kept],
        image_ids=pairs.image_ids[keep],
        human_matches=None,
    )


@contextmanager
def stop_after(step: int, signal_name: str = "SIGTERM") -> Iterator[None]:
    os.environ[STOP_AFTER_STEP_VARIABLE] = f"{step}:{signal_name}"
    try:
        yield
    finally:
        del os.environ[STOP_AFTER_STEP_VARIABLE]


@contextmanager
def captured_logs(name: str = "") -> Iterator[list[logging.LogRecord]]:
    """Collect the log records of logger ``name`` (a module fixture cannot use ``caplog``)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    target = logging.getLogger(name)
    previous_level = target.level
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        target.removeHandler(handler)
        target.setLevel(previous_level)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPOSITORY, env={**os.environ, **(env or {})})


def read_metrics(directory: Path) -> dict:
    return json.loads((directory / "metrics.json").read_text(encoding="utf-8"))


def read_history(directory: Path) -> list[dict]:
    return json.loads((directory / "history.json").read_text(encoding="utf-8"))["steps"]


def read_validation_rsums(directory: Path) -> list[tuple[int, float]]:
    validation = json.loads((directory / "history.json").read_text(encoding="utf-8"))["validation"]
    return [(entry["step"], round(entry["rsum"], 6)) for entry in validation]


def metric_mismatches(expected: dict, actual: dict) -> list[str]:
    """Names of metrics that differ by more than 1e-6 (or in kind)."""
    wrong = []
    for name, value in expected.items():
        if name in IGNORED_METRICS:
            continue
        other = actual.get(name)
        if isinstance(value, (int, float)) and isinstance(other, (int, float)):
            if abs(value - other) > 1e-6:
                wrong.append(f"{name}: {value} != {other}")
        elif value != other:
            wrong.append(f"{name}: {value!r} != {other!r}")
    return wrong


def history_mismatches(expected: list[dict], actual: list[dict]) -> list[str]:
    """Steps whose loss, reward, mean hardness or mined FN rate differ by more than 1e-6."""
    if [entry["step"] for entry in expected] != [entry["step"] for entry in actual]:
        return [f"steps {[e['step'] for e in expected]} != {[e['step'] for e in actual]}"]
    wrong = []
    for before, after in zip(expected, actual):
        for field in HISTORY_FIELDS:
            a, b = before[field], after[field]
            if (a is None) != (b is None) or (a is not None and abs(a - b) > 1e-6):
                wrong.append(f"step {before['step']} {field}: {a} != {b}")
    return wrong


def scalar_steps(directory: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def scalar_values(directory: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


def checkpoint_steps(directory: Path) -> list[int]:
    return [step for step, _ in ckpt.list_checkpoints(directory / "checkpoints")]


# -- fixtures: one uninterrupted run per scheduler, and stopped runs -------------

@pytest.fixture(scope="module", autouse=True)
def restore_thread_count() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_json_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train=24, n_val=10, n_test=10)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per scheduler."""
    directories = {}
    for name, options in SCHEDULERS.items():
        directory = tmp_path_factory.mktemp(f"reference-{name}") / "run"
        assert main(["train", "--data", str(dataset), *COMMON, *options, "--output", str(directory)]) == 0
        directories[name] = directory
    return directories


@pytest.fixture(scope="module")
def ppo_resumed(dataset, tmp_path_factory) -> dict:
    """PPO stopped by SIGTERM after step 5 in a ``falcon-rl train`` process, then resumed in this one."""
    directory = tmp_path_factory.mktemp("ppo-stopped") / "run"
    stopped = run_cli("train", "--data", str(dataset), *COMMON, *SCHEDULERS["ppo"], "--output", str(directory),
                      env={STOP_AFTER_STEP_VARIABLE: str(STOP_AFTER)})
    after_stop = {"checkpoints": checkpoint_steps(directory), "metrics": (directory / "metrics.json").exists()}
    code = main(["train", "--resume", str(directory)])
    return {"directory": directory, "stopped": stopped, "resume_code": code, **after_stop}


@pytest.fixture(scope="module")
def ucb_stopped(dataset, tmp_path_factory) -> dict:
    """UCB stopped in this process by SIGINT after step 5; a copy of the stopped run is kept aside."""
    directory = tmp_path_factory.mktemp("ucb-stopped") / "run"
    with stop_after(STOP_AFTER, "SIGINT"):
        code = main(["train", "--data", str(dataset), *COMMON, *SCHEDULERS["ucb"], "--output", str(directory)])
    copy = tmp_path_factory.mktemp("ucb-copy") / "run"
    shutil.copytree(directory, copy)
    return {"directory": directory, "code": code, "copy": copy}


@pytest.fixture(scope="module")
def ucb_resumed(ucb_stopped) -> Path:
    assert main(["train", "--resume", str(ucb_stopped["directory"])]) == 0
    return ucb_stopped["directory"]


@pytest.fixture(scope="module")
def corrupt_resumed(ucb_stopped, tmp_path_factory) -> dict:
    """The stopped UCB run with its newest checkpoint (step 5) truncated, resumed from step 3."""
    directory = tmp_path_factory.mktemp("ucb-corrupt") / "run"
    shutil.copytree(ucb_stopped["copy"], directory)
    newest = directory / "checkpoints" / f"step-{STOP_AFTER}.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with captured_logs() as records:
        code = main(["train", "--resume", str(directory)])
    messages = [record.getMessage() for record in records if record.levelno >= logging.WARNING]
    return {"directory": directory, "code": code, "messages": messages, "newest": newest}


# -- stop and resume: exact continuation -------------------------------------------

def test_sigterm_stop_exits_143(ppo_resumed):
    assert ppo_resumed["stopped"].returncode == 143, ppo_resumed["stopped"].stderr[-2000:]


def test_sigterm_stop_checkpoints_the_stopped_step(ppo_resumed):
    assert ppo_resumed["checkpoints"] == [3, STOP_AFTER]


def test_sigterm_stop_writes_no_metrics(ppo_resumed):
    assert ppo_resumed["metrics"] is False


def test_sigterm_resume_exits_zero(ppo_resumed):
    assert ppo_resumed["resume_code"] == 0


def test_sigterm_resume_ppo_metrics_equal_uninterrupted(ppo_resumed, reference):
    assert metric_mismatches(read_metrics(reference["ppo"]), read_metrics(ppo_resumed["directory"])) == []


def test_sigterm_resume_ppo_steps_equal_uninterrupted(ppo_resumed, reference):
    assert history_mismatches(read_history(reference["ppo"]), read_history(ppo_resumed["directory"])) == []


def test_sigterm_resume_ppo_validation_equal_uninterrupted(ppo_resumed, reference):
    assert read_validation_rsums(ppo_resumed["directory"]) == read_validation_rsums(reference["ppo"])


def test_sigterm_resume_tensorboard_has_each_step_once(ppo_resumed):
    assert scalar_steps(ppo_resumed["directory"], "loss/total") == list(range(1, STEPS + 1))


def test_sigint_stop_exits_130(ucb_stopped):
    assert ucb_stopped["code"] == 130


def test_sigint_resume_ucb_metrics_equal_uninterrupted(ucb_resumed, reference):
    assert metric_mismatches(read_metrics(reference["ucb"]), read_metrics(ucb_resumed)) == []


def test_sigint_resume_ucb_steps_equal_uninterrupted(ucb_resumed, reference):
    assert history_mismatches(read_history(reference["ucb"]), read_history(ucb_resumed)) == []


def test_finished_run_keeps_newest_checkpoints(reference):
    assert checkpoint_steps(reference["ucb"]) == [9, 12]


def test_finished_run_metrics_status_finished(reference):
    assert read_metrics(reference["ppo"])["status"] == "finished"


def test_resume_finished_run_says_so_and_exits_0(reference, capsys):
    code = main(["train", "--resume", str(reference["ppo"])])
    assert code == 0
    assert "already finished" in capsys.readouterr().out


# -- corrupt, foreign, incompatible and interrupted checkpoints ---------------------

def test_corrupt_newest_checkpoint_resume_exits_zero(corrupt_resumed):
    assert corrupt_resumed["code"] == 0


def test_corrupt_newest_checkpoint_one_message_names_it(corrupt_resumed):
    naming = [message for message in corrupt_resumed["messages"] if str(corrupt_resumed["newest"]) in message]
    assert len(naming) == 1


def test_corrupt_newest_checkpoint_falls_back_exactly(corrupt_resumed, reference):
    assert metric_mismatches(read_metrics(reference["ucb"]), read_metrics(corrupt_resumed["directory"])) == []


def test_corrupt_newest_checkpoint_tensorboard_repeats_no_step(corrupt_resumed):
    # Steps 4 and 5 were logged before the stop and again after resuming from step 3.
    assert scalar_steps(corrupt_resumed["directory"], "loss/total") == list(range(1, STEPS + 1))


def test_corrupt_newest_checkpoint_tensorboard_repeats_no_evaluation(corrupt_resumed):
    assert scalar_steps(corrupt_resumed["directory"], "eval/val_rsum") == [4, 8, STEPS]


def test_foreign_checkpoint_file_rejected_naming_it(tmp_path):
    path = tmp_path / "step-1.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ckpt.CheckpointError, match="not a falcon-rl checkpoint") as error:
        ckpt.load_checkpoint(path)
    assert str(path) in str(error.value)


def test_pickled_object_checkpoint_rejected_without_running_it(tmp_path):
    path = tmp_path / "step-1.pt"
    torch.save({"format": ckpt.FORMAT_NAME, "payload": io.StringIO("pickled object")}, path)
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(path)


def test_no_loadable_checkpoint_resume_exits_2(ucb_stopped, tmp_path, capsys):
    directory = tmp_path / "run"
    shutil.copytree(ucb_stopped["copy"], directory)
    for _, path in ckpt.list_checkpoints(directory / "checkpoints"):
        path.write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(directory)]) == 2
    assert "no loadable checkpoint" in capsys.readouterr().err


def test_incompatible_config_rejected_naming_fields(ucb_stopped, tmp_path, capsys):
    directory = tmp_path / "run"
    shutil.copytree(ucb_stopped["copy"], directory)
    config = yaml.safe_load((directory / "config.yaml").read_text(encoding="utf-8"))
    config.update(top_k=4, lr=0.01)
    (directory / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", "--resume", str(directory)]) == 2
    error = capsys.readouterr().err
    assert "top_k (8 in the checkpoint, 4 now)" in error
    assert "lr (" in error
    assert "batch_size (" not in error


@pytest.mark.parametrize("option, value", [("--lr", "0.1"), ("--scheduler-opt", "c=2"), ("--seed", "4")])
def test_resume_with_other_option_exits_2_naming_it(reference, capsys, option, value):
    assert main(["train", "--resume", str(reference["ucb"]), option, value]) == 2
    assert option in capsys.readouterr().err


def test_fresh_run_into_directory_with_checkpoints_exits_2(reference, dataset, capsys):
    code = main(["train", "--data", str(dataset), *COMMON, "--output", str(reference["ucb"])])
    assert code == 2
    assert "--resume" in capsys.readouterr().err


# Loads checkpoint.py by path: importing the falcon_rl.training package would load the whole model stack.
WRITER = textwrap.dedent("""
    import importlib.util, io, sys, time
    from pathlib import Path
    import torch

    spec = importlib.util.spec_from_file_location("checkpoint", sys.argv[2])
    ckpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ckpt)

    real_save = torch.save

    def half_save(payload, stream):
        buffer = io.BytesIO()
        real_save(payload, buffer)
        data = buffer.getvalue()
        stream.write(data[: len(data) // 2])
        stream.flush()
        print("half written", flush=True)
        time.sleep(600)

    torch.save = half_save
    ckpt.save_atomic({"format": ckpt.FORMAT_NAME, "marker": torch.ones(250_000)}, Path(sys.argv[1]))
""")


@pytest.fixture(scope="module")
def killed_writer(tmp_path_factory) -> Path:
    """A checkpoint folder whose writer was SIGKILLed halfway through overwriting ``step-3.pt``."""
    folder = tmp_path_factory.mktemp("killed") / "checkpoints"
    payload = {"format": ckpt.FORMAT_NAME, "version": ckpt.FORMAT_VERSION, "marker": torch.zeros(250_000),
               **{key: {} for key in ckpt.PAYLOAD_KEYS}}
    ckpt.save_atomic(payload, folder / "step-3.pt")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder / "step-3.pt"), ckpt.__file__],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "half written"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    return folder


def test_killed_writer_leaves_previous_checkpoint_loadable(killed_writer):
    payload, path = ckpt.load_newest_valid(killed_writer)
    assert float(payload["marker"].sum()) == 0.0


def test_killed_writer_leaves_only_a_hidden_temporary_file(killed_writer):
    names = sorted(path.name for path in killed_writer.iterdir())
    assert len(names) == 2
    assert names[1] == "step-3.pt"
    assert names[0].startswith(".step-3.pt.") and names[0].endswith(".tmp")


def test_prune_deletes_interrupted_temporary_file(killed_writer, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(killed_writer, folder)
    ckpt.prune_checkpoints(folder, keep=2)
    assert sorted(path.name for path in folder.iterdir()) == ["step-3.pt"]


# -- what a checkpoint contains -----------------------------------------------------

def test_checkpoint_loads_weights_only(reference):
    payload = torch.load(reference["ppo"] / "checkpoints" / f"step-{STEPS}.pt", weights_only=True)
    assert payload["format"] == ckpt.FORMAT_NAME


def test_checkpoint_run_state_parts(reference):
    payload = ckpt.load_checkpoint(reference["ppo"] / "checkpoints" / f"step-{STEPS}.pt")
    expected = {"framework", "optimizer", "lr_schedule", "scaler", "bank", "builder", "proposal", "counters"}
    assert set(payload["run"]) == expected


def test_checkpoint_ppo_state_has_buffer_optimizer_and_generators(reference):
    payload = ckpt.load_checkpoint(reference["ppo"] / "checkpoints" / "step-9.pt")
    from safetensors.torch import load as load_safetensors

    tensors = load_safetensors(payload["scheduler"]["state.safetensors"].numpy().tobytes())
    prefixes = {key.split(".")[0] for key in tensors}
    assert {"policy", "optimizer", "buffer", "rng", "last_obs"} <= prefixes


def test_checkpoint_holds_every_global_generator(reference):
    payload = ckpt.load_checkpoint(reference["ppo"] / "checkpoints" / f"step-{STEPS}.pt")
    assert {"python", "numpy", "torch"} <= set(payload["random"])


# -- non-finite values ----------------------------------------------------------------

RECORDING_SCHEDULER = textwrap.dedent("""
    import numpy as np
    from agents import Scheduler

    class RecordingScheduler(Scheduler):
        per_anchor = True
        option_defaults = {}

        def __init__(self, observation_space, action_space, **options):
            super().__init__(observation_space, action_space, **options)
            self.seen_observations = []
            self.seen_rewards = []

        def act(self, observation):
            self.seen_observations.append(np.array(observation))
            return np.full(len(observation), self.action_space.n - 1)

        def observe(self, reward, observation, terminated, truncated, info):
            self.seen_rewards.append(np.array(reward))
            self.seen_observations.append(np.array(observation))
""")


@pytest.fixture(scope="module")
def diverging(dataset, tmp_path_factory) -> dict:
    """An in-process run with lr 1e6 and a recording scheduler, stopped for non-finite values."""
    folder = tmp_path_factory.mktemp("diverging")
    plugin = folder / "recording.py"
    plugin.write_text(RECORDING_SCHEDULER, encoding="utf-8")
    config = TrainConfig(data=str(dataset), preset="test", batch_size=16, search_space=128, top_k=8, steps=30,
                         eval_every=0, progress=False, num_threads=1, lr=1e6, max_nonfinite_steps=3,
                         scheduler=f"{plugin}:RecordingScheduler", checkpoint_every=200)
    trainer = Trainer(config, folder / "run")
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    return {"trainer": trainer, "error": error.value, "directory": folder / "run"}


def test_nonfinite_stop_message_says_what(diverging):
    assert "consecutive steps had non-finite" in str(diverging["error"])


def test_nonfinite_stop_leaves_loadable_checkpoint(diverging):
    payload, _ = ckpt.load_newest_valid(diverging["directory"] / "checkpoints")
    assert payload["run"]["counters"]["skipped_steps"] >= 3


def test_nonfinite_scheduler_sees_finite_rewards(diverging):
    rewards = diverging["trainer"].scheduler.seen_rewards
    assert all(np.isfinite(reward).all() for reward in rewards)


def test_nonfinite_scheduler_sees_finite_observations(diverging):
    observations = diverging["trainer"].scheduler.seen_observations
    assert all(np.isfinite(observation).all() for observation in observations)


def test_nonfinite_skipped_steps_logged_to_tensorboard(diverging):
    skipped = diverging["trainer"].run.skipped_steps
    assert scalar_values(diverging["directory"], "loss/skipped_steps")[-1] == skipped


def test_nonfinite_cli_exits_3_without_traceback(dataset, tmp_path, capsys):
    code = main(["train", "--data", str(dataset), *COMMON[:-2], "--steps", "30", "--lr", "1e6",
                 "--max-nonfinite-steps", "3", "--scheduler", "hardest", "--output", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert code == 3
    assert "non-finite" in error
    assert "Traceback" not in error


# -- data order: epoch boundaries, odd and uneven batches, small datasets -------------

@pytest.fixture(scope="module")
def small_splits(embedded_splits) -> dict[str, ImageTextPairs]:
    """9 training images (45 pairs), so batch 7 leaves an uneven last batch each epoch."""
    return {"train": first_images(embedded_splits["train"], 9), "val": first_images(embedded_splits["val"], 6),
            "test": first_images(embedded_splits["test"], 6)}


@pytest.fixture(scope="module")
def small_config(small_splits, tmp_path_factory) -> TrainConfig:
    return TrainConfig(preset="test", batch_size=7, search_space=128, top_k=4, epochs=2, eval_every=0,
                       progress=False, num_threads=1, deterministic=True, seed=5, checkpoint_every=100,
                       scheduler="ucb", warmup_steps=0)


@pytest.fixture(scope="module")
def small_reference(small_splits, small_config, tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("small-reference") / "run"
    with captured_logs("falcon_rl") as records:
        trainer = Trainer(dataclasses.replace(small_config, output=str(directory)), directory, splits=small_splits)
    messages = [record.getMessage() for record in records]
    metrics = trainer.train()
    return {"directory": directory, "metrics": metrics, "history": trainer.history, "messages": messages,
            "total_steps": trainer.run.total_steps}


@pytest.fixture(scope="module")
def boundary_resumed(small_splits, small_config, small_reference, tmp_path_factory) -> dict:
    """The small run stopped right before the step that ends epoch 0, then resumed."""
    boundary = next(entry["step"] for entry in small_reference["history"] if entry["epoch_end"])
    directory = tmp_path_factory.mktemp("small-boundary") / "run"
    config = dataclasses.replace(small_config, output=str(directory))
    with stop_after(boundary - 1), pytest.raises(Stopped):
        Trainer(config, directory, splits=small_splits).train()
    trainer = Trainer(resume_config(directory, {}), directory, splits=small_splits)
    metrics = trainer.train(resume=True)
    return {"boundary": boundary, "metrics": metrics, "history": trainer.history, "directory": directory}


def test_small_run_has_uneven_last_batch(small_reference):
    last_of_epoch = next(entry for entry in small_reference["history"] if entry["epoch_end"])
    assert last_of_epoch["batch_size"] < 7


def test_small_run_clips_search_space_with_log_line(small_reference):
    assert any("clipped to 45" in message for message in small_reference["messages"])


def test_epoch_boundary_first_resumed_step_runs_whole_budget(boundary_resumed, small_reference):
    assert boundary_resumed["metrics"]["steps"] == small_reference["total_steps"]


def test_epoch_boundary_first_resumed_step_equal_uninterrupted(boundary_resumed, small_reference):
    assert history_mismatches(small_reference["history"], boundary_resumed["history"]) == []


def test_epoch_boundary_resume_metrics_equal_uninterrupted(boundary_resumed, small_reference):
    assert metric_mismatches(small_reference["metrics"], boundary_resumed["metrics"]) == []


def test_signal_at_last_step_stops_then_resume_finishes(small_splits, small_config, small_reference, tmp_path):
    directory = tmp_path / "run"
    config = dataclasses.replace(small_config, output=str(directory))
    with stop_after(small_reference["total_steps"]), pytest.raises(Stopped):
        Trainer(config, directory, splits=small_splits).train()
    assert not (directory / "metrics.json").exists()
    metrics = Trainer(resume_config(directory, {}), directory, splits=small_splits).train(resume=True)
    assert metric_mismatches(small_reference["metrics"], metrics) == []


def test_extend_finished_run_trains_extra_steps(small_splits, small_reference, tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(small_reference["directory"], directory)
    extended = small_reference["total_steps"] + 2
    trainer = Trainer(resume_config(directory, {"steps": extended}), directory, splits=small_splits)
    assert trainer.train(resume=True)["steps"] == extended


def test_extend_with_smaller_budget_rejected(small_splits, small_reference, tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(small_reference["directory"], directory)
    trainer = Trainer(resume_config(directory, {"steps": 2}), directory, splits=small_splits)
    with pytest.raises(ConfigError, match="larger --steps"):
        trainer.train(resume=True)


def test_dataset_smaller_than_batch_rejected_at_start(small_splits, small_config, tmp_path):
    with pytest.raises(ConfigError, match="fewer than one batch"):
        Trainer(dataclasses.replace(small_config, batch_size=64), tmp_path / "run", splits=small_splits)


def test_dataset_smaller_than_batch_cli_exits_2(dataset, tmp_path, capsys):
    code = main(["train", "--data", str(dataset), *COMMON, "--batch-size", "512", "--output", str(tmp_path / "r")])
    error = capsys.readouterr().err
    assert code == 2
    assert "fewer than one batch" in error
    assert "Traceback" not in error
