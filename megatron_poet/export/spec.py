"""What a Hugging Face export needs to know about a megatron-core ``GPTModel``.

:class:`ExportSpec` is read off a built model (its ``TransformerConfig`` and the
``GPTModel`` constructor arguments it keeps as attributes), so it is the same
whether the model came from the training program, a test, or a checkpoint.
Every option that changes the computed function and has no Hugging Face
counterpart in the target architecture is rejected here, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core.transformer.utils import openai_gelu

ARCHITECTURES = ("llama", "mixtral", "gpt2")


class UnsupportedModelError(ValueError):
    """The model uses an option the Hugging Face export cannot reproduce."""


@dataclass(frozen=True)
class ExportSpec:
    """Shape and options of a GPT model, in the vocabulary of both frameworks.

    Attributes:
        architecture: "llama" (RMSNorm, SwiGLU, RoPE -> ``LlamaForCausalLM``), "mixtral" (the same with
            mixture-of-experts MLPs -> ``MixtralForCausalLM``) or "gpt2" (LayerNorm, GeLU, learned
            positions -> ``GPT2LMHeadModel``).
        num_layers, hidden_size: as in megatron.
        ffn_hidden_size: the MLP's width (each expert's with MoE: megatron's ``moe_ffn_hidden_size``).
        num_experts, experts_per_token: MoE experts per layer and megatron's ``moe_router_topk``
            (``None`` for a dense model).
        num_attention_heads: query heads ``np``.
        num_query_groups: key/value heads ``ng`` (``np`` for multi-head attention).
        head_dim: megatron's ``kv_channels`` (``hn``).
        vocab_size: the tokenizer's vocabulary size (what the export keeps).
        padded_vocab_size: rows of megatron's embedding / output layer (>= vocab_size).
        max_position_embeddings: megatron's ``max_sequence_length``.
        norm_eps: ``layernorm_epsilon``.
        rope_theta: rotary base (llama only).
        rope_scaling: Hugging Face's ``rope_scaling`` (``{"rope_type": "llama3" | "linear", "factor": ...}``),
            ``None`` for none (llama only).
        tie_word_embeddings: megatron's ``share_embeddings_and_output_weights``.
        linear_bias: megatron's ``add_bias_linear`` (bias on every linear layer).
        qkv_bias: bias on ``linear_qkv`` (``add_bias_linear or add_qkv_bias``).
        activation: Hugging Face ``hidden_act`` / ``activation_function`` name.
        hidden_dropout, attention_dropout: training-time dropout (kept for fine-tuning).
    """

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float | None
    tie_word_embeddings: bool
    linear_bias: bool
    qkv_bias: bool
    activation: str
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    rope_scaling: dict | None = None
    num_experts: int | None = None
    experts_per_token: int | None = None

    @classmethod
    def from_gpt_model(cls, model, vocab_size: int | None = None) -> "ExportSpec":
        """Read the spec of a megatron-core ``GPTModel`` (any TP size; the shapes are global).

        Args:
            model: a ``megatron.core.models.gpt.GPTModel`` (pre- and post-process stage).
            vocab_size: the true vocabulary size (the tokenizer's); ``None`` keeps
                megatron's padded size. Padding rows beyond it are trimmed on export.
        Raises:
            UnsupportedModelError: naming every unsupported option at once.
        """
        c = model.config
        problems = []

        def require(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        # Options with no counterpart in either Hugging Face architecture.
        require(model.pre_process and model.post_process,
                "a pipeline stage instead of the whole model (build it at pipeline_model_parallel_size=1)")
        require(not getattr(c, "multi_latent_attention", False), "multi-latent attention")
        require(not getattr(c, "qk_layernorm", False), "qk_layernorm")
        require(not getattr(c, "mtp_num_layers", None), "multi-token-prediction layers")
        require(not getattr(c, "apply_residual_connection_post_layernorm", False),
                "apply_residual_connection_post_layernorm")
        require(not getattr(c, "layernorm_zero_centered_gamma", False), "layernorm_zero_centered_gamma")
        require(getattr(c, "window_size", None) is None, "sliding-window attention")
        require(getattr(c, "softmax_scale", None) is None, "a custom softmax_scale")
        require(not getattr(c, "heterogeneous_block_specs", False), "heterogeneous layers")

        position = model.position_embedding_type
        gated = bool(c.gated_linear_unit)
        act = c.activation_func
        if c.normalization == "RMSNorm" and gated and position == "rope":
            architecture = "llama"
            require(act is F.silu, f"SwiGLU needs activation_func=F.silu, got {getattr(act, '__name__', act)}")
            require(float(model.rotary_percent) == 1.0,
                    f"rotary_percent={model.rotary_percent} (LlamaForCausalLM rotates the whole head)")
            rope_scaling = _rope_scaling(model)
            require(not getattr(c, "rotary_interleaved", False),
                    "rotary_interleaved (Hugging Face rotates halves, not interleaved pairs)")
            activation = "silu"
            rope_theta = float(model.rotary_base)
            if c.num_moe_experts:
                architecture = "mixtral"
                problems += _mixtral_problems(c)
        elif c.normalization == "LayerNorm" and not gated and position == "learned_absolute":
            architecture = "gpt2"
            names = {F.gelu: "gelu", openai_gelu: "gelu_new"}
            require(act in names, f"GPT-2 export needs activation_func=F.gelu or megatron's openai_gelu, got "
                                  f"{getattr(act, '__name__', act)}")
            activation = names.get(act, "")
            rope_theta = rope_scaling = None
            require(c.num_query_groups in (None, c.num_attention_heads),
                    "grouped-query attention (GPT2LMHeadModel has no key/value groups)")
            require(c.kv_channels * c.num_attention_heads == c.hidden_size,
                    "kv_channels * num_attention_heads != hidden_size (GPT2LMHeadModel has no head_dim)")
            require(not getattr(c, "add_qkv_bias", False) or c.add_bias_linear,
                    "add_qkv_bias without add_bias_linear")
            require(not c.num_moe_experts, "mixture-of-experts layers (GPT2LMHeadModel has none)")
        else:
            raise UnsupportedModelError(
                "cannot export this model to Hugging Face: supported are Llama-style "
                "(normalization=RMSNorm, gated_linear_unit=True with SiLU, position_embedding_type=rope) "
                "and GPT-2-style (normalization=LayerNorm, no gated linear unit, GeLU, "
                f"position_embedding_type=learned_absolute); got normalization={c.normalization}, "
                f"gated_linear_unit={gated}, position_embedding_type={position}"
            )

        padded = int(model.vocab_size)
        vocab = padded if vocab_size is None else int(vocab_size)
        require(0 < vocab <= padded, f"vocab_size={vocab} is not in 1..{padded} (megatron's padded vocabulary)")
        if problems:
            raise UnsupportedModelError(
                f"cannot export this {architecture}-style model to Hugging Face; unsupported: " + "; ".join(problems)
            )
        return cls(
            architecture=architecture,
            num_layers=c.num_layers,
            hidden_size=c.hidden_size,
            ffn_hidden_size=(c.moe_ffn_hidden_size or c.ffn_hidden_size) if c.num_moe_experts else c.ffn_hidden_size,
            num_attention_heads=c.num_attention_heads,
            num_query_groups=c.num_query_groups or c.num_attention_heads,
            head_dim=c.kv_channels,
            vocab_size=vocab,
            padded_vocab_size=padded,
            max_position_embeddings=int(model.max_sequence_length),
            norm_eps=float(c.layernorm_epsilon),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(model.share_embeddings_and_output_weights),
            linear_bias=bool(c.add_bias_linear),
            qkv_bias=bool(c.add_bias_linear or getattr(c, "add_qkv_bias", False)),
            activation=activation,
            hidden_dropout=float(c.hidden_dropout),
            attention_dropout=float(c.attention_dropout),
            num_experts=c.num_moe_experts or None,
            experts_per_token=c.moe_router_topk if c.num_moe_experts else None,
        )


def _mixtral_problems(c) -> list[str]:
    """What keeps a megatron MoE config from computing ``MixtralForCausalLM``'s function: Mixtral routes each
    token to its top-k experts by softmax probabilities renormalized over those k (megatron's softmax of
    the top-k logits), keeps every token (no capacity), and has no biases or shared experts."""
    checks = [
        (not c.moe_router_pre_softmax, "moe_router_pre_softmax (Mixtral renormalizes the top-k probabilities)"),
        (c.moe_router_score_function == "softmax", f"moe_router_score_function={c.moe_router_score_function!r}"),
        (c.moe_router_topk_scaling_factor is None, "moe_router_topk_scaling_factor"),
        (not c.moe_router_enable_expert_bias, "moe_router_enable_expert_bias"),
        (c.moe_router_num_groups is None, "group-limited routing (moe_router_num_groups)"),
        (c.moe_expert_capacity_factor is None, "moe_expert_capacity_factor (Mixtral drops no tokens)"),
        (not c.moe_shared_expert_intermediate_size, "shared experts"),
        (c.moe_layer_freq == 1 or (isinstance(c.moe_layer_freq, list) and all(f == 1 for f in c.moe_layer_freq)),
         "dense layers between MoE layers (moe_layer_freq)"),
        (not c.moe_apply_probs_on_input, "moe_apply_probs_on_input"),
        ("sinkhorn" not in str(c.moe_router_load_balancing_type), "sinkhorn routing"),
        (not (c.add_bias_linear or getattr(c, "add_qkv_bias", False)), "linear biases (Mixtral has none)"),
    ]
    return [f"MoE: {message}" for ok, message in checks if not ok]


# megatron-core's Llama-3.1 RoPE scaling keeps these fixed (RotaryEmbedding._apply_scaling's defaults).
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_scaling(model) -> dict | None:
    """Hugging Face's ``rope_scaling`` of a megatron ``GPTModel``'s rotary embedding (``None``: none)."""
    if getattr(model, "rotary_scaling", False):
        factor = getattr(model, "rope_scaling_factor", None)
        if factor is None:
            raise UnsupportedModelError("rope_scaling without a recorded rope_scaling_factor (build the model with "
                                        "megatron_poet.megatron.model.build_llama_model)")
        return {"rope_type": "llama3", "factor": float(factor), **LLAMA3_ROPE_FIXED}
    factor = getattr(getattr(model, "rotary_pos_emb", None), "seq_len_interpolation_factor", None)
    return None if factor is None else {"rope_type": "linear", "factor": float(factor)}
