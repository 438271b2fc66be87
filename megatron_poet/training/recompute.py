"""Activation recomputation, Megatron-LM's flags through megatron-core's ``TransformerConfig``.

- ``--recompute-granularity full --recompute-method uniform|block --recompute-num-layers N``: the
  inputs of groups of transformer layers are kept and the layers recomputed in backward (uniform:
  every group of N layers; block: the first N layers of each pipeline stage);
- ``--recompute-granularity selective [--recompute-modules core_attn mlp layernorm ...]``: only
  those parts of each layer (megatron's default: ``core_attn``; with the sdpa attention that keeps
  no ``S x S`` matrix, ``mlp`` and ``layernorm`` are the ones that save memory; ``layernorm`` needs
  Transformer Engine in megatron-core);
- ``--distribute-saved-activations``: the kept layer inputs split over tensor-parallel ranks.

POET layers recompute like any other (the step's shared blocks serve the recomputed forward too),
in both modes, under TP/SP/PP/virtual PP and with the DeepSpeed engine. A combination megatron-core
refuses is reported before any work, naming the flag.
"""
from __future__ import annotations

import argparse
import importlib.util

MODULES = ("core_attn", "mlp", "layernorm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("activation recomputation")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="full: recompute whole transformer layers in backward; selective: parts of each layer")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                   help="with full: uniform (groups of --recompute-num-layers layers) or block (the first "
                        "--recompute-num-layers layers of each pipeline stage)")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="with full: see --recompute-method")
    g.add_argument("--recompute-modules", nargs="+", choices=MODULES, default=None,
                   help="with selective: the parts recomputed (default: core_attn)")
    g.add_argument("--distribute-saved-activations", action="store_true",
                   help="with full: split the kept layer inputs over tensor-parallel ranks")


def argument_errors(args: argparse.Namespace) -> list[str]:
    """Flag combinations megatron-core refuses, in our words, before any work."""
    errors, granularity = [], args.recompute_granularity
    layers_per_stage = args.num_layers // max(args.pipeline_model_parallel_size, 1)
    if granularity == "full":
        if args.recompute_method is None or args.recompute_num_layers is None:
            errors.append("--recompute-granularity full needs --recompute-method uniform|block and "
                          "--recompute-num-layers N")
        elif not 1 <= args.recompute_num_layers <= layers_per_stage:
            errors.append(f"--recompute-num-layers {args.recompute_num_layers} must be between 1 and the "
                          f"{layers_per_stage} layers of each pipeline stage")
        elif args.recompute_method == "uniform" and layers_per_stage % args.recompute_num_layers:
            errors.append(f"--recompute-method uniform: --recompute-num-layers {args.recompute_num_layers} must "
                          f"divide the {layers_per_stage} layers of each pipeline stage")
        if args.distribute_saved_activations and args.sequence_parallel:
            errors.append("--distribute-saved-activations cannot be used with --sequence-parallel (the layer "
                          "inputs are already split)")
    else:
        for flag, value in (("--recompute-method", args.recompute_method),
                            ("--recompute-num-layers", args.recompute_num_layers),
                            ("--distribute-saved-activations", args.distribute_saved_activations or None)):
            if value is not None:
                errors.append(f"{flag} needs --recompute-granularity full")
    if args.recompute_modules is not None and granularity != "selective":
        errors.append("--recompute-modules needs --recompute-granularity selective")
    if "layernorm" in (args.recompute_modules or ()) and importlib.util.find_spec("transformer_engine") is None:
        # megatron-core's CheckpointWithoutOutput takes its Transformer Engine path even without FP8
        errors.append("--recompute-modules layernorm needs Transformer Engine (megatron-core's norm recompute "
                      "runs through it); recompute mlp / core_attn, or the full layers")
    return errors


def config_fields(args: argparse.Namespace) -> dict:
    """The ``TransformerConfig`` fields of these flags."""
    fields = dict(recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                  recompute_num_layers=args.recompute_num_layers,
                  distribute_saved_activations=args.distribute_saved_activations)
    if args.recompute_modules is not None:
        fields["recompute_modules"] = list(args.recompute_modules)
    return fields
