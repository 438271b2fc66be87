"""Build the GPT model of a run from the parsed arguments (the one place the program makes a model).

Delegates to :mod:`megatron_poet.megatron.model`: ``--model-style llama``
(RMSNorm, SwiGLU, RoPE, GQA, no biases, untied embeddings) or ``gpt2``
(LayerNorm, GELU, biases, learned positions, tied embeddings), with the
architecture flags of :mod:`.architecture`; ``--no-poet`` keeps Megatron's own
linears (the AdamW baseline).
"""
from __future__ import annotations

import argparse

import torch

from . import architecture, moe, recompute
from .arguments import poet_config
from .fp8 import enable_run_fp8, transformer_fp8_fields


def transformer_config(args: argparse.Namespace):
    """megatron-core ``TransformerConfig`` of the run (Megatron's flag semantics)."""
    from megatron_poet.megatron.model import gpt2_config, llama_config

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    common = dict(
        ffn_hidden_size=args.ffn_hidden_size, num_query_groups=args.num_query_groups, kv_channels=args.kv_channels,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype,
        # Fusions need Apex/TE kernels; off so the same config runs on any device.
        bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False,
        layernorm_epsilon=args.norm_epsilon,
        **recompute.config_fields(args),
        **moe.config_fields(args),
        **transformer_fp8_fields(args),
    )
    if args.model_style == "llama":
        return llama_config(args.num_layers, args.hidden_size, args.num_attention_heads, **common)
    if args.openai_gelu:
        from megatron.core.transformer.utils import openai_gelu

        common["activation_func"] = openai_gelu
    return gpt2_config(args.num_layers, args.hidden_size, args.num_attention_heads, **common)


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Megatron's padding: a multiple of ``make_vocab_size_divisible_by x TP`` (even vocab shards)."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def build_model(args: argparse.Namespace, vocab_size: int, vp_stage: int | None = None, config=None,
                partitioned=None):
    """A megatron-core ``GPTModel`` for this pipeline stage (virtual stage ``vp_stage``) on the current device.

    Args:
        args: parsed arguments (model sizes, ``--model-style``, POET flags, ``--seed``).
        vocab_size: padded vocabulary size (:func:`padded_vocab_size`).
        vp_stage: the virtual pipeline stage (``None`` without ``--num-layers-per-virtual-pipeline-stage``).
        config: the ``TransformerConfig`` to use (default: a new :func:`transformer_config`).
        partitioned: a :class:`~megatron_poet.megatron.model.PartitionedBuild` to build the model
            partitioned across ranks (the engine's choice: :func:`~.engine.partitioned_construction`);
            ``None``: built whole.
    The same ``--seed`` gives the same model at any parallel layout.
    Raises ValueError for a layout the layers cannot take (listed by the megatron builders).
    With ``--fp8-format`` the POET layers' frozen GEMMs run in FP8 (:mod:`.fp8`).
    """
    from megatron_poet.megatron.model import build_gpt2_model, build_llama_model

    config = config or transformer_config(args)
    # The real vocabulary: its padding is zero and masked, so it never changes the model.
    common = dict(seed=args.seed, vp_stage=vp_stage, unpadded_vocab_size=getattr(args, "vocab_size_unpadded", None),
                  partitioned=partitioned,
                  tie_embeddings=not args.untie_embeddings_and_output_weights, attention=architecture.attention_backend(args))
    if args.model_style == "llama":
        model = build_llama_model(config, poet_config(args), vocab_size, args.max_position_embeddings,
                                  rotary_base=args.rotary_base,
                                  rope_scaling_factor=args.rope_scaling_factor if args.use_rope_scaling else None,
                                  seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor, **common)
    else:
        model = build_gpt2_model(config, poet_config(args), vocab_size, args.max_position_embeddings, **common)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = model.to(device)
    enable_run_fp8(args, model)
    if args.compile:
        for layer in model.decoder.layers:  # one compiled graph per layer: sdpa attention breaks none
            layer.compile()
    return model


def build_model_chunks(args: argparse.Namespace, vocab_size: int, partitioned=None) -> list:
    """This rank's model chunks in pipeline order: one per virtual pipeline stage (one without
    virtual stages), sharing one ``TransformerConfig`` (megatron's schedules read it from the first).
    ``partitioned``: as :func:`build_model`."""
    config = transformer_config(args)
    stages = args.virtual_pipeline_model_parallel_size
    return [build_model(args, vocab_size, vp_stage, config, partitioned)
            for vp_stage in (range(stages) if stages else [None])]
