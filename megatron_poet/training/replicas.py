"""Replicas that cannot drift apart unnoticed: Megatron-LM's ``--check-weight-hash-across-dp-replicas-interval``.

Every data-parallel rank holds a copy of its stage's model, and every tensor-parallel rank a copy
of the tensors TP does not split (norms, biases of row-parallel layers, the replicated POET
factor of each layer). They stay equal only if every copy gets the same update; a rank-dependent
summation order (per-rank kernel autotuning on GPUs), a silent memory error or a bug would make
them part, after which each rank folds its own factors into its own ``A0`` and the replicas train
different models without any error. Every ``N`` iterations :func:`check_replicas` hashes each
tensor (SHA-256 of its bytes) and compares:

- all parameters (trained ones and the frozen ``A0``) across the data-parallel group, except
  MoE experts spread by expert parallelism: across the expert data-parallel group (the ranks
  holding the same experts);
- the parameters TP does not split (not ``tensor_model_parallel``) across the tensor-parallel group.

(Permutations are drawn from seeds, not trained, and fp32 masters of ``A0`` may be sharded over
DP; neither is compared. A drift folded into ``A0`` by a merge shows in ``A0`` across DP; across
TP, ``A0`` is split, so it is caught while still in the replicated factor: check at least once
per merge interval.)

Copies that differ stop the run (exit code 3, like a diverged run) on every rank with one
message naming the tensor and which ranks hold which copy. ZeRO-3 holds no replicas (every
parameter is partitioned), so the check is refused there by the argument checks.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .finite import TrainingDiverged


class ReplicasDiverged(TrainingDiverged):
    """Copies of a tensor that must be identical differ between ranks."""


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def tensor_digests(chunks: list[nn.Module], tp_replicated_only: bool = False,
                   experts: bool | None = None) -> dict[str, str]:
    """``{chunk index.name: sha256}`` of every parameter of ``chunks`` (with ``tp_replicated_only``:
    of those not split over tensor-parallel ranks; with ``experts`` True/False: only of those
    that are / are not spread by expert parallelism)."""
    from megatron_poet.megatron.moe import is_expert_parameter  # (imports megatron: not at the program's start)

    return {f"{index}.{name}": _digest(p) for index, chunk in enumerate(chunks) for name, p in chunk.named_parameters()
            if not (tp_replicated_only and getattr(p, "tensor_model_parallel", False))
            and (experts is None or is_expert_parameter(p) == experts)}


def _mismatches(group, what: str, digests: dict[str, str], limit: int = 3) -> list[str]:
    """Messages for the tensors whose digests differ across ``group`` (collective over it)."""
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return []
    gathered = [None] * size
    torch.distributed.all_gather_object(gathered, digests, group=group)
    ranks = torch.distributed.get_process_group_ranks(group)
    found = []
    for name in digests:
        copies: dict[str, list[int]] = {}
        for rank, theirs in zip(ranks, gathered):
            copies.setdefault(theirs.get(name, "missing"), []).append(rank)
        if len(copies) > 1:
            found.append(f"{name.split('.', 1)[1]} differs across {what} ranks: "
                         + " vs ".join(f"ranks {r}" for r in copies.values()))
    return found[:limit] + ([f"... and {len(found) - limit} more"] if len(found) > limit else [])


def check_replicas(chunks: list[nn.Module], iteration: int) -> None:
    """Raise :class:`ReplicasDiverged` on every rank if any data- or tensor-parallel replicas differ.

    Collective over all ranks (call it at the same iteration everywhere).
    """
    from megatron.core import parallel_state

    found = _mismatches(parallel_state.get_data_parallel_group(), "data-parallel",
                        tensor_digests(chunks, experts=False))
    found += _mismatches(parallel_state.get_expert_data_parallel_group(), "expert data-parallel",
                         tensor_digests(chunks, experts=True))
    found += _mismatches(parallel_state.get_tensor_model_parallel_group(), "tensor-parallel",
                         tensor_digests(chunks, tp_replicated_only=True, experts=False))
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, found)
    problems = list(dict.fromkeys(line for lines in everyone for line in lines))  # each group reports once
    if problems:
        raise ReplicasDiverged(
            f"iteration {iteration}: copies of the model that must be identical differ "
            f"(--check-weight-hash-across-dp-replicas-interval): " + "; ".join(problems[:6])
            + "; the replicas now train different models: resume from the latest checkpoint, and report this "
              "if it happens again (a rank-dependent computation or a hardware fault)")
