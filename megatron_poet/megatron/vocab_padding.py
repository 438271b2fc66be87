"""Vocabulary padding that never changes the model.

Megatron pads the vocabulary to a multiple of ``--make-vocab-size-divisible-by x TP`` so that
every tensor-parallel rank holds an equal slice of the embedding and output layer. The padded
rows are not tokens, yet megatron gives them random initial values and lets their logits enter
the softmax, so the loss depended on the TP size whenever the padding did (vocabulary 513:
640 rows at TP=1, 768 at TP=2). Here the padded rows are drawn as zeros (the real rows from
``(seed, name)`` alone, :mod:`.layout_free_init`) and their logits are set to the lowest finite
value before any softmax (:func:`mask_padded_logits`): exp of it is exactly 0, so they get no
probability and no gradient in training, evaluation and generation, and a model padded one way
computes what it computes padded another way.
"""
from __future__ import annotations

import torch
from torch import nn

# Global names of the parameters whose rows are the vocabulary (partition_dim 0 under TP).
VOCABULARY_PARAMETERS = ("embedding.word_embeddings.weight", "output_layer.weight")


def real_rows_in_shard(vocab_size: int, shard_rows: int, shard_index: int) -> int:
    """How many of the ``shard_rows`` rows of vocabulary shard ``shard_index`` are real tokens."""
    return max(0, min(shard_rows, vocab_size - shard_index * shard_rows))


def _masking_hook(vocab_size: int, padded_size: int):
    def hook(module: nn.Module, inputs, output):
        from megatron.core import parallel_state

        logits, bias = output
        width = logits.shape[-1]
        shard = 0 if width == padded_size else parallel_state.get_tensor_model_parallel_rank()
        real = real_rows_in_shard(vocab_size, width, shard)
        if real == width:
            return output
        padded = torch.arange(width, device=logits.device) >= real
        return logits.masked_fill(padded, torch.finfo(logits.dtype).min), bias

    return hook


def mask_padded_logits(model: nn.Module, vocab_size: int) -> None:
    """Give the padded vocabulary entries of ``model``'s output layer no probability.

    Args:
        model: a megatron-core ``GPTModel`` (any stage; only the last has an ``output_layer``).
        vocab_size: the real (tokenizer's) vocabulary size; ``model.vocab_size`` is the padded one.
    Logits ``[..., V_shard]`` (this rank's slice, or all ``V_padded`` when megatron gathers them)
    of padded entries become ``finfo(dtype).min``.
    """
    layer = getattr(model, "output_layer", None)
    padded_size = int(model.vocab_size)
    if layer is None or vocab_size >= padded_size:
        return
    layer.register_forward_hook(_masking_hook(vocab_size, padded_size))
