"""tools/memory_report.py: the ledger of one training step of the training program, measured on CPU.

A small config (hidden 256, 1 layer, seq 32, micro-batch 2, vocabulary 256) where the linear
weights dominate, as in the large models; ~25 s (three fresh processes). Checked (the issue's targets, docs/MEMORY.md):
POET-mem peak <= 0.7x AdamW's; saved for backward <= 1.2x AdamW's in "mem" mode and <= 1.5x
in "fast" mode; POET saves nothing token-independent beyond what AdamW saves; A0 initialization
allocates at most one transient copy; the activation model of the computed ledgers agrees with
the measurement. The computed part is checked for the headline case (Llama-8B on one 80 GB GPU), and
the save's term of the computed ledger against the bytes a real checkpoint save copies.
"""
import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool():
    spec = importlib.util.spec_from_file_location("memory_report", os.path.join(ROOT, "tools", "memory_report.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_report"] = module
    spec.loader.exec_module(module)
    return module


def test_measured_ledger_meets_the_targets(capsys):
    tool = load_tool()
    ledgers = tool.main(["--no-compute", "--hidden-size", "256", "--num-layers", "1", "--seq-length", "32",
                         "--vocab-size", "256"])
    out = capsys.readouterr().out
    assert "| saved for backward |" in out and "| peak |" in out
    adamw, fast, mem = ledgers["AdamW"], ledgers["POET fast"], ledgers["POET mem"]
    assert mem.peak <= 0.7 * adamw.peak, (mem.peak, adamw.peak)
    assert mem.saved <= 1.2 * adamw.saved and fast.saved <= 1.5 * adamw.saved, (mem.saved, fast.saved, adamw.saved)
    for poet in (fast, mem):
        assert abs(poet.saved_token_independent - adamw.saved_token_independent) <= 1024, poet
        assert 0 < poet.init_transient <= 1.0
        assert poet.a0 == 4 * (256 * 768 + 256 * 256 + 256 * 2048 + 1024 * 256)  # qkv, proj, fc1, fc2 in fp32
        assert poet.optimizer < 0.5 * adamw.optimizer
    for ledger in ledgers.values():  # the computed ledgers' activation model, evaluated at this config
        assert abs(ledger.saved_model / ledger.saved - 1) < 0.05, (ledger.saved_model, ledger.saved)


def test_computed_poet_memory_flags():
    """8-bit ``A0``: 1 byte per linear weight plus 8 bytes per group of 256 (3.6e9 linear weights at POET-X's
    3B shape); full recomputation keeps one hidden-size input per layer and token (bf16); with one
    micro-batch and full recomputation no blocks stay between layers, with several the step holds
    them and their gradient (fp32, d x b per side)."""
    from megatron_poet.memory_ledger import POETX, computed_ledger, linear_shapes

    config, seq, _ = POETX["POET-X 3B"]
    layers, h, ffn, heads, kv_heads, vocab = config
    linear = layers * sum(i * o for i, o, _ in linear_shapes(h, ffn, heads, kv_heads))
    sides = layers * sum(i + o for i, o, _ in linear_shapes(h, ffn, heads, kv_heads))
    native = computed_ledger(config, 1, 1, "POET mem", seq, 1, 256, microbatches=1)
    int8 = computed_ledger(config, 1, 1, "POET mem", seq, 1, 256, storage="int8", recompute=True, microbatches=1)
    assert native.a0 == int(2 * linear) and int8.a0 == int(linear * (1 + 8 / 256))
    assert int8.saved == seq * (layers * h * 2 + 3 * h * 2 + 4 * vocab)
    assert int8.blocks == 0 and native.blocks == 4 * sides * 256
    assert computed_ledger(config, 1, 1, "POET mem", seq, 1, 256, microbatches=4).blocks == 2 * 4 * sides * 256


def test_computed_llama_8b_on_one_80gb_gpu():
    tool = load_tool()
    adamw = tool.computed_ledger("Llama-8B", 1, 1, "AdamW", 2048, 1, 256)
    mem = tool.computed_ledger("Llama-8B", 1, 1, "POET mem", 2048, 1, 256)
    assert adamw.peak > 80e9 > mem.peak
    # bf16 A0 of the 6.98e9 linear weights; AdamW: 18 bytes per parameter (bf16 param, fp32 grad, fp32 main + Adam)
    assert abs(mem.a0 / 2 - 6.98e9) < 0.01e9
    assert abs((adamw.parameters + adamw.gradients + adamw.optimizer) / 18 - 8.03e9) < 0.01e9


def test_a_save_copies_the_parameters_and_nothing_of_a0(tmp_path):
    """``Ledger.save_peak`` = what a step keeps + the parameters: megatron's writer copies every saved tensor
    that views part of a larger storage (:mod:`_save_copies_driver`) — with the distributed optimizer every
    parameter, views of its contiguous buffer — and nothing of ``A0`` (saved from the layers' own storage, a
    gated ``linear_fc1``'s too). The bytes a real save (bf16, 8-bit ``A0``) copies equal the ledger's
    parameters exactly (its count of the trainable parameters is independent of the model's code)."""
    from test_training import _env, _free_port

    from megatron_poet.memory_ledger import computed_ledger

    layers, hidden, ffn, heads, vocab = 2, 64, 128, 4, 256  # (mock data adds an end-of-document token: 255 + 1)
    argv = ["--model-style", "llama", "--num-layers", str(layers), "--hidden-size", str(hidden), "--ffn-hidden-size",
            str(ffn), "--num-attention-heads", str(heads), "--seq-length", "32", "--micro-batch-size", "1",
            "--global-batch-size", "1", "--mock-data", "--vocab-size", str(vocab - 1), "--bf16",
            "--use-distributed-optimizer", "--poet-block-size", "16", "--poet-a0-storage", "int8",
            "--poet-a0-group-size", "16", "--train-iters", "1", "--eval-iters", "0", "--save", str(tmp_path),
            "--save-interval", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(_free_port()),
           os.path.join(ROOT, "tests", "_save_copies_driver.py"), *argv]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    copied = int(re.search(r"save copies (\d+) bytes", out.stdout).group(1))
    ledger = computed_ledger((layers, hidden, ffn, heads, heads, vocab), 1, 1, "POET mem", 32, 1, 16, storage="int8")
    assert copied == ledger.parameters == ledger.save_peak - ledger.static
