"""``--help`` of the pretraining program: a line for every flag, its default and choices, how to launch.

:func:`document` completes the parser of :mod:`.arguments`: flags defined
there without a help text get theirs from :data:`FLAG_HELP`, and
:class:`HelpFormatter` prints every flag's default (``off`` for a switch,
``unset`` for no value) unless the help text already explains it, and short
metavars (``N`` for integers, ``X`` for numbers, :data:`FLAG_METAVAR`).
"""
from __future__ import annotations

import argparse

LAUNCH_HELP = """\
how to launch (the program runs once per process, under a launcher):
  bash examples/pretrain_gpt_poet.sh [flags]       the example's defaults, overridden by your flags;
                                                   one process per GPU (1 on CPU), a free port
  torchrun --nproc-per-node N examples/pretrain_gpt_poet.sh [flags]     the same under torchrun
  python -m megatron_poet.launch [flags]           this program's own defaults, launched as bash does
  torchrun --nproc-per-node N -m megatron_poet.training.pretrain [flags]  the same under torchrun
environment of the example scripts: GPUS_PER_NODE (processes per node), NNODES, NODE_RANK,
  MASTER_ADDR (several nodes: set all three on every node), MASTER_PORT (default: a free port on
  one node, 29500 on several), DATA_PATH + TOKENIZER, CHECKPOINT_PATH, TENSORBOARD_DIR.
Ctrl-C or SIGTERM: every rank finishes its iteration, saves (with --save) and stops."""

# Help texts of the flags that arguments.py defines without one (dest -> text).
FLAG_HELP = {
    "num_layers": "transformer layers",
    "hidden_size": "model width h",
    "num_attention_heads": "attention heads",
    "seq_length": "tokens per training sample",
    "rotary_base": "RoPE base frequency (llama style)",
    "hidden_dropout": "dropout after attention and MLP",
    "attention_dropout": "dropout on the attention probabilities",
    "init_method_std": "std of the normal init of the trainable (non-POET) weights",
    "make_vocab_size_divisible_by": "pad the vocabulary to a multiple of this x TP (as Megatron-LM)",
    "poet_block_size": "b: size of the orthogonal blocks of R and P; must divide every linear's per-rank "
                       "input and output size",
    "micro_batch_size": "samples per forward/backward on one data-parallel rank",
    "train_iters": "optimizer steps (global batches) to train for",
    "lr": "peak learning rate of the non-POET parameters (embeddings, norms, output layer)",
    "lr_decay_style": "learning-rate schedule after the warmup",
    "weight_decay": "AdamW weight decay of the non-POET parameters (the POET factors get none)",
    "adam_beta1": "Adam beta1 (all parameters)",
    "adam_beta2": "Adam beta2 (all parameters)",
    "adam_eps": "Adam epsilon (all parameters)",
    "seed": "seed of every initial tensor (the same model at any TP/PP/DP layout), the permutations, "
            "the data order and dropout",
    "use_distributed_optimizer": "shard the optimizer state over data-parallel ranks (Megatron's ZeRO-1)",
    "overlap_grad_reduce": "overlap the data-parallel gradient reduction with the backward pass",
    "tensor_model_parallel_size": "TP: ranks that split every linear layer",
    "pipeline_model_parallel_size": "PP: ranks that split the layers",
    "sequence_parallel": "split the activations outside the linears along the sequence over TP ranks",
    "split": "train,validation,test weights of the documents of every --data-path prefix",
    "mock_data": "random tokens instead of data (benchmarks; needs --vocab-size or --tokenizer-model)",
    "num_workers": "data-loader worker processes per rank",
    "save": "directory for checkpoints (iter_XXXXXXX/ subdirectories)",
    "load": "directory to resume from (its newest checkpoint); may be --save's directory before the "
            "first save",
    "save_interval": "iterations between checkpoints (default: at the end only)",
    "eval_interval": "iterations between validations (and one at the end)",
    "eval_iters": "global batches per validation; 0 = no validation",
    "log_interval": "iterations between log lines",
    "tensorboard_dir": "directory for TensorBoard scalars",
}


# Metavars that say more than the flag's name.
FLAG_METAVAR = {
    "poet_neumann_terms": "K|exact", "data_path": "PREFIX", "split": "A,B,C", "tokenizer_model": "PATH",
    "data_cache_path": "DIR", "save": "DIR", "load": "DIR", "tensorboard_dir": "DIR", "deepspeed_config": "PATH",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's default appended to its help; ``N``/``X`` metavars for integers and numbers."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "default:" in text:
            return text
        return f"{text} (default: {_default_text(action)})".lstrip()

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return {int: "N", float: "X"}.get(action.type, action.dest.upper())


def _default_text(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        on, off = action.option_strings
        return on if action.default else off
    if action.nargs == 0:  # a switch (store_true / store_false / store_const)
        return "off"
    if action.default is None:
        return "unset"
    return "%(default)s"  # argparse fills it in (and escapes nothing else)


def document(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give the flags without help their :data:`FLAG_HELP` text; set the formatter and the launch help."""
    for action in parser._actions:
        if not action.help and action.dest in FLAG_HELP:
            action.help = FLAG_HELP[action.dest]
        if action.metavar is None and action.dest in FLAG_METAVAR:
            action.metavar = FLAG_METAVAR[action.dest]
        if isinstance(action, argparse.BooleanOptionalAction) and action.help:
            # Python 3.11's BooleanOptionalAction appends "(default: True)"; the formatter says it better.
            action.help = action.help.replace(" (default: %(default)s)", "")
    parser.formatter_class = HelpFormatter
    parser.epilog = LAUNCH_HELP
    parser.usage = "%(prog)s [flags]   (flags as in Megatron-LM, plus the POET flags; all listed below)"
    return parser
