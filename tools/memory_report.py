#!/usr/bin/env python
"""Memory ledger of one training step: POET fast, POET mem and AdamW (``--no-poet``).

Two parts, both printed as Markdown tables:

1. **Measured** on this machine (CPU, gloo, one process per method): the training program's own
   model and megatron-core engine (DDP, optimizer, forward/backward schedule) run two steps on
   mock tokens, with

   - parameters / ``A0`` / gradients / optimizer state: bytes of the distinct storages of the
     trainable parameters, the frozen ``A0`` buffers (and fp32 masters), the DDP gradient
     buffers, and the optimizer's state and main parameters;
   - POET step blocks: the Cayley–Neumann blocks of every side, built once per optimizer step
     (float32, ``d x b`` per side) and their accumulated gradient, alive from the step's first
     forward to its last backward (megatron_poet.poet.side);
   - saved for backward: distinct storages packed by autograd
     (``torch.autograd.graph.saved_tensors_hooks``) during the second step's forward, not
     counting parameters and buffers (saving those keeps nothing alive); "token-independent"
     is ``2 S(m/2) - S(m)`` for micro-batch ``m`` (what does not scale with the tokens);
   - peak: the largest tensor memory allocated from model construction to the end of step 2,
     from the allocator events of ``torch.profiler`` (``profile_memory=True``); the process's
     peak RSS is shown too (it adds the Python/torch/megatron runtime);
   - ``A0`` init transient: the largest memory a POET layer's ``initialize()`` allocates on
     top of its ``A0``, in units of that ``A0``.

2. **Computed** for Llama-shaped models in bf16 with megatron's mixed precision (bf16
   parameters, fp32 gradient buffers, fp32 main parameters + Adam moments, distributed
   optimizer over DP), flash attention, sequence parallelism when TP > 1, per GPU; the
   activation model is the per-op count in :func:`saved_bytes_per_token_layer`.

Example (the ledger in docs/MEMORY.md)::

    python tools/memory_report.py                  # measured at the issue's CPU config + computed
    python tools/memory_report.py --no-compute --hidden-size 256 --num-layers 2
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass

import torch

MiB = 2**20
CPU_CONFIG = ["--num-layers", "4", "--hidden-size", "1024", "--seq-length", "256", "--micro-batch-size", "2",
              "--mock-data", "--vocab-size", "8192", "--num-attention-heads", "4"]
VARIANTS = {"AdamW": ["--no-poet"], "POET fast": ["--poet-mode", "fast"], "POET mem": ["--poet-mode", "mem"]}


@dataclass
class Ledger:
    """Bytes per category of one run (see the module docstring)."""

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

    @property
    def static(self) -> int:
        return self.parameters + self.a0 + self.gradients + self.optimizer


def _storage_bytes(tensors) -> dict[int, int]:
    """``{storage pointer: bytes}`` of the distinct storages behind ``tensors``."""
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


class SavedTensorCounter:
    """Context: counts the distinct storages autograd saves during ``model``'s forward passes,
    except the model's parameters and buffers and POET's step blocks (leaves requiring grad, counted
    in their own row): saving those keeps nothing alive. Backward-time
    saves (e.g. the blocks rebuilt to differentiate the Cayley–Neumann map) are transient: not counted."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.seen, self.active = model, {}, False
        self.exclude = set(_storage_bytes(list(model.parameters()) + list(model.buffers())))

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.active and not (t.requires_grad and t.grad_fn is None):
            self.seen.update({p: n for p, n in _storage_bytes([t]).items() if p not in self.exclude})
        return t

    def _set_active(self, active: bool):
        def hook(*_):
            self.active = active
        return hook

    def __enter__(self):
        self._handles = [self.model.register_forward_pre_hook(self._set_active(True)),
                         self.model.register_forward_hook(self._set_active(False))]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def profiled_peak(prof) -> int:
    """Largest net tensor memory allocated while ``prof`` (profile_memory=True) was recording.

    The CPU allocator's running total also counts blocks of earlier profiling sessions freed
    outside them, so the peak is taken relative to the level when this session started.
    """
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort()
    start = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - start


