"""The interface of a checkpoint format: what the training engines and the exporter use.

Two formats implement it: megatron-core ``dist_checkpointing`` (:mod:`.dist_format`, the megatron
engine's, with asynchronous saves) and DeepSpeed's (:mod:`.deepspeed_format`). Both write into the
shared directory layout of :mod:`.directory` (``iter_XXXXXXX``, manifest, marker).
"""
from __future__ import annotations

import abc
import argparse

from torch import nn

from .directory import CheckpointError  # noqa: F401  (the error every method may raise)
from .manifest import problems


class CheckpointFormat(abc.ABC):
    """One checkpoint format (see the module docstring). ``engine`` arguments are the training
    engine saving or loading; each format reads the parts of it that it writes."""

    name: str

    @abc.abstractmethod
    def owns(self, path: str) -> bool:
        """Whether ``iter_XXXXXXX`` directory ``path`` was written in this format."""

    @abc.abstractmethod
    def save(self, engine, iteration: int, consumed_samples: int) -> str:
        """Save ``engine``'s whole state under ``--save`` (all ranks call); returns the directory.
        The marker moves once the checkpoint is complete (at once, or for a background save at
        :meth:`finish_saves`)."""

    def finish_saves(self, blocking: bool) -> list[str]:
        """Complete the background saves that are done (all of them with ``blocking``); returns their
        directories. Collective. Formats without background saves have none."""
        return []

    @abc.abstractmethod
    def load(self, engine, path: str) -> tuple[int, int]:
        """Restore ``engine`` from checkpoint ``path``; returns ``(iteration, consumed_samples)``."""

    def model_only(self, path: str) -> bool:
        """Whether ``path`` holds only model weights (an imported model): it can start a run with
        ``--finetune``, not resume one."""
        return False

    @abc.abstractmethod
    def read_args(self, path: str) -> dict:
        """The model arguments the checkpoint recorded (read as plain data only; ``None``: none recorded)."""

    def resume_args(self, args: argparse.Namespace, path: str) -> dict:
        """:meth:`read_args`, once the checkpoint is known to suit this run (raises :class:`CheckpointError`)."""
        return self.read_args(path)

    def verify(self, path: str, checksums: bool) -> list[str]:
        """Problems of ``path``'s files against its manifest (``[]``: it verifies)."""
        return problems(path, checksums)

    @abc.abstractmethod
    def padded_vocab_size(self, path: str) -> int:
        """Rows of the saved embedding (the vocabulary as padded for the run's TP size)."""

    @abc.abstractmethod
    def load_model_weights(self, model: nn.Module, path: str) -> None:
        """Load only the model's tensors into ``model`` (built at TP=1 for the export; any saved layout)."""
