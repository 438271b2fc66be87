#!/usr/bin/env bash
""":"
exec "$(command -v python || command -v python3)" "$0" "$@"
":"""
# The POET papers' LLaMA-60M run on C4 and its AdamW baseline (validation perplexity 25.29 vs 26.68,
# docs/ALGORITHM.md §3-4), on your preprocessed C4.
#
#   DATA_PATH=/data/c4_en_text_document TOKENIZER=/models/t5-tokenizer bash examples/reproduce_poet_llama60m.sh
#   DATA_PATH=... TOKENIZER=... bash examples/reproduce_poet_llama60m.sh --baseline      # AdamW
#   torchrun --nproc-per-node 8 examples/reproduce_poet_llama60m.sh --data-path PREFIX --tokenizer-model TOK
#
# Like examples/pretrain_gpt_poet.sh, a shell script and a Python program at once (bash or torchrun);
# flags after the file name override the recipe's. The data: C4 (en) preprocessed with
# tools/preprocess_data.py (the papers used the T5 tokenizer, 32k vocabulary): DATA_PATH (or --data-path)
# is its prefix, TOKENIZER (or --tokenizer-model) the tokenizer it was preprocessed with.
# CHECKPOINT_PATH (default checkpoints/llama60m-poet or -adamw), TENSORBOARD_DIR (default
# CHECKPOINT_PATH/tensorboard), GPUS_PER_NODE (default: all GPUs), MASTER_PORT (default: a free port).
#
# From the spec (docs/ALGORITHM.md §3): LLaMA-style h512 L8 with the papers' MLP width 1280 (a multiple of
# b), seq 256, global batch 512, 30B tokens (228,882 iterations); POET-BS b = 256, POET lr 1e-3 (Adam, no
# weight decay), base lr 1e-2 for embeddings/norms/output, cosine to 0.01x, clip 0.1 ramped back over 10
# steps after each merge, merge every 400 steps (the T_m ablation's best, 25.31), normalized Gaussian A0,
# Cayley-Neumann k = 3.
# Not in the spec (our choices; override them): 8 attention heads; the program's default warmup (5% of the
# iterations), Adam betas (0.9, 0.95) and weight decay 0.1 on the non-POET parameters; the AdamW baseline's
# lr 1e-3 with clip 1.0 (the spec gives the baseline's perplexity only); bf16 on GPUs (fp32 on CPU).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_poet.launch import run_script  # noqa: E402

TOKENS = 30_000_000_000
SEQ, GLOBAL_BATCH = 256, 512
COMMON = [
    "--num-layers", "8", "--hidden-size", "512", "--ffn-hidden-size", "1280", "--num-attention-heads", "8",
    "--seq-length", str(SEQ), "--model-style", "llama",
    "--micro-batch-size", "64", "--global-batch-size", str(GLOBAL_BATCH),
    "--train-iters", str(-(-TOKENS // (SEQ * GLOBAL_BATCH))), "--lr-decay-style", "cosine",
    "--seed", "1234", "--tokenizer-type", "HuggingFaceTokenizer",
    "--split", "969,30,1", "--num-workers", "2",
    "--log-interval", "50", "--eval-interval", "2000", "--eval-iters", "20", "--save-interval", "5000",
]
POET = [
    "--poet", "--poet-variant", "bs", "--poet-block-size", "256", "--poet-lr", "1e-3", "--lr", "1e-2",
    "--min-lr", "1e-4", "--clip-grad", "0.1", "--poet-clip-ramp-iters", "10", "--poet-merge-interval", "400",
    "--poet-init", "normalized", "--poet-neumann-terms", "3", "--poet-mode", "fast",
]
ADAMW = ["--no-poet", "--lr", "1e-3", "--min-lr", "1e-5", "--clip-grad", "1.0"]


def recipe(argv: list[str], cuda: bool) -> tuple[list[str], list[str], str, str]:
    """``(recipe flags, the user's flags, default checkpoint directory, data requirement)`` for
    ``argv`` (``--baseline``: the AdamW run; without ``--data-path`` the DATA_PATH variable is required)."""
    baseline = "--baseline" in argv
    user = [a for a in argv if a != "--baseline"]
    flags = COMMON + (ADAMW if baseline else POET) + (["--bf16"] if cuda else [])
    data = "optional" if "--data-path" in user else "required"
    return flags, user, f"checkpoints/llama60m-{'adamw' if baseline else 'poet'}", data


if __name__ == "__main__":
    import torch

    flags, user, checkpoint, data = recipe(sys.argv[1:], torch.cuda.is_available())
    sys.exit(run_script("examples/reproduce_poet_llama60m.sh", flags, user, data=data, checkpoint=checkpoint,
                        tensorboard="checkpoint"))