def _batch(args, micro_batch: int, generator: torch.Generator) -> dict:
    tokens = torch.randint(0, args.vocab_size, (micro_batch, args.seq_length + 1), generator=generator)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(micro_batch, args.seq_length),
            "position_ids": torch.arange(args.seq_length).expand(micro_batch, -1)}


def measure(argv: list[str]) -> Ledger:
    """Two training steps of the program configured by ``argv`` (needs ``--mock-data --vocab-size N``)."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_poet.megatron.optimizer_state import leaf_optimizers
    from megatron_poet.poet.optim import poet_modules
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.training.engine import build_engine
    from megatron_poet.training.model_provider import build_model, padded_vocab_size

    args = parse_args(argv, world_size=1)
    args.vocab_size_unpadded = args.vocab_size
    gen = torch.Generator().manual_seed(0)
    ledger = Ledger()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_model(args, padded_vocab_size(args.vocab_size, args))
        engine = build_engine(args, [model])  # the program's megatron-core engine: DDP, optimizer, schedules
        params = [p for p in model.parameters() if p.requires_grad]
        a0 = [t for m in poet_modules(model) for t in (m.frozen_weight, getattr(m, "frozen_master", None))
              if t is not None]
        grads = [p.main_grad for p in params if getattr(p, "main_grad", None) is not None]
        for step in range(2):
            with SavedTensorCounter(model) as counter:
                engine.train_batch(iter([_batch(args, args.micro_batch_size, gen)]))
            engine.step()
    ledger.peak = profiled_peak(prof)
    ledger.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    ledger.saved = counter.bytes
    ledger.saved_token_independent = (2 * _forward_saved(engine.ddp_chunks[0], args, args.micro_batch_size // 2, gen)
                                      - counter.bytes)

    known = {}
    for name, tensors in (("parameters", params), ("a0", a0), ("gradients", grads)):
        mine = {p: n for p, n in _storage_bytes(tensors).items() if p not in known}
        setattr(ledger, name, sum(mine.values()))
        known.update(mine)
    state = []
    for leaf in leaf_optimizers(engine.optimizer.optimizer):
        inner = leaf.optimizer
        state += [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        state += [p for g in inner.param_groups for p in g["params"]]  # main params (bf16 / distributed)
    ledger.optimizer = sum(n for p, n in _storage_bytes(state).items() if p not in known)
    ledger.init_transient = max((_init_transient(m) for m in poet_modules(model)), default=0.0)
    ledger.blocks = 2 * sum(side.num_blocks * side.block_size ** 2 * 4 for side in _sides(model))
    del model, engine, params, a0, grads, state
    gc.collect()
    return ledger


def _sides(model):
    from megatron_poet.poet.side import OrthogonalSide

    return [m for m in model.modules() if isinstance(m, OrthogonalSide)]


def _forward_saved(ddp, args, micro_batch: int, gen) -> int:
    """Bytes autograd keeps for backward after one forward of ``micro_batch`` sequences."""
    from megatron_poet.poet.side import begin_step
    from megatron_poet.training.engine.base import forward_step

    begin_step(ddp.module, 1)  # as in training: the step's blocks are leaves, not saved per micro-batch
    with SavedTensorCounter(ddp.module) as counter:
        losses, _ = forward_step(iter([_batch(args, micro_batch, gen)]), ddp)
        losses.sum()
    del losses
    return counter.bytes


def _init_transient(layer) -> float:
    """Largest memory ``layer.initialize()`` allocates beyond the layer's own ``A0``, in units of that ``A0``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        layer.initialize(12345)
    return profiled_peak(prof) / (layer.frozen_weight.numel() * layer.frozen_weight.element_size())


# ----------------------------------------------------------------------------- computed ledgers
# Llama-shaped configs: (layers, hidden, ffn, attention heads, key/value heads, vocabulary).
# 1B = Llama-3.2-1B, 8B = Llama-3-8B, 13B = Llama-2-13B; 20B is Llama-3-like at 20.3B parameters.
LLAMA = {"Llama-1B": (16, 2048, 8192, 32, 8, 128256), "Llama-8B": (32, 4096, 14336, 32, 8, 128256),
         "Llama-13B": (40, 5120, 13824, 40, 40, 32000), "Llama-20B": (48, 6144, 16384, 48, 8, 128256)}


