"""Training logs: Megatron-style iteration lines, validation lines, TensorBoard, FLOP counting,
and the end-of-run summary.

FLOPs (multiply-add = 2 FLOPs) per token of one transformer layer, for what the
model really computes. A linear ``(d_in -> d_out)``:

- dense (``--no-poet``): forward ``2 d_in d_out``, backward ``4 d_in d_out``
  (input gradient + weight gradient).
- POET, block size ``b``: forward ``2 d_in d_out`` (the frozen ``A0`` GEMM) +
  ``2 b (d_in + d_out)`` (the block rotations ``R`` and ``P``); backward
  ``2 d_in d_out`` (input gradient only: ``A0`` has no weight gradient) +
  ``4 b (d_in + d_out)`` (input and block gradients of both rotations).
  ``--poet-mode mem`` recomputes the forward in backward: ``+ 2 d_in d_out + 2 b (d_in + d_out)``.
  Building the blocks from ``Q`` (Cayley–Neumann, ``k`` terms) costs
  ``~ 3 x 2 b^3 (k + 1)`` per block per micro-batch (forward + backward), independent
  of the tokens; it is added per micro-batch (the copies of a replicated side
  that tensor-parallel ranks build redundantly are not counted: not useful work).
  The fully stochastic variant rotates one ``b``-subset per side and permutation group
  (the sharded side has ``G`` = ``--poet-permutation-groups`` groups per part, the replicated side one):
  the same formulas with ``b (d_in + d_out)`` replaced by ``(1 + G) b^2``.
- attention scores and values: ``4 s d_attn`` forward, twice that backward (full
  ``s x s`` products as computed, no causal discount).
- output layer: ``6 h V`` (forward + backward); embeddings and norms are not counted.

MFU = achieved FLOP/s / the GPU's dense bf16 (or fp32/tf32) peak; ``n/a`` on CPUs
and unknown GPUs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import resource
import time

import psutil
import torch

from .arguments import linear_shapes
from .engine.base import device as _device
from .metrics import metric_writers

# Dense peak TFLOP/s per GPU (bf16, tf32) from the vendors' data sheets (no sparsity).
_PEAK_TFLOPS = {"H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0),
                "L40S": (362.0, 183.0), "A10": (125.0, 62.5)}


def _linear_flops(d_in: int, d_out: int, args: argparse.Namespace, parts: int = 1) -> tuple[float, float]:
    """``(per-token FLOPs, per-micro-batch FLOPs)`` of one linear, forward + backward
    (``parts``: 2 for SwiGLU's gate/up ``linear_fc1``, whose halves are permuted apart)."""
    gemm = 2.0 * d_in * d_out
    if not args.poet:
        return 3 * gemm, 0.0
    b, k = args.poet_block_size, args.poet_neumann_terms or 1  # exact Cayley (None) ~ one solve ~ one term
    if args.poet_variant == "fs":
        blocks = 1 + parts * args.poet_permutation_groups
        rotate = 2.0 * b * b * blocks
    else:
        rotate, blocks = 2.0 * b * (d_in + d_out), d_in // b + d_out // b
    per_token = 2 * gemm + 3 * rotate
    if args.poet_mode == "mem":
        per_token += gemm + rotate
    return per_token, 3 * 2.0 * b**3 * (k + 1) * blocks


def flops_per_iteration(args: argparse.Namespace, vocab_size: int) -> float:
    """Model FLOPs of one training iteration (all ranks together); see the module docstring."""
    h, s = args.hidden_size, args.seq_length
    tokens = args.global_batch_size * s
    micro_batches = args.global_batch_size // args.micro_batch_size  # over all DP ranks
    attn = args.num_attention_heads * args.kv_channels
    per_token = per_micro = 0.0
    for name, d_in, d_out, _, parts in linear_shapes(args):
        tok, mb = _linear_flops(d_in, d_out, args, parts)
        if ".experts." in name:  # MoE: each token passes its top-k experts; every expert builds its blocks
            tok, mb = tok * args.moe_router_topk, mb * args.num_experts
        per_token, per_micro = per_token + tok, per_micro + mb
    per_token += 3 * 4.0 * s * attn
    total = args.num_layers * (per_token * tokens + per_micro * micro_batches)
    return total + 6.0 * h * vocab_size * tokens


def peak_tflops(bf16: bool) -> float | None:
    """Dense peak TFLOP/s of this process's GPU, ``None`` on CPU or for an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (p_bf16, p_tf32) in _PEAK_TFLOPS.items():
        if key in name:
            return p_bf16 if bf16 else p_tf32
    return None


def peak_memory_gib() -> tuple[float, str]:
    """``(GiB, what)``: max allocated GPU memory, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"  # Linux: KiB


class TrainingLogger:
    """Prints iteration/validation lines on the last rank and writes TensorBoard scalars.

    The last rank holds the loss when pipeline-parallel, so it logs; every
    other rank stays silent.
    """

    def __init__(self, args: argparse.Namespace, vocab_size: int, start_iteration: int):
        self.args = args
        self.flops = flops_per_iteration(args, vocab_size)
        self.peak = peak_tflops(args.bf16)
        self.is_logger = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        self.writers = metric_writers(args) if self.is_logger else []
        self.start_iteration = start_iteration
        self._window_start = time.time()
        self._window_iters = 0
        self._training_start = time.time()
        # Seconds outside the iterations, kept out of ms/iteration, tokens/s and MFU (Megatron's timers).
        self.phase_seconds = {"evaluation": 0.0, "checkpointing": 0.0}
        self.last_loss: tuple[int, float] | None = None  # (iteration, train loss), for the summary
        self.last_validation: tuple[int, float] | None = None
        self._window_skipped = 0  # skipped iterations since the last line (Megatron's count)
        self.skipped = 0

    def print(self, message: str) -> None:
        if self.is_logger:
            print(message, flush=True)

    def start_training(self) -> None:
        """The first iteration starts now: what came before is set-up."""
        self._window_start = self._training_start = time.time()

    @contextlib.contextmanager
    def timed(self, phase: str, name: str):
        """Time an evaluation or a save (collective: every rank enters it at the same point).

        Its time is kept out of the iteration window and added to ``phase_seconds[phase]``, and a line
        in Megatron-LM's timer format gives its ``(min, max)`` over ranks.
        """
        start = time.time()
        yield
        self.record_time(phase, name, time.time() - start)

    def record_time(self, phase: str, name: str, seconds: float) -> None:
        """What :meth:`timed` does with a time measured elsewhere (collective)."""
        self._window_start += seconds
        self.phase_seconds[phase] += seconds
        spread = torch.tensor([-seconds, seconds], dtype=torch.float64, device=_device())
        torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
        self.print(f" (min, max) time across ranks (ms):\n    {name} {'.' * max(1, 40 - len(name))}: "
                   f"({-1000 * float(spread[0]):.2f}, {1000 * float(spread[1]):.2f})")

    def iteration(self, iteration: int, consumed_samples: int, lr: float, loss: float,
                  grad_norm: float | None, merges: int, orth_error: float | None,
                  a0_drift: float | None = None, skipped: str | None = None,
                  extra: dict[str, float] | None = None) -> bool:
        """Count an iteration; every ``--log-interval`` print a line. Returns whether it printed.

        Time per iteration is averaged over the window; loss and grad norm are this iteration's.

        ``orth_error`` is the largest POET orthogonality error measured since the previous line;
        ``a0_drift`` the largest relative change of an ``A0``'s Frobenius norm since initialization
        (merges fold orthogonal factors, which keep it at rounding level: a spectrum-drift alarm).
        ``skipped``: the message of a skipped update (printed at once), ``None`` when it was applied.
        ``extra``: more scalars since the last line (MoE's, :mod:`.moe_metrics`): printed, except
        those named ``moe/...``, which only go to TensorBoard.
        """
        self._window_iters += 1
        if skipped:
            self.print(skipped)
            self._window_skipped += 1
            self.skipped += 1
        else:
            self.last_loss = (iteration, loss)
        if iteration % self.args.log_interval and iteration != self.args.train_iters:
            return False
        now = time.time()
        seconds = (now - self._window_start) / max(self._window_iters, 1)
        self._window_start, self._window_iters = now, 0
        world = torch.distributed.get_world_size()
        tokens_per_s = self.args.global_batch_size * self.args.seq_length / seconds / world
        tflops = self.flops / seconds / world / 1e12
        mfu = f"{100 * tflops / self.peak:.1f}%" if self.peak else "n/a"
        mem, where = peak_memory_gib()
        eta = datetime.timedelta(seconds=round(seconds * (self.args.train_iters - iteration)))
        fields = [
            f"iteration {iteration:8d}/{self.args.train_iters:8d}",
            f"consumed samples: {consumed_samples:12d}",
            f"elapsed time per iteration (ms): {1000 * seconds:.1f}",
            f"learning rate: {lr:.6E}",
            f"global batch size: {self.args.global_batch_size:5d}",
            f"lm loss: {loss:.6E}",
            f"grad norm: {grad_norm:.3f}" if grad_norm is not None else "grad norm: n/a",
            f"tokens/s/GPU: {tokens_per_s:.0f}",
            f"TFLOP/s/GPU: {tflops:.3g}",
            f"MFU: {mfu}",
            f"peak mem ({where}): {mem:.2f} GiB",
            f"number of skipped iterations: {self._window_skipped:3d}",
        ]
        if self.args.poet:
            fields += [f"merges: {merges}", f"max orth err: {orth_error:.1e}"]
            if a0_drift is not None:
                fields.append(f"A0 norm drift: {a0_drift:.1e}")
        extra = extra or {}
        fields += [f"{name}: {value:.6E}" if "loss" in name else f"{name}: {value:.2f}"
                   for name, value in extra.items() if not name.startswith("moe/")]
        fields.append(f"ETA {eta}")
        self.print(f" [{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] " + " | ".join(fields))
        if self.writers:
            scalars = {"lm loss": loss, "learning-rate": lr, "tokens-per-sec-per-gpu": tokens_per_s,
                       "tflops-per-gpu": tflops, "iteration-time-ms": 1000 * seconds, "peak-mem-gib": mem,
                       "skipped-iterations": self._window_skipped}
            if grad_norm is not None:
                scalars["grad-norm"] = grad_norm
            if self.args.poet:
                scalars.update({"poet/merges": merges, "poet/max-orthogonality-error": orth_error})
                if a0_drift is not None:
                    scalars["poet/a0-norm-drift"] = a0_drift
            scalars.update(extra)
            for writer in self.writers:
                writer.add_scalars(scalars, iteration)
        self._window_skipped = 0
        return True

    def validation(self, iteration: int, loss: float, label: str = "validation") -> None:
        ppl = math.exp(min(loss, 20.0))
        if label == "validation":
            self.last_validation = (iteration, loss)
        line = f" {label} loss at iteration {iteration} | lm loss: {loss:.6E} | lm loss PPL: {ppl:.6E} "
        bar = "-" * len(line)
        self.print(f"{bar}\n{line}\n{bar}")
        for writer in self.writers:
            writer.add_scalars({f"{label}/lm loss": loss, f"{label}/lm loss ppl": ppl}, iteration)

    def summary(self, iteration: int, consumed_samples: int) -> None:
        """The end-of-run block: iterations, tokens, wall time, final losses, where the outputs are."""
        if self.is_logger:
            phases = {"set-up": self._training_start - psutil.Process().create_time()}
            outside = sum(self.phase_seconds.values())
            phases.update(training=time.time() - self._training_start - outside, **self.phase_seconds)
            self.print(run_summary(self.args, self.start_iteration, iteration, consumed_samples, phases,
                                   self.last_loss, self.last_validation, self.skipped))

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class SetupClock:
    """The set-up before the first iteration, phase by phase (from the process start), for one log line."""

    def __init__(self):
        self._last = psutil.Process().create_time()
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str, made: tuple[float, str] | None = None) -> None:
        """``phase`` ended now (it began at the previous mark); ``made``: ``(count, what)`` the phase
        produced, reported with its rate over the whole phase (e.g. ``(2.6e8, "A0 elements")`` ->
        "260,000,000 A0 elements, 41.2M/s"; a lower bound of the rate of that part of the phase)."""
        now = time.time()
        seconds = now - self._last
        if made:
            count, what = made
            phase += f" ({count:,.0f} {what}, {count / 1e6 / max(seconds, 1e-9):.3g}M/s)"
        self.phases.append((phase, seconds))
        self._last = now

    def report(self) -> str:
        total = sum(seconds for _, seconds in self.phases)
        return f" set-up {total:.1f} s: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases)


