#!/usr/bin/env python
"""Memory per rank of a POET model: megatron engine vs DeepSpeed ZeRO-1/2/3 (tables for docs/DEEPSPEED.md).

1. Computed, for the Llama-1B/8B/13B shapes at 1/2/4/8 data-parallel ranks, from the model's
   tensor inventory (:func:`inventory`: frozen ``A0`` and trainable elements, counted from
   the layer shapes and checked against a built model in part 2) with mixed-precision training:
   bf16 parameters, fp32 master copy and two fp32 Adam moments (12 bytes) per trainable element.

   ======================  ========================  =====================  =================
   engine                  parameters (A0 + train)   gradients (train)      optimizer (train)
   ======================  ========================  =====================  =================
   megatron DDP            2 (F + T)                 4 T (fp32 buffer)      12 T
   megatron dist. optim.   2 (F + T)                 4 T                    12 T / N
   ZeRO-1                  2 (F + T)                 2 T                    12 T / N
   ZeRO-2                  2 (F + T)                 2 T / N                12 T / N
   ZeRO-3                  2 (F + T) / N             2 T / N                12 T / N
   ======================  ========================  =====================  =================

   Activations, communication buckets and temporary buffers are not included.
2. Measured on this machine (CPU, fp32, gloo): a small POET Llama trained for 2 iterations by
   the real program at 1 and 2 ranks per engine; each rank sums the bytes of every tensor alive
   (distinct storages) and of the model parameters it holds, next to the same accounting in fp32
   (4-byte parameters and gradients; DeepSpeed keeps a separate fp32 master even in fp32), with
   DeepSpeed's communication buckets made small (:data:`MEASURE_ZERO`).

3. With ``--peak``: each rank's peak RSS (``ru_maxrss``) over a whole run of a larger POET Llama
   (:data:`PEAK_MODEL`, fp32, 3 iterations) at 1, 2 and 4 ranks, ZeRO-1 vs ZeRO-3, beside the ledger's
   state per rank (part 1's rule in fp32) plus the runtime measured at 1 rank under ZeRO-1 (its peak
   minus its state). ZeRO-3 builds the model partitioned (``deepspeed.zero.Init``), so its peak falls
   with the number of ranks; runs use glibc's ``MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=0`` (see
   docs/DEEPSPEED.md).

  python tools/benchmark_deepspeed_memory.py             # tables 1 and 2 (measuring takes a few minutes)
  python tools/benchmark_deepspeed_memory.py --computed  # table 1 only
  python tools/benchmark_deepspeed_memory.py --peak      # table 3 (about 15 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2**30
LLAMA = {  # name -> (flags, vocabulary): Llama 3.2-1B (untied here), 3.1-8B, 2-13B; POET block 256 divides all
    "Llama-1B": (["--num-layers", "16", "--hidden-size", "2048", "--ffn-hidden-size", "8192",
                  "--num-attention-heads", "32", "--num-query-groups", "8"], 128256),
    "Llama-8B": (["--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336",
                  "--num-attention-heads", "32", "--num-query-groups", "8"], 128256),
    "Llama-13B": (["--num-layers", "40", "--hidden-size", "5120", "--ffn-hidden-size", "13824",
                   "--num-attention-heads", "40"], 32000),
}
SMALL = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "1024", "--num-attention-heads", "4",
         "--seq-length", "64", "--vocab-size", "512", "--poet-block-size", "32", "--micro-batch-size", "2",
         "--make-vocab-size-divisible-by", "128"]
SMALL_VOCAB = 513  # mock data's NullTokenizer: 512 ids + end-of-document
PEAK_MODEL = ["--num-layers", "4", "--hidden-size", "2048", "--ffn-hidden-size", "5632", "--num-attention-heads", "16",
              "--seq-length", "128", "--vocab-size", "8192", "--poet-block-size", "256", "--micro-batch-size", "1",
              "--make-vocab-size-divisible-by", "128"]
PEAK_VOCAB = 8193
ENGINES = {  # name -> the program's flags (ZeRO stage: a config file, see _zero_flags)
    "megatron DDP": [],
    "megatron dist. optim.": ["--use-distributed-optimizer"],
    "ZeRO-1": 1,
    "ZeRO-2": 2,
    "ZeRO-3": 3,
}
# DeepSpeed allocates communication buckets of these many elements up front (default 5e8: 2 GiB in
# fp32, which would swamp the small model); ZeRO-3 also keeps tensors under the persistence
# threshold (default 1e5 elements) whole, and up to 1e9 gathered elements resident between uses
# (max_live_parameters, max_reuse_distance: all of a model this size). Small buckets, threshold 0
# and gathered parameters released after use measure the model's state.
MEASURE_ZERO = {"reduce_bucket_size": 1000000, "allgather_bucket_size": 1000000,
                "stage3_prefetch_bucket_size": 1000000, "stage3_param_persistence_threshold": 0,
                "stage3_max_live_parameters": 1000000, "stage3_max_reuse_distance": 0}


def _zero_flags(stage: int, directory: str) -> list[str]:
    path = os.path.join(directory, f"ds_zero{stage}.json")
    with open(path, "w") as f:
        json.dump({"zero_optimization": {"stage": stage, **MEASURE_ZERO}}, f)
    return ["--deepspeed", "--deepspeed-config", path]


def _args(flags: list[str], world: int = 1):
    from megatron_poet.training.arguments import parse_args

    return parse_args(["--mock-data", "--vocab-size", "2", "--poet-block-size", "256", *flags], world_size=world)


def inventory(args, vocab_size: int) -> tuple[int, int]:
    """``(frozen A0 elements, trainable elements)`` of the run's model (TP=1, untied Llama style)."""
    from megatron_poet.training.arguments import linear_shapes
    from megatron_poet.training.model_provider import padded_vocab_size

    frozen = trainable = 0
    for _, d_in, d_out, _, _ in linear_shapes(args):
        if args.poet:
            frozen += d_in * d_out
            b = args.poet_block_size
            trainable += (d_in + d_out) * (b - 1) // 2  # d/b blocks of b(b-1)/2 per side
        else:
            trainable += d_in * d_out
    trainable += 2 * args.hidden_size  # the two RMSNorm weights
    vocab = padded_vocab_size(vocab_size, args)
    return args.num_layers * frozen, args.num_layers * trainable + 2 * vocab * args.hidden_size + args.hidden_size