def linear_shapes(h: int, ffn: int, heads: int, kv_heads: int) -> list[tuple[int, int, bool]]:
    """``(d_in, d_out, column_parallel)`` of a layer's qkv, proj, fc1 (SwiGLU: 2 ffn), fc2."""
    kv = kv_heads * (h // heads)
    return [(h, h + 2 * kv, True), (h, h, False), (h, 2 * ffn, True), (ffn, h, False)]


def saved_bytes_per_token_layer(h: int, ffn: int, kv: int, method: str, tp: int, act: int,
                                attention: str = "flash", heads: int = 0, seq: int = 0) -> float:
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
    """
    elems = 4 * h + h + (h + 2 * kv) + (h + kv) + h + h + 2 * ffn + 3 * ffn
    if attention == "local":
        elems += heads * seq
    if method == "POET fast" or (method == "POET mem" and tp > 1):
        elems += 2 * h
    return elems * act / tp


def saved_bytes_model(h: int, ffn: int, kv: int, layers: int, vocab: int, tokens: int, method: str, tp: int,
                      act: int, attention: str = "flash", heads: int = 0, seq: int = 0) -> float:
    """All layers plus the final norm (input, normalized, output) and the loss's float32 softmax."""
    per_token = layers * saved_bytes_per_token_layer(h, ffn, kv, method, tp, act, attention, heads, seq)
    return tokens * (per_token + (3 * h * act + 4 * vocab) / tp)


def computed_ledger(model: str, tp: int, dp: int, method: str, seq: int, micro_batch: int, block: int,
                    master: bool = False) -> Ledger:
    """Per-GPU bytes for ``model`` in bf16 with megatron's mixed precision and the distributed optimizer."""
    layers, h, ffn, heads, kv_heads, vocab = LLAMA[model]
    shapes = linear_shapes(h, ffn, heads, kv_heads)
    linear = layers * sum(i * o for i, o, _ in shapes) / tp
    other = 2 * vocab * h / tp + (2 * layers + 1) * h  # embeddings and output layer (vocab-parallel), norms
    blocks = 0.0
    if method == "AdamW":
        trainable, a0 = linear + other, 0.0
    else:  # skew parameters: the replicated side whole, the sharded side 1/tp
        side_dims = sum((i + o / tp if col else i / tp + o) for i, o, col in shapes) * layers
        skews = side_dims * (block - 1) / 2
        trainable, a0 = skews + other, 2 * linear + (4 * linear / dp if master else 0)
        blocks = 2 * 4 * side_dims * block  # fp32 step blocks (d x b per side) and their gradient
    tokens = seq * micro_batch
    kv = kv_heads * (h // heads)
    saved = saved_bytes_model(h, ffn, kv, layers, vocab, tokens, method, tp, 2)
    transient = max(tokens * 10 * vocab / tp, 2 * tokens * saved_bytes_per_token_layer(h, ffn, kv, method, tp, 2))
    ledger = Ledger(parameters=int(2 * trainable), a0=int(a0), gradients=int(4 * trainable),
                    optimizer=int(12 * trainable / dp), blocks=int(blocks), saved=int(saved))
    ledger.peak = ledger.static + ledger.blocks + ledger.saved + int(transient)
    return ledger


# ----------------------------------------------------------------------------- report
def _ratio(value: float, base: float) -> str:
    return f" ({value / base:.2f}x)" if base else ""


def print_measured(ledgers: dict[str, Ledger], config: list[str]) -> None:
    from megatron_poet.training.arguments import parse_args

    args = parse_args(config, world_size=1)
    for name, ledger in ledgers.items():  # the activation model of the computed ledgers, evaluated here
        ledger.saved_model = saved_bytes_model(
            args.hidden_size, args.ffn_hidden_size, args.num_query_groups * args.kv_channels, args.num_layers,
            args.vocab_size, args.seq_length * args.micro_batch_size, name, 1, 4,
            "local" if args.attention_backend == "local" else "flash", args.num_attention_heads, args.seq_length)
    base = ledgers["AdamW"]
    print(f"### Measured: {' '.join(config)} (fp32, CPU, tensor memory in MiB)\n")
    print("| category | " + " | ".join(ledgers) + " |")
    print("|---" * (len(ledgers) + 1) + "|")
    rows = [("parameters (trainable)", "parameters"), ("A0 (frozen)", "a0"), ("gradients", "gradients"),
            ("optimizer state", "optimizer"), ("static total", "static"),
            ("POET step blocks + their gradient", "blocks"), ("saved for backward", "saved"),
            ("  of it token-independent", "saved_token_independent"),
            ("  activation model of the computed ledgers", "saved_model"), ("peak", "peak"),
            ("peak RSS (process)", "peak_rss")]
    for label, key in rows:
        cells = [f"{getattr(ledger, key) / MiB:.1f}{_ratio(getattr(ledger, key), getattr(base, key))}"
                 for ledger in ledgers.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{ledger.init_transient:.2f}" if name != "AdamW" else "-" for name, ledger in ledgers.items()]
    print("| A0 init transient (x layer A0) | " + " | ".join(cells) + " |\n")


def print_computed(models: list[str], layouts: list[tuple[int, int]], seq: int, micro_batch: int, block: int) -> None:
    print(f"### Computed: bf16 mixed precision, distributed optimizer, seq {seq}, micro-batch {micro_batch}, "
          f"POET block {block} (GB = 1e9 bytes per GPU)\n")
    print("| model | TP x DP | method | params | A0 | grads | optimizer | step blocks | saved for backward | peak "
          "| fits 80 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in models:
        for tp, dp in layouts:
            for method in ("AdamW", "POET fast", "POET mem"):
                led = computed_ledger(model, tp, dp, method, seq, micro_batch, block)
                cells = [led.parameters, led.a0, led.gradients, led.optimizer, led.blocks, led.saved, led.peak]
                print(f"| {model} | {tp} x {dp} | {method} | " + " | ".join(f"{c / 1e9:.1f}" for c in cells)
                      + f" | {'yes' if led.peak <= 80e9 else 'no'} |")
    print()


def _measure_in_subprocess(name: str, config: list[str]) -> Ledger:
    """:func:`measure` of one variant in a fresh process (its own peak RSS and allocator counters)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", name, *config]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return Ledger(**json.loads(out.stdout.strip().splitlines()[-1]))


def _init_process_group() -> None:
    from megatron_poet.megatron.cpu_backend import initialize_distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    initialize_distributed(1, 1, seed=1234)


def main(argv: list[str] | None = None) -> dict[str, Ledger]:
    # No abbreviations: unknown flags go to the training program (--seq-length is not --seq-length-large).
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--no-measure", action="store_true", help="only the computed ledgers")
    parser.add_argument("--no-compute", action="store_true", help="only the measured ledger")
    parser.add_argument("--seq-length-large", type=int, default=2048, help="sequence length of the computed ledgers")
    parser.add_argument("--block-size-large", type=int, default=256, help="POET block size of the computed ledgers")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # internal: one measurement
    ours, program_args = parser.parse_known_args(argv)
    warnings.filterwarnings("ignore", module="megatron")  # "Apex/TE not installed" and the like
    if ours.variant:
        _init_process_group()
        try:
            print(json.dumps(asdict(measure(program_args + VARIANTS[ours.variant]))))
        finally:
            from megatron_poet.megatron.cpu_backend import destroy_distributed

            destroy_distributed()
        return {}
    ledgers = {}
    if not ours.no_measure:
        config = CPU_CONFIG + program_args  # later flags win
        ledgers = {name: _measure_in_subprocess(name, config) for name in VARIANTS}
        print_measured(ledgers, config)
    if not ours.no_compute:
        print_computed(list(LLAMA), [(1, 1), (1, 8), (8, 1), (8, 8)], ours.seq_length_large, 1, ours.block_size_large)
    return ledgers


if __name__ == "__main__":
    main(sys.argv[1:])
