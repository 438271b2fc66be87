"""Megatron GPT-2-style ``GPTModel`` <-> Hugging Face ``GPT2LMHeadModel`` (export and import).

GPT-2 style = LayerNorm, non-gated GeLU MLP (exact erf GeLU, Hugging Face's
``"gelu"``), learned absolute positions, multi-head attention. Hugging Face's
GPT-2 uses ``Conv1D`` layers whose weight is ``(in, out)``, the transpose of
megatron's ``(out, in)``, and always has biases (zeros where megatron has none).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .layout import (
    ConsumedState, MegatronState, merge_qkv, output_layer_from_hf, pad_vocab, split_qkv, trim_vocab,
)
from .spec import ExportSpec


def gpt2_config(spec: ExportSpec, *, bos_token_id: int | None, eos_token_id: int | None,
                pad_token_id: int | None = None):
    """A ``transformers.GPT2Config`` for ``spec`` (true vocabulary size, tying, positions)."""
    from transformers import GPT2Config

    return GPT2Config(
        architectures=["GPT2LMHeadModel"],
        vocab_size=spec.vocab_size,
        n_positions=spec.max_position_embeddings,
        n_embd=spec.hidden_size,
        n_layer=spec.num_layers,
        n_head=spec.num_attention_heads,
        n_inner=spec.ffn_hidden_size,
        activation_function=spec.activation,
        layer_norm_epsilon=spec.norm_eps,
        tie_word_embeddings=spec.tie_word_embeddings,
        resid_pdrop=spec.hidden_dropout,
        embd_pdrop=spec.hidden_dropout,
        attn_pdrop=spec.attention_dropout,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def gpt2_state_chunks(outer: dict[str, torch.Tensor], layers: Iterable[tuple[int, dict[str, torch.Tensor]]],
                      spec: ExportSpec) -> Iterator[dict[str, torch.Tensor]]:
    """Map a dense megatron state (TP=1 names) to ``GPT2LMHeadModel`` names, a layer at a time.

    Args:
        outer, layers: as :func:`~.hf_llama.llama_state_chunks`.
        spec: the model's :class:`ExportSpec` (``architecture == "gpt2"``).
    Yields:
        ``{hf name: tensor}``: the embeddings, each layer's tensors (Conv1D weights ``(in, out)``), then
        the final norm and ``lm_head.weight`` (untied embeddings only).
    Raises:
        UnsupportedModelError: for megatron entries with no GPT-2 counterpart (every weight must be consumed).
    """
    src = MegatronState(outer)
    yield {"transformer.wte.weight": trim_vocab(src.take("embedding.word_embeddings.weight"), spec),
           "transformer.wpe.weight": src.take("embedding.position_embeddings.weight")}
    for i, dense in layers:
        layer = MegatronState(dense)
        yield _layer_state(layer, i, spec)
        layer.check_consumed()
    tail = {"transformer.ln_f.weight": src.take("decoder.final_layernorm.weight"),
            "transformer.ln_f.bias": src.take("decoder.final_layernorm.bias")}
    if not spec.tie_word_embeddings:
        tail["lm_head.weight"] = trim_vocab(src.take("output_layer.weight"), spec)
    src.check_consumed()
    yield tail


def _layer_state(src: MegatronState, i: int, spec: ExportSpec) -> dict[str, torch.Tensor]:
    def bias(name: str, size: int, like: torch.Tensor) -> torch.Tensor:
        found = src.take(name, required=False)
        return found if found is not None else torch.zeros(size, dtype=like.dtype)

    h = spec.hidden_size
    m, g = f"decoder.layers.{i}.", f"transformer.h.{i}."
    out = {g + "ln_1.weight": src.norm(i, "attention", "weight"), g + "ln_1.bias": src.norm(i, "attention", "bias"),
           g + "ln_2.weight": src.norm(i, "mlp", "weight"), g + "ln_2.bias": src.norm(i, "mlp", "bias")}
    qkv = src.take(m + "self_attention.linear_qkv.weight")
    # Megatron interleaves [q, k, v] per head (one head per query group); GPT-2 wants [Q; K; V].
    out[g + "attn.c_attn.weight"] = torch.cat(split_qkv(qkv, spec), dim=0).t()
    out[g + "attn.c_attn.bias"] = torch.cat(split_qkv(bias(m + "self_attention.linear_qkv.bias", 3 * h, qkv), spec))
    proj = src.take(m + "self_attention.linear_proj.weight")
    out[g + "attn.c_proj.weight"] = proj.t()
    out[g + "attn.c_proj.bias"] = bias(m + "self_attention.linear_proj.bias", h, proj)
    fc1 = src.take(m + "mlp.linear_fc1.weight")
    out[g + "mlp.c_fc.weight"] = fc1.t()
    out[g + "mlp.c_fc.bias"] = bias(m + "mlp.linear_fc1.bias", spec.ffn_hidden_size, fc1)
    fc2 = src.take(m + "mlp.linear_fc2.weight")
    out[g + "mlp.c_proj.weight"] = fc2.t()
    out[g + "mlp.c_proj.bias"] = bias(m + "mlp.linear_fc2.bias", h, fc2)
    return out


def gpt2_from_hf(hf: ConsumedState, spec: ExportSpec) -> dict[str, torch.Tensor]:
    """The inverse of :func:`gpt2_state_chunks`: a ``GPT2LMHeadModel`` state (``transformer.`` names) ->
    dense megatron names at TP=1, Conv1D weights transposed, vocabulary padded with zero rows.

    Takes every entry it maps from ``hf``; the caller reports what is left (unsupported parts).
    """
    h = spec.hidden_size
    out = {"embedding.word_embeddings.weight": pad_vocab(hf.take("transformer.wte.weight"), spec),
           "embedding.position_embeddings.weight": hf.take("transformer.wpe.weight")}
    for i in range(spec.num_layers):
        m, g = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for megatron, hf_name in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[f"{m}{megatron}.weight"] = hf.take(f"{g}{hf_name}.weight")
            out[f"{m}{megatron}.bias"] = hf.take(f"{g}{hf_name}.bias")
        qkv_weight = hf.take(g + "attn.c_attn.weight").t()  # (3h, h): [Q; K; V]
        out[m + "self_attention.linear_qkv.weight"] = merge_qkv(*qkv_weight.split(h, dim=0), spec)
        out[m + "self_attention.linear_qkv.bias"] = merge_qkv(*hf.take(g + "attn.c_attn.bias").split(h), spec)
        out[m + "self_attention.linear_proj.weight"] = hf.take(g + "attn.c_proj.weight").t()
        out[m + "self_attention.linear_proj.bias"] = hf.take(g + "attn.c_proj.bias")
        out[m + "mlp.linear_fc1.weight"] = hf.take(g + "mlp.c_fc.weight").t()
        out[m + "mlp.linear_fc1.bias"] = hf.take(g + "mlp.c_fc.bias")
        out[m + "mlp.linear_fc2.weight"] = hf.take(g + "mlp.c_proj.weight").t()
        out[m + "mlp.linear_fc2.bias"] = hf.take(g + "mlp.c_proj.bias")
    out["decoder.final_layernorm.weight"] = hf.take("transformer.ln_f.weight")
    out["decoder.final_layernorm.bias"] = hf.take("transformer.ln_f.bias")
    out.update(output_layer_from_hf(hf, spec))
    return out
