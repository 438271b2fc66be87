"""What every checkpoint records besides tensors: the model's arguments, the layout, the RNG states."""
from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch

# Arguments that define the model's function: a --load checkpoint must agree on all of them.
SHAPE_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "model_style", "max_position_embeddings", "rotary_base", "poet", "poet_block_size",
    "poet_variant", "poet_neumann_terms", "vocab_size_unpadded", "poet_permutation_groups",
    # megatron_poet.training.architecture.FLAGS (checkpoints written before them hold the defaults)
    "norm_epsilon", "untie_embeddings_and_output_weights", "use_rope_scaling", "rope_scaling_factor",
    "rotary_seq_len_interpolation_factor", "openai_gelu",
    # How A0 is stored (checkpoints written before 8-bit storage hold the native one).
    "poet_a0_storage", "poet_a0_group_size",
    # MoE's shape (megatron_poet.training.moe; checkpoints written before MoE are dense)
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size",
)
# Recorded too, for tools reading the checkpoint (the export ships the tokenizer and the dropout, and
# builds the model in the dtype its A0 is stored in: the run's, or fp32 where it kept an fp32 master)
# and for the resume checks (the distributed optimizer's state follows the expert-parallel layout).
RECORDED_ARGS = ("tokenizer_type", "tokenizer_model", "hidden_dropout", "attention_dropout",
                 "expert_model_parallel_size", "bf16", "poet_fp32_master_a0")


def shape_args(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in SHAPE_ARGS}


def saved_shape_args(saved: dict) -> dict:
    """A checkpoint's recorded :data:`SHAPE_ARGS`, with what checkpoints written before the architecture
    flags existed were built with (their values then) where it records none."""
    legacy = {"norm_epsilon": 1e-5, "untie_embeddings_and_output_weights": saved.get("model_style") == "llama",
              "use_rope_scaling": False, "rope_scaling_factor": 8.0, "rotary_seq_len_interpolation_factor": None,
              "openai_gelu": False, "poet_a0_storage": "native", "poet_a0_group_size": 256,
              "num_experts": None, "moe_router_topk": 2, "moe_ffn_hidden_size": None}
    return {name: saved.get(name, legacy.get(name)) for name in SHAPE_ARGS}


def recorded_args(args: argparse.Namespace) -> dict:
    """Plain values saved as a checkpoint's ``args``: :data:`SHAPE_ARGS`, :data:`RECORDED_ARGS` and
    ``padded_vocab_size`` (set on ``args`` by the training program)."""
    recorded = shape_args(args)
    recorded.update({name: getattr(args, name) for name in RECORDED_ARGS})
    recorded["padded_vocab_size"] = args.padded_vocab_size
    if recorded["tokenizer_model"]:
        recorded["tokenizer_model"] = os.path.abspath(recorded["tokenizer_model"])
    return recorded


def layout() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``((pp, tp, dp) sizes, (pp, tp, dp) ranks)`` of this process."""
    from megatron.core import parallel_state as ps

    sizes = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    ranks = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_data_parallel_rank())
    return sizes, ranks


def rng_state(plain: bool = False) -> dict:
    """This rank's RNG states (Python, numpy, torch, CUDA, megatron's tracker); with ``plain``, numpy's
    as plain numbers (loadable with ``weights_only=True``)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if plain:
        name, keys, pos, has_gauss, cached = state["numpy"]
        state["numpy"] = (name, keys.tolist(), pos, has_gauss, cached)
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (either form)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    name, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate(state["random"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
