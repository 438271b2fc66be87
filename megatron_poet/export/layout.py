"""Megatron-core tensor layouts that the Hugging Face mappings undo (export) and redo (import).

Names are those of a megatron-core ``GPTModel`` at TP=1; the local layer spec
and the Transformer-Engine spec differ only in where the pre-attention and
pre-MLP norms live (a separate ``input_layernorm`` / ``pre_mlp_layernorm``
module, or fused into ``linear_qkv`` / ``linear_fc1`` as ``layer_norm_*``), so
:class:`MegatronState` accepts both.
"""
from __future__ import annotations

import torch

from .spec import ExportSpec, UnsupportedModelError

# Entries that carry no weights: TE/megatron extra state and recomputable buffers.
_IGNORED_SUFFIXES = ("_extra_state", "inv_freq")


class ConsumedState:
    """A state dict consumed entry by entry, so leftovers can be reported.

    Args:
        state: ``{name: tensor}``.
        what: how errors name the state ("megatron state", "Hugging Face checkpoint").
    """

    def __init__(self, state: dict[str, torch.Tensor], what: str):
        self._state = dict(state)
        self.what = what

    def take(self, *names: str, required: bool = True) -> torch.Tensor | None:
        """Remove and return the first of ``names`` present (alternative spellings of one entry)."""
        for name in names:
            if name in self._state:
                return self._state.pop(name)
        if required:
            raise KeyError(f"{self.what} has no {' / '.join(names)}")
        return None

    def left(self, ignored: tuple[str, ...] = ()) -> list[str]:
        """Names not taken, but those ending in ``ignored``."""
        return sorted(k for k in self._state if not k.endswith(ignored))


class MegatronState(ConsumedState):
    """A dense megatron state dict consumed entry by entry (see :class:`ConsumedState`).

    Args:
        state: ``{megatron name: tensor}`` (e.g. from :func:`~megatron_poet.export.fold.dense_state_dict`).
    """

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__(state, "megatron state")

    def norm(self, layer: int, which: str, field: str) -> torch.Tensor | None:
        """A pre-attention (``which="attention"``) or pre-MLP (``"mlp"``) norm's ``weight``/``bias``.

        Local spec: ``input_layernorm.{field}`` / ``pre_mlp_layernorm.{field}``;
        TE spec: ``self_attention.linear_qkv.layer_norm_{field}`` / ``mlp.linear_fc1.layer_norm_{field}``.
        A missing bias returns ``None`` (RMSNorm has none).
        """
        p = f"decoder.layers.{layer}."
        local, fused = {"attention": ("input_layernorm", "self_attention.linear_qkv"),
                        "mlp": ("pre_mlp_layernorm", "mlp.linear_fc1")}[which]
        return self.take(f"{p}{local}.{field}", f"{p}{fused}.layer_norm_{field}", required=field == "weight")

    def check_consumed(self) -> None:
        """Raise if any weight was not mapped: the model has parts the export would silently drop."""
        left = self.left(_IGNORED_SUFFIXES)
        if left:
            raise UnsupportedModelError(
                f"megatron state entries with no Hugging Face counterpart (unsupported model parts): {left}"
            )


def split_qkv(fused: torch.Tensor, spec: ExportSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split megatron's fused QKV weight or bias into Hugging Face's separate Q, K, V.

    Megatron lays ``linear_qkv`` out per query group: for each of the ``ng``
    groups, the ``np/ng`` query heads of the group, then its key head, then its
    value head, each ``hn`` rows. Query head ``g*(np/ng) + j`` therefore uses
    key/value head ``g``, which is exactly Hugging Face's ``repeat_kv`` grouping.

    Args:
        fused: ``(ng * (np/ng + 2) * hn, hidden)`` weight or ``(ng * (np/ng + 2) * hn,)`` bias.
    Returns:
        q ``(np * hn, ...)``, k ``(ng * hn, ...)``, v ``(ng * hn, ...)``.
    """
    ng, hn = spec.num_query_groups, spec.head_dim
    per_group = spec.num_attention_heads // ng
    rest = fused.shape[1:]
    expected = ng * (per_group + 2) * hn
    if fused.shape[0] != expected:
        raise ValueError(f"linear_qkv has {fused.shape[0]} rows, expected {expected} "
                         f"(query groups {ng} x ({per_group} query + 2) heads x head_dim {hn})")
    grouped = fused.reshape(ng, per_group + 2, hn, *rest)
    q = grouped[:, :per_group].reshape(ng * per_group * hn, *rest)
    k = grouped[:, per_group].reshape(ng * hn, *rest)
    v = grouped[:, per_group + 1].reshape(ng * hn, *rest)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ExportSpec) -> torch.Tensor:
    """Megatron's fused ``linear_qkv`` weight or bias from Hugging Face's Q, K, V: the inverse of
    :func:`split_qkv` (per query group: its ``np/ng`` query heads, its key head, its value head)."""
    ng, hn = spec.num_query_groups, spec.head_dim
    per_group = spec.num_attention_heads // ng
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(ng, per_group, hn, *rest), k.reshape(ng, 1, hn, *rest),
                         v.reshape(ng, 1, hn, *rest)], dim=1)
    return grouped.reshape(ng * (per_group + 2) * hn, *rest)


def split_gated_fc1(fused: torch.Tensor, spec: ExportSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Split SwiGLU's ``linear_fc1`` ``(2 * ffn, ...)`` into gate and up ``(ffn, ...)``.

    Megatron's MLP computes ``act(x[..., :ffn]) * x[..., ffn:]``: the gate comes first.
    """
    if fused.shape[0] != 2 * spec.ffn_hidden_size:
        raise ValueError(f"linear_fc1 has {fused.shape[0]} rows, expected 2 x ffn_hidden_size "
                         f"= {2 * spec.ffn_hidden_size}")
    gate, up = fused.chunk(2, dim=0)
    return gate, up


def trim_vocab(table: torch.Tensor, spec: ExportSpec) -> torch.Tensor:
    """Drop megatron's vocabulary padding rows: ``(padded_vocab, hidden)`` -> ``(vocab, hidden)``."""
    if table.shape[0] != spec.padded_vocab_size:
        raise ValueError(f"vocabulary table has {table.shape[0]} rows, expected the padded "
                         f"vocabulary size {spec.padded_vocab_size}")
    return table[: spec.vocab_size]


def merge_gated_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``linear_fc1`` ``(2 * ffn, ...)`` from gate and up: the inverse of :func:`split_gated_fc1`."""
    return torch.cat([gate, up], dim=0)


def pad_vocab(table: torch.Tensor, spec: ExportSpec) -> torch.Tensor:
    """Megatron's padded table ``(padded_vocab, hidden)`` from ``(vocab, hidden)``: the inverse of
    :func:`trim_vocab`; the padding rows are zero (and their logits masked: they never change the model)."""
    if table.shape[0] != spec.vocab_size:
        raise ValueError(f"vocabulary table has {table.shape[0]} rows, expected the vocabulary size {spec.vocab_size}")
    padding = table.new_zeros(spec.padded_vocab_size - spec.vocab_size, *table.shape[1:])
    return torch.cat([table, padding], dim=0)


def output_layer_from_hf(hf: ConsumedState, spec: ExportSpec) -> dict[str, torch.Tensor]:
    """Untied embeddings: ``lm_head.weight`` as megatron's padded ``output_layer.weight``; tied: nothing
    (a stored copy of the embedding is taken and dropped)."""
    if spec.tie_word_embeddings:
        hf.take("lm_head.weight", required=False)
        return {}
    return {"output_layer.weight": pad_vocab(hf.take("lm_head.weight"), spec)}
