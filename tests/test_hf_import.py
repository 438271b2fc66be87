"""Hugging Face in (tools/convert_from_hf.py): small Hugging Face models built here with random weights
(transformers, saved with save_pretrained; nothing downloaded) and the tinyshakespeare tokenizer.

- The converted model computes the original's logits (fp32, 1e-5 relative: the same function, summed
  in another order), POET or --no-poet; HF -> stack -> HF with no step returns every tensor bitwise
  (a POET layer with identity factors folds to its A0 exactly) and the original's config fields.
- Continued pretraining from it starts at the original's loss on the very first batch (the program's
  first logged loss vs transformers' on the recorded batch, 1e-4), at TP=1, TP=2 and PP=2 alike, and
  after merges every weight keeps its singular values up to the factors' orthogonality error.
- Bad input is refused with one message, before anything is written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from _export_utils import megatron_logits
from test_training import ROOT, TINY, _env, _free_port, losses, run

MODELS = {  # name: (transformers class name, config fields, save_pretrained max_shard_size)
    "llama_gqa_untied_sharded": ("LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1), "60KB"),
    "llama_tied_rope_scaled": ("LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
        max_position_embeddings=128, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}), "5GB"),
    "gpt2": ("GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128), "5GB"),
}
VOCAB = 320  # the session tokenizer's (conftest.data)


def _tokenizer_dir(data: list[str]) -> str:
    return data[data.index("--tokenizer-model") + 1]


def make_hf_model(name: str, directory, data: list[str], seed: int = 0) -> str:
    """Save Hugging Face model ``name`` of :data:`MODELS` with random weights (std 0.05) and the tokenizer."""
    import transformers

    cls_name, fields, shard = MODELS[name]
    cls = getattr(transformers, cls_name)
    config = cls.config_class(vocab_size=VOCAB, **fields)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(str(directory), max_shard_size=shard)
    tokenizer = _tokenizer_dir(data)
    for file in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, file), directory)
    return str(directory)


def _hf(directory: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _load_converted(ckpt: str):
    """The training program's model of converted checkpoint ``ckpt`` at TP=1 (in this process)."""
    from megatron_poet.checkpoint import DistFormat
    from megatron_poet.export.from_checkpoint import run_arguments
    from megatron_poet.training.model_provider import build_model

    path = os.path.join(ckpt, "iter_0000000")
    args, _ = run_arguments(DistFormat().read_args(path))
    model = build_model(args, DistFormat().padded_vocab_size(path)).eval()
    DistFormat().load_model_weights(model, path)
    return model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("poet", [True, False], ids=["poet", "no_poet"])
def test_converted_model_computes_the_original(name, poet, data, tmp_path):
    from megatron_poet.hf_import import convert_hf_model
    from megatron_poet.megatron.cpu_backend import single_process

    hf_dir = make_hf_model(name, tmp_path / "hf", data)
    flags = ["--poet-block-size", "16"] if poet else ["--no-poet"]
    result = convert_hf_model(hf_dir, str(tmp_path / "ckpt"), flags)
    assert result.poet_layers == (8 if poet else 0)
    if name.endswith("sharded"):
        assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))
    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _hf(hf_dir)(tokens).logits.float()
    with single_process():
        actual = megatron_logits(_load_converted(str(tmp_path / "ckpt")), tokens, VOCAB)
    relative = float((actual - expected).abs().max() / expected.abs().max())
    assert relative <= 1e-5, relative


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bitwise(name, data, tmp_path):
    """HF -> stack (POET) -> HF with no step: every tensor bitwise, the original's config fields, and
    the same greedy generation."""
    from safetensors.torch import load_file

    from megatron_poet.export.from_checkpoint import convert_checkpoint
    from megatron_poet.hf_import import convert_hf_model

    hf_dir = make_hf_model(name, tmp_path / "hf", data)
    convert_hf_model(hf_dir, str(tmp_path / "ckpt"), ["--poet-block-size", "16"])
    convert_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False)

    def tensors(directory):
        state = {}
        for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
            state.update(load_file(os.path.join(directory, file)))
        return state

    original, back = tensors(hf_dir), tensors(str(tmp_path / "back"))
    assert original.keys() == back.keys()
    assert [k for k in original if not torch.equal(original[k], back[k])] == []
    before, after = (json.load(open(os.path.join(d, "config.json"))) for d in (hf_dir, str(tmp_path / "back")))
    for field in ("architectures", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                  "rms_norm_eps", "layer_norm_epsilon", "rope_parameters", "activation_function",
                  "num_key_value_heads", "head_dim", "attention_dropout", "attn_pdrop", "resid_pdrop"):
        assert before.get(field) == after.get(field), (field, before.get(field), after.get(field))
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    generate = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(_hf(hf_dir).generate(prompt, **generate), _hf(str(tmp_path / "back")).generate(prompt, **generate))


