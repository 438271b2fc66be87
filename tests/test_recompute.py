"""Activation recomputation (Megatron-LM's flags): the same training, with less kept for backward.

Recomputing a layer re-runs the same fp32 operations on the same inputs (and the same dropout RNG
state, which megatron's checkpointing restores), so the printed losses and gradient norms of three
iterations — the later ones depend on every gradient — are equal as strings to a run without it.
Cases: POET fast under TP=2 with sequence parallelism, POET mem at PP=2, selective recompute, and the
DeepSpeed engine (ZeRO-2).
"""
import importlib.util
import re

import pytest

from test_training import TINY, run

LOG = re.compile(r"iteration\s+(\d+)/.*?\| lm loss: (\S+) \| grad norm: (\S+) ")
BASE = TINY + ["--train-iters", "3", "--poet-merge-interval", "2", "--num-layers", "4", "--global-batch-size", "8"]
CASES = {
    "full-uniform-tp2-sp-fast": (["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                 ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                  "--recompute-num-layers", "2"]),
    "full-block-pp2-mem": (["--pipeline-model-parallel-size", "2", "--poet-mode", "mem"],
                           ["--recompute-granularity", "full", "--recompute-method", "block",
                            "--recompute-num-layers", "1"]),
    "selective-mlp-core-attn": ([], ["--recompute-granularity", "selective", "--recompute-modules", "mlp",
                                     "core_attn"]),
    "full-uniform-zero2": (["--zero-stage", "2"], ["--recompute-granularity", "full", "--recompute-method",
                                                   "uniform", "--recompute-num-layers", "1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recomputation_trains_the_same(case, data, tmp_path, monkeypatch):
    layout, recompute = CASES[case]
    if "--zero-stage" in layout:
        if importlib.util.find_spec("deepspeed") is None:
            pytest.skip('deepspeed not installed (".[deepspeed]")')
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    nproc = 2
    plain = LOG.findall(run(data + BASE + layout, nproc=nproc).stdout)
    recomputed = LOG.findall(run(data + BASE + layout + recompute, nproc=nproc).stdout)
    assert len(plain) == 3 and recomputed == plain


@pytest.mark.parametrize("argv, message", [
    (["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "3",
      "--num-layers", "4"], "must divide the 4 layers"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     "--recompute-num-layers needs --recompute-granularity full"),
    (["--recompute-modules", "mlp"], "--recompute-modules needs --recompute-granularity selective"),
])
def test_recompute_flags_that_cannot_work_fail_before_work(argv, message):
    from megatron_poet.training.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError, match=re.escape(message)):
        parse_args(argv)


def _saved_bytes(argv: list[str]) -> int:
    """Bytes autograd keeps after one forward of the program's model (parameters and buffers aside)."""
    import torch

    from megatron_poet.poet.side import begin_step
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.training.model_provider import build_model

    args = parse_args(argv)
    args.vocab_size_unpadded = 320
    model = build_model(args, 320)
    begin_step(model, 1)
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, 320, (2, args.seq_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(args.seq_length).expand(2, -1), None, labels=tokens).sum()
    return sum(seen.values())


def test_full_recomputation_with_sdpa_keeps_a_fraction_of_the_activations():
    """4 layers of hidden 64, seq 256. Before issue 24 (local attention, no recompute) each layer kept
    ~20 activations of its width and the s x s probabilities of every head; with sdpa and full
    recompute of every layer only the layer inputs stay (plus the loss's logits): at most 0.15x (the
    issue's bound; 0.06x measured). sdpa alone removes the probabilities (0.71x here)."""
    from megatron_poet.megatron.cpu_backend import single_process

    base = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "256",
            "--poet-block-size", "16", "--vocab-size", "320"]
    with single_process():
        before = _saved_bytes(base + ["--attention-backend", "local"])
        sdpa = _saved_bytes(base)
        recomputed = _saved_bytes(base + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                          "--recompute-num-layers", "1"])
    assert sdpa < 0.8 * before and recomputed <= 0.15 * before, (before, sdpa, recomputed)
