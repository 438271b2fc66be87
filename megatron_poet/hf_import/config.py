"""A Hugging Face ``config.json`` -> the training program's flags for the same function, or the reasons
it cannot be represented.

Supported, as Megatron-Bridge and torchtitan convert them: Llama-family models (``llama``; ``mistral``
without a sliding window): RMSNorm, SwiGLU with SiLU, RoPE (any base; no scaling, linear, or Llama-3.1's
with low/high frequency factors 1/4 and original context 8192 — megatron-core's fixed values), GQA,
any ``head_dim``, tied or untied embeddings, no biases; and GPT-2 (LayerNorm, GELU erf or tanh,
learned positions, biases). Refused with the reason: mixture-of-experts, sliding-window attention,
biased Llamas (``attention_bias``/``mlp_bias``: Qwen2-style), QK-norm, other RoPE scalings, GPT-2's
layer-index attention scaling, other model types.
"""
from __future__ import annotations

import json
import os

# megatron-core's Llama-3.1 RoPE scaling keeps these fixed (RotaryEmbedding._apply_scaling's defaults).
from megatron_poet.export.spec import LLAMA3_ROPE_FIXED

LLAMA_TYPES = ("llama", "mistral")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
QK_NORM_KEYS = ("qk_norm", "use_qk_norm", "qk_layernorm")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class HFImportError(ValueError):
    """The Hugging Face model cannot be imported as asked; the message says why and what to do."""


def read_config(hf_dir: str) -> dict:
    """``config.json`` of Hugging Face model directory ``hf_dir`` (plain JSON)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise HFImportError(f"Hugging Face model directory {hf_dir} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise HFImportError(f"{hf_dir} has no config.json: not a Hugging Face model directory") from None
    except (OSError, ValueError) as err:
        raise HFImportError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise HFImportError(f"{path} does not hold a JSON object")
    return config


def _rope_flags(config: dict, problems: list[str]) -> list[str]:
    """``--rotary-base`` and the scaling flags; transformers 5 keeps them under ``rope_parameters``."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    flags = ["--rotary-base", repr(float(theta))]
    if kind == "default":
        return flags
    if kind == "linear":
        return flags + ["--rotary-seq-len-interpolation-factor", repr(float(scaling["factor"]))]
    if kind == "llama3":
        differ = {k: scaling.get(k) for k, v in LLAMA3_ROPE_FIXED.items() if float(scaling.get(k, -1)) != v}
        if differ:
            problems.append(f"Llama-3.1 RoPE scaling with {differ} (megatron-core's fixes {LLAMA3_ROPE_FIXED})")
        return flags + ["--use-rope-scaling", "--rope-scaling-factor", repr(float(scaling["factor"]))]
    problems.append(f"RoPE scaling type {kind!r} (megatron-core implements 'linear' and Llama-3.1's 'llama3')")
    return flags


def _llama_flags(config: dict, problems: list[str]) -> list[str]:
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("a biased Llama (attention_bias / mlp_bias: Qwen2-style); the llama style has no biases")
    window = config.get("sliding_window")
    if window is not None and config.get("use_sliding_window", True):
        problems.append(f"sliding-window attention (sliding_window={window})")
    if any(config.get(k) for k in QK_NORM_KEYS):
        problems.append("QK-norm (normalized queries and keys)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.get('hidden_act')!r} (SwiGLU needs 'silu')")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    untie = not config.get("tie_word_embeddings", False)
    return [
        "--model-style", "llama", "--num-layers", str(config["num_hidden_layers"]),
        "--hidden-size", str(config["hidden_size"]), "--ffn-hidden-size", str(config["intermediate_size"]),
        "--num-attention-heads", str(heads), "--num-query-groups", str(config.get("num_key_value_heads") or heads),
        "--kv-channels", str(head_dim), "--max-position-embeddings", str(config["max_position_embeddings"]),
        "--norm-epsilon", repr(float(config.get("rms_norm_eps", 1e-6))),
        "--untie-embeddings-and-output-weights" if untie else "--tie-embeddings-and-output-weights",
        "--attention-dropout", repr(float(config.get("attention_dropout", 0.0))),
        *_rope_flags(config, problems),
    ]


def _gpt2_flags(config: dict, problems: list[str]) -> list[str]:
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu", *TANH_GELUS):
        problems.append(f"activation_function={activation!r} (supported: 'gelu' and the tanh GELUs {TANH_GELUS})")
    if config.get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx (attention scores scaled per layer)")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false (unscaled attention scores)")
    if config.get("add_cross_attention"):
        problems.append("cross-attention layers")
    hidden = config["n_embd"]
    untie = not config.get("tie_word_embeddings", True)
    return [
        "--model-style", "gpt2", "--num-layers", str(config["n_layer"]), "--hidden-size", str(hidden),
        "--ffn-hidden-size", str(config.get("n_inner") or 4 * hidden), "--num-attention-heads", str(config["n_head"]),
        "--max-position-embeddings", str(config["n_positions"]),
        "--norm-epsilon", repr(float(config.get("layer_norm_epsilon", 1e-5))),
        "--untie-embeddings-and-output-weights" if untie else "--tie-embeddings-and-output-weights",
        "--hidden-dropout", repr(float(config.get("resid_pdrop", 0.1))),
        "--attention-dropout", repr(float(config.get("attn_pdrop", 0.1))),
        *(["--openai-gelu"] if activation in TANH_GELUS else []),
    ]


def training_flags(config: dict) -> list[str]:
    """The training program's model flags that compute what the Hugging Face ``config`` describes.

    Raises :class:`HFImportError` listing every feature the stack cannot represent.
    """
    model_type = config.get("model_type")
    problems = []
    moe = [k for k in MOE_KEYS if config.get(k)]
    if moe:
        problems.append(f"mixture-of-experts layers ({', '.join(f'{k}={config[k]}' for k in moe)})")
    try:
        if model_type in LLAMA_TYPES:
            flags = _llama_flags(config, problems)
        elif model_type == "gpt2":
            flags = _gpt2_flags(config, problems)
        else:
            flags = None
    except KeyError as err:
        raise HFImportError(f"config.json of this {model_type} model lacks {err}") from None
    if flags is None:
        problems.append(f"model type {model_type!r} (supported: Llama-family {', '.join(LLAMA_TYPES)}, and gpt2)")
        flags = []
    if problems:
        raise HFImportError(f"cannot import this {model_type} model: it uses " + "; ".join(problems))
    return flags
