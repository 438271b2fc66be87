"""Llama-style and GPT-2-style megatron-core ``GPTModel`` builders with POET linears.

``poet=None`` builds the same model with Megatron's own linears (the AdamW
baseline). Embeddings and the output layer are always ordinary Megatron layers.
Every size/layout problem is reported by :func:`validate_model_config` before
anything is built.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from ..poet.a0_storage import group_problem
from ..poet.config import POETConfig
from . import compat
from .layers import _POETParallelLinear
from .moe import mark_expert_parameters, moe_layout_errors
from .layout_free_init import FullParameters, already_full, global_names, recording_init_methods, redraw_parameters
from .sharding import ShardedDimension, mix_seed
from .spec import gpt_block_spec
from .vocab_padding import mask_padded_logits


def llama_config(
    num_layers: int, hidden_size: int, num_attention_heads: int, num_query_groups: int, ffn_hidden_size: int,
    **overrides,
) -> TransformerConfig:
    """A Llama-style TransformerConfig: RMSNorm, SwiGLU, no biases, no dropout, GQA.

    ``overrides`` are any other TransformerConfig fields (TP size, sequence
    parallelism, dtypes, ...). RoPE and untied embeddings are set by :func:`build_llama_model`.
    """
    fields = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups, ffn_hidden_size=ffn_hidden_size, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, layernorm_epsilon=1e-5,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def gpt2_config(num_layers: int, hidden_size: int, num_attention_heads: int, **overrides) -> TransformerConfig:
    """A GPT-2-style TransformerConfig: LayerNorm, GELU MLP of width 4h, biases, dropout 0.1."""
    fields = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        ffn_hidden_size=4 * hidden_size, normalization="LayerNorm", gated_linear_unit=False,
        activation_func=F.gelu, add_bias_linear=True, hidden_dropout=0.1, attention_dropout=0.1,
        bias_activation_fusion=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def validate_model_config(config: TransformerConfig, poet: POETConfig | None, vocab_size: int | None) -> None:
    """Raise one ValueError listing every layout problem (TP divisibility, POET block sizes).

    ``vocab_size=None`` skips the vocabulary check (before the tokenizer is known).
    """
    tp = config.tensor_model_parallel_size
    heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    errors = moe_layout_errors(config, poet is not None)
    for what, value in (("num_attention_heads", heads), ("num_query_groups", groups),
                        ("ffn_hidden_size", config.ffn_hidden_size), ("vocab_size", vocab_size)):
        if value is not None and value % tp:
            errors.append(f"tensor_model_parallel_size={tp} does not divide {what}={value}")
    if poet is not None and not errors:
        kv = config.kv_channels
        glu = 2 if config.gated_linear_unit else 1
        n_groups = poet.permutation_groups or tp
        sharded = (
            ("linear_qkv", kv * (heads + 2 * groups), 1, "output_size"),
            ("linear_proj", kv * heads, 1, "input_size"),
            ("linear_fc1", config.ffn_hidden_size * glu, glu, "output_size"),
            ("linear_fc2", config.ffn_hidden_size, 1, "input_size"),
        )
        if config.num_moe_experts:  # experts split over the expert-TP ranks
            ffn, etp = config.moe_ffn_hidden_size or config.ffn_hidden_size, config.expert_tensor_parallel_size or 1
            sharded = (*sharded[:2], ("expert linear_fc1", ffn * glu, glu, "output_size", etp),
                       ("expert linear_fc2", ffn, 1, "input_size", etp))
        for layer, size, parts, what, *split in sharded:
            try:
                ShardedDimension(size, parts, *(split or [tp]), 0, n_groups, poet, layer, what)
            except ValueError as err:
                errors.append(str(err))
        try:
            poet.num_blocks(config.hidden_size, "hidden_size", "linear_qkv/proj/fc1/fc2")
        except ValueError as err:
            errors.append(str(err))
        if poet.a0_storage == "int8" and (problem := group_problem(config.hidden_size, poet.a0_group_size)):
            errors.append(f"POET layers 'linear_qkv'/'linear_fc1': {problem}")
    if errors:
        raise ValueError("invalid model layout:\n  " + "\n  ".join(errors))


@dataclass(frozen=True)
class PartitionedBuild:
    """How to build a model partitioned across ranks (DeepSpeed ZeRO-3's ``zero.Init``).

    Attributes:
        construction: a fresh context entered around megatron's constructor only, where each module's
            parameters are partitioned as soon as it is made (and whatever tensor-creation overrides it
            brings stay away from the seeded draws that follow).
        full_parameters: gives full parameters while their initial values are drawn, after construction
            (:data:`.layout_free_init.FullParameters`).
    """

    construction: Callable[[], ContextManager]
    full_parameters: FullParameters


def initialize_poet_layers(model: torch.nn.Module, seed: int, full_parameters: FullParameters = already_full) -> int:
    """Draw ``A0`` and the permutations of every POET layer from ``(seed, layer identity)``.

    The identity is the module path with the transformer layer's *global*
    ``layer_number`` in place of its stage-local index (:func:`.layout_free_init.global_names`),
    so it depends on neither the TP nor the PP layout. It is also stored as the layer's
    ``identity``, from which :class:`~megatron_poet.poet.optim.MergeScheduler` seeds its merges.
    ``full_parameters``: gives a layer's full parameters while it is drawn (see :data:`.layout_free_init.FullParameters`).
    Returns the number of POET layers initialized.
    """
    name_of = global_names(model)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, _POETParallelLinear):
            module.identity = name_of(name)
            with full_parameters(list(module.parameters())):
                module.initialize(mix_seed(seed, module.identity))
            count += 1
    return count


def _build(
    config: TransformerConfig, poet: POETConfig | None, vocab_size: int, max_sequence_length: int, seed: int,
    backend: str, vp_stage: int | None, unpadded_vocab_size: int | None, attention: str,
    partitioned: PartitionedBuild | None, **gpt_kwargs,
) -> GPTModel:
    compat.check_version()
    validate_model_config(config, poet, vocab_size)
    with recording_init_methods(config), (partitioned.construction() if partitioned else contextlib.nullcontext()):
        model = GPTModel(
            config=config,
            transformer_layer_spec=gpt_block_spec(config, poet, backend, attention),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
            **gpt_kwargs,
        )
    full_parameters = partitioned.full_parameters if partitioned else already_full
    mark_expert_parameters(model)
    redraw_parameters(model, seed, unpadded_vocab_size, full_parameters)
    if unpadded_vocab_size is not None:
        mask_padded_logits(model, unpadded_vocab_size)
    if poet is not None:
        initialize_poet_layers(model, seed, full_parameters)
    return model


def build_llama_model(
    config: TransformerConfig, poet: POETConfig | None, vocab_size: int, max_sequence_length: int,
    seed: int = 1234, backend: str = "auto", rotary_base: float = 10000, vp_stage: int | None = None,
    unpadded_vocab_size: int | None = None, tie_embeddings: bool = False, rope_scaling_factor: float | None = None,
    seq_len_interpolation_factor: float | None = None, attention: str = "sdpa",
    partitioned: PartitionedBuild | None = None,
) -> GPTModel:
    """Llama-style GPTModel (RMSNorm, SwiGLU, RoPE, GQA, no biases; untied embeddings unless ``tie_embeddings``).

    Args:
        config: from :func:`llama_config` (checked for the Llama-style fields).
        poet: POET options of the four linears per layer, or None for Megatron's linears.
        vocab_size, max_sequence_length: as GPTModel (``vocab_size``: the padded vocabulary).
        unpadded_vocab_size: the tokenizer's vocabulary; rows beyond it are padding, zero and masked
            out of the softmax, so the padding never changes the model (:mod:`.vocab_padding`).
            ``None``: every row is a token.
        seed: every initial tensor is drawn from ``(seed, its global name)``: the same model at any
            TP/PP/virtual-PP/DP layout (:mod:`.layout_free_init`).
        backend: "auto", "local" or "te"; attention: "sdpa", "local" or "te" (see :mod:`.spec`).
        vp_stage: this chunk's virtual pipeline stage (``None`` without virtual pipelining).
        rope_scaling_factor: Llama-3.1 RoPE frequency scaling with this factor (megatron-core's
            ``rope_scaling``); ``None``: none. Kept on the model as ``rope_scaling_factor`` (megatron
            does not keep it) for the export.
        seq_len_interpolation_factor: linear RoPE position interpolation (``None``: none).
        partitioned: how to build the model partitioned across ranks (:class:`PartitionedBuild`); ``None``:
            built whole.
    """
    expected = dict(normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False)
    wrong = [f"{k}={getattr(config, k)!r} (expected {v!r})" for k, v in expected.items() if getattr(config, k) != v]
    if wrong:
        raise ValueError("build_llama_model needs a Llama-style config (use llama_config): " + ", ".join(wrong))
    model = _build(config, poet, vocab_size, max_sequence_length, seed, backend, vp_stage, unpadded_vocab_size,
                   attention, partitioned, position_embedding_type="rope", rotary_base=rotary_base,
                   share_embeddings_and_output_weights=tie_embeddings,
                   rope_scaling=rope_scaling_factor is not None, rope_scaling_factor=rope_scaling_factor or 8.0,
                   seq_len_interpolation_factor=seq_len_interpolation_factor)
    model.rope_scaling_factor = rope_scaling_factor
    return model


def build_gpt2_model(
    config: TransformerConfig, poet: POETConfig | None, vocab_size: int, max_sequence_length: int,
    seed: int = 1234, backend: str = "auto", vp_stage: int | None = None, unpadded_vocab_size: int | None = None,
    tie_embeddings: bool = True, attention: str = "sdpa", partitioned: PartitionedBuild | None = None,
) -> GPTModel:
    """GPT-2-style GPTModel (LayerNorm, GELU, biases, learned positions; tied embeddings unless not
    ``tie_embeddings``); arguments as :func:`build_llama_model`."""
    if config.normalization != "LayerNorm" or config.gated_linear_unit:
        raise ValueError("build_gpt2_model needs a GPT-2-style config (use gpt2_config)")
    return _build(config, poet, vocab_size, max_sequence_length, seed, backend, vp_stage, unpadded_vocab_size,
                  attention, partitioned, position_embedding_type="learned_absolute", share_embeddings_and_output_weights=tie_embeddings)