def _loss_line(what: str, record: tuple[int, float] | None) -> str:
    if record is None:
        return f" final {what} loss: n/a"
    iteration, loss = record
    return f" final {what} loss: {loss:.6E} | PPL: {math.exp(min(loss, 20.0)):.6E} (iteration {iteration})"


def run_summary(args: argparse.Namespace, start_iteration: int, iteration: int, consumed_samples: int,
                phases: dict[str, float], last_loss: tuple[int, float] | None,
                last_validation: tuple[int, float] | None, skipped: int = 0) -> str:
    """The lines printed at the end of a run (see :meth:`TrainingLogger.summary`); ``phases``:
    seconds of set-up, training (iterations only), evaluation and checkpointing."""
    from megatron_poet.checkpoint import checkpoint_dir, latest_iteration

    wall = time.time() - psutil.Process().create_time()
    done = iteration - start_iteration
    tokens = done * args.global_batch_size * args.seq_length
    stopped = "" if iteration >= args.train_iters else f", stopped early at iteration {iteration} of {args.train_iters}"
    lines = [
        " " + "=" * 30 + " run summary " + "=" * 30,
        f" iterations: {done} in this run ({start_iteration + 1}-{iteration}){stopped}; {tokens:,} tokens "
        f"({consumed_samples * args.seq_length:,} since the start of training)"
        + (f"; {skipped} skipped (non-finite or spiking loss or gradient)" if skipped else ""),
        f" wall time: {datetime.timedelta(seconds=round(wall))} ("
        + ", ".join(f"{name} {datetime.timedelta(seconds=round(max(0.0, t)))}" for name, t in phases.items()) + ")",
        _loss_line("train", last_loss),
        _loss_line("validation", last_validation),
    ]
    saved = latest_iteration(args.save) if args.save else None
    if saved is None:
        lines.append(" checkpoint: none (set --save DIR, or CHECKPOINT_PATH=DIR for the example scripts)")
    else:
        lines.append(f" checkpoint: {os.path.abspath(checkpoint_dir(args.save, saved))} (resume with --load "
                     f"{args.save}; Hugging Face export: python tools/convert_to_hf.py --load {args.save} --output DIR)")
    if args.tensorboard_dir:
        lines.append(f" TensorBoard: tensorboard --logdir {os.path.abspath(args.tensorboard_dir)}")
    else:
        lines.append(" TensorBoard: off (set --tensorboard-dir DIR, or TENSORBOARD_DIR=DIR)")
    if args.wandb_project:
        lines.append(f" Weights & Biases: project {args.wandb_project}"
                     + (f", run {args.wandb_exp_name}" if args.wandb_exp_name else "")
                     + (f", files under {os.path.abspath(args.wandb_save_dir)}" if args.wandb_save_dir else ""))
    return "\n".join(lines)
