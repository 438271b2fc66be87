"""Pretraining program: ``torchrun ... -m megatron_poet.training.pretrain [Megatron/POET flags]``.

Order of work, so that bad input fails before anything expensive:
arguments -> process groups -> tokenizer -> checkpoint shape check -> data
indices -> model -> training engine (megatron DDP + optimizer, or DeepSpeed ZeRO) ->
checkpoint load -> training loop -> summary. With neither
``--data-path`` nor ``--mock-data`` it trains on the data helper's built-in
corpus (generated and cached on first use; no network needed).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Iterator

import torch

from megatron_poet.poet.optim import poet_modules
from megatron_poet.safe_loading import UnsafeFileError

from .arguments import ArgumentError, parse_args
from .checkpointing import CheckpointError, check_checkpoint_args, load_finetune_weights
from .engine import build_engine, full_numel, partitioned_construction
from .finite import EXIT_DIVERGED, TrainingDiverged
from .fp8 import describe_run_fp8
from .logging import SetupClock, TrainingLogger
from .model_provider import build_model_chunks, padded_vocab_size
from .process import (output_on_rank_zero_only, prepare_checkpoint_results_queue, prepare_training_process,
                      rank_from_env)
from .slurm import SlurmEnvError, adopt_slurm_env
from .train import train


def _first_error_of_any_rank(error: Exception | None) -> str | None:
    """The message of the lowest rank's ``error`` if any rank has one, on every rank. A file only one
    rank reads (its RNG shard) can fail there alone: megatron-core 0.16's loader re-raises that on
    every rank, 0.19's does not, and the other ranks must not start training."""
    messages = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(messages, None if error is None else str(error))
    return next((message for message in messages if message is not None), None)


def _report_once(error: str | None) -> bool:
    """Print ``error`` on rank 0; whether there was one (the same on every rank)."""
    if error is not None and torch.distributed.get_rank() == 0:
        print(f"error: {error}", file=sys.stderr)
    return error is not None


def _setup_tokenizer(args: argparse.Namespace):
    """The run's tokenizer; fills ``args.data_path``/``tokenizer_model`` for the default corpus."""
    from megatron_poet.data import build_tokenizer, prepare_default_data

    if not args.data_path and not args.mock_data:
        prefix, tokenizer_path = prepare_default_data(args.data_cache_path)
        args.data_path, args.tokenizer_model = [prefix], tokenizer_path
        args.tokenizer_type = "HuggingFaceTokenizer"
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    args.vocab_size_unpadded = tokenizer.vocab_size
    return tokenizer


def _build_datasets(args: argparse.Namespace, tokenizer):
    """(train, valid) datasets; builds (or reads the cached) sample indices."""
    from megatron_poet.data import build_train_valid_test_datasets

    eval_samples = args.eval_iters * args.global_batch_size
    train_ds, valid_ds, _ = build_train_valid_test_datasets(
        tokenizer, args.seq_length, (args.train_iters * args.global_batch_size, eval_samples, eval_samples),
        data_path=args.data_path, split=args.split, mock=args.mock_data, seed=args.seed,
        path_to_cache=args.data_cache_path, create_attention_mask=False,
    )
    return train_ds, valid_ds


