"""Architecture flags beyond the two styles' defaults (Megatron-LM's names): what a released
Hugging Face Llama- or GPT-2-family model needs to be represented exactly.

- ``--norm-epsilon``: the RMSNorm / LayerNorm epsilon (Llama-2: 1e-5, Mistral/Qwen: 1e-6).
- ``--untie-embeddings-and-output-weights`` / ``--tie-embeddings-and-output-weights``: the output
  layer's own weight, or the embedding's (default: untied for llama, tied for gpt2).
- ``--use-rope-scaling --rope-scaling-factor F``: Llama-3.1's frequency-dependent RoPE scaling
  (megatron-core's, with its fixed low/high frequency factors 1 and 4 and original context 8192).
- ``--rotary-seq-len-interpolation-factor F``: linear RoPE position interpolation (positions / F).
- ``--openai-gelu``: GPT-2's tanh-approximated GELU (Hugging Face's ``gelu_new``) instead of erf GELU.

All of them change the model's function, so checkpoints record them (:data:`FLAGS`). Also here,
changing how, not what, the model computes: ``--attention-backend`` (Megatron-LM's flag; see
:mod:`megatron_poet.megatron.spec`) and ``--compile``.
"""
from __future__ import annotations

import argparse
import importlib.util

# Argument names recorded in checkpoints (they define the function; see megatron_poet.checkpoint.record).
FLAGS = ("norm_epsilon", "untie_embeddings_and_output_weights", "use_rope_scaling", "rope_scaling_factor",
         "rotary_seq_len_interpolation_factor", "openai_gelu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("architecture (for imported Hugging Face models)")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="epsilon of every RMSNorm / LayerNorm")
    tie = g.add_mutually_exclusive_group()
    tie.add_argument("--untie-embeddings-and-output-weights", dest="untie_embeddings_and_output_weights",
                     action="store_const", const=True, default=None,
                     help="the output layer has its own weight (default for --model-style llama)")
    tie.add_argument("--tie-embeddings-and-output-weights", dest="untie_embeddings_and_output_weights",
                     action="store_const", const=False,
                     help="the output layer multiplies by the embedding (default for --model-style gpt2)")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama-3.1-style RoPE frequency scaling (low/high frequency factors 1/4, original context 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, help="with --use-rope-scaling")
    g.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                   help="linear RoPE position interpolation: positions are divided by this factor")
    g.add_argument("--attention-backend", choices=("sdpa", "local", "te", "auto", "flash", "fused", "unfused"),
                   default="auto",
                   help="core attention: sdpa (PyTorch's fused attention, no SxS matrix), local (Megatron's "
                        "DotProductAttention, materializes SxS), te (Transformer Engine's); Megatron-LM's names "
                        "also work: auto -> sdpa, flash/fused -> te, unfused -> local")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile every transformer layer (Inductor: C++ on CPUs, Triton on GPUs; POET's "
                        "kernels stay custom ops); the first iterations pay the compilation")
    g.add_argument("--openai-gelu", action="store_true",
                   help="gpt2 style: GPT-2's tanh-approximated GELU (Hugging Face 'gelu_new') instead of erf GELU")


ATTENTION_ALIASES = {"auto": "sdpa", "flash": "te", "fused": "te", "unfused": "local"}


def attention_backend(args: argparse.Namespace) -> str:
    """"sdpa", "local" or "te" from ``--attention-backend`` (Megatron-LM's names resolved)."""
    return ATTENTION_ALIASES.get(args.attention_backend, args.attention_backend)


def fill_defaults(args: argparse.Namespace) -> None:
    if args.untie_embeddings_and_output_weights is None:
        args.untie_embeddings_and_output_weights = args.model_style == "llama"
    args.attention_backend = attention_backend(args)


def argument_errors(args: argparse.Namespace) -> list[str]:
    """Architecture flags that do not fit the model style, before any work."""
    errors = []
    rope = args.use_rope_scaling or args.rotary_seq_len_interpolation_factor is not None
    if args.model_style != "llama" and rope:
        errors.append("--use-rope-scaling / --rotary-seq-len-interpolation-factor need --model-style llama (RoPE)")
    if args.use_rope_scaling and args.rotary_seq_len_interpolation_factor is not None:
        errors.append("give either --use-rope-scaling or --rotary-seq-len-interpolation-factor, not both")
    if args.model_style != "gpt2" and args.openai_gelu:
        errors.append("--openai-gelu needs --model-style gpt2 (llama style uses SwiGLU)")
    if args.attention_backend == "te" and importlib.util.find_spec("transformer_engine") is None:
        errors.append("--attention-backend te needs Transformer Engine (pip install -e \".[te]\" on a GPU machine); "
                      "use sdpa or local")
    if not args.norm_epsilon > 0:
        errors.append(f"--norm-epsilon must be > 0, got {args.norm_epsilon}")
    for flag, value in (("--rope-scaling-factor", args.rope_scaling_factor),
                        ("--rotary-seq-len-interpolation-factor", args.rotary_seq_len_interpolation_factor)):
        if value is not None and not value > 0:
            errors.append(f"{flag} must be > 0, got {value}")
    return errors
