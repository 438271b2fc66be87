"""Command line of the pretraining program: Megatron's flag names plus the POET flags.

:func:`parse_args` parses and then :func:`validate_args` checks every size that
can be checked without building anything (POET block sizes of every linear on
its tensor-parallel shard, parallel sizes, batch sizes), so bad input fails with
a message that says what to fix before any process group, data or model exists.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from megatron_poet.poet.a0_storage import STORAGES
from megatron_poet.poet.config import MODES, VARIANTS, POETConfig
from megatron_poet.poet.cayley import MAX_ORTHOGONALITY_ERROR, ORTHOGONALITY_WARNING
from megatron_poet.poet.init import INIT_SCHEMES

from . import architecture, checkpoint_args, fp8, metrics, moe, profiling, recompute
from .engine import deepspeed_config
from .flag_help import document


class ArgumentError(ValueError):
    """An invalid combination of command-line arguments; the message says what to fix."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_poet.training.pretrain",
        description="Pretrain a GPT (Llama- or GPT-2-style) with POET linear layers on megatron-core.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=None, help="grouped-query attention; default: = heads")
    g.add_argument("--kv-channels", type=int, default=None, help="default: hidden size / heads")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="gpt2 style: rows of the learned position table, >= --seq-length; llama style (RoPE): "
                        "no table, only the context length recorded in checkpoints and exported configs; "
                        "default: --seq-length")
    g.add_argument("--model-style", choices=("llama", "gpt2"), default="llama",
                   help="llama: RMSNorm, SwiGLU, RoPE, no biases, untied embeddings; "
                        "gpt2: LayerNorm, GELU, biases, learned positions, tied embeddings")
    g.add_argument("--rotary-base", type=float, default=10000)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = p.add_argument_group("POET")
    g.add_argument("--poet", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-poet trains Megatron's own linear layers with AdamW (the baseline)")
    g.add_argument("--poet-block-size", type=int, default=32)
    g.add_argument("--poet-merge-interval", type=int, default=200, help="T_m optimizer steps between merges")
    g.add_argument("--poet-neumann-terms", type=_neumann_terms, default=3,
                   help="k >= 1 in G = (I+Q)(I+Q+..+Q^k), or 'exact' for the exact Cayley transform")
    g.add_argument("--poet-lr", type=float, default=None, help="Adam lr of the POET factors; default: --lr")
    g.add_argument("--poet-min-lr", type=float, default=None, help="default: poet lr x (min-lr / lr)")
    g.add_argument("--poet-mode", choices=MODES, default="fast",
                   help="fast: keep the layers' intermediate activations for backward; mem: keep only their "
                        "inputs and recompute (less memory, ~1 more forward)")
    g.add_argument("--poet-init", choices=INIT_SCHEMES, default="normalized",
                   help="the fixed random A0: normalized = Gaussian with unit-norm rows (best in the paper); "
                        "standard = N(0, 0.02^2); xavier = Gaussian of variance 2/(fan_in+fan_out); "
                        "uniform_spectrum = all singular values 1")
    g.add_argument("--poet-variant", choices=VARIANTS, default="bs",
                   help="bs: block-stochastic, R and P are b x b blocks after a random permutation; fs: fully "
                        "stochastic, one random b-subset per side and permutation group")
    g.add_argument("--poet-permutation-groups", type=int, default=None,
                   help="the TP-sharded side permutes within this many groups of each dimension (a multiple of "
                        "the TP size; runs at any TP size dividing it are identical). Default with bs: the "
                        "largest of 8, 4, 2, 1 leaving every group at least 2 blocks (the TP size if that does "
                        "not divide it); 1 = the paper's full permutations (TP=1 only). Default with fs: the TP "
                        "size; there it fixes the number of blocks, so a checkpoint records it")
    g.add_argument("--poet-fp32-master-a0", action="store_true",
                   help="with --bf16: keep an fp32 master copy of every A0 that merges fold, rounding to bf16 "
                        "once per merge (sharded over data-parallel ranks with --use-distributed-optimizer)")
    g.add_argument("--poet-a0-storage", choices=STORAGES, default="native",
                   help="how A0 is held: native = the parameter dtype (bf16 with --bf16, else fp32); int8 = 8-bit "
                        "codes with a float32 scale and zero point per --poet-a0-group-size entries of a row "
                        "(POET-XQ's scheme; dequantized per layer at each GEMM, requantized at each merge)")
    g.add_argument("--poet-a0-group-size", type=int, default=256,
                   help="entries per quantization group of --poet-a0-storage int8 (must divide the layers' input "
                        "sizes, and the row-parallel layers' input permutation groups)")
    g.add_argument("--poet-orthogonality-warning", type=float, default=ORTHOGONALITY_WARNING,
                   help="warn once when a factor's orthogonality error ||G^T G - I||_F (measured at log steps, "
                        "merges and saves) passes this")
    g.add_argument("--poet-max-orthogonality-error", type=float, default=MAX_ORTHOGONALITY_ERROR,
                   help="stop the run (exit code 3, nothing saved) when a factor's orthogonality error passes "
                        "this: its Cayley-Neumann series no longer approximates an orthogonal matrix; 0 = never")
    g.add_argument("--poet-clip-ramp-iters", type=int, default=0,
                   help="after each merge, ramp the clip threshold linearly from clip/N back to clip over "
                        "N steps (the public POET code uses 10); 0 = off")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--train-iters", type=int, default=300)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=None, help="default: 0.01 x lr")
    g.add_argument("--lr-warmup-iters", type=int, default=None, help="default: 5%% of train iters")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: train iters")
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 = no clipping")
    g.add_argument("--bf16", action="store_true", help="bf16 weights/activations, fp32 main params")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")

    g = p.add_argument_group("non-finite guard (see megatron_poet/training/finite.py)")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="skip the update of an iteration whose loss or global gradient norm is NaN/inf (nothing "
                        "changes: parameters, optimizer state, LR schedule, POET merges); Megatron-LM's flag")
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop (exit code 3) after this many consecutive skipped iterations: the run has diverged")
    g.add_argument("--loss-spike-factor", type=float, default=0.0,
                   help="also skip an iteration whose loss exceeds this multiple (> 1) of the mean loss of the "
                        "previous --loss-spike-window applied iterations; 0 = off")
    g.add_argument("--check-weight-hash-across-dp-replicas-interval", type=int, default=None,
                   help="every N iterations compare a hash of every parameter across data-parallel replicas, "
                        "and of the tensors TP does not split across tensor-parallel ranks; stop (exit code 3) "
                        "naming the tensor and ranks if copies differ (Megatron-LM's flag)")
    g.add_argument("--loss-spike-window", type=int, default=100,
                   help="applied iterations averaged by --loss-spike-factor (checked once that many exist)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline schedule: each pipeline rank holds (layers / PP) / this many "
                        "model chunks (virtual stages)")
    g.add_argument("--sequence-parallel", action="store_true")

    architecture.add_arguments(p)
    moe.add_arguments(p)
    recompute.add_arguments(p)
    deepspeed_config.add_arguments(p)
    fp8.add_arguments(p)
    profiling.add_arguments(p)
    metrics.add_arguments(p)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="prefixes of .bin/.idx files, optionally weighted ('0.3 a 0.7 b'); "
                        "with neither this nor --mock-data, the small built-in generated corpus is used")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--tokenizer-type", choices=("HuggingFaceTokenizer", "NullTokenizer"), default=None,
                   help="default: NullTokenizer with --mock-data, else HuggingFaceTokenizer")
    g.add_argument("--tokenizer-model", default=None, help="tokenizer.json or a directory holding one")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary of the NullTokenizer (mock data)")
    g.add_argument("--data-cache-path", default=None,
                   help="where sample indices and the built-in corpus are cached; default: the indices in a "
                        "cache/ directory beside the data, the corpus in ~/.cache/megatron_poet")
    g.add_argument("--num-workers", type=int, default=0)

    checkpoint_args.add_arguments(p)
    g = p.add_argument_group("logging")
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--exit-interval", type=int, default=None, help="stop (after saving) at this iteration")
    return document(p)


