"""Core attention without the ``S x S`` matrix: ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` materializes the scores and probabilities of every head
(``b x np x s x s``, kept for backward: at seq 2048 they dominate the saved activations).
:class:`SDPAttention` fills the same ``core_attention`` slot of megatron's layer spec and calls
PyTorch's fused attention, which picks flash, memory-efficient or cuDNN kernels on GPUs and the
fused CPU kernel on CPUs; none of them keeps the ``s x s`` probabilities for backward.

Same function as the local attention: causal mask, softmax scale ``1/sqrt(head_dim)`` (or the
config's), grouped-query attention (query head ``g*(np/ng)+j`` uses key/value group ``g``, as
megatron lays heads out), attention dropout drawn inside the tensor-parallel RNG tracker like
megatron's (so it differs across TP ranks as megatron's does). Shapes: query ``[sq, b, np, hn]``,
key/value ``[sk, b, ng, hn]`` (this rank's heads) -> ``[sq, b, np * hn]``.

Not covered (refused at construction or call): context parallelism, packed sequences, an attention
bias, sliding windows, a softmax offset; use ``--attention-backend local`` (or ``te``) for those.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class SDPAttention(MegatronModule):
    """Megatron ``core_attention`` backed by ``scaled_dot_product_attention`` (see the module docstring).

    Takes megatron's core-attention constructor arguments (``config, layer_number, attn_mask_type,
    attention_type, attention_dropout, softmax_scale, ...``).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None, **_):
        super().__init__(config=config)
        unsupported = [name for name, used in (
            ("context parallelism", config.context_parallel_size > 1),
            ("sliding-window attention", getattr(config, "window_size", None) is not None),
            ("a softmax offset", getattr(config, "softmax_type", "vanilla") != "vanilla"),
        ) if used]
        if unsupported:
            raise ValueError(f"the sdpa attention backend does not implement {', '.join(unsupported)}; "
                             f"use --attention-backend local or te")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        scale = softmax_scale if softmax_scale is not None else getattr(config, "softmax_scale", None)
        self.softmax_scale = scale if scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                attn_mask_type: AttnMaskType | None = None, attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("the sdpa attention backend does not take packed sequences or an attention bias; "
                             "use --attention-backend local or te")
        sq, b, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        mask = None
        if attention_mask is not None and not causal:
            mask = ~attention_mask  # megatron's mask is True where attention is not allowed
        gqa = {}
        if k.shape[1] != heads:
            if _HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        dropout = self.dropout if self.training else 0.0
        if dropout > 0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                     scale=self.softmax_scale, **gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.softmax_scale, **gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)