def _iterate(loader) -> Iterator[dict]:
    """``iter(loader)`` without touching the global RNG.

    A DataLoader draws a base seed from the default generator when an iterator
    is made; isolating it keeps a resumed run's dropout RNG identical to an
    uninterrupted run's (whose iterator was made at a different moment).
    """
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def main(argv: list[str] | None = None) -> int:
    """Run the program; returns the exit code (2: bad input, reported once; 3: the run diverged (see
    :mod:`.finite`); 130: interrupted during set-up)."""
    try:
        adopt_slurm_env()  # under srun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM's variables
    except SlurmEnvError as e:
        if os.environ.get("SLURM_PROCID", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    prepare_training_process()
    try:
        return _run(argv)
    except KeyboardInterrupt:  # SIGINT/SIGTERM before the loop's handlers: the launcher reports it
        return 128 + signal.SIGINT


def _run(argv: list[str] | None) -> int:
    try:
        with output_on_rank_zero_only():  # argparse's --help and errors
            args = parse_args(argv)
    except ArgumentError as e:
        if rank_from_env() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2

    from megatron.core import parallel_state

    from megatron_poet.data import DataError, build_pretraining_data_loader
    from megatron_poet.megatron.cpu_backend import destroy_distributed, initialize_distributed

    prepare_checkpoint_results_queue(background_saves=args.async_save)
    clock = SetupClock()
    backend = initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed,
                                     virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
                                     expert_model_parallel_size=args.expert_model_parallel_size,
                                     expert_tensor_parallel_size=args.expert_tensor_parallel_size)
    try:
        try:
            clock.mark("start-up and process groups")
            tokenizer = _setup_tokenizer(args)
            check_checkpoint_args(args)  # before the sample indices: they can take minutes
            train_ds, valid_ds = _build_datasets(args, tokenizer)
            clock.mark("tokenizer and data")
        except (DataError, CheckpointError, ValueError, FileNotFoundError) as e:
            if torch.distributed.get_rank() == 0:
                print(f"error: {e}", file=sys.stderr)
            return 2

        vocab = args.padded_vocab_size = padded_vocab_size(args.vocab_size_unpadded, args)
        try:
            model_chunks = build_model_chunks(args, vocab, partitioned_construction(args))
            # A0 elements this rank drew (all of each layer's under ZeRO-3, which keeps a partition of it)
            a0 = sum(full_numel(m.frozen_weight) for chunk in model_chunks for m in poet_modules(chunk))
            clock.mark("model", made=(a0, "A0 elements of this rank") if args.poet else None)
        except ValueError as e:
            if torch.distributed.get_rank() == 0:
                print(f"error: {e}", file=sys.stderr)
            return 2
        n_params = sum(full_numel(p) for chunk in model_chunks for p in chunk.parameters() if p.requires_grad)
        finetuned_from, refusal = None, None
        if args.finetune:  # the weights go into the model before the engine wraps it (and copies masters)
            try:
                finetuned_from = load_finetune_weights(args, model_chunks)
            except (CheckpointError, UnsafeFileError) as e:
                refusal = e
            if _report_once(_first_error_of_any_rank(refusal)):
                return 2
        engine = build_engine(args, model_chunks)
        clock.mark(f"engine ({engine.name}, optimizer)")
        try:
            state = engine.load_checkpoint()
        except (CheckpointError, UnsafeFileError) as e:
            refusal = e
        if _report_once(_first_error_of_any_rank(refusal)):
            return 2
        iteration, consumed = state.iteration, state.consumed_samples
        clock.mark("checkpoint load")
        logger = TrainingLogger(args, vocab, iteration)
        logger.print(
            f" megatron_poet pretraining: {'POET' if args.poet else 'AdamW baseline'}, engine {engine.name}, "
            f"backend {backend}, "
            f"world {args.world_size} (TP {args.tensor_model_parallel_size}, PP {args.pipeline_model_parallel_size}, "
            f"DP {args.data_parallel_size}), {n_params:,} trainable parameters per model-parallel rank, "
            f"vocab {args.vocab_size_unpadded} (padded {vocab}), data {' '.join(args.data_path or ['mock'])}, "
            f"{'bf16' if args.bf16 else 'fp32'}, FP8 {describe_run_fp8(args, model_chunks)}"
        )
        if finetuned_from:
            logger.print(f" fine-tuning from {finetuned_from}: its model weights; iteration, optimizer, schedule and "
                         f"data start anew (--finetune)")
        elif iteration:
            logger.print(f" resumed from {args.load} at iteration {iteration} ({consumed} consumed samples)")
        elif args.load:
            logger.print(f" no checkpoint in {args.load} yet: training from scratch")

        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        train_loader = build_pretraining_data_loader(train_ds, consumed, args.micro_batch_size, dp_rank, dp_size,
                                                     args.num_workers)

        def make_valid_iterator():
            return _iterate(build_pretraining_data_loader(valid_ds, 0, args.micro_batch_size, dp_rank, dp_size))

        clock.mark("data loader")
        logger.print(clock.report())
        try:
            train(args, engine, _iterate(train_loader), make_valid_iterator if valid_ds is not None else None, state,
                  logger)
        except TrainingDiverged as e:  # every rank raises it at the same point
            if torch.distributed.get_rank() == 0:
                print(f"error: {e}", file=sys.stderr)
            return EXIT_DIVERGED
        finally:
            logger.close()
        logger.summary(state.iteration, state.consumed_samples)
        return 0
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
