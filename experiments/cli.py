"""The ``falcon-rl`` command: train, eval, sweep and tensorboard.

Errors a user can cause (a bad option, path or configuration) print one line
``falcon-rl: error: ...`` and exit with code 2; a run stopped for non-finite
values exits with 3; a run stopped by SIGTERM or SIGINT exits with 143 or 130
after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from falcon_rl.config import ConfigError, TrainConfig, load_yaml_mapping

logger = logging.getLogger("falcon_rl")

EXIT_USAGE = 2
EXIT_NONFINITE = 3
OPTION_FIELDS_SKIPPED = {"scheduler_options", "model_options", "progress", "deterministic"}


class UsageError(ValueError):
    """A command-line problem reported with exit code 2."""


# -- parser -----------------------------------------------------------------

def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per ``TrainConfig`` field; only options given on the command line override."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of configuration fields.")
    for f in dataclasses.fields(TrainConfig):
        if f.name in OPTION_FIELDS_SKIPPED:
            continue
        option = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        kwargs["metavar"] = _metavar(f)
        parser.add_argument(option, **kwargs)
    parser.add_argument("--scheduler-opt", dest="scheduler_options", action="append", metavar="KEY=VALUE",
                        default=argparse.SUPPRESS, help="Scheduler option (repeatable), e.g. q=0.5.")
    parser.add_argument("--model-opt", dest="model_options", action="append", metavar="KEY=VALUE",
                        default=argparse.SUPPRESS, help="Model preset override (repeatable).")
    parser.add_argument("--deterministic", dest="deterministic", action="store_const", const=True,
                        default=argparse.SUPPRESS, help="Use deterministic algorithms and seed everything.")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                        default=argparse.SUPPRESS, help="Hide the progress bar.")
    parser.add_argument("--resume", metavar="RUN_DIR", help="Continue the run in RUN_DIR from its newest valid "
                        "checkpoint; only --steps, --epochs and --device may be given with it.")


def _metavar(f: dataclasses.Field) -> str | None:
    if f.metadata.get("choices"):
        return None
    kind = str(f.type).split(" ")[0]
    return {"int": "N", "float": "X", "str": "VALUE"}.get(kind, "VALUE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falcon-rl", description="Learned negative mining for "
                                     "vision-language pretraining.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="Train a VLP model with a negative-mining scheduler.",
                                description="Train a VLP model with a negative-mining scheduler.")
    add_train_options(train)
    train.set_defaults(handler=command_train)

    evaluate = commands.add_parser("eval", help="Evaluate a checkpoint on image-text retrieval.",
                                   description="Evaluate a checkpoint on image-text retrieval.")
    evaluate.add_argument("--checkpoint", required=True, metavar="FILE_OR_RUN_DIR",
                          help="A checkpoint file, or a run directory (its newest valid checkpoint).")
    evaluate.add_argument("--data", help="Dataset folder (default: the one the run trained on).")
    evaluate.add_argument("--image-root", help="Folder for relative image paths of JSON annotations.")
    evaluate.add_argument("--split", default="test", choices=("val", "test"), help="Split to evaluate.")
    evaluate.add_argument("--itm-rerank", type=int, metavar="K", help="Re-rank the top K with ITM.")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), help="Device (default: auto).")
    evaluate.add_argument("--output", metavar="FILE.json", help="Also write the metrics to this JSON file.")
    evaluate.set_defaults(handler=command_eval)

    from experiments import sweep

    sweep_parser = commands.add_parser("sweep", help="Compare schedulers over seeds: one training run per "
                                       "scheduler and seed, then a summary with confidence intervals.")
    sweep.add_sweep_options(sweep_parser)
    sweep_parser.set_defaults(handler=sweep.command_sweep)

    board = commands.add_parser("tensorboard", help="Start TensorBoard on localhost for a run or sweep.",
                                description="Start TensorBoard on localhost for a run or sweep directory.")
    board.add_argument("directory", metavar="RUN_OR_SWEEP_DIR")
    board.add_argument("--port", type=int, default=6006, help="Port (default 6006).")
    board.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1, this "
                       "machine only).")
    board.set_defaults(handler=command_tensorboard)
    return parser


# -- configuration from options ----------------------------------------------

def parse_key_values(items: Sequence[str], option: str) -> dict[str, Any]:
    import yaml

    values = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key.strip():
            raise UsageError(f"invalid value for {option}: {item!r} (expected KEY=VALUE)")
        try:
            values[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            values[key.strip()] = text
    return values


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """Merge the YAML config file and the options given on the command line."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if "scheduler_options" in overrides:
        overrides["scheduler_options"] = parse_key_values(overrides["scheduler_options"], "--scheduler-opt")
    if "model_options" in overrides:
        overrides["model_options"] = parse_key_values(overrides["model_options"], "--model-opt")
    values = load_yaml_mapping(args.config) if args.config else {}
    for name in ("scheduler_options", "model_options"):
        if name in overrides and isinstance(values.get(name), dict):
            overrides[name] = {**values[name], **overrides[name]}
    if "steps" in overrides and "epochs" not in overrides:
        values.pop("epochs", None)
    if "epochs" in overrides and "steps" not in overrides:
        values.pop("steps", None)
    values.update(overrides)
    return TrainConfig.from_dict(values), overrides


