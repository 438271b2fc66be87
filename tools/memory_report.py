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
from dataclasses import asdict

import torch

from megatron_poet.memory_ledger import (
    LADDER, LLAMA, MOE, POETX, Ledger, computed_ledger, parameter_count, saved_bytes_model,
)

MiB = 2**20
CPU_CONFIG = ["--num-layers", "4", "--hidden-size", "1024", "--seq-length", "256", "--micro-batch-size", "2",
              "--mock-data", "--vocab-size", "8192", "--num-attention-heads", "4"]
VARIANTS = {"AdamW": ["--no-poet"], "POET fast": ["--poet-mode", "fast"], "POET mem": ["--poet-mode", "mem"],
            "POET mem int8": ["--poet-mode", "mem", "--poet-a0-storage", "int8"]}


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
    except the model's parameters and buffers and POET's blocks (counted in their own row): saving
    those keeps nothing alive. Backward-time
    saves (e.g. the blocks rebuilt to differentiate the Cayley–Neumann map) are transient: not counted."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.seen, self.active = model, {}, False
        self.exclude = set(_storage_bytes(list(model.parameters()) + list(model.buffers())))

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.active and not _is_poet_blocks(t):
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
    from megatron_poet.poet.side import step_blocks_pay_off
    from megatron_poet.training.engine import build_engine
    from megatron_poet.training.engine.base import num_microbatches
    from megatron_poet.training.engine.base import num_microbatches
    from megatron_poet.training.model_provider import build_model, padded_vocab_size

    args = parse_args(argv, world_size=1)
    args.vocab_size_unpadded = args.vocab_size
    gen = torch.Generator().manual_seed(0)
    ledger = Ledger()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_model(args, padded_vocab_size(args.vocab_size, args))
        engine = build_engine(args, [model])  # the program's megatron-core engine: DDP, optimizer, schedules
        params = [p for p in model.parameters() if p.requires_grad]
        a0 = [t for m in poet_modules(model) for t in (m.frozen_weight, m.frozen_scale, m.frozen_zero,
                                                       getattr(m, "frozen_master", None)) if t is not None]
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
    # Held for the whole step with their gradient, or (one micro-batch) from each layer's forward to its backward.
    copies = 2 if step_blocks_pay_off(num_microbatches(args), args.compile) else 1
    ledger.blocks = copies * sum(side.num_blocks * side.block_size ** 2 * 4 for side in _sides(model))
    del model, engine, params, a0, grads, state
    gc.collect()
    return ledger


def _is_poet_blocks(t: torch.Tensor) -> bool:
    """A step's blocks (a leaf requiring grad: only parameters and they are) or blocks built by a forward."""
    if t.grad_fn is None:
        return t.requires_grad
    return type(t.grad_fn).__name__ == "CayleyNeumannBlocksBackward"


def _sides(model):
    from megatron_poet.poet.side import OrthogonalSide

    return [m for m in model.modules() if isinstance(m, OrthogonalSide)]


def _forward_saved(ddp, args, micro_batch: int, gen) -> int:
    """Bytes autograd keeps for backward after one forward of ``micro_batch`` sequences."""
    from megatron_poet.training.engine.base import forward_step

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


# ----------------------------------------------------------------------------- report
def _ratio(value: float, base: float) -> str:
    return f" ({value / base:.2f}x)" if base else ""


