"""tools/convert_to_hf.py end to end: training checkpoints -> transformers (CPU, 1-2 min on 2 cores).

Each case trains a tiny model with the training program (torchrun, CPU/gloo) for
3 iterations, POET runs merging after iteration 2, so the checkpoint holds a
merged A0 plus trained factors. The reference is the training program's own
model at the run's TP size evaluated on the checkpoint (tests/_export_reference.py:
POET layers apply R, A0, P in turn and never form P A0 R). The export, converted
in one process at TP=1, must give transformers logits within 1e-4 (fp32) and the
same greedy generations (20 new tokens or up to eos, on prompts without near-ties).

Also here (fast): clear errors for unreadable checkpoints, and no code execution
from a malicious checkpoint.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from _export_utils import assert_same_greedy, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
needs_corpus = pytest.mark.skipif(not os.path.isfile(CORPUS), reason=f"corpus {CORPUS} not found")

# --make-vocab-size-divisible-by 48: the 320-token vocabulary pads to 336 at TP=1 but 384 at
# TP=2, so the converter must take the padded size from the checkpoint, not recompute it.
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "32", "--micro-batch-size", "4", "--lr", "3e-3", "--poet-lr", "3e-3",
        "--poet-block-size", "16", "--poet-merge-interval", "2", "--train-iters", "3", "--log-interval", "1",
        "--eval-interval", "100", "--eval-iters", "1", "--make-vocab-size-divisible-by", "48"]
CASES = {  # name: (extra training flags, TP size); llama style: untied, no biases; gpt2: tied, biases
    "poet_tp2": ([], 2),
    "poet_tp1": ([], 1),
    "no_poet_tp2": (["--no-poet"], 2),
    "gpt2_poet_tp2": (["--model-style", "gpt2", "--num-query-groups", "4"], 2),  # GPT-2 has no GQA
    # fully stochastic: 2 permutation groups (rebuilt so at TP=1); also saved at iteration 2, to resume
    "poet_fs_tp2": (["--poet-variant", "fs", "--save-interval", "2"], 2),
    "poet_bf16_tp1": (["--bf16"], 1),
}


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def torchrun(nproc: int, target: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", free_port(), *target]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[list[str], str]:
    """(training data flags, tokenizer directory): tinyshakespeare with a 320-token BPE."""
    from megatron_poet.data import preprocess_corpus

    prefix = str(tmp_path_factory.mktemp("data") / "shakespeare")
    stats = preprocess_corpus(CORPUS, prefix, train_tokenizer_vocab_size=320, append_eod=True, progress=False)
    flags = ["--data-path", prefix, "--tokenizer-model", stats.tokenizer_path,
             "--data-cache-path", str(tmp_path_factory.mktemp("cache"))]
    return flags, stats.tokenizer_path


def train_and_reference(data_flags: list[str], name: str, tmp_path) -> tuple[str, dict]:
    """Train case ``name``; return (checkpoint root, reference outputs of its last checkpoint)."""
    extra, tp = CASES[name]
    ckpt = str(tmp_path / "ckpt")
    argv = data_flags + TINY + extra + ["--tensor-model-parallel-size", str(tp)]
    reference = str(tmp_path / "reference.pt")
    out = torchrun(tp, [os.path.join(ROOT, "tests", "_export_reference.py"), reference, "--", *argv, "--save", ckpt])
    if "--no-poet" not in extra:  # the export must see a merged A0 and factors trained after it
        from megatron_poet.checkpoint.dist_format import read_common_state

        merges = read_common_state(os.path.join(ckpt, "iter_0000003"))["merge_scheduler"]
        assert merges["merges_done"] == 1 and merges["steps_since_merge"] == 1, merges
    ref = torch.load(reference)
    ref["training_log"] = out.stdout
    return ckpt, ref


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """``trained(name) -> (checkpoint root, reference outputs)``; each case is trained once per module."""
    cache = {}

    def get(name: str) -> tuple[str, dict]:
        if name not in cache:
            cache[name] = train_and_reference(data[0], name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def assert_matches_reference(hf_dir: str, ref: dict) -> None:
    """fp32 logits within 1e-4 (same function, different operation order: ~1e-6 observed); same greedy
    tokens on the reference prompts whose greedy path has no near-tie."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(ref["tokens"]).logits
    diff = (logits - ref["logits"]).abs().max().item()
    assert diff <= 1e-4, f"max |logits difference| {diff:.3e}"
    assert_same_greedy(hf, ref["prompts"], ref["greedy"], ref["margins"])


