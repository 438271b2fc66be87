"""The training program's side of checkpoints: which one ``--load`` resumes, and whether it may.

The formats, the directory layout and the manifests are :mod:`megatron_poet.checkpoint`'s; each
engine saves and loads through its format (megatron ``dist_checkpointing`` or DeepSpeed). Here,
before any work (:func:`check_checkpoint_args`): the checkpoint to resume exists, verifies against
its manifest (sizes; SHA-256 with ``--ckpt-verify-checksums``), was written by this run's engine
(at the same ZeRO stage and data-parallel size for DeepSpeed) and holds a model of the command
line's shape. With ``--finetune`` only the model weights are taken (from either engine's checkpoint,
or a model-only one such as ``tools/convert_from_hf.py`` writes): :func:`load_finetune_weights` loads
them into the freshly built model before the engine wraps it. Loading never unpickles arbitrary
objects (:mod:`megatron_poet.safe_loading`).
"""
from __future__ import annotations

import argparse
import os

import torch

from megatron_poet.checkpoint import (
    MARKER, SHAPE_ARGS, CheckpointError, CheckpointFormat, DeepSpeedFormat, DistFormat, checkpoint_dir, format_of,
    latest_iteration, saved_shape_args, shape_args, verify_or_explain,
)


def run_format(args: argparse.Namespace) -> CheckpointFormat:
    """The checkpoint format of this run's engine."""
    return DeepSpeedFormat() if args.deepspeed else DistFormat()


def iteration_to_load(args: argparse.Namespace) -> int | None:
    """``--ckpt-step`` if given, else the iteration the ``--load`` marker points to (``None``: none)."""
    if not args.load:
        return None
    return args.ckpt_step if args.ckpt_step is not None else latest_iteration(args.load)


def _engine_mismatch(args: argparse.Namespace, path: str, written: CheckpointFormat | None) -> str | None:
    where = f"--load {args.load} ({os.path.basename(path)})"
    if isinstance(written, DistFormat) and args.deepspeed:
        return (f"{where} was written by the megatron engine; resume it without --deepspeed/--zero-stage, or "
                f"export it with tools/convert_to_hf.py")
    if isinstance(written, DeepSpeedFormat) and not args.deepspeed:
        stage = written.zero_stage(path)
        return f"{where} was written by DeepSpeed ZeRO-{stage}; resume it with --zero-stage {stage} (or --deepspeed " \
               f"and a config of that stage)"
    return None


def _expert_layout_mismatch(args: argparse.Namespace, path: str, saved: dict) -> str | None:
    """The distributed optimizer's default format keeps expert state in the buckets of its expert-parallel layout:
    resuming it at another ``--expert-model-parallel-size`` would not find it (the model weights reshard; the
    fully reshardable format is per parameter)."""
    ep = saved.get("expert_model_parallel_size") or 1
    if (not args.num_experts or not args.use_distributed_optimizer or args.dist_ckpt_optim_fully_reshardable
            or ep == args.expert_model_parallel_size):
        return None
    return (f"--load {args.load} ({os.path.basename(path)}) was saved at --expert-model-parallel-size {ep}, this run "
            f"uses {args.expert_model_parallel_size}: the distributed optimizer's state resumes only at the same "
            f"expert-parallel size (unless saved and loaded with --dist-ckpt-optim-fully-reshardable); resume at "
            f"{ep}, or start from its weights with --finetune")


def _finetune_args(args: argparse.Namespace, path: str, written: CheckpointFormat) -> dict:
    """``--finetune`` takes model weights from a checkpoint of either engine; DeepSpeed's hold them whole."""
    if isinstance(written, DeepSpeedFormat) and (args.tensor_model_parallel_size > 1
                                                 or args.pipeline_model_parallel_size > 1):
        raise CheckpointError(f"--finetune from {path}: a DeepSpeed checkpoint holds the model whole, so it starts "
                              f"runs at tensor- and pipeline-parallel size 1 only; export and re-import it, or "
                              f"train at TP = PP = 1")
    saved = written.read_args(path)
    if not isinstance(saved, dict):
        raise CheckpointError(f"--load {args.load}: {path} records no model arguments")
    return saved


def check_checkpoint_args(args: argparse.Namespace) -> int | None:
    """Before any work: the ``--load`` checkpoint verifies and suits the command line (see the module docstring).

    Returns the iteration that will be loaded (``None``: nothing to load, fresh start).
    Raises :class:`CheckpointError` saying what to change (also for a file that is not plain data).
    """
    iteration = iteration_to_load(args)
    if iteration is None:
        return None
    path = checkpoint_dir(args.load, iteration)
    if not os.path.isdir(path):
        source = f"--ckpt-step {iteration}" if args.ckpt_step is not None else \
            f"{os.path.join(args.load, MARKER)} points to iteration {iteration} but"
        raise CheckpointError(f"{source} {path} does not exist; restore the directory or fix the marker")
    distributed = torch.distributed.is_initialized()  # (tools and tests call this in one process)
    damage = [verify_or_explain(args.load, iteration, args.ckpt_verify_checksums)
              if not distributed or torch.distributed.get_rank() == 0 else None]
    if distributed:
        torch.distributed.broadcast_object_list(damage, src=0)  # one rank reads the files, all agree
    if damage[0]:
        raise CheckpointError(damage[0])
    written = format_of(path)
    if written is None:
        raise CheckpointError(f"--load {args.load}: {path} holds no checkpoint of a known format")
    if args.finetune:
        saved = _finetune_args(args, path, written)
    else:
        if written.model_only(path):
            raise CheckpointError(f"--load {args.load} ({os.path.basename(path)}) holds only model weights (an imported "
                                  f"model): start training from it with --finetune (and --use-checkpoint-args)")
        mismatch = _engine_mismatch(args, path, written)
        if mismatch:
            raise CheckpointError(mismatch)
        saved = run_format(args).resume_args(args, path)
        if mismatch := _expert_layout_mismatch(args, path, saved):
            raise CheckpointError(mismatch)
    ours, saved = shape_args(args), saved_shape_args(saved)
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved[k]!r}, command line {ours[k]!r}"
             for k in SHAPE_ARGS if saved[k] != ours[k]]
    if diffs:
        raise CheckpointError(
            f"--load {args.load} (iteration {iteration}) holds a model of another shape; change these flags "
            f"to the checkpoint's values or load another checkpoint:\n  " + "\n  ".join(diffs)
        )
    return iteration


def load_finetune_weights(args: argparse.Namespace, model_chunks: list) -> str | None:
    """``--finetune``: load the ``--load`` checkpoint's model weights into this rank's freshly built
    (unwrapped) ``model_chunks``, before the engine wraps them; returns the directory (``None``: nothing
    to load). Raises :class:`CheckpointError` when the weights do not fit."""
    iteration = iteration_to_load(args)
    if iteration is None:
        return None
    path = checkpoint_dir(args.load, iteration)
    checkpoint = format_of(path)
    for chunk in model_chunks:
        checkpoint.load_model_weights(chunk, path)
    return path


def load_checkpoint(args: argparse.Namespace, engine) -> tuple[int, int]:
    """Restore ``engine`` from the checkpoint :func:`iteration_to_load` names; ``(iteration, consumed
    samples)``, ``(0, 0)`` when there is none. Call :func:`check_checkpoint_args` first."""
    iteration = iteration_to_load(args)
    if iteration is None:
        return 0, 0
    return engine.checkpoint_format.load(engine, checkpoint_dir(args.load, iteration))
