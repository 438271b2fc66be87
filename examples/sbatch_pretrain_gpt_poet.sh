#!/usr/bin/env bash
# A multi-node POET pretraining job under SLURM: one task per GPU, started by srun.
#
#   sbatch examples/sbatch_pretrain_gpt_poet.sh                 # 2 nodes x 8 GPUs, the flags below
#   sbatch --nodes 4 examples/sbatch_pretrain_gpt_poet.sh --train-iters 20000   # flags after the file override
#
# Each task reads its rank, world size and local rank from SLURM (SLURM_PROCID, SLURM_NTASKS,
# SLURM_LOCALID) and meets the others at the first host of SLURM_NODELIST on MASTER_PORT
# (megatron_poet/training/slurm.py), exactly as under torchrun. Set DATA_PATH/TOKENIZER to your
# preprocessed corpus (tools/preprocess_data.py) and CHECKPOINT_PATH to a shared file system.
# Requeued or resubmitted, the job resumes from CHECKPOINT_PATH (SIGTERM before the time limit saves).
#
#SBATCH --job-name=poet-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${DATA_PATH:?set DATA_PATH to the .bin/.idx prefix of your corpus}"
: "${TOKENIZER:?set TOKENIZER to the tokenizer the corpus was preprocessed with}"
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/$SLURM_JOB_NAME}
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# A Llama-style 1B model with POET-X (mem) layers; TP inside a node, DP across nodes.
FLAGS=(
  --model-style llama --num-layers 16 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16
  --seq-length 2048 --max-position-embeddings 2048
  --poet --poet-block-size 256 --poet-merge-interval 400 --poet-lr 1e-3 --poet-mode mem --poet-clip-ramp-iters 10
  --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer --bf16
  --micro-batch-size 4 --global-batch-size 512 --train-iters 50000
  --lr 1e-3 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.1 --clip-grad 1.0
  --data-path "$DATA_PATH" --tokenizer-model "$TOKENIZER"
  --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 1000 --keep-last-checkpoints 3
  --log-interval 10 --eval-interval 1000 --eval-iters 20 --tensorboard-dir "$CHECKPOINT_PATH/tensorboard"
  --check-weight-hash-across-dp-replicas-interval 1000 --manual-gc --manual-gc-interval 100
)

srun --kill-on-bad-exit=1 python -m megatron_poet.training.pretrain "${FLAGS[@]}" "$@"
