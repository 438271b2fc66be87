"""Where the logger's scalars go: TensorBoard and Weights & Biases, behind one small interface.

Both get the same scalars under the same names at the same iterations, from the logging rank only
(the last rank: it holds the loss under pipeline parallelism). W&B also gets the run's arguments as
its config. W&B takes Megatron-LM's flags ``--wandb-project``, ``--wandb-exp-name`` and
``--wandb-save-dir``; ``wandb`` is an optional extra (``pip install -e ".[wandb]"``), and its usual
environment applies (``WANDB_MODE=offline`` writes the run locally, ``wandb sync`` uploads it later).
"""
from __future__ import annotations

import argparse
import importlib.util
import json


class MetricsWriter:
    """One destination of scalars."""

    def add_scalars(self, scalars: dict[str, float], iteration: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardWriter(MetricsWriter):
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def add_scalars(self, scalars: dict[str, float], iteration: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _plain_config(args: argparse.Namespace) -> dict:
    """The arguments that are plain JSON values (what W&B's config can hold)."""
    config = {}
    for name, value in vars(args).items():
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)
        config[name] = value
    return config


class WandbWriter(MetricsWriter):
    def __init__(self, args: argparse.Namespace):
        import wandb

        self.run = wandb.init(project=args.wandb_project, name=args.wandb_exp_name, dir=args.wandb_save_dir,
                              config=_plain_config(args))

    def add_scalars(self, scalars: dict[str, float], iteration: int) -> None:
        self.run.log(dict(scalars), step=iteration)

    def close(self) -> None:
        self.run.finish()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Weights & Biases")
    g.add_argument("--wandb-project", default=None, help="log the TensorBoard scalars and the config to this W&B project")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run's name")
    g.add_argument("--wandb-save-dir", default=None, help="where W&B keeps the run's local files")


def argument_errors(args: argparse.Namespace) -> list[str]:
    """``--wandb-*`` problems, before any work."""
    if args.wandb_project is None:
        given = [f for f in ("wandb_exp_name", "wandb_save_dir") if getattr(args, f)]
        return [f"--{given[0].replace('_', '-')} needs --wandb-project"] if given else []
    if importlib.util.find_spec("wandb") is None:
        return ["--wandb-project needs the wandb package: pip install wandb (or pip install -e \".[wandb]\")"]
    return []


def metric_writers(args: argparse.Namespace) -> list[MetricsWriter]:
    """The writers this run's flags ask for (call on the logging rank only)."""
    writers: list[MetricsWriter] = []
    if args.tensorboard_dir:
        writers.append(TensorBoardWriter(args.tensorboard_dir))
    if args.wandb_project:
        writers.append(WandbWriter(args))
    return writers