# -- commands ---------------------------------------------------------------

def command_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from experiments.trainer import Trainer, resume_config

    if args.resume:
        if args.config:
            raise UsageError("--config cannot be combined with --resume (the run's saved config.yaml is used)")
        _, overrides = _overrides_only(args)
        directory = Path(args.resume)
        config = resume_config(directory, overrides)
        from experiments.run_directory import read_metrics
        metrics = read_metrics(directory)
        extending = "steps" in overrides or "epochs" in overrides
        if metrics and metrics.get("status") == "finished" and not extending:
            print(f"run {directory} already finished ({metrics.get('steps')} steps); nothing to resume")
            return 0
    else:
        config, _ = config_from_args(args)
        from experiments.run_directory import default_run_directory
        directory = Path(config.output) if config.output else default_run_directory(config)
    trainer = Trainer(config, directory, argv=list(argv))
    metrics = trainer.train(resume=bool(args.resume))
    print(format_results(metrics, directory))
    return 0


def _overrides_only(args: argparse.Namespace) -> tuple[None, dict[str, Any]]:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return None, overrides


def command_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from experiments.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(Path(args.checkpoint), data=args.data, image_root=args.image_root,
                                  split=args.split, itm_rerank=args.itm_rerank, device=args.device)
    print(format_results(metrics, None, title=f"{args.split} retrieval"))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return 0


def command_tensorboard(args: argparse.Namespace, argv: Sequence[str]) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        raise UsageError(f"invalid value for RUN_OR_SWEEP_DIR: {str(directory)!r} (directory not found)")
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(directory), "--host", args.host, "--port", str(args.port)])
    url = board.launch()
    print(f"TensorBoard for {directory} at {url} (Ctrl+C stops it)")
    import time
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


# -- output -----------------------------------------------------------------

RESULT_ROWS = (("image to text", ("i2t_r1", "i2t_r5", "i2t_r10")), ("text to image", ("t2i_r1", "t2i_r5", "t2i_r10")),
               ("FN-aware i2t", ("fn_i2t_r1", "fn_i2t_r5", "fn_i2t_r10")),
               ("FN-aware t2i", ("fn_t2i_r1", "fn_t2i_r5", "fn_t2i_r10")))


def format_results(metrics: dict[str, Any], directory: Path | None, title: str = "test retrieval") -> str:
    """Render the final metrics as a small fixed-width table."""
    def number(key: str) -> str:
        value = metrics.get(key)
        return f"{value:7.2f}" if isinstance(value, (int, float)) else "    n/a"

    images, captions = metrics.get("num_images", metrics.get("num_test_images")), \
        metrics.get("num_captions", metrics.get("num_test_captions"))
    lines = [f"{title} ({images} images, {captions} captions), recall in %", "",
             f"{'':16}{'R@1':>7}{'R@5':>7}{'R@10':>7}"]
    for label, keys in RESULT_ROWS:
        lines.append(f"{label:16}" + "".join(number(key) for key in keys))
    lines.append("")
    lines.append(f"RSUM {number('rsum').strip()}  (chance {number('chance_rsum').strip()}), "
                 f"FN-aware RSUM {number('fn_rsum').strip()}, "
                 f"mAP@R i2t {number('i2t_map_r').strip()} t2i {number('t2i_map_r').strip()}")
    if "steps" in metrics:
        hardness = metrics.get("mean_hardness")
        fn_rate = metrics.get("mined_fn_rate")
        lines.append(f"steps {metrics['steps']} (skipped {metrics.get('skipped_steps', 0)}), "
                     f"mean hardness {'n/a' if hardness is None else f'{hardness:.3f}'}, "
                     f"mined FN rate {'n/a' if fn_rate is None else f'{100 * fn_rate:.2f}%'}, "
                     f"wall time {metrics.get('wall_seconds', 0):.0f} s")
    if directory is not None:
        lines.append(f"run directory: {directory}")
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------

def _known_errors() -> tuple[type[BaseException], ...]:
    from agents import SchedulerError
    from falcon_rl.data import DataError
    from falcon_rl.models import ModelError
    from falcon_rl.training.checkpoint import CheckpointError

    return (UsageError, ConfigError, DataError, SchedulerError, ModelError, CheckpointError)


def main(argv: Sequence[str] | None = None, prog: str = "falcon-rl") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # FAISS logs which CPU instruction set it loaded at INFO; that is noise for a training run.
    logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        return args.handler(args, argv)
    except Exception as error:
        return _report_error(error, prog)


def _report_error(error: Exception, prog: str) -> int:
    """Turn the errors a user can cause into one line and an exit code; re-raise anything else.

    The error classes are imported here, after the command ran, so that a
    bad option does not pay for importing torch.
    """
    from experiments.trainer import Stopped
    from falcon_rl.training import NonFiniteError

    if isinstance(error, _known_errors()):
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(error, NonFiniteError):
        print(f"{prog}: error: training stopped: {error}; the last good checkpoint is kept", file=sys.stderr)
        return EXIT_NONFINITE
    if isinstance(error, Stopped):
        return error.exit_code
    raise error


if __name__ == "__main__":
    raise SystemExit(main())