@needs_corpus
def test_cli_poet_tp2(data, trained, tmp_path):
    """The command line on a POET run at TP=2; tokenizer round trip."""
    tokenizer = data[1]
    ckpt, ref = trained("poet_tp2")
    out_dir = str(tmp_path / "hf")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "convert_to_hf.py"), "--load", ckpt, "--output", out_dir,
           "--tokenizer", tokenizer, "--no-progress"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-5000:]
    assert "llama-style" in out.stdout and "8 POET layers folded" in out.stdout
    config = json.loads(open(os.path.join(out_dir, "config.json")).read())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 320
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    assert_matches_reference(out_dir, ref)

    from transformers import AutoTokenizer

    from megatron_poet.data import load_hf_tokenizer

    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler ... ünïcödé"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == load_hf_tokenizer(tokenizer).tokenize(text)  # the ids the model was trained on
    assert hf_tok.decode(ids) == text
    generation = json.loads(open(os.path.join(out_dir, "generation_config.json")).read())
    assert generation["eos_token_id"] == hf_tok.eos_token_id == load_hf_tokenizer(tokenizer).eod


@needs_corpus
@pytest.mark.parametrize("name", ["poet_tp1", "no_poet_tp2", "gpt2_poet_tp2"])
def test_convert_checkpoint(data, trained, tmp_path, name):
    from megatron_poet.export.from_checkpoint import convert_checkpoint

    ckpt, ref = trained(name)
    result = convert_checkpoint(ckpt, str(tmp_path / "hf"), tokenizer=data[1], progress=False)
    assert result.iteration == 3 and result.poet_layers == (0 if name.startswith("no_poet") else 8)
    assert result.spec.architecture == ("gpt2" if name.startswith("gpt2") else "llama")
    assert_matches_reference(str(tmp_path / "hf"), ref)


def test_export_rebuilds_in_the_dtype_a0_is_stored_in():
    """bf16 runs: bf16; checkpoints that record no dtype (older ones): fp32; a run that kept an fp32 master
    of A0 (saved as its A0): fp32, without a master."""
    from megatron_poet.export.from_checkpoint import run_arguments

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size_unpadded=100)
    assert run_arguments({**base, "bf16": True})[0].bf16
    assert not run_arguments(base)[0].bf16
    master = run_arguments({**base, "bf16": True, "poet_fp32_master_a0": True})[0]
    assert not master.bf16 and not master.poet_fp32_master_a0


@needs_corpus
def test_bf16_run_is_exported_from_a_bf16_build(data, trained, tmp_path):
    """A bf16 run's model is rebuilt in bf16 for the export (A0 as stored: half an fp32 build's memory);
    folding each layer in fp32 gives bitwise the weights an fp32 build of the same checkpoint gives."""
    from safetensors.torch import load_file

    from megatron_poet.checkpoint import format_of, resolve_checkpoint
    from megatron_poet.export import TokenizerInfo, hf_state_and_config
    from megatron_poet.export.from_checkpoint import convert_checkpoint, run_arguments
    from megatron_poet.megatron.cpu_backend import single_process
    from megatron_poet.training.model_provider import build_model

    ckpt, _ = trained("poet_bf16_tp1")
    convert_checkpoint(ckpt, str(tmp_path / "hf"), tokenizer=data[1], progress=False)
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    path, _ = resolve_checkpoint(ckpt, None)
    checkpoint = format_of(path)
    args, _ = run_arguments(checkpoint.read_args(path))
    assert args.bf16
    args.bf16 = False
    with single_process(seed=args.seed):
        model = build_model(args, checkpoint.padded_vocab_size(path)).eval()
        checkpoint.load_model_weights(model, path)
        _, _, reference = hf_state_and_config(model, TokenizerInfo.from_path(data[1]))
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], tensor), name


