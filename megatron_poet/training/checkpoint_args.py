"""Checkpoint flags of the training program (Megatron-LM's names): where to save and load, how
(``--async-save``, ``--keep-last-checkpoints``, ``--ckpt-verify-checksums``), and starting from another
run's or an imported model's weights (``--finetune``, ``--use-checkpoint-args``)."""
from __future__ import annotations

import argparse
import os


class CheckpointArgumentError(ValueError):
    """``--use-checkpoint-args`` cannot read the checkpoint's arguments; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", action="store_true",
                   help="take only the model weights from --load (e.g. a tools/convert_from_hf.py checkpoint): "
                        "iteration, optimizer, schedule, data position and RNG start anew (Megatron-LM's flag)")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model's flags (and, if not given, the tokenizer) from the --load checkpoint")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="resume from this iteration's checkpoint under --load instead of the latest (Megatron-LM's flag)")
    g.add_argument("--ckpt-verify-checksums", action="store_true",
                   help="before resuming, check every file of the checkpoint against the SHA-256 in its manifest "
                        "(reads the whole checkpoint); sizes are always checked")
    g.add_argument("--keep-last-checkpoints", type=int, default=None,
                   help="keep only the K newest checkpoints under --save, deleting older ones once a newer one "
                        "verifies against its manifest; default: keep all")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background (megatron-core's asynchronous dist_checkpointing) "
                        "while training goes on; the marker moves once every rank's write is complete")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state so that it loads at any TP/PP/DP layout "
                        "(gathers it at save time); by default it reloads only at another DP size")
    g.add_argument("--no-save-on-signal", dest="save_on_signal", action="store_false",
                   help="do not save a checkpoint when SIGTERM/SIGINT arrives")


def adopt_checkpoint_args(args: argparse.Namespace) -> None:
    """``--use-checkpoint-args``: the model flags the ``--load`` checkpoint records replace the command
    line's (the vocabulary stays the tokenizer's, checked against it later); its tokenizer too, unless
    ``--tokenizer-model`` is given."""
    from megatron_poet.checkpoint import SHAPE_ARGS, CheckpointError, format_of, resolve_checkpoint

    if not args.load:
        raise CheckpointArgumentError("--use-checkpoint-args needs --load CHECKPOINT")
    try:
        path, _ = resolve_checkpoint(args.load, args.ckpt_step)
        checkpoint = format_of(path)
        saved = checkpoint.read_args(path) if checkpoint else None
    except CheckpointError as err:
        raise CheckpointArgumentError(f"--use-checkpoint-args: {err}") from None
    if not isinstance(saved, dict):
        raise CheckpointArgumentError(f"--use-checkpoint-args: {path} records no model arguments")
    vars(args).update({k: saved[k] for k in SHAPE_ARGS if k in saved and k != "vocab_size_unpadded"})
    if args.tokenizer_model is None and saved.get("tokenizer_model"):
        args.tokenizer_type, args.tokenizer_model = saved.get("tokenizer_type"), saved["tokenizer_model"]


def argument_errors(args: argparse.Namespace) -> list[str]:
    """Checkpoint flags that cannot work, before any work."""
    errors = []
    if args.keep_last_checkpoints is not None and args.keep_last_checkpoints < 1:
        errors.append(f"--keep-last-checkpoints must be >= 1, got {args.keep_last_checkpoints}")
    if args.ckpt_step is not None and not (args.load and args.ckpt_step >= 0):
        errors.append("--ckpt-step needs --load and a value >= 0")
    if args.async_save and args.deepspeed:
        errors.append("--async-save uses megatron-core's asynchronous dist_checkpointing; DeepSpeed's checkpoints "
                      "are written synchronously: drop --async-save or --deepspeed/--zero-stage")
    if args.async_save and not args.save:
        errors.append("--async-save needs --save DIR")
    if args.finetune and not args.load:
        errors.append("--finetune needs --load CHECKPOINT (the weights to start from)")
    # --save's directory may not exist yet: the first run of a save/resume command line
    if args.load and not (os.path.isdir(args.load) or args.load == args.save):
        errors.append(f"--load {args.load}: no such directory")
    return errors
