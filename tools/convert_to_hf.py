#!/usr/bin/env python
"""Convert a checkpoint of the training program to a Hugging Face model directory.

  python tools/convert_to_hf.py --load checkpoints/run1 --output hf/run1
  python tools/convert_to_hf.py --load checkpoints/run1 --output hf/run1 --iteration 2000 --dtype bf16

Reads a checkpoint saved at any tensor-parallel size, or by the DeepSpeed engine at any ZeRO
stage, in one CPU process (no GPU needed),
folds every POET layer into its dense weight P·A0·R in fp32, and writes config.json,
generation_config.json, model.safetensors (sharded with model.safetensors.index.json above
--max-shard-size) and the training tokenizer, loadable with
transformers.AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained.
Llama-style runs (RMSNorm, SwiGLU, RoPE) become LlamaForCausalLM, GPT-2-style runs
(LayerNorm, GeLU, learned positions) GPT2LMHeadModel. Nothing is unpickled beyond plain data, and a
checkpoint holding NaN or inf values is refused (naming the tensors) unless --allow-non-finite.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_poet.library_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before megatron-core is imported
from megatron_poet.checkpoint import CheckpointReadError  # noqa: E402
from megatron_poet.export.from_checkpoint import convert_checkpoint  # noqa: E402
from megatron_poet.export.spec import UnsupportedModelError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True,
                        help="the training run's --save directory (or one iter_XXXXXXX directory)")
    parser.add_argument("--output", required=True, help="Hugging Face model directory to write")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest checkpoint")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="storage dtype of the weights (folding is always done in fp32)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json or directory to ship; default: the one the run recorded")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="shard model.safetensors above this size (e.g. 5GB, 500MB)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="export even if the checkpoint holds NaN/inf values (refused by default)")
    args = parser.parse_args(argv)
    try:
        result = convert_checkpoint(args.load, args.output, iteration=args.iteration, dtype=args.dtype,
                                    tokenizer=args.tokenizer, max_shard_size=args.max_shard_size,
                                    progress=args.progress, allow_non_finite=args.allow_non_finite)
    except (CheckpointReadError, UnsupportedModelError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, value in result.assumed.items():
        print(f"warning: the checkpoint does not record --{name.replace('_', '-')}; assumed the training "
              f"default {value!r}", file=sys.stderr)
    spec = result.spec
    print(f"wrote {args.output}: {spec.architecture}-style model ({spec.num_layers} layers, hidden "
          f"{spec.hidden_size}, vocabulary {spec.vocab_size}, {result.poet_layers} POET layers folded) "
          f"from {result.checkpoint}"
          + ("" if result.tokenizer else "; no tokenizer (the run used none)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
