#!/usr/bin/env bash
""":"
exec "$(command -v python || command -v python3)" "$0" "$@"
":"""
# Llama-style ~1.2B model (Llama-3.2-1B shape) pretrained with POET on ONE H100 (80 GB).
#
#   DATA_PATH=/data/c4_text_document TOKENIZER=/models/llama3-tokenizer \
#   CHECKPOINT_PATH=/ckpt/llama1b-poet TENSORBOARD_DIR=/tb/llama1b-poet \
#   bash examples/pretrain_llama_1b_h100.sh [extra flags]
#
# Recipe (docs/ALGORITHM.md §3): POET-BS block 256 with Adam lr 1e-3 and no weight decay on the
# factors, AdamW lr 1e-3 (cosine to 1%) on embeddings/norms/output, clip 0.1 ramped back over
# 10 steps after each merge, merge every 400 steps. bf16 with fp32 main params; the distributed
# optimizer shards nothing on one GPU but keeps the same flags as the multi-node script.
#
# Like examples/pretrain_gpt_poet.sh, a shell script and a Python program at once (bash or torchrun).
# Environment: DATA_PATH and TOKENIZER (required); CHECKPOINT_PATH (default checkpoints/llama1b-poet,
# created by the first save, resumed from afterwards); TENSORBOARD_DIR (default CHECKPOINT_PATH/tensorboard);
# GPUS_PER_NODE (default 1); MASTER_PORT (default: a free port).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_poet.launch import run_script  # noqa: E402

FLAGS = [
    "--num-layers", "16", "--hidden-size", "2048", "--ffn-hidden-size", "8192",
    "--num-attention-heads", "32", "--num-query-groups", "8", "--seq-length", "2048",
    "--model-style", "llama", "--rotary-base", "500000",
    "--poet", "--poet-block-size", "256", "--poet-merge-interval", "400", "--poet-neumann-terms", "3",
    "--poet-lr", "1e-3", "--poet-mode", "fast", "--poet-variant", "bs", "--poet-init", "normalized",
    "--poet-clip-ramp-iters", "10",
    "--micro-batch-size", "4", "--global-batch-size", "256", "--train-iters", "50000",
    "--lr", "1e-3", "--min-lr", "1e-5", "--lr-warmup-iters", "2000", "--lr-decay-style", "cosine",
    "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "0.1",
    "--bf16", "--use-distributed-optimizer", "--seed", "1234",
    "--tokenizer-type", "HuggingFaceTokenizer", "--split", "969,30,1", "--num-workers", "2",
    "--save-interval", "1000", "--log-interval", "10", "--eval-interval", "1000", "--eval-iters", "20",
]

if __name__ == "__main__":
    sys.exit(run_script("examples/pretrain_llama_1b_h100.sh", FLAGS, sys.argv[1:], gpus_per_node=1,
                        data="required", checkpoint="checkpoints/llama1b-poet", tensorboard="checkpoint"))