def print_measured(ledgers: dict[str, Ledger], config: list[str]) -> None:
    from megatron_poet.training.arguments import parse_args

    args = parse_args(config, world_size=1)
    for name, ledger in ledgers.items():  # the activation model of the computed ledgers, evaluated here
        ledger.saved_model = saved_bytes_model(
            args.hidden_size, args.ffn_hidden_size, args.num_query_groups * args.kv_channels, args.num_layers,
            args.vocab_size, args.seq_length * args.micro_batch_size, name.removesuffix(" int8"), 1, 4,
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


# Our configurations beside POET-X's published ones: (label, method, A0 storage, full recompute, POET-X column).
POETX_ROWS = (("AdamW", "AdamW", "native", False, "AdamW"), ("POET fast", "POET fast", "native", False, "fast"),
              ("POET mem, full recompute", "POET mem", "native", True, "mem"),
              ("POET mem, full recompute, int8 A0", "POET mem", "int8", True, "XQ"))


def print_poetx(block: int) -> None:
    """The computed ledger at POET-X's own configurations (one GPU, batch 1, bf16) beside its published peaks."""
    print(f"### Computed at POET-X's configurations (one GPU, batch 1, POET block {block}) vs POET-X's published "
          "peaks on one H100 (GB = 1e9 bytes)\n")
    print("| config | params | seq | ours | A0 | step blocks | saved for backward | peak | POET-X | published "
          "| ours / published |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (config, seq, published) in POETX.items():
        for label, method, storage, recompute, theirs in POETX_ROWS:
            led = computed_ledger(config, 1, 1, method, seq, 1, block, storage=storage, recompute=recompute,
                                  microbatches=1)
            figure = published[theirs]
            ratio = f"{led.peak / 1e9 / figure:.2f}" if figure else "-"
            print(f"| {name} | {parameter_count(config) / 1e9:.2f}B | {seq} | {label} | {led.a0 / 1e9:.1f} | "
                  f"{led.blocks / 1e9:.1f} | {led.saved / 1e9:.1f} | {led.peak / 1e9:.1f} | "
                  f"{'POET-X ' + theirs if theirs != 'AdamW' else 'AdamW'} | {figure or 'out of memory'} | {ratio} |")
    print()


# The best memory flags per method: (label, ledger method, A0 storage), all with full recomputation.
BEST_FLAGS = [("AdamW, full recompute", "AdamW", "native"), ("POET mem, bf16 A0", "POET mem", "native"),
              ("POET mem, int8 A0", "POET mem", "int8")]


def print_moe(seq: int, block: int) -> None:
    """Mixture-of-experts twins of dense widths beside the dense models (one GPU, batch 1, best flags)."""
    print(f"### Computed: mixture of experts (8 experts of the dense MLP's width, top-2) vs the dense model, one GPU, "
          f"seq {seq}, batch 1, full recompute, POET block {block}; peak GB\n")
    print("| model | params | " + " | ".join(label for label, _, _ in BEST_FLAGS) + " |")
    print("|---|---|" + "---|" * len(BEST_FLAGS))
    for name, config in MOE.items():
        dense = config[:6]
        for label, shape in ((name.split(" ")[0], dense), (name, config)):
            peaks = [computed_ledger(shape, 1, 1, method, seq, 1, block, storage=storage, recompute=True,
                                     microbatches=1).peak for _, method, storage in BEST_FLAGS]
            print(f"| {label} | {parameter_count(shape) / 1e9:.1f}B | " + " | ".join(f"{p / 1e9:.1f}" for p in peaks)
                  + " |")
    print()


def print_largest(seq: int, block: int, budget: float = 80e9) -> None:
    """Which Llama of :data:`LADDER` fits one GPU of ``budget`` bytes, per method (batch 1, best memory flags)."""
    methods = BEST_FLAGS
    print(f"### Computed: the largest Llama on one {budget / 1e9:.0f} GB GPU (seq {seq}, batch 1, full recompute, "
          f"POET block {block}; peak GB)\n")
    print("| model | params | " + " | ".join(label for label, _, _ in methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    largest = {}
    for name, config in LADDER.items():
        cells = []
        for label, method, storage in methods:
            peak = computed_ledger(config, 1, 1, method, seq, 1, block, storage=storage, recompute=True,
                                   microbatches=1).peak
            if peak <= budget:
                largest[label] = name
            cells.append(f"{peak / 1e9:.1f}" + ("" if peak <= budget else " (no)"))
        print(f"| {name} | {parameter_count(LADDER[name]) / 1e9:.1f}B | " + " | ".join(cells) + " |")
    print("\nlargest that fits: " + "; ".join(f"{label}: {largest.get(label, 'none')}" for label, _, _ in methods)
          + "\n")


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
        print_poetx(ours.block_size_large)
        print_largest(ours.seq_length_large, ours.block_size_large)
        print_moe(ours.seq_length_large, ours.block_size_large)
    return ledgers


if __name__ == "__main__":
    main(sys.argv[1:])
