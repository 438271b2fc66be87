#!/usr/bin/env python
"""Convert a Hugging Face model to a checkpoint of the training program, for continued pretraining
(or fine-tuning) with POET.

  python tools/convert_from_hf.py --hf path/to/Llama-3.2-1B --output checkpoints/llama1b-poet
  python tools/convert_from_hf.py --hf hf/gpt2 --output ckpt/gpt2 --tensor-model-parallel-size 2 --poet-block-size 64
  python tools/convert_from_hf.py --hf hf/model --output ckpt/adamw --no-poet          # the AdamW baseline

then train from it (any TP/PP layout; the model flags and the tokenizer come from the checkpoint):

  python -m megatron_poet.launch --load checkpoints/llama1b-poet --finetune --use-checkpoint-args \\
      --data-path data/corpus --save checkpoints/run1 ...

Reads Llama-family (llama; mistral without sliding window) and GPT-2 models from safetensors
(one file or shards with their index; pickle checkpoints are refused), without downloading anything.
Every POET layer holds the pretrained weight as A0 with identity factors, so training starts from
the original's function and POET's orthogonal factors keep every weight's singular values. Flags
after the known ones are the training program's (POET options, --no-poet, --tensor-model-parallel-size,
--pipeline-model-parallel-size, --make-vocab-size-divisible-by); the model's shape comes from
config.json. Nothing is written unless the whole conversion succeeds.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_poet.library_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before megatron-core is imported
from megatron_poet.hf_import import HFImportError, convert_hf_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--output", required=True, help="checkpoint directory to create (must not exist)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or tokenizer.json; default: --hf's")
    args, flags = parser.parse_known_args(argv)
    try:
        result = convert_hf_model(args.hf, args.output, flags, tokenizer=args.tokenizer)
    except HFImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = f"{result.poet_layers} POET layers starting from the pretrained weights" if result.poet_layers else \
        "Megatron's dense linears (--no-poet)"
    print(f"wrote {result.output}: {result.architecture}-style model, {result.parameters:,} weights imported, {what}; "
          f"train from it with --load {result.output} --finetune --use-checkpoint-args")
    return 0


if __name__ == "__main__":
    sys.exit(main())
