"""Pipeline parallelism and one model per seed, through the training program on CPU (gloo).

One session fixture trains the same tiny POET model (4 layers, hidden 64, POET block 16,
merges after iterations 2 and 4) with the same ``--seed`` at five layouts through
``python -m megatron_poet.training.pretrain`` under torchrun: TP=1, TP=2, PP=2, TP=2 x PP=2
and PP=2 with two virtual stages per rank (the interleaved schedule). Their checkpoints are
then evaluated by ``tests/_pipeline_driver.py`` at two other layouts (TP=1, and TP=2 x PP=2 with
virtual stages), which also compares the freshly built model of both layouts tensor by tensor;
the PP=2 and virtual-PP checkpoints are exported to Hugging Face. A PP=2 run stopped by
``--exit-interval`` is resumed. About 3 minutes on 2 cores.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from test_training import CORPUS, ROOT, _env, _free_port, losses, run

pytestmark = pytest.mark.skipif(not os.path.isfile(CORPUS), reason=f"corpus {CORPUS} not found")

# 320 tokens pad to 320 at TP=1 and TP=2 (multiples of 32 x TP): padded logits enter the softmax,
# so both sizes must pad alike to compute the same function.
MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "4", "--global-batch-size", "8", "--poet-block-size", "16",
         "--make-vocab-size-divisible-by", "32"]
TRAIN = ["--lr", "1e-2", "--poet-lr", "1e-2", "--train-iters", "4", "--poet-merge-interval", "2", "--log-interval",
         "1", "--eval-interval", "2", "--eval-iters", "1", "--save-interval", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
VIRTUAL = [*PP2, "--num-layers-per-virtual-pipeline-stage", "1"]
LAYOUTS = {  # name: (processes, layout flags)
    "tp1": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, PP2),
    "tp2pp2": (4, ["--tensor-model-parallel-size", "2", *PP2]),
    "vpp": (2, VIRTUAL),
}
VALIDATION = r"validation loss at iteration (\d+) \| lm loss: (\S+) "


@pytest.fixture(scope="session")
def layouts(data, tmp_path_factory) -> dict[str, dict]:
    """``name -> {"losses", "stdout", "ckpt"}`` of the five training runs (TP=2 x PP=2 also writes TensorBoard)."""
    runs = {}
    for name, (nproc, flags) in LAYOUTS.items():
        ckpt = str(tmp_path_factory.mktemp(f"ckpt_{name}"))
        extra = ["--tensorboard-dir", ckpt + "/tb"] if name == "tp2pp2" else []
        out = run(data + MODEL + TRAIN + flags + extra + ["--save", ckpt], nproc=nproc)
        runs[name] = {"losses": losses(out), "stdout": out.stdout, "ckpt": ckpt}
    return runs


def _driver(nproc: int, out: str, options: list[str], argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), os.path.join(ROOT, "tests", "_pipeline_driver.py"), out, *options, "--", *argv]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return torch.load(out)


@pytest.fixture(scope="session")
def evaluated(data, layouts, tmp_path_factory) -> dict[str, dict]:
    """Driver results at TP=2 x PP=2 with virtual stages ("tp2pp2v", which saves its fresh model)
    and at TP=1 ("tp1", which compares its fresh model with that one); both evaluate every checkpoint."""
    tmp = tmp_path_factory.mktemp("driver")
    fresh = tmp / "fresh"
    fresh.mkdir()
    checkpoints = [f"--checkpoint={name}={run_['ckpt']}" for name, run_ in layouts.items()]
    return {
        "tp2pp2v": _driver(4, str(tmp / "a.pt"), [f"--save-fresh={fresh}", *checkpoints],
                           data + MODEL + ["--tensor-model-parallel-size", "2", *VIRTUAL]),
        "tp1": _driver(1, str(tmp / "b.pt"), [f"--compare-fresh={fresh}", *checkpoints], data + MODEL),
    }


def test_every_layout_trains_the_same_model(layouts):
    """Same losses at every layout, over steps spanning two merges (Tolerance 1e-5 relative:
    the layouts sum the same products in another order in fp32; observed equal to 7 digits)."""
    reference = layouts["tp1"]
    for name, run_ in layouts.items():
        assert sorted(run_["losses"]) == [1, 2, 3, 4], (name, run_["losses"])
        for i, loss in run_["losses"].items():
            assert abs(float(loss) / float(reference["losses"][i]) - 1) < 1e-5, (name, i, loss, reference["losses"])
        validation = dict(re.findall(VALIDATION, run_["stdout"]))
        assert sorted(validation) == ["2", "4"], name
        for i, loss in validation.items():
            assert abs(float(loss) / float(dict(re.findall(VALIDATION, reference["stdout"]))[i]) - 1) < 1e-5, name
        assert "merges: 2" in run_["stdout"], name


def test_fresh_model_is_bitwise_the_same_at_another_layout(evaluated):
    """Every tensor of the model built at TP=2 x PP=2 x 2 virtual stages equals the TP=1 model's:
    embeddings, norms, output layer, POET A0 and permutations (saved, then loaded at TP=1)."""
    result = evaluated["tp1"]
    compared = result["fresh_compared"]
    kinds = ("word_embeddings.weight", "layernorm.weight", "output_layer.weight", "base_weight", "side.perm")
    assert all(any(k.endswith(kind) for k in compared) for kind in kinds), compared
    assert result["fresh_mismatch"] == [], result["fresh_mismatch"]


def test_checkpoints_reshard_across_pipeline_and_tensor_layouts(evaluated):
    """Each run's final checkpoint, loaded at TP=1 and at TP=2 x PP=2 x 2 virtual stages, gives the
    same logits (max |diff| <= 1e-5: the same function with TP reductions in another order; ~5e-7
    observed). The TP=1 run's checkpoint is read at its own layout too, and all five runs' models
    agree within 1e-4 (same training, fp32 rounding over 4 steps)."""
    own, other = evaluated["tp1"]["logits"], evaluated["tp2pp2v"]["logits"]
    assert sorted(own) == sorted(other) == sorted(LAYOUTS)
    for name in LAYOUTS:
        assert (own[name] - other[name]).abs().max() <= 1e-5, name
        assert (own[name] - own["tp1"]).abs().max() <= 1e-4, name


def test_resume_after_exit_interval_at_pp2(data, layouts, tmp_path):
    """PP=2 stopped by --exit-interval after iteration 2 (one merge done) and resumed: iterations 3-4
    print the uninterrupted PP=2 run's losses exactly (CPU, one thread: deterministic)."""
    ckpt = str(tmp_path / "ckpt")
    argv = data + MODEL + TRAIN + PP2 + ["--save", ckpt]
    first = run(argv + ["--exit-interval", "2"], nproc=2)
    assert "stopping at iteration 2 (--exit-interval)" in first.stdout
    resumed = run(argv + ["--load", ckpt], nproc=2)
    assert "resumed from" in resumed.stdout
    assert losses(resumed) == {i: layouts["pp2"]["losses"][i] for i in (3, 4)}


