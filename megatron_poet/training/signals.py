"""SIGTERM/SIGINT: finish the current iteration, save a checkpoint, exit.

A scheduler (SLURM, Kubernetes) or Ctrl-C sends the signal to every rank, but
not necessarily at the same iteration; the training loop takes the maximum of
:attr:`SignalHandler.received` over all ranks in the iteration's one flag reduction
(:meth:`~megatron_poet.training.finite.IterationGuard.loss_verdict`), so every rank
stops (and saves) at the same iteration.
"""
from __future__ import annotations

import signal


class SignalHandler:
    """Records SIGTERM/SIGINT instead of dying; restores the previous handlers on :meth:`close`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
