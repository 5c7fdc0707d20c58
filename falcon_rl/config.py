"""Typed configuration of a training run, loaded from YAML and the command line.

Every field has a default, a help string and, where the values form a closed
set, its allowed values. ``TrainConfig.from_dict`` validates a mapping (from a
YAML file or from command-line overrides) and raises ``ConfigError`` with a
message naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or file that cannot be used."""


def _field(default: Any, help: str, choices: tuple[Any, ...] | None = None, **kwargs: Any) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class TrainConfig:
    """Configuration of one training run with a negative-mining scheduler.

    The defaults are the CPU-friendly ``tiny`` setting that trains on the
    embedded Flickr8k subset; GRIT-VLP's pretraining values (batch 128,
    search space 1,920, lr 1e-4) suit the ``base`` preset on a GPU.
    """

    # Data
    data: str | None = _field(None, "Dataset folder: Flickr8k's original layout or ALBEF/BLIP JSON "
                                    "annotations (train.json, val.json, test.json). Default: the embedded "
                                    "Flickr8k subset shipped with falcon-rl.")
    image_root: str | None = _field(None, "Folder that relative image paths of JSON annotations start from "
                                          "(default: the annotation folder).")

    # Model
    framework: str = _field("albef", "VLP framework that is trained.", ("albef", "blip2", "siglip"))
    preset: str = _field("tiny", "Model size preset: 'tiny' (CPU), 'base' (ViT-B/16 + BERT-base), "
                                 "'test' (the smallest, for the test suite).", ("tiny", "base", "test"))
    model_options: dict = _field({}, "Overrides of the preset's model fields (YAML mapping).")

    # Scheduler and environment
    scheduler: str = _field("ppo", "Negative-mining scheduler: a built-in name, 'policy:PATH', "
                                   "'module:Class' or 'path/to/file.py:Class'.")
    scheduler_options: dict = _field({}, "Options passed to the scheduler's constructor.")
    reward: str = _field("auto", "Reward proxy: a loss on the batch before the update minus after it. 'auto' "
                                 "is the framework's default: mlm_gain (ALBEF), itg_gain (BLIP-2), itc_gain "
                                 "(SigLIP).", ("auto", "mlm_gain", "itc_gain", "itm_gain", "itg_gain"))
    action_space: str = _field("discrete", "Hardness actions: discrete levels or a continuous value in [0, 1].",
                               ("discrete", "continuous"))
    n_levels: int = _field(11, "Number of evenly spaced hardness levels of the discrete action space.")

    # Mining
    batch_size: int = _field(64, "Pairs per mini-batch: half anchors, half their mined negatives.")
    search_space: int = _field(1024, "Unplaced pairs, in epoch order, that an anchor's negatives come from.")
    top_k: int = _field(16, "Candidates per anchor returned by the nearest-neighbour search.")
    search_backend: str = _field("faiss", "Nearest-neighbour search backend.", ("faiss", "torch"))
    background_search: bool = _field(True, "Search the next step's candidates in a background thread while the "
                                           "current step trains; the batches are the same as with inline search.")
    bank_init: str = _field("encode", "'encode': fill the embedding bank with one pass over the training "
                                      "set at the start; 'random': random unit vectors.", ("encode", "random"))
    fn_filter: str | None = _field(None, "MAFA-style false-negative filter 'itm:THRESHOLD': candidates whose ITM "
                                         "match probability under the current model exceeds THRESHOLD are "
                                         "skipped. Works with any scheduler; 'mafa-filter' turns it on at 0.5.")
    fn_sentence_threshold: float | None = _field(None, "Also count a mined negative as a likely false "
                                                       "negative when its caption's sentence-embedding cosine "
                                                       "with the anchor's caption is at least this value.")

    augment: str = _field("flip-shift", "Training image augmentation: 'flip-shift' flips each image left-right "
                                        "with probability 1/2 and shifts it by up to 1/8 of its size.",
                          ("flip-shift", "none"))

    # Optimisation
    steps: int | None = _field(None, "Optimizer steps to train (default: 200 when --epochs is not given).")
    epochs: float | None = _field(None, "Epochs to train, converted to steps from the epoch length.")
    lr: float = _field(3e-4, "Peak AdamW learning rate.")
    weight_decay: float = _field(0.02, "AdamW weight decay.")
    warmup_steps: int = _field(20, "Linear warm-up steps before the cosine decay.")
    grad_clip: float = _field(5.0, "Gradient norm clipping threshold (0 turns clipping off).")
    seed: int = _field(0, "Seed of the model initialisation, data order and every random generator.")
    deterministic: bool = _field(False, "Use deterministic algorithms, so a resumed run matches an "
                                        "uninterrupted one.")
    max_nonfinite_steps: int = _field(20, "Stop with exit code 3 after this many consecutive steps "
                                          "skipped for non-finite loss or gradients.")

    # Hardware
    device: str = _field("auto", "'auto' picks CUDA when available.", ("auto", "cpu", "cuda"))
    precision: str = _field("auto", "'auto' is fp32 on CPU and bf16 on CUDA.", ("auto", "fp32", "bf16", "fp16"))
    num_threads: int | None = _field(None, "torch CPU threads (default: torch's choice).")

    # Evaluation, logging and checkpoints
    eval_every: int = _field(100, "Evaluate on the validation split every N steps (0: only at the end).")
    itm_rerank: int = _field(0, "Re-rank the top K of the ITC ranking with ITM scores (0: off).")
    output: str | None = _field(None, "Run directory (default: runs/<time>-<scheduler>-seed<seed>).")
    checkpoint_every: int = _field(200, "Write a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = _field(2, "Number of newest checkpoints kept.")
    progress: bool = _field(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        self.validate()

    # NOTE: validation is deliberately explicit: one check per rule, each
    # naming the field, so a bad YAML value points at its own line.
    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                allowed = ", ".join(map(str, choices))
                raise ConfigError(f"invalid value for {f.name}: {value!r} (allowed: {allowed})")
        positive = ("n_levels", "batch_size", "search_space", "top_k", "max_nonfinite_steps", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"invalid value for {name}: {getattr(self, name)!r} (must be at least 1)")
        if self.n_levels < 2:
            raise ConfigError(f"invalid value for n_levels: {self.n_levels!r} (must be at least 2)")
        if self.batch_size < 2:
            raise ConfigError(f"invalid value for batch_size: {self.batch_size!r} (must be at least 2)")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("steps and epochs are both set; give only one of them")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"invalid value for steps: {self.steps!r} (must be at least 1)")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"invalid value for epochs: {self.epochs!r} (must be positive)")
        for name in ("lr", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"invalid value for {name}: {getattr(self, name)!r} (must not be negative)")
        for name in ("warmup_steps", "eval_every", "itm_rerank", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"invalid value for {name}: {getattr(self, name)!r} (must not be negative)")
        if self.reward == "auto":
            self.reward = DEFAULT_REWARDS[self.framework]
        if self.scheduler == "mafa-filter" and self.fn_filter is None:
            self.fn_filter = f"itm:{MAFA_DEFAULT_THRESHOLD}"
        if self.fn_filter is not None:
            self.fn_filter_threshold()
        if self.fn_sentence_threshold is not None and not -1.0 <= self.fn_sentence_threshold <= 1.0:
            raise ConfigError(f"invalid value for fn_sentence_threshold: {self.fn_sentence_threshold!r} "
                              "(a cosine similarity in [-1, 1])")

    def fn_filter_threshold(self) -> float | None:
        """The ITM threshold of ``fn_filter``, or None when filtering is off."""
        if self.fn_filter is None:
            return None
        kind, _, value = self.fn_filter.partition(":")
        try:
            threshold = float(value)
        except ValueError:
            threshold = float("nan")
        if kind != "itm" or not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"invalid value for fn_filter: {self.fn_filter!r} (expected itm:THRESHOLD with "
                              "THRESHOLD a probability in [0, 1], e.g. itm:0.5)")
        return threshold

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown configuration field(s): {', '.join(unknown)} "
                              f"(allowed: {', '.join(sorted(known))})")
        converted = {name: _convert(known[name], value) for name, value in values.items()}
        return cls(**converted)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        values = load_yaml_mapping(path)
        values.update(overrides or {})
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Return the run's optimizer-step budget."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, round(self.epochs * steps_per_epoch))
        return DEFAULT_STEPS


DEFAULT_STEPS = 200
MAFA_DEFAULT_THRESHOLD = 0.5
DEFAULT_REWARDS = {"albef": "mlm_gain", "blip2": "itg_gain", "siglip": "itc_gain"}


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that holds one mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field names to values, "
                          f"not a {type(values).__name__}")
    return values


def _convert(f: dataclasses.Field, value: Any) -> Any:
    """Coerce a YAML or command-line value to the field's type, naming the field on failure."""
    annotation = str(f.type)
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"invalid value for {f.name}: null (a value is required)")
    try:
        if annotation.startswith("bool"):
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if annotation.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if annotation.startswith("float"):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if annotation.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if annotation.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        kind = annotation.split(" ")[0]
        raise ConfigError(f"invalid value for {f.name}: {value!r} (expected {kind})") from None
    return value