def _first_batch_loss_of_hf(hf_dir: str, batch_file: str) -> float:
    batch = torch.load(batch_file)
    with torch.no_grad():
        logits = _hf(hf_dir)(batch["tokens"]).logits.float()
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                                  reduction="none")
    mask = batch["loss_mask"].reshape(-1).float()
    return float((per_token * mask).sum() / mask.sum())


def test_continued_pretraining_starts_at_the_originals_loss_and_keeps_its_spectrum(data, tmp_path):
    from safetensors.torch import load_file

    from megatron_poet.export.from_checkpoint import convert_checkpoint

    hf_dir = make_hf_model("llama_gqa_untied_sharded", tmp_path / "hf", data)
    ckpt = str(tmp_path / "ckpt")
    out = subprocess.run([sys.executable, "tools/convert_from_hf.py", "--hf", hf_dir, "--output", ckpt,
                          "--poet-block-size", "16", "--tensor-model-parallel-size", "2"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "8 POET layers" in out.stdout, out.stderr[-3000:]
    data_flags = [f for f in data if f != _tokenizer_dir(data) and f != "--tokenizer-model"]  # the checkpoint's
    train = data_flags + ["--load", ckpt, "--finetune", "--use-checkpoint-args", "--seq-length", "32",
                          "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "4",
                          "--poet-merge-interval", "2", "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0"]
    batch_file = str(tmp_path / "first_batch.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(_free_port()),
           os.path.join(ROOT, "tests", "_first_batch_driver.py"), *train, "--save", str(tmp_path / "run")]
    first = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), FIRST_BATCH_OUT=batch_file), capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "fine-tuning from" in first.stdout and "merges: 2" in first.stdout
    logged = losses(first)
    assert abs(float(logged[1]) - _first_batch_loss_of_hf(hf_dir, batch_file)) <= 1e-4, logged
    for layout in (["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]):
        other = losses(run(train + layout + ["--train-iters", "1"], nproc=2))
        assert abs(float(other[1]) / float(logged[1]) - 1) <= 1e-5, (layout, other, logged)

    # The spectrum of every linear the stack trains (the fused QKV and gate/up matrices: the output-side
    # factor rotates rows across Q, K and V, so only the fused matrix keeps its singular values): merges
    # fold exactly orthogonal matrices; the unmerged factors (trained since the last merge) are orthogonal
    # up to the logged error e, which bounds each singular value's relative change (plus fp32 rounding).
    orth = max(float(e) for e in re.findall(r"max orth err: (\S+)", first.stdout))
    convert_checkpoint(str(tmp_path / "run"), str(tmp_path / "trained"), progress=False)
    before = {}
    for file in (f for f in os.listdir(hf_dir) if f.endswith(".safetensors")):
        before.update(load_file(os.path.join(hf_dir, file)))
    after = load_file(os.path.join(tmp_path / "trained", "model.safetensors"))

    def linears(state):
        for i in range(2):
            p = f"model.layers.{i}."
            yield f"{i}.qkv", torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            yield f"{i}.o", state[p + "self_attn.o_proj.weight"]
            yield f"{i}.gate_up", torch.cat([state[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up")])
            yield f"{i}.down", state[p + "mlp.down_proj.weight"]

    for (name, w0), (_, w1) in zip(linears(before), linears(after)):
        assert not torch.equal(w0, w1)  # trained
        s0, s1 = torch.linalg.svdvals(w0.double()), torch.linalg.svdvals(w1.double())
        drift = float((s1 - s0).abs().max() / s0.max())
        assert drift <= orth + 1e-6, (name, drift, orth)


def _write_config(directory, **fields) -> str:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(fields))
    return str(directory)


LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.mark.parametrize("fields, message", [
    (dict(LLAMA, model_type="mixtral", num_local_experts=8), "mixture-of-experts layers (num_local_experts=8)"),
    (dict(LLAMA, model_type="mistral", sliding_window=4096), "sliding-window attention (sliding_window=4096)"),
    (dict(LLAMA, attention_bias=True), "a biased Llama (attention_bias / mlp_bias"),
    (dict(LLAMA, model_type="qwen3"), "model type 'qwen3'"),
    (dict(LLAMA, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE scaling type 'yarn'"),
    (dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}), "Llama-3.1 RoPE scaling with"),
    (dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
          scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
])
def test_models_the_stack_cannot_represent_are_refused(fields, message, data, tmp_path):
    from megatron_poet.hf_import import HFImportError, convert_hf_model

    hf_dir = _write_config(tmp_path / "hf", **fields)
    with pytest.raises(HFImportError, match=re.escape(message)):
        convert_hf_model(hf_dir, str(tmp_path / "ckpt"), tokenizer=_tokenizer_dir(data))
    assert os.listdir(tmp_path) == ["hf"]


def test_bad_weights_and_layouts_fail_before_writing(data, tmp_path):
    """One message each, and the output directory never appears (not even a staging directory)."""
    hf_dir = make_hf_model("llama_gqa_untied_sharded", tmp_path / "hf", data)
    cases = []
    cases.append((["--poet-block-size", "24"], "not divisible by block_size=24"))
    cases.append((["--tensor-model-parallel-size", "4"], "--num-query-groups 2 is not divisible by "
                                                          "--tensor-model-parallel-size 4"))
    for flags, message in cases:
        out = subprocess.run([sys.executable, "tools/convert_from_hf.py", "--hf", hf_dir, "--output",
                              str(tmp_path / "ckpt"), *flags], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2 and message in out.stderr and out.stderr.count("error:") == 1, out.stderr[-2000:]
    from megatron_poet.hf_import import HFImportError, convert_hf_model

    shards = sorted(f for f in os.listdir(hf_dir) if f.startswith("model-"))
    os.remove(os.path.join(hf_dir, shards[-1]))
    with pytest.raises(HFImportError, match=f"shard.* missing: {shards[-1]}"):
        convert_hf_model(hf_dir, str(tmp_path / "ckpt"), ["--poet-block-size", "16"])
    for f in os.listdir(hf_dir):
        if f.startswith("model"):
            os.remove(os.path.join(hf_dir, f))
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFImportError, match=r"pickle files \(pytorch_model.bin\), which are refused"):
        convert_hf_model(hf_dir, str(tmp_path / "ckpt"), ["--poet-block-size", "16"])
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_a_model_only_checkpoint_needs_finetune(data, tmp_path):
    from megatron_poet.checkpoint import CheckpointError
    from megatron_poet.hf_import import convert_hf_model
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.training.checkpointing import check_checkpoint_args

    hf_dir = make_hf_model("gpt2", tmp_path / "hf", data)
    ckpt = str(tmp_path / "ckpt")
    convert_hf_model(hf_dir, ckpt, ["--poet-block-size", "16"])
    args = parse_args(["--load", ckpt, "--use-checkpoint-args"])
    assert (args.model_style, args.openai_gelu, args.hidden_size, args.tokenizer_model) == \
        ("gpt2", True, 64, os.path.join(os.path.abspath(ckpt), "hf"))
    args.vocab_size_unpadded = VOCAB
    with pytest.raises(CheckpointError, match="holds only model weights .*--finetune"):
        check_checkpoint_args(args)
    args.finetune = True
    assert check_checkpoint_args(args) == 0


def test_the_example_script_continues_a_hugging_face_model(data, tmp_path):
    """HF_MODEL=DIR bash examples/pretrain_gpt_poet.sh: imported once, fine-tuned from, then resumed."""
    hf_dir = make_hf_model("llama_gqa_untied_sharded", tmp_path / "hf", data)
    prefix = data[data.index("--data-path") + 1]
    ckpt = str(tmp_path / "run")
    env = dict(_env(), HF_MODEL=hf_dir, DATA_PATH=prefix, CHECKPOINT_PATH=ckpt)
    flags = ["--poet-block-size", "16", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "4",
             "--log-interval", "1", "--eval-iters", "0", "--data-cache-path", data[data.index("--data-cache-path") + 1]]

    def example(iterations: int) -> subprocess.CompletedProcess:
        out = subprocess.run(["bash", "examples/pretrain_gpt_poet.sh", "--train-iters", str(iterations), *flags],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return out

    first = example(2)
    assert "importing the Hugging Face model" in first.stdout
    assert f"fine-tuning from {os.path.join(ckpt, 'hf_import', 'iter_0000000')}" in first.stdout
    second = example(3)
    assert "importing" not in second.stdout and "resumed from" in second.stdout and sorted(losses(second)) == [3]