def parse_args(argv: list[str] | None = None, world_size: int | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default: ``sys.argv``), fill derived defaults and validate.

    ``world_size`` defaults to ``$WORLD_SIZE`` (set by torchrun) or 1.
    Raises :class:`ArgumentError` (after argparse's own usage errors).
    """
    args = build_parser().parse_args(argv)
    args.world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if args.use_checkpoint_args:
        try:
            checkpoint_args.adopt_checkpoint_args(args)
        except checkpoint_args.CheckpointArgumentError as err:
            raise ArgumentError(str(err)) from None
    _fill_defaults(args)
    validate_args(args)
    return args


def _fill_defaults(args: argparse.Namespace) -> None:
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.num_query_groups = args.num_query_groups or args.num_attention_heads
    args.kv_channels_given = args.kv_channels is not None
    if not args.kv_channels_given and args.num_attention_heads > 0:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    architecture.fill_defaults(args)
    moe.fill_defaults(args)
    args.deepspeed = args.deepspeed or args.zero_stage is not None
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    per_chunk, pp = args.num_layers_per_virtual_pipeline_stage, args.pipeline_model_parallel_size
    chunks = args.num_layers // (pp * per_chunk) if per_chunk and per_chunk > 0 and pp > 0 else 1
    args.virtual_pipeline_model_parallel_size = chunks if chunks > 1 else None  # model chunks per pipeline rank
    args.data_parallel_size = args.world_size // model_parallel if model_parallel > 0 else 0
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * max(args.data_parallel_size, 1)
    args.min_lr = 0.01 * args.lr if args.min_lr is None else args.min_lr
    args.poet_lr = args.lr if args.poet_lr is None else args.poet_lr
    if args.poet_variant == "fs" and args.poet_permutation_groups is None:
        args.poet_permutation_groups = args.tensor_model_parallel_size
    if args.poet_min_lr is None:
        args.poet_min_lr = args.poet_lr * (args.min_lr / args.lr) if args.lr > 0 else 0.0
    args.lr_decay_iters = args.train_iters if args.lr_decay_iters is None else args.lr_decay_iters
    if args.lr_warmup_iters is None:  # 5% of training, and fewer than the decay iterations (megatron asserts it)
        args.lr_warmup_iters = min(max(1, args.train_iters // 20), args.lr_decay_iters - 1)
    if args.save_interval is None:
        args.save_interval = args.train_iters
    if args.tokenizer_type is None:
        args.tokenizer_type = "NullTokenizer" if args.mock_data else "HuggingFaceTokenizer"


def _neumann_terms(text: str) -> int | None:
    """``--poet-neumann-terms``: an integer ``k`` (validated by POETConfig) or ``exact`` (None)."""
    if text == "exact":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer k >= 1 or 'exact', got {text!r}") from None


def poet_config(args: argparse.Namespace) -> POETConfig | None:
    """The :class:`POETConfig` of the run, ``None`` for ``--no-poet``."""
    if not args.poet:
        return None
    master = args.poet_fp32_master_a0 and args.bf16
    config = POETConfig(
        block_size=args.poet_block_size,
        neumann_terms=args.poet_neumann_terms,
        mode=args.poet_mode,
        init=args.poet_init,
        variant=args.poet_variant,
        permutation_groups=args.poet_permutation_groups,
        fp32_master_a0=master,
        shard_fp32_master=master and args.use_distributed_optimizer,
        a0_storage=args.poet_a0_storage,
        a0_group_size=args.poet_a0_group_size,
    )
    if config.permutation_groups is None:
        from megatron_poet.megatron.sharding import layout_free_permutation_groups

        sharded = [(d_out if parallel == "column" else d_in, parts) for _, d_in, d_out, parallel, parts in
                   linear_shapes(args)]
        groups = layout_free_permutation_groups(sharded, config, args.tensor_model_parallel_size)
        config = dataclasses.replace(config, permutation_groups=groups)
    return config


def linear_shapes(args: argparse.Namespace) -> list[tuple[str, int, int, str, int]]:
    """``(name, in_features, out_features, parallel, parts)`` of each transformer linear, unsharded.

    ``parallel`` is "column" (QKV, FC1: the output dimension is split across
    tensor-parallel ranks) or "row" (attention projection, FC2: the input dimension is split).
    ``parts`` is 2 for SwiGLU's ``[gate; up]`` FC1 (llama style: its width doubles; the halves are
    sharded and permuted apart), else 1. With ``--num-experts``, FC1/FC2 are each expert's (of width
    ``--moe-ffn-hidden-size``; split over TP ranks only with ``--expert-tensor-parallel-size`` = TP).
    """
    qkv_out = (args.num_attention_heads + 2 * args.num_query_groups) * args.kv_channels
    fc1_parts = 2 if args.model_style == "llama" else 1
    mlp, ffn = ("mlp.experts.linear_fc1", "mlp.experts.linear_fc2"), args.moe_ffn_hidden_size  # MoE: every layer's
    if not args.num_experts:
        mlp, ffn = ("mlp.linear_fc1", "mlp.linear_fc2"), args.ffn_hidden_size
    return [
        ("self_attention.linear_qkv", args.hidden_size, qkv_out, "column", 1),
        ("self_attention.linear_proj", args.num_attention_heads * args.kv_channels, args.hidden_size, "row", 1),
        (mlp[0], args.hidden_size, ffn * fc1_parts, "column", fc1_parts),
        (mlp[1], ffn, args.hidden_size, "row", 1),
    ]


def validate_args(args: argparse.Namespace) -> None:
    """Raise :class:`ArgumentError` naming the flag to change for any invalid size."""
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    positive = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                "train_iters", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "eval_interval", "log_interval", "save_interval")
    for name in positive:
        need(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if errors:
        raise ArgumentError("invalid arguments:\n  " + "\n  ".join(errors))

    t, pp, world = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.world_size
    need(world % (t * pp) == 0,
         f"the world size {world} (nodes x GPUs/processes per node) is not divisible by "
         f"--tensor-model-parallel-size {t} x --pipeline-model-parallel-size {pp}; "
         f"use sizes whose product divides {world}")
    need(args.num_attention_heads % t == 0,
         f"--num-attention-heads {args.num_attention_heads} is not divisible by --tensor-model-parallel-size {t}")
    need(args.num_query_groups % t == 0,
         f"--num-query-groups {args.num_query_groups} is not divisible by --tensor-model-parallel-size {t}")
    need(args.num_attention_heads % args.num_query_groups == 0,
         f"--num-attention-heads {args.num_attention_heads} is not a multiple of "
         f"--num-query-groups {args.num_query_groups}")
    need(args.kv_channels_given or args.hidden_size % args.num_attention_heads == 0,
         f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
         f"{args.num_attention_heads}; change one of them or set --kv-channels")
    need(args.ffn_hidden_size % t == 0,
         f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {t}")
    need(args.num_layers % pp == 0,
         f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp} (the "
         f"stages hold equal numbers of layers)")
    _check_virtual_pipeline(args, need)
    if args.sequence_parallel:
        need(t > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1")
        need(args.seq_length % t == 0,
             f"--sequence-parallel: --seq-length {args.seq_length} is not divisible by "
             f"--tensor-model-parallel-size {t}")
    dp = args.data_parallel_size
    if dp > 0:
        need(args.global_batch_size % (args.micro_batch_size * dp) == 0,
             f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
             f"{args.micro_batch_size} x data-parallel size {dp} (= world {world} / (TP {t} x PP {pp})); "
             f"use a multiple of {args.micro_batch_size * dp}")
    need(args.lr >= args.min_lr >= 0, f"need --lr {args.lr} >= --min-lr {args.min_lr} >= 0")
    need(args.poet_lr >= args.poet_min_lr >= 0, f"need --poet-lr {args.poet_lr} >= --poet-min-lr {args.poet_min_lr} >= 0")
    need(0 <= args.lr_warmup_iters < args.lr_decay_iters,
         f"need 0 <= --lr-warmup-iters {args.lr_warmup_iters} < --lr-decay-iters {args.lr_decay_iters}")
    need(args.clip_grad >= 0, f"--clip-grad must be >= 0, got {args.clip_grad}")
    need(args.eval_iters >= 0, f"--eval-iters must be >= 0, got {args.eval_iters}")
    need(args.max_skipped_iters >= 1, f"--max-skipped-iters must be >= 1, got {args.max_skipped_iters}")
    need(args.loss_spike_factor == 0 or args.loss_spike_factor > 1,
         f"--loss-spike-factor must be > 1 (or 0 = off), got {args.loss_spike_factor}")
    need(args.loss_spike_window >= 1, f"--loss-spike-window must be >= 1, got {args.loss_spike_window}")
    interval = args.check_weight_hash_across_dp_replicas_interval
    need(interval is None or interval >= 1,
         f"--check-weight-hash-across-dp-replicas-interval must be >= 1, got {interval}")
    need(args.poet_orthogonality_warning > 0 and args.poet_max_orthogonality_error >= 0,
         "--poet-orthogonality-warning must be > 0 and --poet-max-orthogonality-error >= 0")
    need(args.poet_clip_ramp_iters >= 0, f"--poet-clip-ramp-iters must be >= 0, got {args.poet_clip_ramp_iters}")
    if args.mock_data:
        need(not args.data_path, "give either --data-path or --mock-data, not both")
        need(args.tokenizer_type == "HuggingFaceTokenizer" or args.vocab_size,
             "--mock-data with the NullTokenizer needs --vocab-size N (or --tokenizer-model PATH)")
    if args.data_path:
        need(args.tokenizer_model is not None,
             "--data-path needs --tokenizer-model PATH (the tokenizer the data was preprocessed with)")
    need(args.model_style != "gpt2" or args.seq_length <= args.max_position_embeddings,
         f"--seq-length {args.seq_length} > --max-position-embeddings {args.max_position_embeddings}: the "
         f"gpt2 style's learned position table has no row for the later positions; raise "
         f"--max-position-embeddings or lower --seq-length")
    errors += architecture.argument_errors(args)
    errors += moe.argument_errors(args)
    errors += recompute.argument_errors(args)
    errors += checkpoint_args.argument_errors(args)
    errors += deepspeed_config.deepspeed_arg_errors(args)
    errors += profiling.argument_errors(args)
    errors += metrics.argument_errors(args)
    errors += fp8.fp8_arg_errors(args)
    if args.poet:
        _check_poet(args, need, bool(errors))
    if errors:
        raise ArgumentError("invalid arguments:\n  " + "\n  ".join(errors))


def _check_virtual_pipeline(args: argparse.Namespace, need) -> None:
    per_chunk, pp = args.num_layers_per_virtual_pipeline_stage, args.pipeline_model_parallel_size
    if per_chunk is None:
        return
    flag = f"--num-layers-per-virtual-pipeline-stage {per_chunk}"
    need(per_chunk > 0, f"{flag} must be > 0")
    need(pp > 1, f"{flag} (the interleaved schedule) needs --pipeline-model-parallel-size > 1")
    if per_chunk <= 0 or pp <= 1 or args.num_layers % pp:
        return
    need((args.num_layers // pp) % per_chunk == 0,
         f"{flag} does not divide the {args.num_layers // pp} layers of each pipeline stage "
         f"(--num-layers {args.num_layers} / --pipeline-model-parallel-size {pp})")
    dp = args.data_parallel_size
    micro_batches = args.global_batch_size // (args.micro_batch_size * dp) if dp > 0 else 0
    need(args.virtual_pipeline_model_parallel_size is None or micro_batches % pp == 0,
         f"{flag}: the interleaved schedule runs micro-batches in groups of --pipeline-model-parallel-size {pp}, "
         f"but each data-parallel rank has {micro_batches} per global batch (--global-batch-size "
         f"{args.global_batch_size} / (--micro-batch-size {args.micro_batch_size} x data-parallel size {dp})); "
         f"use a global batch size giving a multiple of {pp}")


def _check_poet(args: argparse.Namespace, need, errors_so_far: bool) -> None:
    try:
        config = poet_config(args)
    except ValueError as e:
        need(False, f"{e} (POET flags: --poet-block-size, --poet-neumann-terms, --poet-mode, --poet-init, "
                    f"--poet-variant, --poet-permutation-groups, --poet-a0-storage, --poet-a0-group-size, --poet-fp32-master-a0)")
        return
    need(args.poet_merge_interval > 0, f"--poet-merge-interval must be > 0, got {args.poet_merge_interval}")
    need(args.bf16 or not args.poet_fp32_master_a0,
         "--poet-fp32-master-a0 keeps an fp32 copy of bf16 weights; it needs --bf16")
    need(not (args.deepspeed and args.poet_fp32_master_a0),
         "--poet-fp32-master-a0 is implemented for the megatron-core engine, not with --deepspeed")
    int8 = args.poet_a0_storage == "int8"
    need(not (int8 and args.deepspeed),
         "--poet-a0-storage int8 is implemented for the megatron-core engine, not with --deepspeed")
    need(not (int8 and args.fp8_format),
         "--poet-a0-storage int8 with --fp8-format would hold a second (FP8) copy of every A0: use one of them")
    if errors_so_far:  # the model layout below presumes sane sizes
        return
    from megatron_poet.megatron.model import validate_model_config

    from .model_provider import transformer_config

    try:  # the layers' own check: block sizes on every rank's shard, SwiGLU's gate and up halves apart
        validate_model_config(transformer_config(args), config, vocab_size=None)
    except ValueError as e:
        need(False, f"{e}\n  change --poet-block-size or the model sizes (--hidden-size, --ffn-hidden-size, "
                    f"--num-attention-heads, --kv-channels), --tensor-model-parallel-size or "
                    f"--poet-permutation-groups")