def test_log_line_validation_and_tensorboard_at_pp2(layouts):
    """At TP=2 x PP=2 the loss lives on the last stage: its rank prints and writes TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_ = layouts["tp2pp2"]
    assert "TP 2, PP 2, DP 1" in run_["stdout"]
    events = EventAccumulator(run_["ckpt"] + "/tb")
    events.Reload()
    train_loss = {e.step: e.value for e in events.Scalars("lm loss")}
    assert sorted(train_loss) == [1, 2, 3, 4]
    assert abs(train_loss[4] - float(run_["losses"][4])) < 1e-5 * float(run_["losses"][4])
    assert sorted(e.step for e in events.Scalars("validation/lm loss")) == [2, 4]
    assert [e.value for e in events.Scalars("poet/merges")][-1] == 2


@pytest.mark.parametrize("name", ["pp2", "vpp"])
def test_export_of_pipeline_checkpoints(data, layouts, evaluated, tmp_path, name):
    """tools/convert_to_hf.py's conversion of a PP=2 / virtual-PP checkpoint: transformers' logits equal
    the pipeline's (POET layers unfolded) within 1e-4 (fp32, another operation order; ~1e-6 observed)."""
    from transformers import AutoModelForCausalLM

    from megatron_poet.export.from_checkpoint import convert_checkpoint

    result = convert_checkpoint(layouts[name]["ckpt"], str(tmp_path / "hf"), progress=False)
    assert result.iteration == 4 and result.poet_layers == 16
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    reference = evaluated["tp2pp2v"]
    with torch.no_grad():
        logits = hf(reference["tokens"]).logits
    assert (logits - reference["logits"][name]).abs().max() <= 1e-4
