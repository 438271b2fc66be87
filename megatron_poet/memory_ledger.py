"""The computed memory ledger: bytes per GPU of a Llama-shaped model trained by this stack.

bf16 with megatron's mixed precision (bf16 parameters, fp32 gradient buffers, fp32 main parameters and
Adam moments, distributed optimizer over DP), SDPA attention (no ``S x S`` scores), sequence
parallelism when TP > 1. POET layers hold ``A0`` (bf16, or 8-bit codes with two float32 per
quantization group) and their skew parameters; the Cayley–Neumann blocks of a step and their
gradient are float32 (:mod:`megatron_poet.poet.side`). The activation model is the per-op count of
:func:`saved_bytes_per_token_layer`, checked against measurements on CPU (tools/memory_report.py,
tests/test_memory_report.py). Used by tools/memory_report.py and tools/largest_model.py.
"""
from __future__ import annotations

from dataclasses import dataclass

# Llama-shaped configs: (layers, hidden, ffn, attention heads, key/value heads, vocabulary); MoE configs
# append (experts, top-k), see :func:`unpack`.
# 1B = Llama-3.2-1B, 8B = Llama-3-8B, 13B = Llama-2-13B; 20B is Llama-3-like at 20.3B parameters.
LLAMA = {"Llama-1B": (16, 2048, 8192, 32, 8, 128256), "Llama-8B": (32, 4096, 14336, 32, 8, 128256),
         "Llama-13B": (40, 5120, 13824, 40, 40, 32000), "Llama-20B": (48, 6144, 16384, 48, 8, 128256)}
# The POET-X paper's configs (vocabulary 32000, no GQA) and their published peak memory on one H100,
# batch 1, in GB: (config, sequence length, {AdamW, POET-X fast, POET-X mem, POET-XQ (8-bit A0)}).
POETX = {
    "POET-X 3B": ((32, 2560, 7168, 20, 20, 32000), 1024, {"AdamW": 28.78, "fast": 16.31, "mem": 13.28, "XQ": 12.23}),
    "POET-X 8B": ((32, 4096, 14336, 32, 32, 32000), 1024, {"AdamW": 76.34, "fast": 33.14, "mem": 27.87, "XQ": 23.59}),
    "POET-X 13B": ((40, 5120, 13824, 40, 40, 32000), 2048, {"AdamW": None, "fast": 61.87, "mem": 47.21, "XQ": 43.59}),
}
# A ladder of Llama shapes (vocabulary 32000) for "the largest model that fits": Llama-2 7B/13B,
# CodeLlama-34B (GQA 8), Llama-2-70B (GQA 8) and the POET-X shapes.
LADDER = {
    "POET-X 3B": POETX["POET-X 3B"][0], "Llama-2-7B": (32, 4096, 11008, 32, 32, 32000),
    "POET-X 8B": POETX["POET-X 8B"][0], "Llama-2-13B": (40, 5120, 13824, 40, 40, 32000),
    "Llama-20B": (48, 6144, 16384, 48, 8, 32000), "CodeLlama-34B": (48, 8192, 22016, 64, 8, 32000),
    "Llama-2-70B": (80, 8192, 28672, 64, 8, 32000),
}

# Mixture-of-experts twins of dense widths (every layer 8 experts of the dense MLP's width, top-2):
# (layers, hidden, expert ffn, heads, key/value heads, vocabulary, experts, top-k).
MOE = {"Llama-1B 8x top-2": (*LLAMA["Llama-1B"], 8, 2), "Llama-2-7B 8x top-2": (*LADDER["Llama-2-7B"], 8, 2)}


@dataclass
class Ledger:
    """Bytes per category of one run (measured by tools/memory_report.py, or computed here)."""

    parameters: int = 0
    a0: int = 0
    gradients: int = 0
    optimizer: int = 0
    blocks: int = 0  # POET's step blocks (one fp32 tensor per side, shared by the step's micro-batches) + their grad
    saved: int = 0
    saved_token_independent: int = 0
    saved_model: float = 0.0  # the activation model's count for the same config (computed ledgers)
    peak: int = 0
    peak_rss: int = 0
    init_transient: float = 0.0  # x the layer's A0
    save_peak: int = 0  # a checkpoint save between steps (computed ledgers, see computed_ledger)

    @property
    def static(self) -> int:
        return self.parameters + self.a0 + self.gradients + self.optimizer