def per_rank_bytes(engine: str, frozen: int, trainable: int, ranks: int, bf16: bool = True) -> int:
    """Parameters + gradients + optimizer state on one rank (see the module docstring's table)."""
    param = 2 if bf16 else 4
    master = 12 if bf16 else (8 if engine.startswith("megatron") else 12)  # fp32 megatron steps the params
    params = param * (frozen + trainable) / (ranks if engine == "ZeRO-3" else 1)
    if engine.startswith("megatron"):
        grads = 4 * trainable  # fp32 gradient buffer (grad_reduce_in_fp32 with bf16)
    else:  # DeepSpeed keeps gradients in the parameters' dtype (its default grad_accum_dtype)
        grads = param * trainable / (1 if engine == "ZeRO-1" else ranks)
    optimizer = master * trainable / (1 if engine == "megatron DDP" else ranks)
    return int(params + grads + optimizer)


def computed_table() -> str:
    rows = ["| model | A0 (frozen) | trainable | engine | 1 rank | 2 ranks | 4 ranks | 8 ranks |",
            "|---|---|---|---|---|---|---|---|"]
    for model, (flags, vocab) in LLAMA.items():
        frozen, trainable = inventory(_args(flags), vocab)
        for engine in ENGINES:
            cells = [f"{per_rank_bytes(engine, frozen, trainable, n) / GIB:.1f}" for n in (1, 2, 4, 8)]
            rows.append(f"| {model} | {frozen / 1e9:.2f} B | {trainable / 1e9:.2f} B | {engine} | "
                        + " | ".join(cells) + " |")
    return "\n".join(rows)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _measure_worker(out_dir: str, argv: list[str]) -> int:
    """Run the training program; after its loop, record this rank's live tensor bytes."""
    import torch

    from megatron_poet.training import pretrain
    from megatron_poet.training.engine import full_numel

    original = pretrain.train

    def train_then_measure(args, engine, *rest):
        state = original(args, engine, *rest)
        gc.collect()
        storages = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.layout == torch.strided and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        params = [p for chunk in engine.model_chunks for p in chunk.parameters()]
        held = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]
        import resource

        record = {"tensor_bytes": sum(storages.values()), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "param_bytes": sum(t.numel() * t.element_size() for t in held),
                  "frozen": sum(full_numel(p) for p in params if not p.requires_grad),
                  "trainable": sum(full_numel(p) for p in params if p.requires_grad)}
        with open(os.path.join(out_dir, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
            json.dump(record, f)
        return state

    pretrain.train = train_then_measure
    return pretrain.main(argv)


def _run_ranks(engine_flags, ranks: int, model: list[str], iterations: int, env: dict | None = None) -> list[dict]:
    """Train ``model`` under ``engine_flags`` at ``ranks`` ranks; each rank's record of :func:`_measure_worker`."""
    with tempfile.TemporaryDirectory() as out:
        flags = _zero_flags(engine_flags, out) if isinstance(engine_flags, int) else engine_flags
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", _free_port(), os.path.abspath(__file__), "--measure-into", out,
               "--mock-data", *model, "--train-iters", str(iterations), "--global-batch-size", str(2 * ranks),
               "--eval-iters", "0", *flags]
        subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(ranks)]


