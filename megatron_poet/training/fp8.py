"""FP8 flags of the pretraining program (Megatron's names), their checks, and FP8 for the run's model.

``--fp8-format e4m3|hybrid`` turns FP8 on; ``--fp8-recipe tensorwise|rowwise|blockwise`` picks the
scales (default :data:`~megatron_poet.poet.fp8.DEFAULT_RECIPE`); ``--fp8-backend`` forces a
backend (default: chosen automatically, reported in the startup log). With POET, FP8 applies to
the frozen GEMM of every POET linear (:mod:`megatron_poet.poet.fp8`); with ``--no-poet`` it is
Megatron's own FP8 through Transformer Engine's linears (TransformerConfig ``fp8``/``fp8_recipe``),
which needs TE on a GPU. Every unsupported combination is refused before any work.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from megatron_poet.poet.fp8 import BACKENDS, DEFAULT_RECIPE, FORMATS, RECIPES, FP8Config, enable_fp8, shape_problems
from megatron_poet.poet.fp8.backends import TE_RECIPES, resolve_backend, te_installed
from megatron_poet.poet.optim import poet_modules


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``FP8`` flag group."""
    g = parser.add_argument_group("FP8")
    g.add_argument("--fp8-format", choices=FORMATS, default=None,
                   help="train the frozen GEMM of every POET linear in FP8 (with --no-poet: Megatron's linears, "
                        "via Transformer Engine): e4m3 everywhere, or hybrid = e4m3 forward, e5m2 gradients; "
                        "needs --bf16; default: off")
    g.add_argument("--fp8-recipe", choices=RECIPES, default=None,
                   help=f"scales: one per tensor, per row (token / output feature), or per 1x128 / 128x128 tile; "
                        f"default: {DEFAULT_RECIPE} (docs/FP8.md: the most accurate that runs everywhere)")
    g.add_argument("--fp8-backend", choices=BACKENDS, default=None,
                   help="auto: Transformer Engine on a GPU where installed, else torch._scaled_mm where it takes "
                        "the recipe, else the emulation (dequantize + bf16/fp32 GEMM); default: auto")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def fp8_arg_errors(args: argparse.Namespace) -> list[str]:
    """Every problem of the FP8 flags with the rest of the command line (empty: none). Fills the defaults."""
    if args.fp8_format is None:
        given = [flag for flag, value in (("--fp8-recipe", args.fp8_recipe), ("--fp8-backend", args.fp8_backend))
                 if value is not None]
        return [f"{' and '.join(given)} need --fp8-format (FP8 is off without it)"] if given else []
    args.fp8_recipe = args.fp8_recipe or DEFAULT_RECIPE
    args.fp8_backend = args.fp8_backend or "auto"
    errors = []
    if not args.bf16:
        errors.append("--fp8-format needs --bf16: the FP8 GEMM takes and returns bf16 activations "
                      "(FP8 with fp32 training is not supported)")
    if args.deepspeed:
        errors.append("--fp8-format is implemented for the megatron-core engine, not with --deepspeed")
    if not args.poet:
        return errors + _megatron_fp8_errors(args)
    try:
        resolve_backend(args.fp8_backend, args.fp8_recipe, _device())
    except ValueError as e:
        errors.append(f"--fp8-backend {args.fp8_backend}: {e}")
    return errors + _shape_errors(args)


def _megatron_fp8_errors(args: argparse.Namespace) -> list[str]:
    """``--no-poet``: Megatron's FP8 linears are Transformer Engine's."""
    errors = []
    if not (te_installed() and torch.cuda.is_available()):
        errors.append("--fp8-format with --no-poet runs Megatron's own linears in FP8, which needs Transformer "
                      "Engine on a GPU (not available here); with POET (drop --no-poet) FP8 runs POET's frozen "
                      "GEMM on any device")
    if args.fp8_recipe not in TE_RECIPES:
        errors.append(f"--fp8-recipe {args.fp8_recipe} is a POET recipe; Megatron's TE linears (--no-poet) take "
                      f"{' or '.join(TE_RECIPES)}")
    if args.fp8_backend not in ("auto", "te"):
        errors.append(f"--fp8-backend {args.fp8_backend} applies to POET layers; --no-poet uses Transformer Engine")
    return errors


def _shape_errors(args: argparse.Namespace) -> list[str]:
    """The FP8 GEMM's shape rules (:func:`~megatron_poet.poet.fp8.shape_problems`) for every linear's shard."""
    from .arguments import linear_shapes, poet_config

    try:
        groups = poet_config(args).permutation_groups
    except ValueError:
        return []  # an invalid POET configuration: reported by the POET checks
    tp = args.tensor_model_parallel_size
    errors = []
    for name, d_in, d_out, parallel, parts in linear_shapes(args):
        if d_in % tp or d_out % (tp * parts):
            continue  # reported by the layout checks
        part_size = d_out // parts if parallel == "column" else d_in
        local_out, local_in = (d_out // tp, d_in) if parallel == "column" else (d_out, d_in // tp)
        # as the layers' tensor_parallel_layout(): the group size matters only when sharded
        group_size = part_size // groups if tp > 1 and part_size % groups == 0 else None
        errors += [f"{name}: {p}" for p in shape_problems(local_out, local_in, args.fp8_recipe, group_size)]
    if errors:
        errors.append("change --fp8-recipe or the model sizes (--hidden-size, --ffn-hidden-size, --kv-channels, "
                      "--tensor-model-parallel-size, --poet-permutation-groups)")
    return errors


def transformer_fp8_fields(args: argparse.Namespace) -> dict:
    """TransformerConfig fields for Megatron's own FP8 (``--no-poet`` with Transformer Engine), else none."""
    if args.fp8_format is None or args.poet:
        return {}  # POET's FP8 lives in the POET layers; Megatron's other layers stay bf16
    return {"fp8": args.fp8_format, "fp8_recipe": args.fp8_recipe}


def enable_run_fp8(args: argparse.Namespace, model: nn.Module) -> None:
    """Put the frozen GEMMs of the run's POET layers in FP8 (with ``--fp8-format`` and POET)."""
    if args.fp8_format is not None and args.poet:
        enable_fp8(model, FP8Config(args.fp8_format, args.fp8_recipe, args.fp8_backend))


def describe_run_fp8(args: argparse.Namespace, model_chunks: list[nn.Module]) -> str:
    """The startup log's FP8 part: format, recipe, backend and why it was chosen."""
    if args.fp8_format is None:
        return "off"
    if not args.poet:
        return f"{args.fp8_format}, {args.fp8_recipe} scales, Megatron's Transformer Engine linears"
    layers = [layer for chunk in model_chunks for layer in poet_modules(chunk)]
    return f"{layers[0].fp8.describe()}, {len(layers)} POET layers"
