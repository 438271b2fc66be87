#!/usr/bin/env bash
""":"
exec "$(command -v python || command -v python3)" "$0" "$@"
":"""
# Llama-style 8B model (Llama-3-8B shape) pretrained with POET across nodes of 8 GPUs.
# Run the same command on every node with its NODE_RANK:
#
#   NNODES=4 NODE_RANK=$SLURM_NODEID MASTER_ADDR=node001 MASTER_PORT=29500 \
#   DATA_PATH=/data/c4_text_document TOKENIZER=/models/llama3-tokenizer \
#   CHECKPOINT_PATH=/shared/ckpt/llama8b-poet bash examples/pretrain_llama_8b_multinode.sh
#
# Tensor parallel 8 within a node with sequence parallelism, data parallel across nodes with the
# distributed optimizer. POET block 256 divides every per-rank shard (QKV 6144/8, FC1 2x14336/8,
# FC2 14336/8, projection 4096/8, all multiples of 256). The checkpoint directory must be on a
# filesystem shared by all nodes; it is created by the first save and resumed from afterwards.
#
# Like examples/pretrain_gpt_poet.sh, a shell script and a Python program at once (bash or torchrun).
# Environment: NNODES (default 4), NODE_RANK and MASTER_ADDR (required with several nodes),
# MASTER_PORT (default 29500), GPUS_PER_NODE (default 8), DATA_PATH, TOKENIZER, CHECKPOINT_PATH
# (required), TENSORBOARD_DIR (default CHECKPOINT_PATH/tensorboard).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_poet.launch import run_script  # noqa: E402

FLAGS = [
    "--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336",
    "--num-attention-heads", "32", "--num-query-groups", "8", "--seq-length", "4096",
    "--model-style", "llama", "--rotary-base", "500000",
    "--tensor-model-parallel-size", "8", "--sequence-parallel",
    "--poet", "--poet-block-size", "256", "--poet-merge-interval", "400", "--poet-neumann-terms", "3",
    "--poet-lr", "1e-3", "--poet-mode", "mem", "--poet-variant", "bs", "--poet-init", "normalized",
    "--poet-clip-ramp-iters", "10",
    "--micro-batch-size", "1", "--global-batch-size", "256", "--train-iters", "100000",
    "--lr", "1e-3", "--min-lr", "1e-5", "--lr-warmup-iters", "2000", "--lr-decay-style", "cosine",
    "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "0.1",
    "--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce", "--seed", "1234",
    "--tokenizer-type", "HuggingFaceTokenizer", "--split", "969,30,1", "--num-workers", "2",
    "--save-interval", "500", "--log-interval", "10", "--eval-interval", "1000", "--eval-iters", "20",
]

if __name__ == "__main__":
    sys.exit(run_script("examples/pretrain_llama_8b_multinode.sh", FLAGS, sys.argv[1:], gpus_per_node=8, nnodes=4,
                        data="required", checkpoint="required", tensorboard="checkpoint"))
