#!/usr/bin/env bash
# Pretrain a GPT with POET linear layers on megatron-core: one CPU, one GPU, or many nodes.
#
#   bash examples/pretrain_gpt_poet.sh                       # small POET GPT, built-in corpus, a few minutes on CPU
#   bash examples/pretrain_gpt_poet.sh --train-iters 50 --hidden-size 128   # any flag overrides the defaults below
#   bash examples/pretrain_gpt_poet.sh --no-poet             # the AdamW baseline with Megatron's own linears
#
# Environment (single-node defaults; set them on every node for multi-node runs):
#   GPUS_PER_NODE  processes per node (default: number of GPUs, or 1 without GPUs)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT     torchrun rendezvous (1, 0, localhost, 29500)
#   DATA_PATH      megatron data prefix(es) (.bin/.idx); unset = the built-in corpus (generated and cached)
#   TOKENIZER      tokenizer.json or directory the data was preprocessed with (needed with DATA_PATH)
#   CHECKPOINT_PATH  save/resume directory (unset = no checkpoints)
#   TENSORBOARD_DIR  TensorBoard log directory (unset = none)
# NCCL is used on GPUs, gloo on CPUs (chosen by the program).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}

# Small Llama-style model (RMSNorm, SwiGLU, RoPE), CPU-friendly.
MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 384 --num-attention-heads 4
    --seq-length 128 --model-style llama
)
POET_ARGS=(
    --poet --poet-block-size 32 --poet-merge-interval 50 --poet-neumann-terms 3
    --poet-lr 3e-3 --poet-mode fast --poet-clip-ramp-iters 10
)
TRAIN_ARGS=(
    --micro-batch-size 8 --global-batch-size 16 --train-iters 300
    --lr 3e-3 --min-lr 3e-5 --lr-warmup-iters 15 --lr-decay-style cosine
    --weight-decay 0.1 --clip-grad 1.0 --seed 1234
)
LOG_ARGS=(--log-interval 10 --eval-interval 100 --eval-iters 10)

DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then
    DATA_ARGS+=(--data-path ${DATA_PATH} --tokenizer-model "${TOKENIZER:?set TOKENIZER to the tokenizer of DATA_PATH}")
fi
CKPT_ARGS=()
if [ -n "${CHECKPOINT_PATH:-}" ]; then
    CKPT_ARGS+=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 100)
fi
if [ -n "${TENSORBOARD_DIR:-}" ]; then
    LOG_ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR")
fi

exec python -m torch.distributed.run \
    --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_poet.training.pretrain \
    "${MODEL_ARGS[@]}" "${POET_ARGS[@]}" "${TRAIN_ARGS[@]}" "${LOG_ARGS[@]}" \
    ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} ${CKPT_ARGS[@]+"${CKPT_ARGS[@]}"} "$@"