def measured_table() -> str:
    rows = ["| engine | ranks | computed (fp32) MiB | measured: all tensors MiB | measured: parameters held MiB |",
            "|---|---|---|---|---|"]
    frozen, trainable = inventory(_args(SMALL), SMALL_VOCAB)
    for engine, engine_flags in ENGINES.items():
        for ranks in (1, 2):
            records = _run_ranks(engine_flags, ranks, SMALL, 2)
            assert all((r["frozen"], r["trainable"]) == (frozen, trainable) for r in records), (records, frozen, trainable)
            computed = per_rank_bytes(engine, frozen, trainable, ranks, bf16=False) / 2**20
            tensors = max(r["tensor_bytes"] for r in records) / 2**20
            params = max(r["param_bytes"] for r in records) / 2**20
            rows.append(f"| {engine} | {ranks} | {computed:.1f} | {tensors:.1f} | {params:.1f} |")
    return "\n".join(rows)


def peak_table() -> str:
    """Table 3 of the module docstring: peak RSS per rank at 1, 2, 4 ranks, ZeRO-1 and ZeRO-3, interleaved."""
    frozen, trainable = inventory(_args(PEAK_MODEL), PEAK_VOCAB)
    allocator = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "0"}
    peaks = {(engine, ranks): max(r["peak_rss"] for r in _run_ranks(ENGINES[engine], ranks, PEAK_MODEL, 3, allocator))
             for ranks in (1, 2, 4) for engine in ("ZeRO-1", "ZeRO-3")}
    runtime = peaks["ZeRO-1", 1] - per_rank_bytes("ZeRO-1", frozen, trainable, 1, bf16=False)
    rows = ["| engine | ranks | ledger state / rank GiB | ledger + runtime GiB | peak RSS / rank GiB | error |",
            "|---|---|---|---|---|---|"]
    for (engine, ranks), peak in sorted(peaks.items()):
        state = per_rank_bytes(engine, frozen, trainable, ranks, bf16=False)
        rows.append(f"| {engine} | {ranks} | {state / GIB:.2f} | {(state + runtime) / GIB:.2f} | {peak / GIB:.2f} | "
                    f"{peak / (state + runtime) - 1:+.1%} |")
    return f"runtime (ZeRO-1 at 1 rank, peak minus state): {runtime / GIB:.2f} GiB\n\n" + "\n".join(rows)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure-into":
        return _measure_worker(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--computed", action="store_true", help="only the computed table (no training runs)")
    parser.add_argument("--peak", action="store_true", help="only table 3: peak RSS per rank at 1, 2, 4 ranks")
    options = parser.parse_args()
    if options.peak:
        frozen, trainable = inventory(_args(PEAK_MODEL), PEAK_VOCAB)
        print(f"Peak RSS per rank, POET Llama ({frozen / 1e6:.0f}M A0 + {trainable / 1e6:.0f}M trainable elements), "
              f"fp32, 3 iterations, max over ranks:\n")
        print(peak_table())
        return 0
    print("Computed GiB per rank (bf16 params, fp32 master + Adam; activations excluded), POET block 256:\n")
    print(computed_table())
    if not options.computed:
        frozen, trainable = inventory(_args(SMALL), SMALL_VOCAB)
        print(f"\nMeasured on CPU (fp32, gloo), small POET Llama ({frozen:,} A0 + {trainable:,} trainable "
              f"elements), max over ranks after 2 iterations:\n")
        print(measured_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
