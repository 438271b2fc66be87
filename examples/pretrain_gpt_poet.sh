#!/usr/bin/env bash
""":"
exec "$(command -v python || command -v python3)" "$0" "$@"
":"""
# Pretrain a small GPT with POET linear layers on megatron-core: one CPU, GPUs, or several nodes.
#
#   bash examples/pretrain_gpt_poet.sh                     # small POET GPT, built-in corpus, 2-3 minutes on 2 CPU cores
#   bash examples/pretrain_gpt_poet.sh --train-iters 50 --hidden-size 256   # your flags override FLAGS below
#   bash examples/pretrain_gpt_poet.sh --no-poet           # the AdamW baseline with Megatron's own linears
#   torchrun --nproc-per-node 2 examples/pretrain_gpt_poet.sh [flags]        # the same under torchrun
#
# This file is both a shell script and a Python program: bash runs it with Python, which
# launches one rank per GPU (megatron_poet.launch); torchrun runs it as each rank's program.
# Both read the defaults below, and both take flags after the file name.
#
# Environment:
#   GPUS_PER_NODE    ranks on this node (default: the number of GPUs; 1 without GPUs)
#   MASTER_PORT      rendezvous port (default: a free port, so several runs can share a machine)
#   NNODES, NODE_RANK, MASTER_ADDR   several nodes: set all three (and MASTER_PORT, default 29500)
#                    on every node, NODE_RANK 0..NNODES-1, MASTER_ADDR = node 0's address
#   DATA_PATH        megatron data prefix(es) (.bin/.idx); unset = the built-in corpus (generated, cached)
#   TOKENIZER        tokenizer.json or directory the data was preprocessed with (needed with DATA_PATH)
#   CHECKPOINT_PATH  save and resume directory (created by the first save; unset = no checkpoints)
#   HF_MODEL         continue pretraining this Hugging Face model (Llama-family or GPT-2 directory): it is
#                    imported once into CHECKPOINT_PATH/hf_import (with the POET flags below) and the run
#                    starts from it (--finetune --use-checkpoint-args: its shape and tokenizer); needs
#                    DATA_PATH preprocessed with its tokenizer, and CHECKPOINT_PATH
#   TENSORBOARD_DIR  TensorBoard log directory (unset = none)
# Ctrl-C or SIGTERM: every rank finishes its iteration, saves (with CHECKPOINT_PATH) and stops.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_poet.launch import run_script  # noqa: E402

# Small Llama-style model (RMSNorm, SwiGLU, RoPE), CPU-friendly. The warmup is the program's
# default (5% of --train-iters: 15 here), so a shorter --train-iters needs nothing else.
FLAGS = [
    "--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "384", "--num-attention-heads", "4",
    "--seq-length", "128", "--model-style", "llama",
    "--poet", "--poet-block-size", "32", "--poet-merge-interval", "50", "--poet-neumann-terms", "3",
    "--poet-lr", "3e-3", "--poet-mode", "fast", "--poet-clip-ramp-iters", "10",
    "--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", "300",
    "--lr", "3e-3", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
    "--log-interval", "10", "--eval-interval", "100", "--eval-iters", "10", "--save-interval", "100",
]

if __name__ == "__main__":
    sys.exit(run_script("examples/pretrain_gpt_poet.sh", FLAGS, sys.argv[1:]))