@needs_corpus
def test_fully_stochastic_tp2_run_resumes_bitwise_and_exports(data, trained, tmp_path):
    """--poet-variant fs at TP=2 through the training program: the A0 norm drift stays at rounding
    level across the merge, a resume from iteration 2 (just after the merge) reproduces iteration
    3 bitwise, a resume at TP=1 without the run's 2 permutation groups (= fs blocks) is refused
    before any work, and the export (rebuilt at TP=1 with 2 groups) matches the TP=2 model."""
    import re

    from megatron_poet.export.from_checkpoint import convert_checkpoint
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.checkpoint import CheckpointError, write_marker
    from megatron_poet.training.checkpointing import check_checkpoint_args

    ckpt, ref = trained("poet_fs_tp2")
    log = ref["training_log"]
    drift = [float(d) for d in re.findall(r"A0 norm drift: (\S+)", log)]
    assert len(drift) == 3 and max(drift) < 1e-5, drift  # fp32 A0: one rounding per merge
    straight = dict(re.findall(r"iteration\s+(\d+)/\s*\d+ .*?\| lm loss: (\S+) ", log))
    argv = data[0] + TINY + CASES["poet_fs_tp2"][0] + ["--tensor-model-parallel-size", "2", "--load", ckpt]
    shutil.copytree(ckpt, tmp_path / "ckpt")
    write_marker(str(tmp_path / "ckpt"), 2)
    argv[argv.index(ckpt)] = str(tmp_path / "ckpt")
    resumed = torchrun(2, ["-m", "megatron_poet.training.pretrain", *argv])
    assert dict(re.findall(r"iteration\s+(\d+)/\s*\d+ .*?\| lm loss: (\S+) ", resumed.stdout)) == {"3": straight["3"]}
    args = parse_args(data[0] + TINY + ["--poet-variant", "fs", "--load", ckpt])
    args.vocab_size_unpadded = 320
    with pytest.raises(CheckpointError, match="--poet-permutation-groups: checkpoint 2, command line 1"):
        check_checkpoint_args(args)
    convert_checkpoint(ckpt, str(tmp_path / "hf"), tokenizer=data[1], progress=False)
    assert_matches_reference(str(tmp_path / "hf"), ref)


@needs_corpus
def test_checkpoint_of_another_model_is_refused(data, trained, tmp_path):
    """Arguments claiming POET over --no-poet tensors: the missing POET tensors are named."""
    from megatron_poet.checkpoint import CheckpointReadError
    from megatron_poet.checkpoint.dist_format import read_common_state
    from megatron_poet.export.from_checkpoint import convert_checkpoint

    source = os.path.join(trained("no_poet_tp2")[0], "iter_0000003")
    ckpt = tmp_path / "iter_0000003"
    shutil.copytree(source, ckpt)
    common = read_common_state(str(ckpt))
    common["args"]["poet"] = True
    torch.save(common, ckpt / "common.pt")
    with pytest.raises(CheckpointReadError, match="lacks tensors .*base_weight"):
        convert_checkpoint(str(ckpt), str(tmp_path / "hf"), tokenizer=data[1], progress=False)


def test_unreadable_checkpoints_fail_clearly(tmp_path):
    from megatron_poet.checkpoint import CheckpointReadError, resolve_checkpoint

    with pytest.raises(CheckpointReadError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointReadError, match="no latest_checkpointed_iteration.txt"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("soon\n")
    with pytest.raises(CheckpointReadError, match="not an iteration number"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(CheckpointReadError, match="iter_0000007 does not exist"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "iter_0000007").mkdir()
    with pytest.raises(CheckpointReadError, match="incomplete"):
        resolve_checkpoint(str(tmp_path))


class _Exploit:
    """Pickles to a call of ``os.system``: unpickling it unsafely would create ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _fake_checkpoint(directory) -> None:
    directory.mkdir()
    (directory / "metadata.json").write_text(json.dumps(
        {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
         "common_backend": "torch", "common_backend_version": 1}))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    from megatron_poet.checkpoint import CheckpointReadError, DistFormat
    from megatron_poet.checkpoint.dist_format import read_tensor_shapes

    pwned = tmp_path / "pwned"
    ckpt = tmp_path / "iter_0000001"
    _fake_checkpoint(ckpt)
    with open(ckpt / ".metadata", "wb") as f:  # the tensor index, normally read with plain pickle.load
        pickle.dump(_Exploit(pwned), f)
    with pytest.raises(CheckpointReadError, match=r"refusing to load .*\.metadata .*posix\.system"):
        read_tensor_shapes(str(ckpt))
    torch.save({"args": _Exploit(pwned)}, ckpt / "common.pt")  # the common state, read with torch.load
    with pytest.raises(CheckpointReadError, match=r"refusing to load .*common\.pt: it references posix\.system"):
        DistFormat().read_args(str(ckpt))
    assert not pwned.exists()
