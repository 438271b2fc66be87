"""SIGTERM/SIGINT: finish the current iteration, save a checkpoint, exit.

A scheduler (SLURM, Kubernetes) or Ctrl-C sends the signal to every rank, but
not necessarily at the same iteration; :meth:`SignalHandler.should_stop` takes
the maximum over all ranks so every rank stops (and saves) at the same one.
"""
from __future__ import annotations

import signal

import torch


class SignalHandler:
    """Records SIGTERM/SIGINT instead of dying; restores the previous handlers on :meth:`close`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """Whether any rank got a signal (a collective: call on every rank at the same point)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
