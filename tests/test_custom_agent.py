"""A user's scheduler class, named on the command line, drives a whole run."""

from __future__ import annotations

import json
import textwrap

import pytest

from experiments.cli import main

RECORDING_AGENT = textwrap.dedent('''
    import json

    import numpy as np

    from agents import Scheduler


    class RecordingScheduler(Scheduler):
        """Plays the lowest and the highest level in turn and records what it is given."""

        def __init__(self, observation_space, action_space, **options):
            super().__init__(observation_space, action_space, **options)
            self.observations, self.rewards, self.actions = 0, [], []

        def act(self, observation):
            assert observation.shape == self.observation_space.shape
            self.observations += 1
            action = 0 if len(self.actions) % 2 == 0 else int(self.action_space.n) - 1
            self.actions.append(action)
            return action

        def observe(self, reward, observation, terminated, truncated, info):
            self.observations += 1
            self.rewards.append(float(reward))

        def save(self, path):
            record = {"observations": self.observations, "rewards": self.rewards, "actions": self.actions}
            (path / "record.json").write_text(json.dumps(record))
''')


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("custom")
    (folder / "recording_agent.py").write_text(RECORDING_AGENT, encoding="utf-8")
    directory = folder / "run"
    code = main(["train", "--preset", "test", "--batch-size", "16", "--search-space", "128", "--top-k", "8",
                 "--steps", "6", "--eval-every", "0", "--no-progress", "--checkpoint-every", "0",
                 "--scheduler", f"{folder / 'recording_agent.py'}:RecordingScheduler", "--output", str(directory)])
    record = json.loads((directory / "policy" / "record.json").read_text())
    history = json.loads((directory / "history.json").read_text())
    metrics = json.loads((directory / "metrics.json").read_text())
    return code, record, history, metrics


def test_custom_scheduler_run_exits_zero(custom_run):
    assert custom_run[0] == 0


def test_custom_scheduler_sees_every_observation(custom_run):
    _, record, _, _ = custom_run
    assert record["observations"] == 2 * 6


def test_custom_scheduler_receives_every_reward(custom_run):
    _, record, history, _ = custom_run
    assert record["rewards"] == pytest.approx([step["reward"] for step in history["steps"]])


def test_custom_scheduler_choices_set_mean_hardness(custom_run):
    _, _, _, metrics = custom_run
    assert metrics["mean_hardness"] == pytest.approx(0.5)


def test_missing_plugin_class_exits_2(tmp_path, capsys):
    plugin = tmp_path / "empty_agent.py"
    plugin.write_text("X = 1\n", encoding="utf-8")
    code = main(["train", "--preset", "test", "--scheduler", f"{plugin}:Missing", "--output", str(tmp_path / "r")])
    assert code == 2
    assert "Missing" in capsys.readouterr().err