def linear_shapes(h: int, ffn: int, heads: int, kv_heads: int) -> list[tuple[int, int, bool]]:
    """``(d_in, d_out, column_parallel)`` of a layer's qkv, proj, fc1 (SwiGLU: 2 ffn), fc2."""
    kv = kv_heads * (h // heads)
    return [(h, h + 2 * kv, True), (h, h, False), (h, 2 * ffn, True), (ffn, h, False)]


def unpack(config: tuple) -> tuple[int, int, int, int, int, int, int, int]:
    """``(layers, hidden, ffn, heads, kv heads, vocabulary, experts, top-k)`` of a Llama config: 6 entries
    (dense: 0 experts, top-k 0) or 8 (mixture of experts in every layer, ``ffn`` each expert's width)."""
    return (*config, 0, 0) if len(config) == 6 else tuple(config)


def layer_linears(config: tuple) -> list[tuple[int, int, bool, int]]:
    """``(d_in, d_out, column_parallel, copies)`` per layer: attention's once, the MLP's once per expert."""
    _, h, ffn, heads, kv_heads, _, experts, _ = unpack(config)
    return [(i, o, col, 1 if k < 2 else max(experts, 1))
            for k, (i, o, col) in enumerate(linear_shapes(h, ffn, heads, kv_heads))]


def parameter_count(config: tuple) -> int:
    """Parameters of a Llama config (untied embeddings and output layer, RMSNorm weights, MoE routers)."""
    layers, h, _, _, _, vocab, experts, _ = unpack(config)
    per_layer = sum(n * i * o for i, o, _, n in layer_linears(config)) + 2 * h + experts * h
    return layers * per_layer + 2 * vocab * h + h


def saved_bytes_per_token_layer(h: int, ffn: int, kv: int, method: str, tp: int, act: int,
                                attention: str = "flash", heads: int = 0, seq: int = 0, topk: int = 0) -> float:
    """Bytes one transformer layer keeps for backward per token, per GPU (sequence parallel when tp > 1).

    Elements, as megatron's local layer spec keeps them (checked against the measurement on CPU):
    per RMSNorm its input and the normalized input (2 x 2h), qkv input h, qkv output h+2kv
    (kept by the value view), q and k after RoPE h+kv, attention output = proj input h
    ("local" attention also keeps the softmax probabilities, heads x seq; flash attention only a
    log-sum-exp), fc1 input h, fc1 output 2 ffn (SwiGLU input) and three ffn-sized SwiGLU
    intermediates (the last is fc2's input). POET keeps the same linear inputs (``R``'s gathered
    input instead of the linear's input) plus ``P``'s input for the two row-parallel linears
    (2h) in "fast" mode, and in "mem" mode at tp > 1 (recomputing it would repeat the
    all-reduce); the column-parallel ``P`` keeps its output, which attention and SwiGLU keep anyway.
    With mixture of experts (``topk`` experts per token; 0: a dense MLP) the MLP's share is kept once per
    routed copy of the token, plus its expert output (weighted by the routing probability).
    """
    copies, moe = (topk, topk * h) if topk else (1, 0)
    elems = 4 * h + h + (h + 2 * kv) + (h + kv) + h + copies * (h + 2 * ffn + 3 * ffn) + moe
    if attention == "local":
        elems += heads * seq
    if method == "POET fast" or (method == "POET mem" and tp > 1):
        elems += 2 * h
    return elems * act / tp


def saved_bytes_model(h: int, ffn: int, kv: int, layers: int, vocab: int, tokens: int, method: str, tp: int,
                      act: int, attention: str = "flash", heads: int = 0, seq: int = 0,
                      recompute: bool = False, topk: int = 0) -> float:
    """All layers plus the final norm (input, normalized, output) and the loss's float32 softmax. With full
    recomputation (``--recompute-granularity full``) a layer keeps only its input."""
    if recompute:
        per_token = layers * h * act / tp
    else:
        per_token = layers * saved_bytes_per_token_layer(h, ffn, kv, method, tp, act, attention, heads, seq, topk)
    return tokens * (per_token + (3 * h * act + 4 * vocab) / tp)


def a0_bytes_per_entry(storage: str, group: int = 256) -> float:
    """bf16 ``A0``: 2 bytes; "int8": 1 byte plus a float32 scale and zero point per ``group`` entries."""
    return 1 + 8 / group if storage == "int8" else 2.0


def computed_ledger(model: str | tuple, tp: int, dp: int, method: str, seq: int, micro_batch: int, block: int,
                    master: bool = False, *, storage: str = "native", group: int = 256,
                    recompute: bool = False, microbatches: int = 8) -> Ledger:
    """Per-GPU bytes for ``model`` (a name of :data:`LLAMA`/:data:`LADDER`/:data:`MOE` or a config tuple;
    MoE configs at ``tp = 1`` and without expert parallelism: experts are whole on one GPU).

    ``method``: "AdamW", "POET fast" or "POET mem"; ``storage``: how POET holds ``A0`` ("native" = bf16,
    "int8"); ``recompute``: full activation recomputation of every layer; ``microbatches`` per optimizer
    step: from two on, the step holds every side's blocks and their gradient; with one, the blocks live
    from a layer's forward to its backward (none between layers under full recomputation), see
    :func:`megatron_poet.poet.side.step_blocks_pay_off`.
    """
    config = model if isinstance(model, tuple) else {**LLAMA, **LADDER, **MOE}[model]
    layers, h, ffn, heads, kv_heads, vocab, experts, topk = unpack(config)
    shapes = layer_linears(config)
    linear = layers * sum(n * i * o for i, o, _, n in shapes) / tp
    # embeddings and output layer (vocab-parallel), norms, MoE routers (dense, AdamW)
    other = 2 * vocab * h / tp + (2 * layers + 1) * h + layers * experts * h
    blocks, dequantized = 0.0, 0.0
    if method == "AdamW":
        trainable, a0 = linear + other, 0.0
    else:  # skew parameters: the replicated side whole, the sharded side 1/tp
        side_dims = sum(n * (i + o / tp if col else i / tp + o) for i, o, col, n in shapes) * layers
        skews = side_dims * (block - 1) / 2
        a0 = a0_bytes_per_entry(storage, group) * linear + (4 * linear / dp if master else 0)
        trainable = skews + other
        copies = 2 if microbatches > 1 else 0 if recompute else 1  # fp32 blocks (d x b per side), their gradient
        blocks = copies * 4 * side_dims * block
        if storage == "int8":  # one layer's A0 dequantized at a time into bf16 (float32 only a row chunk at a time)
            dequantized = 2 * max(i * o for i, o, _, _ in shapes) / tp
    tokens = seq * micro_batch
    kv = kv_heads * (h // heads)
    saved = saved_bytes_model(h, ffn, kv, layers, vocab, tokens, method, tp, 2, recompute=recompute, topk=topk)
    transient = max(tokens * 10 * vocab / tp,
                    2 * tokens * saved_bytes_per_token_layer(h, ffn, kv, method, tp, 2, topk=topk))
    ledger = Ledger(parameters=int(2 * trainable), a0=int(a0), gradients=int(4 * trainable),
                    optimizer=int(12 * trainable / dp), blocks=int(blocks), saved=int(saved))
    ledger.peak = ledger.static + ledger.blocks + ledger.saved + int(transient + dequantized)
    # megatron's checkpoint writer clones every CPU tensor that views part of a larger storage before writing: the
    # parameters, views of the distributed optimizer's contiguous buffer (A0 is saved from its own storage, but
    # for batched MoE experts, whose A0s are views of one stacked tensor: not counted here)
    ledger.save_peak = ledger.static + ledger.parameters
    return ledger
