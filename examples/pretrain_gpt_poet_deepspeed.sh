#!/usr/bin/env bash
# Pretrain a GPT with POET linear layers under DeepSpeed ZeRO (data parallelism): the same program,
# model and flags as examples/pretrain_gpt_poet.sh, with DeepSpeed as the training engine.
#
#   bash examples/pretrain_gpt_poet_deepspeed.sh                  # ZeRO-3 (A0 sharded across ranks)
#   ZERO_STAGE=1 bash examples/pretrain_gpt_poet_deepspeed.sh     # examples/ds_zero1.json
#   bash examples/pretrain_gpt_poet_deepspeed.sh --train-iters 50 # any flag overrides the defaults
#
# Environment: as examples/pretrain_gpt_poet.sh (GPUS_PER_NODE, NNODES, DATA_PATH, CHECKPOINT_PATH, ...) plus
#   ZERO_STAGE     1, 2 or 3 (default 3): uses examples/ds_zero${ZERO_STAGE}.json
#   DS_CONFIG      another DeepSpeed JSON config (overrides ZERO_STAGE)
# Batch sizes, gradient clipping and bf16 come from the program's flags (a config may repeat them,
# but must agree); DeepSpeed needs tensor- and pipeline-parallel size 1.
set -euo pipefail
cd "$(dirname "$0")/.."
DS_CONFIG=${DS_CONFIG:-examples/ds_zero${ZERO_STAGE:-3}.json}
exec bash examples/pretrain_gpt_poet.sh --deepspeed --deepspeed-config "$DS_CONFIG" "$@"
