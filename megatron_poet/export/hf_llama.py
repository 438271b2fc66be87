"""Megatron Llama-style ``GPTModel`` <-> Hugging Face ``LlamaForCausalLM`` (export and import), and its
mixture-of-experts form -> ``MixtralForCausalLM`` (export).

Why the two compute the same function (checked in ``tests/test_export_mapping.py``):
RMSNorm is ``x * rsqrt(mean(x^2) + eps) * w`` in both; megatron's non-interleaved
rotary embedding (``cat(freqs, freqs)`` with ``rotate_half``) is Hugging Face's
``rotate_half`` RoPE with the same base; both scale scores by ``1/sqrt(head_dim)``
under a causal mask; SwiGLU is ``silu(gate) * up``. MoE (``tests/test_moe.py``): megatron's router
takes the softmax of each token's top-k logits, Mixtral the softmax of all logits renormalized over
the top k: the same weights; each expert is a SwiGLU MLP (``w1`` gate, ``w3`` up, ``w2`` down in the
Mixtral checkpoints' naming, which ``transformers`` fuses on load).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .layout import (
    ConsumedState, MegatronState, merge_gated_fc1, merge_qkv, output_layer_from_hf, pad_vocab, split_gated_fc1,
    split_qkv, trim_vocab,
)
from .spec import ExportSpec


def llama_config(spec: ExportSpec, *, bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None = None):
    """A ``transformers.LlamaConfig`` for ``spec`` (true vocabulary size, GQA, rope_theta and scaling, tying)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups,
        head_dim=spec.head_dim,
        hidden_act=spec.activation,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta,
        rope_scaling=spec.rope_scaling,
        tie_word_embeddings=spec.tie_word_embeddings,
        # Megatron's add_qkv_bias biases only Q/K/V; Llama's attention_bias also biases o_proj,
        # which then gets zeros (same function).
        attention_bias=spec.qkv_bias,
        mlp_bias=spec.linear_bias,
        attention_dropout=spec.attention_dropout,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def mixtral_config(spec: ExportSpec, **token_ids):
    """A ``transformers.MixtralConfig`` for a ``spec`` of architecture "mixtral" (``token_ids``: as
    :func:`llama_config`; no sliding window)."""
    from transformers import MixtralConfig

    llama = llama_config(spec, **token_ids).to_dict()
    fields = {k: llama[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                                    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                                    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id")}
    return MixtralConfig(architectures=["MixtralForCausalLM"], rope_theta=spec.rope_theta,
                         rope_scaling=spec.rope_scaling, sliding_window=None, num_local_experts=spec.num_experts,
                         num_experts_per_tok=spec.experts_per_token, **fields)


def _mlp_state(src: MegatronState, m: str, h: str, spec: ExportSpec) -> dict[str, torch.Tensor]:
    """One layer's MLP (``m``: megatron prefix, ``h``: Hugging Face prefix): Llama's, or Mixtral's router and
    experts (Mixtral's hub naming: ``block_sparse_moe.gate`` and ``experts.<e>.w1/w3/w2``)."""
    if not spec.num_experts:
        gate, up = split_gated_fc1(src.take(m + "mlp.linear_fc1.weight"), spec)
        return {h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": src.take(m + "mlp.linear_fc2.weight")}
    out = {h + "block_sparse_moe.gate.weight": src.take(m + "mlp.router.weight")}
    for e in range(spec.num_experts):
        expert, to = f"{m}mlp.experts.local_experts.{e}.", f"{h}block_sparse_moe.experts.{e}."
        gate, up = split_gated_fc1(src.take(expert + "linear_fc1.weight"), spec)
        out.update({to + "w1.weight": gate, to + "w3.weight": up, to + "w2.weight": src.take(expert + "linear_fc2.weight")})
    return out


def llama_state_chunks(outer: dict[str, torch.Tensor], layers: Iterable[tuple[int, dict[str, torch.Tensor]]],
                       spec: ExportSpec) -> Iterator[dict[str, torch.Tensor]]:
    """Map a dense megatron state (TP=1 names) to ``LlamaForCausalLM`` names, a layer at a time.

    Args:
        outer: the entries outside ``decoder.layers`` (embeddings, final norm, output layer).
        layers: ``(i, {megatron name: tensor})`` per transformer layer, e.g. from
            :func:`~.fold.dense_layer_states` (taken one at a time).
        spec: the model's :class:`ExportSpec` (architecture "llama" or "mixtral").
    Yields:
        ``{hf name: tensor}``: the embedding, each layer's tensors (``MixtralForCausalLM`` names for
        "mixtral"), then the final norm and ``lm_head.weight`` (untied embeddings only).
    Raises:
        UnsupportedModelError: for megatron entries with no Llama counterpart (every weight must be consumed).
    """
    src = MegatronState(outer)
    yield {"model.embed_tokens.weight": trim_vocab(src.take("embedding.word_embeddings.weight"), spec)}
    for i, dense in layers:
        layer = MegatronState(dense)
        yield _layer_state(layer, i, spec)
        layer.check_consumed()
    tail = {"model.norm.weight": src.take("decoder.final_layernorm.weight")}
    if not spec.tie_word_embeddings:
        tail["lm_head.weight"] = trim_vocab(src.take("output_layer.weight"), spec)
    src.check_consumed()
    yield tail


def _layer_state(src: MegatronState, i: int, spec: ExportSpec) -> dict[str, torch.Tensor]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = {h + "input_layernorm.weight": src.norm(i, "attention", "weight"),
           h + "post_attention_layernorm.weight": src.norm(i, "mlp", "weight")}
    q, k, v = split_qkv(src.take(m + "self_attention.linear_qkv.weight"), spec)
    out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                h + "self_attn.v_proj.weight": v})
    out[h + "self_attn.o_proj.weight"] = src.take(m + "self_attention.linear_proj.weight")
    out.update(_mlp_state(src, m, h, spec))
    if spec.qkv_bias:
        qb, kb, vb = split_qkv(src.take(m + "self_attention.linear_qkv.bias"), spec)
        out.update({h + "self_attn.q_proj.bias": qb, h + "self_attn.k_proj.bias": kb,
                    h + "self_attn.v_proj.bias": vb})
        proj_bias = src.take(m + "self_attention.linear_proj.bias", required=spec.linear_bias)
        out[h + "self_attn.o_proj.bias"] = (
            proj_bias if proj_bias is not None else torch.zeros(spec.hidden_size, dtype=qb.dtype))
    if spec.linear_bias:
        gate_b, up_b = split_gated_fc1(src.take(m + "mlp.linear_fc1.bias"), spec)
        out.update({h + "mlp.gate_proj.bias": gate_b, h + "mlp.up_proj.bias": up_b,
                    h + "mlp.down_proj.bias": src.take(m + "mlp.linear_fc2.bias")})
    return out


def llama_from_hf(hf: ConsumedState, spec: ExportSpec) -> dict[str, torch.Tensor]:
    """The inverse of :func:`llama_state_chunks`: a ``LlamaForCausalLM`` state (bias-free) -> dense
    megatron names at TP=1 (the local spec's norm names), vocabulary padded with zero rows.

    Takes every entry it maps from ``hf``; the caller reports what is left (unsupported parts).
    ``lm_head.weight`` is read only for untied embeddings.
    """
    embed = hf.take("model.embed_tokens.weight")
    out = {"embedding.word_embeddings.weight": pad_vocab(embed, spec)}
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[m + "input_layernorm.weight"] = hf.take(h + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = hf.take(h + "post_attention_layernorm.weight")
        out[m + "self_attention.linear_qkv.weight"] = merge_qkv(
            hf.take(h + "self_attn.q_proj.weight"), hf.take(h + "self_attn.k_proj.weight"),
            hf.take(h + "self_attn.v_proj.weight"), spec)
        out[m + "self_attention.linear_proj.weight"] = hf.take(h + "self_attn.o_proj.weight")
        out[m + "mlp.linear_fc1.weight"] = merge_gated_fc1(hf.take(h + "mlp.gate_proj.weight"),
                                                            hf.take(h + "mlp.up_proj.weight"))
        out[m + "mlp.linear_fc2.weight"] = hf.take(h + "mlp.down_proj.weight")
    out["decoder.final_layernorm.weight"] = hf.take("model.norm.weight")
    out.update(output_layer_from_hf(hf, spec))
    return out
